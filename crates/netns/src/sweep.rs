//! Removing what runs left behind: a run killed before its clean-up leaves
//! namespaces, hosts files and perhaps a record directory, all named by its prefix.

use std::path::Path;
use std::process::{Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::Namespace;
use crate::name::{belongs, namespace_prefix, prefix_pid};
use crate::namespace::ETC_NETNS;
use crate::net::remove_namespaces;

/// What [`sweep`] did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Runs removed.
    pub removed: Vec<String>,
    /// Runs left alone because their process still runs (without `all`).
    pub live: Vec<String>,
}

/// Removes the runs under `tag` whose process is gone (every run with `all`,
/// after a SIGTERM to its process): their processes,
/// namespaces, hosts files and record directories under `record_root`. A pid is
/// taken as the run's process only while `is_owner(pid)` holds: a pid reused by
/// another program is not a live run. This process's own runs are left to their
/// [`crate::Net`]s.
pub fn sweep(
    tag: &str,
    record_root: Option<&Path>,
    all: bool,
    is_owner: impl Fn(u32) -> bool,
) -> Swept {
    let mut swept = Swept::default();
    let mut prefixes: Vec<String> = Vec::new();
    if let Some(root) = record_root
        && let Ok(entries) = std::fs::read_dir(root)
    {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if prefix_pid(tag, &name).is_some() {
                prefixes.push(name);
            }
        }
    }
    let etc: Vec<String> = std::fs::read_dir(ETC_NETNS)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for ns in list_namespaces().into_iter().chain(etc) {
        if let Some(p) = namespace_prefix(tag, &ns)
            && !prefixes.iter().any(|q| q == p)
        {
            prefixes.push(p.to_owned());
        }
    }
    let me = std::process::id();
    for prefix in prefixes {
        let pid = prefix_pid(tag, &prefix).unwrap_or_default();
        if pid == me {
            continue;
        }
        let alive = Path::new(&format!("/proc/{pid}")).exists() && is_owner(pid);
        if alive && !all {
            swept.live.push(prefix);
            continue;
        }
        if alive {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let dir = record_root.map(|root| root.join(&prefix));
        remove_run(&prefix, dir.as_deref().unwrap_or(Path::new("")));
        swept.removed.push(prefix);
    }
    swept
}

/// Removes run `prefix`: the namespaces its record lists and any other of its
/// naming, their processes and hosts files, and the record directory `run_dir`
/// (empty: none).
pub(crate) fn remove_run(prefix: &str, run_dir: &Path) {
    let mut namespaces: Vec<Namespace> = if run_dir.as_os_str().is_empty() {
        Vec::new()
    } else {
        std::fs::read_to_string(run_dir.join("namespaces"))
            .unwrap_or_default()
            .lines()
            .map(Namespace::named)
            .collect()
    };
    // Namespaces created after the last record (or by a run that never wrote one).
    for ns in list_namespaces() {
        if belongs(&ns, prefix) && !namespaces.iter().any(|n| n.name() == ns) {
            namespaces.push(Namespace::named(ns));
        }
    }
    remove_namespaces(&namespaces);
    // Hosts files of namespaces that were never created or recorded.
    if let Ok(entries) = std::fs::read_dir(ETC_NETNS) {
        for e in entries.flatten() {
            if belongs(&e.file_name().to_string_lossy(), prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if !run_dir.as_os_str().is_empty() {
        let _ = std::fs::remove_dir_all(run_dir);
    }
}

fn list_namespaces() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
