//! The controller logs as the other binaries do: `ISTHMUS_LOG` filters,
//! `ISTHMUS_LOG_FORMAT=json` gives one JSON object a line, and no colour codes
//! reach a log that is not a terminal.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use test_apiserver::TestApiServer;

/// The controller's stderr lines up to the first that contains `wanted` (bounded).
async fn lines_until(format: &str, wanted: &str) -> Vec<String> {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        serde_yaml_ng::to_string(&server.kubeconfig()).unwrap(),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_isthmus-controller"))
        .env_clear()
        .env("KUBECONFIG", &kubeconfig)
        .env("ISTHMUS_LOG", "info")
        .env("ISTHMUS_LOG_FORMAT", format)
        .args([
            "run",
            "--cluster",
            "cluster-b",
            "--namespace",
            "isthmus",
            "--no-leader-election",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let until = wanted.to_owned();
    // The API server answers on this runtime: wait off it.
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
            let done = line.contains(&until);
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.last().is_some_and(|l| l.contains(wanted)),
        "no log line with {wanted:?} within 20 s: {lines:?}"
    );
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_one_object_a_line_without_colour() {
    let lines = lines_until("json", "reconciling ServiceMirrors").await;
    for line in &lines {
        assert!(
            !line.contains('\u{1b}'),
            "a colour code in a log file: {line:?}"
        );
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object a line ({e}): {line:?}"));
        assert!(
            object["level"].is_string() && object["fields"].is_object(),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_logs_have_no_colour_off_a_terminal() {
    let lines = lines_until("plain", "reconciling ServiceMirrors").await;
    for line in &lines {
        assert!(
            !line.contains('\u{1b}'),
            "a colour code in a log file: {line:?}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(line).is_err());
    }
}
