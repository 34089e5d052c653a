//! Faults a proxy must survive without losing its state, with the real binary on
//! loopback (the standalone role, which needs no capture):
//!
//! - the discovery directory truncated mid-file, holding a duplicate object, and
//!   deleted: the last good state keeps serving, the failure is on `/config` and in
//!   the `discovery_*` metrics, and the serving state's age keeps growing;
//! - the admin port is read-only: only `GET`/`HEAD` of `/metrics`, `/ready`,
//!   `/live` and `/config` answer, every other method or path is refused, and
//!   nothing a client sends there changes what the proxy serves.
//!
//! Faults that need capture or network namespaces (a killed sidecar, a black-holed
//! peer, load) live in `tests/tests/faults.rs` and `tests/tests/load.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    STEP, connect_through, echo, free_port, mint_identity, spawn_standalone, write_files,
};
use isthmus_test_support::cases::fuzz_corpus;
use isthmus_test_support::{Metrics, Proxy, eventually_blocking};

/// The proxy under test and where it listens.
struct Standalone {
    process: Proxy,
    listen: SocketAddr,
    admin: SocketAddr,
    manifests: PathBuf,
}

const SETTINGS: &str = "apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata: {name: cluster-b, namespace: isthmus}
spec: {clusterName: cluster-b}
";

/// A Service with its Endpoints: big enough that cutting it in half breaks it.
const HELLO: &str = "apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: default
spec:
  ports:
  - port: 80
    protocol: TCP
    targetPort: 8080
---
apiVersion: v1
kind: Endpoints
metadata:
  name: hello
  namespace: default
subsets:
- addresses:
  - ip: '127.0.0.1'
  ports:
  - port: 8080
    protocol: TCP
";

