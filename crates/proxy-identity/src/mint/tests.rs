use super::*;
use crate::creds::{CredentialPaths, Credentials};

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn hour() -> Validity {
    Validity::from_now(Duration::from_secs(3600))
}

/// Longer than [`hour`], so a leaf minted a moment later never outlives its CA.
fn hours(n: u64) -> Validity {
    Validity::from_now(Duration::from_secs(n * 3600))
}

#[test]
fn anchor_issuer_leaf_load_as_credentials() {
    for alg in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
    ] {
        let anchor = trust_anchor(
            "test anchor",
            Validity::from_now(DEFAULT_ANCHOR_LIFETIME),
            alg,
        )
        .unwrap();
        assert!(anchor.is_anchor());
        let issuer = issuer(
            &anchor,
            "cluster-a",
            Validity::from_now(DEFAULT_ISSUER_LIFETIME),
            alg,
        )
        .unwrap();
        assert!(!issuer.is_anchor());
        let workload = id("spiffe://cluster.local/ns/default/sa/hello");
        let bundle = leaf(&issuer, &workload, hour(), alg).unwrap();
        assert_eq!(
            bundle.cert_chain_pem.matches("BEGIN CERTIFICATE").count(),
            2
        );
        let creds = bundle
            .credentials(&CredentialPaths::in_dir("mem"), SystemTime::now())
            .unwrap();
        assert_eq!(creds.id(), &workload);
        assert_eq!(creds.certified_key().cert.len(), 2);
    }
}

#[test]
fn leaf_names_its_issuer_and_issuer_key() {
    let anchor = trust_anchor("a", hours(3), KeyAlgorithm::default()).unwrap();
    let issuer = issuer(&anchor, "cluster-b", hours(2), KeyAlgorithm::default()).unwrap();
    let bundle = leaf(
        &issuer,
        &id("spiffe://td/ns/n/sa/s"),
        hour(),
        KeyAlgorithm::default(),
    )
    .unwrap();
    let leaf_der = first_cert_der(Path::new("tls.crt"), &bundle.cert_chain_pem).unwrap();
    let issuer_der = first_cert_der(Path::new("ca.crt"), &issuer.ca.cert_pem).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(&issuer_der).unwrap();
    assert_eq!(leaf.issuer(), ca.subject());
    let ski = ca
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
            _ => None,
        })
        .expect("issuer has a subject key identifier");
    let aki = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(k) => {
                k.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        })
        .expect("leaf has an authority key identifier");
    assert_eq!(ski, aki);
    assert!(!leaf.is_ca());
    assert_ne!(leaf.raw_serial(), ca.raw_serial());
}

#[test]
fn refuses_what_a_ca_cannot_sign() {
    let anchor = trust_anchor("a", hours(3), KeyAlgorithm::default()).unwrap();
    let issuer_a = issuer(&anchor, "cluster-a", hours(2), KeyAlgorithm::default()).unwrap();
    // An issuer under an issuer.
    let err = issuer(&issuer_a, "cluster-c", hour(), KeyAlgorithm::default()).unwrap_err();
    assert!(err.to_string().contains("not a trust anchor"), "{err}");
    // A leaf outliving its issuer.
    let long = hours(4);
    let err = leaf(
        &issuer_a,
        &id("spiffe://td/a"),
        long,
        KeyAlgorithm::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("before the requested notAfter"),
        "{err}"
    );
    // A bad cluster name.
    let err = issuer(&anchor, "Cluster_A", hour(), KeyAlgorithm::default()).unwrap_err();
    assert!(matches!(err, MintError::ClusterName { .. }));
    // A key that is not the CA's.
    let other = trust_anchor("b", hours(3), KeyAlgorithm::default()).unwrap();
    let mut mixed = anchor.clone();
    mixed.ca.key_pem = other.ca.key_pem;
    let err = leaf(
        &mixed,
        &id("spiffe://td/a"),
        hour(),
        KeyAlgorithm::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    // A leaf is not a CA.
    assert!("rsa".parse::<KeyAlgorithm>().is_err());
}

#[test]
fn directories_round_trip_with_private_keys_0600() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = trust_anchor("a", hours(3), KeyAlgorithm::default()).unwrap();
    let anchor_dir = dir.path().join("anchor");
    anchor.write_dir(&anchor_dir, false).unwrap();
    let issuer_dir = dir.path().join("issuer");
    let read = CertificateAuthority::read_dir(&anchor_dir).unwrap();
    assert!(read.is_anchor());
    issuer(&read, "cluster-a", hours(2), KeyAlgorithm::default())
        .unwrap()
        .write_dir(&issuer_dir, false)
        .unwrap();
    let read_issuer = CertificateAuthority::read_dir(&issuer_dir).unwrap();
    assert!(!read_issuer.is_anchor());
    assert_eq!(read_issuer.anchors_pem, anchor.anchors_pem);
    let leaf_dir = dir.path().join("leaf");
    let written = leaf(
        &read_issuer,
        &id("spiffe://td/ns/a/sa/b"),
        hour(),
        KeyAlgorithm::default(),
    )
    .unwrap()
    .write_dir(&leaf_dir, false)
    .unwrap();
    assert_eq!(written.len(), 3);
    for (path, mode) in [
        (anchor_dir.join("ca.key"), 0o600),
        (issuer_dir.join("ca.key"), 0o600),
        (leaf_dir.join("tls.key"), 0o600),
        (leaf_dir.join("tls.crt"), 0o644),
    ] {
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            mode,
            "{}",
            path.display()
        );
    }
    Credentials::load(&CredentialPaths::in_dir(&leaf_dir), SystemTime::now()).unwrap();
    let err = anchor.write_dir(&anchor_dir, false).unwrap_err();
    assert!(matches!(err, MintError::Exists { .. }), "{err}");
    anchor.write_dir(&anchor_dir, true).unwrap();
    // A leaf directory is neither an anchor nor an issuer.
    fs::copy(leaf_dir.join("tls.crt"), leaf_dir.join("ca.crt")).unwrap();
    fs::copy(leaf_dir.join("tls.key"), leaf_dir.join("ca.key")).unwrap();
    let err = CertificateAuthority::read_dir(&leaf_dir).unwrap_err();
    assert!(err.to_string().contains("not self-signed"), "{err}");
}
