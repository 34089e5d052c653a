//! The standalone role's explicit proxy (`HTTPS_PROXY`/`HTTP_PROXY`) in process:
//! `CONNECT` and absolute-form requests, routed by name through a fixed table to
//! a minted gateway's tunnel or straight to loopback origins.
#![allow(clippy::unwrap_used)]

mod support;

use isthmus_vocab::Refusal;
use proxy_core::metrics::{Direction, ProxyMetrics};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a laptop's process names the mirrored service.
const HELLO_NAME: &str = "hello.test:80";

struct Standalone {
    proxy: Listening,
    metrics: ProxyMetrics,
}

impl Standalone {
    async fn start(routes: FixedRoutes, gateway: Option<&TunnelPeer>, pki: &Pki) -> Standalone {
        let metrics = ProxyMetrics::default();
        let me = pki.identity(CLUSTER, WORKLOAD_ID);
        let pool = gateway.map(|peer| me.pool_to(&peer.identity, peer.addr));
        let proxy = Listening::start(
            explicit(routes, pool, &metrics),
            "127.0.0.1:0".parse().unwrap(),
            Direction::Outbound,
            &metrics,
        )
        .await;
        Standalone { proxy, metrics }
    }

    /// Sends `CONNECT target` on a new connection; returns it and the answer's head.
    async fn connect(&self, target: &str) -> (TcpStream, String) {
        let mut stream = TcpStream::connect(self.proxy.addr).await.unwrap();
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let head = read_head(&mut stream).await;
        (stream, head)
    }
}

/// Reads a response head byte by byte, so the tunnel's bytes stay in the socket.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(STEP, stream.read_u8())
            .await
            .expect("no answer in time")
            .expect("connection closed before the answer's head ended");
        head.push(byte);
    }
    String::from_utf8(head).unwrap()
}

fn status(head: &str) -> u16 {
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn echo_through(stream: &mut TcpStream, payload: &[u8]) {
    stream.write_all(payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let (echoed, end) = read_to_end(stream).await;
    end.unwrap();
    assert_eq!(echoed, payload);
}

/// `CONNECT` to a mirrored name opens a tunnel stream for its service authority in
/// its cluster; any other name is connected to directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_routed_by_name() {
    let pki = Pki::new();
    let mut behind_gateway = Origin::spawn(Behaviour::Echo).await;
    let mut direct = Origin::spawn(Behaviour::Echo).await;
    let mut peer = TunnelPeer::spawn(
        &pki,
        &[(HELLO, Answer::Deliver(behind_gateway.addr))],
        Answer::Refuse(Refusal::NotExported),
    )
    .await;
    let routes = FixedRoutes::default().mirror_name(HELLO_NAME, CLUSTER, HELLO);
    let standalone = Standalone::start(routes, Some(&peer), &pki).await;

    let (mut stream, head) = standalone.connect(HELLO_NAME).await;
    assert_eq!(status(&head), 200, "{head}");
    echo_through(&mut stream, b"by name, through the tunnel").await;
    let seen = peer.next_request().await;
    assert_eq!(
        (seen.authority.as_str(), seen.cluster.as_deref()),
        (HELLO, Some(CLUSTER))
    );
    assert_eq!(
        behind_gateway.next_served().await.received,
        b"by name, through the tunnel"
    );

    let (mut stream, head) = standalone.connect(&direct.addr.to_string()).await;
    assert_eq!(status(&head), 200, "{head}");
    echo_through(&mut stream, b"straight").await;
    assert_eq!(direct.next_served().await.received, b"straight");
    assert!(peer.try_request().is_none(), "a direct name was tunnelled");
}

/// Every refusal, from the gateway or of the proxy's own, answers the `CONNECT`
/// with its status and names itself in `isthmus-refusal`, and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_answer_with_the_reason() {
    let pki = Pki::new();
    let (peer, names) = TunnelPeer::refusing_each(&pki).await;
    let routes = names
        .iter()
        .fold(FixedRoutes::default(), |r, n| r.mirror_name(n, CLUSTER, n));
    let standalone = Standalone::start(routes, Some(&peer), &pki).await;
    for (name, refusal) in names.iter().zip(Refusal::ALL) {
        let (_stream, head) = standalone.connect(name).await;
        assert_eq!(
            status(&head),
            refusal.status().as_u16(),
            "{refusal}: {head}"
        );
        assert_eq!(header(&head, "isthmus-refusal"), Some(refusal.as_str()));
        assert_eq!(
            refusals(&standalone.metrics, Direction::Outbound, refusal.as_str()),
            1,
            "{refusal}"
        );
    }

    // Refusals of the proxy's own: a closed port, a mirrored name without a
    // gateway, a target that is no authority.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let routes = FixedRoutes::default().mirror_name(HELLO_NAME, CLUSTER, HELLO);
    let standalone = Standalone::start(routes, None, &pki).await;
    for (target, refusal) in [
        (closed.to_string(), Refusal::UpstreamRefused),
        (HELLO_NAME.to_owned(), Refusal::LinkDown),
    ] {
        let (_stream, head) = standalone.connect(&target).await;
        assert_eq!(status(&head), refusal.status().as_u16(), "{target}: {head}");
        assert_eq!(header(&head, "isthmus-refusal"), Some(refusal.as_str()));
        assert_eq!(
            refusals(&standalone.metrics, Direction::Outbound, refusal.as_str()),
            1
        );
    }
    let mut stream = TcpStream::connect(standalone.proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /no/authority HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert_eq!(status(&head), 400, "{head}");
    assert_eq!(header(&head, "isthmus-refusal"), Some("bad_request"));
}

/// An absolute-form request is forwarded as one request, in origin form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_requests_are_forwarded_in_origin_form() {
    let pki = Pki::new();
    let origin = Origin::spawn(Behaviour::Http {
        delay: std::time::Duration::ZERO,
    })
    .await;
    let standalone = Standalone::start(FixedRoutes::default(), None, &pki).await;
    let mut stream = TcpStream::connect(standalone.proxy.addr).await.unwrap();
    let request = format!(
        "GET http://{0}/path?q=1 HTTP/1.1\r\nHost: {0}\r\n\r\n",
        origin.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert_eq!(status(&head), 200, "{head}");
    let length: usize = header(&head, "content-length").unwrap().parse().unwrap();
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    assert_eq!(
        String::from_utf8(body).unwrap(),
        format!("GET /path?q=1 host={}", origin.addr)
    );
}

/// A draining explicit proxy closes its listener at once and lets an open
/// `CONNECT` stream run to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_connect_streams_and_refuses_new_connections() {
    let pki = Pki::new();
    let origin = Origin::spawn(Behaviour::Echo).await;
    let mut standalone = Standalone::start(FixedRoutes::default(), None, &pki).await;
    let (mut stream, head) = standalone.connect(&origin.addr.to_string()).await;
    assert_eq!(status(&head), 200, "{head}");
    stream.write_all(b"before").await.unwrap();
    let mut back = [0u8; 6];
    stream.read_exact(&mut back).await.unwrap();

    standalone.proxy.drain();
    assert_refuses_connections(standalone.proxy.addr, "a draining explicit proxy").await;
    echo_through(&mut stream, b"during the drain").await;
    drop(stream);
    standalone.proxy.drained().await;
}
