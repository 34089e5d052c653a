//! The tunnel end to end over loopback TCP (TLS is the caller's layer and is
//! exercised by the proxy crate's tests).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use isthmus_vocab::{Authority, ClusterName, Refusal};
use proxy_core::forward::ForwardConfig;
use proxy_core::metrics::{Direction, ProxyMetrics, RefusalLabels};
use proxy_core::tunnel::H2Settings;
use proxy_core::tunnel::client::{self, OpenError};
use proxy_core::tunnel::server::{Peer, TunnelHandler, TunnelRequest, TunnelServer, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const STEP: Duration = Duration::from_secs(10);

/// Delivers `echo.test:7` in cluster `here` to a local echo server and refuses
/// everything else the way a gateway would.
struct EchoHandler {
    echo: std::net::SocketAddr,
}

impl TunnelHandler for EchoHandler {
    async fn open(&self, request: &TunnelRequest) -> Result<Upstream, Refusal> {
        match (
            request.authority.as_str(),
            request.cluster.as_ref().map(|c| c.as_str()),
        ) {
            ("echo.test:7", Some("here")) => Ok(Upstream::Connected(Box::new(
                TcpStream::connect(self.echo).await.unwrap(),
            ))),
            ("echo.test:7", Some(_)) => Err(Refusal::UnknownCluster),
            // A far end that never answers (a black-holed peer).
            ("silent.test:7", _) => std::future::pending().await,
            _ => Err(Refusal::NotExported),
        }
    }
}

async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn tunnel_server(metrics: ProxyMetrics) -> (std::net::SocketAddr, CancellationToken) {
    let echo = echo_server().await;
    let server = TunnelServer::new(
        Arc::new(EchoHandler { echo }),
        H2Settings::default(),
        ForwardConfig::default(),
        metrics,
        Direction::Gateway,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tx = CancellationToken::new();
    let rx = tx.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let server = server.clone();
            let rx = rx.clone();
            tokio::spawn(async move {
                server
                    .serve_connection(
                        s,
                        Peer {
                            id: Some(Arc::from("peer")),
                            cluster: Some(ClusterName::parse("cluster-a").unwrap()),
                            expires: None,
                        },
                        rx,
                    )
                    .await
            });
        }
    });
    (addr, tx)
}

/// A tunnel client connected to `addr`, its connection driven in the background.
async fn connected(addr: std::net::SocketAddr) -> client::TunnelSender {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = client::handshake(tcp, &H2Settings::default())
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Opens a stream and waits for the far end's answer to it.
async fn answer(
    sender: &mut client::TunnelSender,
    authority: &Authority,
    cluster: &ClusterName,
    answer_within: Duration,
) -> Result<(), OpenError> {
    timeout(STEP, async {
        let mut stream = client::open(sender, authority, Some(cluster), answer_within).await?;
        stream.verdict().await
    })
    .await
    .expect("no answer within STEP")
}

/// Asserts the far end refused a stream to `authority` with `refusal`.
async fn assert_refused(
    sender: &mut client::TunnelSender,
    authority: &Authority,
    cluster: &ClusterName,
    answer_within: Duration,
    refusal: Refusal,
) {
    let got = answer(sender, authority, cluster, answer_within).await;
    assert!(
        matches!(got, Err(OpenError::Refused(r)) if r == refusal),
        "{authority}: expected {refusal}, got {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_share_one_connection_and_refusals_name_their_reason() {
    let metrics = ProxyMetrics::default();
    let (addr, _drain) = tunnel_server(metrics.clone()).await;
    let sender = connected(addr).await;

    let authority = Authority::parse("echo.test:7").unwrap();
    let here = ClusterName::parse("here").unwrap();
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let mut sender = sender.clone();
        let authority = authority.clone();
        let here = here.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = client::open(&mut sender, &authority, Some(&here), STEP)
                .await
                .unwrap();
            let payload: Vec<u8> = (0..100_000u32)
                .map(|b| (b.wrapping_mul(i + 1) % 251) as u8)
                .collect();
            stream.write_all(&payload).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut back = Vec::new();
            stream.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, payload, "stream {i} came back altered");
        }));
    }
    for t in tasks {
        timeout(STEP, t).await.unwrap().unwrap();
    }

    let mut s = sender.clone();
    let secret = Authority::parse("secret.test:7").unwrap();
    assert_refused(&mut s, &secret, &here, STEP, Refusal::NotExported).await;
    let elsewhere = ClusterName::parse("elsewhere").unwrap();
    assert_refused(
        &mut s,
        &authority,
        &elsewhere,
        STEP,
        Refusal::UnknownCluster,
    )
    .await;
    // An answer that does not come within the bound times the stream out.
    let silent = Authority::parse("silent.test:7").unwrap();
    let bound = Duration::from_millis(200);
    assert_refused(&mut s, &silent, &here, bound, Refusal::UpstreamTimeout).await;
    let counted = metrics
        .refusals
        .get_or_create(&RefusalLabels {
            direction: Direction::Gateway,
            reason: "not_exported",
        })
        .get();
    assert_eq!(counted, 1);
}

