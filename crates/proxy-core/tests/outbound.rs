//! The sidecar's outbound handler in process: a fake original destination, a fixed
//! route table, a minted gateway identity and in-process origins, on loopback and
//! without privileges.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_vocab::Refusal;
use proxy_core::metrics::{Direction, ProxyMetrics};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A mirrored service's ClusterIP, as the app dials it; nothing listens there, so
/// a connection that is not tunnelled fails.
const HELLO_IP: &str = "127.0.0.1:9";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// An outbound listener with its seams, and the gateway it tunnels to.
struct Sidecar {
    proxy: Listening,
    orig_dst: Arc<FakeOrigDst>,
    metrics: ProxyMetrics,
}

impl Sidecar {
    async fn start(routes: FixedRoutes, gateway: Option<&TunnelPeer>, pki: &Pki) -> Sidecar {
        Self::start_with(routes, gateway, pki, FakeOrigDst::new(), &[]).await
    }

    async fn start_with(
        routes: FixedRoutes,
        gateway: Option<&TunnelPeer>,
        pki: &Pki,
        orig_dst: Arc<FakeOrigDst>,
        proxy_ports: &[u16],
    ) -> Sidecar {
        let metrics = ProxyMetrics::default();
        let app = pki.identity(CLUSTER, WORKLOAD_ID);
        let pool = gateway.map(|peer| app.pool_to(&peer.identity, peer.addr));
        let proxy = Listening::start(
            outbound(routes, orig_dst.clone(), pool, proxy_ports, &metrics),
            addr("127.0.0.1:0"),
            Direction::Outbound,
            &metrics,
        )
        .await;
        Sidecar {
            proxy,
            orig_dst,
            metrics,
        }
    }

    /// The app connecting to `dst`, redirected to the proxy.
    async fn connect(&self, dst: SocketAddr) -> TcpStream {
        self.orig_dst.connect(self.proxy.addr, dst).await
    }

    /// [`Sidecar::connect`] for a connection the proxy may reset at once.
    async fn try_connect(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        self.orig_dst.try_connect(self.proxy.addr, dst).await
    }

    /// Waits until `count` of this sidecar's `reason` is `n`.
    async fn counts(&self, count: Count, reason: &'static str, n: u64) {
        counts(&self.metrics, count, Direction::Outbound, reason, n).await
    }
}

async fn hello_gateway(pki: &Pki, origin: &Origin) -> TunnelPeer {
    TunnelPeer::spawn(
        pki,
        &[(HELLO, Answer::Deliver(origin.addr))],
        Answer::Refuse(Refusal::NotExported),
    )
    .await
}

fn hello_routes() -> FixedRoutes {
    FixedRoutes::default().mirror_addr(addr(HELLO_IP), CLUSTER, HELLO)
}

/// A connection to a mirrored service's address goes through the gateway's tunnel,
/// naming the service's authority and cluster; its bytes arrive at the far end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_destination_goes_through_the_tunnel_with_its_authority_and_cluster() {
    let pki = Pki::new();
    let mut origin = Origin::spawn(Behaviour::Echo).await;
    let mut peer = hello_gateway(&pki, &origin).await;
    let sidecar = Sidecar::start(hello_routes(), Some(&peer), &pki).await;

    let mut client = sidecar.connect(addr(HELLO_IP)).await;
    assert_exchange(
        &mut client,
        b"ping through the tunnel",
        b"ping through the tunnel",
    )
    .await;

    let seen = peer.next_request().await;
    assert_eq!(
        seen,
        SeenRequest {
            authority: HELLO.to_owned(),
            cluster: Some(CLUSTER.to_owned()),
            peer_id: Some(WORKLOAD_ID.to_owned()),
            peer_cluster: Some(CLUSTER.to_owned()),
        }
    );
    assert_eq!(origin.next_served().await.ended, Ended::Eof);
    sidecar.counts(closes, "eof", 1).await;
}

