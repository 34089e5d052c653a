//! The gateway role as operators run it: two real `isthmus-proxy gateway` processes
//! (cluster-a and cluster-b) on loopback, linked to each other, with identities
//! minted at test time and manifests written to temp dirs.
//!
//! The test process plays cluster-b's sidecar (a warm tunnel pool to gateway-b), a
//! peer gateway and impostors, and runs the echo server behind cluster-a's exported
//! Service. It counts what reaches that server, so a refusal that leaks a connection
//! fails the test.
//!
//! Covered: the relay over a pooled link (and its connection count per hop), every
//! refusal a gateway makes and the mTLS failures on either side, a dead, silent or
//! restarted peer, hot reload of exports and links, SIGTERM drain, identity
//! renewal, and a link to an IPv6 gateway.
//!
//! Not covered here: iptables capture and the sidecar role (the netns suite in
//! `tests/`), and throughput (the benches).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{Client, assert_echoed, round_trip, spawn_standalone, write_files};
use isthmus_test_support::echo::Echo;
use isthmus_test_support::proxy::free_addr;
use isthmus_test_support::{Pki, Proxy, STEP, eventually};
use isthmus_tests::multicluster::{cluster_settings, gateway_id, link, meshed_service, service};
use isthmus_vocab::{Authority, ClusterName, Refusal, SpiffeId};
use proxy_core::pool::{LinkState, PoolError};
use proxy_identity::mint::{self, LeafBundle};
use proxy_identity::{CredentialPaths, CredentialStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// How often the gateways re-read their manifests.
const RELOAD: &str = "200ms";
/// The gateways' connect timeout. Refusals are checked against a bound well below
/// it, so a refusal that waits for a timeout instead of failing fast is caught.
const GATEWAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(6);
const FAIL_FAST_BOUND: Duration = Duration::from_secs(3);
/// `--shutdown-grace` of the gateways.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// `--tunnel-connections` of the gateways: the link's pool size.
const LINK_CONNECTIONS: usize = 2;

const HELLO: &str = "hello.default.svc.cluster.local:80";
const SECRET: &str = "secret.default.svc.cluster.local:80";

fn sidecar_b_id() -> SpiffeId {
    SpiffeId::parse("spiffe://cluster.local/ns/default/sa/frontend").unwrap()
}

/// One `isthmus-proxy gateway` process that a test can kill and start again, with
/// other flags; its log is shown if the test is failing.
struct Gateway {
    cluster: &'static str,
    proxy: Option<Proxy>,
    /// Holds `identity-<cluster>/` and `manifests-<cluster>/`.
    root: PathBuf,
    inbound: SocketAddr,
    admin: SocketAddr,
    /// `--allow-local-endpoints`: the echo server behind the exports is on loopback.
    local_endpoints: bool,
}

impl Gateway {
    fn spawn(
        cluster: &'static str,
        root: &Path,
        inbound: SocketAddr,
        admin: SocketAddr,
    ) -> Gateway {
        let mut gateway = Gateway {
            cluster,
            proxy: None,
            root: root.to_owned(),
            inbound,
            admin,
            local_endpoints: true,
        };
        gateway.start();
        gateway
    }

    /// Another role's process (a sidecar, a standalone proxy) handled like one.
    fn other(cluster: &'static str, root: &Path, inbound: SocketAddr, proxy: Proxy) -> Gateway {
        Gateway {
            cluster,
            admin: proxy.admin,
            proxy: Some(proxy),
            root: root.to_owned(),
            inbound,
            local_endpoints: false,
        }
    }

    /// Starts the process (again, after [`Gateway::kill`]), with the flags of now,
    /// appending to its log.
    fn start(&mut self) {
        if let Some(old) = self.proxy.as_mut() {
            assert!(!old.running(), "gateway-{} is running", self.cluster);
        }
        let (cluster, root) = (self.cluster, &self.root);
        let proxy = Proxy::command(
            env!("CARGO_BIN_EXE_isthmus-proxy"),
            "gateway",
            cluster,
            &root.join(format!("identity-{cluster}")),
            &root.join(format!("manifests-{cluster}")),
            self.admin,
            root.join(format!("gateway-{cluster}.log")),
        )
        .args(["--inbound-addr", &self.inbound.to_string()])
        .args(["--reload-interval", RELOAD])
        .args([
            "--connect-timeout",
            &format!("{}s", GATEWAY_CONNECT_TIMEOUT.as_secs()),
        ])
        .args(["--tunnel-connections", &LINK_CONNECTIONS.to_string()])
        .args([
            "--shutdown-grace",
            &format!("{}s", SHUTDOWN_GRACE.as_secs()),
        ])
        .args(["--log", "info,proxy_core=debug"])
        .args(self.local_endpoints.then_some("--allow-local-endpoints"))
        .start();
        self.proxy = Some(proxy);
    }

    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("the gateway was started")
    }

    fn proxy_mut(&mut self) -> &mut Proxy {
        self.proxy.as_mut().expect("the gateway was started")
    }

    fn pid(&self) -> u32 {
        self.proxy().pid()
    }

    /// Sends SIGTERM, as a kubelet stopping the pod would.
    fn terminate(&self) {
        self.proxy().terminate();
    }

    /// Waits (bounded) for the process to exit by itself.
    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.proxy_mut().wait_exit(limit).await
    }

    fn kill(&mut self) {
        self.proxy_mut().kill();
    }

    /// Waits until the admin server answers `/ready`, failing at once if the process
    /// exited (a bad flag or manifest).
    async fn wait_ready(&mut self) {
        self.proxy_mut().wait_ready().await;
    }

    async fn config(&self) -> serde_json::Value {
        self.proxy().config().await
    }

    async fn metrics(&self) -> String {
        self.proxy().metrics().await
    }
}

fn write_identity(dir: &Path, leaf: &LeafBundle) -> Arc<CredentialStore> {
    leaf.write_dir(dir, false).unwrap();
    Arc::new(CredentialStore::load(CredentialPaths::in_dir(dir)).unwrap())
}

