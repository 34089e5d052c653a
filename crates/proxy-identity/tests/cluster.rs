//! Which cluster a leaf belongs to: read from the verified path, whatever chain the
//! holder sends; and the policies and stores that require a cluster.
//!
//! Chains are doctored here (extra, foreign, duplicated, reordered certificates) and
//! CAs forged with rcgen where `mint` refuses to make them (a leaf signed by the
//! anchor, a CA under an issuer, an issuer that names no cluster).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::SystemTime;

use common::*;
use isthmus_test_support::pki::{first_pem, forged_ca_of, forged_leaf};
use isthmus_vocab::{ClusterName, TrustDomain};
use proxy_identity::mint::{self, KeyAlgorithm, LeafBundle};
use proxy_identity::{
    CredentialPaths, CredentialStore, Credentials, CredsError, HandshakeFailure, PeerPolicy,
    client_config, server_config,
};

fn cluster(name: &str) -> ClusterName {
    ClusterName::parse(name).unwrap()
}

/// The cluster `Credentials` read from a leaf sent with `chain_pem` after it.
fn cluster_of(bundle: &LeafBundle, chain_pem: &str) -> Result<Option<String>, CredsError> {
    let leaf_pem = first_pem(&bundle.cert_chain_pem);
    Credentials::from_pem(
        &CredentialPaths::in_dir("mem"),
        format!("{leaf_pem}{chain_pem}").as_bytes(),
        bundle.key_pem.as_bytes(),
        bundle.anchors_pem.as_bytes(),
        SystemTime::now(),
    )
    .map(|creds| creds.cluster().map(|c| c.as_str().to_owned()))
}

#[test]
fn minted_issuers_name_their_cluster_and_sign_leaves_only() {
    let pki = pki();
    assert_eq!(pki.cluster_a.cluster(), Some(cluster("cluster-a")));
    assert_eq!(pki.cluster_b.cluster(), Some(cluster("cluster-b")));
    assert_eq!(pki.anchor.cluster(), None);
    let der = proxy_identity::rustls::pki_types::CertificateDer::from(rustls_pem(
        &pki.cluster_a.ca.cert_pem,
    ));
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    let constraints = x509.basic_constraints().unwrap().unwrap().value;
    assert!(constraints.ca);
    assert_eq!(constraints.path_len_constraint, Some(0));
    // The anchor signs issuers only.
    let err = mint::leaf(
        &pki.anchor,
        &frontend_id(),
        hours(1),
        KeyAlgorithm::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("signs issuers only"), "{err}");
}

