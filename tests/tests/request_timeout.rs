//! A mirrored Service's request timeout through the real binaries: an app under
//! capture calls `hello`, whose ServiceMirror says
//! `timeout.isthmus.io/request: 200ms`, and the only endpoint never answers. The
//! app gets `504` at the deadline, and the endpoint's connection ends: the far side
//! sees the request go.
//!
//! The world: the sidecar pod (198.18.0.2, capture by `isthmus-init`) and, in the
//! server namespace (198.18.0.1), cluster-b's gateway on :4143, cluster-a's gateway
//! on :5143 and the silent endpoint on its loopback. Needs root, like every test
//! here.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use isthmus_test_support::eventually_blocking;
use isthmus_tests::binary::binary;
use isthmus_tests::identity::Pki;
use isthmus_tests::multicluster::{NAMESPACE, gateway_id, link, service, settings_in};
use isthmus_tests::pod::{self, SidecarPod};
use isthmus_vocab::SpiffeId;

const TIMEOUT: Duration = Duration::from_millis(200);
/// The silent endpoint, on the server namespace's loopback.
const ENDPOINT: &str = "127.0.0.1:8080";
/// Each cluster's gateway and its admin server (cluster-a's probed by cluster-b's
/// Link), both in the server namespace.
const GATEWAYS: [(&str, &str, &str); 2] = [
    ("cluster-a", GATEWAY_A, "127.0.0.1:5191"),
    ("cluster-b", GATEWAY_B, "127.0.0.1:4192"),
];
const GATEWAY_A: &str = "198.18.0.1:5143";
const GATEWAY_B: &str = "198.18.0.1:4143";
/// Mirrored Services get addresses here: on the pod's own link, so the app's
/// connect is routed (and then captured).
const SERVICE_CIDR: &str = "198.18.0.128/25";
/// Generous for a debug build on a shared machine.
const SETTLE: Duration = Duration::from_secs(30);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// cluster-b's settings as the sidecar reads them: its gateway, and where
/// mirrored Services get their addresses.
fn sidecar_settings() -> String {
    let id = gateway_id("cluster-b").to_string();
    let settings = settings_in(NAMESPACE, "cluster-b", addr(GATEWAY_B), &id);
    settings.replace(
        "  trustDomain: cluster.local\n",
        &format!("  trustDomain: cluster.local\n  serviceCIDR: {SERVICE_CIDR}\n"),
    )
}

fn mirror() -> String {
    format!(
        "apiVersion: linkerd.io/v1alpha1
kind: ServiceMirror
metadata:
  name: hello-mirror
  namespace: default
  annotations:
    timeout.isthmus.io/request: {}ms
spec:
  cluster: cluster-a
  service: {{name: hello, namespace: default}}
",
        TIMEOUT.as_millis()
    )
}

fn write_all(dir: &Path, files: &[(&str, String)]) {
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// Accepts connections and never answers; tells `ended` when one closes.
fn silent_endpoint(listener: TcpListener, ended: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let ended = ended.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                let _ = ended.send(());
            });
        }
    });
}

/// The mirrored `hello`'s address, once the sidecar's `/config` routes it (the
/// only Service it knows, so the first key of its address index).
fn mirrored_address(pod: &SidecarPod) -> Option<SocketAddr> {
    let config: String = pod.admin("/config").ok()?.split_whitespace().collect();
    let (_, rest) = config.split_once("\"addresses\":{\"")?;
    let (key, _) = rest.split_once('"')?;
    key.parse().ok()
}

/// `GET /` to `hello` from the app: its answer's head and how long it took;
/// `None` if the connection failed or was reset (a refused stream).
fn get(pod: &SidecarPod, hello: SocketAddr) -> Option<(String, Duration)> {
    pod.pod.run(|| {
        let mut stream = TcpStream::connect_timeout(&hello, SETTLE).ok()?;
        stream.set_read_timeout(Some(SETTLE)).ok()?;
        let started = Instant::now();
        write!(stream, "GET / HTTP/1.1\r\nHost: hello\r\n\r\n").ok()?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return None,
            }
        }
        Some((
            String::from_utf8_lossy(&head).into_owned(),
            started.elapsed(),
        ))
    })
}

