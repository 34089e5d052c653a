//! The gateway in process: a fixed table of exported Services and Links, minted
//! identities, origins on loopback, and the real tunnel server and accept loop in
//! front of [`Gateway`]. Delivery, relay over a link, every refusal the gateway
//! gives, drain, half-close and resets; no root, no namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_vocab::{Authority, CLUSTER_HEADER, ClusterName, REFUSAL_HEADER, Refusal, SpiffeId};
use proxy_core::gateway::{
    Endpoint, Gateway, GatewayConfig, GatewayLookup, GatewayMetrics, GatewayTls, LinkTarget,
};
use proxy_core::inbound::{AppAddress, Inbound, InboundConfig, ListenerRole};
use proxy_core::listen::ListenConfig;
use proxy_core::metrics::{Direction, ProxyMetrics};
use proxy_core::pool::Pool;
use proxy_core::tunnel::H2Settings;
use proxy_core::tunnel::client::TunnelStream;
use proxy_core::tunnel::server::TunnelServer;
use proxy_identity::PeerPolicy;
use proxy_identity::rustls::pki_types::ServerName;
use support::{
    Answer, Behaviour, Ended, FakeOrigDst, GATEWAY_ID, HELLO, Identity, Origin, Pki, STEP,
    TunnelPeer, WORKLOAD_ID, assert_exchange, assert_heard_after_greeting, closes, counts,
    refusals,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const A: &str = "cluster-a";
const B: &str = "cluster-b";

// ---------------------------------------------------------------------------
// The table and the TLS the gateway is handed

/// A [`GatewayLookup`] from a table a test fills and changes.
#[derive(Default)]
struct Table {
    exported: Mutex<HashMap<String, Result<Vec<Endpoint>, Refusal>>>,
    links: Mutex<BTreeMap<ClusterName, LinkTarget>>,
}

impl Table {
    fn export(&self, authority: &str, endpoints: Result<Vec<Endpoint>, Refusal>) {
        self.exported
            .lock()
            .unwrap()
            .insert(authority.to_owned(), endpoints);
    }

    fn plain(&self, authority: &str, addrs: &[SocketAddr]) {
        self.export(
            authority,
            Ok(addrs.iter().map(|a| endpoint(*a, false)).collect()),
        );
    }

    fn link(&self, cluster: &str, addr: SocketAddr) {
        self.links.lock().unwrap().insert(
            ClusterName::parse(cluster).unwrap(),
            LinkTarget {
                address: addr.ip().to_string(),
                port: addr.port(),
                identity: SpiffeId::parse(GATEWAY_ID).unwrap(),
                probe_period: Duration::from_millis(100),
                probe_port: 15021,
                probe_path: "/ready".to_owned(),
            },
        );
    }
}

fn endpoint(addr: SocketAddr, meshed: bool) -> Endpoint {
    Endpoint { addr, meshed }
}

impl GatewayLookup for Table {
    fn exported(&self, authority: &Authority) -> Result<Vec<Endpoint>, Refusal> {
        self.exported
            .lock()
            .unwrap()
            .get(authority.as_str())
            .cloned()
            .unwrap_or(Err(Refusal::NoRoute))
    }

    fn links(&self) -> BTreeMap<ClusterName, LinkTarget> {
        self.links.lock().unwrap().clone()
    }

    fn is_endpoint(&self, ip: IpAddr) -> bool {
        self.exported
            .lock()
            .unwrap()
            .values()
            .flatten()
            .flatten()
            .any(|e| e.addr.ip() == ip)
    }
}

/// The client TLS the proxy builds for a gateway, from a minted identity.
struct MintedTls(Identity);

impl GatewayTls for MintedTls {
    fn link(
        &self,
        cluster: &ClusterName,
        identity: &SpiffeId,
    ) -> Arc<proxy_identity::rustls::ClientConfig> {
        self.0
            .client_config(PeerPolicy::Exact(identity.clone()).in_cluster(cluster.clone()))
    }

    fn pod(&self) -> Arc<proxy_identity::rustls::ClientConfig> {
        self.0.client_config(self.0.own_cluster_policy())
    }
}

// ---------------------------------------------------------------------------
// A gateway under test

struct Setup {
    cluster: &'static str,
    allow_local_endpoints: bool,
    pod_port: u16,
    connect_timeout: Duration,
}

impl Setup {
    fn new(cluster: &'static str) -> Self {
        Setup {
            cluster,
            // Every endpoint of these tests is on loopback.
            allow_local_endpoints: true,
            pod_port: 1,
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// A gateway behind the production accept loop on `127.0.0.1`.
struct GatewayUnderTest {
    addr: SocketAddr,
    identity: Identity,
    gateway: Arc<Gateway>,
    table: Arc<Table>,
    metrics: ProxyMetrics,
    changes: watch::Sender<u64>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Drop for GatewayUnderTest {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl GatewayUnderTest {
    /// A gateway of `cluster` that delivers [`HELLO`] to the plain `addrs`.
    async fn plain(pki: &Pki, cluster: &'static str, addrs: &[SocketAddr]) -> GatewayUnderTest {
        let table = Arc::new(Table::default());
        table.plain(HELLO, addrs);
        GatewayUnderTest::start(pki, Setup::new(cluster), table).await
    }

    /// A gateway of `cluster` with one Link, to `peer`'s gateway at `addr`.
    async fn linked(
        pki: &Pki,
        cluster: &'static str,
        peer: &str,
        addr: SocketAddr,
    ) -> GatewayUnderTest {
        let table = Arc::new(Table::default());
        table.link(peer, addr);
        GatewayUnderTest::start(pki, Setup::new(cluster), table).await
    }

    async fn start(pki: &Pki, setup: Setup, table: Arc<Table>) -> GatewayUnderTest {
        let identity = pki.identity(setup.cluster, GATEWAY_ID);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let shutdown_rx = shutdown.clone();
        let gateway = Gateway::new(
            GatewayConfig {
                cluster: ClusterName::parse(setup.cluster).unwrap(),
                connect_timeout: setup.connect_timeout,
                own_addrs: HashSet::from([addr]),
                allow_local_endpoints: setup.allow_local_endpoints,
                pod_port: setup.pod_port,
                pools: support::gateway_pools(setup.connect_timeout),
                balance: Default::default(),
            },
            table.clone(),
            Arc::new(MintedTls(identity.clone())),
            GatewayMetrics::default(),
            shutdown_rx.clone(),
            TaskTracker::new(),
        );
        let (changes, changes_rx) = watch::channel(0);
        tokio::spawn(gateway.clone().follow(changes_rx));
        let metrics = ProxyMetrics::default();
        // Were the role inferred from the original destination, every connection
        // here would "mean" this address and be taken for redirected plain TCP.
        let orig_dst = FakeOrigDst::new();
        orig_dst.set_unmapped(SocketAddr::from((Ipv4Addr::LOCALHOST, 9)));
        let inbound = Arc::new(Inbound {
            role: ListenerRole::Gateway,
            tls: Some(
                identity.server_config(PeerPolicy::TrustDomain(identity.id.trust_domain().clone())),
            ),
            identify: identity.identify(),
            handshake_failed: Arc::new(|_, _| "test"),
            tunnel: TunnelServer::new(
                gateway.clone(),
                H2Settings::default(),
                Default::default(),
                metrics.clone(),
                Direction::Gateway,
            ),
            orig_dst,
            cfg: InboundConfig {
                connect_timeout: setup.connect_timeout,
                detect: support::detect_config(),
                opaque_ports: Default::default(),
                forward: Default::default(),
                proxy_ports: Default::default(),
                tls_handshake_timeout: Duration::from_secs(2),
                app: AppAddress::Pod,
            },
            http: support::http_proxy(&metrics, Direction::Gateway),
            metrics: metrics.clone(),
        });
        let task = tokio::spawn(proxy_core::listen::serve(
            listener,
            inbound,
            ListenConfig {
                max_connections: 1024,
                grace: support::GRACE,
            },
            metrics.clone(),
            Direction::Gateway,
            shutdown_rx,
        ));
        GatewayUnderTest {
            addr,
            identity,
            gateway,
            table,
            metrics,
            changes,
            shutdown,
            task: Some(task),
        }
    }

    /// A pool from `client` (a sidecar, or a peer gateway) to this gateway.
    fn pool_from(&self, client: &Identity) -> Pool {
        client.pool_to(&self.identity, self.addr)
    }

    /// Tells the gateway its table changed (Links are re-read).
    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn refused(&self, reason: &'static str) -> u64 {
        refusals(&self.metrics, Direction::Gateway, reason)
    }
}

fn authority(text: &str) -> Authority {
    Authority::parse(text).unwrap()
}

/// Opens `target` (in `cluster`, or the gateway's own) and waits for the answer.
async fn open(pool: &Pool, target: &str, cluster: Option<&str>) -> Result<TunnelStream, Refusal> {
    let cluster = cluster.map(|c| ClusterName::parse(c).unwrap());
    timeout(
        STEP,
        pool.open_answered(&authority(target), cluster.as_ref()),
    )
    .await
    .expect("the gateway did not answer in time")
    .map_err(|e| e.refusal())
}

async fn refusal(pool: &Pool, target: &str, cluster: Option<&str>) -> Refusal {
    match open(pool, target, cluster).await {
        Ok(_) => panic!("{target} in {cluster:?} was accepted, expected a refusal"),
        Err(refusal) => refusal,
    }
}

/// Writes `data` and reads back as many bytes.
async fn echo(stream: &mut TunnelStream, data: &[u8]) {
    stream.write_all(data).await.unwrap();
    let mut got = vec![0u8; data.len()];
    timeout(STEP, stream.read_exact(&mut got))
        .await
        .expect("no echo in time")
        .unwrap();
    assert_eq!(got, data);
}

/// A loopback port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------
// Delivery

#[tokio::test]
async fn a_sidecar_of_its_cluster_reaches_an_exported_service() {
    let pki = Pki::new();
    let mut origin = Origin::spawn(Behaviour::Echo).await;
    let gw = GatewayUnderTest::plain(&pki, A, &[origin.addr]).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));

    let mut stream = open(&pool, HELLO, None).await.unwrap();
    echo(&mut stream, b"hello through the gateway").await;
    // Naming its own cluster is the same as naming none.
    let mut named = open(&pool, HELLO, Some(A)).await.unwrap();
    echo(&mut named, b"again").await;
    drop((stream, named));
    let mut received = vec![
        origin.next_served().await.received,
        origin.next_served().await.received,
    ];
    received.sort();
    assert_eq!(
        received,
        [b"again".to_vec(), b"hello through the gateway".to_vec()]
    );
}

#[tokio::test]
async fn a_dead_endpoint_is_skipped_for_a_live_one() {
    let pki = Pki::new();
    let origin = Origin::spawn(Behaviour::Echo).await;
    let dead = closed_port().await;
    let gw = GatewayUnderTest::plain(&pki, A, &[dead, origin.addr]).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));
    // Round-robin starts on each endpoint in turn; every stream still lands.
    for _ in 0..4 {
        let mut stream = open(&pool, HELLO, None).await.unwrap();
        echo(&mut stream, b"x").await;
    }
}

#[tokio::test]
async fn a_meshed_pod_is_reached_over_its_sidecars_tunnel_only() {
    let pki = Pki::new();
    let origin = Origin::spawn(Behaviour::Echo).await;
    // The pod's sidecar: a mesh peer of cluster-a delivering to the app.
    let mut sidecar = TunnelPeer::spawn(&pki, &[], Answer::Deliver(origin.addr)).await;
    let app = SocketAddr::from((Ipv4Addr::LOCALHOST, origin.addr.port()));
    let table = Arc::new(Table::default());
    table.export(HELLO, Ok(vec![endpoint(app, true)]));
    let setup = Setup {
        pod_port: sidecar.addr.port(),
        ..Setup::new(A)
    };
    let gw = GatewayUnderTest::start(&pki, setup, table).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));

    let mut stream = open(&pool, HELLO, None).await.unwrap();
    echo(&mut stream, b"over the pod's tunnel").await;
    let seen = sidecar.next_request().await;
    // The sidecar is asked for the endpoint's own address, by the gateway's identity.
    assert_eq!(seen.authority, app.to_string());
    assert_eq!(seen.peer_id.as_deref(), Some(GATEWAY_ID));
    assert_eq!(seen.peer_cluster.as_deref(), Some(A));
}

