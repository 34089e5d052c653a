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
    let kubeconfig = server.write_kubeconfig(dir.path()).unwrap();
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
async fn json_or_plain_logs_without_colour() {
    for format in ["json", "plain"] {
        let lines = lines_until(format, "reconciling ServiceMirrors").await;
        for line in &lines {
            assert!(
                !line.contains('\u{1b}'),
                "a colour code in a log file: {line:?}"
            );
            let json = serde_json::from_str::<serde_json::Value>(line);
            match format {
                "json" => {
                    let object =
                        json.unwrap_or_else(|e| panic!("not a JSON object a line ({e}): {line:?}"));
                    assert!(object["level"].is_string() && object["fields"].is_object());
                }
                _ => assert!(json.is_err(), "{line}"),
            }
        }
    }
}
