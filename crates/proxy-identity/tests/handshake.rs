//! Mutual TLS between the configs of this crate over loopback: who gets in, and the
//! reason each refusal is given on both sides.

#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::sync::Arc;

use common::*;
use isthmus_vocab::TrustDomain;
use prometheus_client::registry::Registry;
use proxy_identity::{
    CredentialStore, HandshakeFailure, IdentityMetrics, PeerPolicy, client_config, peer_identity,
    server_config,
};
use tokio::io::AsyncWriteExt;

fn td_policy() -> PeerPolicy {
    PeerPolicy::TrustDomain(TrustDomain::parse(TD).unwrap())
}

fn reason<T>(side: &io::Result<T>) -> HandshakeFailure {
    match side {
        Ok(_) => panic!("handshake succeeded but should have failed"),
        Err(e) => {
            eprintln!("handshake error: {e}");
            HandshakeFailure::classify_io(e)
        }
    }
}

#[tokio::test]
async fn right_identities_connect_with_tls13_and_h2() {
    let pki = pki();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A sidecar of cluster-b dialling the gateway of cluster-a: issuers differ, the
    // anchor is shared.
    let gateway = store_in(dirs.0.path(), &leaf(&pki.cluster_a, &gateway_id()));
    let sidecar = store_in(dirs.1.path(), &leaf(&pki.cluster_b, &frontend_id()));
    let result = handshake(
        server_config(gateway.clone(), td_policy()),
        client_config(sidecar.clone(), PeerPolicy::Exact(gateway_id())),
    )
    .await;
    let server = result.server.unwrap();
    let client = result.client.unwrap();
    let (_, server_conn) = server.get_ref();
    let (_, client_conn) = client.get_ref();
    assert_eq!(peer_identity(server_conn), Some(frontend_id()));
    assert_eq!(peer_identity(client_conn), Some(gateway_id()));
    assert_eq!(server_conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        client_conn.protocol_version(),
        Some(proxy_identity::rustls::ProtocolVersion::TLSv1_3)
    );
    // The client's chain carried its issuer: leaf + cluster-b issuer.
    assert_eq!(server_conn.peer_certificates().unwrap().len(), 2);

    let any_of = PeerPolicy::AnyOf(vec![gateway_id(), frontend_id()]);
    let result = handshake(
        server_config(gateway, any_of.clone()),
        client_config(sidecar, any_of),
    )
    .await;
    result.server.unwrap();
    result.client.unwrap();
}

#[tokio::test]
async fn untrusted_anchor_is_unknown_issuer_on_both_sides() {
    let pki = pki();
    let foreign = pki_foreign();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let gateway = store_in(dirs.0.path(), &leaf(&pki.cluster_a, &gateway_id()));
    let intruder = store_in(dirs.1.path(), &leaf(&foreign, &frontend_id()));

    // A client of another anchor: the server refuses it.
    let result = handshake(
        server_config(gateway.clone(), td_policy()),
        client_config(intruder.clone(), td_policy()),
    )
    .await;
    assert_eq!(reason(&result.server), HandshakeFailure::UnknownIssuer);
    // Our client config refused the server too (it is of our anchor, the client of
    // the other), so the client's own verdict is unknown issuer as well.
    assert_eq!(reason(&result.client), HandshakeFailure::UnknownIssuer);

    // A server of another anchor, a client that would present nothing wrong.
    let result = handshake(
        server_config(intruder, td_policy()),
        client_config(gateway, td_policy()),
    )
    .await;
    assert_eq!(reason(&result.client), HandshakeFailure::UnknownIssuer);
    let err = result.client.err().unwrap().to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

/// An issuer under another anchor (with its own name, as `isthmus identity` gives
/// every anchor).
fn pki_foreign() -> proxy_identity::mint::CertificateAuthority {
    use proxy_identity::mint::{self, KeyAlgorithm};
    let anchor =
        mint::trust_anchor("foreign anchor", window(4, 48), KeyAlgorithm::default()).unwrap();
    mint::issuer(&anchor, "cluster-a", window(3, 24), KeyAlgorithm::default()).unwrap()
}

#[tokio::test]
async fn expired_and_not_yet_valid_peers_are_refused() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let gateway = store_in(dir.path(), &leaf(&pki.cluster_a, &gateway_id()));

    // Each client leaf, how the server refuses it and, where pinned, what the client
    // is told.
    let stale = leaf_with(&pki.cluster_b, &frontend_id(), expired());
    let early = leaf_with(&pki.cluster_b, &frontend_id(), future());
    for (client, server_says, client_hears) in [
        (
            stale,
            HandshakeFailure::Expired,
            Some(HandshakeFailure::Expired),
        ),
        (early, HandshakeFailure::NotYetValid, None),
    ] {
        let result = handshake(
            server_config(gateway.clone(), td_policy()),
            raw_client(Some(&client)),
        )
        .await;
        assert_eq!(reason(&result.server), server_says);
        if let Some(expected) = client_hears {
            assert_eq!(reason(&result.client), expected);
        }
    }

    // An expired server, seen by our client.
    let stale_server = leaf_with(&pki.cluster_a, &gateway_id(), expired());
    let result = handshake(
        raw_server(&stale_server),
        client_config(gateway, PeerPolicy::Exact(gateway_id())),
    )
    .await;
    assert_eq!(reason(&result.client), HandshakeFailure::Expired);
}