#[tokio::test]
async fn a_meshed_pod_whose_sidecar_is_down_gets_no_plaintext() {
    let pki = Pki::new();
    let mut origin = Origin::spawn(Behaviour::Echo).await;
    let table = Arc::new(Table::default());
    table.export(HELLO, Ok(vec![endpoint(origin.addr, true)]));
    // Nothing listens on the sidecar port.
    let setup = Setup {
        pod_port: closed_port().await.port(),
        ..Setup::new(A)
    };
    let gw = GatewayUnderTest::start(&pki, setup, table).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));
    assert_eq!(refusal(&pool, HELLO, None).await, Refusal::UpstreamRefused);
    assert!(
        origin.try_served().is_none(),
        "the app was reached in plain text"
    );
}

#[tokio::test]
async fn a_pod_sidecars_verdict_on_its_app_stands() {
    let pki = Pki::new();
    for verdict in [
        Refusal::UpstreamRefused,
        Refusal::UpstreamTimeout,
        Refusal::Loop,
    ] {
        let sidecar = TunnelPeer::spawn(&pki, &[], Answer::Refuse(verdict)).await;
        let table = Arc::new(Table::default());
        table.export(
            HELLO,
            Ok(vec![endpoint(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
                true,
            )]),
        );
        let setup = Setup {
            pod_port: sidecar.addr.port(),
            ..Setup::new(A)
        };
        let gw = GatewayUnderTest::start(&pki, setup, table).await;
        let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));
        assert_eq!(refusal(&pool, HELLO, None).await, verdict);
    }
}