fn rustls_pem(pem: &str) -> Vec<u8> {
    use proxy_identity::rustls::pki_types::pem::PemObject;
    proxy_identity::rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn the_cluster_comes_from_the_issuer_that_signed_the_leaf_whatever_the_chain_says() {
    let pki = pki();
    let a = &pki.cluster_a.ca.cert_pem;
    let b = &pki.cluster_b.ca.cert_pem;
    let anchor = &pki.anchor.ca.cert_pem;
    let leaf_b = leaf(&pki.cluster_b, &frontend_id());
    let leaf_a = leaf(&pki.cluster_a, &frontend_id());
    // A leaf of cluster-b's issuer, whatever else it sends, is cluster-b's.
    for (what, chain) in [
        ("as minted", b.clone()),
        ("own issuer then a's", format!("{b}{a}")),
        ("a's issuer first", format!("{a}{b}")),
        ("a's issuer twice first", format!("{a}{a}{b}")),
        ("own issuer duplicated", format!("{b}{b}{a}")),
        ("anchor included", format!("{anchor}{a}{b}")),
        ("anchor last", format!("{b}{anchor}")),
    ] {
        assert_eq!(
            cluster_of(&leaf_b, &chain).unwrap().as_deref(),
            Some("cluster-b"),
            "{what}"
        );
    }
    // Without its own issuer, a's issuer cannot stand in for it.
    for (what, chain) in [
        ("only a's issuer", a.clone()),
        ("a's issuer and the anchor", format!("{a}{anchor}")),
    ] {
        let err = cluster_of(&leaf_b, &chain).unwrap_err();
        assert!(matches!(err, CredsError::Untrusted { .. }), "{what}: {err}");
    }
    assert_eq!(
        cluster_of(&leaf_a, &format!("{b}{a}")).unwrap().as_deref(),
        Some("cluster-a")
    );
}

#[test]
fn leaves_outside_the_anchor_issuer_leaf_shape_have_no_cluster() {
    let pki = pki();
    // Signed by the anchor directly.
    let direct = forged_leaf(&pki.anchor, "spiffe://cluster.local/ns/default/sa/direct");
    assert_eq!(
        cluster_of(&direct, &pki.cluster_a.ca.cert_pem).unwrap(),
        None,
        "a leaf of the anchor sending cluster-a's issuer"
    );
    assert_eq!(cluster_of(&direct, "").unwrap(), None);
    // Under an issuer the anchor signed without naming a cluster, or naming two.
    // (rcgen keeps one attribute per type, so two OUs cannot be forged here.)
    for units in [
        &[][..],
        &["Cluster-A"][..],
        &["cluster-a."][..],
        &[" cluster-a"][..],
    ] {
        let unnamed = forged_ca_of(&pki.anchor, units, Some(0));
        let leaf = forged_leaf(&unnamed, "spiffe://cluster.local/ns/default/sa/x");
        assert_eq!(
            cluster_of(&leaf, &unnamed.chain_pem).unwrap(),
            None,
            "issuer with OUs {units:?}"
        );
    }
    // Two CAs deep, the upper one unconstrained and naming cluster-a: still none.
    let upper = forged_ca_of(&pki.anchor, &["cluster-a"], None);
    let lower = forged_ca_of(&upper, &["cluster-a"], Some(0));
    let deep = forged_leaf(&lower, "spiffe://cluster.local/ns/default/sa/deep");
    assert_eq!(cluster_of(&deep, &lower.chain_pem).unwrap(), None);
    // A CA under a real issuer: the issuer's path length refuses the whole chain.
    let sub = forged_ca_of(&pki.cluster_a, &["cluster-a"], Some(0));
    let under_sub = forged_leaf(&sub, "spiffe://cluster.local/ns/default/sa/sub");
    let err = cluster_of(&under_sub, &sub.chain_pem).unwrap_err();
    assert!(matches!(err, CredsError::Untrusted { .. }), "{err}");
}

#[test]
fn during_a_rollover_old_and_new_issuers_of_a_cluster_both_count() {
    let pki = pki();
    let new_a = mint::issuer(
        &pki.anchor,
        "cluster-a",
        window(1, 24),
        KeyAlgorithm::default(),
    )
    .unwrap();
    let old_leaf = leaf(&pki.cluster_a, &frontend_id());
    let new_leaf = leaf(&new_a, &frontend_id());
    let (old, new) = (&pki.cluster_a.ca.cert_pem, &new_a.ca.cert_pem);
    // Both issuers share a subject: path building tries each, the signature decides.
    for (leaf, chain) in [
        (&old_leaf, format!("{new}{old}")),
        (&old_leaf, old.clone()),
        (&new_leaf, format!("{old}{new}")),
        (&new_leaf, new.clone()),
    ] {
        assert_eq!(
            cluster_of(leaf, &chain).unwrap().as_deref(),
            Some("cluster-a")
        );
    }
    let err = cluster_of(&old_leaf, new).unwrap_err();
    assert!(matches!(err, CredsError::Untrusted { .. }), "{err}");
}

#[tokio::test]
async fn a_cluster_policy_refuses_the_right_id_from_the_wrong_issuer() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let td = PeerPolicy::TrustDomain(TrustDomain::parse(TD).unwrap());
    let a_policy = || PeerPolicy::Exact(gateway_id()).in_cluster(cluster("cluster-a"));
    let client = store_in(
        &dir.path().join("client"),
        &leaf(&pki.cluster_a, &frontend_id()),
    );

    // The gateway's ID from cluster-a's issuer: accepted.
    let real = store_in(
        &dir.path().join("real"),
        &leaf(&pki.cluster_a, &gateway_id()),
    );
    let ok = handshake(
        server_config(real, td.clone()),
        client_config(client.clone(), a_policy()),
    )
    .await;
    assert!(ok.client.is_ok() && ok.server.is_ok());

    // The same ID minted by cluster-b's issuer, and by the anchor (forged): refused
    // by the client, as an identity mismatch naming both clusters.
    let minted_by_b = store_in(&dir.path().join("b"), &leaf(&pki.cluster_b, &gateway_id()));
    let by_anchor = forged_leaf(&pki.anchor, gateway_id().as_str());
    for (what, server) in [
        ("cluster-b's issuer", server_config(minted_by_b, td.clone())),
        ("the anchor", raw_server(&by_anchor)),
    ] {
        let refused = handshake(server, client_config(client.clone(), a_policy())).await;
        let err = refused.client.expect_err(what);
        assert_eq!(
            HandshakeFailure::classify_io(&err),
            HandshakeFailure::IdentityMismatch,
            "{what}: {err}"
        );
        assert!(err.to_string().contains("cluster-a"), "{what}: {err}");
    }

    // Server side: a pod's sidecar accepts its own cluster only.
    let pod = store_in(
        &dir.path().join("pod"),
        &leaf(&pki.cluster_a, &frontend_id()),
    );
    let own = td.clone().in_cluster(cluster("cluster-a"));
    let from_b = leaf(&pki.cluster_b, &gateway_id());
    let refused = handshake(
        server_config(pod.clone(), own.clone()),
        raw_client(Some(&from_b)),
    )
    .await;
    assert_eq!(
        HandshakeFailure::classify_io(&refused.server.expect_err("a client of cluster-b")),
        HandshakeFailure::IdentityMismatch
    );
    let from_a = leaf(&pki.cluster_a, &gateway_id());
    let accepted = handshake(server_config(pod, own), raw_client(Some(&from_a))).await;
    assert!(accepted.server.is_ok());
}

