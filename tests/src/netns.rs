//! Network namespaces for tests, after istio/ztunnel's harness.
//!
//! A [`Lab`] owns everything a test creates: namespaces, the veth pairs and bridges
//! inside them, and child processes. Names share a per-process prefix,
//! `ist<pid in hex>x<counter in hex>`, short enough for interface names (15 bytes at
//! most) and unique per run. Dropping the lab kills its children (by pid) and deletes
//! its namespaces, which takes every link inside them along; when the drop happens
//! during a panic it first prints `iptables-save` (nft and legacy, IPv4 and IPv6) and
//! `ip addr` of each namespace. The first lab of a process also sweeps namespaces left
//! by dead runs: names of this pattern whose pid no longer exists.
//!
//! Code of the test process runs in a namespace on a thread of its own
//! ([`Namespace::run`]): a network namespace belongs to a thread, and sockets keep the
//! namespace they were created in, so a listener or stream made there can be used from
//! any thread afterwards. A process forked from such a thread starts in the namespace
//! too, which is how [`Namespace::spawn_as`] starts a process under another UID (an
//! owner match in iptables sees processes, and glibc keeps every thread of one process
//! at the same UID, so a thread of the test cannot be "the proxy").
//!
//! Addresses are checked to come from 198.18.0.0/15 or 2001:2::/48, and nothing here
//! adds a default route or NAT.

