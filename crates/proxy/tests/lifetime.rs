//! A mesh connection lives no longer than the earlier of its two leaves' notAfter,
//! even while PINGs keep it alive: a real `isthmus-proxy gateway` on loopback, with
//! leaves minted at test time to expire a few seconds after start.
//!
//! - As a server: a client whose leaf runs out holds a pooled connection to the
//!   gateway; past notAfter the gateway serves no stream on it (a `no_route` answer
//!   proves the gateway's handler ran, and must not be seen again).
//! - As a client: the gateway's own leaf runs out; the peer of its link pool, an
//!   HTTP/2 server that answers PINGs and never closes first, must see the pooled
//!   connection end at notAfter.
#![allow(clippy::unwrap_used)]

mod common;

use common::write_files;
use isthmus_tests::peer::test_peer;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use isthmus_test_support::pki::{not_after, short_lived};
use isthmus_test_support::proxy::free_addr;
use isthmus_test_support::{Pki, Presented, Proxy, STEP, eventually_blocking};
use isthmus_tests::multicluster::{cluster_settings, gateway_id, link};
use isthmus_vocab::{Authority, Refusal};
use proxy_core::pool::{Pool, PoolError};
use proxy_identity::mint::LeafBundle;
use proxy_identity::rustls::ServerConfig;
use proxy_identity::{CredentialPaths, CredentialStore, PeerPolicy};

/// The short leaf's life after it is minted: the gateway must start first.
const LIFETIME: Duration = Duration::from_secs(5);
/// How long streams are tried after notAfter.
const AFTER_EXPIRY: Duration = Duration::from_secs(3);

/// Starts a gateway of cluster-a with the identity and manifests under `root`.
fn start_gateway(root: &Path, inbound: SocketAddr, admin: SocketAddr) -> Proxy {
    Proxy::command(
        env!("CARGO_BIN_EXE_isthmus-proxy"),
        "gateway",
        "cluster-a",
        &root.join("identity"),
        &root.join("manifests"),
        admin,
        root.join("gateway.log"),
    )
    .args(["--inbound-addr", &inbound.to_string()])
    .args(["--reload-interval", "200ms"])
    .args(["--tunnel-connections", "1"])
    .start()
}

/// A leaf for `cluster`'s gateway, valid from a minute ago for `lifetime`.
fn gateway_leaf(pki: &Pki, cluster: &str, lifetime: Duration) -> LeafBundle {
    pki.leaf_valid(cluster, &gateway_id(cluster), short_lived(lifetime))
}

