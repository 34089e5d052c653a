//! What the suites that run the standalone `isthmus-proxy` on loopback share: its
//! command line (on the test-support process fixture), free ports, a minted
//! identity, an echo server and a CONNECT tunnel.
//!
//! Deliberately not here: each suite's fixtures and readiness checks, and the
//! gateway and sidecar roles' command lines (their flags differ per suite) and origin servers whose answers a suite
//! asserts on. Each test binary uses a subset, hence `dead_code` is allowed.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;

pub use isthmus_test_support::{Pki, Proxy, STEP};

/// Starts `isthmus-proxy standalone` as cluster-b with the identity and manifests
/// directories given, its explicit proxy on `listen` and admin on `admin`, then
/// `extra` flags; its stderr goes to `log`. Does not wait for readiness: each suite
/// probes it its own way.
pub fn spawn_standalone(
    identity: &Path,
    manifests: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    extra: &[&str],
    log: &Path,
) -> Proxy {
    Proxy::command(
        env!("CARGO_BIN_EXE_isthmus-proxy"),
        "standalone",
        "cluster-b",
        identity,
        manifests,
        admin,
        log.to_owned(),
    )
    .args(["--outbound-addr", &listen.to_string()])
    .args(extra.iter().copied())
    .start()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a fresh leaf for `spiffe://cluster.local/ns/default/sa/dev`, issued for
/// cluster-b under a new trust anchor, into `dir` (valid for an hour).
pub fn mint_identity(dir: &Path) {
    Pki::new("test anchor")
        .leaf("cluster-b", "spiffe://cluster.local/ns/default/sa/dev")
        .write_dir(dir, false)
        .unwrap();
}

/// A TCP echo server on loopback; it lives as long as the test binary.
pub fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut stream);
            });
        }
    });
    addr
}

/// Opens a CONNECT tunnel through the proxy at `listen` to `target` and returns the
/// stream after the `200` head; fails the test on any other answer.
pub fn connect_through(listen: SocketAddr, target: SocketAddr) -> TcpStream {
    let mut tunnel = TcpStream::connect_timeout(&listen, STEP).unwrap();
    tunnel.set_read_timeout(Some(STEP)).unwrap();
    write!(
        tunnel,
        "CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tunnel.read(&mut byte).unwrap(),
            1,
            "CONNECT answer cut short"
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tunnel
}