// ---------------------------------------------------------------------------
// Relay over a link

/// cluster-b's gateway exporting `hello` to an echo origin, and cluster-a's
/// gateway linked to it.
async fn linked_pair(pki: &Pki) -> (GatewayUnderTest, GatewayUnderTest, Origin) {
    let origin = Origin::spawn(Behaviour::Echo).await;
    let gw_b = GatewayUnderTest::plain(pki, B, &[origin.addr]).await;
    let gw_a = GatewayUnderTest::linked(pki, A, B, gw_b.addr).await;
    (gw_a, gw_b, origin)
}

#[tokio::test]
async fn a_sidecar_reaches_a_linked_clusters_service_through_both_gateways() {
    let pki = Pki::new();
    let (gw_a, _gw_b, _origin) = linked_pair(&pki).await;
    let pool = gw_a.pool_from(&pki.identity(A, WORKLOAD_ID));
    let mut stream = open(&pool, HELLO, Some(B)).await.unwrap();
    echo(&mut stream, b"across the link").await;

    // The link's probe answers, and /config can say so.
    support::eventually("the link probe to succeed", || {
        let links = gw_a.gateway.links();
        links.len() == 1 && links[0].cluster == B && links[0].probe.ok == Some(true)
    })
    .await;
}

#[tokio::test]
async fn a_link_whose_peer_is_not_that_clusters_gateway_carries_nothing() {
    let pki = Pki::new();
    // cluster-c's gateway holds the same SPIFFE ID; the Link says cluster-b.
    let origin = Origin::spawn(Behaviour::Echo).await;
    let gw_c = GatewayUnderTest::plain(&pki, "cluster-c", &[origin.addr]).await;
    let gw_a = GatewayUnderTest::linked(&pki, A, B, gw_c.addr).await;
    let pool = gw_a.pool_from(&pki.identity(A, WORKLOAD_ID));
    assert_eq!(refusal(&pool, HELLO, Some(B)).await, Refusal::LinkDown);
}

