//! A flat network of namespaces on one bridge, where the gateways, pods and
//! clients of several clusters meet, and the command line of a proxy started in
//! one of them with its files in one folder.

use std::path::Path;
use std::process::Command;

use crate::binary::binary;
use crate::netns::{Lab, Namespace};

/// Namespaces joined by one bridge, each at its own address of a /24.
pub struct Wan<'a> {
    lab: &'a Lab,
    hub: Namespace,
    bridge: String,
}

impl<'a> Wan<'a> {
    /// A bridge in a namespace of its own.
    ///
    /// # Panics
    ///
    /// If the bridge cannot be made.
    pub fn new(lab: &'a Lab) -> Self {
        let hub = lab.namespace();
        let bridge = lab
            .bridge(&hub)
            .unwrap_or_else(|e| panic!("making the bridge: {e}"));
        Wan { lab, hub, bridge }
    }

    /// A new namespace on the bridge at `ip` (of 198.18.0.0/15), prefix /24.
    ///
    /// # Panics
    ///
    /// If the namespace cannot be attached or given the address.
    pub fn place(&self, ip: &str) -> Namespace {
        let ns = self.lab.namespace();
        let iface = self
            .lab
            .attach(&self.hub, &self.bridge, &ns)
            .unwrap_or_else(|e| panic!("attaching {ip}: {e}"));
        ns.add_addr(&iface, &format!("{ip}/24"))
            .unwrap_or_else(|e| panic!("adding {ip}: {e}"));
        ns
    }
}

/// Writes each `(path, text)` of `files` below `dir`, making the folders.
///
/// # Panics
///
/// If a file cannot be written.
pub fn write_files(dir: &Path, files: &[(&str, String)]) {
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
        }
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

/// `isthmus-proxy ROLE --cluster CLUSTER` in `ns`, its identity in
/// `root/identity-NAME` and its manifests in `root/manifests-NAME`, its admin
/// server at `admin`, one worker and a 2 s connect timeout; callers add the rest.
pub fn proxy_command(
    ns: &Namespace,
    role: &str,
    cluster: &str,
    root: &Path,
    name: &str,
    admin: &str,
) -> Command {
    let mut cmd = ns.command(binary("isthmus-proxy"));
    cmd.args([role, "--cluster", cluster, "--identity-dir"])
        .arg(root.join(format!("identity-{name}")))
        .arg("--manifests")
        .arg(root.join(format!("manifests-{name}")))
        .args([
            "--admin-addr",
            admin,
            "--connect-timeout",
            "2s",
            "--workers",
            "1",
        ]);
    cmd
}
