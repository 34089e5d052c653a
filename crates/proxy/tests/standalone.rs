//! The standalone role as a user runs it: the real binary on loopback, used as an
//! explicit proxy (CONNECT and absolute-form requests).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Proxy, STEP, connect_through, echo, free_port, mint_identity, read_head, serve_each,
    spawn_standalone, write_files,
};

/// A tiny HTTP/1.1 origin that answers every request with its request line.
fn origin() -> SocketAddr {
    serve_each(|mut stream| {
        stream.set_read_timeout(Some(STEP)).unwrap();
        let Some(head) = read_head(&mut stream) else {
            return;
        };
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or_default().to_owned();
        let body = format!("origin saw: {line}\n");
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    })
}

fn start(dir: &Path) -> (Proxy, SocketAddr, SocketAddr) {
    start_with(dir, &[])
}

fn start_with(dir: &Path, extra: &[&str]) -> (Proxy, SocketAddr, SocketAddr) {
    let identity = dir.join("identity");
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    mint_identity(&identity);
    // A test may have written its own settings first.
    if !manifests.join("settings.yaml").exists() {
        write_files(
            &manifests,
            &[(
                "settings.yaml",
                "apiVersion: multicluster.isthmus.io/v1alpha1\nkind: ClusterSettings\nmetadata: {name: cluster-b}\nspec: {clusterName: cluster-b}\n",
            )],
        );
    }
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = dir.join("proxy.log");
    let proxy = spawn_standalone(&identity, &manifests, listen, admin, extra, &log);
    let deadline = Instant::now() + STEP;
    while !get(admin, "/ready").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "the proxy never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    (proxy, listen, admin)
}

/// Sends `request` and reads until the server closes (bounded by [`STEP`]).
fn exchange(addr: SocketAddr, request: &str) -> String {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, STEP) else {
        return String::new();
    };
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

fn get(addr: SocketAddr, path: &str) -> String {
    exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"),
    )
}

#[test]
fn explicit_requests_pass_through_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (_proxy, listen, admin) = start(dir.path());
    let origin = origin();

    let absolute = exchange(
        listen,
        &format!(
            "GET http://{origin}/hello?x=1 HTTP/1.1\r\nhost: {origin}\r\nconnection: close\r\n\r\n"
        ),
    );
    assert!(absolute.starts_with("HTTP/1.1 200"), "{absolute}");
    // The origin sees origin form, as if the client had connected to it directly.
    assert!(
        absolute.contains("origin saw: GET /hello?x=1 HTTP/1.1"),
        "{absolute}"
    );

    let mut tunnel = connect_through(listen, origin);
    write!(tunnel, "GET /through HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut rest = String::new();
    let _ = tunnel.read_to_string(&mut rest);
    assert!(rest.contains("origin saw: GET /through"), "{rest}");

    let metrics = get(admin, "/metrics");
    let counted = format!("http_requests_total{{direction=\"outbound\",authority=\"{origin}\"}} 2");
    assert!(
        metrics.contains(&counted),
        "missing {counted} in\n{metrics}"
    );
}

#[test]
fn unreachable_targets_are_refused_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_proxy, listen, admin) = start(dir.path());
    let closed = free_port();

    let refused = exchange(
        listen,
        &format!("CONNECT 127.0.0.1:{closed} HTTP/1.1\r\nhost: x\r\n\r\n"),
    );
    assert!(refused.starts_with("HTTP/1.1 502"), "{refused}");
    assert!(
        refused.contains("isthmus-refusal: upstream_refused"),
        "{refused}"
    );

    let malformed = exchange(listen, "GET /no/authority HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");

    let config = get(admin, "/config");
    assert!(config.contains("\"role\": \"standalone\""), "{config}");
}

#[test]
fn sigterm_stops_accepting_and_lets_open_connections_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proxy, listen, admin) = start_with(dir.path(), &["--shutdown-grace", "30s"]);
    let echo = echo();
    let mut open = connect_through(listen, echo);
    open.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).unwrap();

    proxy.terminate();
    // Draining: the listener is closed at once, so new clients are refused.
    let deadline = Instant::now() + STEP;
    while TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the listener kept accepting after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !get(admin, "/ready").starts_with("HTTP/1.1 200"),
        "still ready while draining"
    );
    // The connection that was open keeps working until its client is done.
    open.write_all(b"during").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"during");
    assert!(proxy.running(), "exited with a connection open");
    drop(open);
    let status = proxy.wait_exit_blocking(STEP);
    assert!(status.success(), "{status}");
}

#[test]
fn sigterm_cuts_connections_still_open_when_the_grace_period_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proxy, listen, _admin) = start_with(dir.path(), &["--shutdown-grace", "500ms"]);
    let echo = echo();
    let mut open = connect_through(listen, echo);
    proxy.terminate();
    // Fails the test naming the process when it does not exit.
    proxy.wait_exit_blocking(STEP);
    // The cut connection ends (EOF or reset) instead of hanging.
    let mut rest = Vec::new();
    let _ = open.read_to_end(&mut rest);
}

/// A gateway the settings name by DNS name (a Service name in a cluster) is
/// resolved, and kept resolved; `localhost` resolves from the hosts file, without
/// a query.
#[test]
fn a_gateway_named_by_dns_name_is_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let port = free_port();
    write_files(
        &manifests,
        &[(
            "settings.yaml",
            &format!(
                "apiVersion: multicluster.isthmus.io/v1alpha1\nkind: ClusterSettings\nmetadata: {{name: cluster-b}}\n\
             spec:\n  clusterName: cluster-b\n  gateway: {{address: localhost, port: {port}, \
             identity: 'spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway'}}\n"
            ),
        )],
    );
    let (_proxy, _listen, admin) = start(dir.path());
    // The lookup runs beside the start: wait for its answer on /config.
    let loopback = [format!("127.0.0.1:{port}"), format!("[::1]:{port}")];
    let deadline = Instant::now() + STEP;
    loop {
        let compact: String = get(admin, "/config").split_whitespace().collect();
        let resolved = |addr: &String| compact.contains(&format!("\"addresses\":[\"{addr}\""));
        if compact.contains(&format!("\"addr\":\"localhost:{port}\""))
            && loopback.iter().any(resolved)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "localhost not resolved: {compact}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
