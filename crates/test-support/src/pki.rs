//! Certificates minted at test time: one trust anchor, an issuer per cluster and
//! leaves under them (through `proxy_identity::mint`, as `isthmus identity` makes
//! them), validity windows in the past or future, certificates the mint refuses to
//! make (forged CAs, impostors), and [`Presented`], a raw TLS peer.
//!
//! Nothing is checked in: every run mints its own, so nothing expires in the tree.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use isthmus_vocab::SpiffeId;
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

/// A SPIFFE ID the test wrote; fails the test when it does not parse.
pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s:?} is not a SPIFFE ID: {e}"))
}

/// A SPIFFE ID, or the text of one a test wrote as a constant.
pub trait ToSpiffeId {
    fn to_spiffe_id(&self) -> SpiffeId;
}

impl ToSpiffeId for SpiffeId {
    fn to_spiffe_id(&self) -> SpiffeId {
        self.clone()
    }
}

impl ToSpiffeId for str {
    fn to_spiffe_id(&self) -> SpiffeId {
        id(self)
    }
}

/// `n` hours from now.
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

/// A validity window entirely in the past (two hours ago to one hour ago).
pub fn expired() -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now - Duration::from_secs(7200),
        not_after: now - Duration::from_secs(3600),
    }
}

/// A validity window entirely in the future (in half an hour, for half an hour).
pub fn future() -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now + Duration::from_secs(1800),
        not_after: now + Duration::from_secs(3600),
    }
}

/// Valid from a minute ago until `lifetime` from now: a leaf a test watches run out.
pub fn short_lived(lifetime: Duration) -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now - Duration::from_secs(60),
        not_after: now + lifetime,
    }
}

/// One trust anchor and its issuers, keyed by a name: a cluster's (`cluster-a`,
/// minted on first use), or any other for a second issuer of a cluster during a
/// rollover ([`Pki::add_issuer`]).
///
/// The anchor is valid from four hours ago for two days and the issuers from three
/// hours ago for a day, so that leaves expired hours ago can still be minted under
/// them; leaves are valid for an hour unless the test says otherwise.
pub struct Pki {
    anchor: CertificateAuthority,
    issuers: Mutex<HashMap<String, CertificateAuthority>>,
}

impl Pki {
    /// A new trust anchor named `anchor`.
    pub fn new(anchor: &str) -> Pki {
        let anchor = mint::trust_anchor(anchor, window(4, 48), KeyAlgorithm::default())
            .unwrap_or_else(|e| panic!("minting the trust anchor {anchor:?}: {e}"));
        Pki {
            anchor,
            issuers: Mutex::default(),
        }
    }

    /// The trust anchor every issuer of this PKI chains to.
    pub fn anchor(&self) -> &CertificateAuthority {
        &self.anchor
    }

    /// Adds (or replaces) the issuer named `key`, issued for `cluster`.
    pub fn add_issuer(&self, key: &str, cluster: &str) -> CertificateAuthority {
        let issuer = self.mint_issuer(cluster);
        self.lock().insert(key.to_owned(), issuer.clone());
        issuer
    }

    /// The issuer named `key`; for a name never added, a new issuer of the cluster
    /// of that name.
    pub fn issuer(&self, key: &str) -> CertificateAuthority {
        // A panic while holding the lock cannot leave the map half-written.
        self.lock()
            .entry(key.to_owned())
            .or_insert_with(|| self.mint_issuer(key))
            .clone()
    }

    /// A new leaf (new key, new serial) for `id` from the issuer named `key`, valid
    /// for an hour.
    pub fn leaf(&self, key: &str, id: &(impl ToSpiffeId + ?Sized)) -> LeafBundle {
        self.leaf_valid(key, id, hours(1))
    }

    /// [`Pki::leaf`] with the validity given.
    pub fn leaf_valid(
        &self,
        key: &str,
        id: &(impl ToSpiffeId + ?Sized),
        validity: Validity,
    ) -> LeafBundle {
        leaf_of(&self.issuer(key), &id.to_spiffe_id(), validity)
    }

    fn mint_issuer(&self, cluster: &str) -> CertificateAuthority {
        mint::issuer(
            &self.anchor,
            cluster,
            window(3, 24),
            KeyAlgorithm::default(),
        )
        .unwrap_or_else(|e| panic!("minting the issuer of {cluster}: {e}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CertificateAuthority>> {
        self.issuers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A leaf for `id` under `issuer`, whichever PKI it belongs to.
pub fn leaf_of(issuer: &CertificateAuthority, id: &SpiffeId, validity: Validity) -> LeafBundle {
    mint::leaf(issuer, id, validity, KeyAlgorithm::default())
        .unwrap_or_else(|e| panic!("minting a leaf for {id}: {e}"))
}

/// The notAfter of the leaf in the identity directory `dir`, as the proxy loads it.
pub fn not_after(dir: &std::path::Path) -> SystemTime {
    let paths = proxy_identity::CredentialPaths::in_dir(dir);
    proxy_identity::Credentials::load(&paths, SystemTime::now())
        .unwrap_or_else(|e| panic!("loading the identity in {}: {e}", dir.display()))
        .not_after()
}

/// The certificates of a PEM bundle, in order.
pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("a PEM bundle of the test does not parse: {e}"))
}

/// The private key of a PEM file.
pub fn private_key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .unwrap_or_else(|e| panic!("a PEM key of the test does not parse: {e}"))
}

/// The first certificate of a PEM bundle, as PEM.
pub fn first_pem(pem: &str) -> String {
    let end = "-----END CERTIFICATE-----\n";
    let at = pem.find(end).expect("a PEM certificate") + end.len();
    pem[..at].to_owned()
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
    forged_ca_of(parent, &[unit], path_len)
}

/// A CA under `parent` whose subject holds each of `units` as an OU (none, one or
/// several: what the mint never makes).
pub fn forged_ca_of(
    parent: &CertificateAuthority,
    units: &[&str],
    path_len: Option<u8>,
) -> CertificateAuthority {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("forged issuer {}", units.join(",")),
    );
    for unit in units {
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, *unit);
    }
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

