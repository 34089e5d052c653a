//! A raw TLS client for probing a proxy's mesh port: a client configuration that
//! offers exactly the TLS versions (and client certificate) a test chooses and
//! notes whether the server showed its certificate, and the rustls error of a
//! failed handshake as text.
//!
//! It deliberately trusts any server certificate: the probes check what the
//! server refuses and when, not who it is. [`handshake_over`] runs a handshake to
//! the server's first HTTP/2 frame; what is read after it stays with each test.

use std::io::{self, Read as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use isthmus_test_support::pki::AcceptAnything;
use proxy_identity::mint::LeafBundle;
use proxy_identity::rustls::pki_types::pem::PemObject;
use proxy_identity::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use proxy_identity::rustls::{self, ClientConfig, ClientConnection, StreamOwned};

/// A client config of the given TLS versions with ALPN `h2`, with `leaf` as client
/// certificate (or none), and the flag set once a server showed a certificate.
pub fn probe_config(
    versions: &[&'static rustls::SupportedProtocolVersion],
    leaf: Option<&LeafBundle>,
) -> anyhow::Result<(Arc<ClientConfig>, Arc<AtomicBool>)> {
    let seen = Arc::new(AtomicBool::new(false));
    let builder = ClientConfig::builder_with_provider(proxy_identity::crypto_provider())
        .with_protocol_versions(versions)
        .with_context(|| format!("the crypto provider refuses the TLS versions {versions:?}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything::noting(seen.clone())));
    let mut config = match leaf {
        Some(leaf) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(leaf.cert_chain_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .context("parsing the client leaf's certificate chain PEM")?;
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
                .context("parsing the client leaf's key PEM")?;
            builder
                .with_client_auth_cert(chain, key)
                .context("using the client leaf as client certificate")?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), seen))
}

/// The rustls error inside an IO error, as text (`AlertReceived(ProtocolVersion)`),
/// or the error's kind and message when it is not a TLS error.
pub fn tls_error(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => format!("{tls:?}"),
        None => format!("{:?}: {e}", e.kind()),
    }
}

/// Runs the handshake of `conn` over `sock`, each read bounded by `timeout`, and
/// reads the server's first frame whole, so later frames start on a frame boundary.
/// `Ok` with the stream when that frame is the SETTINGS of a served HTTP/2
/// connection; else the error (a late alert, say) as text.
pub fn handshake_over(
    mut sock: TcpStream,
    mut conn: ClientConnection,
    timeout: Duration,
) -> Result<StreamOwned<ClientConnection, TcpStream>, String> {
    const SETTINGS: u8 = 0x4;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| format!("setting the read timeout: {e}"))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| tls_error(&e))?;
    }
    let mut stream = StreamOwned::new(conn, sock);
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).map_err(|e| tls_error(&e))?;
    if head[3] != SETTINGS {
        return Err(format!("first frame is of type {}, not SETTINGS", head[3]));
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).map_err(|e| tls_error(&e))?;
    Ok(stream)
}