#[tokio::test]
async fn a_changed_link_is_rebuilt_and_a_removed_one_is_unknown() {
    let pki = Pki::new();
    let (gw_a, gw_b, _origin) = linked_pair(&pki).await;
    let pool = gw_a.pool_from(&pki.identity(A, WORKLOAD_ID));
    assert!(open(&pool, HELLO, Some(B)).await.is_ok());

    // Pointed elsewhere: the old pool goes, the new one is down.
    gw_a.table.link(B, closed_port().await);
    gw_a.changed();
    support::eventually("the link to be rebuilt", || {
        gw_a.gateway.links()[0].pool.peer().addr != gw_b.addr
    })
    .await;
    assert_eq!(refusal(&pool, HELLO, Some(B)).await, Refusal::LinkDown);

    gw_a.table.links.lock().unwrap().clear();
    gw_a.changed();
    support::eventually("the link to be removed", || gw_a.gateway.links().is_empty()).await;
    assert_eq!(
        refusal(&pool, HELLO, Some(B)).await,
        Refusal::UnknownCluster
    );
}

// ---------------------------------------------------------------------------
// Refusals

#[tokio::test]
async fn a_peer_gateway_may_not_relay_through_it_to_a_third_cluster() {
    let pki = Pki::new();
    let (gw_a, _gw_b, mut origin) = linked_pair(&pki).await;
    // cluster-c's gateway, and a workload of cluster-c, at cluster-a's gateway:
    // both authenticated, neither of cluster-a.
    for client in [
        pki.identity("cluster-c", GATEWAY_ID),
        pki.identity("cluster-c", WORKLOAD_ID),
    ] {
        let pool = gw_a.pool_from(&client);
        assert_eq!(refusal(&pool, HELLO, Some(B)).await, Refusal::Forbidden);
    }
    assert_eq!(gw_a.refused("forbidden"), 2);
    assert!(origin.try_served().is_none());
}

