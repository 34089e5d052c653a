//! Whether a linked cluster's gateway is alive and is who the Link says, judged
//! over its tunnel port, the only port its LoadBalancer exposes: a TLS 1.3
//! handshake in which the gateway must present a chain to the mesh's trust
//! anchors for exactly the SPIFFE ID the Link expects.
//!
//! The check presents no certificate of its own: the gateway's identity lives
//! only in the gateway's pods (csi-driver-spiffe), never in a Secret this command
//! could read. In TLS 1.3 the server proves its identity before it learns that the
//! client has no certificate, so the client's side of the handshake completes and
//! the gateway then closes the connection, as it must for a peer without one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proxy_identity::SpiffeId;
use proxy_identity::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use proxy_identity::rustls::crypto::WebPkiSupportedAlgorithms;
use proxy_identity::rustls::pki_types::pem::PemObject as _;
use proxy_identity::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use proxy_identity::rustls::server::ParsedCertificate;
use proxy_identity::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// Why a link's gateway could not be verified.
#[derive(Debug)]
pub enum HandshakeError {
    /// No TCP connection (name, refusal, timeout).
    Connect(String),
    /// The TLS handshake failed, or the identity is not the expected one.
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
/// the server presents `expected` under `roots`; the address reached.
pub async fn handshake(
    target: &str,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    t: Duration,
) -> Result<SocketAddr, HandshakeError> {
    let addrs: Vec<SocketAddr> = tokio::time::timeout(t, tokio::net::lookup_host(target))
        .await
        .map_err(|_| HandshakeError::Connect(format!("resolving {target} took over {t:?}")))?
        .map_err(|e| HandshakeError::Connect(format!("cannot resolve {target}: {e}")))?
        .collect();
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
        let connector = tokio_rustls::TlsConnector::from(config(roots, expected));
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

/// TLS 1.3 with ALPN `h2`, as the tunnel speaks it; no client certificate.
fn config(roots: Arc<RootCertStore>, expected: SpiffeId) -> Arc<ClientConfig> {
    let provider = proxy_identity::crypto_provider();
    let verifier = GatewayVerifier {
        roots,
        expected,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        // "dangerous" only in rustls' sense: the name check is the SPIFFE ID below.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Accepts a server whose chain leads to the anchors and whose leaf carries
/// exactly the expected SPIFFE ID.
#[derive(Debug)]
struct GatewayVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for GatewayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = proxy_identity::verify::spiffe_id_of(end_entity)
            .map_err(|e| rustls::Error::General(format!("the gateway's certificate: {e}")))?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "the gateway presents {id}, not {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
