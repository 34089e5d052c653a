//! What the user asked for: the clusters of a lab directory, read and checked.
//!
//! A lab directory holds one folder per cluster, named as the cluster. Every
//! `*.yaml`/`*.yml` file of a folder is a Kubernetes manifest (multi-document),
//! parsed by `proxy_discovery`'s parser so errors name file, document, object and
//! field; `isthmus.yaml` is instead the cluster's mesh install ([`MeshInstall`]).
//! The seed's two clusters are embedded for `isthmus lab up` without a directory.
//!
//! This module only reads and validates; addresses, pods and generated manifests
//! are [`super::plan`]'s business.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use isthmus_vocab::ClusterName;
use proxy_discovery::ServiceRef;
use proxy_discovery::model::{ClusterView, Object, Parsed, parse_manifests};
use serde::Deserialize;

/// The name of a cluster folder's settings file.
pub const SETTINGS_FILE: &str = "isthmus.yaml";

/// The seed, embedded: `(cluster, file, contents)`.
const SEED: [(&str, &str, &str); 5] = [
    (
        "cluster-a",
        "cluster-a.yaml",
        include_str!("../../../../examples/seed/cluster-a/cluster-a.yaml"),
    ),
    (
        "cluster-a",
        SETTINGS_FILE,
        include_str!("../../../../examples/seed/cluster-a/isthmus.yaml"),
    ),
    (
        "cluster-b",
        "cluster-b.yaml",
        include_str!("../../../../examples/seed/cluster-b/cluster-b.yaml"),
    ),
    (
        "cluster-b",
        "cluster-b-servicemirror.yaml",
        include_str!("../../../../examples/seed/cluster-b/cluster-b-servicemirror.yaml"),
    ),
    (
        "cluster-b",
        SETTINGS_FILE,
        include_str!("../../../../examples/seed/cluster-b/isthmus.yaml"),
    ),
];

/// A lab input that cannot be used, naming the file or folder and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A file or folder could not be read.
    #[error("reading {path}")]
    Read {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A manifest does not parse.
    #[error("manifest of cluster {cluster}")]
    Manifest {
        /// The cluster folder.
        cluster: String,
        /// The parser's error (file, document, object, field).
        #[source]
        source: proxy_discovery::model::ManifestError,
    },
    /// The objects of a cluster do not fit together (duplicates, self links).
    #[error("objects of cluster {cluster}")]
    View {
        /// The cluster folder.
        cluster: String,
        /// What clashes (boxed: it carries two origins).
        #[source]
        source: Box<proxy_discovery::model::ViewError>,
    },
    /// The settings file is not valid.
    #[error("{path}: {message}")]
    Settings {
        /// The settings file.
        path: PathBuf,
        /// What is wrong, with the field.
        message: String,
    },
    /// Anything else about the lab's shape.
    #[error("{0}")]
    Invalid(String),
}

/// `DIR/<cluster>/isthmus.yaml`: the cluster's mesh install. Every field is
/// optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshInstall {
    /// SPIFFE trust domain of the cluster's workloads and gateway
    /// (default `cluster.local`). Linked clusters must share it: a gateway accepts
    /// only peers of its own trust domain.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// DNS suffix of Services (default `cluster.local`).
    #[serde(default)]
    pub cluster_domain: Option<String>,
    /// Namespaces whose every Service linked clusters may reach.
    #[serde(default)]
    pub exported_namespaces: Vec<String>,
    /// Single Services linked clusters may reach, as `namespace/name`.
    #[serde(default)]
    pub exports: Vec<String>,
    /// Clusters this one's gateway links to; absent means every other cluster.
    #[serde(default)]
    pub links: Option<Vec<String>>,
}

/// One cluster of the lab, as read.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The cluster's name (its folder's name).
    pub name: ClusterName,
    /// Its manifests' objects, grouped.
    pub view: ClusterView,
    /// Its mesh install.
    pub install: MeshInstall,
    /// Services named in `exports`.
    pub exports: BTreeSet<ServiceRef>,
    /// Resolved links (every other cluster unless the settings say otherwise).
    pub links: Vec<ClusterName>,
    /// The manifest files as written, `(file, contents)`: what the lab applies
    /// to the cluster's API server.
    pub files: Vec<(String, String)>,
}

impl ClusterSpec {
    /// The trust domain (default `cluster.local`).
    pub fn trust_domain(&self) -> &str {
        self.install
            .trust_domain
            .as_deref()
            .unwrap_or(proxy_discovery::model::DEFAULT_DOMAIN)
    }

    /// The DNS domain of Services (default `cluster.local`).
    pub fn cluster_domain(&self) -> &str {
        self.install
            .cluster_domain
            .as_deref()
            .unwrap_or(proxy_discovery::model::DEFAULT_DOMAIN)
    }
}