/// A client that ends its side and drops the stream before reading the reply still
/// closes it in order: the server side counts a clean close, not a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_after_a_clean_shutdown_closes_in_order() {
    let metrics = ProxyMetrics::default();
    let (addr, _drain) = tunnel_server(metrics.clone()).await;
    let mut sender = connected(addr).await;
    let authority = Authority::parse("echo.test:7").unwrap();
    let mut stream = client::open(
        &mut sender,
        &authority,
        Some(&ClusterName::parse("here").unwrap()),
        STEP,
    )
    .await
    .unwrap();
    stream.write_all(&[7u8; 64 * 1024]).await.unwrap();
    stream.shutdown().await.unwrap();
    drop(stream);

    let closes = |reason: &'static str| {
        metrics
            .tcp_closed
            .get_or_create(&proxy_core::metrics::TcpCloseLabels {
                direction: Direction::Gateway,
                reason,
            })
            .get()
    };
    let deadline = tokio::time::Instant::now() + STEP;
    while closes("eof") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never saw the stream end (reset: {})",
            closes("downstream_reset")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closes("downstream_reset"), 0);
}

/// A connection past its peer's deadline opens no stream, and a stream in flight
/// is cut once the expiry grace is over, even though PINGs keep the connection up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_deadline_opens_nothing_and_ends_after_the_grace() {
    let echo = echo_server().await;
    let grace = Duration::from_millis(500);
    let server = TunnelServer::new(
        Arc::new(EchoHandler { echo }),
        H2Settings::default(),
        ForwardConfig::default(),
        ProxyMetrics::default(),
        Direction::Gateway,
    )
    .with_expiry_grace(grace);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let expires = std::time::SystemTime::now() + Duration::from_secs(1);
    let rx = CancellationToken::new();
    let served = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let peer = Peer {
            id: Some(Arc::from("peer")),
            cluster: Some(ClusterName::parse("cluster-a").unwrap()),
            expires: Some(expires),
        };
        server.serve_connection(s, peer, rx).await
    });
    let mut sender = connected(addr).await;
    let authority = Authority::parse("echo.test:7").unwrap();
    let here = ClusterName::parse("here").unwrap();

    // Before the deadline: served, and kept open across it.
    let mut held = client::open(&mut sender, &authority, Some(&here), STEP)
        .await
        .unwrap();
    held.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    timeout(STEP, held.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");

    let wait = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    let late = answer(&mut sender, &authority, &here, STEP).await;
    assert!(
        late.is_err(),
        "a stream opened past the deadline was served"
    );

    // The stream in flight is cut when the grace is over.
    let mut rest = Vec::new();
    let ended = timeout(STEP, held.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the stream in flight outlived the grace");
    let result = timeout(STEP, served).await.unwrap().unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// A refused stream handed to the forwarder (which sees only I/O errors) still
/// leaves its typed refusal with the handler, whichever direction failed first, and
/// the outcome blames the tunnel peer, never the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reaches_the_handler_typed_through_the_forwarder() {
    use proxy_core::forward::{ByteCounters, forward_io};
    use proxy_core::outcome::{Outcome, Side};

    let (addr, _drain) = tunnel_server(ProxyMetrics::default()).await;
    let mut sender = connected(addr).await;
    let secret = Authority::parse("secret.test:7").unwrap();
    let here = ClusterName::parse("here").unwrap();
    for first_bytes in [&b""[..], b"hello", &[7u8; 300_000][..]] {
        let stream = client::open(&mut sender, &secret, Some(&here), STEP)
            .await
            .unwrap();
        let cell = stream.refusal_cell();
        // The application side stays open and silent: only the tunnel can end this.
        let (downstream, _app) = tokio::io::duplex(64 * 1024);
        let forwarded = timeout(
            STEP,
            forward_io(
                downstream,
                stream,
                first_bytes,
                &ForwardConfig::default(),
                &ByteCounters::default(),
            ),
        )
        .await
        .unwrap();
        let error = forwarded.unwrap_err();
        assert_ne!(error.side(), Side::Downstream, "{error}");
        assert_eq!(cell.get(), Some(Refusal::NotExported), "{error}");
        let outcome = Outcome::refused_by_peer(cell.get().unwrap());
        assert_eq!(outcome.close_label(), "not_exported");
        assert_eq!(outcome.refusal_label(), Some("not_exported"));
    }
}
