//! What the trust tests share: real `isthmus-proxy` processes on loopback with
//! directory discovery, origins and fake mesh peers that count what reaches them, and
//! a raw tunnel client that presents any chain and sends any header bytes. The PKI
//! (one issuer per cluster, and forged CAs the mint refuses to make), the process
//! fixture and the raw TLS peer come from `isthmus_test_support`.
//!
//! Every gateway holds the one SPIFFE ID `isthmus install` gives all gateways, so a
//! check by ID alone could never tell them apart: only their issuers' clusters can.

#![allow(clippy::unwrap_used, dead_code, unused_imports)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use isthmus_test_support::echo::Echo;
pub use isthmus_test_support::pki::{
    Pki, Presented, certs, first_pem, forge, forged_ca, forged_leaf, id, impostor_ca,
};
pub use isthmus_test_support::proxy::{free_addr, http_get};
pub use isthmus_test_support::{Proxy, STEP, eventually};
use isthmus_vocab::{CLUSTER_HEADER, REFUSAL_HEADER};
use proxy_identity::mint::LeafBundle;
use proxy_identity::rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// The identity `isthmus install` gives every cluster's gateway.
pub const GATEWAY_ID: &str = "spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway";
/// A workload identity, as each cluster's frontend has it.
pub const WORKLOAD_ID: &str = "spiffe://cluster.local/ns/default/sa/frontend";
/// The hello Service's authority, exported by cluster-a and cluster-c.
pub const HELLO: &str = "hello.default.svc.cluster.local:80";
const NAMESPACE: &str = "isthmus-system";

/// How one tunnel stream attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered 200: the stream was forwarded.
    Opened,
    /// Refused with this status and reason header.
    Refused(u16, String),
    /// The TLS handshake or the HTTP/2 connection failed: nothing was asked.
    Failed(String),
    /// No answer within [`STEP`].
    Hung,
}

/// One CONNECT to `gateway` over a fresh TLS connection presenting `who`, with
/// `:authority` `authority` and the cluster header's raw bytes `clusters` (none,
/// one, or several header fields).
pub async fn attempt(
    gateway: SocketAddr,
    who: &Presented,
    authority: &str,
    clusters: &[&[u8]],
) -> Outcome {
    match timeout(STEP, attempt_inner(gateway, who, authority, clusters)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Hung,
    }
}

async fn attempt_inner(
    gateway: SocketAddr,
    who: &Presented,
    authority: &str,
    clusters: &[&[u8]],
) -> Outcome {
    let tcp = match TcpStream::connect(gateway).await {
        Ok(tcp) => tcp,
        Err(e) => return Outcome::Failed(format!("connect: {e}")),
    };
    let name = ServerName::IpAddress(gateway.ip().into());
    let tls = match tokio_rustls::TlsConnector::from(who.client_config())
        .connect(name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return Outcome::Failed(format!("TLS: {e}")),
    };
    let (mut send, conn) = match h2::client::handshake(tls).await {
        Ok(pair) => pair,
        Err(e) => return Outcome::Failed(format!("HTTP/2 handshake: {e}")),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority);
    for cluster in clusters {
        request = request.header(
            CLUSTER_HEADER,
            http::HeaderValue::from_bytes(cluster).unwrap(),
        );
    }
    let request = match request.body(()) {
        Ok(request) => request,
        Err(e) => panic!("the test cannot build CONNECT {authority}: {e}"),
    };
    let ready = match send.ready().await {
        Ok(ready) => ready,
        Err(e) => return Outcome::Failed(format!("HTTP/2: {e}")),
    };
    send = ready;
    let (response, _body) = match send.send_request(request, false) {
        Ok(pair) => pair,
        Err(e) => return Outcome::Failed(format!("HTTP/2 request: {e}")),
    };
    match response.await {
        Ok(response) if response.status() == http::StatusCode::OK => Outcome::Opened,
        Ok(response) => Outcome::Refused(
            response.status().as_u16(),
            response
                .headers()
                .get(REFUSAL_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
        ),
        Err(e) => Outcome::Failed(format!("HTTP/2 response: {e}")),
    }
}

/// A TLS listener that presents `who` to anyone and counts the handshakes begun and
/// the application bytes that arrive after a finished one: a mesh peer with the
/// wrong identity, waiting to see whether a proxy talks to it.
pub struct FakePeer {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub bytes: Arc<AtomicUsize>,
}

impl FakePeer {
    pub async fn start(addr: SocketAddr, who: &Presented) -> FakePeer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(who.server_config());
        let connections = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let (c, b) = (connections.clone(), bytes.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (acceptor, b) = (acceptor.clone(), b.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 4096];
                    while let Ok(Ok(n)) = timeout(STEP, tls.read(&mut buf)).await {
                        if n == 0 {
                            break;
                        }
                        b.fetch_add(n, Ordering::SeqCst);
                    }
                });
            }
        });
        FakePeer {
            addr,
            connections,
            bytes,
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
}

/// `ClusterSettings` for `cluster` whose gateway (holding [`GATEWAY_ID`]) is `gateway`.
pub fn settings(cluster: &str, gateway: SocketAddr) -> String {
    isthmus_tests::multicluster::settings_in(NAMESPACE, cluster, gateway, GATEWAY_ID)
}

/// A Link to `target`'s gateway at `gateway` (holding [`GATEWAY_ID`]), probed on
/// `/ready` at `admin`.
pub fn link(target: &str, gateway: SocketAddr, admin: SocketAddr) -> String {
    isthmus_tests::multicluster::link_in(NAMESPACE, target, gateway, GATEWAY_ID, admin)
}

/// Starts `isthmus-proxy <role> --cluster <cluster>` with `identity` and
/// `manifests`, listening on `listen` (`--inbound-addr`, and for a sidecar
/// `--outbound-addr` too); a gateway may reach endpoints on loopback.
pub fn spawn(
    role: &str,
    cluster: &str,
    identity: &Path,
    manifests: &Path,
    listen: &[(&str, SocketAddr)],
    admin: SocketAddr,
    log: PathBuf,
) -> Proxy {
    let mut proxy = Proxy::command(
        env!("CARGO_BIN_EXE_isthmus-proxy"),
        role,
        cluster,
        identity,
        manifests,
        admin,
        log,
    )
    .args((role == "gateway").then_some("--allow-local-endpoints"))
    .args(["--reload-interval", "200ms"])
    .args(["--connect-timeout", "3s"])
    .args(["--log", "info,proxy_core=debug"]);
    for (flag, addr) in listen {
        proxy = proxy.arg(format!("--{flag}")).arg(addr.to_string());
    }
    proxy.start()
}

/// Writes `bundle` into `dir` (`tls.crt`, `tls.key`, `ca.crt`).
pub fn write_identity(dir: &Path, bundle: &LeafBundle) {
    bundle.write_dir(dir, true).unwrap();
}
