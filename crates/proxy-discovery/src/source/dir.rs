//! The directory source: Kubernetes YAML manifests on disk, hot reloaded.
//!
//! Layout of the directory `DIR`:
//!
//! - `DIR/*.yaml`, `DIR/*.yml`: the local cluster's objects (multi-document files).
//! - `DIR/clusters/<name>/*.yaml|*.yml`: what is known of linked cluster `<name>`
//!   (its ClusterSettings, Services, Endpoints), as a controller watching that
//!   cluster through the link would see it.
//!
//! Entries starting with `.` are skipped, and symlinks are followed. A Kubernetes
//! ConfigMap mount is read one generation at a time: kubelet writes a new
//! timestamped directory, renames a temporary symlink over `..data` to point at it,
//! and only then adds and removes the key symlinks (`key -> ..data/key`) beside
//! it; so when `DIR/..data` exists, the local files are read from its target, and
//! a poll between the swap and the key updates sees the new generation whole,
//! never a mix of keys of two. The cluster's name comes from, in order: the caller, the local
//! ClusterSettings' `spec.clusterName`, the directory's own name.
//!
//! Watching polls a fingerprint of the contents every interval rather than using
//! inotify, which follows ConfigMap `..data` swaps poorly; the tree is only parsed
//! when the fingerprint changes. This module does not talk to an API server.

use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use isthmus_vocab::{ClusterName, error_chain};
use tokio::task::JoinHandle;

use super::{Discovery, DiscoveryError};
use crate::model::{ClusterView, Object, Parsed, parse_manifests};
use crate::reconcile::READY_CONDITION;
use crate::snapshot::Snapshot;

/// The shortest poll interval honoured.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The subdirectory holding linked clusters' views.
pub const CLUSTERS_DIR: &str = "clusters";

/// The symlink a ConfigMap volume swaps to publish a new generation.
pub const DATA_LINK: &str = "..data";

/// A directory of manifests to load, once or continuously.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirSource {
    dir: PathBuf,
    cluster: Option<ClusterName>,
}

/// The files of one load, read into memory, so the fingerprint and the parse see
/// the same bytes.
struct Tree {
    local: Vec<(PathBuf, String)>,
    clusters: BTreeMap<ClusterName, Vec<(PathBuf, String)>>,
    fingerprint: u64,
}

/// What one poll found.
enum Poll {
    Unchanged,
    Loaded(u64, Box<Snapshot>),
    Failed(Option<u64>, DiscoveryError),
}

