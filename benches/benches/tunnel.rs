//! Cost of opening one tunnel stream on a warm pool, against a fresh loopback TCP
//! connection, both measured in the same run.
//!
//! - `tunnel_stream_warm_pool`: a `proxy_core::pool::Pool` (one mTLS HTTP/2 connection,
//!   already up) opens a CONNECT stream to an in-process sidecar inbound
//!   (`proxy_core::inbound::Inbound` with `LocalDelivery`, the real accept and TLS
//!   path), which dials a loopback echo server; one byte goes there and back, then
//!   both ends close in order.
//! - `tcp_connect_loopback`: the same exchange on a new TCP connection straight to
//!   the echo server, which is what an application pays without the mesh.
//!
//! A warm stream costs no TLS handshake and no extra round trip to set up the link,
//! so the ratio says what the seed's "established multi-cluster connection" costs
//! per new application connection: the HTTP/2 CONNECT exchange, the server's dial to
//! the target and the framing of the byte. TLS handshake cost itself is the
//! `handshake` bench's subject. After criterion's report a summary prints each
//! variant's mean time per stream and its ratio to the TCP baseline; quote the ratio.

use std::collections::HashSet;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use isthmus_benches::{Tally, runtime, store};
use isthmus_vocab::{Authority, ClusterName, SpiffeId, TrustDomain};
use proxy_core::addr::FixedOrigDst;
use proxy_core::detect::DetectConfig;
use proxy_core::forward::ForwardConfig;
use proxy_core::http::{HttpProxy, HttpSettings};
use proxy_core::inbound::{AppAddress, Inbound, InboundConfig, ListenerRole, LocalDelivery};
use proxy_core::listen::{self, ListenConfig};
use proxy_core::metrics::{Direction, ProxyMetrics};
use proxy_core::pool::{PeerConfig, Pool};
use proxy_core::tunnel::H2Settings;
use proxy_core::tunnel::server::{Peer, TunnelServer};
use proxy_identity::mint::{self, KeyAlgorithm, Validity};
use proxy_identity::rustls::pki_types::ServerName;
use proxy_identity::{CredentialStore, PeerPolicy, client_config, server_config};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Bound on every wait of the setup and of each exchange, so a broken path fails
/// the bench instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

const GATEWAY_ID: &str = "spiffe://cluster.local/ns/default/sa/hello";
const SIDECAR_ID: &str = "spiffe://cluster.local/ns/default/sa/frontend";

/// Streams and time per variant, for the ratio summary.
static TALLY: Tally = Tally::new();