/// A destination with no route is connected to as the app asked, not tunnelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_destination_passes_through_to_the_original_destination() {
    let pki = Pki::new();
    let mut origin = Origin::spawn(Behaviour::Echo).await;
    let mut tunnelled = Origin::spawn(Behaviour::Echo).await;
    let mut peer = TunnelPeer::spawn(&pki, &[], Answer::Deliver(tunnelled.addr)).await;
    let sidecar = Sidecar::start(hello_routes(), Some(&peer), &pki).await;

    let mut client = sidecar.connect(origin.addr).await;
    assert_exchange(&mut client, b"straight", b"straight").await;
    let served = origin.next_served().await;
    assert_eq!(served.received, b"straight");
    // The proxy dialled from its own socket, not the app's.
    assert_ne!(served.peer, client.local_addr().unwrap());
    assert!(peer.try_request().is_none(), "a passthrough was tunnelled");
    assert!(tunnelled.try_served().is_none());
}

/// An HTTP/1 request is detected and proxied request by request, both on the
/// passthrough path and through the tunnel, and counted as HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_is_detected_and_proxied_per_request() {
    let pki = Pki::new();
    let origin = Origin::spawn(Behaviour::Http {
        delay: Duration::ZERO,
    })
    .await;
    let mut peer = hello_gateway(&pki, &origin).await;
    let sidecar = Sidecar::start(hello_routes(), Some(&peer), &pki).await;

    for (dst, host) in [(origin.addr, "plain.test"), (addr(HELLO_IP), "hello")] {
        let mut client = sidecar.connect(dst).await;
        for path in ["/one", "/two"] {
            let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
            client.write_all(request.as_bytes()).await.unwrap();
            let response = read_http_response(&mut client).await;
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            assert!(
                response.ends_with(&format!("GET {path} host={host}")),
                "{response}"
            );
        }
    }
    assert_eq!(peer.next_request().await.authority, HELLO);
    let counted = |host: &str| {
        sidecar
            .metrics
            .http_requests
            .get_or_create(&proxy_core::metrics::HttpLabels {
                direction: Direction::Outbound,
                authority: Arc::from(host),
            })
            .get()
    };
    assert_eq!(counted("plain.test"), 2);
    assert_eq!(counted("hello"), 2);
}

/// Reads one HTTP/1 response with a `content-length` body.
async fn read_http_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= head_end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(STEP, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed mid-response: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Every refusal the gateway answers resets the app's connection (it must not
/// mistake a refusal for an empty reply) and is counted under its own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_from_the_tunnel_peer_resets_the_app_and_is_counted() {
    let pki = Pki::new();
    let (peer, authorities) = TunnelPeer::refusing_each(&pki).await;
    let mut routes = FixedRoutes::default();
    let dsts: Vec<SocketAddr> = (0..authorities.len())
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 100 + i as u16)))
        .collect();
    for (dst, authority) in dsts.iter().zip(&authorities) {
        routes = routes.mirror_addr(*dst, CLUSTER, authority);
    }
    let sidecar = Sidecar::start(routes, Some(&peer), &pki).await;

    for (dst, refusal) in dsts.iter().zip(Refusal::ALL) {
        let mut client = sidecar.connect(*dst).await;
        client.write_all(b"hello?").await.unwrap();
        assert_reset(&mut client, refusal.as_str()).await;
        counted(&sidecar.metrics, &format!("{refusal} counted"), |m| {
            refusals(m, Direction::Outbound, refusal.as_str()) == 1
                && closes(m, Direction::Outbound, refusal.as_str()) == 1
        })
        .await;
    }
    for refusal in Refusal::ALL {
        assert_eq!(
            refusals(&sidecar.metrics, Direction::Outbound, refusal.as_str()),
            1,
            "{refusal}: counted once, under its own reason"
        );
    }

    // The same on the HTTP path: the request's connection is reset, not answered.
    let mut client = sidecar.connect(dsts[2]).await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: refused2.test\r\n\r\n")
        .await
        .unwrap();
    assert_reset(&mut client, "refused HTTP request").await;
    let reason = Refusal::ALL[2].as_str();
    counted(&sidecar.metrics, "the HTTP refusal counted", |m| {
        refusals(m, Direction::Outbound, reason) == 2
    })
    .await;
}

