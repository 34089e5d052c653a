//! The lab's run on [`isthmus_netns`]: where it records itself, how it starts
//! processes as the proxy UID (seeing their namespace's hosts file), and how
//! `isthmus lab down` finds what a killed run left.
//!
//! Every name of a run starts with its prefix, `isl<pid in hex>`: namespaces are
//! `<prefix>-<what>`, interfaces `<prefix><letter><n>`. A run records itself in
//! `/run/isthmus-lab/<prefix>/` (its pid, its namespaces, and its files: binaries,
//! identities, manifests), so `isthmus lab down` can remove what a killed run left.
//! [`Net`] removes its run when dropped: on a normal end, an error, Ctrl-C or a
//! panic.
//!
//! Addresses are checked to come from 198.18.0.0/15; nothing here adds a default
//! route or NAT. What the topology is (which address where) is [`super::plan`]'s.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use isthmus_netns::{Namespace, Options, Swept};

/// Where each run records itself.
pub const RUN_ROOT: &str = "/run/isthmus-lab";
/// Every name of the lab starts with this.
const TAG: &str = "isl";

/// One run's namespaces and files; removes them when dropped.
pub struct Net {
    inner: isthmus_netns::Net,
    run_dir: PathBuf,
    tools: Tools,
}

impl std::ops::Deref for Net {
    type Target = isthmus_netns::Net;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl Net {
    /// Records a new run in `/run/isthmus-lab/<prefix>/` (mode 0755, so the proxy
    /// UID can read its files there).
    pub fn create() -> Result<Self> {
        let tools = Tools::locate()?;
        let inner = isthmus_netns::Net::create(Options {
            record_root: Some(RUN_ROOT.into()),
            ..Options::new(TAG)
        })
        .context("recording the lab's run")?;
        let run_dir = inner
            .run_dir()
            .context("a run with a record root has a run directory")?
            .to_owned();
        Ok(Self {
            inner,
            run_dir,
            tools,
        })
    }

    /// The run's directory (removed at the end).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// A bridge in `ns`, up, with `addr` (`a.b.c.d/len`) if given.
    pub fn bridge_at(&self, ns: &Namespace, addr: Option<(Ipv4Addr, u8)>) -> Result<String> {
        let bridge = self.inner.bridge(ns)?;
        // A bridge whose address was never set takes the lowest of its ports'
        // and changes it as ports join; a namespace attached while others talk
        // would then strand their cached neighbour entry (the lab attaches
        // controller namespaces after pods). Setting it pins it.
        let link = ns.exec("ip", &["-o", "link", "show", "dev", &bridge])?;
        let mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .with_context(|| format!("no address in `ip link show {bridge}`: {link}"))?
            .to_owned();
        ns.exec("ip", &["link", "set", "dev", &bridge, "address", &mac])?;
        if let Some((ip, len)) = addr {
            ns.add_addr(&bridge, &format!("{ip}/{len}"))?;
        }
        Ok(bridge)
    }

    /// Connects `ns` to `bridge` (in `bridge_ns`) with a veth pair whose end in
    /// `ns` is named `ifname` and holds `ip/len`.
    pub fn attach_at(
        &self,
        bridge_ns: &Namespace,
        bridge: &str,
        ns: &Namespace,
        ifname: &str,
        (ip, len): (Ipv4Addr, u8),
    ) -> Result<()> {
        self.inner
            .attach(bridge_ns, bridge, ns, Some(ifname))
            .with_context(|| format!("connecting namespace {ns} to bridge {bridge}"))?;
        ns.add_addr(ifname, &format!("{ip}/{len}"))?;
        Ok(())
    }

    /// `program` to be run inside `ns` as `uid`/`gid` (supplementary groups
    /// dropped), with an empty environment, ready for arguments.
    ///
    /// It starts as a pod's process does: `ip netns exec` gives it the
    /// namespace's own `/etc/hosts` and `resolv.conf` (bind-mounted from
    /// `/etc/netns/<ns>/` in a mount namespace of its own, as kubelet mounts a
    /// pod's), then `setpriv` drops to the UID. Both exec, so the process
    /// started is the program itself (its pid, its command line).
    pub fn command_as(
        &self,
        ns: &Namespace,
        program: impl AsRef<std::ffi::OsStr>,
        uid: u32,
        gid: u32,
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.tools.ip);
        cmd.env_clear()
            .args(["netns", "exec", ns.name()])
            .arg(&self.tools.setpriv)
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .args(["--clear-groups", "--"])
            .arg(program);
        cmd
    }
}

/// The host's programs [`Net::command_as`] goes through, found once.
struct Tools {
    ip: PathBuf,
    setpriv: PathBuf,
}

impl Tools {
    fn locate() -> Result<Self> {
        let find = |name: &str, package: &str| -> Result<PathBuf> {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
                .with_context(|| format!("{name} not found on PATH: install {package}"))
        };
        Ok(Self {
            ip: find("ip", "iproute2")?,
            setpriv: find("setpriv", "util-linux")?,
        })
    }
}

/// Removes runs whose process is gone (all runs with `all`): their processes,
/// namespaces, hosts files and directories, including namespaces of the lab's
/// naming that no run directory records.
pub fn sweep(all: bool) -> Swept {
    let swept = isthmus_netns::sweep(TAG, Some(Path::new(RUN_ROOT)), all, is_lab);
    for prefix in &swept.removed {
        kill_host_processes(prefix);
    }
    swept
}

/// Kills what a run started outside its namespaces (its API servers, on this
/// machine's loopback): every process whose command line names the run's
/// directory.
fn kill_host_processes(prefix: &str) {
    let needle = format!("{RUN_ROOT}/{prefix}/");
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let named = std::fs::read(entry.path().join("cmdline")).is_ok_and(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(&needle)
        });
        if named {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether `pid` is an `isthmus` process (a pid reused by anything else is not a
/// live lab).
pub fn is_lab(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let first = c.split(|b| *b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(first).ends_with("isthmus")
        })
        .unwrap_or(false)
}
