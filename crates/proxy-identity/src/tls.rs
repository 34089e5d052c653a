//! rustls configurations for the mesh's hops: TLS 1.3 only, ALPN `h2`, mutual
//! authentication by SPIFFE ID.
//!
//! Both configs present the store's current leaf through a resolver and verify peers
//! against the store's current anchors, so a rotation applies to the next handshake
//! with no config rebuilt and no live connection touched. Session resumption is off on
//! both sides: a resumed session would skip verification against the current anchors
//! and policy, and the tunnel pools long-lived connections, so it would save little.
//!
//! # Policy on mesh ports
//!
//! - TLS 1.3 only: a TLS 1.2 (or older) ClientHello gets a `protocol_version` alert.
//! - Only the provider's TLS 1.3 suites (AES-GCM, ChaCha20-Poly1305): an offer of
//!   nothing else (CCM_8, say) gets `handshake_failure`.
//! - A client certificate is required ([`server_config`]'s verifier).
//! - SNI ([`mesh_server_config`]): a ClientHello that names a server must name this proxy, in the DNS form
//!   of its SPIFFE ID ([`sni_name`]); any other name is refused with an
//!   `access_denied` alert before our certificate is sent. A ClientHello without
//!   SNI is served: mesh clients dial IP addresses, RFC 6066 forbids IP literals in
//!   SNI, and peers authenticate by certificate both ways, not by name.
//!
//! This module does not open sockets; callers wrap their streams with tokio-rustls.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_vocab::{ClusterName, SpiffeId};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::cluster::{self, Usage};
use crate::creds::CredentialStore;
use crate::verify::{self, Anchors, PeerPolicy, SpiffeVerifier};

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
/// chains to the store's anchors and whose SPIFFE ID `policy` allows. Any SNI is
/// accepted; mesh listeners use [`mesh_server_config`], which checks it.
pub fn server_config(store: Arc<CredentialStore>, policy: PeerPolicy) -> Arc<ServerConfig> {
    build_server_config(store, policy, false)
}

/// [`server_config`] plus the mesh ports' SNI rule (see the module docs): a
/// ClientHello without SNI, or naming this proxy's identity ([`sni_name`]), is
/// served; one naming anyone else is refused before our certificate is sent.
pub fn mesh_server_config(store: Arc<CredentialStore>, policy: PeerPolicy) -> Arc<ServerConfig> {
    build_server_config(store, policy, true)
}

fn build_server_config(
    store: Arc<CredentialStore>,
    policy: PeerPolicy,
    strict_sni: bool,
) -> Arc<ServerConfig> {
    let provider = crypto_provider();
    let verifier = SpiffeVerifier::new(
        Anchors::Store(store.clone()),
        policy,
        provider.signature_verification_algorithms,
    );
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(ServerResolver { store, strict_sni }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// A client config that presents the store's leaf and accepts a server whose chain
/// leads to the store's anchors and whose SPIFFE ID `policy` allows. The server name
/// passed to `connect` goes out as SNI and is otherwise ignored.
pub fn client_config(store: Arc<CredentialStore>, policy: PeerPolicy) -> Arc<ClientConfig> {
    let builder = client_builder(Anchors::Store(store.clone()), policy);
    finish_client(builder.with_client_cert_resolver(Arc::new(StoreResolver(store))))
}

/// A client config that presents no certificate and accepts a server whose chain
/// leads to `roots` and whose SPIFFE ID and verified cluster `policy` allows: for
/// a tool that checks a gateway from outside the mesh, with no identity to load.
pub fn anchors_client_config(roots: Arc<RootCertStore>, policy: PeerPolicy) -> Arc<ClientConfig> {
    finish_client(client_builder(Anchors::Fixed(roots), policy).with_no_client_auth())
}

/// A TLS 1.3 client config verifying servers against `anchors` and `policy`, up to
/// its client certificate.
fn client_builder(
    anchors: Anchors,
    policy: PeerPolicy,
) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
    let provider = crypto_provider();
    let verifier = SpiffeVerifier::new(anchors, policy, provider.signature_verification_algorithms);
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        // "dangerous" only in rustls' sense: the verifier is ours, not webpki's DNS one.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
}

/// The mesh's ALPN, and no resumption: every connection shows its certificate.
fn finish_client(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// The DNS name a client may send as SNI to reach the holder of `id`:
/// `<sa>.<ns>.serviceaccount.identity.<trust-domain>`, after Linkerd's form (without
/// its control-plane namespace). `None` for an ID without the mesh's `/ns/../sa/..`
/// path, whose holder accepts only ClientHellos without SNI.
pub fn sni_name(id: &SpiffeId) -> Option<String> {
    Some(format!(
        "{}.{}.serviceaccount.identity.{}",
        id.service_account()?,
        id.namespace()?,
        id.trust_domain_name()
    ))
}

/// The SPIFFE ID of the authenticated peer of a finished handshake.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    verify::spiffe_id_of(leaf).ok()
}

/// The cluster of the authenticated client of a connection this proxy accepted
/// (a [`server_config`] handshake, finished): the one its verified issuer names,
/// after verifying the chain it presented again against the store's current anchors
/// (rustls keeps the chain as sent, not the path it verified). Any failure, or a
/// leaf of no cluster's issuer, is `None`: whoever asks for a cluster gets none.
///
/// This runs once, when the connection is accepted: nothing re-checks a pooled
/// connection later. What bounds an old connection instead is its deadline
/// ([`connection_deadline`]), after which the tunnel ends it.
pub fn peer_cluster(conn: &CommonState, store: &CredentialStore) -> Option<ClusterName> {
    let (leaf, intermediates) = conn.peer_certificates()?.split_first()?;
    let now = UnixTime::now();
    let creds = store.current();
    cluster::verify_chain(
        leaf,
        intermediates,
        creds.roots(),
        now,
        Usage::Client,
        crypto_provider().signature_verification_algorithms.all,
    )
    .ok()
    .flatten()
}

/// The `notAfter` of a certificate; `None` when it does not parse.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let secs = u64::try_from(x509.validity().not_after.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// When a mesh connection whose handshake just finished must stop carrying new
/// streams: the earlier of the peer's leaf's `notAfter` and that of our own current
/// leaf (the one the handshake presented, as the resolvers read the store at the
/// handshake). A leaf is checked only at the handshake, so without this bound a
/// pooled connection would outlive either leaf, and a peer whose identity lapsed
/// (expired, or its ServiceAccount gone and no renewal) would keep its rights.
/// `None` only when the peer presented no parsable leaf.
pub fn connection_deadline(conn: &CommonState, store: &CredentialStore) -> Option<SystemTime> {
    let peer = not_after(conn.peer_certificates()?.first()?)?;
    Some(peer.min(store.current().not_after()))
}

/// Presents whatever leaf the store holds at the time of the handshake, if it is
/// inside its validity window ([`CredentialStore::presentable`]).
#[derive(Debug)]
struct StoreResolver(Arc<CredentialStore>);

impl StoreResolver {
    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.0.presentable()
    }
}