impl DirSource {
    /// A source for `dir`; the cluster's name is derived (see the module docs).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            cluster: None,
        }
    }

    /// Fixes the cluster's name; a ClusterSettings naming another is then an error.
    pub fn with_cluster(mut self, cluster: ClusterName) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads `dir` once (blocking file I/O).
    pub fn load_once(dir: impl Into<PathBuf>) -> Result<Snapshot, DiscoveryError> {
        Self::new(dir).load()
    }

    /// Reads, parses, validates and reconciles the whole directory (blocking I/O).
    pub fn load(&self) -> Result<Snapshot, DiscoveryError> {
        self.read_tree().and_then(|tree| self.build(&tree))
    }

    /// Loads the directory, then keeps reloading it every `interval` (at least
    /// [`MIN_INTERVAL`]) until `shutdown` completes.
    ///
    /// Fails if the first load fails: there is no last good state to serve yet.
    /// Afterwards, a load that fails is logged with file and field, counted, and
    /// recorded on the handle's status, and the previous snapshot keeps serving.
    pub async fn watch(
        self,
        interval: Duration,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(Discovery, JoinHandle<()>), DiscoveryError> {
        let source = self.clone();
        let (fingerprint, snapshot) = tokio::task::spawn_blocking(move || {
            let tree = source.read_tree()?;
            let snapshot = source.build(&tree)?;
            Ok::<_, DiscoveryError>((tree.fingerprint, snapshot))
        })
        .await
        .map_err(|e| DiscoveryError::Read {
            path: self.dir.clone(),
            source: std::io::Error::other(e),
        })??;
        log_loaded(&self.dir, 1, &snapshot);
        let discovery = Discovery::new(snapshot);
        let task = tokio::spawn(self.run(discovery.clone(), interval, fingerprint, shutdown));
        Ok((discovery, task))
    }

    async fn run(
        self,
        discovery: Discovery,
        interval: Duration,
        mut last: u64,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        // `interval` panics on zero; a zero interval would only spin anyway.
        let mut ticker = tokio::time::interval(interval.max(MIN_INTERVAL));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the initial load just happened.
        ticker.tick().await;
        tokio::pin!(shutdown);
        // A read error has no fingerprint; remember its text so a persistent one
        // is reported once, not on every tick.
        let mut last_read_error: Option<String> = None;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticker.tick() => {}
            }
            let source = self.clone();
            let poll = tokio::task::spawn_blocking(move || source.poll(last)).await;
            let poll = match poll {
                Ok(p) => p,
                Err(e) => Poll::Failed(
                    None,
                    DiscoveryError::Read {
                        path: self.dir.clone(),
                        source: std::io::Error::other(e),
                    },
                ),
            };
            match poll {
                Poll::Unchanged => {}
                Poll::Loaded(fingerprint, snapshot) => {
                    last = fingerprint;
                    last_read_error = None;
                    discovery.publish(*snapshot);
                    log_loaded(&self.dir, discovery.generation(), &discovery.load());
                }
                Poll::Failed(fingerprint, err) => {
                    let text = error_chain(&err);
                    match fingerprint {
                        Some(fp) => last = fp,
                        None if last_read_error.as_deref() == Some(text.as_str()) => continue,
                        None => {
                            last_read_error = Some(text.clone());
                            // Forget what was read last: a directory that comes back
                            // exactly as it was must still be loaded and published,
                            // or the state would stay marked stale (and its age keep
                            // growing) although the source is fine again.
                            last = 0;
                        }
                    }
                    discovery.report_failure(&err);
                    tracing::error!(dir = %self.dir.display(), error = %text,
                        failed_reloads = discovery.failed_reloads(),
                        "discovery reload failed; the last good state keeps serving");
                }
            }
        }
        tracing::debug!(dir = %self.dir.display(), "discovery watch stopped");
    }

    fn poll(&self, last: u64) -> Poll {
        let tree = match self.read_tree() {
            Ok(t) => t,
            Err(e) => return Poll::Failed(None, e),
        };
        if tree.fingerprint == last {
            return Poll::Unchanged;
        }
        match self.build(&tree) {
            Ok(s) => Poll::Loaded(tree.fingerprint, Box::new(s)),
            Err(e) => Poll::Failed(Some(tree.fingerprint), e),
        }
    }

    fn read_tree(&self) -> Result<Tree, DiscoveryError> {
        let mut hasher = DefaultHasher::new();
        let base = generation_dir(&self.dir);
        let local = read_manifest_files(&base, &mut hasher)?;
        let mut clusters = BTreeMap::new();
        // Linked clusters' views come from the same generation when the volume
        // projects them (`items` with `clusters/...` paths); a plain directory
        // beside a projected volume (another mount, a file a person wrote) is read
        // as it stands.
        let projected = base.join(CLUSTERS_DIR);
        let clusters_dir = if projected.is_dir() {
            projected
        } else {
            self.dir.join(CLUSTERS_DIR)
        };
        if clusters_dir.is_dir() {
            for (name, path) in list(&clusters_dir)? {
                if !path.is_dir() {
                    continue;
                }
                let cluster =
                    ClusterName::parse(&name).map_err(|source| DiscoveryError::BadClusterDir {
                        path: path.clone(),
                        source,
                    })?;
                name.hash(&mut hasher);
                let files = read_manifest_files(&path, &mut hasher)?;
                clusters.insert(cluster, files);
            }
        }
        Ok(Tree {
            local,
            clusters,
            fingerprint: hasher.finish(),
        })
    }

    fn build(&self, tree: &Tree) -> Result<Snapshot, DiscoveryError> {
        let local = parse_all(&tree.local)?;
        let cluster = match &self.cluster {
            Some(c) => c.clone(),
            None => self.derive_cluster_name(&local)?,
        };
        let local = ClusterView::build(cluster, local)?;
        let mut remotes = BTreeMap::new();
        for (name, files) in &tree.clusters {
            let view = ClusterView::build(name.clone(), parse_all(files)?)?;
            remotes.insert(name.clone(), view);
        }
        Ok(Snapshot::build(local, remotes))
    }

    fn derive_cluster_name(&self, local: &[Parsed]) -> Result<ClusterName, DiscoveryError> {
        let from_settings = local.iter().find_map(|p| match &p.object {
            Object::ClusterSettings(s) => Some(s.spec.cluster_name.clone()),
            _ => None,
        });
        if let Some(name) = from_settings {
            return Ok(name);
        }
        // `.` or `..` have no name of their own; the resolved path does.
        let resolved = std::fs::canonicalize(&self.dir).map_err(|source| DiscoveryError::Read {
            path: self.dir.clone(),
            source,
        })?;
        resolved
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| ClusterName::parse(n).ok())
            .ok_or_else(|| DiscoveryError::NoClusterName {
                path: self.dir.clone(),
            })
    }
}