/// A self-signed CA copying a cluster issuer's subject, with its own key.
pub fn impostor_ca(cluster: &str) -> CertificateAuthority {
    let mut params = CertificateParams::default();
    params.distinguished_name = mint::issuer_name(cluster);
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

/// What a raw TLS peer presents: any chain, with the key of its first certificate.
/// Its configs trust anyone, so a test sees what a proxy does with what it is shown
/// (an expired or foreign leaf the validated credentials would refuse to hold).
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

    /// A client config presenting this chain as is and trusting any server.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let builder = client_builder();
        let config = builder
            .with_client_auth_cert(self.chain.clone(), private_key(&self.key_pem))
            .unwrap();
        h2(config)
    }

    /// A client config presenting no certificate and trusting any server.
    pub fn anonymous_client_config() -> Arc<ClientConfig> {
        h2(client_builder().with_no_client_auth())
    }

    /// A server config presenting this chain as is; it asks for a client
    /// certificate without requiring one and takes any, so a client that withholds
    /// its certificate still completes the handshake.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server(server_builder().with_client_cert_verifier(Arc::new(AcceptAnything::default())))
    }

    /// A server config presenting this chain as is and asking for no client
    /// certificate.
    pub fn server_config_without_client_auth(&self) -> Arc<ServerConfig> {
        self.server(server_builder().with_no_client_auth())
    }

    fn server(
        &self,
        builder: rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>,
    ) -> Arc<ServerConfig> {
        let mut config = builder
            .with_single_cert(self.chain.clone(), private_key(&self.key_pem))
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

fn client_builder() -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
    client_builder_with(Arc::new(AcceptAnything::default()))
}

/// A TLS 1.3 client config builder that verifies the server with `verifier`.
pub fn client_builder_with(
    verifier: Arc<AcceptAnything>,
) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
    ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
}

fn server_builder() -> rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier> {
    ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
}

fn h2(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Verifies nothing, either way: a peer that takes whatever it is shown. Its
/// signature checks pass too, so what a test learns is what the proxy presented,
/// never whether this side liked it. It counts the server certificates it was shown.
#[derive(Debug, Default)]
pub struct AcceptAnything {
    server_certs: AtomicUsize,
    /// Set once a server showed a certificate, for a caller that holds only this.
    shown: Option<Arc<AtomicBool>>,
}

impl AcceptAnything {
    /// One that also sets `shown` once a server showed it a certificate: tells a
    /// refusal before the server's certificate from one after it.
    pub fn noting(shown: Arc<AtomicBool>) -> Self {
        Self {
            shown: Some(shown),
            ..Self::default()
        }
    }

    /// How many server certificates handshakes through it were shown.
    pub fn server_certs_seen(&self) -> usize {
        self.server_certs.load(Ordering::SeqCst)
    }
}

/// The signature methods of [`AcceptAnything`], the same as a server's verifier and
/// as a client's: every signature passes, every scheme is offered.
macro_rules! accept_any_signature {
    () => {
        accept_any_signature!(verify_tls12_signature, verify_tls13_signature);
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            crypto_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
    ($($method:ident),+) => {
        $(
            fn $method(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                Ok(HandshakeSignatureValid::assertion())
            }
        )+
    };
}

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.server_certs.fetch_add(1, Ordering::SeqCst);
        if let Some(shown) = &self.shown {
            shown.store(true, Ordering::SeqCst);
        }
        Ok(ServerCertVerified::assertion())
    }
    accept_any_signature!();
}

impl ClientCertVerifier for AcceptAnything {
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
    accept_any_signature!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clusters_leaf_chains_to_its_issuer_and_the_anchor() {
        let pki = Pki::new("test anchor");
        let leaf = pki.leaf("cluster-a", &id("spiffe://cluster.local/ns/default/sa/x"));
        assert_eq!(certs(&leaf.cert_chain_pem).len(), 2, "leaf and issuer");
        assert_eq!(leaf.anchors_pem, pki.anchor().ca.cert_pem);
        // The issuer is minted once and reused.
        assert_eq!(
            pki.issuer("cluster-a").ca.cert_pem,
            pki.issuer("cluster-a").ca.cert_pem
        );
        let rollover = pki.add_issuer("cluster-a-new", "cluster-a");
        assert_ne!(rollover.ca.cert_pem, pki.issuer("cluster-a").ca.cert_pem);
        // The first certificate alone is the leaf.
        assert_eq!(certs(&first_pem(&leaf.cert_chain_pem)).len(), 1);
        assert_eq!(
            certs(&first_pem(&leaf.cert_chain_pem)),
            certs(&leaf.cert_chain_pem)[..1]
        );
    }
}
