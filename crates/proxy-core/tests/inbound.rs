//! The sidecar's inbound handler in process: mesh peers dial it with minted
//! identities through the production pool, unmeshed clients arrive "redirected"
//! through a fake original destination, and the app is an in-process origin on a
//! loopback address that stands for the pod's own.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use isthmus_vocab::{Authority, Refusal};
use proxy_core::inbound::AppAddress;
use proxy_core::metrics::{Direction, ProxyMetrics};
use proxy_core::pool::{Pool, PoolError};
use proxy_core::tunnel::client::TunnelStream;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pod's own address in these tests: a loopback address other than
/// `127.0.0.1`, so delivery to it and delivery to loopback can be told apart.
const POD_IP: [u8; 4] = [127, 0, 0, 2];
/// The sidecar's identity.
const SIDECAR_ID: &str = "spiffe://cluster.local/ns/default/sa/hello";

fn ip(octets: [u8; 4]) -> IpAddr {
    IpAddr::from(octets)
}

/// The app listening on the pod's address, and a decoy on loopback at the same
/// port: whichever gets the connection shows where the inbound delivered it.
async fn app_and_decoy(behaviour: Behaviour) -> (Origin, Origin) {
    for _ in 0..20 {
        let app = Origin::spawn_on(SocketAddr::from((POD_IP, 0)), behaviour.clone()).await;
        let loopback = SocketAddr::from(([127, 0, 0, 1], app.addr.port()));
        if std::net::TcpListener::bind(loopback).is_ok() {
            let decoy = Origin::spawn_on(loopback, behaviour).await;
            return (app, decoy);
        }
    }
    panic!("no port free on both the pod address and loopback");
}

/// An inbound listener on the pod's address.
struct Sidecar {
    proxy: Listening,
    orig_dst: Arc<FakeOrigDst>,
    metrics: ProxyMetrics,
    identity: Identity,
}

impl Sidecar {
    async fn start(pki: &Pki, app: AppAddress, proxy_ports: &[u16]) -> Sidecar {
        Self::start_with(pki, app, proxy_ports, |_| {}).await
    }

    async fn start_with(
        pki: &Pki,
        app: AppAddress,
        proxy_ports: &[u16],
        change: impl FnOnce(&mut proxy_core::inbound::Inbound<proxy_core::inbound::LocalDelivery>),
    ) -> Sidecar {
        let metrics = ProxyMetrics::default();
        let identity = pki.identity(CLUSTER, SIDECAR_ID);
        let orig_dst = FakeOrigDst::new();
        let mut handler = inbound(&identity, orig_dst.clone(), app, proxy_ports, &metrics);
        change(&mut handler);
        let proxy = Listening::start(
            Arc::new(handler),
            SocketAddr::from((POD_IP, 0)),
            Direction::Inbound,
            &metrics,
        )
        .await;
        Sidecar {
            proxy,
            orig_dst,
            metrics,
            identity,
        }
    }

    /// The cluster's gateway, dialling this sidecar's inbound port with mTLS.
    fn gateway(&self, pki: &Pki) -> Pool {
        pki.identity(CLUSTER, GATEWAY_ID)
            .pool_to(&self.identity, self.proxy.addr)
    }

    /// An unmeshed client at `source` whose connection to the pod's `port` was
    /// redirected to the inbound listener.
    async fn redirected(
        &self,
        source: [u8; 4],
        port: u16,
    ) -> std::io::Result<tokio::net::TcpStream> {
        self.orig_dst
            .connect_from(
                ip(source),
                self.proxy.addr,
                SocketAddr::from((POD_IP, port)),
            )
            .await
    }

    /// Waits until `count` of this sidecar's `reason` is `n`.
    async fn counts(&self, count: Count, reason: &'static str, n: u64) {
        counts(&self.metrics, count, Direction::Inbound, reason, n).await
    }
}

fn authority(port: u16) -> Authority {
    Authority::parse(&format!("hello.default.svc.cluster.local:{port}")).unwrap()
}

async fn open(pool: &Pool, port: u16) -> Result<TunnelStream, PoolError> {
    tokio::time::timeout(STEP, pool.open_answered(&authority(port), None))
        .await
        .expect("no answer from the inbound in time")
}