/// A loopback server that echoes every connection until its peer closes.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the echo server");
    let addr = listener.local_addr().expect("the echo server's address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A sidecar inbound listener terminating mesh TLS and delivering tunnel streams to
/// loopback ports, as `isthmus-proxy sidecar` runs it.
async fn inbound(gateway: Arc<CredentialStore>, shutdown: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the inbound listener");
    let addr = listener
        .local_addr()
        .expect("the inbound listener's address");
    let td = TrustDomain::parse("cluster.local").expect("a valid trust domain");
    let metrics = ProxyMetrics::default();
    let forward = ForwardConfig::default();
    let connect_timeout = Duration::from_secs(5);
    let tunnel = TunnelServer::new(
        Arc::new(LocalDelivery {
            // Connections arrive on 127.0.0.1: the pod's address here.
            app: AppAddress::Pod,
            connect_timeout,
            proxy_ports: HashSet::from([addr.port()]),
        }),
        H2Settings::default(),
        forward.clone(),
        metrics.clone(),
        Direction::Inbound,
    );
    let handler = Inbound {
        tls: Some(server_config(gateway, PeerPolicy::TrustDomain(td))),
        identify: Arc::new(|_| Peer {
            id: Some(Arc::from(SIDECAR_ID)),
            cluster: Some(ClusterName::parse("cluster-a").expect("a valid cluster name literal")),
            expires: None,
        }),
        handshake_failed: Arc::new(|_, _| "bench"),
        tunnel,
        // The listener's own address: every connection is for the tunnel, as when
        // a peer dials the inbound port directly.
        orig_dst: Arc::new(FixedOrigDst(addr)),
        role: ListenerRole::Sidecar,
        cfg: InboundConfig {
            connect_timeout,
            detect: DetectConfig::default(),
            opaque_ports: HashSet::new(),
            forward: forward.clone(),
            proxy_ports: HashSet::from([addr.port()]),
            tls_handshake_timeout: connect_timeout,
            app: AppAddress::Pod,
        },
        http: HttpProxy {
            metrics: metrics.clone(),
            direction: Direction::Inbound,
            settings: HttpSettings::default(),
            forward,
        },
        metrics: metrics.clone(),
    };
    let cfg = ListenConfig {
        max_connections: 10_000,
        grace: Duration::from_secs(1),
    };
    tokio::spawn(listen::serve(
        listener,
        Arc::new(handler),
        cfg,
        metrics,
        Direction::Inbound,
        shutdown,
    ));
    addr
}

/// Sends one byte, reads it back, then closes in order and waits for the far end's
/// close, so each iteration leaves nothing half-open behind.
async fn one_byte_exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    s.write_all(b"x").await.expect("send the byte");
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte).await.expect("the byte echoed");
    assert_eq!(&byte, b"x");
    s.shutdown().await.expect("close our side");
    let mut rest = [0u8; 16];
    let n = s.read(&mut rest).await.expect("the far end's close");
    assert_eq!(n, 0, "the echo sent more than it received");
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let anchor = mint::trust_anchor(
        &mint::default_anchor_name(),
        Validity::from_now(mint::DEFAULT_ANCHOR_LIFETIME),
        KeyAlgorithm::default(),
    )
    .expect("mint an anchor");
    let issuer = mint::issuer(
        &anchor,
        "cluster-a",
        Validity::from_now(mint::DEFAULT_ISSUER_LIFETIME),
        KeyAlgorithm::default(),
    )
    .expect("mint an issuer");
    let gateway = store(&issuer, GATEWAY_ID);
    let sidecar = store(&issuer, SIDECAR_ID);

    let stop = CancellationToken::new();
    let shutdown = stop.clone();
    let (echo, pool) = rt.block_on(async {
        let echo = echo_server().await;
        let inbound = inbound(gateway, shutdown.clone()).await;
        let pool = Pool::spawn(
            PeerConfig {
                name: Arc::from("bench/inbound"),
                addr: inbound,
                server_name: ServerName::try_from("hello.default.svc.cluster.local")
                    .expect("a valid DNS name"),
                tls: client_config(
                    sidecar,
                    PeerPolicy::Exact(SpiffeId::parse(GATEWAY_ID).expect("valid")),
                ),
                connect_timeout: Duration::from_secs(5),
                connections: 1,
                h2: H2Settings::default(),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(1),
                handshake_failed: None,
                deadline: None,
            },
            shutdown,
        );
        // The first open waits for the pool's connection: that is the warm-up.
        let authority =
            Authority::parse(&format!("echo.bench:{}", echo.port())).expect("a valid authority");
        let first = tokio::time::timeout(STEP, pool.open(&authority, None))
            .await
            .expect("the pool connects within the step")
            .expect("the inbound accepts the stream");
        tokio::time::timeout(STEP, one_byte_exchange(first))
            .await
            .expect("the first exchange finishes within the step");
        assert!(pool.state().is_up(), "pool state: {:?}", pool.state());
        (echo, pool)
    });
    let authority =
        Authority::parse(&format!("echo.bench:{}", echo.port())).expect("a valid authority");

    let mut group = c.benchmark_group("tunnel");
    group.throughput(Throughput::Elements(1));
    bench_exchange(&mut group, &rt, "tcp_connect_loopback", || async move {
        let s = TcpStream::connect(echo).await.expect("connect the echo");
        s.set_nodelay(true).expect("TCP_NODELAY");
        one_byte_exchange(s).await;
    });
    let (pool, authority) = (&pool, &authority);
    bench_exchange(&mut group, &rt, "tunnel_stream_warm_pool", || async move {
        let stream = pool
            .open(authority, None)
            .await
            .expect("open a stream on the warm pool");
        one_byte_exchange(stream).await;
    });
    group.finish();
    stop.cancel();
    summary();
}

/// Benchmarks `name`: one `exchange` per iteration, each bounded by [`STEP`].
fn bench_exchange<F, Fut>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &'static str,
    exchange: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let elapsed = rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    tokio::time::timeout(STEP, exchange())
                        .await
                        .unwrap_or_else(|_| panic!("{name}: an exchange finishes within the step"));
                }
                start.elapsed()
            });
            TALLY.add(name, iters, elapsed);
            elapsed
        })
    });
}

/// Prints each variant's mean time per stream over warm-up and measurement, and its
/// ratio to the TCP baseline.
fn summary() {
    TALLY.summary(
        "tunnel stream setup relative to a fresh loopback TCP connection (same run):",
        "tcp_connect_loopback",
        |streams, time| (streams > 0).then(|| time.as_secs_f64() / streams as f64),
        |name, mean, ratio| format!("{name:<24} {:>8.1} us/stream  ratio {ratio:.2}", mean * 1e6),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
