//! How a gateway delivers to its own cluster's pods, with the real `isthmus-proxy`
//! binaries on loopback (each pod an address of `127.0.<NET>.0/24`): a pod that
//! discovery says is meshed (a Pod labelled `isthmus.io/meshed: "true"`, named by
//! its endpoint's `targetRef`) is reached over its sidecar's mTLS tunnel and never
//! otherwise, an unmeshed one with plain TCP.
//!
//! Each pod's app is a listener that counts what it accepts, so a plaintext
//! fallback to a meshed pod shows as an accepted connection where there must be
//! none. The pods' apps here listen on the pod address and nothing captures, which
//! is exactly where a plaintext fallback would land.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Client, Proxy, round_trip_within, write_files};
use isthmus_test_support::proxy::http_get;
use isthmus_tests::identity::Pki;
use isthmus_tests::multicluster::{cluster_settings, gateway_id};
use isthmus_vocab::{Refusal, SpiffeId};
use proxy_core::pool::PoolError;
use proxy_core::tunnel::client::TunnelStream;
use proxy_identity::mint::{self, LeafBundle};
use proxy_identity::{CredentialPaths, CredentialStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};

/// Bound on any single step; a hang fails the test.
const STEP: Duration = Duration::from_secs(15);
/// The third octet of every address of this file's tests.
const NET: u8 = 201;
/// The app port of every pod.
const APP_PORT: u16 = 8080;
/// The sidecars' (and a meshed pod's) tunnel port.
const TUNNEL_PORT: u16 = 4143;

fn ip(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, NET, host))
}

/// A port nobody listens on at `ip` right now (bound, then released).
fn free_addr(ip: IpAddr) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn write_identity(dir: &Path, leaf: &LeafBundle) -> Arc<CredentialStore> {
    leaf.write_dir(dir, false).unwrap();
    Arc::new(CredentialStore::load(CredentialPaths::in_dir(dir)).unwrap())
}

/// A pod's app: echoes every connection and counts connections and bytes.
struct App {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

impl App {
    async fn start(addr: SocketAddr) -> App {
        let listener = TcpListener::bind(addr).await.unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let (count, total) = (accepted.clone(), bytes.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let total = total.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(Ok(n)) = timeout(STEP, stream.read(&mut buf)).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        total.fetch_add(n, Ordering::SeqCst);
                    }
                });
            }
        });
        App {
            addr,
            accepted,
            bytes,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
}

/// A proxy of cluster-a (gateway or sidecar) named `name`, reading the manifests
/// under `root` and tunnelling in at `inbound`, its admin server on the same
/// address.
fn spawn(
    role: &str,
    name: &str,
    root: &Path,
    identity: &Path,
    inbound: SocketAddr,
    extra: &[String],
) -> Proxy {
    Proxy::command(
        env!("CARGO_BIN_EXE_isthmus-proxy"),
        role,
        "cluster-a",
        identity,
        &root.join("manifests"),
        free_addr(inbound.ip()),
        root.join(format!("{name}.log")),
    )
    .named(name)
    .args((role == "gateway").then_some("--allow-local-endpoints"))
    .args(["--inbound-addr", &inbound.to_string()])
    .args(["--reload-interval", "200ms"])
    .args(["--connect-timeout", "2s"])
    .args(["--log", "info,proxy_core=debug"])
    .args(extra)
    .start()
}