/// A tunnel stream reaches the app at the pod's address (the one the tunnel
/// connection arrived on), not a listener on loopback; with loopback delivery
/// chosen, the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_streams_reach_the_app_at_the_pod_address_or_loopback_when_chosen() {
    let pki = Pki::new();
    for (choice, expect_pod) in [(AppAddress::Pod, true), (AppAddress::Loopback, false)] {
        let (mut app, mut decoy) = app_and_decoy(Behaviour::Echo).await;
        let sidecar = Sidecar::start(&pki, choice, &[]).await;
        let mut stream = open(&sidecar.gateway(&pki), app.addr.port()).await.unwrap();
        assert_exchange(&mut stream, b"to the app", b"to the app").await;
        let (reached, other) = if expect_pod {
            (&mut app, &mut decoy)
        } else {
            (&mut decoy, &mut app)
        };
        let served = reached.next_served().await;
        assert_eq!(served.received, b"to the app", "{choice:?}");
        assert!(
            other.try_served().is_none(),
            "{choice:?}: delivered to both"
        );
    }
}

/// Plain TCP redirected to an app port reaches the app at its original
/// destination on the pod's address, from the proxy's own socket (never the
/// client's address), and is counted as inbound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_tcp_reaches_the_app_at_its_original_destination() {
    let pki = Pki::new();
    let (mut app, mut decoy) = app_and_decoy(Behaviour::Echo).await;
    let sidecar = Sidecar::start(&pki, AppAddress::Pod, &[]).await;
    let client_ip = [127, 0, 0, 9];
    let mut client = sidecar
        .redirected(client_ip, app.addr.port())
        .await
        .unwrap();
    assert_exchange(&mut client, b"<unmeshed>", b"<unmeshed>").await;
    let served = app.next_served().await;
    assert_eq!(served.local, app.addr);
    assert_ne!(
        served.peer.ip(),
        ip(client_ip),
        "delivered from the client's address"
    );
    assert!(decoy.try_served().is_none(), "delivered to loopback");
    sidecar.counts(closes, "eof", 1).await;
}

/// A target that is one of the proxy's own ports is refused as a loop, on both
/// kinds of inbound connection; an app port nothing listens on is refused as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_and_closed_app_ports_are_refused() {
    let pki = Pki::new();
    let own_port = 4143;
    let sidecar = Sidecar::start(&pki, AppAddress::Pod, &[own_port]).await;
    let gateway = sidecar.gateway(&pki);

    let refused = open(&gateway, own_port).await.unwrap_err();
    assert_eq!(refused.refusal(), Refusal::Loop, "{refused}");
    assert_reset_early(sidecar.redirected([127, 0, 0, 1], own_port).await, "loop").await;
    sidecar.counts(refusals, "loop", 2).await;

    let closed = std::net::TcpListener::bind(SocketAddr::from((POD_IP, 0)))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = open(&gateway, closed).await.unwrap_err();
    assert_eq!(refused.refusal(), Refusal::UpstreamRefused, "{refused}");
    assert_reset_early(
        sidecar.redirected([127, 0, 0, 1], closed).await,
        "closed port",
    )
    .await;
    counted(&sidecar.metrics, "both closed ports counted", |m| {
        refusals(m, Direction::Inbound, "upstream_refused") == 1
            && closes(m, Direction::Inbound, "connect_error") == 1
    })
    .await;
}

/// Mesh connections need mTLS from this cluster: a peer of another cluster is
/// refused at the handshake, and a sidecar without a mesh identity refuses all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_connections_need_an_identity_of_this_cluster() {
    let pki = Pki::new();
    let (app, _decoy) = app_and_decoy(Behaviour::Echo).await;
    let sidecar = Sidecar::start(&pki, AppAddress::Pod, &[]).await;
    let stranger = pki
        .identity("cluster-b", GATEWAY_ID)
        .pool_to(&sidecar.identity, sidecar.proxy.addr);
    let refused = open(&stranger, app.addr.port()).await.unwrap_err();
    assert_eq!(refused.refusal(), Refusal::LinkDown, "{refused}");
    counted(&sidecar.metrics, "the handshake refused", |m| {
        refusals(m, Direction::Inbound, "tls_handshake") >= 1
    })
    .await;

    let without = Sidecar::start_with(&pki, AppAddress::Pod, &[], |h| h.tls = None).await;
    let refused = open(&without.gateway(&pki), app.addr.port())
        .await
        .unwrap_err();
    assert_eq!(refused.refusal(), Refusal::LinkDown, "{refused}");
    counted(&without.metrics, "refused without a mesh identity", |m| {
        refusals(m, Direction::Inbound, "no_mesh_identity") >= 1
    })
    .await;
}