/// The clusters of a lab, in name order.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Where it was read from (`embedded seed` for the default).
    pub source: String,
    /// The clusters, by name.
    pub clusters: Vec<ClusterSpec>,
}

/// The files of one cluster folder: `(file label, contents)`.
type Files = Vec<(String, String)>;

impl LabSpec {
    /// The seed's two clusters, embedded in the binary.
    pub fn seed() -> Result<Self, SpecError> {
        let mut folders: BTreeMap<String, Files> = BTreeMap::new();
        for (cluster, file, text) in SEED {
            folders
                .entry(cluster.to_owned())
                .or_default()
                .push((format!("<embedded seed>/{cluster}/{file}"), text.to_owned()));
        }
        Self::from_folders("embedded seed".to_owned(), folders)
    }

    /// Reads `dir`: one folder per cluster (entries starting with `.` and plain
    /// files beside the folders are ignored).
    pub fn read(dir: &Path) -> Result<Self, SpecError> {
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| SpecError::Read { path, source }
        };
        let mut folders: BTreeMap<String, Files> = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(read_err(dir))? {
            let entry = entry.map_err(read_err(dir))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !path.is_dir() {
                continue;
            }
            let mut files = Vec::new();
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(read_err(&path))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect();
            entries.sort();
            for file in entries {
                let fname = file
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if fname.starts_with('.')
                    || !file.is_file()
                    || !(fname.ends_with(".yaml") || fname.ends_with(".yml"))
                {
                    continue;
                }
                let text = std::fs::read_to_string(&file).map_err(read_err(&file))?;
                files.push((file.display().to_string(), text));
            }
            folders.insert(name, files);
        }
        if folders.is_empty() {
            return Err(SpecError::Invalid(format!(
                "{} holds no cluster folder: make one folder per cluster, named as the cluster, with its manifests",
                dir.display()
            )));
        }
        Self::from_folders(dir.display().to_string(), folders)
    }

    fn from_folders(source: String, folders: BTreeMap<String, Files>) -> Result<Self, SpecError> {
        let names: BTreeSet<String> = folders.keys().cloned().collect();
        let mut clusters = Vec::new();
        for (folder, files) in folders {
            let name = ClusterName::parse(&folder).map_err(|e| {
                SpecError::Invalid(format!(
                    "cluster folder {folder:?} of {source}: the folder names the cluster: {e}"
                ))
            })?;
            clusters.push(read_cluster(name, files, &names)?);
        }
        check_links(&clusters)?;
        Ok(Self { source, clusters })
    }

    /// The cluster named `name`.
    #[cfg(test)]
    pub fn cluster(&self, name: &str) -> Option<&ClusterSpec> {
        self.clusters.iter().find(|c| c.name.as_str() == name)
    }
}