/// What the gateway suite asks of a client beyond opening streams.
impl Client {
    /// The refusal a stream gets within [`FAIL_FAST_BOUND`], failing if it was
    /// opened, failed another way or kept waiting.
    async fn refusal(&self, authority: &str, cluster: &str) -> Refusal {
        self.refusal_within(FAIL_FAST_BOUND, authority, cluster)
            .await
    }

    async fn refusal_within(&self, limit: Duration, authority: &str, cluster: &str) -> Refusal {
        let authority = Authority::parse(authority).unwrap();
        let target = ClusterName::parse(cluster).unwrap();
        match timeout(limit, self.pool.open_answered(&authority, Some(&target))).await {
            Err(_) => panic!("{authority} in {cluster}: no answer within {limit:?}"),
            Ok(Ok(_)) => panic!("{authority} in {cluster} was opened, expected a refusal"),
            Ok(Err(PoolError::Refused { refusal, .. })) => refusal,
            Ok(Err(e)) => panic!("{authority} in {cluster}: expected a refusal, got: {e}"),
        }
    }

    /// Waits until a stream to `authority` in `cluster` is refused with `refusal`
    /// (`what` happened).
    async fn until_refused(&self, what: &str, authority: &str, cluster: &str, refusal: Refusal) {
        eventually(what, STEP, || async {
            match self.open(authority, cluster).await {
                Err(PoolError::Refused { refusal: got, .. }) if got == refusal => Some(()),
                _ => None,
            }
        })
        .await;
    }

    /// Waits until the pool's state satisfies `ok` (bounded), returning it.
    async fn wait_state(&self, what: &str, ok: impl Fn(&LinkState) -> bool) -> LinkState {
        let deadline = Instant::now() + STEP;
        loop {
            let state = self.pool.state();
            if ok(&state) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "pool never became {what}: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Two linked clusters on loopback, each with its gateway process.
struct Mesh {
    pki: Pki,
    echo: Echo,
    gw_a: Gateway,
    gw_b: Gateway,
    /// Dropped last: the gateways' logs live here, shown when a test fails.
    dir: tempfile::TempDir,
}

impl Mesh {
    /// Starts both gateways on `127.0.<net>.1` (a) and `127.0.<net>.2` (b), so
    /// tests running in parallel never share an address, and waits until gateway-b's
    /// link to cluster-a is up.
    async fn start(net: u8) -> Mesh {
        Mesh::start_with(net, false).await
    }

    /// [`Mesh::start`], with cluster-a (gateway-a's tunnel listener and the echo
    /// server) on `::1` when `cluster_a_on_ipv6`.
    async fn start_with(net: u8, cluster_a_on_ipv6: bool) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let pki = Pki::new(&mint::default_anchor_name());
        let cluster_a_ip = if cluster_a_on_ipv6 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::new(127, 0, net, 1))
        };
        let echo = Echo::start(if cluster_a_on_ipv6 {
            cluster_a_ip
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        })
        .await;

        let inbound_a = free_addr(cluster_a_ip);
        let admin_a = free_addr(Ipv4Addr::new(127, 0, net, 1));
        let inbound_b = free_addr(Ipv4Addr::new(127, 0, net, 2));
        let admin_b = free_addr(Ipv4Addr::new(127, 0, net, 2));
        // Where cluster-a's Link to cluster-c points: nothing listens there.
        let cluster_c = free_addr(Ipv4Addr::new(127, 0, net, 3));

        for cluster in ["cluster-a", "cluster-b"] {
            write_identity(
                &root.join(format!("identity-{cluster}")),
                &pki.leaf(cluster, &gateway_id(cluster)),
            );
        }

        let a = root.join("manifests-cluster-a");
        std::fs::create_dir_all(&a).unwrap();
        write_files(
            &a,
            &[
                ("settings.yaml", &cluster_settings("cluster-a", inbound_a)),
                ("hello.yaml", &service("hello", echo.addr, true)),
                ("secret.yaml", &service("secret", echo.addr, false)),
            ],
        );
        // Exported, but with nothing behind it: no Endpoints, a closed port, and
        // gateway-a's own tunnel listener.
        let without_endpoints = service("empty", echo.addr, true);
        let (without_endpoints, _) = without_endpoints.split_once("---").unwrap();
        write_files(&a, &[("empty.yaml", &without_endpoints)]);
        let closed = free_addr(Ipv4Addr::LOCALHOST);
        write_files(
            &a,
            &[
                ("dead.yaml", &service("dead", closed, true)),
                ("looped.yaml", &service("looped", inbound_a, true)),
                (
                    "links.yaml",
                    &format!(
                        "{}---\n{}",
                        link("cluster-b", inbound_b, admin_b),
                        link("cluster-c", cluster_c, cluster_c)
                    ),
                ),
            ],
        );

        let b = root.join("manifests-cluster-b");
        std::fs::create_dir_all(b.join("clusters/cluster-a")).unwrap();
        write_files(
            &b,
            &[
                ("settings.yaml", &cluster_settings("cluster-b", inbound_b)),
                (
                    "link-cluster-a.yaml",
                    &link("cluster-a", inbound_a, admin_a),
                ),
            ],
        );
        // What cluster-b knows of cluster-a, as a controller watching it would see.
        write_files(
            &b,
            &[
                (
                    "clusters/cluster-a/settings.yaml",
                    &cluster_settings("cluster-a", inbound_a),
                ),
                (
                    "clusters/cluster-a/hello.yaml",
                    &service("hello", echo.addr, true),
                ),
            ],
        );

        let mut gw_a = Gateway::spawn("cluster-a", root, inbound_a, admin_a);
        let mut gw_b = Gateway::spawn("cluster-b", root, inbound_b, admin_b);
        gw_a.wait_ready().await;
        gw_b.wait_ready().await;
        let mesh = Mesh {
            pki,
            echo,
            gw_a,
            gw_b,
            dir,
        };
        eventually("gateway-b's link to cluster-a", STEP, || async {
            let config = mesh.gw_b.config().await;
            (config["links"]["cluster-a"]["up"] == true).then_some(())
        })
        .await;
        mesh
    }

