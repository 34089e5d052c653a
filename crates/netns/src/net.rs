//! [`Net`]: the owner of one run's namespaces, links and processes, and the
//! clean-up that removes all of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::command::run_checked;
use crate::name::{MAX_IFNAME, run_prefix};
use crate::namespace::{ETC_NETNS, NETNS_DIR};
use crate::sweep::remove_run;
use crate::{Error, Namespace, Result};

/// How long processes get to exit on SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// Interface numbers, unique in the process: several runs of one process (tests
/// on parallel threads) share its prefix.
static IFACES: AtomicU32 = AtomicU32::new(0);

/// How a run names and records itself.
#[derive(Debug, Clone)]
pub struct Options {
    /// The first letters of every name: tells the lab, the tests and the
    /// benchmark apart, so each sweeps only its own leftovers.
    pub tag: &'static str,
    /// A directory under which the run records itself in `<prefix>/` (its pid and
    /// namespaces), so that [`crate::sweep`] can find what a killed run left, and
    /// where it may keep files of its own; removed at the end. `None`: nothing is
    /// recorded and leftovers are found by name only.
    pub record_root: Option<PathBuf>,
    /// Print the diagnostics of every namespace when dropped during a panic (a
    /// failing test).
    pub diagnose_on_panic: bool,
}

impl Options {
    /// Options with `tag`, no record, no diagnostics.
    pub fn new(tag: &'static str) -> Self {
        Self {
            tag,
            record_root: None,
            diagnose_on_panic: false,
        }
    }
}

/// One run's namespaces, links, hosts files and processes; removes them when
/// dropped: on a normal end, an error or a panic.
pub struct Net {
    prefix: String,
    run_dir: Option<PathBuf>,
    diagnose_on_panic: bool,
    namespaces: Mutex<Vec<Namespace>>,
    children: Mutex<Vec<Child>>,
    torn_down: AtomicBool,
}

impl Net {
    /// A new, empty run of this process under `options.tag`; with a record root,
    /// its record directory is created (mode 0755, so another UID can read the
    /// run's files there), replacing what a previous process of the same pid left.
    pub fn create(options: Options) -> Result<Self> {
        let prefix = run_prefix(options.tag);
        let run_dir = match &options.record_root {
            Some(root) => Some(create_record(root, &prefix)?),
            None => None,
        };
        Ok(Self {
            prefix,
            run_dir,
            diagnose_on_panic: options.diagnose_on_panic,
            namespaces: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            torn_down: AtomicBool::new(false),
        })
    }

    /// The run's prefix, `<tag><pid in hex>`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The run's record directory (removed at the end), if it has one.
    pub fn run_dir(&self) -> Option<&Path> {
        self.run_dir.as_deref()
    }

    /// A fresh interface name, `<prefix><letter><n>`.
    pub fn ifname(&self, letter: char) -> Result<String> {
        let n = IFACES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{letter}{n:x}", self.prefix);
        if name.len() > MAX_IFNAME {
            return Err(Error::NameTooLong { name });
        }
        Ok(name)
    }