use std::ffi::OsStr;
use std::fs::File;
use std::net::IpAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` puts the handle of a namespace.
const NETNS_DIR: &str = "/var/run/netns";
/// Every name this harness creates starts with this.
const PREFIX: &str = "ist";
/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

const HOW_TO_RUN: &str = "the end-to-end tests create network namespaces and program iptables, \
     so they must run as root: `sudo -E cargo test --workspace` (or as root: `cargo test --workspace`)";

fn unique_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{PREFIX}{:x}x{n:x}", std::process::id());
    assert!(
        name.len() <= MAX_IFNAME,
        "name {name} too long for an interface"
    );
    name
}

/// The pid encoded in a name of this harness, if `name` is one.
fn creator_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, counter) = rest.split_once('x')?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(pid) || !hex(counter) {
        return None;
    }
    u32::from_str_radix(pid, 16).ok()
}

/// Deletes namespaces of dead runs (their creator pid no longer exists).
fn sweep_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if let Some(pid) = creator_pid(name)
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            eprintln!("netns: removing {name}, left by dead run {pid}");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Runs `cmd`, failing with its command line, status and stderr unless it succeeds.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// Waits for `child` to exit for at most `timeout`, killing it after that.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> anyhow::Result<Output> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "process did not exit within {timeout:?} and was killed; stderr: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Spawns `cmd`, retrying for a while on `ETXTBSY`. A program the test has just
/// copied (see [`crate::binary::WorldExecutable`]) can be briefly "busy": a fork on
/// another test thread between the copy's open and close keeps a writable
/// descriptor of it until that child execs.
fn spawn_when_not_busy(cmd: &mut Command) -> std::io::Result<Child> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match cmd.spawn() {
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn allowed(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 198 && (o[1] == 18 || o[1] == 19)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0x2001 && s[1] == 0x2 && s[2] == 0
        }
    }
}

/// A handle to one namespace of a [`Lab`]; the lab deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <ns> <program>`, ready for arguments.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args...` in the namespace; its stdout, or an error naming the
    /// command, status and stderr.
    pub fn exec<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> anyhow::Result<String> {
        let out = run_checked(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a new thread inside the namespace and returns its result; a panic
    /// in `f` is passed on.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("{NETNS_DIR}/{}", self.name);
        std::thread::scope(|scope| {
            let handle = scope.spawn(|| {
                let file = File::open(&path)
                    .unwrap_or_else(|e| panic!("opening namespace handle {path}: {e}"));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("entering namespace {path}: {e}"));
                f()
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts `cmd` inside the namespace as `uid`/`gid` (supplementary groups
    /// dropped). The program must be executable by that UID (see
    /// [`crate::binary::WorldExecutable`]). Register the child with
    /// [`Lab::adopt`] if it may outlive the test's own wait.
    pub fn spawn_as(&self, mut cmd: Command, uid: u32, gid: u32) -> std::io::Result<Child> {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.run(move || spawn_when_not_busy(&mut cmd))
    }

    /// Like [`Namespace::spawn_as`], but stdout and stderr go to `log` (created or
    /// truncated by the test process): a long-running server that logs into a pipe
    /// nobody drains would block once the pipe is full.
    pub fn spawn_logged_as(
        &self,
        mut cmd: Command,
        uid: u32,
        gid: u32,
        log: &std::path::Path,
    ) -> std::io::Result<Child> {
        use std::os::unix::process::CommandExt;
        let file = File::create(log)?;
        cmd.uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        self.run(move || spawn_when_not_busy(&mut cmd))
    }

    /// Adds `addr` (`198.18.0.1/24`, `2001:2::1/64`) to `iface`; IPv6 addresses skip
    /// duplicate address detection so they are usable at once.
    ///
    /// # Panics
    ///
    /// If the address is outside 198.18.0.0/15 and 2001:2::/48.
    pub fn add_addr(&self, iface: &str, addr: &str) -> anyhow::Result<()> {
        let ip: IpAddr = addr
            .split('/')
            .next()
            .unwrap_or(addr)
            .parse()
            .with_context(|| format!("address {addr}"))?;
        assert!(
            allowed(ip),
            "{addr} is outside the test ranges 198.18.0.0/15 and 2001:2::/48"
        );
        let mut args = vec!["addr", "add", addr, "dev", iface];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        self.exec("ip", &args).map(drop)
    }

    /// Adds a route to `dst` via `gateway` (both in the test ranges; never a
    /// default route).
    pub fn add_route(&self, dst: &str, gateway: &str) -> anyhow::Result<()> {
        assert!(
            !matches!(dst, "default" | "0.0.0.0/0" | "::/0"),
            "no default route out of a test namespace"
        );
        self.exec("ip", &["route", "add", dst, "via", gateway])
            .map(drop)
    }

    /// `iptables-save` and `ip addr` of this namespace, for failure reports.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("===== namespace {} =====\n", self.name);
        for (program, args) in [
            ("ip", &["addr"][..]),
            ("ip", &["route"][..]),
            ("ip", &["-6", "route"][..]),
            ("iptables-nft-save", &[][..]),
            ("iptables-legacy-save", &[][..]),
            ("ip6tables-nft-save", &[][..]),
            ("ip6tables-legacy-save", &[][..]),
        ] {
            out.push_str(&format!("--- {program} {}\n", args.join(" ")));
            match self.command(program).args(args).output() {
                Ok(o) => {
                    out.push_str(&String::from_utf8_lossy(&o.stdout));
                    out.push_str(&String::from_utf8_lossy(&o.stderr));
                }
                Err(e) => out.push_str(&format!("(could not run: {e})\n")),
            }
        }
        out
    }
}

/// Owns the namespaces, links and processes of one test; cleans up on drop.
pub struct Lab {
    namespaces: Mutex<Vec<Namespace>>,
    children: Mutex<Vec<Child>>,
}

impl Lab {
    /// A new, empty lab.
    ///
    /// # Panics
    ///
    /// If the test does not run as root, saying how to run it.
    pub fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "not running as root: {HOW_TO_RUN}"
        );
        SWEEP.call_once(sweep_leftovers);
        Self {
            namespaces: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
        }
    }

    /// A new namespace with `lo` up and nothing else.
    ///
    /// # Panics
    ///
    /// If `ip netns add` fails, with its message and how to run the tests.
    pub fn namespace(&self) -> Namespace {
        let name = unique_name();
        if let Err(e) = run_checked(Command::new("ip").args(["netns", "add", &name])) {
            panic!("cannot create network namespace {name}: {e:#}\n{HOW_TO_RUN}");
        }
        let ns = Namespace { name };
        self.namespaces
            .lock()
            .expect("lab lock is never poisoned while held")
            .push(ns.clone());
        ns.exec("ip", &["link", "set", "lo", "up"])
            .expect("bringing lo up in a fresh namespace");
        ns
    }

    /// A veth pair with one end in `a` and the other in `b`, both up; returns the
    /// interface names (in `a`, in `b`). Deleted with the namespaces.
    pub fn veth(&self, a: &Namespace, b: &Namespace) -> anyhow::Result<(String, String)> {
        let (ifa, ifb) = (unique_name(), unique_name());
        run_checked(Command::new("ip").args([
            "link", "add", &ifa, "netns", &a.name, "type", "veth", "peer", "name", &ifb, "netns",
            &b.name,
        ]))?;
        a.exec("ip", &["link", "set", &ifa, "up"])?;
        b.exec("ip", &["link", "set", &ifb, "up"])?;
        Ok((ifa, ifb))
    }

    /// A bridge inside `ns`, up; attach pods to it with [`Lab::attach`].
    pub fn bridge(&self, ns: &Namespace) -> anyhow::Result<String> {
        let name = unique_name();
        ns.exec("ip", &["link", "add", &name, "type", "bridge"])?;
        ns.exec("ip", &["link", "set", &name, "up"])?;
        Ok(name)
    }

    /// Connects `pod` to `bridge` (in `bridge_ns`) with a veth pair; returns the
    /// pod's interface name.
    pub fn attach(
        &self,
        bridge_ns: &Namespace,
        bridge: &str,
        pod: &Namespace,
    ) -> anyhow::Result<String> {
        let (port, pod_if) = self.veth(bridge_ns, pod)?;
        bridge_ns.exec("ip", &["link", "set", &port, "master", bridge])?;
        Ok(pod_if)
    }

    /// Takes ownership of a child process: it is killed when the lab drops.
    pub fn adopt(&self, child: Child) {
        self.children
            .lock()
            .expect("lab lock is never poisoned while held")
            .push(child);
    }

    /// Diagnostics of every namespace of the lab.
    pub fn diagnostics(&self) -> String {
        self.namespaces
            .lock()
            .map(|list| list.iter().map(Namespace::diagnostics).collect())
            .unwrap_or_default()
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test failed; state of its namespaces:\n{}",
                self.diagnostics()
            );
        }
        if let Ok(children) = self.children.get_mut() {
            for child in children.iter_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Ok(namespaces) = self.namespaces.get_mut() {
            for ns in namespaces.drain(..) {
                if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &ns.name])) {
                    eprintln!("netns: could not delete {}: {e:#}", ns.name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interfaces_and_carry_the_pid() {
        let name = unique_name();
        assert!(name.len() <= MAX_IFNAME);
        assert_eq!(creator_pid(&name), Some(std::process::id()));
        assert_eq!(creator_pid("isthmus-lab"), None);
        assert_eq!(creator_pid("ist12x"), None);
        assert_eq!(creator_pid("ist3fffffx1f"), Some(0x3fffff));
    }

    #[test]
    fn only_test_ranges_are_allowed() {
        for ok in ["198.18.0.1", "198.19.255.1", "2001:2::1", "2001:2:0:ff::1"] {
            assert!(allowed(ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "10.0.0.1",
            "198.20.0.1",
            "127.0.0.1",
            "2001:db8::1",
            "2001:2:1::1",
        ] {
            assert!(!allowed(bad.parse().unwrap()), "{bad}");
        }
    }
}