#[test]
fn a_request_past_its_services_timeout_gets_504_and_the_endpoint_sees_it_end() {
    let pki = Pki::new("request timeout anchor");
    let frontend = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/frontend").unwrap();
    let leaf = pki.leaf("cluster-b", &frontend);
    let mint = |dir: &Path| drop(leaf.write_dir(dir, false).unwrap());
    let mut pod = SidecarPod::start(mint, &["--reload-interval", "200ms"]).unwrap();

    let (ended_tx, ended) = mpsc::channel();
    silent_endpoint(
        pod.server.run(|| TcpListener::bind(ENDPOINT)).unwrap(),
        ended_tx,
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_all(
        &root.join("manifests-a"),
        &[
            (
                "settings.yaml",
                isthmus_tests::multicluster::cluster_settings("cluster-a", addr(GATEWAY_A)),
            ),
            ("hello.yaml", service("hello", addr(ENDPOINT), true)),
        ],
    );
    write_all(
        &root.join("manifests-b"),
        &[
            (
                "settings.yaml",
                isthmus_tests::multicluster::cluster_settings("cluster-b", addr(GATEWAY_B)),
            ),
            (
                "link.yaml",
                link("cluster-a", addr(GATEWAY_A), addr(GATEWAYS[0].2)),
            ),
        ],
    );
    let mut logs = vec![pod.log.clone()];
    for (cluster, listen, admin) in GATEWAYS {
        let name = &cluster[cluster.len() - 1..];
        let identity = root.join(format!("identity-{name}"));
        pki.leaf(cluster, &gateway_id(cluster))
            .write_dir(&identity, false)
            .unwrap();
        let log = root.join(format!("gateway-{name}.log"));
        let mut cmd = Command::new(binary("isthmus-proxy"));
        cmd.args(["gateway", "--cluster", cluster, "--identity-dir"])
            .arg(&identity)
            .arg("--manifests")
            .arg(root.join(format!("manifests-{name}")))
            .args(["--inbound-addr", listen, "--admin-addr", admin])
            .args(["--allow-local-endpoints", "--reload-interval", "200ms"])
            .args(["--log", "info,proxy_core=debug"])
            .env_clear();
        // As root, like a cluster's gateway pod: only the sidecar runs as the proxy UID.
        let child = pod.server.spawn_logged_as(cmd, 0, 0, &log).unwrap();
        pod.lab.adopt(child);
        logs.push(log);
    }
    let _show = ShowLogs(logs);

    // The sidecar learns cluster-a's view, the mirror, and its gateway.
    write_all(
        &pod.manifests,
        &[
            ("settings.yaml", sidecar_settings()),
            (
                "link.yaml",
                link("cluster-a", addr(GATEWAY_A), addr(GATEWAYS[0].2)),
            ),
            (
                "clusters/cluster-a/settings.yaml",
                isthmus_tests::multicluster::cluster_settings("cluster-a", addr(GATEWAY_A)),
            ),
            (
                "clusters/cluster-a/hello.yaml",
                service("hello", addr(ENDPOINT), true),
            ),
            ("mirror.yaml", mirror()),
        ],
    );
    // The sidecar dials the gateway its settings named when it started.
    pod.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    eventually_blocking("the first sidecar to exit", SETTLE, || {
        (!pod.running()).then_some(())
    });
    pod.restart().unwrap();
    let hello = eventually_blocking("the sidecar to route the mirrored hello", SETTLE, || {
        mirrored_address(&pod)
    });
    let config: String = pod.admin("/config").unwrap().split_whitespace().collect();
    assert!(
        config.contains("\"request_timeout\":\"200ms\""),
        "the route's policy is not on /config: {config}"
    );

    // Until the gateways' link is up a request may be refused (the app is reset):
    // wait for the first answer, which must be the deadline's 504.
    let (head, elapsed) = eventually_blocking("an answer through the gateways", SETTLE, || {
        get(&pod, hello)
    });
    println!("figure: request_timeout_504 {elapsed:?} for a {TIMEOUT:?} timeout");
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(
        elapsed >= TIMEOUT,
        "answered before the deadline: {elapsed:?}"
    );
    // Generous slack for a loaded machine; the figure itself is printed above.
    assert!(elapsed < TIMEOUT * 5, "504 only after {elapsed:?}");
    // The endpoint's connection ends: the stream was reset, not left hanging.
    ended
        .recv_timeout(SETTLE)
        .expect("the silent endpoint's connection did not end after the 504");
    pod.expect_metric("request_timeouts_total", &[], 1.0, "one request timed out");
}

/// Prints the gateways' and the sidecar's logs when the test fails.
struct ShowLogs(Vec<std::path::PathBuf>);

impl Drop for ShowLogs {
    fn drop(&mut self) {
        pod::show_logs_if_failing(&self.0);
    }
}