fn start(dir: &Path, extra: &[&str]) -> Standalone {
    let identity = dir.join("identity");
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    mint_identity(&identity);
    write_files(
        &manifests,
        &[("settings.yaml", &SETTINGS), ("hello.yaml", &HELLO)],
    );
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = dir.join("proxy.log");
    // A test that sets its own reload interval replaces the fast default.
    let mut flags: Vec<&str> = Vec::new();
    if !extra.contains(&"--reload-interval") {
        flags.extend(["--reload-interval", "100ms"]);
    }
    flags.extend(extra);
    let process = spawn_standalone(&identity, &manifests, listen, admin, &flags, &log);
    let proxy = Standalone {
        process,
        listen,
        admin,
        manifests,
    };
    let deadline = Instant::now() + STEP;
    while proxy.request("GET", "/ready").0 != 200 {
        assert!(Instant::now() < deadline, "the proxy never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy
}

impl Standalone {
    /// `method path` on the admin port: the status (0 when nothing answered) and body.
    fn request(&self, method: &str, path: &str) -> (u16, String) {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.admin, STEP) else {
            return (0, String::new());
        };
        stream.set_read_timeout(Some(STEP)).unwrap();
        let body = if method == "GET" || method == "HEAD" {
            ""
        } else {
            "level=trace"
        };
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    fn config(&self) -> serde_json::Value {
        let (status, body) = self.request("GET", "/config");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn metrics(&self) -> String {
        let (status, body) = self.request("GET", "/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    fn running(&mut self) -> bool {
        self.process.running()
    }
}

/// The value of the one sample named exactly `name`, if there is one.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    Metrics::parse(metrics).get(name, &[])
}

fn services(config: &serde_json::Value) -> Vec<String> {
    config["discovery"]["snapshot"]["services"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| {
                    format!(
                        "{}/{}",
                        s["metadata"]["namespace"].as_str().unwrap_or_default(),
                        s["metadata"]["name"].as_str().unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A CONNECT tunnel through the proxy to `target` carries one round trip.
fn carries_traffic(listen: SocketAddr, target: SocketAddr) {
    let mut tunnel = connect_through(listen, target);
    tunnel.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    tunnel.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
}

/// Waits until the failure shows on `/config` and in the metrics; checks the
/// serving state is the last good one, and returns the error text.
fn expect_stale(proxy: &Standalone, generation: &serde_json::Value, echo: SocketAddr) -> String {
    let status = eventually_blocking("the failed reload to show on /config", STEP, || {
        let status = proxy.config()["discovery"]["status"].clone();
        (status["stale"] == true).then_some(status)
    });
    assert_eq!(
        &status["generation"], generation,
        "a failed reload was published: {status:#}"
    );
    let config = proxy.config();
    assert_eq!(
        services(&config),
        ["default/hello"],
        "the last good state no longer serves: {config:#}"
    );
    let metrics = proxy.metrics();
    assert_eq!(sample(&metrics, "discovery_stale"), Some(1.0), "{metrics}");
    assert!(
        sample(&metrics, "discovery_reload_failures_total").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    carries_traffic(proxy.listen, echo);
    status["last_error"].as_str().unwrap_or_default().to_owned()
}

/// Restores a good directory and waits until it is published and fresh again.
fn expect_recovered(proxy: &Standalone) -> serde_json::Value {
    let status = eventually_blocking("the repaired directory to be published", STEP, || {
        let status = proxy.config()["discovery"]["status"].clone();
        (status["stale"] == false).then_some(status)
    });
    let metrics = proxy.metrics();
    assert_eq!(sample(&metrics, "discovery_stale"), Some(0.0), "{metrics}");
    status["generation"].clone()
}

#[test]
fn a_broken_discovery_directory_keeps_the_last_good_state_and_exports_its_age() {
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start(dir.path(), &[]);
    let echo = echo();
    let config = proxy.config();
    assert_eq!(services(&config), ["default/hello"], "{config:#}");
    let mut generation = config["discovery"]["status"]["generation"].clone();
    let metrics = proxy.metrics();
    for name in [
        "discovery_last_good_age_seconds",
        "discovery_last_good_load_timestamp_seconds",
        "discovery_stale",
        "discovery_generation",
        "discovery_reload_failures_total",
    ] {
        assert!(sample(&metrics, name).is_some(), "no {name}:\n{metrics}");
    }
    assert_eq!(sample(&metrics, "discovery_stale"), Some(0.0));
    let loaded_at = sample(&metrics, "discovery_last_good_load_timestamp_seconds").unwrap();

    // Truncated: half a file, as a writer that died mid-write leaves it.
    let hello = proxy.manifests.join("hello.yaml");
    std::fs::write(&hello, &HELLO[..HELLO.len() / 2 + 7]).unwrap();
    let error = expect_stale(&proxy, &generation, echo);
    assert!(
        error.contains("hello.yaml"),
        "the error names the file: {error}"
    );
    let age_then = sample(&proxy.metrics(), "discovery_last_good_age_seconds").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let metrics = proxy.metrics();
    let age_now = sample(&metrics, "discovery_last_good_age_seconds").unwrap();
    assert!(
        age_now >= age_then + 1.0,
        "the age of a stale state grows: {age_then} then {age_now}"
    );
    assert_eq!(
        sample(&metrics, "discovery_last_good_load_timestamp_seconds"),
        Some(loaded_at),
        "a failed reload moved the time of the last good load"
    );
    eprintln!("truncated file: {error}; last good state {age_now:.1}s old");
    std::fs::write(&hello, HELLO).unwrap();
    generation = expect_recovered(&proxy);

    // Duplicated: a second definition of the same Service in another file.
    let copy = proxy.manifests.join("hello-copy.yaml");
    std::fs::write(&copy, HELLO).unwrap();
    let error = expect_stale(&proxy, &generation, echo);
    assert!(
        error.contains("hello-copy.yaml") && error.contains("already defined"),
        "the error names both definitions: {error}"
    );
    eprintln!("duplicated Service: {error}");
    std::fs::remove_file(&copy).unwrap();
    generation = expect_recovered(&proxy);

    // Deleted: the whole directory goes away (a ConfigMap unmounted).
    let aside = dir.path().join("manifests-aside");
    std::fs::rename(&proxy.manifests, &aside).unwrap();
    let error = expect_stale(&proxy, &generation, echo);
    assert!(
        error.contains(&proxy.manifests.display().to_string()),
        "the error names the directory: {error}"
    );
    eprintln!("deleted directory: {error}");
    std::fs::rename(&aside, &proxy.manifests).unwrap();
    // The same contents as the last good state: serving it again is enough.
    eventually_blocking("the restored directory to clear the failure", STEP, || {
        let status = proxy.config()["discovery"]["status"].clone();
        (status["stale"] == false).then_some(())
    });
    assert!(proxy.running(), "the proxy exited on a broken directory");
}

#[test]
fn the_admin_port_serves_probes_and_scrapes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start(dir.path(), &[]);
    let echo = echo();
    let readable = ["/metrics", "/ready", "/live", "/config"];
    for path in readable {
        for method in ["GET", "HEAD"] {
            assert_eq!(proxy.request(method, path).0, 200, "{method} {path}");
        }
    }
    let before = proxy.config();

    // What other proxies' admin ports offer, and what a careless one might.
    let state_changing = [
        "/shutdown",
        "/quitquitquit",
        "/drain",
        "/log-level",
        "/logging",
        "/proxy-log-level",
        "/reload",
        "/config",
        "/ready",
        "/live",
        "/metrics",
        "/debug/pprof/profile",
        "/admin",
        "/",
    ];
    let mut refused = 0;
    for path in state_changing {
        for method in ["POST", "PUT", "DELETE", "PATCH"] {
            let (status, body) = proxy.request(method, path);
            assert!(
                status == 405 || status == 404,
                "{method} {path} answered {status}: {body}"
            );
            refused += 1;
        }
        if !readable.contains(&path) {
            let (status, body) = proxy.request("GET", path);
            assert_eq!(status, 404, "GET {path}: {body}");
            refused += 1;
        }
    }
    for path in ["/ready?shutdown=1", "/config?log=trace"] {
        assert_eq!(proxy.request("GET", path).0, 200, "GET {path}");
    }

    // Nothing changed: still running, ready, serving the same state and traffic.
    assert!(proxy.running(), "the proxy exited");
    assert_eq!(proxy.request("GET", "/ready").0, 200);
    assert_eq!(proxy.config(), before, "/config changed");
    carries_traffic(proxy.listen, echo);
    let log = proxy.process.log_text();
    assert!(
        !log.contains("shutting down"),
        "an admin request started a shutdown:\n{log}"
    );
    eprintln!("admin port: {refused} state-changing or unknown requests refused");
}

/// Descriptors and resident set of process `pid` (KiB), from `/proc`.
fn footprint(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (fds, rss)
}

#[test]
fn every_fuzzed_manifest_fed_to_a_live_proxy_leaves_it_serving() {
    let inputs = fuzz_corpus("manifest");
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = start(dir.path(), &["--reload-interval", "10ms"]);
    let echo = echo();
    let (fds_before, rss_before) = footprint(proxy.process.pid());
    let target = proxy.manifests.join("fuzzed.yaml");
    let (mut published, mut refused, mut unnoticed) = (0, 0, 0);
    let started = Instant::now();
    for input in &inputs {
        assert!(started.elapsed() < STEP * 12, "the corpus took too long");
        let status = |p: &Standalone| {
            let status = p.config()["discovery"]["status"].clone();
            (
                status["generation"].clone(),
                status["failed_reloads"].clone(),
            )
        };
        let before = status(&proxy);
        std::fs::write(&target, std::fs::read(input).unwrap()).unwrap();
        // A load or a refusal, whichever comes; a read error identical to the
        // previous one is reported once, so an unchanged status is possible.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let now = status(&proxy);
            if now.0 != before.0 {
                published += 1;
                break;
            }
            if now.1 != before.1 {
                refused += 1;
                break;
            }
            if Instant::now() >= deadline {
                unnoticed += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            proxy.running(),
            "the proxy died on {}:\n{}",
            input.display(),
            proxy.process.log_text()
        );
    }
    std::fs::remove_file(&target).unwrap();
    eventually_blocking(
        "the directory without the fuzzed file to serve",
        STEP,
        || {
            let config = proxy.config();
            (config["discovery"]["status"]["stale"] == false
                && services(&config) == ["default/hello"])
            .then_some(())
        },
    );
    carries_traffic(proxy.listen, echo);
    let (fds_after, rss_after) = footprint(proxy.process.pid());
    eprintln!(
        "FIGURE hostile_manifests = {} fuzzed manifests fed to a live proxy: {published} published, \
         {refused} refused, {unnoticed} unchanged; 0 crashes; descriptors {fds_before} -> \
         {fds_after}; RSS {rss_before} -> {rss_after} KiB",
        inputs.len()
    );
    assert!(
        fds_after <= fds_before + 2,
        "descriptors {fds_before} -> {fds_after}"
    );
}
