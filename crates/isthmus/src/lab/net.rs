//! The lab's network namespaces, bridges and veth pairs, the processes in them,
//! and the clean-up that removes all of it.
//!
//! Every name of a run starts with its prefix, `isl<pid in hex>`: namespaces are
//! `<prefix>-<what>`, interfaces `<prefix><letter><n>` (at most 15 bytes, the
//! kernel's limit). A run records itself in `/run/isthmus-lab/<prefix>/` (its pid,
//! its namespaces, and its files: binaries, identities, manifests), so
//! `isthmus lab down` can remove what a killed run left. [`Net`] removes its run
//! when dropped: on a normal end, an error, Ctrl-C or a panic.
//!
//! Addresses are checked to come from 198.18.0.0/15; nothing here adds a default
//! route or NAT. What the topology is (which address where) is [`super::plan`]'s.

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where each run records itself.
pub const RUN_ROOT: &str = "/run/isthmus-lab";
/// Where `ip netns add` puts namespace handles.
const NETNS_DIR: &str = "/var/run/netns";
/// Where `ip netns exec` finds a namespace's own `/etc` files (hosts).
const ETC_NETNS: &str = "/etc/netns";
/// Every name of the lab starts with this.
const PREFIX: &str = "isl";
/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
/// How long processes get to exit on SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// The prefix of this process's run.
pub fn run_prefix() -> String {
    format!("{PREFIX}{:x}", std::process::id())
}

/// Whether `name` is a namespace of lab run `prefix`.
fn belongs(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('-'))
}