/// A gateway that never answers, no gateway at all, and an upstream that refuses:
/// the app is reset and the reason says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_gateway_missing_gateway_and_refusing_upstream_reset_the_app() {
    let pki = Pki::new();
    let peer = TunnelPeer::spawn(&pki, &[], Answer::Silent).await;
    let silent = Sidecar::start(hello_routes(), Some(&peer), &pki).await;
    let mut client = silent.connect(addr(HELLO_IP)).await;
    client.write_all(b"anyone?").await.unwrap();
    assert_reset(&mut client, "silent gateway").await;
    silent.counts(refusals, "upstream_timeout", 1).await;

    let without = Sidecar::start(hello_routes(), None, &pki).await;
    assert_reset_early(without.try_connect(addr(HELLO_IP)).await, "no gateway").await;
    without.counts(refusals, "link_down", 1).await;

    // A closed port on loopback: the passthrough connect is refused.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    assert_reset_early(without.try_connect(closed).await, "refusing upstream").await;
    without.counts(refusals, "upstream_refused", 1).await;
}

/// A connection back to one of the proxy's own ports, or from the proxy's own
/// upstream socket (a capture that does not exempt the proxy), is refused as a
/// loop and reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_are_refused() {
    let pki = Pki::new();
    let own_port = addr("127.0.0.1:4143");
    let sidecar = Sidecar::start_with(
        FixedRoutes::default(),
        None,
        &pki,
        FakeOrigDst::new(),
        &[own_port.port()],
    )
    .await;
    assert_reset_early(
        sidecar.try_connect(own_port).await,
        "connection to the proxy's own port",
    )
    .await;
    assert_eq!(refusals(&sidecar.metrics, Direction::Outbound, "loop"), 1);

    // Every connection nobody registered "meant" the listener itself, as a
    // captured upstream socket of the proxy does: the first connection's upstream
    // comes back, is recognised as the proxy's own, and both are refused.
    let looping = Sidecar::start(FixedRoutes::default(), None, &pki).await;
    looping.orig_dst.set_unmapped(looping.proxy.addr);
    assert_reset_early(
        TcpStream::connect(looping.proxy.addr).await,
        "looping connection",
    )
    .await;
    looping.counts(refusals, "loop", 2).await;
}

/// The app's destination for an origin, on the passthrough path or through the
/// tunnel (the origin behind [`HELLO`] at the gateway).
async fn sidecar_to(
    origin: &Origin,
    tunnel: bool,
    pki: &Pki,
) -> (Sidecar, SocketAddr, Option<TunnelPeer>) {
    if tunnel {
        let peer = hello_gateway(pki, origin).await;
        let sidecar = Sidecar::start(hello_routes(), Some(&peer), pki).await;
        (sidecar, addr(HELLO_IP), Some(peer))
    } else {
        let sidecar = Sidecar::start(FixedRoutes::default(), None, pki).await;
        (sidecar, origin.addr, None)
    }
}

