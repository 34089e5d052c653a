//! Fixtures shared by the integration tests: a two-cluster PKI minted at test time,
//! credential directories, loopback handshakes with timeouts, and a bare rustls peer
//! that presents whatever certificate a test hands it (expired, foreign...), which the
//! validated `Credentials` would refuse to hold.

#![allow(clippy::unwrap_used, dead_code)]

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use isthmus_vocab::SpiffeId;
use proxy_identity::mint::{self, CertificateAuthority, KeyAlgorithm, LeafBundle, Validity};
use proxy_identity::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use proxy_identity::rustls::pki_types::pem::PemObject;
use proxy_identity::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use proxy_identity::rustls::{self, ClientConfig, DigitallySignedStruct, ServerConfig};
use proxy_identity::{CredentialPaths, CredentialStore, crypto_provider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// Every await of these tests is bounded by this.
pub const STEP: Duration = Duration::from_secs(10);

pub async fn timeout<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

pub const TD: &str = "cluster.local";

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

pub fn gateway_id() -> SpiffeId {
    id("spiffe://cluster.local/ns/isthmus/sa/gateway")
}

pub fn frontend_id() -> SpiffeId {
    id("spiffe://cluster.local/ns/default/sa/frontend")
}

/// One trust anchor and an issuer per cluster.
pub struct Pki {
    pub anchor: CertificateAuthority,
    pub cluster_a: CertificateAuthority,
    pub cluster_b: CertificateAuthority,
}

pub fn hours(n: u64) -> Validity {
    Validity::from_now(Duration::from_secs(n * 3600))
}

/// From `back` hours ago to `ahead` hours from now.
pub fn window(back: u64, ahead: u64) -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now - Duration::from_secs(back * 3600),
        not_after: now + Duration::from_secs(ahead * 3600),
    }
}

/// CAs valid from hours ago, so that expired leaves can be minted under them.
pub fn pki() -> Pki {
    let anchor = mint::trust_anchor("test anchor", window(4, 48), KeyAlgorithm::default()).unwrap();
    let cluster_a =
        mint::issuer(&anchor, "cluster-a", window(3, 24), KeyAlgorithm::default()).unwrap();
    let cluster_b =
        mint::issuer(&anchor, "cluster-b", window(3, 24), KeyAlgorithm::default()).unwrap();
    Pki {
        anchor,
        cluster_a,
        cluster_b,
    }
}

pub fn leaf(issuer: &CertificateAuthority, id: &SpiffeId) -> LeafBundle {
    mint::leaf(issuer, id, hours(1), KeyAlgorithm::default()).unwrap()
}

pub fn leaf_with(issuer: &CertificateAuthority, id: &SpiffeId, validity: Validity) -> LeafBundle {
    mint::leaf(issuer, id, validity, KeyAlgorithm::default()).unwrap()
}

/// A validity window entirely in the past.
pub fn expired() -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now - Duration::from_secs(7200),
        not_after: now - Duration::from_secs(3600),
    }
}

/// A validity window entirely in the future.
pub fn future() -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now + Duration::from_secs(1800),
        not_after: now + Duration::from_secs(3600),
    }
}

pub fn store_in(dir: &Path, bundle: &LeafBundle) -> Arc<CredentialStore> {
    bundle.write_dir(dir, true).unwrap();
    Arc::new(CredentialStore::load(CredentialPaths::in_dir(dir)).unwrap())
}

/// The outcome of one loopback handshake, both sides.
pub struct Handshake {
    pub server: io::Result<server::TlsStream<TcpStream>>,
    pub client: io::Result<client::TlsStream<TcpStream>>,
}

/// Runs one handshake over loopback TCP. In TLS 1.3 the client finishes before the
/// server has judged its certificate, so a client that "succeeded" then reads once: a
/// rejection arrives as an alert, turned into the client's error here.
pub async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Handshake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let result = TlsAcceptor::from(server).accept(tcp).await;
        match result {
            Ok(mut tls) => {
                // Prove the connection carries data, then keep it for the caller.
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.map(|_| tls)
            }
            Err(e) => Err(e),
        }
    });
    let tcp = timeout(TcpStream::connect(addr)).await.unwrap();
    let name = ServerName::try_from("gateway.cluster-a.isthmus").unwrap();
    let client = match timeout(TlsConnector::from(client).connect(name, tcp)).await {
        Ok(mut tls) => match tls.write_all(b"ping").await {
            Ok(()) => {
                // A rejected client gets an alert; an accepted one gets nothing, so the
                // read is bounded and its timeout means "accepted".
                tls.flush().await.unwrap();
                let mut buf = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(300), tls.read(&mut buf)).await {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(0)) => Err(io::ErrorKind::UnexpectedEof.into()),
                    _ => Ok(tls),
                }
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let server = timeout(accept).await.unwrap();
    Handshake { server, client }
}

/// A client config presenting `bundle` as is (or no certificate), trusting any server.
pub fn raw_client(bundle: Option<&LeafBundle>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything));
    let mut config = match bundle {
        Some(b) => builder
            .with_client_auth_cert(chain(&b.cert_chain_pem), key(&b.key_pem))
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A server config presenting `bundle` as is and asking for no client certificate.
pub fn raw_server(bundle: &LeafBundle) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain(&bundle.cert_chain_pem), key(&bundle.key_pem))
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
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
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Lays `bundle` out as kubelet mounts a secret: the files are symlinks through
/// `..data`, itself a symlink to a versioned directory.
pub fn k8s_mount(dir: &Path, bundle: &LeafBundle) -> Arc<CredentialStore> {
    k8s_swap(dir, bundle, 1);
    for name in ["tls.crt", "tls.key", "ca.crt"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    }
    Arc::new(CredentialStore::load(CredentialPaths::in_dir(dir)).unwrap())
}

/// Kubelet's atomic update: a new versioned directory, then `..data` renamed onto it.
pub fn k8s_swap(dir: &Path, bundle: &LeafBundle, version: u32) {
    let versioned = format!("..v{version}");
    bundle.write_dir(&dir.join(&versioned), false).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&versioned, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

/// Replaces one file atomically (temporary name, then rename), as a careful writer does.
pub fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