/// Presents the store's current leaf to clients, after the SNI rule if `strict_sni`.
#[derive(Debug)]
struct ServerResolver {
    store: Arc<CredentialStore>,
    strict_sni: bool,
}

impl ResolvesServerCert for ServerResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.store.current();
        match client_hello.server_name() {
            _ if !self.strict_sni => {}
            None => {}
            Some(name)
                if sni_name(current.id()).is_some_and(|own| own.eq_ignore_ascii_case(name)) => {}
            Some(name) => {
                // rustls answers `None` with an access_denied alert: our certificate
                // is never shown to a client that asked for someone else.
                tracing::debug!(sni = name, "ClientHello names another server, refused");
                return None;
            }
        }
        // An expired leaf is withheld: rustls then refuses the handshake.
        self.store.presentable()
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // The one leaf we have is the answer whatever the server hints; if it cannot
        // sign with an offered scheme the handshake fails with that reason. An
        // expired one is withheld: the server then sees no certificate.
        self.certified_key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sni_name_of_a_workload_follows_linkerds_form() {
        let id =
            SpiffeId::parse("spiffe://cluster.local/ns/isthmus-multicluster/sa/gateway-a").unwrap();
        assert_eq!(
            sni_name(&id).as_deref(),
            Some("gateway-a.isthmus-multicluster.serviceaccount.identity.cluster.local")
        );
        let other = SpiffeId::parse("spiffe://cluster.local/some/service").unwrap();
        assert_eq!(sni_name(&other), None);
    }

    #[test]
    fn not_after_reads_the_leafs_validity_to_the_second() {
        use crate::mint::{self, KeyAlgorithm, Validity};
        use rustls_pki_types::pem::PemObject;
        let validity = Validity::from_now(Duration::from_secs(3600));
        let anchor = mint::trust_anchor("anchor", validity, KeyAlgorithm::EcdsaP256).unwrap();
        let issuer = mint::issuer(&anchor, "cluster-a", validity, KeyAlgorithm::EcdsaP256).unwrap();
        let in_ten_minutes = SystemTime::now() + Duration::from_secs(600);
        let secs = in_ten_minutes.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let want = UNIX_EPOCH + Duration::from_secs(secs);
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/app").unwrap();
        let leaf = mint::leaf(
            &issuer,
            &id,
            Validity {
                not_before: SystemTime::now(),
                not_after: want,
            },
            KeyAlgorithm::EcdsaP256,
        )
        .unwrap();
        let der = CertificateDer::pem_slice_iter(leaf.cert_chain_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(not_after(&der), Some(want));
        assert_eq!(not_after(&CertificateDer::from(vec![0x30, 0x00])), None);
    }
}