#[test]
fn a_store_for_a_cluster_refuses_leaves_of_other_clusters_at_load_and_rotation() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);
    leaf(&pki.cluster_b, &gateway_id())
        .write_dir(&at("b"), false)
        .unwrap();
    let err = CredentialStore::for_cluster(CredentialPaths::in_dir(at("b")), cluster("cluster-a"))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("tls.crt")
            && text.contains("cluster cluster-b")
            && text.contains("cluster cluster-a"),
        "{text}"
    );
    forged_leaf(&pki.anchor, gateway_id().as_str())
        .write_dir(&at("anchor"), false)
        .unwrap();
    let err =
        CredentialStore::for_cluster(CredentialPaths::in_dir(at("anchor")), cluster("cluster-a"))
            .unwrap_err();
    assert!(err.to_string().contains("no cluster's issuer"), "{err}");

    let good = leaf(&pki.cluster_a, &gateway_id());
    good.write_dir(&at("a"), false).unwrap();
    let store =
        CredentialStore::for_cluster(CredentialPaths::in_dir(at("a")), cluster("cluster-a"))
            .unwrap();
    let serial = store.current().serial().to_owned();
    leaf(&pki.cluster_b, &gateway_id())
        .write_dir(&at("a"), true)
        .unwrap();
    let err = store.reload().unwrap_err();
    assert_eq!(err.reason(), "wrong_cluster");
    assert_eq!(
        store.current().serial(),
        serial,
        "the old leaf keeps serving"
    );
    assert_eq!(store.status().cluster.as_deref(), Some("cluster-a"));
    // The same file a store for no cluster accepts.
    let any = CredentialStore::load(CredentialPaths::in_dir(at("a"))).unwrap();
    assert_eq!(any.current().cluster(), Some(&cluster("cluster-b")));
}