#[tokio::test]
async fn a_peer_gateway_reaches_only_this_clusters_exports() {
    let pki = Pki::new();
    let origin = Origin::spawn(Behaviour::Echo).await;
    let gw = GatewayUnderTest::plain(&pki, A, &[origin.addr]).await;
    let pool = gw.pool_from(&pki.identity(B, GATEWAY_ID));
    // Its own cluster's exports: delivered, whoever asks.
    let mut stream = open(&pool, HELLO, Some(A)).await.unwrap();
    echo(&mut stream, b"exported").await;
    // Back to its own cluster, or on to another: refused.
    assert_eq!(refusal(&pool, HELLO, Some(B)).await, Refusal::Forbidden);
}

#[tokio::test]
async fn a_cluster_without_a_link_is_unknown() {
    let pki = Pki::new();
    let (gw_a, _gw_b, _origin) = linked_pair(&pki).await;
    let pool = gw_a.pool_from(&pki.identity(A, WORKLOAD_ID));
    assert_eq!(
        refusal(&pool, HELLO, Some("cluster-z")).await,
        Refusal::UnknownCluster
    );
    assert_eq!(gw_a.refused("unknown_cluster"), 1);
}

#[tokio::test]
async fn what_the_table_does_not_offer_is_refused_with_its_reason() {
    let pki = Pki::new();
    let table = Arc::new(Table::default());
    table.export(
        "secret.default.svc.cluster.local:80",
        Err(Refusal::NotExported),
    );
    table.export("empty.default.svc.cluster.local:80", Ok(Vec::new()));
    table.export(
        "idle.default.svc.cluster.local:80",
        Err(Refusal::NoEndpoints),
    );
    let gw = GatewayUnderTest::start(&pki, Setup::new(A), table).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));
    for (target, want) in [
        ("secret.default.svc.cluster.local:80", Refusal::NotExported),
        ("nothing.default.svc.cluster.local:80", Refusal::NoRoute),
        ("empty.default.svc.cluster.local:80", Refusal::NoEndpoints),
        ("idle.default.svc.cluster.local:80", Refusal::NoEndpoints),
    ] {
        assert_eq!(refusal(&pool, target, None).await, want, "{target}");
        assert_eq!(refusal(&pool, target, Some(A)).await, want, "{target}");
    }
    assert_eq!(gw.refused("not_exported"), 2);
    assert_eq!(gw.refused("no_route"), 2);
    assert_eq!(gw.refused("no_endpoints"), 4);
}

#[tokio::test]
async fn a_link_that_is_down_refuses_relays() {
    let pki = Pki::new();
    let table = Arc::new(Table::default());
    table.link(B, closed_port().await);
    let setup = Setup {
        connect_timeout: Duration::from_millis(300),
        ..Setup::new(A)
    };
    let gw = GatewayUnderTest::start(&pki, setup, table).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));
    assert_eq!(refusal(&pool, HELLO, Some(B)).await, Refusal::LinkDown);
    assert_eq!(gw.refused("link_down"), 1);
}

