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

use std::fmt;

use rustls::RootCertStore;
use rustls::{CertRevocationListError, CertificateError, Error, OtherError};
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};

/// The name of a cluster of the mesh (`cluster-a`): a DNS label, 1-63 of `a-z`, `0-9`
/// and `-`, not starting or ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

/// A string that is not a cluster name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cluster name {0:?} is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
)]
pub struct ClusterNameError(pub String);

impl ClusterName {
    /// Parses `name`, exactly as spelled: no case folding, no trimming.
    pub fn parse(name: &str) -> Result<Self, ClusterNameError> {
        if is_dns_label(name) {
            Ok(Self(name.to_owned()))
        } else {
            Err(ClusterNameError(name.to_owned()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_are_dns_labels_as_spelled() {
        for good in ["cluster-a", "a", "b2", "x-1-y"] {
            assert_eq!(ClusterName::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "Cluster-a",
            "cluster-a.",
            " cluster-a",
            "cluster-a ",
            "-a",
            "a-",
            "clüster",
            "a_b",
            &"a".repeat(64),
        ] {
            assert!(ClusterName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
