//! A leaf that expires while in use: never presented after its notAfter, on either
//! side of a handshake, the expiry reported within a second by the store's watch,
//! and a fresh leaf restoring everything without a new store.
//!
//! Leaves are minted at test time to expire a few seconds ahead; the handshakes run
//! on real time (certificate validity is wall-clock time).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use isthmus_vocab::TrustDomain;
use proxy_identity::creds::LeafValidity;
use proxy_identity::mint::{LeafBundle, Validity};
use proxy_identity::rustls::pki_types::CertificateDer;
use proxy_identity::rustls::server::WebPkiClientVerifier;
use proxy_identity::rustls::{RootCertStore, ServerConfig};
use proxy_identity::{IdentityMetrics, PeerPolicy, crypto_provider};

/// A leaf of `issuer` that expires `secs` seconds from now.
fn short_leaf(issuer: &proxy_identity::mint::CertificateAuthority, secs: u64) -> LeafBundle {
    let now = SystemTime::now();
    leaf_with(
        issuer,
        &gateway_id(),
        Validity {
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(secs),
        },
    )
}

/// A server that asks for a client certificate but completes without one, so the
/// count of certificates a client presents includes zero.
fn optional_client_auth_server(bundle: &LeafBundle, anchors: &RootCertStore) -> Arc<ServerConfig> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(anchors.clone()), crypto_provider())
            .allow_unauthenticated()
            .build()
            .unwrap();
    let raw = raw_server(bundle);
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&proxy_identity::rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(raw.cert_resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// (certificates the store's side presented as a server, as a client) in one
/// handshake each.
/// 1 when the peer showed a certificate chain, 0 when it showed none or the
/// handshake failed.
fn shown(chain: Option<&[CertificateDer<'_>]>) -> usize {
    chain.map_or(0, |c| usize::from(!c.is_empty()))
}

async fn presented(
    store: &Arc<proxy_identity::CredentialStore>,
    peer: &LeafBundle,
    peer_server: &Arc<ServerConfig>,
) -> (usize, usize) {
    let td = TrustDomain::parse(TD).unwrap();
    let as_server = handshake(
        proxy_identity::server_config(store.clone(), PeerPolicy::TrustDomain(td.clone())),
        raw_client(Some(peer)),
    )
    .await;
    let client_end = as_server.client.as_ref().ok();
    let server_certs = shown(client_end.and_then(|tls| tls.get_ref().1.peer_certificates()));
    let as_client = handshake(
        peer_server.clone(),
        proxy_identity::client_config(store.clone(), PeerPolicy::TrustDomain(td)),
    )
    .await;
    let server_end = as_client.server.as_ref().ok();
    let client_certs = shown(server_end.and_then(|tls| tls.get_ref().1.peer_certificates()));
    (server_certs, client_certs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_leaf_is_withheld_reported_and_replaced() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    let bundle = short_leaf(&pki.cluster_a, 3);
    bundle.write_dir(dir.path(), true).unwrap();
    let store = Arc::new(
        proxy_identity::CredentialStore::load(proxy_identity::CredentialPaths::in_dir(dir.path()))
            .unwrap()
            .with_metrics(metrics.clone()),
    );
    let not_after = store.current().not_after();
    // A poll interval far longer than the test: only the wake-up at notAfter can
    // report the expiry in time.
    let watch = tokio::spawn(store.clone().watch(Duration::from_secs(600)));

    let peer = leaf(&pki.cluster_b, &frontend_id());
    let anchors = store.current().roots().clone();
    let peer_server = optional_client_auth_server(&peer, &anchors);

    let before = presented(&store, &peer, &peer_server).await;
    assert_eq!(
        before,
        (1, 1),
        "before notAfter the leaf is presented both ways"
    );
    assert!(!metrics.leaf_expired());

    // The metric turns within a second of notAfter (polled every 100 ms).
    let flipped = loop {
        if metrics.leaf_expired() {
            break SystemTime::now();
        }
        assert!(
            SystemTime::now() < not_after + Duration::from_secs(5),
            "identity_leaf_expired never turned 1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let delay = flipped.duration_since(not_after).unwrap_or_default();
    eprintln!("identity_leaf_expired turned 1 within {delay:?} of notAfter");
    assert!(
        delay <= Duration::from_secs(1),
        "expiry reported {delay:?} late"
    );
    assert!(matches!(store.validity(), LeafValidity::Expired { .. }));
    assert!(!store.status().valid_now);

    let mut attempts = 0;
    let mut shown = (0, 0);
    while attempts < 20 {
        let (server, client) = presented(&store, &peer, &peer_server).await;
        shown = (shown.0 + server, shown.1 + client);
        attempts += 1;
    }
    eprintln!(
        "after notAfter: {attempts} handshakes as server and {attempts} as client; \
         leaf presented {} and {} times",
        shown.0, shown.1
    );
    assert_eq!(shown, (0, 0), "an expired leaf was presented");

    // A fresh leaf in the directory: presented again, metric back to 0.
    leaf(&pki.cluster_a, &gateway_id())
        .write_dir(dir.path(), true)
        .unwrap();
    store.reload().unwrap();
    assert!(store.validity().is_valid());
    assert!(!metrics.leaf_expired());
    assert_eq!(presented(&store, &peer, &peer_server).await, (1, 1));
    watch.abort();
}
