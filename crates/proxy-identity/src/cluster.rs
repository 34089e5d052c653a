//! Which cluster a certificate belongs to, read from its verified path only.
//!
//! Every cluster has its own issuer under the mesh's one trust anchor, and that issuer
//! names its cluster in its subject: exactly one organizationalUnitName attribute
//! holding the cluster name (`OU=cluster-a`), beside basicConstraints CA with a path
//! length of 0. A leaf belongs to the cluster of the issuer whose signature on it
//! verified, on a path `leaf <- issuer <- anchor` that webpki built from the anchors
//! this proxy trusts. The order and content of the chain a peer sends do not matter:
//! extra, duplicated or reordered certificates are at most candidates for path
//! building, and a candidate that did not sign the leaf is never on the path.
//!
//! A leaf has no cluster (and so none of the rights that need one) when it was signed
//! by the anchor directly, when its path is longer than one issuer, or when its issuer
//! names no cluster or more than one. There is no fallback to anything the peer sent.
//!
//! Why the subject and not a URI SAN: the X509-SVID profile (section 3.2) forbids a
//! path in a signing certificate's SPIFFE ID, so `spiffe://td/cluster/a` on an issuer
//! would break the profile, and URI name constraints cannot carry it either (webpki
//! rejects every URI SAN under a URI name constraint). organizationalUnitName is a
//! typed attribute every X.509 tool shows, and the issuers `mint` made before this
//! rule already carry it.
//!
//! This module does not decide what a cluster may do; [`crate::verify`] and the
//! proxy's roles do.

use isthmus_vocab::ClusterName;
use rustls::RootCertStore;
use rustls::{CertRevocationListError, CertificateError, Error, OtherError};
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};

/// What a verified leaf is used for: the extended key usage webpki requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Usage {
    /// A server's leaf (serverAuth).
    Server,
    /// A client's leaf (clientAuth).
    Client,
}

/// Verifies `end_entity` with `intermediates` as path-building candidates against
/// `roots` at `now` for `usage`, and returns the cluster its verified issuer names.
///
/// `Ok(None)`: the chain is good but the leaf belongs to no cluster (see the module
/// docs). `Err`: the chain does not verify, as rustls would report it.
pub(crate) fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    now: UnixTime,
    usage: Usage,
    algorithms: &[&dyn SignatureVerificationAlgorithm],
) -> Result<Option<ClusterName>, Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    let eku = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    let path = cert
        .verify_for_usage(
            algorithms,
            &roots.roots,
            intermediates,
            now,
            eku,
            None,
            None,
        )
        .map_err(pki_error)?;
    let mut on_path = path.intermediate_certificates();
    // The first intermediate of a verified path is the CA whose signature on the leaf
    // verified; a longer path is not the mesh's anchor -> issuer -> leaf shape.
    let cluster = match (on_path.next(), on_path.next()) {
        (Some(issuer), None) => issuer_cluster(&issuer.der()),
        _ => None,
    };
    Ok(cluster)
}

/// The cluster a CA certificate names: its subject's one organizationalUnitName, if
/// that is a cluster name. Not a CA, no OU, several OUs or a bad name: none.
pub fn issuer_cluster(der: &CertificateDer<'_>) -> Option<ClusterName> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
    if !x509.is_ca() {
        return None;
    }
    let mut units = x509.subject().iter_organizational_unit();
    let unit = units.next()?;
    if units.next().is_some() {
        return None;
    }
    ClusterName::parse(unit.as_str().ok()?).ok()
}

/// webpki's error as rustls reports it, so that handshake failures classify alike
/// (after rustls' own private mapping, for the errors a mesh chain can hit).
fn pki_error(error: webpki::Error) -> Error {
    use webpki::Error as E;
    match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding.into(),
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }.into()
        }
        E::CertExpired { time, not_after } => {
            CertificateError::ExpiredContext { time, not_after }.into()
        }
        E::InvalidCertValidity => CertificateError::Expired.into(),
        E::UnknownIssuer => CertificateError::UnknownIssuer.into(),
        E::CertRevoked => CertificateError::Revoked.into(),
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        E::IssuerNotCrlSigner => CertRevocationListError::IssuerInvalidForCrl.into(),
        #[allow(deprecated)]
        E::UnsupportedSignatureAlgorithm | E::UnsupportedSignatureAlgorithmForPublicKey => {
            CertificateError::UnsupportedSignatureAlgorithm.into()
        }
        #[allow(deprecated)]
        E::RequiredEkuNotFound | E::RequiredEkuNotFoundContext(_) => {
            CertificateError::InvalidPurpose.into()
        }
        other => CertificateError::Other(OtherError(std::sync::Arc::new(other))).into(),
    }
}
