//! An own leaf that runs out while the proxy runs: a real `isthmus-proxy gateway` on
//! loopback whose leaf is minted at test time to expire a few seconds after start.
//!
//! The test process plays both of the gateway's TLS peers and counts the gateway's
//! certificates it sees: a client of its tunnel listener (the gateway as server), and
//! the peer gateway its Link points at (the gateway's link pool as client, to a
//! server that asks for a certificate without requiring one, so a handshake without
//! one is seen and counted). Before notAfter both see the leaf; after it, none may.
//! `/ready` is polled every 100 ms and must turn false within 1 s of notAfter; a
//! fresh leaf written to the identity directory must bring everything back.
#![allow(clippy::unwrap_used)]

mod common;

use common::write_files;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use isthmus_test_support::pki::{
    AcceptAnything, certs, client_builder_with, not_after, private_key, short_lived,
};
use isthmus_test_support::proxy::{free_addr, get_blocking};
use isthmus_test_support::{Metrics, Pki, Presented, Proxy, STEP, eventually_blocking};
use isthmus_tests::multicluster::{cluster_settings, gateway_id, link};
use proxy_identity::mint::LeafBundle;
use proxy_identity::rustls::pki_types::ServerName;
use proxy_identity::rustls::{ClientConnection, ServerConfig, ServerConnection};

/// How long the short leaf lives after it is minted: the gateway must start and be
/// seen presenting it first.
const LIFETIME: Duration = Duration::from_secs(8);
/// How long handshakes are attempted after notAfter.
const AFTER_EXPIRY: Duration = Duration::from_secs(4);

/// What one handshake showed: when its TCP connection was made (before the
/// gateway chose a certificate) and whether the gateway presented one.
#[derive(Clone, Copy, Debug)]
struct Seen {
    at: SystemTime,
    presented: bool,
}

/// One handshake with the gateway's tunnel listener as a client presenting
/// `client` (a valid peer identity): did the gateway present a certificate?
fn handshake_as_client(addr: SocketAddr, client: &LeafBundle) -> Seen {
    let counter = Arc::new(AcceptAnything::default());
    let mut config = client_builder_with(counter.clone())
        .with_client_auth_cert(certs(&client.cert_chain_pem), private_key(&client.key_pem))
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let at = SystemTime::now();
    let mut sock = TcpStream::connect_timeout(&addr, STEP).unwrap();
    sock.set_read_timeout(Some(STEP)).unwrap();
    let mut conn =
        ClientConnection::new(Arc::new(config), ServerName::IpAddress(addr.ip().into())).unwrap();
    while conn.is_handshaking() {
        if conn.complete_io(&mut sock).is_err() {
            break;
        }
    }
    Seen {
        at,
        presented: counter.server_certs_seen() > 0,
    }
}

/// The peer gateway the Link points at: completes handshakes (certificate
/// optional), records whether the gateway's link pool presented one, and keeps each
/// connection a little over a second (so the pool counts it healthy and reconnects
/// at once when it is closed, rather than backing off).
fn fake_peer(listener: TcpListener, config: Arc<ServerConfig>, seen: Arc<Mutex<Vec<Seen>>>) {
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            let at = SystemTime::now();
            let config = config.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                sock.set_read_timeout(Some(STEP)).unwrap();
                let mut conn = ServerConnection::new(config).unwrap();
                while conn.is_handshaking() {
                    if conn.complete_io(&mut sock).is_err() {
                        return;
                    }
                }
                seen.lock().unwrap().push(Seen {
                    at,
                    presented: conn.peer_certificates().is_some_and(|c| !c.is_empty()),
                });
                sock.set_read_timeout(Some(Duration::from_millis(1100)))
                    .unwrap();
                let mut sink = [0u8; 4096];
                let deadline = Instant::now() + Duration::from_millis(1100);
                while Instant::now() < deadline && sock.read(&mut sink).is_ok_and(|n| n > 0) {}
            });
        }
    });
}

/// Status line and body of a GET to the admin server.
fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    get_blocking(admin, path).unwrap_or_else(|e| panic!("GET {path} from {admin}: {e}"))
}

fn presented(seen: &[Seen]) -> usize {
    seen.iter().filter(|s| s.presented).count()
}

