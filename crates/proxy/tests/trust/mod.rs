//! What the trust tests share: a PKI with one issuer per cluster (and forged CAs the
//! mint refuses to make), real `isthmus-proxy` processes on loopback with directory
//! discovery, origins and fake mesh peers that count what reaches them, and a raw
//! tunnel client that presents any chain and sends any header bytes.
//!
//! Every gateway holds the one SPIFFE ID `isthmus install` gives all gateways, so a
//! check by ID alone could never tell them apart: only their issuers' clusters can.

#![allow(clippy::unwrap_used, dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use isthmus_vocab::{CLUSTER_HEADER, REFUSAL_HEADER, SpiffeId};
use proxy_identity::crypto_provider;
use proxy_identity::mint::{
    self, CertificateAuthority, KeyAlgorithm, LeafBundle, Minted, Validity,
};
use proxy_identity::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use proxy_identity::rustls::pki_types::pem::PemObject;
use proxy_identity::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use proxy_identity::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use proxy_identity::rustls::{
    self, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

/// Bound on any single step that should take milliseconds.
pub const STEP: Duration = Duration::from_secs(10);

/// The identity `isthmus install` gives every cluster's gateway.
pub const GATEWAY_ID: &str = "spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway";
/// A workload identity, as each cluster's frontend has it.
pub const WORKLOAD_ID: &str = "spiffe://cluster.local/ns/default/sa/frontend";
/// The hello Service's authority, exported by cluster-a and cluster-c.
pub const HELLO: &str = "hello.default.svc.cluster.local:80";
const NAMESPACE: &str = "isthmus-system";

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// One anchor and its issuers, keyed by a name (`cluster-a`, or `cluster-a-new` for
/// a second issuer of cluster-a during a rollover).
pub struct Pki {
    pub anchor: CertificateAuthority,
    issuers: HashMap<String, CertificateAuthority>,
}

pub fn validity() -> Validity {
    Validity::from_now(Duration::from_secs(3600))
}

impl Pki {
    pub fn new() -> Pki {
        let anchor = mint::trust_anchor(
            &mint::default_anchor_name(),
            validity(),
            KeyAlgorithm::default(),
        )
        .unwrap();
        Pki {
            anchor,
            issuers: HashMap::new(),
        }
    }

    /// Adds an issuer named `key` for `cluster`.
    pub fn add_issuer(&mut self, key: &str, cluster: &str) {
        let issuer =
            mint::issuer(&self.anchor, cluster, validity(), KeyAlgorithm::default()).unwrap();
        self.issuers.insert(key.to_owned(), issuer);
    }

    pub fn issuer(&self, key: &str) -> &CertificateAuthority {
        &self.issuers[key]
    }

    /// A leaf for `id` from the issuer named `key`.
    pub fn leaf(&self, key: &str, spiffe: &str) -> LeafBundle {
        // Shorter than the issuers, minted a moment earlier: never outlives them.
        let validity = Validity::from_now(Duration::from_secs(1800));
        mint::leaf(
            self.issuer(key),
            &id(spiffe),
            validity,
            KeyAlgorithm::default(),
        )
        .unwrap()
    }
}

/// Signs `params` with `ca`'s key: a certificate the mint would refuse to make.
pub fn forge(ca: &CertificateAuthority, params: CertificateParams) -> Minted {
    let ca_key = KeyPair::from_pem(&ca.ca.key_pem).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca.ca.cert_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Minted {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A CA under `parent` whose subject holds `unit` as its OU.
pub fn forged_ca(
    parent: &CertificateAuthority,
    unit: &str,
    path_len: Option<u8>,
) -> CertificateAuthority {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("forged issuer {unit}"));
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, unit);
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    let ca = forge(parent, params);
    CertificateAuthority {
        chain_pem: format!("{}{}", ca.cert_pem, parent.chain_pem),
        ca,
        anchors_pem: parent.anchors_pem.clone(),
    }
}

/// A self-signed CA copying `like`'s subject (a cluster's issuer name, its own key).
pub fn impostor_ca(cluster: &str) -> CertificateAuthority {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "isthmus");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("isthmus issuer {cluster}"));
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, cluster);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    CertificateAuthority {
        chain_pem: cert.pem(),
        anchors_pem: cert.pem(),
        ca: Minted {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    }
}

/// A leaf for `spiffe` signed by `ca` whatever `ca` is (an anchor included).
pub fn forged_leaf(ca: &CertificateAuthority, spiffe: &str) -> LeafBundle {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let leaf = forge(ca, params);
    LeafBundle {
        id: id(spiffe),
        cert_chain_pem: format!("{}{}", leaf.cert_pem, ca.chain_pem),
        key_pem: leaf.key_pem,
        anchors_pem: ca.anchors_pem.clone(),
    }
}

/// The first certificate of a PEM bundle, as PEM.
pub fn first_pem(pem: &str) -> String {
    let end = "-----END CERTIFICATE-----\n";
    let at = pem.find(end).unwrap() + end.len();
    pem[..at].to_owned()
}

pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// What a raw peer presents: any chain, the key of its first certificate.
#[derive(Clone)]
pub struct Presented {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pem: String,
}