    /// Creates namespace `<prefix>-<suffix>` with `lo` up, recorded for clean-up
    /// before it exists.
    pub fn namespace(&self, suffix: &str) -> Result<Namespace> {
        let ns = Namespace::named(format!("{}-{suffix}", self.prefix));
        {
            let mut list = self.namespaces.lock().unwrap_or_else(|p| p.into_inner());
            list.push(ns.clone());
            if let Some(dir) = &self.run_dir {
                let names: Vec<&str> = list.iter().map(Namespace::name).collect();
                let path = dir.join("namespaces");
                std::fs::write(&path, names.join("\n") + "\n").map_err(|source| Error::File {
                    what: "recording namespaces in",
                    path,
                    source,
                })?;
            }
        }
        run_checked(Command::new("ip").args(["netns", "add", ns.name()]))?;
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A veth pair with one end in `a` and the other in `b`, both up; returns the
    /// interface names (in `a`, in `b`). Deleted with the namespaces.
    pub fn veth(&self, a: &Namespace, b: &Namespace) -> Result<(String, String)> {
        self.veth_named(a, b, None)
    }

    /// Like [`Net::veth`], with the end in `b` named `name_in_b` (`eth0`).
    pub fn veth_named(
        &self,
        a: &Namespace,
        b: &Namespace,
        name_in_b: Option<&str>,
    ) -> Result<(String, String)> {
        let (ifa, mut ifb) = (self.ifname('v')?, self.ifname('p')?);
        run_checked(Command::new("ip").args([
            "link",
            "add",
            &ifa,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &ifb,
            "netns",
            b.name(),
        ]))?;
        if let Some(name) = name_in_b {
            // Renamed while down (an interface that is up cannot be), and after
            // creation under a unique name: the pair is made in this process's
            // namespace first, where `name` may be taken.
            b.exec("ip", &["link", "set", &ifb, "name", name])?;
            ifb = name.to_owned();
        }
        a.exec("ip", &["link", "set", &ifa, "up"])?;
        b.exec("ip", &["link", "set", &ifb, "up"])?;
        Ok((ifa, ifb))
    }

    /// A bridge inside `ns`, up; connect namespaces to it with [`Net::attach`].
    pub fn bridge(&self, ns: &Namespace) -> Result<String> {
        let name = self.ifname('b')?;
        ns.exec("ip", &["link", "add", &name, "type", "bridge"])?;
        ns.exec("ip", &["link", "set", &name, "up"])?;
        Ok(name)
    }

    /// Connects `pod` to `bridge` (in `bridge_ns`) with a veth pair; returns the
    /// pod's interface name (`name` if given).
    pub fn attach(
        &self,
        bridge_ns: &Namespace,
        bridge: &str,
        pod: &Namespace,
        name: Option<&str>,
    ) -> Result<String> {
        let (port, pod_if) = self.veth_named(bridge_ns, pod, name)?;
        bridge_ns.exec("ip", &["link", "set", &port, "master", bridge])?;
        Ok(pod_if)
    }

    /// Takes ownership of a child process: it is killed when the run ends.
    pub fn adopt(&self, child: Child) {
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child);
    }

    /// The namespaces of the run so far.
    pub fn namespaces(&self) -> Vec<Namespace> {
        self.namespaces
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Diagnostics of every namespace of the run.
    pub fn diagnostics(&self) -> String {
        self.namespaces()
            .iter()
            .map(Namespace::diagnostics)
            .collect()
    }

    /// Kills the adopted children, stops every other process in the run's
    /// namespaces, deletes the namespaces (and with them every interface), their
    /// hosts files and the record directory. Idempotent.
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(mut children) = self.children.lock() {
            for child in children.iter_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        remove_namespaces(&self.namespaces());
        if let Some(dir) = &self.run_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if self.diagnose_on_panic && std::thread::panicking() {
            eprintln!("failed; state of its namespaces:\n{}", self.diagnostics());
        }
        self.teardown();
    }
}

fn create_record(root: &Path, prefix: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let run_dir = root.join(prefix);
    if run_dir.exists() {
        // Our own pid's leftovers: a previous process with this pid.
        remove_run(prefix, &run_dir);
    }
    let file = |what, path: &Path| {
        let path = path.to_owned();
        move |source| Error::File { what, path, source }
    };
    std::fs::create_dir_all(&run_dir).map_err(file("creating the run directory", &run_dir))?;
    for dir in [root, run_dir.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(file("making readable", dir))?;
    }
    let pid = run_dir.join("pid");
    std::fs::write(&pid, format!("{}\n", std::process::id())).map_err(file("writing", &pid))?;
    Ok(run_dir)
}

/// SIGTERM to every process of `namespaces`, SIGKILL to those left after a grace
/// period, then deletes the namespaces and their `/etc/netns` directories.
pub(crate) fn remove_namespaces(namespaces: &[Namespace]) {
    let me = std::process::id() as i32;
    let signal_all = |signal: Signal| {
        let mut any = false;
        for ns in namespaces {
            for pid in ns.pids() {
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
        while Instant::now() < deadline
            && namespaces
                .iter()
                .any(|ns| ns.pids().iter().any(|p| *p != me))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        signal_all(Signal::SIGKILL);
    }
    for ns in namespaces {
        if Path::new(NETNS_DIR).join(ns.name()).exists()
            && let Err(e) = run_checked(Command::new("ip").args(["netns", "del", ns.name()]))
        {
            eprintln!("netns: could not delete namespace {ns}: {e}");
        }
        let _ = std::fs::remove_dir_all(Path::new(ETC_NETNS).join(ns.name()));
    }
}