/// A handshake between the mesh's configs: `server` takes its trust domain's
/// clients, `client` wants the gateway's identity.
async fn mesh_handshake(server: Arc<CredentialStore>, client: Arc<CredentialStore>) -> Handshake {
    handshake(
        server_config(server, td_policy()),
        client_config(client, PeerPolicy::Exact(gateway_id())),
    )
    .await
}

/// The error of an end that must have failed for `expected`, as text.
fn refusal<T>(end: &io::Result<T>, expected: HandshakeFailure) -> String {
    assert_eq!(reason(end), expected);
    end.as_ref().err().unwrap().to_string()
}

#[tokio::test]
async fn valid_chain_with_another_identity_is_a_mismatch() {
    let pki = pki();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let impostor_id = id("spiffe://cluster.local/ns/default/sa/not-the-gateway");
    let impostor = store_in(dirs.0.path(), &leaf(&pki.cluster_a, &impostor_id));
    let sidecar = store_in(dirs.1.path(), &leaf(&pki.cluster_b, &frontend_id()));
    let result = mesh_handshake(impostor, sidecar).await;
    let err = refusal(&result.client, HandshakeFailure::IdentityMismatch);
    assert!(
        err.contains("not-the-gateway") && err.contains("ns/isthmus/sa/gateway"),
        "{err}"
    );
    // The server only learns that its certificate was not wanted.
    assert_eq!(reason(&result.server), HandshakeFailure::BadCertificate);
}

#[tokio::test]
async fn other_trust_domain_under_our_anchor_is_a_mismatch() {
    let pki = pki();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let gateway = store_in(dirs.0.path(), &leaf(&pki.cluster_a, &gateway_id()));
    let stranger = store_in(
        dirs.1.path(),
        &leaf(
            &pki.cluster_b,
            &id("spiffe://elsewhere.example/ns/default/sa/frontend"),
        ),
    );
    let result = mesh_handshake(gateway, stranger).await;
    let err = refusal(&result.server, HandshakeFailure::IdentityMismatch);
    assert!(
        err.contains("any identity of trust domain cluster.local"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_client_certificate_is_refused() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let gateway = store_in(dir.path(), &leaf(&pki.cluster_a, &gateway_id()));
    let result = handshake(server_config(gateway, td_policy()), raw_client(None)).await;
    assert_eq!(reason(&result.server), HandshakeFailure::NoClientCert);
    assert_eq!(reason(&result.client), HandshakeFailure::NoClientCert);
}

#[tokio::test]
async fn plaintext_and_garbage_clients_fail_promptly_as_protocol() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let gateway = store_in(dir.path(), &leaf(&pki.cluster_a, &gateway_id()));
    let mut registry = Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    let config = server_config(gateway, td_policy());

    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00][..],
        &b""[..],
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.map(|_| ())
        });
        let mut tcp = timeout(tokio::net::TcpStream::connect(addr)).await.unwrap();
        timeout(tcp.write_all(bytes)).await.unwrap();
        // An empty "client" just closes; the others keep the socket open, so the
        // server must give up on the bytes alone.
        if bytes.is_empty() {
            timeout(tcp.shutdown()).await.unwrap();
        }
        let err = timeout(server).await.unwrap().unwrap_err();
        assert_eq!(
            metrics.handshake_error(&err),
            HandshakeFailure::Protocol,
            "{err}"
        );
    }
    assert_eq!(metrics.handshake_failures(HandshakeFailure::Protocol), 4);
}

#[tokio::test]
async fn several_anchors_in_ca_crt_are_all_trusted() {
    // Anchor rotation: both sides trust the old and the new anchor for a while.
    let old = pki();
    let new = pki_foreign();
    let bundle_anchors = format!("{}{}", old.anchor.anchors_pem, new.anchors_pem);
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut gateway_leaf = leaf(&old.cluster_a, &gateway_id());
    gateway_leaf.anchors_pem = bundle_anchors.clone();
    let mut sidecar_leaf = leaf(&new, &frontend_id());
    sidecar_leaf.anchors_pem = bundle_anchors;
    let gateway = store_in(dirs.0.path(), &gateway_leaf);
    let sidecar = store_in(dirs.1.path(), &sidecar_leaf);
    assert_eq!(gateway.status().anchors, 2);
    let result = handshake(
        server_config(gateway, td_policy()),
        client_config(sidecar, PeerPolicy::Exact(gateway_id())),
    )
    .await;
    result.server.unwrap();
    result.client.unwrap();
}
