//! Isthmus side by side with a direct connection and with HAProxy, on one machine.
//!
//! Builds a two-namespace topology on [`isthmus_netns`] (the client pod and the
//! origin, 198.18.0.0/24 on a veth pair, no route out, no NAT), an nginx origin,
//! runs the load (wrk, iperf3) through each row's path and prints the table.
//! It installs and builds nothing: it checks for wrk, haproxy, nginx and iperf3
//! and for the release binaries, and says how to get them. Deliberately not here
//! (yet): the chain rows' hops in namespaces of their own (they share the
//! origin's, and the WAN delay is a userspace relay). See benches/README.md for
//! what each row and column means.

mod load;
mod rows;
mod setup;
mod table;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use isthmus_netns::{Namespace, Net, Options};
pub use isthmus_vocab::ports::PROXY_UID;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The client pod's address.
pub const C_IP: &str = "198.18.0.1";
/// The origin's address.
pub const O_IP: &str = "198.18.0.2";
/// wrk's connections in the paced latency load, and each one's pause (ms): wrk has
/// no rate option (wrk2 is not packaged), so 10 connections pausing 10 ms offer
/// about 1,000 requests per second; the achieved rate is measured and shown.
pub const LAT_CONNS: u32 = 10;
pub const PACE_MS: u32 = 10;
/// The delay each way between the chains' second and third hops.
pub const WAN_MS: u32 = 20;
/// Seven rows, each: the saturation load, four short loads at most, about 4 s of
/// starting and stopping.
const ROWS: u64 = 7;
/// One call stays under 10 minutes.
const BUDGET_SECS: u64 = 570;
const TOOLS: [&str; 7] = [
    "wrk", "haproxy", "nginx", "iperf3", "ip", "iptables", "curl",
];

/// Isthmus side by side with a direct connection and with HAProxy, in network
/// namespaces of its own (needs root).
#[derive(Parser, Debug)]
#[command(name = "side-by-side")]
struct Args {
    /// How many times each row is measured.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// wrk's duration (seconds) for the saturation load; the other loads take 5 s,
    /// or this when shorter.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Where isthmus, isthmus-proxy and isthmus-init are (default: beside this
    /// program, target/release when built with the workspace).
    #[arg(long)]
    bin: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let short = args.duration.min(5);
    let estimate = args.runs * (ROWS * (args.duration + 4 * short + 4) + 20);
    if estimate > BUDGET_SECS {
        eprintln!(
            "side-by-side: --runs {} with --duration {} would take about {estimate}s; keep it under {BUDGET_SECS} s (the default, 2 runs of 10 s, takes about 480 s)",
            args.runs, args.duration
        );
        std::process::exit(2);
    }
    if let Err(e) = preflight(&args).and_then(|bin| run(&args, bin, short)) {
        if INTERRUPTED.load(Ordering::SeqCst) {
            // The failure is the signal's doing (its clean-up stopped the load):
            // the handler exits with the signal's status once it is done.
            std::thread::sleep(Duration::from_secs(10));
        }
        eprintln!("side-by-side: {e:#}");
        std::process::exit(1);
    }
}

/// Everything missing, named at once with how to get it; the binaries' directory.
fn preflight(args: &Args) -> Result<PathBuf> {
    let missing: Vec<&str> = TOOLS.into_iter().filter(|t| !on_path(t)).collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {}\n  on Debian or Ubuntu: apt-get install -y wrk haproxy nginx iperf3 iproute2 iptables curl\n  (the packaged haproxy and nginx services are not used; stop them if they are in the way)",
            missing.join(" ")
        );
    }
    let bin = match &args.bin {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("locating this program")?
            .parent()
            .context("this program's directory")?
            .to_owned(),
    };
    for b in ["isthmus", "isthmus-proxy", "isthmus-init"] {
        if !bin.join(b).is_file() {
            bail!(
                "no release binary {}: build first with 'cargo build --release --workspace --bins' (or pass --bin DIR)",
                bin.join(b).display()
            );
        }
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "needs root for network namespaces, iptables and running the sidecar as UID {PROXY_UID}: run it with sudo"
        );
    }
    Ok(bin)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Set when a signal's clean-up has begun.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// On SIGINT or SIGTERM: removes the namespaces (stopping every process in them)
