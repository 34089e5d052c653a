//! The one meshed-pod fixture of the end-to-end tests: a pod namespace with the real
//! capture (`isthmus-init`) and the real `isthmus-proxy sidecar` running as the proxy
//! UID, and a server namespace joined to it by a veth pair. The sidecar, hostile,
//! fault and load suites all build their pod here.
//!
//! The pod is 198.18.0.2 and 2001:2::2, the server 198.18.0.1 and 2001:2::1 (a /24
//! and a /64 between them), with no other route; IPv6 is captured only when asked
//! ([`PodOptions::ipv6`]). The test process is root, so its connections from the pod are
//! captured like an application's. This module does not mint identities (the caller
//! writes `tls.crt`, `tls.key` and `ca.crt`, keeping certificate code out of this
//! library) and does not decide what is mirrored: the manifests directory only holds
//! the cluster's settings unless the caller adds more.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::binary::{WorldExecutable, binary};
use crate::netns::{Fam, Lab, Namespace, Pair, run_checked};
use crate::tcp;

/// The UID the proxy runs as, which the capture exempts.
pub const PROXY_UID: u32 = 2102;
/// The sidecar's ports (the defaults the capture redirects to).
pub const OUTBOUND_PORT: u16 = 4140;
pub const INBOUND_PORT: u16 = 4143;
pub const ADMIN_PORT: u16 = 4191;
/// How long a sidecar may take to become ready (a debug build, a busy machine).
pub const READY: Duration = Duration::from_secs(30);

/// How a [`SidecarPod`] is built.
#[derive(Clone, Copy, Debug)]
pub struct PodOptions<'a> {
    /// Capture IPv6 too (`isthmus-init --ipv6`), and address the pod and the server
    /// by their IPv6 addresses.
    pub ipv6: bool,
    /// The sidecar's `--log` filter.
    pub log: &'a str,
    /// More sidecar flags, after `--connect-timeout 1s`.
    pub extra: &'a [&'a str],
}

impl Default for PodOptions<'_> {
    fn default() -> Self {
        Self {
            ipv6: false,
            log: "info",
            extra: &[],
        }
    }
}

/// A pod with its capture and sidecar, and a server namespace. Dropping it kills
/// the sidecar and deletes both namespaces; a failing test first prints the log.
pub struct SidecarPod {
    pub pod: Namespace,
    pub server: Namespace,
    /// The pod's address (what servers see as the client).
    pub pod_ip: IpAddr,
    /// The server namespace's address.
    pub server_ip: IpAddr,
    /// The sidecar's pid; [`SidecarPod::restart`] changes it.
    pub pid: u32,
    pub log: PathBuf,
    /// The manifests directory the sidecar watches (readable by the proxy UID).
    pub manifests: PathBuf,
    identity: PathBuf,
    /// `--log` and the test's flags.
    flags: Vec<String>,
    /// Logs of runs before a [`SidecarPod::restart`] (each run truncates the file).
    earlier_runs: String,
    bin: WorldExecutable,
    _dir: tempfile::TempDir,
    /// Declared last so it drops last, after the log was shown.
    pub lab: Lab,
}

impl Drop for SidecarPod {
    fn drop(&mut self) {
        show_log_if_failing(&self.log, &self.earlier_runs, String::new);
    }
}

/// While a test fails (its fixtures dropping during the panic), prints the
/// sidecar's `log`, after what `earlier` runs logged and followed by what `more`
/// makes (only then: diagnostics cost commands).
pub fn show_log_if_failing(log: &Path, earlier: &str, more: impl FnOnce() -> String) {
    if std::thread::panicking() {
        eprintln!(
            "--- sidecar log ({}) ---\n{earlier}{}{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default(),
            more()
        );
    }
}

