//! Running the `isthmus` binary from a test: in a clean environment, with its
//! stdin given, and reading its multi-document output.

// Each test binary uses a subset of these.
#![allow(dead_code)]

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

/// Runs `isthmus ARGS` with `stdin`, in a clean environment.
pub fn run(args: &[&str], stdin: &str) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_isthmus"));
    command.env_clear().args(args);
    pipe(command, stdin)
}

/// How long an `isthmus` run may take on a loaded machine.
pub const STEP: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `isthmus ARGS` without blocking the runtime a test API server runs on,
/// killed after [`STEP`].
pub async fn run_async(args: &[&str]) -> Output {
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .env_clear()
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(STEP, cmd).await.unwrap().unwrap()
}

/// Runs `command` with `stdin` written to it, and collects its output.
pub fn pipe(mut command: Command, stdin: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The stdout of `isthmus ARGS`, which must succeed.
pub fn ok(args: &[&str], stdin: &str) -> String {
    let out = run(args, stdin);
    assert!(
        out.status.success(),
        "isthmus {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The documents of `text`, empty ones left out.
pub fn docs(text: &str) -> Vec<serde_yaml_ng::Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|de| serde::Deserialize::deserialize(de).unwrap())
        .filter(|v: &serde_yaml_ng::Value| !v.is_null())
        .collect()
}