fn parse_all(files: &[(PathBuf, String)]) -> Result<Vec<Parsed>, DiscoveryError> {
    let mut out = Vec::new();
    for (path, text) in files {
        out.extend(parse_manifests(&path.display().to_string(), text)?);
    }
    Ok(out)
}

/// Where the local files of `dir` are read: the target of a ConfigMap volume's
/// `..data` when there is one (resolved once, so every file of a poll comes from
/// the same generation), else `dir` itself.
fn generation_dir(dir: &Path) -> PathBuf {
    match std::fs::read_link(dir.join(DATA_LINK)) {
        Ok(target) => dir.join(target),
        Err(_) => dir.to_owned(),
    }
}

/// Entries of `dir` not starting with `.`, sorted by name.
fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>, DiscoveryError> {
    let read_err = |source| DiscoveryError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            tracing::debug!(path = %entry.path().display(), "skipping a file name that is not UTF-8");
            continue;
        };
        if !name.starts_with('.') {
            entries.push((name, entry.path()));
        }
    }
    entries.sort();
    Ok(entries)
}

/// Reads every `*.yaml`/`*.yml` file directly in `dir` (following symlinks),
/// feeding names and contents to `hasher`.
fn read_manifest_files(
    dir: &Path,
    hasher: &mut DefaultHasher,
) -> Result<Vec<(PathBuf, String)>, DiscoveryError> {
    let mut files = Vec::new();
    for (name, path) in list(dir)? {
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) || !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| DiscoveryError::Read {
            path: path.clone(),
            source,
        })?;
        name.hash(hasher);
        text.hash(hasher);
        files.push((path, text));
    }
    Ok(files)
}

fn log_loaded(dir: &Path, generation: u64, snapshot: &Snapshot) {
    tracing::info!(
        dir = %dir.display(),
        cluster = %snapshot.cluster(),
        generation,
        services = snapshot.local().services.len(),
        service_mirrors = snapshot.local().service_mirrors.len(),
        linked_clusters = snapshot.links().len(),
        "discovery loaded"
    );
    for mirror in snapshot.service_mirrors() {
        let conditions = mirror.status.iter().flat_map(|s| &s.conditions);
        for c in conditions.filter(|c| c.type_ == READY_CONDITION) {
            if c.status != crate::model::ConditionStatus::True {
                tracing::warn!(
                    service_mirror = %format!("{}/{}", mirror.metadata.namespace(), mirror.metadata.name),
                    reason = %c.reason,
                    "{}", c.message
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
             spec:\n  clusterIP: {ip}\n  ports:\n  - port: 80\n"
        )
    }

    /// Writes generation `dir/..<generation>` holding `files`, and swaps `..data`
    /// to it as kubelet does (a temporary symlink renamed over it).
    fn publish(dir: &Path, generation: &str, files: &[(&str, String)]) {
        let target = dir.join(format!("..{generation}"));
        std::fs::create_dir_all(&target).unwrap();
        for (name, text) in files {
            std::fs::write(target.join(name), text).unwrap();
        }
        let tmp = dir.join("..data_tmp");
        symlink(format!("..{generation}"), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(DATA_LINK)).unwrap();
    }

    fn names(source: &DirSource) -> Vec<String> {
        let snapshot = source.load().unwrap();
        snapshot
            .local()
            .services
            .keys()
            .map(|k| k.name.clone())
            .collect()
    }

    #[test]
    fn a_configmap_volume_is_read_one_generation_at_a_time() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cluster-b");
        std::fs::create_dir_all(&dir).unwrap();
        publish(
            &dir,
            "2026_01_01_00_00_00.1",
            &[
                ("a.yaml", service("one", "10.0.0.1")),
                ("c.yaml", service("three", "10.0.0.3")),
            ],
        );
        for key in ["a.yaml", "c.yaml"] {
            symlink(format!("{DATA_LINK}/{key}"), dir.join(key)).unwrap();
        }
        let source = DirSource::new(&dir);
        assert_eq!(names(&source), ["one", "three"]);

        // Swapped, but the key symlinks not yet updated: `b.yaml` is new and has
        // no symlink yet, `c.yaml`'s symlink dangles. The new generation is read
        // whole all the same.
        publish(
            &dir,
            "2026_01_01_00_00_01.2",
            &[
                ("a.yaml", service("one", "10.0.0.1")),
                ("b.yaml", service("two", "10.0.0.2")),
            ],
        );
        assert_eq!(names(&source), ["one", "two"]);
    }
}