/// While a test fails, prints each of `logs`, headed by its path.
pub fn show_logs_if_failing(logs: &[PathBuf]) {
    if std::thread::panicking() {
        for log in logs {
            eprintln!(
                "--- {} ---\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

/// Raises the open-files limit of process `pid` (soft and hard) to `want` with
/// `prlimit`: load tests hold more sockets than a default limit allows, in the test
/// process and in the proxy alike. Without `CAP_SYS_RESOURCE` the hard limit cannot
/// be raised (nor another UID's limit changed), and the soft one is raised to the
/// hard one where allowed. Returns the soft limit in effect.
pub fn raise_nofile(pid: u32, want: u64) -> anyhow::Result<u64> {
    let set = |limit: u64| {
        run_checked(Command::new("prlimit").args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ]))
    };
    if set(want).is_err() {
        let hard = nofile(pid)?.1;
        // Setting another UID's limits at all needs the capability too: then the
        // limit stays what it is, and the caller sizes its load to it.
        let _ = set(hard.min(want));
    }
    Ok(nofile(pid)?.0)
}

/// The (soft, hard) open-files limits of process `pid`, from `/proc/PID/limits`.
pub fn nofile(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/limits");
    let limits = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .with_context(|| format!("no open-files limit in {path}"))?;
    let mut numbers = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    match (numbers.next(), numbers.next()) {
        (Some(soft), Some(hard)) => Ok((soft, hard)),
        _ => bail!("{path}: cannot read {line:?}"),
    }
}

/// The resident set of process `pid` in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// How many file descriptors process `pid` holds.
pub fn open_fds(pid: u32) -> anyhow::Result<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path)
        .with_context(|| format!("listing {path}"))?
        .count())
}

