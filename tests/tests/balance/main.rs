//! Endpoint choice and gateway replicas with the real binaries in network
//! namespaces: three replicas of `hello` in cluster-a behind two cluster-a gateway
//! replicas, reached from cluster-b's gateway over a Link whose name resolves to
//! both, from a standalone proxy (which dials its gateway as a sidecar does, without
//! needing capture). Each request is a new connection, so each is one choice.
//!
//! - every replica gets its fair share (within 25%);
//! - a replica that resets every connection is ejected by both gateways, after
//!   which no request fails on it, and it is tried again later;
//! - one of the two cluster-a gateway replicas killed: once the link's pool
//!   noticed, new connections see no failure;
//! - a replica 100 ms slower gets under 10% of one-request streams (each marked
//!   `isthmus-one-request: http/1.1`, as a sidecar's per-request streams are, sent
//!   to a cluster-a gateway directly) once measured.
//!
//! The world: one bridge joins b (198.18.0.1, cluster-b's gateway), a1 and a2
//! (198.18.0.2 and .3, cluster-a's gateways, both named `gateway.cluster-a.test`
//! in b's hosts file), the replicas r1 to r3 (198.18.0.21 to .23, HTTP servers that
//! answer with their name and close) and the client (198.18.0.10). Needs root,
//! like every test here.
//!
//! [`through_sidecar`] checks the same choice per request, from keep-alive and
//! HTTP/2 clients under a sidecar's capture.
#![allow(clippy::unwrap_used)]

mod through_sidecar;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use isthmus_test_support::{Metrics, eventually_blocking};
use isthmus_tests::h2c;
use isthmus_tests::identity::Pki;
use isthmus_tests::multicluster::{
    MIRROR, NAMESPACE, cluster_settings, gateway_id, link_at, service,
};
use isthmus_tests::netns::{Lab, Namespace};
use isthmus_tests::peer::test_pool;
use isthmus_tests::pod;
use isthmus_tests::tcp::{self, WAIT};
use isthmus_tests::wan::{Wan, proxy_command, write_files};
use isthmus_vocab::{Authority, SpiffeId};
use proxy_core::tunnel::client::Carries;
use proxy_identity::{CredentialPaths, CredentialStore, PeerPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A_NAME: &str = "gateway.cluster-a.test";
const HELLO: &str = "hello.default.svc.cluster.local:80";
const ADMIN: &str = "127.0.0.1:4191";
const OUTBOUND: &str = "127.0.0.1:4140";
const REPLICAS: [&str; 3] = ["198.18.0.21", "198.18.0.22", "198.18.0.23"];
const REPLICA_PORT: u16 = 8080;
/// Generous for a debug build on a shared machine.
const WITHIN: Duration = Duration::from_secs(30);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// An HTTP server that answers each connection's request with its name, or
/// resets the connection once told to.
struct Replica {
    name: &'static str,
    requests: Arc<AtomicUsize>,
    resets: Arc<AtomicBool>,
    /// Answers 100 ms late.
    slow: Arc<AtomicBool>,
}

impl Replica {
    fn start(listener: TcpListener, name: &'static str) -> Replica {
        let (requests, resets) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let slow = Arc::new(AtomicBool::new(false));
        let (counted, resetting, slowed) = (requests.clone(), resets.clone(), slow.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (counted, resetting) = (counted.clone(), resetting.clone());
                let slowed = slowed.clone();
                std::thread::spawn(move || {
                    stream.set_read_timeout(Some(WAIT)).unwrap();
                    let mut head = [0u8; 1024];
                    if !matches!(stream.read(&mut head), Ok(n) if n > 0) {
                        return;
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    if resetting.load(Ordering::SeqCst) {
                        return reset(stream);
                    }
                    if slowed.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                        name.len()
                    );
                });
            }
        });
        Replica {
            name,
            requests,
            resets,
            slow,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Closes with a reset (SO_LINGER 0) instead of a FIN.
fn reset(stream: TcpStream) {
    let socket = socket2::Socket::from(stream);
    let _ = socket.set_linger(Some(Duration::ZERO));
}

/// A proxy of the world: its name, namespace, cluster, inbound address (none:
/// the standalone role) and manifests.
type Proxy<'a> = (
    &'a str,
    &'a Namespace,
    &'a str,
    Option<&'a str>,
    Vec<(&'a str, String)>,
);

/// One world at a time: three of them at once on a small machine would measure
/// the machine's load rather than the balancer.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct World {
    client: Namespace,
    b: Namespace,
    a: [Namespace; 2],
    replicas: Vec<Replica>,
    /// The second cluster-a gateway, which a test kills.
    a2: Option<Child>,
    logs: Vec<PathBuf>,
    /// Where a client of cluster-a's gateways finds its identity.
    client_identity: PathBuf,
    _dir: tempfile::TempDir,
    /// Dropped last: kills the other proxies and deletes the namespaces.
    _lab: Lab,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut a2) = self.a2.take() {
            let _ = a2.kill();
            let _ = a2.wait();
        }
        pod::show_logs_if_failing(&self.logs);
    }
}