/// Each side may end its half first; the other direction keeps flowing until its
/// own end, on the passthrough path and through the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_works_in_both_directions() {
    let pki = Pki::new();
    for tunnel in [false, true] {
        // The app ends first, then reads the reply the origin sends after it.
        let mut origin = Origin::spawn(Behaviour::ReplyAfterEof).await;
        let (sidecar, dst, _peer) = sidecar_to(&origin, tunnel, &pki).await;
        let mut client = sidecar.connect(dst).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let (reply, end) = read_to_end(&mut client).await;
        end.unwrap();
        assert_eq!(reply, b"got 7 bytes", "tunnel: {tunnel}");
        assert_eq!(origin.next_served().await.ended, Ended::Eof);

        // The origin ends first (it greets and closes its side); the app reads
        // that end, then still sends, and the origin gets it all.
        let mut origin = Origin::spawn(Behaviour::GreetAndHalfClose(b"hello, then bye")).await;
        let (sidecar, dst, _peer) = sidecar_to(&origin, tunnel, &pki).await;
        let mut client = sidecar.connect(dst).await;
        let (greeting, end) = read_to_end(&mut client).await;
        end.unwrap();
        assert_eq!(greeting, b"hello, then bye", "tunnel: {tunnel}");
        client.write_all(b"late words").await.unwrap();
        client.shutdown().await.unwrap();
        let served = origin.next_served().await;
        assert_eq!(
            (served.received.as_slice(), served.ended),
            (&b"late words"[..], Ended::Eof),
            "tunnel: {tunnel}"
        );
    }
}

/// A reset on either side reaches the other as a reset, not as an orderly end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_propagate_both_ways() {
    let pki = Pki::new();
    for tunnel in [false, true] {
        let origin = Origin::spawn(Behaviour::ResetAfter(5)).await;
        let (sidecar, dst, _peer) = sidecar_to(&origin, tunnel, &pki).await;
        let mut client = sidecar.connect(dst).await;
        // Not a method token: detected as opaque at its first byte.
        client.write_all(b"<123>").await.unwrap();
        assert_reset(&mut client, &format!("origin reset, tunnel: {tunnel}")).await;

        let mut origin = Origin::spawn(Behaviour::Echo).await;
        let (sidecar, dst, peer) = sidecar_to(&origin, tunnel, &pki).await;
        let mut client = sidecar.connect(dst).await;
        client.write_all(b"<abc>").await.unwrap();
        let mut back = [0u8; 5];
        tokio::time::timeout(STEP, client.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        abort(client);
        match &peer {
            // The tunnel's far end sees the stream reset, not ended.
            Some(peer) => {
                eventually_or(
                    "the tunnel peer saw the stream reset",
                    || closes(&peer.metrics, Direction::Gateway, "downstream_reset") == 1,
                    || metrics_text(&peer.metrics),
                )
                .await
            }
            None => assert_eq!(origin.next_served().await.ended, Ended::Reset),
        }
    }
}

/// A draining outbound listener closes at once, lets an HTTP request in flight
/// finish (then closes that connection) and a byte stream run on, and finishes
/// once they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_streams_in_flight_and_refuses_new_ones() {
    let pki = Pki::new();
    let http = Origin::spawn(Behaviour::Http {
        delay: Duration::from_millis(300),
    })
    .await;
    let echo = Origin::spawn(Behaviour::Echo).await;
    let mut sidecar = Sidecar::start(FixedRoutes::default(), None, &pki).await;

    let mut stream = sidecar.connect(echo.addr).await;
    stream.write_all(b"<before>").await.unwrap();
    let mut back = [0u8; 8];
    stream.read_exact(&mut back).await.unwrap();
    let mut request = sidecar.connect(http.addr).await;
    request
        .write_all(b"GET /slow HTTP/1.1\r\nHost: slow.test\r\n\r\n")
        .await
        .unwrap();
    eventually("the request reached the origin", || {
        http.requests_started
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1
    })
    .await;

    sidecar.proxy.drain();
    assert_refuses_connections(sidecar.proxy.addr, "a draining listener").await;
    let response = read_http_response(&mut request).await;
    assert!(response.ends_with("GET /slow host=slow.test"), "{response}");
    let (rest, end) = read_to_end(&mut request).await;
    assert!(rest.is_empty() && end.is_ok(), "{rest:?} {end:?}");

    stream.write_all(b"<during>").await.unwrap();
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"<during>");
    stream.shutdown().await.unwrap();
    let (rest, end) = read_to_end(&mut stream).await;
    assert!(rest.is_empty() && end.is_ok(), "{rest:?} {end:?}");
    sidecar.proxy.drained().await;
}
