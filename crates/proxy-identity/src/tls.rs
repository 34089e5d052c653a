//! rustls configurations for the mesh's hops: TLS 1.3 only, ALPN `h2`, mutual
//! authentication by SPIFFE ID.
//!
//! Both configs present the store's current leaf through a resolver and verify peers
//! against the store's current anchors, so a rotation applies to the next handshake
//! with no config rebuilt and no live connection touched. Session resumption is off on
//! both sides: a resumed session would skip verification against the current anchors
//! and policy, and the tunnel pools long-lived connections, so it would save little.
//!
//! This module does not open sockets; callers wrap their streams with tokio-rustls.

use std::sync::{Arc, OnceLock};

use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, CommonState, ServerConfig, SignatureScheme};

use crate::creds::CredentialStore;
use crate::id::SpiffeId;
use crate::verify::{self, PeerPolicy, SpiffeClientVerifier, SpiffeServerVerifier};

/// The one ALPN protocol the mesh speaks between proxies.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider of every config and verifier of this crate: ring.
///
/// Chosen explicitly rather than through rustls' process-default provider, which is
/// first-come (any crate of the binary may install another one, or none, and then
/// `ServerConfig::builder()` panics) and would make which algorithms the mesh accepts
/// depend on link order. ring over aws-lc-rs because it builds without cmake and a C
/// toolchain beyond cc, and offers all the mesh needs: TLS 1.3 suites, ECDSA P-256/P-384
/// and Ed25519 (the workspace manifest records the same choice).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A server config that presents the store's leaf, requires a client certificate that
/// chains to the store's anchors and whose SPIFFE ID `policy` allows.
pub fn server_config(store: Arc<CredentialStore>, policy: PeerPolicy) -> Arc<ServerConfig> {
    let provider = crypto_provider();
    let verifier = SpiffeClientVerifier::new(
        store.clone(),
        policy,
        provider.signature_verification_algorithms,
    );
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(StoreResolver(store)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// A client config that presents the store's leaf and accepts a server whose chain
/// leads to the store's anchors and whose SPIFFE ID `policy` allows. The server name
/// passed to `connect` goes out as SNI and is otherwise ignored.
pub fn client_config(store: Arc<CredentialStore>, policy: PeerPolicy) -> Arc<ClientConfig> {
    let provider = crypto_provider();
    let verifier = SpiffeServerVerifier::new(
        store.clone(),
        policy,
        provider.signature_verification_algorithms,
    );
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        // "dangerous" only in rustls' sense: the verifier is ours, not webpki's DNS one.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(StoreResolver(store)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// The SPIFFE ID of the authenticated peer of a finished handshake.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    verify::spiffe_id_of(leaf).ok()
}

/// Whether the authenticated peer's leaf was issued by the same issuer (the same
/// cluster) as this proxy's own current leaf. Every cluster has its own issuer under
/// the shared anchor, so this tells a workload of our cluster from one of a linked
/// cluster even when both use the same trust domain.
pub fn peer_shares_issuer(conn: &CommonState, store: &CredentialStore) -> bool {
    let Some(peer_issuer) = conn.peer_certificates().and_then(|chain| chain.get(1)) else {
        return false;
    };
    let own = store.current();
    own.certified_key()
        .cert
        .get(1)
        .is_some_and(|own_issuer| own_issuer.as_ref() == peer_issuer.as_ref())
}

/// Presents whatever leaf the store holds at the time of the handshake.
#[derive(Debug)]
struct StoreResolver(Arc<CredentialStore>);

impl StoreResolver {
    fn certified_key(&self) -> Arc<CertifiedKey> {
        self.0.current().certified_key().clone()
    }
}

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // The one leaf we have is the answer whatever the server hints; if it cannot
        // sign with an offered scheme the handshake fails with that reason.
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