fn write_manifests(root: &Path, inbound: SocketAddr, peer: Option<SocketAddr>) {
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    write_files(
        &manifests,
        &[("settings.yaml", &cluster_settings("cluster-a", inbound))],
    );
    if let Some(peer) = peer {
        write_files(&manifests, &[("link.yaml", &link("cluster-b", peer, peer))]);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_client_whose_leaf_expired_gets_no_stream_on_its_pooled_connection() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ip = Ipv4Addr::new(127, 0, 92, 1);
    let inbound = free_addr(ip);
    let admin = free_addr(ip);

    let pki = Pki::new("lifetime anchor");
    gateway_leaf(&pki, "cluster-a", Duration::from_secs(1800))
        .write_dir(&root.join("identity"), false)
        .unwrap();
    write_manifests(root, inbound, None);
    let mut gateway = start_gateway(root, inbound, admin);
    gateway.wait_ready_blocking();

    // The client: a short leaf, and a pool that itself never retires a connection
    // (no deadline), so only the gateway can end its use.
    let client_dir = root.join("client");
    gateway_leaf(&pki, "cluster-b", LIFETIME)
        .write_dir(&client_dir, false)
        .unwrap();
    let expires = not_after(&client_dir);
    let store = Arc::new(CredentialStore::load(CredentialPaths::in_dir(&client_dir)).unwrap());
    let rt = runtime();
    let stopped = tokio_util::sync::CancellationToken::new();
    let authority = Authority::parse("nowhere.default.svc.cluster.local:80").unwrap();
    let (before, after) = rt.block_on(async {
        let pool = Pool::spawn(
            test_peer(
                "test/gateway-a",
                inbound,
                proxy_identity::client_config(store, PeerPolicy::Exact(gateway_id("cluster-a"))),
                1,
                STEP,
            ),
            stopped,
        );
        // Served before notAfter: the gateway's handler answers `no_route`.
        let mut before = Vec::new();
        for _ in 0..3 {
            before.push(
                pool.open_answered(&authority, None)
                    .await
                    .err()
                    .map(|e| e.refusal()),
            );
        }
        assert!(
            SystemTime::now() < expires,
            "the gateway took too long to start: the leaf expired before it was checked"
        );
        let wait = expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(50)).await;
        let mut after = Vec::new();
        let until = Instant::now() + AFTER_EXPIRY;
        while Instant::now() < until {
            let outcome = pool.open_answered(&authority, None).await;
            after.push(match outcome {
                Ok(_) => "opened".to_owned(),
                Err(PoolError::Refused { refusal, .. }) => refusal.as_str().to_owned(),
                Err(e) => format!("failed: {e}"),
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (before, after)
    });
    assert!(
        before.iter().all(|r| *r == Some(Refusal::NoRoute)),
        "before notAfter the gateway serves streams (no_route): {before:?}"
    );
    let served = after
        .iter()
        .filter(|a| *a == "opened" || *a == Refusal::NoRoute.as_str())
        .count();
    eprintln!(
        "after notAfter: {} streams tried, {served} served by the gateway; outcomes: {after:?}",
        after.len()
    );
    assert!(after.len() >= 10, "too few attempts: {}", after.len());
    assert_eq!(
        served, 0,
        "the gateway served streams of a client whose leaf expired: {after:?}"
    );
}

/// One connection the peer accepted: whether the client presented a leaf, and when
/// the connection ended (`None`: still open).
#[derive(Clone, Copy, Debug)]
struct Life {
    presented: bool,
    ended: Option<SystemTime>,
}

/// The link's peer gateway: an HTTP/2 server that answers PINGs, refuses every
/// stream, and keeps each connection until the client ends it (bounded by the test).
async fn peer_gateway(
    listener: tokio::net::TcpListener,
    config: Arc<ServerConfig>,
    lives: Arc<Mutex<Vec<Life>>>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        let lives = lives.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(sock).await else {
                return;
            };
            let presented = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let index = {
                let mut lives = lives.lock().unwrap();
                lives.push(Life {
                    presented,
                    ended: None,
                });
                lives.len() - 1
            };
            if let Ok(mut conn) = h2::server::handshake(tls).await {
                let serve = async {
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        let mut answer = http::Response::new(());
                        *answer.status_mut() = http::StatusCode::NOT_FOUND;
                        let _ = respond.send_response(answer, true);
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(30), serve).await;
            }
            lives.lock().unwrap()[index].ended = Some(SystemTime::now());
        });
    }
}

#[test]
fn a_gateway_whose_leaf_expired_retires_its_link_pool() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ip = Ipv4Addr::new(127, 0, 92, 3);
    let inbound = free_addr(ip);
    let admin = free_addr(ip);
    let peer_std = TcpListener::bind((Ipv4Addr::new(127, 0, 92, 4), 0)).unwrap();
    let peer_addr = peer_std.local_addr().unwrap();

    let pki = Pki::new("lifetime anchor");
    let peer_leaf = gateway_leaf(&pki, "cluster-b", Duration::from_secs(1800));
    let identity = root.join("identity");
    gateway_leaf(&pki, "cluster-a", LIFETIME)
        .write_dir(&identity, false)
        .unwrap();
    let expires = not_after(&identity);
    write_manifests(root, inbound, Some(peer_addr));

    let config = Presented::of(&peer_leaf).server_config();
    let lives = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime();
    peer_std.set_nonblocking(true).unwrap();
    let listener = rt.block_on(async { tokio::net::TcpListener::from_std(peer_std).unwrap() });
    rt.spawn(peer_gateway(listener, config, lives.clone()));

    let _gateway = start_gateway(root, inbound, admin);
    eventually_blocking(
        "the gateway's link pool to connect with its leaf",
        STEP,
        || {
            lives
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.presented)
                .then_some(())
        },
    );
    assert!(
        SystemTime::now() < expires,
        "the gateway took too long to start: the leaf expired before it was checked"
    );
    std::thread::sleep(
        expires
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            + AFTER_EXPIRY,
    );
    let seen = lives.lock().unwrap().clone();
    eprintln!("connections the peer saw (notAfter {expires:?}): {seen:?}");
    let with_leaf_open: Vec<&Life> = seen
        .iter()
        .filter(|l| l.presented && l.ended.is_none())
        .collect();
    assert!(
        with_leaf_open.is_empty(),
        "the link pool still holds connections made with its expired leaf {AFTER_EXPIRY:?} after notAfter: {seen:?}"
    );
    for life in seen.iter().filter(|l| l.presented) {
        let ended = life.ended.unwrap();
        assert!(
            ended >= expires,
            "a connection with the leaf ended before notAfter, so it did not prove the retirement: {seen:?}"
        );
    }
}