/// The pid encoded in a lab prefix `isl<hex>`.
fn prefix_pid(prefix: &str) -> Option<u32> {
    let hex = prefix.strip_prefix(PREFIX)?;
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// Runs `cmd`; an error naming the command line, exit status and stderr.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns exec <ns> <program>`, ready for arguments.
pub fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

fn allowed(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 198 && (o[1] == 18 || o[1] == 19)
}

/// One run's namespaces and files; removes them when dropped.
pub struct Net {
    prefix: String,
    run_dir: PathBuf,
    namespaces: Mutex<Vec<String>>,
    counter: AtomicU32,
    torn_down: std::sync::atomic::AtomicBool,
}

impl Net {
    /// Records a new run in `/run/isthmus-lab/<prefix>/` (mode 0755, so the proxy
    /// UID can read its files there).
    pub fn create() -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let prefix = run_prefix();
        let run_dir = Path::new(RUN_ROOT).join(&prefix);
        if run_dir.exists() {
            // Our own pid's leftovers: a previous run of a process with this pid.
            remove_run(&prefix, &run_dir);
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
        for dir in [Path::new(RUN_ROOT), run_dir.as_path()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} readable", dir.display()))?;
        }
        std::fs::write(run_dir.join("pid"), format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}/pid", run_dir.display()))?;
        Ok(Self {
            prefix,
            run_dir,
            namespaces: Mutex::new(Vec::new()),
            counter: AtomicU32::new(0),
            torn_down: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The run's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The run's directory (removed at the end).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// A fresh interface name, `<prefix><letter><n>`.
    pub fn ifname(&self, letter: char) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{letter}{n}", self.prefix);
        debug_assert!(
            name.len() <= MAX_IFNAME,
            "{name} is too long for an interface"
        );
        name
    }

    /// Creates namespace `<prefix>-<suffix>` with `lo` up, recorded for clean-up.
    pub fn namespace(&self, suffix: &str) -> Result<String> {
        let name = format!("{}-{suffix}", self.prefix);
        {
            let mut list = self.namespaces.lock().unwrap_or_else(|p| p.into_inner());
            list.push(name.clone());
            std::fs::write(self.run_dir.join("namespaces"), list.join("\n") + "\n")
                .with_context(|| format!("recording namespaces in {}", self.run_dir.display()))?;
        }
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        run_checked(in_ns(&name, "ip").args(["link", "set", "lo", "up"]))?;
        Ok(name)
    }

    /// A bridge in `ns`, up, with `addr` (`a.b.c.d/len`) if given.
    pub fn bridge(&self, ns: &str, addr: Option<(Ipv4Addr, u8)>) -> Result<String> {
        let name = self.ifname('b');
        run_checked(in_ns(ns, "ip").args(["link", "add", &name, "type", "bridge"]))?;
        if let Some((ip, len)) = addr {
            self.add_addr(ns, &name, ip, len)?;
        }
        run_checked(in_ns(ns, "ip").args(["link", "set", &name, "up"]))?;
        Ok(name)
    }

    /// Connects namespace `ns` to `bridge` (in `bridge_ns`) with a veth pair whose
    /// end in `ns` is named `ifname` and holds `ip/len`.
    pub fn attach(
        &self,
        bridge_ns: &str,
        bridge: &str,
        ns: &str,
        ifname: &str,
        ip: Ipv4Addr,
        len: u8,
    ) -> Result<()> {
        let (outer, inner) = (self.ifname('v'), self.ifname('p'));
        run_checked(Command::new("ip").args([
            "link", "add", &outer, "netns", bridge_ns, "type", "veth", "peer", "name", &inner,
            "netns", ns,
        ]))
        .with_context(|| format!("connecting namespace {ns} to bridge {bridge}"))?;
        run_checked(in_ns(bridge_ns, "ip").args(["link", "set", &outer, "master", bridge, "up"]))?;
        run_checked(in_ns(ns, "ip").args(["link", "set", &inner, "name", ifname]))?;
        self.add_addr(ns, ifname, ip, len)?;
        run_checked(in_ns(ns, "ip").args(["link", "set", ifname, "up"]))?;
        Ok(())
    }

    fn add_addr(&self, ns: &str, iface: &str, ip: Ipv4Addr, len: u8) -> Result<()> {
        if !allowed(ip) {
            bail!("{ip} is outside the lab's range 198.18.0.0/15");
        }
        run_checked(in_ns(ns, "ip").args(["addr", "add", &format!("{ip}/{len}"), "dev", iface]))
            .map(drop)
    }

    /// Routes `dst` (in 198.18.0.0/15) via `via` in `ns`; never a default route.
    pub fn route(&self, ns: &str, dst: &str, via: Ipv4Addr) -> Result<()> {
        let net: Ipv4Addr = dst
            .split('/')
            .next()
            .unwrap_or(dst)
            .parse()
            .with_context(|| format!("route destination {dst}"))?;
        if !allowed(net) || !allowed(via) {
            bail!("route {dst} via {via} leaves the lab's range 198.18.0.0/15");
        }
        run_checked(in_ns(ns, "ip").args(["route", "add", dst, "via", &via.to_string()])).map(drop)
    }

    /// Writes the hosts file `ip netns exec` mounts over `/etc/hosts` in `ns`, and a
    /// `resolv.conf` whose only nameserver is the namespace's own loopback: names
    /// outside the hosts file fail at once, and no lookup is ever addressed to the
    /// host's resolvers, whatever the routes.
    pub fn write_hosts(&self, ns: &str, text: &str) -> Result<()> {
        let dir = Path::new(ETC_NETNS).join(ns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("hosts"), text)
            .with_context(|| format!("writing {}/hosts", dir.display()))?;
        std::fs::write(
            dir.join("resolv.conf"),
            "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n",
        )
        .with_context(|| format!("writing {}/resolv.conf", dir.display()))
    }

    /// Starts `cmd` inside `ns` as `uid`/`gid` (supplementary groups dropped).
    ///
    /// `ip netns exec` cannot drop privileges, so a thread enters the namespace and
    /// forks there: the child starts in the thread's namespace.
    pub fn spawn_as(
        &self,
        ns: &str,
        mut cmd: tokio::process::Command,
        uid: u32,
        gid: u32,
    ) -> Result<tokio::process::Child> {
        cmd.uid(uid).gid(gid);
        let path = Path::new(NETNS_DIR).join(ns);
        let handle = tokio::runtime::Handle::current();
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<tokio::process::Child> {
                    let _runtime = handle.enter();
                    let file = File::open(&path)
                        .with_context(|| format!("opening namespace {}", path.display()))?;
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("entering namespace {}", path.display()))?;
                    cmd.spawn().with_context(|| format!("starting {cmd:?}"))
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Stops every process in the run's namespaces, deletes the namespaces (and
    /// with them every interface), their hosts files and the run directory.
    /// Idempotent.
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let namespaces = self
            .namespaces
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        remove_namespaces(&namespaces);
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The pids of processes in namespace `ns`.
fn ns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGTERM to every process of `namespaces`, SIGKILL to those left after a grace
/// period, then deletes the namespaces and their `/etc/netns` directories.
fn remove_namespaces(namespaces: &[String]) {
    let me = std::process::id() as i32;
    let signal_all = |signal: Signal| {
        let mut any = false;
        for ns in namespaces {
            for pid in ns_pids(ns) {
                if pid != me {
                    any = true;
                    let _ = kill(Pid::from_raw(pid), signal);
                }
            }
        }
        any
    };
    if signal_all(Signal::SIGTERM) {
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline && namespaces.iter().any(|ns| !ns_pids(ns).is_empty()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        signal_all(Signal::SIGKILL);
    }
    for ns in namespaces {
        if Path::new(NETNS_DIR).join(ns).exists()
            && let Err(e) = run_checked(Command::new("ip").args(["netns", "del", ns]))
        {
            eprintln!("isthmus lab: could not delete namespace {ns}: {e:#}");
        }
        let _ = std::fs::remove_dir_all(Path::new(ETC_NETNS).join(ns));
    }
}

fn remove_run(prefix: &str, run_dir: &Path) {
    let mut namespaces: Vec<String> = std::fs::read_to_string(run_dir.join("namespaces"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    // Namespaces created after the last record (or by a run that never wrote one).
    for ns in list_namespaces() {
        if belongs(&ns, prefix) && !namespaces.contains(&ns) {
            namespaces.push(ns);
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
    let _ = std::fs::remove_dir_all(run_dir);
}

fn list_namespaces() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What `isthmus lab down` did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Runs removed.
    pub removed: Vec<String>,
    /// Runs left alone because their process still runs (without `--all`).
    pub live: Vec<String>,
}

/// Removes runs whose process is gone (all runs with `all`): their processes,
/// namespaces, hosts files and directories, including namespaces of the lab's
/// naming that no run directory records.
pub fn sweep(all: bool) -> Result<Swept> {
    let mut swept = Swept::default();
    let mut prefixes: Vec<String> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(RUN_ROOT) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if prefix_pid(&name).is_some() {
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
        if let Some((p, _)) = ns.split_once('-')
            && prefix_pid(p).is_some()
            && !prefixes.iter().any(|q| q == p)
        {
            prefixes.push(p.to_owned());
        }
    }
    let me = std::process::id();
    for prefix in prefixes {
        let pid = prefix_pid(&prefix).unwrap_or_default();
        let alive = pid != me && Path::new(&format!("/proc/{pid}")).exists() && is_lab(pid);
        if alive && !all {
            swept.live.push(prefix);
            continue;
        }
        if alive {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        remove_run(&prefix, &Path::new(RUN_ROOT).join(&prefix));
        swept.removed.push(prefix);
    }
    Ok(swept)
}

/// Whether `pid` is an `isthmus` process (a pid reused by anything else is not a
/// live lab).
fn is_lab(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let first = c.split(|b| *b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(first).ends_with("isthmus")
        })
        .unwrap_or(false)
}

/// Writes `text` to the stdin of `cmd` and waits for success.
pub fn run_with_input(cmd: &mut Command, text: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("writing to {cmd:?}"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}\ninput was:\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interfaces_and_encode_the_pid() {
        let prefix = run_prefix();
        assert_eq!(prefix_pid(&prefix), Some(std::process::id()));
        // The longest: the prefix, a letter and a four-digit counter.
        assert!(format!("{prefix}v9999").len() <= MAX_IFNAME);
        assert!(belongs(&format!("{prefix}-lab"), &prefix));
        assert!(!belongs(&format!("{prefix}0-lab"), &prefix));
        assert_eq!(prefix_pid("islzz"), None);
        assert_eq!(prefix_pid("ist12"), None);
    }

    #[test]
    fn only_lab_ranges_are_allowed() {
        assert!(allowed(Ipv4Addr::new(198, 18, 1, 10)));
        assert!(allowed(Ipv4Addr::new(198, 19, 0, 1)));
        assert!(!allowed(Ipv4Addr::new(10, 0, 0, 1)));
    }
}