#[test]
fn an_expired_leaf_is_never_presented_and_the_gateway_turns_unready() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ip = Ipv4Addr::new(127, 0, 91, 1);
    let inbound = free_addr(ip);
    let admin = free_addr(ip);
    let peer_listener = TcpListener::bind((Ipv4Addr::new(127, 0, 91, 2), 0)).unwrap();
    let peer_addr = peer_listener.local_addr().unwrap();

    let pki = Pki::new("expiry anchor");
    let gateway_leaf =
        |lifetime| pki.leaf_valid("cluster-a", &gateway_id("cluster-a"), short_lived(lifetime));
    let peer_leaf = pki.leaf_valid(
        "cluster-b",
        &gateway_id("cluster-b"),
        short_lived(Duration::from_secs(1800)),
    );

    let identity = root.join("identity");
    gateway_leaf(LIFETIME).write_dir(&identity, false).unwrap();
    let expires = not_after(&identity);
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    write_files(
        &manifests,
        &[
            ("settings.yaml", &cluster_settings("cluster-a", inbound)),
            ("link.yaml", &link("cluster-b", peer_addr, peer_addr)),
        ],
    );

    let peer_config = Presented::of(&peer_leaf).server_config();
    let peer_seen = Arc::new(Mutex::new(Vec::new()));
    fake_peer(peer_listener, peer_config, peer_seen.clone());

    let mut gateway = Proxy::command(
        env!("CARGO_BIN_EXE_isthmus-proxy"),
        "gateway",
        "cluster-a",
        &identity,
        &manifests,
        admin,
        root.join("gateway.log"),
    )
    .arg("--allow-local-endpoints")
    .args(["--inbound-addr", &inbound.to_string()])
    .args(["--reload-interval", "200ms"])
    .args(["--tunnel-connections", "3"])
    .start();

    // Before notAfter: ready, and both sides see the leaf.
    gateway.wait_ready_blocking();
    let before: Vec<Seen> = (0..3)
        .map(|_| handshake_as_client(inbound, &peer_leaf))
        .collect();
    assert_eq!(
        presented(&before),
        3,
        "before notAfter the gateway presents its leaf as a server: {before:?}"
    );
    eventually_blocking(
        "the gateway's link pool to present its leaf to the peer",
        STEP,
        || (presented(&peer_seen.lock().unwrap()) > 0).then_some(()),
    );
    assert!(
        SystemTime::now() < expires,
        "the gateway took too long to start: the leaf expired before it was checked"
    );

    // /ready, polled every 100 ms, turns false within 1 s of notAfter.
    let mut unready_at = None;
    let deadline = Instant::now() + LIFETIME + STEP;
    while Instant::now() < deadline {
        let asked = SystemTime::now();
        if get_ready(admin) != 200 {
            unready_at = Some(asked);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let unready_at = unready_at.expect("/ready never turned false after notAfter");
    let delay = unready_at.duration_since(expires).unwrap_or_else(|early| {
        panic!("/ready turned false {:?} before notAfter", early.duration())
    });
    eprintln!("/ready turned false {delay:?} after notAfter (polled every 100 ms)");
    assert!(
        delay <= Duration::from_secs(1),
        "/ready turned false {delay:?} after notAfter"
    );

    // After notAfter: handshakes as client of the gateway, and the link pool's own
    // handshakes with the peer, for a few seconds. None may carry the leaf.
    let mut after = Vec::new();
    let until = Instant::now() + AFTER_EXPIRY;
    while Instant::now() < until {
        after.push(handshake_as_client(inbound, &peer_leaf));
        std::thread::sleep(Duration::from_millis(100));
    }
    let pool_after: Vec<Seen> = peer_seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.at >= expires)
        .copied()
        .collect();
    eprintln!(
        "after notAfter: {} handshakes as client of the gateway, {} presented the leaf; \
         {} handshakes of the gateway's link pool, {} presented the leaf",
        after.len(),
        presented(&after),
        pool_after.len(),
        presented(&pool_after)
    );
    assert!(after.len() >= 10, "too few attempts: {}", after.len());
    assert_eq!(
        presented(&after),
        0,
        "the gateway presented an expired leaf as a server"
    );
    assert!(
        !pool_after.is_empty(),
        "the link pool made no handshake after notAfter: nothing was checked"
    );
    assert_eq!(
        presented(&pool_after),
        0,
        "the gateway's link pool presented an expired leaf"
    );
    let (_, metrics) = get(admin, "/metrics");
    assert_eq!(
        Metrics::parse(&metrics).get("identity_leaf_expired", &[]),
        Some(1.0),
        "identity_leaf_expired is not 1:\n{metrics}"
    );
    let (_, body) = get(admin, "/ready");
    assert!(
        body.contains("expired"),
        "/ready does not say why: {body:?}"
    );
    let logged = gateway.log_text();
    assert!(
        logged.contains("identity leaf outside its validity"),
        "no log line names the expiry:\n{logged}"
    );

    // A fresh leaf restores readiness and presentation without a restart.
    gateway_leaf(Duration::from_secs(1800))
        .write_dir(&identity, true)
        .unwrap();
    let rotated = Instant::now();
    let deadline = rotated + STEP;
    while get_ready(admin) != 200 {
        assert!(
            Instant::now() < deadline,
            "a fresh leaf did not restore readiness"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "ready again {:?} after a fresh leaf was written",
        rotated.elapsed()
    );
    let seen = handshake_as_client(inbound, &peer_leaf);
    assert!(seen.presented, "the fresh leaf is not presented");
    let since = SystemTime::now();
    eventually_blocking("the link pool to present the fresh leaf", STEP, || {
        let seen = peer_seen.lock().unwrap();
        seen.iter()
            .any(|s| s.at >= since && s.presented)
            .then_some(())
    });
    let (_, metrics) = get(admin, "/metrics");
    assert_eq!(
        Metrics::parse(&metrics).get("identity_leaf_expired", &[]),
        Some(0.0),
        "identity_leaf_expired is not back to 0:\n{metrics}"
    );
}

fn get_ready(admin: SocketAddr) -> u16 {
    get_blocking(admin, "/ready").map_or(0, |(status, _)| status)
}