impl World {
    fn start() -> World {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let lab = Lab::new();
        let wan = Wan::new(&lab);
        let b = wan.place("198.18.0.1");
        let a1 = wan.place("198.18.0.2");
        let a2 = wan.place("198.18.0.3");
        let client = wan.place("198.18.0.10");
        b.write_hosts(&format!("198.18.0.2 {A_NAME}\n198.18.0.3 {A_NAME}\n"))
            .unwrap();
        let replicas: Vec<Replica> = REPLICAS
            .iter()
            .zip(["r1", "r2", "r3"])
            .map(|(ip, name)| {
                let ns = wan.place(ip);
                let listener = ns.run(|| TcpListener::bind((*ip, REPLICA_PORT))).unwrap();
                Replica::start(listener, name)
            })
            .collect();

        // Discovery's Endpoints, one address per replica.
        let first = format!("  - ip: '{}'\n", REPLICAS[0]);
        let every: String = REPLICAS
            .iter()
            .map(|ip| format!("  - ip: '{ip}'\n"))
            .collect();
        let backend = SocketAddr::new(REPLICAS[0].parse().unwrap(), REPLICA_PORT);
        let hello = service("hello", backend, true).replace(&first, &every);
        let a_id = gateway_id("cluster-a");
        let a_link = link_at(NAMESPACE, "cluster-a", A_NAME, 4143, a_id.as_str(), 4191);
        let b_gateway = addr("198.18.0.1:4143");
        let pki = Pki::new("balance anchor");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut proxies: Vec<Proxy<'_>> = Vec::new();
        for (name, ns, own) in [
            ("a1", &a1, "198.18.0.2:4143"),
            ("a2", &a2, "198.18.0.3:4143"),
        ] {
            let settings = cluster_settings("cluster-a", addr(own));
            let files = vec![("settings.yaml", settings), ("hello.yaml", hello.clone())];
            proxies.push((name, ns, "cluster-a", Some(own), files));
        }
        let b_files = vec![
            ("settings.yaml", cluster_settings("cluster-b", b_gateway)),
            ("link.yaml", a_link.clone()),
        ];
        proxies.push(("b", &b, "cluster-b", Some("198.18.0.1:4143"), b_files));
        let a_settings = cluster_settings("cluster-a", addr("198.18.0.2:4143"));
        let client_files = vec![
            ("settings.yaml", cluster_settings("cluster-b", b_gateway)),
            ("link.yaml", a_link),
            ("clusters/cluster-a/settings.yaml", a_settings),
            ("clusters/cluster-a/hello.yaml", hello),
            ("mirror.yaml", MIRROR.to_owned()),
        ];
        proxies.push(("client", &client, "cluster-b", None, client_files));
        let frontend = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/frontend").unwrap();
        let mut logs = Vec::new();
        let mut a2_child = None;
        for (proxy, ns, cluster, inbound, files) in proxies {
            write_files(&root.join(format!("manifests-{proxy}")), &files);
            let id = if inbound.is_some() {
                gateway_id(cluster)
            } else {
                frontend.clone()
            };
            let identity = root.join(format!("identity-{proxy}"));
            pki.leaf(cluster, &id).write_dir(&identity, false).unwrap();
            let role = if inbound.is_some() {
                "gateway"
            } else {
                "standalone"
            };
            let mut cmd = proxy_command(ns, role, cluster, root, proxy, ADMIN);
            cmd.args(["--tunnel-connections", "2", "--log", "info"]);
            match inbound {
                Some(inbound) => cmd.args(["--inbound-addr", inbound]),
                None => cmd.args(["--outbound-addr", OUTBOUND]),
            };
            let log = root.join(format!("{proxy}.log"));
            if proxy == "a2" {
                // Its own child, for the test that kills it.
                let stderr = std::fs::File::create(&log).unwrap();
                a2_child = Some(cmd.env_clear().stderr(stderr).spawn().unwrap());
            } else {
                lab.spawn_logged(&mut cmd, &log);
            }
            logs.push(log);
        }
        // A workload of cluster-a, to speak to its gateways directly.
        let client_identity = root.join("identity-workload");
        let workload = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/workload").unwrap();
        pki.leaf("cluster-a", &workload)
            .write_dir(&client_identity, false)
            .unwrap();
        let world = World {
            client_identity,
            client,
            b,
            a: [a1, a2],
            replicas,
            a2: a2_child,
            logs,
            _dir: dir,
            _lab: lab,
            _turn: turn,
        };
        eventually_blocking("a first request through both gateways", WITHIN, || {
            world.request()
        });
        world
    }