    /// cluster-b's sidecar: a pool to gateway-b with its own identity.
    fn sidecar_b(&self) -> Client {
        let leaf = self.pki.leaf("cluster-b", &sidecar_b_id());
        self.client("identity-sidecar-b", &leaf, self.gw_b.inbound, "cluster-b")
    }

    /// A pool holding `leaf` (written to the directory `name`) to `gateway`, which
    /// must present `expect`'s gateway identity.
    fn client(&self, name: &str, leaf: &LeafBundle, gateway: SocketAddr, expect: &str) -> Client {
        let store = write_identity(&self.dir.path().join(name), leaf);
        Client::new(store, gateway, gateway_id(expect), 2, STEP)
    }

    /// Waits until gateway-b's `gateway_link_up` for its link to cluster-a is
    /// `value` (the gauge is refreshed periodically, not on every change).
    async fn link_gauge_is(&self, value: u8) {
        let sample = format!("gateway_link_up{{cluster=\"cluster-a\"}} {value}");
        eventually(&sample, STEP, || async {
            self.gw_b.metrics().await.contains(&sample).then_some(())
        })
        .await;
    }

    /// gateway-b's own identity, as it is on disk now, dialling gateway-a: a peer
    /// gateway.
    fn gateway_b_to_a(&self) -> Client {
        let paths = CredentialPaths::in_dir(self.dir.path().join("identity-cluster-b"));
        let store = Arc::new(CredentialStore::load(paths).unwrap());
        Client::new(store, self.gw_a.inbound, gateway_id("cluster-a"), 2, STEP)
    }
}

/// Established TCP connections that process `pid` holds to `peer`: the sockets in
/// `/proc/net/tcp` (loopback lists both ends) whose remote end is `peer` and whose
/// inode is among the process's open files.
fn established(pid: u32, peer: SocketAddr) -> usize {
    let SocketAddr::V4(peer) = peer else {
        panic!("IPv4 only")
    };
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let [a, b, c, d] = peer.ip().octets();
    let wanted = format!("{d:02X}{c:02X}{b:02X}{a:02X}:{:04X}", peer.port());
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2) == Some(&wanted.as_str())
                && fields.get(3) == Some(&"01")
                && fields.get(9).is_some_and(|inode| inodes.contains(*inode))
        })
        .count()
}