/// and the work directory, then exits 130 or 143, as the shell's trap did.
fn clean_up_on_signal(net: Arc<Net>, work: PathBuf) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the signal handler's runtime")?;
    // Registered here, before anything is built: a Ctrl-C from now on cleans up.
    let (mut int, mut term) = {
        let _entered = runtime.enter();
        (
            signal(SignalKind::interrupt()).context("handling SIGINT")?,
            signal(SignalKind::terminate()).context("handling SIGTERM")?,
        )
    };
    std::thread::spawn(move || {
        let code = runtime.block_on(async {
            tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            }
        });
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("side-by-side: interrupted; removing its namespaces");
        net.teardown();
        let _ = std::fs::remove_dir_all(&work);
        std::process::exit(code);
    });
    Ok(())
}

/// The processes this program started, by pid; each stopped on its row's end, all
/// of them (and anything else in the namespaces) with the [`Net`].
pub struct Procs {
    work: PathBuf,
    children: Vec<Child>,
}

impl Procs {
    /// Starts `cmd` with its output in `<work>/<log>.log`; its pid.
    pub fn start(&mut self, log: &str, mut cmd: Command) -> Result<i32> {
        let file = self.log(log)?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        Ok(self.keep(child))
    }

    /// Starts `cmd` in `ns` as the proxy UID (its own process, as `isthmus lab`
    /// runs it), its output in `<work>/<log>.log`; its pid.
    pub fn start_proxy(&mut self, log: &str, ns: &Namespace, cmd: Command) -> Result<i32> {
        let path = self.work.join(format!("{log}.log"));
        let child = ns
            .spawn_logged_as(cmd, PROXY_UID, PROXY_UID, &path)
            .with_context(|| format!("starting {log} in {ns}"))?;
        Ok(self.keep(child))
    }

    fn log(&self, log: &str) -> Result<std::fs::File> {
        let path = self.work.join(format!("{log}.log"));
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
    }

    fn keep(&mut self, child: Child) -> i32 {
        let pid = child.id() as i32;
        self.children.push(child);
        pid
    }

    /// SIGTERM to `pid`, and a bounded wait for it (SIGKILL after 5 s).
    pub fn stop(&mut self, pid: i32) {
        let Some(i) = self.children.iter().position(|c| c.id() as i32 == pid) else {
            return;
        };
        let mut child = self.children.swap_remove(i);
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn stop_all(&mut self, pids: &[i32]) {
        for pid in pids {
            self.stop(*pid);
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for pid in self
            .children
            .iter()
            .map(|c| c.id() as i32)
            .collect::<Vec<_>>()
        {
            self.stop(pid);
        }
    }
}

/// Polls `check` for up to 10 s.
pub fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..100 {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not come up within 10 s")
}

/// Whether `curl` in `ns` gets a 2xx from `url` within `secs`.
pub fn curl_ok(ns: &Namespace, url: &str, secs: u32) -> bool {
    ns.command("curl")
        .args(["-sf", "-m", &secs.to_string(), "-o", "/dev/null", url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The body of `url` as `curl` in `ns` gets it.
pub fn curl(ns: &Namespace, url: &str, secs: u32) -> Result<String> {
    ns.exec("curl", &["-sf", "-m", &secs.to_string(), url])
        .with_context(|| format!("GET {url} in {ns}"))
}

fn run(args: &Args, bin: PathBuf, short: u64) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("isthmus-side-by-side.")
        .tempdir()
        .context("creating the work directory")?;
    // The proxy UID must reach its binary, identity and manifests.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    let net = Arc::new(Net::create(Options::new("isb")).context("starting the run")?);
    clean_up_on_signal(net.clone(), work.path().to_owned())?;
    let mut procs = Procs {
        work: work.path().to_owned(),
        children: Vec::new(),
    };
    let result = rows::Bench::build(&net, work.path(), &bin, short, args.duration, &mut procs)
        .and_then(|mut bench| bench.measure_all(args.runs, &mut procs));
    drop(procs);
    // Not left to the drop: the signal handler's thread holds the run too.
    net.teardown();
    match result {
        Ok(report) => {
            println!("{report}");
            Ok(())
        }
        Err(e) => {
            if !INTERRUPTED.load(Ordering::SeqCst) {
                eprintln!(
                    "side-by-side: failed; logs were in {}:",
                    work.path().display()
                );
                print_log_tails(work.path());
            }
            Err(e)
        }
    }
}

/// The last 20 lines of every non-empty log.
fn print_log_tails(work: &Path) {
    let Ok(entries) = std::fs::read_dir(work) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.is_empty() {
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "--- {} (last 20 lines) ---",
            log.file_name().unwrap_or_default().to_string_lossy()
        );
        for line in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("{line}");
        }
    }
}