/// Each side may end its half first, on a tunnel stream and on redirected TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_works_in_both_directions() {
    let pki = Pki::new();
    let sidecar = Sidecar::start(&pki, AppAddress::Pod, &[]).await;
    let gateway = sidecar.gateway(&pki);

    let (mut app, _decoy) = app_and_decoy(Behaviour::ReplyAfterEof).await;
    let mut stream = open(&gateway, app.addr.port()).await.unwrap();
    assert_exchange(&mut stream, b"request", b"got 7 bytes").await;
    assert_eq!(app.next_served().await.ended, Ended::Eof);
    let mut client = sidecar
        .redirected([127, 0, 0, 1], app.addr.port())
        .await
        .unwrap();
    assert_exchange(&mut client, b"<request>", b"got 9 bytes").await;

    let (mut app, _decoy) = app_and_decoy(Behaviour::GreetAndHalfClose(b"hi, bye")).await;
    let mut stream = open(&gateway, app.addr.port()).await.unwrap();
    assert_heard_after_greeting(&mut stream, b"hi, bye", b"late words", &mut app).await;
    let mut client = sidecar
        .redirected([127, 0, 0, 1], app.addr.port())
        .await
        .unwrap();
    assert_heard_after_greeting(&mut client, b"hi, bye", b"late words", &mut app).await;
}

/// The app's reset reaches the mesh peer (a reset stream) and the unmeshed client
/// (a reset connection); a client's reset reaches the app, and a peer's reset
/// stream is counted as the downstream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_propagate_both_ways() {
    let pki = Pki::new();
    let sidecar = Sidecar::start(&pki, AppAddress::Pod, &[]).await;
    let gateway = sidecar.gateway(&pki);

    let (app, _decoy) = app_and_decoy(Behaviour::ResetAfter(5)).await;
    let mut stream = open(&gateway, app.addr.port()).await.unwrap();
    stream.write_all(b"<123>").await.unwrap();
    let (_, end) = read_to_end(&mut stream).await;
    assert!(end.is_err(), "the app's reset arrived as an orderly end");
    let mut client = sidecar
        .redirected([127, 0, 0, 1], app.addr.port())
        .await
        .unwrap();
    client.write_all(b"<123>").await.unwrap();
    assert_reset(&mut client, "the app's reset").await;

    let (mut app, _decoy) = app_and_decoy(Behaviour::Echo).await;
    let mut client = sidecar
        .redirected([127, 0, 0, 1], app.addr.port())
        .await
        .unwrap();
    client.write_all(b"<abc>").await.unwrap();
    let mut back = [0u8; 5];
    client.read_exact(&mut back).await.unwrap();
    abort(client);
    assert_eq!(app.next_served().await.ended, Ended::Reset);

    let mut stream = open(&gateway, app.addr.port()).await.unwrap();
    stream.write_all(b"<abc>").await.unwrap();
    stream.read_exact(&mut back).await.unwrap();
    drop(stream);
    sidecar.counts(closes, "downstream_reset", 2).await;
}

/// A draining inbound listener closes at once; a tunnel stream in flight runs on
/// to its end while its connection takes no new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_streams_in_flight_and_refuses_new_ones() {
    let pki = Pki::new();
    let (app, _decoy) = app_and_decoy(Behaviour::Echo).await;
    let mut sidecar = Sidecar::start(&pki, AppAddress::Pod, &[]).await;
    let gateway = sidecar.gateway(&pki);
    let mut stream = open(&gateway, app.addr.port()).await.unwrap();
    stream.write_all(b"before").await.unwrap();
    let mut back = [0u8; 6];
    stream.read_exact(&mut back).await.unwrap();

    sidecar.proxy.drain();
    assert_refuses_connections(sidecar.proxy.addr, "a draining inbound listener").await;
    // A stream that crosses the GOAWAY on the wire is still served (HTTP/2's
    // graceful shutdown); once the gateway has read the GOAWAY, none is.
    let mut refused = false;
    for _ in 0..50 {
        if open(&gateway, app.addr.port()).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "new streams were still served by a draining inbound"
    );
    stream.write_all(b"during").await.unwrap();
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"during");
    stream.shutdown().await.unwrap();
    let (rest, end) = read_to_end(&mut stream).await;
    assert!(rest.is_empty() && end.is_ok(), "{rest:?} {end:?}");
    drop(stream);
    sidecar.proxy.drained().await;
}