#[tokio::test]
async fn an_endpoint_that_refuses_is_upstream_refused() {
    let pki = Pki::new();
    let gw = GatewayUnderTest::plain(&pki, A, &[closed_port().await]).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));
    assert_eq!(refusal(&pool, HELLO, None).await, Refusal::UpstreamRefused);
    assert_eq!(gw.refused("upstream_refused"), 1);
}

/// A loopback listener that never accepts, with its accept queue full: further
/// SYNs go unanswered, as to a black-holed pod.
async fn black_hole() -> (SocketAddr, TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    // The queue takes backlog + 1; a connect beyond it stays pending.
    for _ in 0..8 {
        match timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            _ => break,
        }
    }
    (addr, listener, fillers)
}

#[tokio::test]
async fn an_endpoint_that_does_not_answer_is_upstream_timeout() {
    let pki = Pki::new();
    let (hole, _listener, _fillers) = black_hole().await;
    let table = Arc::new(Table::default());
    table.plain(HELLO, &[hole]);
    let setup = Setup {
        connect_timeout: Duration::from_millis(300),
        ..Setup::new(A)
    };
    let gw = GatewayUnderTest::start(&pki, setup, table).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));
    assert_eq!(refusal(&pool, HELLO, None).await, Refusal::UpstreamTimeout);
    assert_eq!(gw.refused("upstream_timeout"), 1);
}

#[tokio::test]
async fn an_endpoint_on_this_host_is_a_loop_unless_allowed() {
    let pki = Pki::new();
    let mut origin = Origin::spawn(Behaviour::Echo).await;
    let table = Arc::new(Table::default());
    table.plain(HELLO, &[origin.addr]);
    let setup = Setup {
        allow_local_endpoints: false,
        ..Setup::new(A)
    };
    let gw = GatewayUnderTest::start(&pki, setup, table).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));
    assert_eq!(refusal(&pool, HELLO, None).await, Refusal::Loop);
    assert_eq!(gw.refused("loop"), 1);
    assert!(origin.try_served().is_none());
}

#[tokio::test]
async fn an_endpoint_at_the_gateways_own_port_is_a_loop_even_where_local_is_allowed() {
    let pki = Pki::new();
    let table = Arc::new(Table::default());
    let gw = GatewayUnderTest::start(&pki, Setup::new(A), table.clone()).await;
    // Any address of this host at the tunnel's port: the gateway itself.
    table.plain(
        HELLO,
        &[
            gw.addr,
            SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), gw.addr.port())),
        ],
    );
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));
    assert_eq!(refusal(&pool, HELLO, None).await, Refusal::Loop);
}

// ---------------------------------------------------------------------------
// Half-close, resets, drain

#[tokio::test]
async fn half_close_crosses_the_gateway_both_ways() {
    let pki = Pki::new();
    let mut replier = Origin::spawn(Behaviour::ReplyAfterEof).await;
    let mut greeter = Origin::spawn(Behaviour::GreetAndHalfClose(b"bye now")).await;
    let table = Arc::new(Table::default());
    table.plain(HELLO, &[replier.addr]);
    table.plain("greet.default.svc.cluster.local:80", &[greeter.addr]);
    let gw = GatewayUnderTest::start(&pki, Setup::new(A), table).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));

    // The client ends its side; the origin sees the end and still answers.
    let mut stream = open(&pool, HELLO, None).await.unwrap();
    assert_exchange(&mut stream, b"twelve bytes", b"got 12 bytes").await;
    assert_eq!(replier.next_served().await.ended, Ended::Eof);

    // The origin ends its side; the client still sends, and the origin reads it.
    let mut stream = open(&pool, "greet.default.svc.cluster.local:80", None)
        .await
        .unwrap();
    assert_heard_after_greeting(&mut stream, b"bye now", b"after your end", &mut greeter).await;
}