/// An exported Service `name` whose Endpoints list `pods` (`(pod name, address)`)
/// with targetRefs.
fn service(name: &str, pods: &[(&str, IpAddr)]) -> String {
    let addresses: String = pods
        .iter()
        .map(|(pod, ip)| {
            format!(
                "  - ip: '{ip}'\n    targetRef: {{kind: Pod, namespace: default, name: {pod}}}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
  labels: {{mirror.isthmus.io/exported: \"true\"}}
spec:
  ports: [{{port: 80, protocol: TCP, targetPort: {APP_PORT}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: {name}, namespace: default}}
subsets:
- addresses:
{addresses}  ports: [{{port: {APP_PORT}, protocol: TCP}}]
---
"
    )
}

fn pod(name: &str, meshed: bool) -> String {
    let label = if meshed {
        "\n  labels: {isthmus.io/meshed: \"true\"}"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default{label}\n---\n"
    )
}

/// What the delivery suite asks of a workload of cluster-a with a pool to its gateway.
impl Client {
    async fn open_service(&self, service: &str) -> Result<TunnelStream, PoolError> {
        self.open(
            &format!("{service}.default.svc.cluster.local:80"),
            "cluster-a",
        )
        .await
    }

    /// Sends `payload` on a stream to `service`, half-closes, and returns what
    /// came back.
    async fn round_trip(&self, service: &str, payload: &[u8]) -> Vec<u8> {
        let stream = self
            .open_service(service)
            .await
            .unwrap_or_else(|e| panic!("{service}: {e}"));
        round_trip_within(stream, payload, STEP).await
    }
}

/// Waits until `service` is in the gateway's discovery (written before the
/// gateway started, with everything else: the directory is read whole).
async fn discovered(gateway: &Proxy, service: &str) {
    let deadline = Instant::now() + STEP;
    loop {
        let config = http_get(gateway.admin, "/config").await;
        let view: serde_json::Value = serde_json::from_str(&config).unwrap_or_default();
        let known = view["discovery"]["snapshot"]["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["metadata"]["name"] == service));
        if known {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service} not discovered: {config}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshed_endpoint_is_reached_over_its_sidecar_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(&mint::default_anchor_name());
    let foreign = Pki::new("another mesh");
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();

    // The pods: .2 meshed, its sidecar down; .3 meshed, answered by a proxy of
    // another trust anchor; .4 meshed with a working sidecar; .5 unmeshed.
    let down = App::start(SocketAddr::new(ip(2), APP_PORT)).await;
    let impostor = App::start(SocketAddr::new(ip(3), APP_PORT)).await;
    let healthy = App::start(SocketAddr::new(ip(4), APP_PORT)).await;
    let unmeshed = App::start(SocketAddr::new(ip(5), APP_PORT)).await;

    let gateway_addr = SocketAddr::new(ip(1), TUNNEL_PORT);
    write_files(
        &manifests,
        &[
            (
                "settings.yaml",
                &cluster_settings("cluster-a", gateway_addr),
            ),
            (
                "pods.yaml",
                &[
                    pod("down-0", true),
                    pod("impostor-0", true),
                    pod("healthy-0", true),
                    pod("unmeshed-0", false),
                ]
                .concat(),
            ),
            (
                "services.yaml",
                &[
                    service("down", &[("down-0", ip(2))]),
                    service("impostor", &[("impostor-0", ip(3))]),
                    service("unmeshed", &[("unmeshed-0", ip(5))]),
                    service(
                        "mixed",
                        &[
                            ("down-0", ip(2)),
                            ("impostor-0", ip(3)),
                            ("healthy-0", ip(4)),
                        ],
                    ),
                ]
                .concat(),
            ),
        ],
    );

    let id =
        |sa: &str| SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap();
    write_identity(
        &root.join("identity-gateway"),
        &pki.leaf("cluster-a", &gateway_id("cluster-a")),
    );
    write_identity(
        &root.join("identity-healthy"),
        &pki.leaf("cluster-a", &id("healthy")),
    );
    write_identity(
        &root.join("identity-impostor"),
        &foreign.leaf("cluster-a", &id("impostor")),
    );

    let mut gateway = spawn(
        "gateway",
        "gateway",
        root,
        &root.join("identity-gateway"),
        gateway_addr,
        &[],
    );
    // The sidecar of the pod at `ip(host)`, with the identity written for `name`.
    let sidecar = |name: &str, host| {
        let outbound = free_addr(ip(host)).to_string();
        spawn(
            "sidecar",
            &format!("sidecar-{name}"),
            root,
            &root.join(format!("identity-{name}")),
            SocketAddr::new(ip(host), TUNNEL_PORT),
            &["--outbound-addr".to_owned(), outbound],
        )
    };
    let mut healthy_sidecar = sidecar("healthy", 4);
    let mut impostor_sidecar = sidecar("impostor", 3);
    gateway.wait_ready().await;
    healthy_sidecar.wait_ready().await;
    impostor_sidecar.wait_ready().await;
    discovered(&gateway, "mixed").await;
    let client = Client::new(
        write_identity(
            &root.join("identity-client"),
            &pki.leaf("cluster-a", &id("client")),
        ),
        gateway_addr,
        gateway_id("cluster-a"),
        1,
        STEP,
    );

    // An unmeshed pod is served with plain TCP.
    assert_eq!(client.round_trip("unmeshed", b"plain").await, b"plain");
    assert_eq!(unmeshed.accepted(), 1);

    // A meshed pod whose sidecar is down, or whose "sidecar" cannot prove an
    // identity of this mesh: refused, and not one byte reaches the app in plain.
    const ATTEMPTS: usize = 10;
    let mut outcomes = Vec::new();
    for _ in 0..ATTEMPTS {
        for service in ["down", "impostor"] {
            // Bytes go right behind the CONNECT, as a real client's do.
            let outcome = match client.open_service(service).await {
                Ok(mut stream) => {
                    let _ = stream.write_all(b"secret").await;
                    let _ = stream.shutdown().await;
                    let mut back = Vec::new();
                    let _ = timeout(STEP, stream.read_to_end(&mut back)).await;
                    "opened".to_owned()
                }
                Err(PoolError::Refused { refusal, .. }) => refusal.as_str().to_owned(),
                Err(e) => e.to_string(),
            };
            outcomes.push((service, outcome));
        }
    }
    // Neither the stopped nor the impostor pod's app is ever given plaintext.
    let no_plaintext = || {
        for (name, app) in [("down", &down), ("impostor", &impostor)] {
            assert_eq!(
                (app.accepted(), app.bytes()),
                (0, 0),
                "the {name} pod's app got plaintext (connections, bytes) at {}",
                app.addr
            );
        }
    };
    no_plaintext();
    for (service, outcome) in &outcomes {
        assert_eq!(outcome, Refusal::UpstreamRefused.as_str(), "{service}");
    }

    // With a healthy meshed pod among them, every stream lands there, through its
    // sidecar, whichever endpoint the round robin starts at.
    for i in 0..ATTEMPTS {
        let payload = format!("stream {i}");
        assert_eq!(
            client.round_trip("mixed", payload.as_bytes()).await,
            payload.as_bytes()
        );
    }
    assert_eq!(healthy.accepted(), ATTEMPTS);

    no_plaintext();
    let metrics = http_get(healthy_sidecar.admin, "/metrics").await;
    assert!(
        metrics.contains("tcp_open_total{direction=\"inbound\"} 10"),
        "the healthy pod's streams did not all enter through its sidecar:\n{metrics}"
    );
}
