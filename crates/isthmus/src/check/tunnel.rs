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
use proxy_core::resolve::{GatewayHost, SystemLookup, resolve};
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

/// Resolves `host` by the gateways' own rule (an IP literal a gateway can be at,
/// or a name's usable addresses, through the system resolver), then completes a
/// TLS 1.3 handshake at every address, in each of which the server presents
/// `expected` under `roots`, from the issuer of `cluster`: a gateway spreads a
/// link's connections over all of them, so each must pass. The addresses reached.
pub async fn handshake(
    host: &str,
    port: u16,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    cluster: ClusterName,
    t: Duration,
) -> Result<Vec<SocketAddr>, HandshakeError> {
    let resolved = async {
        let host = GatewayHost::parse(host)?;
        resolve(&SystemLookup, &host, port, t).await
    };
    let addrs = resolved
        .await
        .map_err(|e| HandshakeError::Connect(e.to_string()))?;
    let policy = PeerPolicy::Exact(expected).in_cluster(cluster);
    for addr in &addrs {
        handshake_at(*addr, roots.clone(), policy.clone(), t).await?;
    }
    Ok(addrs)
}

/// [`handshake`] at one address.
async fn handshake_at(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    policy: PeerPolicy,
    t: Duration,
) -> Result<(), HandshakeError> {
    let tcp = match tokio::time::timeout(t, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(HandshakeError::Connect(format!(
                "connecting to {addr} took over {t:?}"
            )));
        }
        Ok(Err(e)) => {
            return Err(HandshakeError::Connect(format!(
                "cannot connect to {addr}: {e}"
            )));
        }
        Ok(Ok(tcp)) => tcp,
    };
    // No client certificate: the gateway's identity lives only in its pods.
    let config = proxy_identity::anchors_client_config(roots, policy);
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::IpAddress(addr.ip().into());
    match tokio::time::timeout(t, connector.connect(name, tcp)).await {
        Err(_) => Err(HandshakeError::Tls(format!(
            "the TLS handshake with {addr} took over {t:?}"
        ))),
        Ok(Err(e)) => Err(HandshakeError::Tls(format!(
            "TLS handshake with {addr}: {e}"
        ))),
        Ok(Ok(_tls)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected() -> (SpiffeId, ClusterName) {
        (
            SpiffeId::parse("spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway").unwrap(),
            ClusterName::parse("cluster-a").unwrap(),
        )
    }

    async fn connect_error(host: &str, port: u16) -> String {
        let (id, cluster) = expected();
        let roots = Arc::new(RootCertStore::empty());
        match handshake(host, port, roots, id, cluster, Duration::from_secs(5)).await {
            Err(HandshakeError::Connect(detail)) => detail,
            other => panic!("{host}:{port}: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_address_the_gateway_refuses_is_refused_in_its_words() {
        for bad in ["0.0.0.0", "224.0.0.1", "::"] {
            assert_eq!(
                connect_error(bad, 4143).await,
                GatewayHost::parse(bad).unwrap_err().to_string()
            );
        }
    }

    #[tokio::test]
    async fn a_name_is_resolved_as_the_gateway_resolves_it() {
        // localhost comes from the hosts file, as a gateway's names would.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let detail = connect_error("localhost", port).await;
        assert!(
            detail.starts_with(&format!("cannot connect to 127.0.0.1:{port}")),
            "{detail}"
        );
    }
}