    /// One request on a new connection through the standalone proxy; the name of
    /// the replica that answered, `None` if it failed.
    fn request(&self) -> Option<String> {
        self.client.run(|| {
            let mut stream = tcp::connect(addr(OUTBOUND)).ok()?;
            stream.set_read_timeout(Some(WAIT)).ok()?;
            write!(stream, "CONNECT {HELLO} HTTP/1.1\r\nhost: {HELLO}\r\n\r\n").ok()?;
            let head = read_head(&mut stream)?;
            if !head.starts_with("HTTP/1.1 200") {
                return None;
            }
            write!(stream, "GET / HTTP/1.1\r\nhost: hello\r\n\r\n").ok()?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).ok()?;
            let (head, name) = answer.split_once("\r\n\r\n")?;
            head.starts_with("HTTP/1.1 200").then(|| name.to_owned())
        })
    }

    /// `/config` of the gateway in `ns`, without whitespace.
    fn config(ns: &Namespace) -> String {
        let response = ns.run(|| pod::http_get(addr(ADMIN), "/config")).unwrap();
        response.split_whitespace().collect()
    }

    /// `/metrics` of the proxy in `ns`.
    fn metrics(ns: &Namespace) -> Metrics {
        let response = ns.run(|| pod::http_get(addr(ADMIN), "/metrics")).unwrap();
        let (_, body) = response.split_once("\r\n\r\n").unwrap();
        Metrics::parse(body)
    }

    /// Whether the gateway in `ns` shows the replica at `ip` in `state`.
    fn endpoint_is(ns: &Namespace, ip: &str, state: &str) -> bool {
        let endpoint = format!("\"address\":\"{ip}:{REPLICA_PORT}\"");
        let config = World::config(ns);
        config.split('{').any(|entry| {
            entry.contains(&endpoint) && entry.contains(&format!("\"state\":\"{state}\""))
        })
    }
}

/// Reads byte by byte to the end of an HTTP head (bounded by the read timeout).
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 || got.len() > 4096 {
            return None;
        }
        got.push(byte[0]);
    }
    String::from_utf8(got).ok()
}

#[test]
fn every_replica_gets_its_fair_share_of_new_connections() {
    let world = World::start();
    // Warm-up: every replica measured by both gateways.
    eventually_blocking("every replica answered a few requests", WITHIN, || {
        world.request();
        world
            .replicas
            .iter()
            .all(|r| r.requests() >= 4)
            .then_some(())
    });
    let before: Vec<usize> = world.replicas.iter().map(Replica::requests).collect();
    for i in 0..300 {
        assert!(world.request().is_some(), "request {i} failed");
    }
    let shares: Vec<usize> = world
        .replicas
        .iter()
        .zip(before)
        .map(|(r, before)| r.requests() - before)
        .collect();
    eprintln!("FIGURE balance_fair_share_of_300 = {shares:?}");
    for (replica, share) in world.replicas.iter().zip(&shares) {
        assert!(
            (75..=125).contains(share),
            "{} got {share} of 300 (fair: 100 +- 25%): {shares:?}",
            replica.name
        );
    }
}

