//! Peer verification: the chain against the store's current trust anchors, then the
//! peer's SPIFFE ID, and where the policy asks, its cluster, against a [`PeerPolicy`].
//!
//! The cluster is the one the verified issuer names ([`crate::cluster`]), never read
//! from the chain as the peer ordered it.
//!
//! SPIFFE peers are named by their URI SAN, so DNS names are ignored: a client may send
//! any SNI and the server's DNS SANs (if any) are never compared with it. The anchors
//! are read from the [`CredentialStore`] at every handshake, so a rotated `ca.crt`
//! applies to the next handshake without rebuilding configs.
//!
//! Failures are rustls errors (that is what the verifier traits return) whose cause is
//! typed: [`HandshakeFailure::classify`] turns any handshake error back into a reason
//! label for logs and metrics. This module does not log or count; the caller that owns
//! the connection does, once, with the peer's address.

use std::fmt;
use std::io;
use std::sync::Arc;

use isthmus_vocab::{ClusterName, IdError, SpiffeId, TrustDomain};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    AlertDescription, CertificateError, DistinguishedName, Error, OtherError, RootCertStore,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::cluster::{self, Usage};
use crate::creds::CredentialStore;

/// Which peer identities a connection accepts, checked after the chain verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Exactly this identity (a sidecar dialling its gateway, a gateway its peer).
    Exact(SpiffeId),
    /// Any identity of this trust domain (a gateway accepting the mesh's sidecars).
    TrustDomain(TrustDomain),
    /// Any of these identities.
    AnyOf(Vec<SpiffeId>),
    /// What `ids` allows, from a leaf whose verified issuer is `cluster`'s: a SPIFFE ID
    /// alone does not say which cluster's issuer signed it, and every cluster's
    /// issuer can sign any ID (see [`PeerPolicy::in_cluster`]).
    InCluster {
        /// The cluster the peer's verified issuer must name.
        cluster: ClusterName,
        /// The identities allowed.
        ids: Box<PeerPolicy>,
    },
}

impl PeerPolicy {
    /// This policy, and the peer's leaf verified through `cluster`'s issuer. A link
    /// to cluster-a's gateway is `Exact(gateway id).in_cluster(cluster-a)`, so a
    /// gateway of another cluster holding the same ID (or any leaf another cluster's
    /// issuer minted with that ID) is refused.
    pub fn in_cluster(self, cluster: ClusterName) -> Self {
        match self {
            // The innermost requirement is the one that counts; nesting is flattened.
            Self::InCluster { ids, .. } => Self::InCluster { cluster, ids },
            ids => Self::InCluster {
                cluster,
                ids: Box::new(ids),
            },
        }
    }

    /// The cluster this policy requires of a peer, if any.
    pub fn cluster(&self) -> Option<&ClusterName> {
        match self {
            Self::InCluster { cluster, .. } => Some(cluster),
            _ => None,
        }
    }

