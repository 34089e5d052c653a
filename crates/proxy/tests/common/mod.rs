//! Helpers shared by the integration tests that run the real `isthmus-proxy` binary
//! on loopback: starting the standalone role, the child's kill-on-drop cleanup, free
//! ports, a minted identity, an echo server and a CONNECT tunnel.
//!
//! Deliberately not here: each suite's fixtures and readiness checks, and the
//! gateway and sidecar roles' command lines (their flags differ per suite) and origin servers whose answers a suite
//! asserts on. Each test binary uses a subset, hence `dead_code` is allowed.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use isthmus_tests::multicluster::gateway_id;
use isthmus_vocab::SpiffeId;
use proxy_identity::mint::{self, KeyAlgorithm, LeafBundle, Validity};
use proxy_identity::rustls::pki_types::CertificateDer;
use proxy_identity::rustls::pki_types::pem::PemObject;

/// Bound of every wait: a debug build on a busy machine.
pub const STEP: Duration = Duration::from_secs(10);

/// Kills and reaps `child`; when the test is failing, prints its log so the
/// failure shows what the proxy saw. Meant for the `Drop` of a proxy guard.
pub fn stop_and_show_log(child: &mut Child, log: &Path) {
    let _ = child.kill();
    let _ = child.wait();
    if std::thread::panicking() {
        eprintln!(
            "--- proxy log ---\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// Starts `isthmus-proxy standalone` as cluster-b with the identity and manifests
/// directories given, its explicit proxy on `listen` and admin on `admin`, then
/// `extra` flags; only these flags configure it (the environment is cleared), and
/// its stderr goes to `log`. Does not wait for readiness: each suite probes it its
/// own way.
pub fn spawn_standalone(
    identity: &Path,
    manifests: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    extra: &[&str],
    log: &Path,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_isthmus-proxy"))
        .args(["standalone", "--cluster", "cluster-b", "--identity-dir"])
        .arg(identity)
        .arg("--manifests")
        .arg(manifests)
        .args(["--outbound-addr", &listen.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(extra)
        .env_clear()
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
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
    let validity = Validity::from_now(Duration::from_secs(3600));
    let anchor = mint::trust_anchor("test anchor", validity, KeyAlgorithm::EcdsaP256).unwrap();
    let issuer = mint::issuer(&anchor, "cluster-b", validity, KeyAlgorithm::EcdsaP256).unwrap();
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/dev").unwrap();
    mint::leaf(&issuer, &id, validity, KeyAlgorithm::EcdsaP256)
        .unwrap()
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

/// `cluster`'s gateway leaf under `issuer`, valid from a minute ago until `lifetime`
/// from now: the expiry tests watch it run out.
pub fn short_lived_gateway_leaf(
    issuer: &mint::CertificateAuthority,
    cluster: &str,
    lifetime: Duration,
) -> LeafBundle {
    let now = SystemTime::now();
    let validity = Validity {
        not_before: now - Duration::from_secs(60),
        not_after: now + lifetime,
    };
    mint::leaf(
        issuer,
        &gateway_id(cluster),
        validity,
        KeyAlgorithm::EcdsaP256,
    )
    .unwrap()
}

/// The certificates of a PEM bundle, in order.
pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}
