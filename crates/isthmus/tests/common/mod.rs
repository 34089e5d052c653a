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