    /// Whether `id` is acceptable by name. A policy that also requires a cluster
    /// needs [`PeerPolicy::check`] with the peer's verified cluster.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(expected) => id == expected,
            Self::TrustDomain(td) => id.is_member_of(td),
            Self::AnyOf(ids) => ids.contains(id),
            Self::InCluster { ids, .. } => ids.allows(id),
        }
    }

    /// `Ok` if `id`, verified through an issuer of `cluster` (`None`: of no
    /// cluster), is acceptable; else the mismatch naming both sides.
    pub fn check(&self, id: &SpiffeId, cluster: Option<&ClusterName>) -> Result<(), VerifyError> {
        if !self.allows(id) {
            return Err(VerifyError::IdentityMismatch {
                peer: id.clone(),
                expected: self.to_string(),
            });
        }
        match self.cluster() {
            Some(expected) if cluster != Some(expected) => Err(VerifyError::ClusterMismatch {
                peer: id.clone(),
                cluster: cluster.cloned(),
                expected: expected.clone(),
            }),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for PeerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InCluster { cluster, ids } => write!(f, "{ids} issued for cluster {cluster}"),
            Self::Exact(id) => write!(f, "{id}"),
            Self::TrustDomain(td) => write!(f, "any identity of trust domain {td}"),
            Self::AnyOf(ids) => {
                f.write_str("one of [")?;
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{id}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Why a certificate does not name an acceptable SPIFFE identity.
///
/// `Debug` renders like `Display` (plus the cause), because rustls shows the error it
/// carries with `{:?}` in its own message, which is what lands in logs.
#[derive(thiserror::Error)]
pub enum VerifyError {
    /// The certificate's DER does not parse.
    #[error("certificate is not parsable X.509: {detail}")]
    Unparsable {
        /// The parser's message.
        detail: String,
    },
    /// No URI SAN at all.
    #[error("certificate carries no URI SAN, so no SPIFFE ID")]
    NoSpiffeId,
    /// The X509-SVID rule is exactly one URI SAN.
    #[error("certificate carries {count} URI SANs; a SPIFFE certificate has exactly one")]
    MultipleUris {
        /// How many URI SANs it has.
        count: usize,
    },
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("certificate URI SAN is not a SPIFFE ID")]
    BadSpiffeId(#[source] IdError),
    /// A valid identity, but not the one expected.
    #[error("peer identity {peer} is not the expected {expected}")]
    IdentityMismatch {
        /// What the peer presented.
        peer: SpiffeId,
        /// The policy, rendered.
        expected: String,
    },
    /// The expected identity, but issued for another cluster (or for none).
    #[error(
        "peer identity {peer} was issued {}, expected an identity of cluster {expected}",
        match cluster { Some(c) => format!("for cluster {c}"), None => "by no cluster's issuer".to_owned() }
    )]
    ClusterMismatch {
        /// What the peer presented.
        peer: SpiffeId,
        /// The cluster its verified issuer names.
        cluster: Option<ClusterName>,
        /// The cluster the policy requires.
        expected: ClusterName,
    },
}

impl fmt::Debug for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        if let Self::BadSpiffeId(cause) = self {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

impl VerifyError {
    fn into_rustls(self) -> Error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The SPIFFE ID of a certificate: its single URI SAN, parsed strictly.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| VerifyError::Unparsable {
            detail: e.to_string(),
        })?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| VerifyError::Unparsable {
            detail: format!("subjectAltName: {e}"),
        })?;
    let mut uris = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let Some(uri) = uris.next() else {
        return Err(VerifyError::NoSpiffeId);
    };
    let others = uris.count();
    if others > 0 {
        return Err(VerifyError::MultipleUris { count: others + 1 });
    }
    SpiffeId::parse(uri).map_err(VerifyError::BadSpiffeId)
}

/// Why a handshake failed, as a label for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The peer's chain does not lead to our trust anchors (or the peer said so of ours).
    UnknownIssuer,
    /// A certificate of the chain is past its notAfter. A peer's `certificate_expired`
    /// alert lands here too, although TLS uses it for not-yet-valid as well.
    Expired,
    /// A certificate of the chain is before its notBefore.
    NotYetValid,
    /// The chain is good but the SPIFFE ID is not what the policy expects.
    IdentityMismatch,
    /// A client connected without a certificate (or the server said we sent none).
    NoClientCert,
    /// Any other certificate problem: no SPIFFE ID, bad encoding, wrong key usage,
    /// bad signature, or a peer's generic `bad_certificate`/`certificate_unknown`.
    BadCertificate,
    /// Not TLS 1.3 as expected: plaintext, garbage, wrong version, no common ALPN,
    /// a peer closing mid-handshake.
    Protocol,
    /// The transport failed (reset, timeout), not the TLS exchange.
    Io,
}