fn payload(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(131)) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cross_both_gateways_over_a_pooled_link() {
    const STREAMS: usize = 100;
    const BYTES: usize = 64 * 1024;
    let mesh = Mesh::start(61).await;
    let sidecar = mesh.sidecar_b();

    // Every stream is open at once: each sends a first chunk and waits for its echo,
    // then all wait while the connections to gateway-a are counted.
    let all_open = Arc::new(tokio::sync::Barrier::new(STREAMS + 1));
    let counted = Arc::new(tokio::sync::Barrier::new(STREAMS + 1));
    let sidecar = Arc::new(sidecar);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for n in 0..STREAMS {
        let (sidecar, all_open, counted) = (sidecar.clone(), all_open.clone(), counted.clone());
        tasks.push(tokio::spawn(async move {
            let data = payload(n, BYTES);
            let mut stream = sidecar
                .open(HELLO, "cluster-a")
                .await
                .unwrap_or_else(|e| panic!("stream {n}: {e}"));
            stream.write_all(&data[..1024]).await.unwrap();
            let mut first = vec![0u8; 1024];
            timeout(STEP, stream.read_exact(&mut first))
                .await
                .expect("first echo hung")
                .unwrap();
            assert_eq!(first, data[..1024], "stream {n}: first chunk garbled");
            timeout(STEP, all_open.wait()).await.unwrap();
            timeout(STEP, counted.wait()).await.unwrap();
            let back = round_trip(stream, &data[1024..]).await;
            assert!(back == data[1024..], "stream {n}: echo differs");
        }));
    }
    timeout(STEP, all_open.wait())
        .await
        .expect("not every stream opened");
    let link_connections = established(mesh.gw_b.pid(), mesh.gw_a.inbound);
    let sidecar_connections = established(std::process::id(), mesh.gw_b.inbound);
    let echo_connections = mesh.echo.accepted();
    counted.wait().await;
    for task in tasks {
        timeout(STEP, task).await.unwrap().unwrap();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{STREAMS} streams x {BYTES} B through two gateways in {elapsed:?}; \
         {sidecar_connections} sidecar connections, {link_connections} link connections, \
         {echo_connections} echo connections"
    );

    // One large stream both ways at once: flow control across both hops must neither
    // stall nor drop bytes when each direction holds far more than a window.
    const LARGE: usize = 16 * 1024 * 1024;
    let data = payload(STREAMS, LARGE);
    let started = Instant::now();
    let stream = sidecar.open(HELLO, "cluster-a").await.unwrap();
    let back = round_trip(stream, &data).await;
    assert!(
        back == data,
        "the large stream came back altered ({} B)",
        back.len()
    );
    eprintln!(
        "{} MiB echoed through two gateways in {:?}",
        LARGE >> 20,
        started.elapsed()
    );

    assert_eq!(
        echo_connections, STREAMS,
        "one upstream connection per stream"
    );
    assert!(
        (1..=2).contains(&sidecar_connections),
        "{STREAMS} streams rode {sidecar_connections} connections from the sidecar to \
         gateway-b; its pool holds 2"
    );
    assert!(
        (1..=LINK_CONNECTIONS).contains(&link_connections),
        "{STREAMS} streams rode {link_connections} connections from gateway-b to gateway-a; \
         the link pool holds {LINK_CONNECTIONS}"
    );
    let config = mesh.gw_b.config().await;
    let link = &config["links"]["cluster-a"];
    assert_eq!(link["up"], true, "{config:#}");
    assert_eq!(link["addr"], mesh.gw_a.inbound.to_string(), "{config:#}");
    let state = link["state"].as_str().unwrap_or_default();
    assert!(state.starts_with("up ("), "{config:#}");
    eprintln!("gateway-b /config link state: {state}");
    // The gauge and the probe are refreshed periodically, not on every change.
    mesh.link_gauge_is(1).await;
    eventually("the link probe to succeed", STEP, || async {
        let config = mesh.gw_b.config().await;
        (config["links"]["cluster-a"]["probe"]["ok"] == true).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_prompt_and_reach_nothing() {
    let mesh = Mesh::start(62).await;
    let sidecar = mesh.sidecar_b();
    // The set-up works: the refusals below are the gateways saying no.
    let stream = sidecar.open(HELLO, "cluster-a").await.unwrap();
    assert_eq!(round_trip(stream, b"ping").await, b"ping");
    // A peer gateway (here, gateway-b's own identity) reaches cluster-a's exports.
    let peer = mesh.gateway_b_to_a();
    let stream = peer.open(HELLO, "cluster-a").await.unwrap();
    assert_eq!(round_trip(stream, b"peer").await, b"peer");
    let reached = mesh.echo.accepted();
    assert_eq!(reached, 2);

    assert_eq!(
        sidecar.refusal(SECRET, "cluster-a").await,
        Refusal::NotExported
    );
    assert_eq!(
        sidecar
            .refusal("nosuch.default.svc.cluster.local:80", "cluster-a")
            .await,
        Refusal::NoRoute
    );
    assert_eq!(
        sidecar
            .refusal("hello.default.svc.cluster.local:81", "cluster-a")
            .await,
        Refusal::NoRoute
    );
    assert_eq!(
        sidecar.refusal(HELLO, "cluster-z").await,
        Refusal::UnknownCluster
    );
    // gateway-a's answers about its exports come back through gateway-b unchanged.
    for (service, expected) in [
        ("empty", Refusal::NoEndpoints),
        ("dead", Refusal::UpstreamRefused),
        ("looped", Refusal::Loop),
    ] {
        let authority = format!("{service}.default.svc.cluster.local:80");
        assert_eq!(
            sidecar.refusal(&authority, "cluster-a").await,
            expected,
            "{authority}"
        );
    }

    // A peer gateway may not hop through gateway-a to a third cluster, even one
    // gateway-a links to, nor back to its own.
    assert_eq!(peer.refusal(HELLO, "cluster-c").await, Refusal::Forbidden);
    assert_eq!(
        peer.refusal(HELLO, "cluster-b").await,
        Refusal::Forbidden,
        "relaying back to the peer's own cluster is a hop too"
    );
    // Nor may a workload of a linked cluster that dials gateway-a directly: only
    // leaves of cluster-a's own issuer may be relayed onward, whatever their
    // trust domain.
    let leaf = mesh.pki.leaf("cluster-b", &sidecar_b_id());
    let stray_b = mesh.client("identity-stray-b", &leaf, mesh.gw_a.inbound, "cluster-a");
    assert_eq!(
        stray_b.refusal(HELLO, "cluster-b").await,
        Refusal::Forbidden
    );
    assert_eq!(
        stray_b.refusal(HELLO, "cluster-c").await,
        Refusal::Forbidden
    );
    // Whereas a workload of cluster-a is told the link is down, not forbidden.
    let hello_client =
        SpiffeId::parse("spiffe://cluster.local/ns/default/sa/hello-client").unwrap();
    let leaf = mesh.pki.leaf("cluster-a", &hello_client);
    let sidecar_a = mesh.client("identity-sidecar-a", &leaf, mesh.gw_a.inbound, "cluster-a");
    assert_eq!(
        sidecar_a.refusal(HELLO, "cluster-c").await,
        Refusal::LinkDown
    );

    // A client whose certificate comes from another trust anchor: gateway-b refuses
    // the handshake. The client trusts our anchor too, so the failure is the
    // gateway's, not the client's.
    let foreign = Pki::new(&mint::default_anchor_name());
    let mut impostor = foreign.leaf("cluster-b", &sidecar_b_id());
    impostor.anchors_pem = format!("{}{}", impostor.anchors_pem, mesh.pki.anchor().anchors_pem);
    let impostor = mesh.client(
        "identity-impostor",
        &impostor,
        mesh.gw_b.inbound,
        "cluster-b",
    );
    let state = impostor
        .wait_state("down", |s| matches!(s, LinkState::Down { .. }))
        .await;
    // With TLS 1.3 the client learns of the refusal only after its side of the
    // handshake, so the stream fails as a lost connection or as the link down.
    match impostor.open(HELLO, "cluster-a").await {
        Err(e) if e.refusal() == Refusal::LinkDown => {}
        other => panic!("foreign client: expected the link down, got {other:?}"),
    }
    let LinkState::Down { error, .. } = &state else {
        unreachable!()
    };
    eprintln!("foreign client: {error}");
    let handshake_refusals = || async {
        let metrics = mesh.gw_b.metrics().await;
        metrics
            .lines()
            .find(|l| {
                l.starts_with("tunnel_refusals_total{") && l.contains("reason=\"tls_handshake\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .filter(|n| *n > 0)
    };
    let before = eventually("gateway-b to count the handshake", STEP, handshake_refusals).await;
    // A refused client backs off like any failed connect: the handshake "succeeding"
    // on the client's side must not reset its backoff to the minimum.
    const WINDOW: Duration = Duration::from_secs(2);
    tokio::time::sleep(WINDOW).await;
    let after = handshake_refusals().await.unwrap();
    let retries = after - before;
    let per_slot_bound = WINDOW.as_millis() / isthmus_tests::peer::BACKOFF_MAX.as_millis() + 4;
    eprintln!(
        "gateway-b refused {after} handshakes of the foreign client, {retries} in the last {WINDOW:?}"
    );
    assert!(
        u128::from(retries) <= 2 * per_slot_bound,
        "the foreign client retried {retries} times in {WINDOW:?}: its backoff does not grow"
    );

    // A gateway presenting another identity than the one expected: the client
    // refuses it (cluster-b's gateway where cluster-a's was expected).
    let leaf = mesh.pki.leaf("cluster-b", &sidecar_b_id());
    let misdirected = mesh.client("identity-sidecar-b2", &leaf, mesh.gw_b.inbound, "cluster-a");
    let state = misdirected
        .wait_state("down", |s| matches!(s, LinkState::Down { .. }))
        .await;
    let LinkState::Down { error, .. } = &state else {
        unreachable!()
    };
    assert!(
        error.contains("TLS"),
        "the wrong gateway identity should fail the TLS handshake: {error}"
    );
    assert!(matches!(
        misdirected.open(HELLO, "cluster-a").await,
        Err(PoolError::LinkDown { .. })
    ));
    eprintln!("wrong gateway identity: {error}");

    assert_eq!(
        mesh.echo.accepted(),
        reached,
        "a refused stream reached the echo server"
    );

    // Each gateway counted the refusals it made, by reason.
    let metrics_a = mesh.gw_a.metrics().await;
    let metrics_b = mesh.gw_b.metrics().await;
    for (metrics, reason, at_least) in [
        (&metrics_a, "not_exported", 1),
        (&metrics_a, "no_route", 2),
        (&metrics_a, "forbidden", 4),
        (&metrics_a, "link_down", 1),
        (&metrics_a, "no_endpoints", 1),
        (&metrics_a, "upstream_refused", 1),
        (&metrics_a, "loop", 1),
        (&metrics_b, "unknown_cluster", 1),
    ] {
        let counted = refusals(metrics, "gateway", reason);
        assert!(
            counted >= at_least,
            "{reason}: counted {counted}, expected at least {at_least}\n{metrics}"
        );
    }
}

/// An exported Service whose endpoint is the gateway's own host, on a port that is
/// not a tunnel listener's (its admin server, which answers `/config` to a loopback
/// peer), is refused as a loop and the gateway never connects to it: linked
/// clusters may not reach the gateway's host through an export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_on_the_gateways_own_host_is_a_loop_whatever_its_port() {
    let mut mesh = Mesh::start(63).await;
    let admin_a = mesh.gw_a.admin;
    let manifests = mesh.dir.path().join("manifests-cluster-a");
    let endpoints = [
        ("self-admin", admin_a),
        (
            "self-loopback",
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), admin_a.port()),
        ),
    ];
    for (name, addr) in endpoints {
        std::fs::write(
            manifests.join(format!("{name}.yaml")),
            service(name, addr, true),
        )
        .unwrap();
    }
    // In a cluster no backend is on the gateway's host: the flag the single-host
    // mesh needs is off.
    mesh.gw_a.kill();
    mesh.gw_a.local_endpoints = false;
    mesh.gw_a.start();
    mesh.gw_a.wait_ready().await;
    eventually("gateway-b's link to cluster-a again", STEP, || async {
        let config = mesh.gw_b.config().await;
        (config["links"]["cluster-a"]["up"] == true).then_some(())
    })
    .await;

    let sidecar = mesh.sidecar_b();
    for (name, addr) in endpoints {
        let authority = format!("{name}.default.svc.cluster.local:80");
        assert_eq!(
            sidecar.refusal(&authority, "cluster-a").await,
            Refusal::Loop,
            "{authority} (endpoint {addr})"
        );
    }
    assert_eq!(
        established(mesh.gw_a.pid(), admin_a),
        0,
        "gateway-a holds a connection to its own admin server"
    );
    // The export behind the echo server on loopback is refused too: the flag is
    // what a single-host mesh needs, and without it nothing local is reached.
    assert_eq!(sidecar.refusal(HELLO, "cluster-a").await, Refusal::Loop);
    assert_eq!(mesh.echo.accepted(), 0);
    let metrics = mesh.gw_a.metrics().await;
    assert_eq!(refusals(&metrics, "gateway", "loop"), 3, "{metrics}");
}

/// `tunnel_refusals_total` of one direction and reason (0 if absent).
fn refusals(metrics: &str, direction: &str, reason: &str) -> u64 {
    let wanted = format!("direction=\"{direction}\",reason=\"{reason}\"}}");
    metrics
        .lines()
        .find(|l| l.starts_with("tunnel_refusals_total{") && l.contains(&wanted))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_gateway_is_link_down_fast_and_the_link_recovers() {
    let mut mesh = Mesh::start(63).await;
    let sidecar = mesh.sidecar_b();
    let stream = sidecar.open(HELLO, "cluster-a").await.unwrap();
    assert_eq!(round_trip(stream, b"before").await, b"before");
    let reached = mesh.echo.accepted();

    mesh.gw_a.kill();
    let mut figures = Vec::new();
    for attempt in 0..5 {
        let started = Instant::now();
        let refusal = sidecar.refusal(HELLO, "cluster-a").await;
        figures.push(started.elapsed());
        assert_eq!(refusal, Refusal::LinkDown, "attempt {attempt}");
    }
    eprintln!("link_down refusals after the peer died took {figures:?}");

    let config = eventually("gateway-b to report the link down", STEP, || async {
        let config = mesh.gw_b.config().await;
        (config["links"]["cluster-a"]["up"] == false).then_some(config)
    })
    .await;
    let state = config["links"]["cluster-a"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(state.starts_with("down"), "{config:#}");
    eprintln!("gateway-b /config link state: {state}");
    mesh.link_gauge_is(0).await;
    let probe = eventually("the link probe to fail", STEP, || async {
        let config = mesh.gw_b.config().await;
        let probe = config["links"]["cluster-a"]["probe"].clone();
        (probe["ok"] == false).then_some(probe)
    })
    .await;
    eprintln!("gateway-b probe of the dead peer: {probe}");
    assert_eq!(mesh.echo.accepted(), reached);

    // The peer comes back on the same address: the link reconnects by itself
    // (its backoff is capped at a few seconds) and streams flow again.
    mesh.gw_a.start();
    mesh.gw_a.wait_ready().await;
    let started = Instant::now();
    let stream = eventually("the link to recover", STEP, || async {
        sidecar.open(HELLO, "cluster-a").await.ok()
    })
    .await;
    assert_eq!(round_trip(stream, b"after").await, b"after");
    eprintln!(
        "streams flowed again {:?} after gateway-a restarted",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_and_links_reload_without_restart_and_bad_files_keep_the_old_routes() {
    let mesh = Mesh::start(64).await;
    let sidecar = mesh.sidecar_b();
    const HELLO2: &str = "hello2.default.svc.cluster.local:80";
    assert_eq!(sidecar.refusal(HELLO2, "cluster-a").await, Refusal::NoRoute);

    let manifests = mesh.dir.path().join("manifests-cluster-a");
    write_files(
        &manifests,
        &[("hello2.yaml", &service("hello2", mesh.echo.addr, true))],
    );
    let started = Instant::now();
    let stream = eventually("hello2 to be routed", STEP, || async {
        sidecar.open(HELLO2, "cluster-a").await.ok()
    })
    .await;
    eprintln!(
        "a new export became reachable {:?} after its file was written",
        started.elapsed()
    );
    assert_eq!(round_trip(stream, b"new").await, b"new");

    let generation = mesh.gw_a.config().await["discovery"]["status"]["generation"].clone();
    write_files(
        &manifests,
        &[(
            "broken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n",
        )],
    );
    let status = eventually("gateway-a to report the bad manifest", STEP, || async {
        let status = mesh.gw_a.config().await["discovery"]["status"].clone();
        (status["stale"] == true).then_some(status)
    })
    .await;
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("broken.yaml"),
        "the error names the file: {status:#}"
    );
    assert_eq!(
        status["generation"], generation,
        "a bad reload was published"
    );
    for authority in [HELLO, HELLO2] {
        let stream = sidecar.open(authority, "cluster-a").await.unwrap();
        assert_eq!(round_trip(stream, b"still").await, b"still", "{authority}");
    }
    assert_eq!(
        sidecar.refusal(SECRET, "cluster-a").await,
        Refusal::NotExported
    );

    // Fixing the file resumes reloads; removing an export removes the route.
    std::fs::remove_file(manifests.join("broken.yaml")).unwrap();
    std::fs::remove_file(manifests.join("hello2.yaml")).unwrap();
    sidecar
        .until_refused(
            "hello2 to be withdrawn",
            HELLO2,
            "cluster-a",
            Refusal::NoRoute,
        )
        .await;

    // Removing cluster-b's Link to cluster-a closes the link; restoring it reopens it.
    let link_file = mesh
        .dir
        .path()
        .join("manifests-cluster-b/link-cluster-a.yaml");
    let link_yaml = std::fs::read_to_string(&link_file).unwrap();
    std::fs::remove_file(&link_file).unwrap();
    sidecar
        .until_refused(
            "cluster-a to become unknown at gateway-b",
            HELLO,
            "cluster-a",
            Refusal::UnknownCluster,
        )
        .await;
    let config = mesh.gw_b.config().await;
    assert!(config["links"]["cluster-a"].is_null(), "{config:#}");
    std::fs::write(&link_file, link_yaml).unwrap();
    let stream = eventually("the restored link to carry streams", STEP, || async {
        sidecar.open(HELLO, "cluster-a").await.ok()
    })
    .await;
    assert_eq!(round_trip(stream, b"again").await, b"again");
}

/// A listener that never accepts, with its one-slot queue already taken: the kernel
/// drops further SYNs, so a connect to it hangs until the caller's timeout.
async fn silent_listener(ip: Ipv4Addr) -> (socket2::Socket, TcpStream) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let queued = timeout(STEP, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    (socket, queued)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_gateway_is_link_down_within_the_connect_timeout() {
    let mesh = Mesh::start(65).await;
    let sidecar = mesh.sidecar_b();
    let (silent, _queued) = silent_listener(Ipv4Addr::new(127, 0, 65, 4)).await;
    let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();

    // A Link added at run time gets its pool without a restart.
    write_files(
        &mesh.dir.path().join("manifests-cluster-b"),
        &[(
            "link-cluster-d.yaml",
            &link("cluster-d", silent_addr, silent_addr),
        )],
    );
    eventually(
        "gateway-b to pick up the Link to cluster-d",
        STEP,
        || async {
            let config = mesh.gw_b.config().await;
            config["links"]["cluster-d"].is_object().then_some(())
        },
    )
    .await;

    // The first stream waits for the first connection, at most the connect timeout.
    let started = Instant::now();
    let refusal = sidecar
        .refusal_within(GATEWAY_CONNECT_TIMEOUT + STEP, HELLO, "cluster-d")
        .await;
    let first = started.elapsed();
    assert_eq!(refusal, Refusal::LinkDown);

    // Once the link is known down, streams are refused without waiting.
    let state = eventually("gateway-b to mark cluster-d down", STEP, || async {
        let config = mesh.gw_b.config().await;
        let state = config["links"]["cluster-d"]["state"].as_str()?.to_owned();
        state.starts_with("down").then_some(state)
    })
    .await;
    assert!(state.contains(&silent_addr.to_string()), "{state}");
    let started = Instant::now();
    assert_eq!(
        sidecar.refusal(HELLO, "cluster-d").await,
        Refusal::LinkDown,
        "a known-down link"
    );
    eprintln!(
        "silent peer: first refusal after {first:?} (connect timeout {GATEWAY_CONNECT_TIMEOUT:?}), \
         next after {:?}; {state}",
        started.elapsed()
    );
    // The other link is unaffected.
    let stream = sidecar.open(HELLO, "cluster-a").await.unwrap();
    assert_eq!(round_trip(stream, b"unaffected").await, b"unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_relayed_streams_then_cuts_the_rest() {
    let mut mesh = Mesh::start(67).await;
    let sidecar = mesh.sidecar_b();
    let mut finishing = sidecar.open(HELLO, "cluster-a").await.unwrap();
    let mut lingering = sidecar.open(HELLO, "cluster-a").await.unwrap();
    for stream in [&mut finishing, &mut lingering] {
        assert_echoed(stream, b"1").await;
    }

    mesh.gw_b.terminate();
    let terminated = Instant::now();
    // gateway-b stops taking tunnel connections...
    eventually("gateway-b to close its listener", STEP, || async {
        TcpStream::connect(mesh.gw_b.inbound)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // ...but a stream it carries still works, and finishes cleanly.
    let back = round_trip(finishing, b"2").await;
    assert_eq!(back, b"2", "a stream in flight was not drained");
    // One left open is cut when the grace period ends.
    let mut rest = Vec::new();
    let cut = timeout(SHUTDOWN_GRACE + STEP, lingering.read_to_end(&mut rest))
        .await
        .expect("a stream outlived the shutdown grace period");
    let cut_after = terminated.elapsed();
    assert!(rest.is_empty(), "{rest:?}");
    let status = mesh.gw_b.wait_exit(SHUTDOWN_GRACE + STEP).await;
    eprintln!(
        "gateway-b exited {status} {:?} after SIGTERM; the lingering stream ended \
         ({cut:?}) after {cut_after:?}, grace {SHUTDOWN_GRACE:?}",
        terminated.elapsed()
    );
    assert!(status.success(), "gateway-b exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_rotates_its_identity_without_dropping_streams() {
    let mesh = Mesh::start(68).await;
    let sidecar = mesh.sidecar_b();
    let mut stream = sidecar.open(HELLO, "cluster-a").await.unwrap();
    assert_echoed(&mut stream, b"1").await;
    let identity = |config: serde_json::Value| config["identity"].clone();
    let before = identity(mesh.gw_a.config().await);

    // A renewed leaf: same SPIFFE ID and issuer, new key and serial.
    let dir = mesh.dir.path().join("identity-cluster-a");
    mesh.pki
        .leaf("cluster-a", &gateway_id("cluster-a"))
        .write_dir(&dir, true)
        .unwrap();
    let after = eventually("gateway-a to load its renewed leaf", STEP, || async {
        let now = identity(mesh.gw_a.config().await);
        (now["serial"] != before["serial"]).then_some(now)
    })
    .await;
    assert_eq!(after["id"], before["id"]);
    // The stream opened under the old leaf carries on, both ways.
    assert_eq!(round_trip(stream, b"2").await, b"2");
    // A new peer connection handshakes with the renewed leaf.
    let peer = mesh.gateway_b_to_a();
    let fresh = peer.open(HELLO, "cluster-a").await.unwrap();
    assert_eq!(round_trip(fresh, b"3").await, b"3");

    // A broken update (a key that does not match the certificate) is refused and
    // the renewed leaf stays in use.
    let other = mesh.pki.leaf("cluster-a", &gateway_id("cluster-a"));
    write_files(&dir, &[("tls.key", &other.key_pem)]);
    let refused = eventually("gateway-a to refuse the bad key", STEP, || async {
        let now = identity(mesh.gw_a.config().await);
        (now["refusals"].as_u64() > after["refusals"].as_u64()).then_some(now)
    })
    .await;
    assert_eq!(refused["serial"], after["serial"], "{refused:#}");
    eprintln!("refused identity update: {}", refused["last_refusal"]);
    let peer_again = mesh.gateway_b_to_a();
    let fresh = peer_again.open(HELLO, "cluster-a").await.unwrap();
    assert_eq!(round_trip(fresh, b"4").await, b"4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_to_an_ipv6_gateway_carries_streams() {
    let mesh = Mesh::start_with(69, true).await;
    assert!(mesh.gw_a.inbound.is_ipv6() && mesh.echo.addr.is_ipv6());
    let sidecar = mesh.sidecar_b();
    for n in 0..10 {
        let data = payload(n, 4096);
        let stream = sidecar.open(HELLO, "cluster-a").await.unwrap();
        assert!(round_trip(stream, &data).await == data, "stream {n}");
    }
    assert_eq!(mesh.echo.accepted(), 10);
    let config = mesh.gw_b.config().await;
    assert_eq!(
        config["links"]["cluster-a"]["addr"],
        mesh.gw_a.inbound.to_string(),
        "{config:#}"
    );
    assert_eq!(
        sidecar.refusal(SECRET, "cluster-a").await,
        Refusal::NotExported
    );
}

/// The seed's ServiceMirror, as the example ships it.
const SEED_MIRROR: &str =
    include_str!("../../../examples/seed/cluster-b/cluster-b-servicemirror.yaml");

/// Sends `CONNECT authority` through an explicit proxy; the answer's head and, on
/// 200, the open stream.
async fn connect_via(proxy: SocketAddr, authority: &str) -> (String, TcpStream) {
    let mut stream = timeout(STEP, TcpStream::connect(proxy))
        .await
        .unwrap()
        .unwrap();
    stream
        .write_all(format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = timeout(STEP, stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (String::from_utf8_lossy(&head).into_owned(), stream)
}

/// The in-process variant of the seed's path on loopback: the standalone proxy of
/// cluster-b (the outbound side, reached by name) -> gateway-b -> gateway-a -> the
/// service, with the mirror added while everything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_added_at_run_time_is_reached_by_name_through_both_gateways() {
    let mesh = Mesh::start(70).await;
    let root = mesh.dir.path();
    write_identity(
        &root.join("identity-standalone-b"),
        &mesh.pki.leaf("cluster-b", &sidecar_b_id()),
    );
    let listen = free_addr(Ipv4Addr::new(127, 0, 70, 4));
    let admin = free_addr(Ipv4Addr::new(127, 0, 70, 4));
    let standalone = spawn_standalone(
        &root.join("identity-standalone-b"),
        &root.join("manifests-cluster-b"),
        listen,
        admin,
        &["--reload-interval", RELOAD],
        &root.join("standalone-b.log"),
    );
    let mut standalone = Gateway::other("cluster-b", root, listen, standalone);
    standalone.wait_ready().await;
    // Ready does not wait for the pool to gateway-b, which connects in the background.
    let config = eventually("the standalone proxy's pool to gateway-b", STEP, || async {
        let config = standalone.config().await;
        (config["gateway"]["up"] == true).then_some(config)
    })
    .await;
    assert!(
        !config.to_string().contains("hello-mirror"),
        "the mirror exists before it was written"
    );

    // Applying the seed's ServiceMirror makes the route appear without a restart.
    write_files(
        &root.join("manifests-cluster-b"),
        &[("mirror.yaml", SEED_MIRROR)],
    );
    let (head, mut stream) = eventually("the mirrored route", STEP, || async {
        let (head, stream) = connect_via(listen, HELLO).await;
        head.starts_with("HTTP/1.1 200").then_some((head, stream))
    })
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let before = mesh.echo.accepted();
    let sent = payload(7, 256 * 1024);
    stream.write_all(&sent).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    timeout(STEP, stream.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), sent.len());
    assert!(
        back == sent,
        "bytes changed on the way through both gateways"
    );
    assert_eq!(
        mesh.echo.accepted(),
        before,
        "the stream's data opened further connections to the service"
    );

    // Both gateways counted the stream they carried.
    for gateway in [&mesh.gw_b, &mesh.gw_a] {
        let metrics = gateway.metrics().await;
        assert!(
            metrics.contains("tcp_open_total{direction=\"gateway\"} "),
            "{metrics}"
        );
    }
}

/// A stream for a meshed pod rides mTLS into the pod's sidecar (its inbound tunnel
/// port), not plain TCP across the cluster; unmeshed endpoints keep working plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_a_meshed_pod_enter_through_its_sidecar() {
    let mesh = Mesh::start(71).await;
    let root = mesh.dir.path();
    let pod_ip = Ipv4Addr::new(127, 0, 71, 5);
    write_identity(
        &root.join("identity-pod-a"),
        &mesh.pki.leaf(
            "cluster-a",
            &SpiffeId::parse("spiffe://cluster.local/ns/default/sa/meshed").unwrap(),
        ),
    );
    let admin = free_addr(pod_ip);
    let sidecar = Proxy::command(
        env!("CARGO_BIN_EXE_isthmus-proxy"),
        "sidecar",
        "cluster-a",
        &root.join("identity-pod-a"),
        &root.join("manifests-cluster-a"),
        admin,
        root.join("sidecar-pod-a.log"),
    )
    .args(["--inbound-addr", &format!("{pod_ip}:4143")])
    .args(["--outbound-addr", &free_addr(pod_ip).to_string()])
    .start();
    let mut sidecar = Gateway::other("cluster-a", root, SocketAddr::from((pod_ip, 4143)), sidecar);
    sidecar.wait_ready().await;

    // The pod's endpoint is its own address at the app port, where the app (an
    // echo server) listens and the sidecar delivers. Discovery says the pod is
    // meshed: a Pod labelled so, named by the endpoint's targetRef.
    let app = Echo::start(pod_ip.into()).await;
    let pod_endpoint = app.addr;
    write_files(
        &root.join("manifests-cluster-a"),
        &[("meshed.yaml", &meshed_service("meshed", pod_endpoint, true))],
    );
    let client = mesh.sidecar_b();
    let authority = "meshed.default.svc.cluster.local:80";
    let stream = eventually("the meshed service", STEP, || async {
        client.open(authority, "cluster-a").await.ok()
    })
    .await;
    let sent = payload(3, 128 * 1024);
    assert!(round_trip(stream, &sent).await == sent, "bytes changed");

    let metrics = sidecar.metrics().await;
    let inbound = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tcp_open_total{direction=\"inbound\"} "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        inbound >= 1,
        "the stream did not enter through the pod's sidecar:\n{metrics}"
    );
    // And the plain path still serves pods without a sidecar.
    let plain = client.open(HELLO, "cluster-a").await.unwrap();
    assert!(round_trip(plain, b"plain").await == b"plain");
}

/// Rebuilding a link's pool (its Link changed) stops every task of the old pool:
/// after several rebuilds gateway-b runs no more tasks than it did before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilding_a_link_leaves_no_task_behind() {
    const REBUILDS: u16 = 5;
    let mesh = Mesh::start(72).await;
    let tasks = |config: &serde_json::Value| config["tasks"].as_u64().unwrap();
    // The link is up with its first connection; the baseline counts them all.
    let full = format!("up ({LINK_CONNECTIONS} connections)");
    eventually("every connection of the link", STEP, || async {
        let config = mesh.gw_b.config().await;
        (config["links"]["cluster-a"]["state"] == full.as_str()).then_some(())
    })
    .await;
    let baseline = tasks(&mesh.gw_b.config().await);
    let link_file = mesh
        .dir
        .path()
        .join("manifests-cluster-b/link-cluster-a.yaml");
    let gateway_a = mesh.gw_a.inbound;
    let sidecar = mesh.sidecar_b();
    for rebuild in 1..=REBUILDS {
        // Another probe port is another Link spec: gateway-b rebuilds the pool.
        let probe = SocketAddr::new(gateway_a.ip(), 40_000 + rebuild);
        std::fs::write(&link_file, link("cluster-a", gateway_a, probe)).unwrap();
        eventually("the rebuilt link to be up", STEP, || async {
            let config = mesh.gw_b.config().await;
            let links = config["discovery"]["snapshot"]["links"].as_array()?.clone();
            let seen = links
                .iter()
                .any(|l| l["spec"]["probeSpec"]["port"] == probe.port());
            (seen && config["links"]["cluster-a"]["up"] == true).then_some(())
        })
        .await;
        let stream = eventually("a stream over the rebuilt link", STEP, || async {
            sidecar.open(HELLO, "cluster-a").await.ok()
        })
        .await;
        assert_eq!(round_trip(stream, b"rebuilt").await, b"rebuilt");
    }
    let deadline = Instant::now() + STEP;
    let mut left = tasks(&mesh.gw_b.config().await);
    while left > baseline {
        assert!(
            Instant::now() < deadline,
            "gateway-b runs {left} tasks after {REBUILDS} link rebuilds, {baseline} before them"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = tasks(&mesh.gw_b.config().await);
    }
    eprintln!("gateway-b tasks: {baseline} before {REBUILDS} link rebuilds, {left} after");
}
