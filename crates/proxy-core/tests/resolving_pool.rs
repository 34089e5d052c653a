//! A pool to a peer named by DNS, its lookup scripted: the connections spread
//! over every address the name gives, follow the answer without a restart, and
//! drain from an address that vanished (no new stream; streams in flight finish).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use isthmus_vocab::{Authority, ClusterName};
use proxy_core::pool::{LinkState, Pool, PoolSettings};
use proxy_core::resolve::{GatewayHost, Lookup, ResolveSettings};
use proxy_core::tunnel::client::TunnelStream;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Answers every lookup with the addresses the test set last.
struct Scripted(Mutex<Vec<SocketAddr>>);

impl Scripted {
    fn set(&self, addrs: &[SocketAddr]) {
        *self.0.lock().unwrap() = addrs.to_vec();
    }
}

impl Lookup for Scripted {
    fn lookup<'a>(&'a self, _: &'a str, _: u16) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        let addrs = self.0.lock().unwrap().clone();
        Box::pin(async move { Ok(addrs) })
    }
}

/// A pool to the peer named `gateway.cluster-a.test`, resolved as `resolve` says.
fn named_pool(
    resolve: ResolveSettings,
    tls: Arc<proxy_identity::rustls::ClientConfig>,
    stop: &CancellationToken,
) -> Pool {
    let pools = PoolSettings {
        resolve,
        ..support::gateway_pools(Duration::from_secs(2))
    };
    pools.spawn_to(
        "gateway/test".to_owned(),
        &GatewayHost::parse("gateway.cluster-a.test").unwrap(),
        4143,
        tls,
        1,
        stop.clone(),
        &TaskTracker::new(),
    )
}

/// Waits until `ok` holds, polling, within [`STEP`].
async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    tokio::time::timeout(STEP, async {
        while !ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within {STEP:?}"));
}

/// A stream through `pool` to the echo origin, proven by one echo.
async fn echoed(pool: &Pool, text: &[u8]) -> TunnelStream {
    let authority = Authority::parse(HELLO).unwrap();
    let cluster = ClusterName::parse(CLUSTER).unwrap();
    let mut stream = pool
        .open_answered(&authority, Some(&cluster))
        .await
        .unwrap();
    assert_eq!(echo_once(&mut stream, text).await, text);
    stream
}

async fn echo_once(stream: &mut TunnelStream, text: &[u8]) -> Vec<u8> {
    stream.write_all(text).await.unwrap();
    let mut back = vec![0; text.len()];
    tokio::time::timeout(STEP, stream.read_exact(&mut back))
        .await
        .expect("no echo in time")
        .unwrap();
    back
}

/// Every request a peer received so far.
fn taken(peer: &mut TunnelPeer) -> usize {
    std::iter::from_fn(|| peer.try_request()).count()
}

#[tokio::test]
async fn a_named_peers_pool_follows_its_addresses_and_drains_the_vanished() {
    let pki = Pki::new();
    let origin = Origin::spawn(Behaviour::Echo).await;
    let mut one = TunnelPeer::spawn(&pki, &[], Answer::Deliver(origin.addr)).await;
    let mut two = TunnelPeer::spawn(&pki, &[], Answer::Deliver(origin.addr)).await;
    let app = pki.identity(CLUSTER, WORKLOAD_ID);

    let answer = Arc::new(Scripted(Mutex::new(vec![one.addr])));
    let stop = CancellationToken::new();
    let pool = named_pool(
        ResolveSettings {
            interval: Duration::from_millis(50),
            min_interval: Duration::from_millis(10),
            lookup: answer.clone(),
            ..ResolveSettings::default()
        },
        app.client_config(one.identity.as_peer()),
        &stop,
    );

    // One address: the stream goes there, and stays open.
    let mut held = echoed(&pool, b"before").await;
    assert_eq!(taken(&mut one), 1);
    assert_eq!(
        pool.addresses().target().as_ref(),
        "gateway.cluster-a.test:4143"
    );

    // A second address: it gets a connection of its own, and streams.
    answer.set(&[one.addr, two.addr]);
    until("a connection to each address", || {
        pool.state() == LinkState::Up { connections: 2 }
    })
    .await;
    for _ in 0..4 {
        drop(echoed(&pool, b"spread").await);
    }
    assert!(taken(&mut two) > 0, "no stream reached the new address");
    assert!(taken(&mut one) > 0, "no stream reached the first address");

    // The first address vanishes: its connection takes no new stream...
    answer.set(&[two.addr]);
    until("the vanished address's connection to retire", || {
        pool.state() == LinkState::Up { connections: 1 }
    })
    .await;
    assert_eq!(*pool.addresses().current().addrs, [two.addr]);
    for _ in 0..4 {
        drop(echoed(&pool, b"after").await);
    }
    assert_eq!(taken(&mut one), 0, "a stream went to a vanished address");
    assert_eq!(taken(&mut two), 4);

    // ...and the stream in flight on it finishes there.
    assert_eq!(echo_once(&mut held, b"still here").await, b"still here");
    stop.cancel();
}

#[tokio::test]
async fn draining_peers_get_no_new_stream_while_another_is_live() {
    let pki = Pki::new();
    let origin = Origin::spawn(Behaviour::Echo).await;
    let mut peers = Vec::new();
    for _ in 0..3 {
        peers.push(TunnelPeer::spawn(&pki, &[], Answer::Deliver(origin.addr)).await);
    }
    let app = pki.identity(CLUSTER, WORKLOAD_ID);
    let addrs: Vec<SocketAddr> = peers.iter().map(|p| p.addr).collect();
    let stop = CancellationToken::new();
    let pool = named_pool(
        ResolveSettings {
            lookup: Arc::new(Scripted(Mutex::new(addrs))),
            ..ResolveSettings::default()
        },
        app.client_config(peers[0].identity.as_peer()),
        &stop,
    );
    until("a connection to each replica", || {
        pool.state() == LinkState::Up { connections: 3 }
    })
    .await;
    // Streams on every replica, held open so that the draining connections stay.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(echoed(&pool, b"before").await);
    }
    for peer in &mut peers {
        assert_eq!(taken(peer), 2, "streams go round-robin over the replicas");
    }
    // Two replicas drain (GOAWAY): every new stream still opens, and once their
    // GOAWAYs arrived, all go to the third.
    peers[0].drain();
    peers[1].drain();
    let mut on_third_in_a_row = 0;
    tokio::time::timeout(STEP, async {
        while on_third_in_a_row < 10 {
            drop(echoed(&pool, b"during").await);
            let drained = taken(&mut peers[0]) + taken(&mut peers[1]);
            let third = taken(&mut peers[2]);
            on_third_in_a_row = if drained == 0 && third == 1 {
                on_third_in_a_row + 1
            } else {
                0
            };
        }
    })
    .await
    .expect("new streams kept going to draining replicas");
    // The streams in flight on the draining replicas finish there.
    for stream in &mut held {
        assert_eq!(echo_once(stream, b"still here").await, b"still here");
    }
    stop.cancel();
}
