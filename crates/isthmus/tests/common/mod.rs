//! Helpers shared by the lab's end-to-end tests: the root check, running the
//! `isthmus` binary with a bound, and reading the lab's output and leftovers.

// Each test binary uses a subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const HOW_TO_RUN: &str = "the lab tests build network namespaces and program iptables, so they \
     run as root with every binary built: `cargo build --bins && sudo -E cargo test -p isthmus`";

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "not running as root: {HOW_TO_RUN}"
    );
    let dir = Path::new(env!("CARGO_BIN_EXE_isthmus")).parent().unwrap();
    for bin in ["isthmus-proxy", "isthmus-init"] {
        assert!(
            dir.join(bin).is_file(),
            "{bin} is not built in {}: {HOW_TO_RUN}",
            dir.display()
        );
    }
}

/// `examples/<name>` of the repository.
pub fn example_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

pub fn isthmus() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_isthmus"));
    cmd.env_remove("ISTHMUS_LOG").stdin(Stdio::null());
    cmd
}

/// Starts `isthmus lab up DIR --duration DURATION`, its stdout read line by
/// line into the receiver.
pub fn lab_up_lines(dir: &Path, duration: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = isthmus()
        .args(["lab", "up"])
        .arg(dir)
        .args(["--duration", duration])
        .stdout(Stdio::piped())
        // Errors show in the test's output.
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Runs `isthmus lab up DIR ARGS...` to its end (at most `timeout`): its
/// output, its stdout, and both as context for assertion messages.
pub fn lab_up(dir: &Path, args: &[&str], timeout: Duration) -> (Output, String, String) {
    let out = wait_output(
        isthmus()
            .args(["lab", "up"])
            .arg(dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        timeout,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let context = format!(
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, stdout, context)
}

/// Waits for `child` at most `timeout`, killing it after that.
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {timeout:?}; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The run prefix from the lab's first line, `isthmus lab <prefix>: ...`.
pub fn run_prefix(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("isthmus lab "))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no run prefix in the output:\n{stdout}"))
        .to_owned()
}

pub fn namespaces_of(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect()
}

pub fn assert_nothing_left(prefix: &str) {
    assert_eq!(
        namespaces_of(prefix),
        Vec::<String>::new(),
        "namespaces left"
    );
    assert!(
        !Path::new("/run/isthmus-lab").join(prefix).exists(),
        "run directory of {prefix} left"
    );
    let etc: Vec<String> = std::fs::read_dir("/etc/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(etc.is_empty(), "hosts files left: {etc:?}");
}

/// The number in "gateway of <cluster> carried <n> tunnel streams".
pub fn carried(stdout: &str, cluster: &str) -> f64 {
    let prefix = format!("gateway of {cluster} carried ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line for the gateway of {cluster}:\n{stdout}"))
}

/// A lab kept running while a test changes it: stopped with SIGTERM (so it
/// cleans up) when dropped, however the test ends.
pub struct LiveLab {
    child: Child,
    /// Its output up to ": running".
    pub started: Vec<String>,
    /// Its run prefix.
    pub prefix: String,
}

impl LiveLab {
    /// Starts `isthmus lab up DIR --duration DURATION` and waits (at most 180 s)
    /// until it says it is running.
    pub fn start(dir: &Path, duration: &str) -> Self {
        let (child, lines) = lab_up_lines(dir, duration);
        let mut lab = Self {
            child,
            started: Vec::new(),
            prefix: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        while !lab.started.iter().any(|l| l.contains(": running")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => lab.started.push(line),
                Err(_) => panic!("the lab did not start:\n{}", lab.started.join("\n")),
            }
        }
        // What it says later goes to the test's own output (shown when it
        // fails), and a full pipe never blocks the lab.
        std::thread::spawn(move || {
            while let Ok(line) = lines.recv() {
                eprintln!("{line}");
            }
        });
        lab.prefix = run_prefix(&lab.context());
        lab
    }

    /// Its output up to ": running", for assertion messages.
    pub fn context(&self) -> String {
        self.started.join("\n")
    }

    /// The network namespace of the first pod of `cluster` whose name starts
    /// with `pod`.
    pub fn pod_ns(&self, cluster: &str, pod: &str) -> String {
        self.started
            .iter()
            .find(|l| l.starts_with(&format!("[{cluster}] pod default/{pod}-")))
            .and_then(|l| l.split("(ip netns exec ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no pod {pod} in {cluster}; {}", self.context()))
            .to_owned()
    }

    /// The network namespace of `cluster`'s gateway.
    pub fn gateway_ns(&self, cluster: &str) -> String {
        format!("{}-{cluster}-gateway", self.prefix)
    }

    /// `isthmus lab VERB --cluster CLUSTER FILE` on this lab; panics unless it
    /// succeeds.
    pub fn change(&self, verb: &str, cluster: &str, file: &Path) {
        let out = isthmus()
            .args(["lab", verb, "--cluster", cluster, "--run", &self.prefix])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "isthmus lab {verb} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for LiveLab {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids and command lines of the processes whose command line mentions
/// `needle`.
pub fn processes(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if line.contains(needle) {
                out.push((pid, line));
            }
        }
    }
    out
}

/// `args` run inside namespace `ns`.
pub fn exec_in(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap()
}

/// `curl` of `url` inside namespace `ns`: its output when it succeeds.
pub fn curl_in(ns: &str, url: &str) -> Option<String> {
    let out = exec_in(ns, &["curl", "-s", "--fail", "-m", "2", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` every 100 ms until it holds or `within` passes; the time it
/// took, or `None`.
pub fn until(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() <= within {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// cluster-a: hello (`nginxdemos/hello` on 8080, `replicas` of them), behind
/// two exported Services, `hello` and `hello-two`.
pub fn cluster_a(replicas: u32) -> String {
    let mut out = String::new();
    for service in ["hello", "hello-two"] {
        out += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {service}}}\n\
             spec: {{ports: [{{port: 80, targetPort: 8080}}], selector: {{app: hello}}}}\n---\n"
        );
    }
    out + &hello_deployment(replicas)
}

/// cluster-a's Deployment `hello`: `replicas` of `nginxdemos/hello` on 8080.
pub fn hello_deployment(replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: hello}}\nspec:\n  \
         replicas: {replicas}\n  template:\n    metadata: {{labels: {{app: hello}}}}\n    \
         spec:\n      containers:\n      - {{name: hello, image: 'nginxdemos/hello:plain-text', \
         ports: [{{containerPort: 8080}}]}}\n"
    )
}

/// cluster-b: a meshed client that only waits (tests call from its namespace).
pub const CLUSTER_B: &str = concat!(
    "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: client}\nspec:\n",
    "  template:\n    metadata: {labels: {app: client}}\n    spec:\n      containers:\n",
    "      - {name: client, image: busybox, command: [/bin/sh, -c, sleep 600]}\n",
);

/// A ServiceMirror in cluster-b of cluster-a's `service`.
pub fn mirror(service: &str) -> String {
    format!(
        "apiVersion: linkerd.io/v1alpha1\nkind: ServiceMirror\nmetadata:\n  \
         name: {service}-mirror\n  namespace: default\nspec:\n  cluster: cluster-a\n  \
         service:\n    name: {service}\n    namespace: default\n"
    )
}

/// Writes a lab of two clusters under `root`: cluster-a ([`cluster_a`],
/// exporting `default`) and cluster-b ([`CLUSTER_B`] and `b_extra`).
pub fn two_clusters(root: &Path, a_replicas: u32, b_extra: &str) {
    let b = match b_extra {
        "" => CLUSTER_B.to_owned(),
        extra => format!("{CLUSTER_B}---\n{extra}"),
    };
    for (cluster, manifests, settings) in [
        (
            "cluster-a",
            cluster_a(a_replicas),
            "exportedNamespaces: [default]\n",
        ),
        ("cluster-b", b, ""),
    ] {
        let dir = root.join(cluster);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("app.yaml"), manifests).unwrap();
        std::fs::write(dir.join("isthmus.yaml"), settings).unwrap();
    }
}

/// [`two_clusters`] with cluster-b mirroring hello, running: its directory (kept
/// as long as the lab), the lab, and cluster-b's client namespace.
pub fn hello_lab() -> (tempfile::TempDir, LiveLab, String) {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    two_clusters(tmp.path(), 1, &mirror("hello"));
    let lab = LiveLab::start(tmp.path(), "400s");
    let client = lab.pod_ns("cluster-b", "client");
    (tmp, lab, client)
}