#[tokio::test]
async fn resets_cross_the_gateway_both_ways() {
    let pki = Pki::new();
    let mut resetter = Origin::spawn(Behaviour::ResetAfter(4)).await;
    let mut echo_origin = Origin::spawn(Behaviour::Echo).await;
    let table = Arc::new(Table::default());
    table.plain(HELLO, &[resetter.addr]);
    table.plain("echo.default.svc.cluster.local:80", &[echo_origin.addr]);
    let gw = GatewayUnderTest::start(&pki, Setup::new(A), table).await;
    let pool = gw.pool_from(&pki.identity(A, WORKLOAD_ID));

    // The origin resets: the client's stream fails, it does not end cleanly, and
    // the gateway blames the upstream.
    let mut stream = open(&pool, HELLO, None).await.unwrap();
    stream.write_all(b"four").await.unwrap();
    let mut buf = Vec::new();
    let ended = timeout(STEP, stream.read_to_end(&mut buf)).await.unwrap();
    assert!(ended.is_err(), "a reset upstream ended cleanly: {buf:?}");
    resetter.next_served().await;
    counts(&gw.metrics, closes, Direction::Gateway, "upstream_reset", 1).await;

    // The client resets (drops its stream mid-way): the origin's connection is
    // closed, and the gateway blames the downstream.
    let mut stream = open(&pool, "echo.default.svc.cluster.local:80", None)
        .await
        .unwrap();
    echo(&mut stream, b"then gone").await;
    drop(stream);
    assert_eq!(echo_origin.next_served().await.received, b"then gone");
    counts(
        &gw.metrics,
        closes,
        Direction::Gateway,
        "downstream_reset",
        1,
    )
    .await;
}

#[tokio::test]
async fn a_drain_lets_open_streams_finish_and_takes_no_new_connection() {
    let pki = Pki::new();
    let origin = Origin::spawn(Behaviour::Echo).await;
    let mut gw = GatewayUnderTest::plain(&pki, A, &[origin.addr]).await;
    let sidecar = pki.identity(A, WORKLOAD_ID);
    let pool = gw.pool_from(&sidecar);
    let mut stream = open(&pool, HELLO, None).await.unwrap();
    echo(&mut stream, b"before").await;

    gw.shutdown.cancel();
    // The stream in flight goes on across the drain.
    echo(&mut stream, b"during the drain").await;
    // The connection is told to go away (GOAWAY): no new stream opens on it.
    let mut refused = None;
    for _ in 0..100 {
        match open(&pool, HELLO, None).await {
            Ok(extra) => drop(extra),
            Err(refusal) => {
                refused = Some(refusal);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        refused,
        Some(Refusal::LinkDown),
        "a stream opened after the drain"
    );
    // A new connection finds the listener closed.
    let fresh = gw.pool_from(&sidecar);
    assert_eq!(refusal(&fresh, HELLO, None).await, Refusal::LinkDown);
    // The drain ends once the last stream does.
    stream.shutdown().await.unwrap();
    drop(stream);
    drop(pool);
    let task = gw.task.take().unwrap();
    timeout(STEP, task)
        .await
        .expect("the drain did not finish")
        .unwrap();
}

/// A CONNECT for `authority` whose cluster header is `cluster` as sent, whatever
/// it holds, from `client` over mTLS; the answer's status and refusal header.
async fn raw_connect(
    gw: &GatewayUnderTest,
    client: &Identity,
    authority: &str,
    cluster: &str,
) -> (u16, Option<String>) {
    let tls = client.client_config(gw.identity.as_peer());
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let server_name = ServerName::IpAddress(gw.addr.ip().into());
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .unwrap();
    let (mut sender, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .header(CLUSTER_HEADER, cluster)
        .body(())
        .unwrap();
    let (response, _send) = sender.send_request(request, false).unwrap();
    let response = timeout(STEP, response).await.unwrap().unwrap();
    let refusal = response
        .headers()
        .get(REFUSAL_HEADER)
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status().as_u16(), refusal)
}

#[tokio::test]
async fn a_malformed_request_is_refused_before_any_policy() {
    let pki = Pki::new();
    let (gw_a, _gw_b, mut origin) = linked_pair(&pki).await;
    let sidecar = pki.identity(A, WORKLOAD_ID);
    // A cluster header that is no cluster name never reaches the relay policy.
    for cluster in ["Cluster-B", "cluster_b", ""] {
        assert_eq!(
            raw_connect(&gw_a, &sidecar, HELLO, cluster).await,
            (400, Some("bad_request".to_owned())),
            "{cluster:?}"
        );
    }
    assert_eq!(gw_a.refused("bad_request"), 3);
    assert!(origin.try_served().is_none());
}