fn read_cluster(
    name: ClusterName,
    files: Files,
    all: &BTreeSet<String>,
) -> Result<ClusterSpec, SpecError> {
    let mut objects: Vec<Parsed> = Vec::new();
    let mut install = MeshInstall::default();
    let mut settings_path = None;
    let mut manifests = Vec::new();
    for (file, text) in files {
        if file.ends_with(&format!("/{SETTINGS_FILE}")) {
            let path = PathBuf::from(&file);
            install = if text.trim().is_empty() {
                MeshInstall::default()
            } else {
                serde_yaml_ng::from_str::<Option<MeshInstall>>(&text)
                    .map_err(|e| SpecError::Settings {
                        path: path.clone(),
                        message: e.to_string(),
                    })?
                    .unwrap_or_default()
            };
            settings_path = Some(path);
            continue;
        }
        let parsed = parse_manifests(&file, &text).map_err(|source| SpecError::Manifest {
            cluster: name.to_string(),
            source,
        })?;
        for p in &parsed {
            // The lab writes these from the settings file; two sources of truth
            // would disagree.
            if let Object::ClusterSettings(_) | Object::Link(_) = p.object {
                return Err(SpecError::Invalid(format!(
                    "{}: {} is the lab's to write: put trust domain, exports and links in {}/{SETTINGS_FILE} instead",
                    p.origin,
                    p.object.kind(),
                    name
                )));
            }
        }
        objects.extend(parsed);
        manifests.push((file, text));
    }
    let view = ClusterView::build(name.clone(), objects).map_err(|source| SpecError::View {
        cluster: name.to_string(),
        source: Box::new(source),
    })?;
    let settings_path =
        settings_path.unwrap_or_else(|| PathBuf::from(format!("{name}/{SETTINGS_FILE}")));
    let bad = |field: String, message: String| SpecError::Settings {
        path: settings_path.clone(),
        message: format!("{field}: {message}"),
    };
    for (i, ns) in install.exported_namespaces.iter().enumerate() {
        proxy_discovery::model::check_dns_label("namespace", ns)
            .map_err(|e| bad(format!("exportedNamespaces[{i}]"), e.to_string()))?;
    }
    for (field, value) in [
        ("trustDomain", &install.trust_domain),
        ("clusterDomain", &install.cluster_domain),
    ] {
        if let Some(v) = value {
            proxy_discovery::model::check_dns_subdomain("domain", v)
                .map_err(|e| bad(field.to_owned(), e.to_string()))?;
        }
    }
    let mut exports = BTreeSet::new();
    for (i, e) in install.exports.iter().enumerate() {
        let Some((ns, svc)) = e.split_once('/') else {
            return Err(bad(
                format!("exports[{i}]"),
                format!("{e:?} is not namespace/name"),
            ));
        };
        let key = ServiceRef::new(ns, svc);
        if !view.services.contains_key(&key) {
            return Err(bad(
                format!("exports[{i}]"),
                format!("cluster {name} has no Service {key}"),
            ));
        }
        exports.insert(key);
    }
    let links = match &install.links {
        None => all
            .iter()
            .filter(|c| c.as_str() != name.as_str())
            .filter_map(|c| ClusterName::parse(c).ok())
            .collect(),
        Some(list) => {
            let mut links = Vec::new();
            for (i, l) in list.iter().enumerate() {
                if l == name.as_str() {
                    return Err(bad(
                        format!("links[{i}]"),
                        "a cluster cannot link to itself".into(),
                    ));
                }
                if !all.contains(l) {
                    return Err(bad(
                        format!("links[{i}]"),
                        format!(
                            "no cluster {l:?} in this lab (clusters: {})",
                            all.iter().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                links.push(
                    ClusterName::parse(l).map_err(|e| bad(format!("links[{i}]"), e.to_string()))?,
                );
            }
            links
        }
    };
    Ok(ClusterSpec {
        name,
        view,
        install,
        exports,
        links,
        files: manifests,
    })
}

/// Linked clusters must share a trust domain, and every ServiceMirror must name a
/// cluster its own cluster links to (else it could never be reconciled).
fn check_links(clusters: &[ClusterSpec]) -> Result<(), SpecError> {
    for c in clusters {
        for l in &c.links {
            let Some(peer) = clusters.iter().find(|p| &p.name == l) else {
                continue;
            };
            if peer.trust_domain() != c.trust_domain() {
                return Err(SpecError::Invalid(format!(
                    "cluster {} (trust domain {}) links to cluster {} (trust domain {}): gateways accept only peers of their own trust domain, so linked clusters must share one",
                    c.name,
                    c.trust_domain(),
                    peer.name,
                    peer.trust_domain()
                )));
            }
        }
        for m in c.view.service_mirrors.values() {
            if !c.links.contains(&m.spec.cluster) {
                return Err(SpecError::Invalid(format!(
                    "ServiceMirror {}/{} of cluster {} mirrors from cluster {}, which cluster {} does not link to (links: {})",
                    m.metadata.namespace(),
                    m.metadata.name,
                    c.name,
                    m.spec.cluster,
                    c.name,
                    c.links
                        .iter()
                        .map(|l| l.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_seed_has_two_linked_clusters() {
        let spec = LabSpec::seed().expect("the seed is valid");
        let names: Vec<&str> = spec.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["cluster-a", "cluster-b"]);
        let a = spec.cluster("cluster-a").expect("cluster-a");
        assert_eq!(a.install.exported_namespaces, ["default"]);
        assert_eq!(a.links.len(), 1);
        let b = spec.cluster("cluster-b").expect("cluster-b");
        assert_eq!(b.view.service_mirrors.len(), 1);
        assert_eq!(b.view.deployments.len(), 1);
    }

    #[test]
    fn a_mirror_of_an_unlinked_cluster_is_refused() {
        let mut folders: BTreeMap<String, Files> = BTreeMap::new();
        for (cluster, file, text) in SEED {
            let text = if cluster == "cluster-b" && file == SETTINGS_FILE {
                "links: []\n"
            } else {
                text
            };
            folders
                .entry(cluster.to_owned())
                .or_default()
                .push((format!("x/{cluster}/{file}"), text.to_owned()));
        }
        let err = LabSpec::from_folders("x".into(), folders).expect_err("must fail");
        let text = err.to_string();
        assert!(
            text.contains("hello-mirror") && text.contains("does not link"),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_settings_field_names_file_and_field() {
        let folders = BTreeMap::from([(
            "c1".to_owned(),
            vec![(
                "lab/c1/isthmus.yaml".to_owned(),
                "exportedNamespace: [a]\n".to_owned(),
            )],
        )]);
        let err = LabSpec::from_folders("lab".into(), folders).expect_err("must fail");
        let text = err.to_string();
        assert!(
            text.contains("lab/c1/isthmus.yaml") && text.contains("exportedNamespace"),
            "{text}"
        );
    }
}