#[test]
fn a_replica_that_resets_every_connection_is_ejected_then_tried_again() {
    let world = World::start();
    let bad = &world.replicas[2];
    bad.resets.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut failed = 0;
    let ejected = |ns: &Namespace| World::endpoint_is(ns, REPLICAS[2], "ejected");
    // Both gateways eject it once five streams each failed on it.
    while !(ejected(&world.a[0]) && ejected(&world.a[1])) {
        if world.request().is_none() {
            failed += 1;
        }
        assert!(
            started.elapsed() < WITHIN,
            "not ejected by both gateways within {WITHIN:?}: {failed} failed"
        );
    }
    let took = started.elapsed();
    eprintln!(
        "FIGURE balance_ejected_by_both_gateways_ms = {}",
        took.as_millis()
    );
    // Five per gateway, and a probe each time a backoff ran out meanwhile.
    assert!(
        failed <= 14,
        "{failed} requests failed before the ejections: five per gateway, and probes"
    );
    // The metrics say so (published once a second), for the known endpoints only.
    let bad_endpoint = format!("endpoint=\"{}:{REPLICA_PORT}\"", REPLICAS[2]);
    let metrics = eventually_blocking("the ejection in the metrics", WITHIN, || {
        let metrics = World::metrics(&world.a[0]);
        let states = |state: &str| {
            let state = format!("state=\"{state}\"");
            metrics.sum("gateway_endpoint_state", &[&bad_endpoint, &state])
        };
        // Ejected, or already back on probation.
        (states("ejected") + states("probation") == 1.0).then_some(metrics)
    });
    assert!(metrics.sum("gateway_endpoint_ejections_total", &[]) >= 1.0);
    assert_eq!(metrics.sum("gateway_endpoint_in_flight", &[]), 0.0);
    // Ejected: nothing goes to it, and requests succeed, until its backoff ends.
    let seen = bad.requests();
    while ejected(&world.a[0]) && ejected(&world.a[1]) {
        assert!(
            world.request().is_some(),
            "a request failed while the replica was ejected"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert!(started.elapsed() < WITHIN, "the replica stayed ejected");
    }
    // Its backoff ran out on a gateway: a request probes it again.
    eventually_blocking("the ejected replica tried again", WITHIN, || {
        world.request();
        (bad.requests() > seen).then_some(())
    });
}

#[test]
fn a_killed_gateway_replica_fails_no_new_connection_once_noticed() {
    let mut world = World::start();
    let link_is = |state: &str| World::config(&world.b).contains(state);
    eventually_blocking(
        "a link connection to each cluster-a gateway",
        WITHIN,
        || link_is("\"state\":\"up(2connections)\"").then_some(()),
    );
    let mut a2 = world.a2.take().unwrap();
    a2.kill().unwrap();
    a2.wait().unwrap();
    // The link's pool notices when the connection ends; then no request fails.
    eventually_blocking("the link to notice the dead gateway", WITHIN, || {
        link_is("\"state\":\"up(1connections)\"").then_some(())
    });
    let mut failed = 0;
    for _ in 0..100 {
        if world.request().is_none() {
            failed += 1;
        }
    }
    assert_eq!(
        failed, 0,
        "requests failed after the link noticed the dead gateway"
    );
    for replica in &world.replicas {
        assert!(replica.requests() > 0, "{} got nothing", replica.name);
    }
}

#[test]
fn a_slow_replica_gets_few_one_request_streams_once_measured() {
    let world = World::start();
    let slow = &world.replicas[2];
    slow.slow.store(true, Ordering::SeqCst);
    let store = CredentialStore::load(CredentialPaths::in_dir(&world.client_identity)).unwrap();
    let tls =
        proxy_identity::client_config(Arc::new(store), PeerPolicy::Exact(gateway_id("cluster-a")));
    // Streams to cluster-a's gateway a1, each carrying one HTTP/1.1 request and
    // marked so, as a sidecar sends them: the gateway scores each answer.
    let counts = world.client.run(|| {
        h2c::block_on(WITHIN * 4, "the one-request streams", async {
            let pool = test_pool("test/a1", addr("198.18.0.2:4143"), tls);
            let authority = Authority::parse(HELLO).unwrap();
            let one = async || {
                let opened = pool.open_carrying(&authority, None, Carries::Http1Request);
                let mut stream = tokio::time::timeout(WAIT, opened).await.ok()?.ok()?;
                let exchange = async {
                    stream
                        .write_all(b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n")
                        .await?;
                    let mut answer = Vec::new();
                    stream.read_to_end(&mut answer).await?;
                    Ok::<_, std::io::Error>(answer)
                };
                tokio::time::timeout(WAIT, exchange).await.ok()?.ok()
            };
            // Warm-up: every replica measured.
            for _ in 0..30 {
                one().await;
            }
            let before = slow.requests();
            for i in 0..300 {
                assert!(one().await.is_some(), "request {i} failed");
            }
            slow.requests() - before
        })
    });
    eprintln!("FIGURE balance_slow_replica_share_of_300 = {counts}");
    assert!(
        counts < 30,
        "the slow replica got {counts} of 300 (at most 10%)"
    );
}
