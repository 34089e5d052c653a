//! A mesh connection lives no longer than the earlier of its two leaves' notAfter,
//! even while PINGs keep it alive: a real `isthmus-proxy gateway` on loopback, with
//! leaves minted at test time to expire a few seconds after start.
//!
//! - As a server: a client whose leaf runs out holds a pooled connection to the
//!   gateway; past notAfter the gateway serves no stream on it (a `no_route` answer
//!   proves the gateway's handler ran, and must not be seen again).
//! - As a client: the gateway's own leaf runs out; the peer of its link pool, an
//!   HTTP/2 server that answers PINGs and never closes first, must see the pooled
//!   connection end at notAfter.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{certs, short_lived_gateway_leaf};
use isthmus_tests::multicluster::{cluster_settings, gateway_id, link};
use isthmus_vocab::{Authority, Refusal};
use proxy_core::pool::{Pool, PoolError};
use proxy_core::tunnel::H2Settings;
use proxy_identity::mint::{self, KeyAlgorithm, Validity};
use proxy_identity::rustls::pki_types::pem::PemObject;
use proxy_identity::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use proxy_identity::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use proxy_identity::rustls::{
    self, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use proxy_identity::{CredentialPaths, CredentialStore, Credentials, PeerPolicy, crypto_provider};

const STEP: Duration = Duration::from_secs(10);
/// The short leaf's life after it is minted: the gateway must start first.
const LIFETIME: Duration = Duration::from_secs(5);
/// How long streams are tried after notAfter.
const AFTER_EXPIRY: Duration = Duration::from_secs(3);

fn free_addr(ip: Ipv4Addr) -> SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

fn not_after(identity: &Path) -> SystemTime {
    Credentials::load(&CredentialPaths::in_dir(identity), SystemTime::now())
        .unwrap()
        .not_after()
}

struct Gateway {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- gateway log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// Starts a gateway of cluster-a with the identity and manifests under `root`.
fn start_gateway(root: &Path, inbound: SocketAddr, admin: SocketAddr) -> Gateway {
    let log = root.join("gateway.log");
    let child = Command::new(env!("CARGO_BIN_EXE_isthmus-proxy"))
        .arg("gateway")
        .args(["--cluster", "cluster-a"])
        .arg("--identity-dir")
        .arg(root.join("identity"))
        .arg("--manifests")
        .arg(root.join("manifests"))
        .args(["--inbound-addr", &inbound.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--reload-interval", "200ms"])
        .args(["--tunnel-connections", "1"])
        .env_clear()
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Gateway { child, log }
}

fn write_manifests(root: &Path, inbound: SocketAddr, peer: Option<SocketAddr>) {
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("settings.yaml"),
        cluster_settings("cluster-a", inbound),
    )
    .unwrap();
    if let Some(peer) = peer {
        std::fs::write(manifests.join("link.yaml"), link("cluster-b", peer, peer)).unwrap();
    }
}

fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + STEP;
    loop {
        let ready = isthmus_tests::pod::http_get(admin, "/ready")
            .is_ok_and(|r| r.get(9..12) == Some("200"));
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "the gateway never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_client_whose_leaf_expired_gets_no_stream_on_its_pooled_connection() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ip = Ipv4Addr::new(127, 0, 92, 1);
    let inbound = free_addr(ip);
    let admin = free_addr(ip);

    let validity = Validity::from_now(Duration::from_secs(3600));
    let anchor = mint::trust_anchor("lifetime anchor", validity, KeyAlgorithm::EcdsaP256).unwrap();
    let issuer_a = mint::issuer(&anchor, "cluster-a", validity, KeyAlgorithm::EcdsaP256).unwrap();
    let issuer_b = mint::issuer(&anchor, "cluster-b", validity, KeyAlgorithm::EcdsaP256).unwrap();
    short_lived_gateway_leaf(&issuer_a, "cluster-a", Duration::from_secs(1800))
        .write_dir(&root.join("identity"), false)
        .unwrap();
    write_manifests(root, inbound, None);
    let _gateway = start_gateway(root, inbound, admin);
    wait_ready(admin);

    // The client: a short leaf, and a pool that itself never retires a connection
    // (no deadline), so only the gateway can end its use.
    let client_dir = root.join("client");
    short_lived_gateway_leaf(&issuer_b, "cluster-b", LIFETIME)
        .write_dir(&client_dir, false)
        .unwrap();
    let expires = not_after(&client_dir);
    let store = Arc::new(CredentialStore::load(CredentialPaths::in_dir(&client_dir)).unwrap());
    let rt = runtime();
    let stopped = tokio_util::sync::CancellationToken::new();
    let authority = Authority::parse("nowhere.default.svc.cluster.local:80").unwrap();
    let (before, after) = rt.block_on(async {
        let pool = Pool::spawn(
            proxy_core::pool::PeerConfig {
                name: Arc::from("test/gateway-a"),
                addr: inbound,
                server_name: ServerName::IpAddress(inbound.ip().into()),
                tls: proxy_identity::client_config(
                    store,
                    PeerPolicy::Exact(gateway_id("cluster-a")),
                ),
                connect_timeout: STEP,
                connections: 1,
                h2: H2Settings::default(),
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_millis(500),
                handshake_failed: None,
                deadline: None,
            },
            stopped,
        );
        // Served before notAfter: the gateway's handler answers `no_route`.
        let mut before = Vec::new();
        for _ in 0..3 {
            before.push(
                pool.open_answered(&authority, None)
                    .await
                    .err()
                    .map(|e| e.refusal()),
            );
        }
        assert!(
            SystemTime::now() < expires,
            "the gateway took too long to start: the leaf expired before it was checked"
        );
        let wait = expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(50)).await;
        let mut after = Vec::new();
        let until = Instant::now() + AFTER_EXPIRY;
        while Instant::now() < until {
            let outcome = pool.open_answered(&authority, None).await;
            after.push(match outcome {
                Ok(_) => "opened".to_owned(),
                Err(PoolError::Refused { refusal, .. }) => refusal.as_str().to_owned(),
                Err(e) => format!("failed: {e}"),
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (before, after)
    });
    assert!(
        before.iter().all(|r| *r == Some(Refusal::NoRoute)),
        "before notAfter the gateway serves streams (no_route): {before:?}"
    );
    let served = after
        .iter()
        .filter(|a| *a == "opened" || *a == Refusal::NoRoute.as_str())
        .count();
    eprintln!(
        "after notAfter: {} streams tried, {served} served by the gateway; outcomes: {after:?}",
        after.len()
    );
    assert!(after.len() >= 10, "too few attempts: {}", after.len());
    assert_eq!(
        served, 0,
        "the gateway served streams of a client whose leaf expired: {after:?}"
    );
}

/// Asks for a client certificate without requiring one and accepts any: the test
/// only watches the connection's life.
#[derive(Debug)]
struct OptionalClientCert;

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
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
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One connection the peer accepted: whether the client presented a leaf, and when
/// the connection ended (`None`: still open).
#[derive(Clone, Copy, Debug)]
struct Life {
    presented: bool,
    ended: Option<SystemTime>,
}

/// The link's peer gateway: an HTTP/2 server that answers PINGs, refuses every
/// stream, and keeps each connection until the client ends it (bounded by the test).
async fn peer_gateway(
    listener: tokio::net::TcpListener,
    config: Arc<ServerConfig>,
    lives: Arc<Mutex<Vec<Life>>>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        let lives = lives.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(sock).await else {
                return;
            };
            let presented = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let index = {
                let mut lives = lives.lock().unwrap();
                lives.push(Life {
                    presented,
                    ended: None,
                });
                lives.len() - 1
            };
            if let Ok(mut conn) = h2::server::handshake(tls).await {
                let serve = async {
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        let mut answer = http::Response::new(());
                        *answer.status_mut() = http::StatusCode::NOT_FOUND;
                        let _ = respond.send_response(answer, true);
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(30), serve).await;
            }
            lives.lock().unwrap()[index].ended = Some(SystemTime::now());
        });
    }
}

#[test]
fn a_gateway_whose_leaf_expired_retires_its_link_pool() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ip = Ipv4Addr::new(127, 0, 92, 3);
    let inbound = free_addr(ip);
    let admin = free_addr(ip);
    let peer_std = TcpListener::bind((Ipv4Addr::new(127, 0, 92, 4), 0)).unwrap();
    let peer_addr = peer_std.local_addr().unwrap();

    let validity = Validity::from_now(Duration::from_secs(3600));
    let anchor = mint::trust_anchor("lifetime anchor", validity, KeyAlgorithm::EcdsaP256).unwrap();
    let issuer_a = mint::issuer(&anchor, "cluster-a", validity, KeyAlgorithm::EcdsaP256).unwrap();
    let issuer_b = mint::issuer(&anchor, "cluster-b", validity, KeyAlgorithm::EcdsaP256).unwrap();
    let peer_leaf = short_lived_gateway_leaf(&issuer_b, "cluster-b", Duration::from_secs(1800));
    let identity = root.join("identity");
    short_lived_gateway_leaf(&issuer_a, "cluster-a", LIFETIME)
        .write_dir(&identity, false)
        .unwrap();
    let expires = not_after(&identity);
    write_manifests(root, inbound, Some(peer_addr));

    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(OptionalClientCert))
        .with_single_cert(
            certs(&peer_leaf.cert_chain_pem),
            PrivateKeyDer::from_pem_slice(peer_leaf.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let lives = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime();
    peer_std.set_nonblocking(true).unwrap();
    let listener = rt.block_on(async { tokio::net::TcpListener::from_std(peer_std).unwrap() });
    rt.spawn(peer_gateway(listener, Arc::new(config), lives.clone()));

    let _gateway = start_gateway(root, inbound, admin);
    let deadline = Instant::now() + STEP;
    while !lives.lock().unwrap().iter().any(|l| l.presented) {
        assert!(
            Instant::now() < deadline,
            "the gateway's link pool never connected with its leaf"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        SystemTime::now() < expires,
        "the gateway took too long to start: the leaf expired before it was checked"
    );
    std::thread::sleep(
        expires
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            + AFTER_EXPIRY,
    );
    let seen = lives.lock().unwrap().clone();
    eprintln!("connections the peer saw (notAfter {expires:?}): {seen:?}");
    let with_leaf_open: Vec<&Life> = seen
        .iter()
        .filter(|l| l.presented && l.ended.is_none())
        .collect();
    assert!(
        with_leaf_open.is_empty(),
        "the link pool still holds connections made with its expired leaf {AFTER_EXPIRY:?} after notAfter: {seen:?}"
    );
    for life in seen.iter().filter(|l| l.presented) {
        let ended = life.ended.unwrap();
        assert!(
            ended >= expires,
            "a connection with the leaf ended before notAfter, so it did not prove the retirement: {seen:?}"
        );
    }
}
