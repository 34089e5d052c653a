//! A pod's volume as kubelet projects a ConfigMap (its `AtomicWriter`): each
//! generation of the payload is written whole into a new timestamped directory
//! `..<time>`, published by renaming a temporary symlink over `..data`, and
//! only then are the user-visible entries (`key -> ..data/key`) added or
//! removed and the previous generation deleted. A reader therefore sees one
//! generation or the next, never a half-written file or a mix of two.
//!
//! Also the pod's layout: where in a pod's directory a volume is mounted
//! ([`mount_dir`]), the paths a cluster's pods see (`/var/run/isthmus/...`).
//!
//! Not here: what the payload holds (the lab's run decides), or reading it
//! (`proxy_discovery`'s directory source).

use std::collections::BTreeSet;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// The symlink naming the current generation.
pub const DATA_LINK: &str = proxy_discovery::source::dir::DATA_LINK;
/// The symlink renamed over [`DATA_LINK`].
const DATA_TMP: &str = "..data_tmp";

/// Makes generation names unique within a run even when two land in one nanosecond.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The directory of `pod_root` at which a volume mounted at `mount_path` is
/// found: `/var/run/isthmus/identity` in the pod is
/// `<pod_root>/var/run/isthmus/identity` here.
pub fn mount_dir(pod_root: &Path, mount_path: &str) -> PathBuf {
    pod_root.join(mount_path.trim_start_matches('/'))
}

/// Publishes `files` (`(relative path, contents)`, paths below a top-level entry
/// allowed, as a ConfigMap's `items[].path`) as the new generation of `dir`;
/// returns false, writing nothing, when the current generation already holds
/// exactly these files.
pub fn project(dir: &Path, files: &[(String, String)]) -> Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    set_mode(dir, 0o755)?;
    let current = std::fs::read_link(dir.join(DATA_LINK)).ok();
    if let Some(current) = &current
        && holds_exactly(&dir.join(current), files)
    {
        return Ok(false);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let name = format!(
        "..{}.{:09}.{}",
        now.as_secs(),
        now.subsec_nanos(),
        GENERATION.fetch_add(1, Ordering::Relaxed)
    );
    let generation = dir.join(&name);
    for (rel, text) in files {
        let path = generation.join(rel);
        let parent = path
            .parent()
            .context("a projected file without a directory")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        set_mode(&path, 0o644)?;
    }
    for sub in walk(&generation) {
        set_mode(&sub, 0o755)?;
    }
    let tmp = dir.join(DATA_TMP);
    let _ = std::fs::remove_file(&tmp);
    symlink(&name, &tmp).with_context(|| format!("creating {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(DATA_LINK))
        .with_context(|| format!("swapping {}/{DATA_LINK}", dir.display()))?;

    let wanted: BTreeSet<String> = files
        .iter()
        .filter_map(|(rel, _)| rel.split('/').next().map(str::to_owned))
        .collect();
    for top in &wanted {
        let entry = dir.join(top);
        if std::fs::symlink_metadata(&entry).is_err() {
            symlink(format!("{DATA_LINK}/{top}"), &entry)
                .with_context(|| format!("creating {}", entry.display()))?;
        }
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let stale_key = !file.starts_with('.') && !wanted.contains(&file);
        let stale_generation = file.starts_with("..")
            && file != name
            && file != DATA_LINK
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if stale_key {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        } else if stale_generation {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(true)
}

/// Whether `generation` holds these files and no others.
fn holds_exactly(generation: &Path, files: &[(String, String)]) -> bool {
    let on_disk = walk(generation)
        .into_iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .count();
    on_disk == files.len()
        && files.iter().all(|(rel, text)| {
            std::fs::read_to_string(generation.join(rel)).is_ok_and(|t| t == *text)
        })
}

/// `root` and every directory below it.
fn walk(root: &Path) -> Vec<PathBuf> {
    super::process::walk_dirs(root)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files a reader sees through the visible entries, sorted.
    fn seen(dir: &Path) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .map(|n| (n.clone(), std::fs::read_to_string(dir.join(&n)).unwrap()))
            .collect();
        out.sort();
        out
    }

    fn payload(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn each_generation_is_swapped_in_whole_and_the_old_one_goes() {
        let root = tempfile::tempdir().unwrap();
        let dir = mount_dir(root.path(), "/var/run/isthmus/discovery");
        let first = payload(&[("a.yaml", "one"), ("c.yaml", "three")]);
        assert!(project(&dir, &first).unwrap());
        assert_eq!(seen(&dir), first);
        assert_eq!(
            std::fs::read_link(dir.join("a.yaml")).unwrap(),
            Path::new("..data/a.yaml")
        );
        let gen1 = std::fs::read_link(dir.join(DATA_LINK)).unwrap();
        // The same payload again: nothing is rewritten.
        assert!(!project(&dir, &first).unwrap());
        assert_eq!(std::fs::read_link(dir.join(DATA_LINK)).unwrap(), gen1);

        let second = payload(&[("a.yaml", "one, again"), ("b.yaml", "two")]);
        assert!(project(&dir, &second).unwrap());
        assert_eq!(seen(&dir), second);
        let gen2 = std::fs::read_link(dir.join(DATA_LINK)).unwrap();
        assert_ne!(gen1, gen2);
        // The previous generation and the key it no longer holds are gone.
        let mut entries: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(
            entries,
            [
                gen2.to_string_lossy().as_ref(),
                DATA_LINK,
                "a.yaml",
                "b.yaml"
            ]
        );
    }
}
