//! Fixtures shared by the integration tests: a two-cluster PKI minted at test time
//! (from the test-support crate), credential directories, loopback handshakes with
//! timeouts, and a bare rustls peer that presents whatever certificate a test hands
//! it (expired, foreign...), which the validated `Credentials` would refuse to hold.

#![allow(clippy::unwrap_used, dead_code, unused_imports)]

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use isthmus_test_support::pki::{expired, future, hours, id, window};
use isthmus_test_support::{Pki as Mint, Presented};
use isthmus_vocab::SpiffeId;
use proxy_identity::mint::{CertificateAuthority, LeafBundle, Validity};
use proxy_identity::rustls::pki_types::ServerName;
use proxy_identity::rustls::{ClientConfig, ServerConfig};
use proxy_identity::{CredentialPaths, CredentialStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// Every await of these tests is bounded by this.
pub const STEP: Duration = Duration::from_secs(10);

pub async fn timeout<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

pub const TD: &str = "cluster.local";

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

/// CAs valid from hours ago, so that expired leaves can be minted under them.
pub fn pki() -> Pki {
    let mint = Mint::new("test anchor");
    Pki {
        anchor: mint.anchor().clone(),
        cluster_a: mint.issuer("cluster-a"),
        cluster_b: mint.issuer("cluster-b"),
    }
}

pub fn leaf(issuer: &CertificateAuthority, id: &SpiffeId) -> LeafBundle {
    leaf_with(issuer, id, hours(1))
}

pub fn leaf_with(issuer: &CertificateAuthority, id: &SpiffeId, validity: Validity) -> LeafBundle {
    isthmus_test_support::pki::leaf_of(issuer, id, validity)
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
    match bundle {
        Some(b) => Presented::of(b).client_config(),
        None => Presented::anonymous_client_config(),
    }
}

/// A server config presenting `bundle` as is and asking for no client certificate.
pub fn raw_server(bundle: &LeafBundle) -> Arc<ServerConfig> {
    Presented::of(bundle).server_config_without_client_auth()
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