impl HandshakeFailure {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownIssuer => "unknown_issuer",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IdentityMismatch => "identity_mismatch",
            Self::NoClientCert => "no_client_cert",
            Self::BadCertificate => "bad_certificate",
            Self::Protocol => "protocol",
            Self::Io => "io",
        }
    }

    /// Classifies a rustls error, whether raised here or received as a peer's alert.
    pub fn classify(err: &Error) -> Self {
        match err {
            Error::InvalidCertificate(cert) => Self::classify_certificate(cert),
            Error::NoCertificatesPresented => Self::NoClientCert,
            Error::AlertReceived(alert) => match alert {
                AlertDescription::UnknownCA => Self::UnknownIssuer,
                AlertDescription::CertificateExpired => Self::Expired,
                AlertDescription::CertificateRequired => Self::NoClientCert,
                AlertDescription::AccessDenied => Self::IdentityMismatch,
                AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::DecryptError => Self::BadCertificate,
                _ => Self::Protocol,
            },
            _ => Self::Protocol,
        }
    }

    fn classify_certificate(err: &CertificateError) -> Self {
        match err {
            CertificateError::UnknownIssuer => Self::UnknownIssuer,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Self::NotYetValid
            }
            CertificateError::ApplicationVerificationFailure => Self::IdentityMismatch,
            CertificateError::Other(OtherError(inner)) => {
                match inner.downcast_ref::<VerifyError>() {
                    Some(
                        VerifyError::IdentityMismatch { .. } | VerifyError::ClusterMismatch { .. },
                    ) => Self::IdentityMismatch,
                    _ => Self::BadCertificate,
                }
            }
            _ => Self::BadCertificate,
        }
    }

    /// Classifies the `io::Error` that tokio-rustls returns from a failed handshake:
    /// a wrapped rustls error by its cause, an early EOF as a protocol failure (the peer
    /// gave up, often after sending us an alert or not speaking TLS), the rest as I/O.
    pub fn classify_io(err: &io::Error) -> Self {
        if let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
            return Self::classify(tls);
        }
        match err.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => Self::Protocol,
            _ => Self::Io,
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The whole check of a peer: its chain against the store's current anchors (for
/// `usage`), its SPIFFE ID, and its verified cluster, each against `policy`.
fn verify_peer(
    roots: &RootCertStore,
    policy: &PeerPolicy,
    algorithms: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<(), Error> {
    let cluster =
        cluster::verify_chain(end_entity, intermediates, roots, now, usage, algorithms.all)?;
    let id = spiffe_id_of(end_entity).map_err(VerifyError::into_rustls)?;
    policy
        .check(&id, cluster.as_ref())
        .map_err(VerifyError::into_rustls)
}

/// The handshake-signature methods of a rustls verifier, the same whatever it
/// checks of the chain and for servers and clients alike: each checks with the
/// algorithms `$algorithms` names, an expression of the verifier `$this`.
///
/// ```ignore
/// impl ServerCertVerifier for MyVerifier {
///     fn verify_server_cert(/* ... */) { /* ... */ }
///     proxy_identity::handshake_signature_checks!(this => this.algorithms);
/// }
/// ```
#[macro_export]
macro_rules! handshake_signature_checks {
    ($this:ident => $algorithms:expr) => {
        // TLS 1.2 is unreachable with the mesh's configs (TLS 1.3 only), kept correct
        // anyway.
        $crate::handshake_signature_checks!(@check $this => $algorithms,
            verify_tls12_signature, verify_tls13_signature);

        fn supported_verify_schemes(&self) -> Vec<$crate::rustls::SignatureScheme> {
            let $this = self;
            $algorithms.supported_schemes()
        }
    };
    (@check $this:ident => $algorithms:expr, $($method:ident),+) => {
        $(
            fn $method(
                &self,
                message: &[u8],
                cert: &$crate::rustls::pki_types::CertificateDer<'_>,
                dss: &$crate::rustls::DigitallySignedStruct,
            ) -> Result<
                $crate::rustls::client::danger::HandshakeSignatureValid,
                $crate::rustls::Error,
            > {
                let $this = self;
                $crate::rustls::crypto::$method(message, cert, dss, &$algorithms)
            }
        )+
    };
}

/// Where a verifier finds the trust anchors.
#[derive(Debug)]
pub(crate) enum Anchors {
    /// The store's current anchors, which follow its renewals.
    Store(Arc<CredentialStore>),
    /// A fixed bundle, for a client that holds no identity of its own.
    Fixed(Arc<RootCertStore>),
}

/// Verifies a peer's chain and identity: a server's for a client config, a client's
/// (always required) for a server config.
#[derive(Debug)]
pub(crate) struct SpiffeVerifier {
    anchors: Anchors,
    policy: PeerPolicy,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeVerifier {
    pub(crate) fn new(
        anchors: Anchors,
        policy: PeerPolicy,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Self {
        Self {
            anchors,
            policy,
            algorithms,
        }
    }

    /// [`verify_peer`] against the current anchors, for a peer in the role `usage`.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<(), Error> {
        let creds;
        let roots = match &self.anchors {
            Anchors::Store(store) => {
                creds = store.current();
                creds.roots()
            }
            Anchors::Fixed(roots) => roots,
        };
        verify_peer(
            roots,
            &self.policy,
            &self.algorithms,
            end_entity,
            intermediates,
            now,
            usage,
        )
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The chain, validity and the serverAuth key usage, but no DNS name: the name
        // is the SPIFFE ID.
        self.check(end_entity, intermediates, now, Usage::Server)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signature_checks!(this => this.algorithms);
}

impl ClientCertVerifier for SpiffeVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would have to borrow from the current anchors, which rotate; TLS 1.3
        // makes them optional and our clients present their one leaf regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity, intermediates, now, Usage::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signature_checks!(this => this.algorithms);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn policies() {
        let a = id("spiffe://td/ns/a/sa/a");
        let b = id("spiffe://td/ns/b/sa/b");
        let other = id("spiffe://other/ns/a/sa/a");
        assert!(PeerPolicy::Exact(a.clone()).allows(&a));
        assert!(!PeerPolicy::Exact(a.clone()).allows(&b));
        let td = PeerPolicy::TrustDomain(TrustDomain::parse("td").unwrap());
        assert!(td.allows(&a) && td.allows(&b) && !td.allows(&other));
        let any = PeerPolicy::AnyOf(vec![a.clone(), b.clone()]);
        assert!(any.allows(&b) && !any.allows(&other));
        let err = td.check(&other, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer identity spiffe://other/ns/a/sa/a is not the expected any identity of trust domain td"
        );
    }

    #[test]
    fn cluster_policies_need_the_id_and_the_cluster() {
        let gw = id("spiffe://td/ns/isthmus/sa/gateway");
        let a = ClusterName::parse("cluster-a").unwrap();
        let b = ClusterName::parse("cluster-b").unwrap();
        let policy = PeerPolicy::Exact(gw.clone()).in_cluster(a.clone());
        assert_eq!(policy.cluster(), Some(&a));
        assert!(policy.check(&gw, Some(&a)).is_ok());
        let err = policy.check(&gw, Some(&b)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer identity spiffe://td/ns/isthmus/sa/gateway was issued for cluster cluster-b, \
             expected an identity of cluster cluster-a"
        );
        assert!(matches!(
            policy.check(&gw, None),
            Err(VerifyError::ClusterMismatch { cluster: None, .. })
        ));
        assert!(matches!(
            policy.check(&id("spiffe://td/ns/x/sa/y"), Some(&a)),
            Err(VerifyError::IdentityMismatch { .. })
        ));
        // Re-scoping replaces the cluster rather than nesting.
        let moved = policy.in_cluster(b.clone());
        assert_eq!(moved.cluster(), Some(&b));
        assert!(moved.check(&gw, Some(&b)).is_ok());
        assert_eq!(
            HandshakeFailure::classify(
                &VerifyError::ClusterMismatch {
                    peer: gw,
                    cluster: None,
                    expected: a
                }
                .into_rustls()
            ),
            HandshakeFailure::IdentityMismatch
        );
    }

    #[test]
    fn classifies_errors() {
        let mismatch = VerifyError::IdentityMismatch {
            peer: id("spiffe://td/ns/a/sa/a"),
            expected: "x".into(),
        }
        .into_rustls();
        assert_eq!(
            HandshakeFailure::classify(&mismatch),
            HandshakeFailure::IdentityMismatch
        );
        let wrapped = io::Error::new(io::ErrorKind::InvalidData, mismatch);
        assert_eq!(
            HandshakeFailure::classify_io(&wrapped),
            HandshakeFailure::IdentityMismatch
        );
        assert_eq!(
            HandshakeFailure::classify(&VerifyError::NoSpiffeId.into_rustls()),
            HandshakeFailure::BadCertificate
        );
        assert_eq!(
            HandshakeFailure::classify(&Error::AlertReceived(AlertDescription::UnknownCA)),
            HandshakeFailure::UnknownIssuer
        );
        assert_eq!(
            HandshakeFailure::classify_io(&io::ErrorKind::ConnectionReset.into()),
            HandshakeFailure::Io
        );
        assert_eq!(
            HandshakeFailure::classify_io(&io::ErrorKind::UnexpectedEof.into()),
            HandshakeFailure::Protocol
        );
    }
}
