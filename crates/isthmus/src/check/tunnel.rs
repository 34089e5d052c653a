//! Whether a linked cluster's gateway is alive and is who the Link says, judged
//! over its tunnel port, the only port its LoadBalancer exposes: a TLS 1.3
//! handshake in which the gateway must present a chain to the mesh's trust
//! anchors for exactly the SPIFFE ID the Link expects, issued by the issuer of
//! the cluster the Link names. Every cluster's gateway holds the same SPIFFE ID:
//! the issuer is what tells a Link pointed at the wrong cluster, as the data
//! plane's verifier (the same one, from the identity crate) would.
//!
//! The check presents no certificate of its own: the gateway's identity lives
//! only in the gateway's pods (csi-driver-spiffe), never in a Secret this command
//! could read. In TLS 1.3 the server proves its identity before it learns that the
//! client has no certificate, so the client's side of the handshake completes and
//! the gateway then closes the connection, as it must for a peer without one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_vocab::{ClusterName, SpiffeId};
use proxy_identity::PeerPolicy;
use proxy_identity::rustls::RootCertStore;
use proxy_identity::rustls::pki_types::pem::PemObject as _;
use proxy_identity::rustls::pki_types::{CertificateDer, ServerName};

/// Why a link's gateway could not be verified.
#[derive(Debug)]
pub enum HandshakeError {
    /// No TCP connection (name, refusal, timeout).
    Connect(String),
    /// The TLS handshake failed, or the identity or cluster is not the expected one.
    Tls(String),
}

/// The trust anchors of a PEM bundle; `Err` names what is wrong with it.
pub fn anchors(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("is not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("holds a certificate that is no trust anchor: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no certificate".to_owned());
    }
    Ok(roots)
}

/// Connects to `target` (`host:port`) and completes a TLS 1.3 handshake in which
/// the server presents `expected` under `roots`, from the issuer of `cluster`; the
/// address reached.
pub async fn handshake(
    target: &str,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    cluster: ClusterName,
    t: Duration,
) -> Result<SocketAddr, HandshakeError> {
    let addrs: Vec<SocketAddr> = tokio::time::timeout(t, tokio::net::lookup_host(target))
        .await
        .map_err(|_| HandshakeError::Connect(format!("resolving {target} took over {t:?}")))?
        .map_err(|e| HandshakeError::Connect(format!("cannot resolve {target}: {e}")))?
        .collect();
    let policy = PeerPolicy::Exact(expected).in_cluster(cluster);
    let mut last = format!("{target} resolves to no address");
    for addr in addrs {
        let tcp = match tokio::time::timeout(t, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => {
                last = format!("connecting to {addr} took over {t:?}");
                continue;
            }
            Ok(Err(e)) => {
                last = format!("cannot connect to {addr}: {e}");
                continue;
            }
            Ok(Ok(tcp)) => tcp,
        };
        // No client certificate: the gateway's identity lives only in its pods.
        let config = proxy_identity::anchors_client_config(roots, policy);
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = ServerName::IpAddress(addr.ip().into());
        return match tokio::time::timeout(t, connector.connect(name, tcp)).await {
            Err(_) => Err(HandshakeError::Tls(format!(
                "the TLS handshake with {addr} took over {t:?}"
            ))),
            Ok(Err(e)) => Err(HandshakeError::Tls(format!(
                "TLS handshake with {addr}: {e}"
            ))),
            Ok(Ok(_tls)) => Ok(addr),
        };
    }
    Err(HandshakeError::Connect(last))
}