impl Presented {
    /// `bundle` as minted.
    pub fn of(bundle: &LeafBundle) -> Presented {
        Presented {
            chain: certs(&bundle.cert_chain_pem),
            key_pem: bundle.key_pem.clone(),
        }
    }

    /// `bundle`'s leaf followed by `rest` (PEM certificates, in this order).
    pub fn doctored(bundle: &LeafBundle, rest: &[&str]) -> Presented {
        let mut chain = vec![certs(&bundle.cert_chain_pem).remove(0)];
        for pem in rest {
            chain.extend(certs(pem));
        }
        Presented {
            chain,
            key_pem: bundle.key_pem.clone(),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap()
    }

    /// A client config presenting this chain as is and trusting any server.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_client_auth_cert(self.chain.clone(), self.key())
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// A server config presenting this chain as is and taking any client certificate.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(Arc::new(AcceptAnything))
            .with_single_cert(self.chain.clone(), self.key())
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

#[derive(Debug)]
struct AcceptAnything;

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for AcceptAnything {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

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

/// An echo origin on `ip` that counts the connections it accepts.
pub struct Echo {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Echo {
    pub async fn start(ip: IpAddr) -> Echo {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut rd, mut wr) = stream.split();
                    if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                        let _ = wr.shutdown().await;
                    }
                });
            }
        });
        Echo { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
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

/// A port nobody listens on at `ip` right now.
pub fn free_addr(ip: impl Into<IpAddr>) -> SocketAddr {
    std::net::TcpListener::bind((ip.into(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `ClusterSettings` for `cluster` whose gateway (holding [`GATEWAY_ID`]) is `gateway`.
pub fn settings(cluster: &str, gateway: SocketAddr) -> String {
    format!(
        "apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata:
  name: {cluster}
  namespace: {NAMESPACE}
spec:
  clusterName: {cluster}
  trustDomain: cluster.local
  gateway:
    address: '{ip}'
    port: {port}
    identity: {GATEWAY_ID}
",
        ip = gateway.ip(),
        port = gateway.port(),
    )
}

/// A Link to `target`'s gateway at `gateway` (holding [`GATEWAY_ID`]), probed on
/// `/ready` at `admin`.
pub fn link(target: &str, gateway: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "apiVersion: multicluster.isthmus.io/v1alpha1
kind: Link
metadata:
  name: {target}
  namespace: {NAMESPACE}
spec:
  targetClusterName: {target}
  gatewayAddress: '{ip}'
  gatewayPort: {port}
  gatewayIdentity: {GATEWAY_ID}
  probeSpec:
    path: /ready
    port: {probe}
    period: 1s
",
        ip = gateway.ip(),
        port = gateway.port(),
        probe = admin.port(),
    )
}

/// One `isthmus-proxy` process (gateway or sidecar role); killed when dropped, its
/// log printed if the test is failing.
pub struct Proxy {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    pub admin: SocketAddr,
}

impl Proxy {
    /// Starts `isthmus-proxy <role> --cluster <cluster>` with `identity` and
    /// `manifests`, listening on `listen` (`--inbound-addr`, and for a sidecar
    /// `--outbound-addr` too).
    pub fn spawn(
        role: &str,
        cluster: &str,
        identity: &Path,
        manifests: &Path,
        listen: &[(&str, SocketAddr)],
        admin: SocketAddr,
        log: PathBuf,
    ) -> Proxy {
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_isthmus-proxy"));
        command
            .arg(role)
            .args((role == "gateway").then_some("--allow-local-endpoints"))
            .args(["--cluster", cluster])
            .arg("--identity-dir")
            .arg(identity)
            .arg("--manifests")
            .arg(manifests)
            .args(["--admin-addr", &admin.to_string()])
            .args(["--reload-interval", "200ms"])
            .args(["--connect-timeout", "3s"])
            .args(["--log", "info,proxy_core=debug"]);
        for (flag, addr) in listen {
            command.arg(format!("--{flag}")).arg(addr.to_string());
        }
        let child = command
            .env_clear()
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Proxy {
            name: format!("{role}-{cluster}"),
            child: Some(child),
            log,
            admin,
        }
    }

    /// Waits until `/ready` answers, failing at once if the process exited.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "{} exited: {status}\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if http_get(self.admin, "/ready").await == "ready\n" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never became ready",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) for the process to exit by itself; its status and log.
    pub async fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return (status, std::fs::read_to_string(&self.log).unwrap());
            }
            assert!(Instant::now() < deadline, "{} still running", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn config(&self) -> serde_json::Value {
        let body = http_get(self.admin, "/config").await;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/config is not JSON ({e}): {body}"))
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ---\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// A plain HTTP/1.1 GET to an admin server (bounded); the body of a 200, else
/// `error: ...`.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = match timeout(STEP, exchange).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return format!("error: {e}"),
        Err(_) => panic!("GET {path} from {addr} hung"),
    };
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body.to_owned(),
        _ => format!("error: {response}"),
    }
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `bundle` into `dir` (`tls.crt`, `tls.key`, `ca.crt`).
pub fn write_identity(dir: &Path, bundle: &LeafBundle) {
    bundle.write_dir(dir, true).unwrap();
}