/// Waits, polling every 50 ms for up to `limit`, until process `pid` holds no
/// more open descriptors than `baseline`: what a test checks after hostile
/// clients went away. `what` names the process in the failure.
///
/// # Panics
///
/// When the descriptors stay above `baseline` past `limit`, or cannot be listed.
pub fn fds_return_to(pid: u32, baseline: usize, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    loop {
        let now = open_fds(pid).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        if now <= baseline {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} still holds {now} descriptors, at most {baseline} expected within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` runs (a zombie does not).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|status| {
            !status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains("zombie"))
        })
        .unwrap_or(false)
}

/// A `GET` with `connection: close`, read to the end. Call it on a thread in the
/// namespace of `addr`.
pub use isthmus_test_support::proxy::get_raw_blocking as http_get;

/// Sum of the samples of `family` whose labels match every one of `labels`
/// (`direction="outbound"`); 0 when there is none.
pub use isthmus_test_support::metrics::sum as metric;

/// Makes `dir` a sidecar's configuration for the proxy UID: the identity directory
/// `dir/identity`, written by `mint` (which creates it) and handed to the proxy UID
/// with its key kept 0600, and `dir/manifests` holding only the cluster's settings,
/// so that every destination is a passthrough. Returns both paths.
pub fn prepare_dirs(dir: &Path, mint: impl FnOnce(&Path)) -> anyhow::Result<(PathBuf, PathBuf)> {
    // A temp dir is 0700; the proxy UID must be able to enter it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let identity = dir.join("identity");
    mint(&identity);
    // The key stays 0600, as it should: hand the directory to the proxy UID.
    std::os::unix::fs::chown(&identity, Some(PROXY_UID), Some(PROXY_UID))?;
    for entry in std::fs::read_dir(&identity)? {
        std::os::unix::fs::chown(entry?.path(), Some(PROXY_UID), Some(PROXY_UID))?;
    }
    let manifests = dir.join("manifests");
    std::fs::create_dir(&manifests)?;
    std::fs::set_permissions(&manifests, std::fs::Permissions::from_mode(0o755))?;
    let settings = manifests.join("settings.yaml");
    std::fs::write(
        &settings,
        "apiVersion: multicluster.isthmus.io/v1alpha1\n\
         kind: ClusterSettings\n\
         metadata: {name: cluster-b, namespace: isthmus}\n\
         spec: {clusterName: cluster-b}\n",
    )?;
    std::fs::set_permissions(&settings, std::fs::Permissions::from_mode(0o644))?;
    Ok((identity, manifests))
}

/// Starts `bin sidecar --cluster cluster-b` in `pod` as [`PROXY_UID`], with the
/// identity and manifests directories given and then `flags`, its output in `log`
/// and nothing from the test's environment; then waits up to [`READY`] until its
/// admin port answers `/ready` with 200. Returns the running child, for the
/// caller's lab to adopt. A sidecar that exits first, or is not ready in time
/// (it is then killed), is an error carrying its log.
pub fn start_sidecar(
    pod: &Namespace,
    bin: &Path,
    identity: &Path,
    manifests: &Path,
    flags: &[&str],
    log: &Path,
) -> anyhow::Result<Child> {
    // A pod with a hosts file of its own (`Namespace::write_hosts`) resolves names
    // with it, as a pod's containers do: only `ip netns exec` mounts it over
    // /etc/hosts, and it must start as root, so setpriv drops to the proxy UID.
    let hosts = Path::new("/etc/netns").join(pod.name()).join("hosts");
    let (mut cmd, uid) = if hosts.exists() {
        let mut cmd = pod.command("setpriv");
        cmd.arg(format!("--reuid={PROXY_UID}"))
            .arg(format!("--regid={PROXY_UID}"))
            .args(["--clear-groups", "--"])
            .arg(bin);
        (cmd, 0)
    } else {
        (Command::new(bin), PROXY_UID)
    };
    cmd.args(["sidecar", "--cluster", "cluster-b", "--identity-dir"])
        .arg(identity)
        .arg("--manifests")
        .arg(manifests)
        .args(flags)
        // Only the flags above configure it, whatever the test's environment holds.
        .env_clear();
    let mut child = pod.spawn_logged_as(cmd, uid, uid, log)?;
    let deadline = Instant::now() + READY;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the sidecar exited ({status}) before it was ready:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let ready = pod
            .run(|| http_get(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), "/ready"))
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"));
        if ready {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the sidecar was not ready within {READY:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl SidecarPod {
    /// Builds the topology, installs the capture, writes the identity with `mint`
    /// (which creates the directory it is given) and starts a ready sidecar with
    /// `--connect-timeout 1s` and `extra` flags.
    pub fn start(mint: impl FnOnce(&Path), extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(
            mint,
            PodOptions {
                extra,
                ..PodOptions::default()
            },
        )
    }

    /// [`SidecarPod::start`] with the family, log filter and flags of `options`.
    pub fn start_with(mint: impl FnOnce(&Path), options: PodOptions<'_>) -> anyhow::Result<Self> {
        let lab = Lab::new();
        let Pair { pod, server, .. } = lab.pair(true);
        let fam = if options.ipv6 { Fam::V6 } else { Fam::V4 };
        let (pod_ip, server_ip) = (fam.pod_ip(), fam.server_ip());
        let init = binary("isthmus-init");
        // For IPv6, isthmus-init also adds ::6 to lo, the sidecar's inbound delivery
        // source: the IPv6 inbound tests fail without it.
        let init_args: &[&str] = if options.ipv6 { &["--ipv6"] } else { &[] };
        pod.exec(
            init.to_str()
                .context("the isthmus-init path is not UTF-8")?,
            init_args,
        )?;

        let dir = tempfile::Builder::new().prefix("isthmus-pod").tempdir()?;
        let (identity, manifests) = prepare_dirs(dir.path(), mint)?;
        let log = dir.path().join("sidecar.log");
        let bin = WorldExecutable::copy(&binary("isthmus-proxy"))?;
        let flags = ["--log", options.log]
            .into_iter()
            .chain(options.extra.iter().copied())
            .map(str::to_owned)
            .collect();
        let mut pod = Self {
            pod,
            server,
            pod_ip,
            server_ip,
            pid: 0,
            log,
            manifests,
            identity,
            earlier_runs: String::new(),
            flags,
            bin,
            _dir: dir,
            lab,
        };
        pod.restart()?;
        Ok(pod)
    }

    /// Starts the sidecar (again, after it was killed) and waits until it is ready.
    /// The log file starts afresh; a failing test shows earlier runs' lines too.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let flags: Vec<&str> = ["--connect-timeout", "1s"]
            .into_iter()
            .chain(self.flags.iter().map(String::as_str))
            .collect();
        let earlier = std::fs::read(&self.log).unwrap_or_default();
        let child = start_sidecar(
            &self.pod,
            self.bin.path(),
            &self.identity,
            &self.manifests,
            &flags,
            &self.log,
        );
        self.earlier_runs
            .push_str(&String::from_utf8_lossy(&earlier));
        let child = child?;
        self.pid = child.id();
        self.lab.adopt(child);
        Ok(())
    }

    /// Whether `/ready` answers 200 now.
    pub fn ready(&self) -> bool {
        self.pod
            .run(|| http_get(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), "/ready"))
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    }

    /// A GET on the admin port from inside the pod.
    pub fn admin(&self, path: &str) -> std::io::Result<String> {
        self.pod
            .run(|| http_get(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), path))
    }

    /// The sidecar's `/metrics` body.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let response = self.admin("/metrics").context("scraping /metrics")?;
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .context("a /metrics response without a body")
    }

    /// The server namespace's address at `port`.
    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server_ip, port)
    }

    /// Sends `signal` to the sidecar.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = i32::try_from(self.pid).context("a pid fits in i32")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to the sidecar ({pid})"))
    }

    /// Kills the sidecar and starts it again: what a test does after it changed the
    /// settings the sidecar only reads when it starts (its cluster's gateway).
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGKILL)?;
        let deadline = Instant::now() + READY;
        while self.running() {
            if Instant::now() >= deadline {
                bail!(
                    "the sidecar ({}) still ran {READY:?} after SIGKILL",
                    self.pid
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.restart()
    }

    /// Whether the sidecar still runs.
    pub fn running(&self) -> bool {
        running(self.pid)
    }

    /// A listener on the server namespace's address.
    pub fn listen(&self, port: u16) -> TcpListener {
        let addr = self.server_addr(port);
        self.server
            .run(|| tcp::listen(addr))
            .unwrap_or_else(|e| panic!("listening on {addr} in the server namespace: {e}"))
    }

    /// A connection from the pod (as root, so it is captured) to `port` on the
    /// server's address; read and write timeouts of [`tcp::WAIT`].
    pub fn connect(&self, port: u16) -> TcpStream {
        let addr = self.server_addr(port);
        self.pod
            .run(|| tcp::connect(addr))
            .unwrap_or_else(|e| panic!("connecting from the pod to {addr}: {e}"))
    }

    /// A connection from the server namespace to the pod's inbound mesh port.
    pub fn connect_inbound(&self) -> TcpStream {
        let addr = SocketAddr::new(self.pod_ip, INBOUND_PORT);
        self.server
            .run(|| tcp::connect(addr))
            .unwrap_or_else(|e| panic!("connecting from the server to {addr}: {e}"))
    }

    /// The sidecar's `/metrics`, fetched with curl inside the pod as a user would.
    pub fn curl_metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{ADMIN_PORT}/metrics");
        self.pod
            .exec("curl", &["-sS", "--max-time", "5", &url])
            .unwrap_or_else(|e| panic!("curl {url} in the pod: {e:#}"))
    }

    /// Waits (within [`tcp::WAIT`]) until the sum of `family`'s samples with
    /// `labels` is `want`: what is counted when a connection closes is counted just
    /// after its ends see the close, so an immediate read could race it.
    pub fn expect_metric(&self, family: &str, labels: &[&str], want: f64, what: &str) {
        let deadline = Instant::now() + tcp::WAIT;
        loop {
            let m = self.curl_metrics();
            let got = metric(&m, family, labels);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {family} {labels:?} is {got}, expected {want} within {:?}:\n{m}",
                tcp::WAIT
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many file descriptors the sidecar holds.
    pub fn fds(&self) -> usize {
        open_fds(self.pid).unwrap_or_else(|e| panic!("the sidecar: {e:#}"))
    }
}
