//! Hot rotation of the mounted credentials: live connections survive, new handshakes
//! see the new leaf, and every kind of bad update is refused while the previous
//! identity keeps serving.

#![allow(clippy::unwrap_used)]

mod common;

use isthmus_test_support::assert_eventually;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use isthmus_vocab::TrustDomain;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use proxy_identity::creds::{CERT_FILE, KEY_FILE};
use proxy_identity::mint::LeafBundle;
use proxy_identity::{CredentialStore, IdentityMetrics, PeerPolicy, client_config, server_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn td_policy() -> PeerPolicy {
    PeerPolicy::TrustDomain(TrustDomain::parse(TD).unwrap())
}

/// The serial of the leaf the server presented to this client connection.
fn served_leaf<IO>(tls: &tokio_rustls::client::TlsStream<IO>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn leaf_der(bundle: &LeafBundle) -> Vec<u8> {
    use proxy_identity::rustls::pki_types::CertificateDer;
    use proxy_identity::rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(bundle.cert_chain_pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn rotation_keeps_live_connections_and_serves_the_new_leaf() {
    let pki = pki();
    let (server_dir, client_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v1 = leaf(&pki.cluster_a, &gateway_id());
    let gateway = k8s_mount(server_dir.path(), &v1);
    let sidecar = store_in(client_dir.path(), &leaf(&pki.cluster_b, &frontend_id()));
    let watcher = tokio::spawn(gateway.clone().watch(Duration::from_millis(25)));

    // An echo server that accepts any number of connections with the same config.
    let server = server_config(gateway.clone(), td_policy());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
            tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let mut buf = [0u8; 64];
                loop {
                    let n = tls.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    tls.write_all(&buf[..n]).await.unwrap();
                }
            });
        }
    });
    let client = client_config(sidecar, PeerPolicy::Exact(gateway_id()));
    let connect = || {
        let client = client.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = proxy_identity::rustls::pki_types::ServerName::try_from("gw").unwrap();
            tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await
                .unwrap()
        }
    };
    async fn echo_once<S: AsyncReadExt + AsyncWriteExt + Unpin>(tls: &mut S, msg: &[u8]) {
        timeout(tls.write_all(msg)).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        timeout(tls.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, msg);
    }

    let mut live = timeout(connect()).await;
    assert_eq!(served_leaf(&live), leaf_der(&v1));
    echo_once(&mut live, b"before").await;

    let v2 = leaf(&pki.cluster_a, &gateway_id());
    k8s_swap(server_dir.path(), &v2, 2);
    assert_eventually!(within STEP, gateway.status().reloads == 1);
    assert_eq!(gateway.current().serial(), gateway.status().serial);

    // The live connection keeps its session; a new one gets the new leaf.
    echo_once(&mut live, b"after rotation").await;
    let mut fresh = timeout(connect()).await;
    assert_eq!(served_leaf(&fresh), leaf_der(&v2));
    echo_once(&mut fresh, b"new").await;
    echo_once(&mut live, b"still").await;
    assert_eq!(gateway.status().refusals, 0);

    watcher.abort();
    echo.abort();
}

/// Kubelet swaps `..data` again and again while the watcher polls as often as it
/// can: a poll whose three reads straddle a swap sees the old certificate with the
/// new key, and must wait for the next poll rather than refuse an update nobody
/// wrote. Every swap brings a new leaf, so no two straddling reads are alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_swaps_are_never_half_seen() {
    const SWAPS: u32 = 100;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let leaves: Vec<LeafBundle> = (0..=SWAPS)
        .map(|_| leaf(&pki.cluster_a, &gateway_id()))
        .collect();
    let gateway = k8s_mount(dir.path(), &leaves[0]);
    let watcher = tokio::spawn(gateway.clone().watch(Duration::from_millis(1)));
    for version in 1..=SWAPS {
        k8s_swap(dir.path(), &leaves[version as usize], version + 1);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let last = leaf_der(&leaves[SWAPS as usize]);
    assert_eventually!(
        within STEP,
        gateway.current().certified_key().cert[0].as_ref() == last.as_slice()
    );
    let status = gateway.status();
    assert_eq!(
        status.refusals, 0,
        "a swap was judged half-seen: {:?}",
        status.last_refusal
    );
    watcher.abort();
}

/// A bad update: the refusal reason expected, and how to write it into a directory.
type BadUpdate = (&'static str, Box<dyn Fn(&Path)>);

/// Each bad update kind.
fn bad_updates(pki: &Pki, good: &LeafBundle) -> Vec<BadUpdate> {
    let foreign = {
        use proxy_identity::mint::{self, KeyAlgorithm};
        let anchor = mint::trust_anchor("foreign", window(4, 48), KeyAlgorithm::default()).unwrap();
        let issuer =
            mint::issuer(&anchor, "cluster-a", window(3, 24), KeyAlgorithm::default()).unwrap();
        leaf(&issuer, &gateway_id())
    };
    let expired = leaf_with(&pki.cluster_a, &gateway_id(), expired());
    let early = leaf_with(&pki.cluster_a, &gateway_id(), future());
    let other_key = leaf(&pki.cluster_a, &gateway_id());
    let good_cert = good.cert_chain_pem.clone();
    vec![
        (
            "unparsable",
            Box::new(move |dir: &Path| {
                // Half-written: the chain cut in the middle of a PEM block.
                let half = &good_cert.as_bytes()[..good_cert.len() / 2];
                std::fs::write(dir.join(CERT_FILE), half).unwrap();
            }),
        ),
        (
            "unparsable",
            Box::new(|dir: &Path| std::fs::write(dir.join(CERT_FILE), "not a PEM file").unwrap()),
        ),
        (
            "expired",
            Box::new(move |dir: &Path| expired.write_dir(dir, true).map(drop).unwrap()),
        ),
        (
            "not_yet_valid",
            Box::new(move |dir: &Path| early.write_dir(dir, true).map(drop).unwrap()),
        ),
        (
            // A leaf of another anchor, our ca.crt left in place.
            "untrusted",
            Box::new(move |dir: &Path| {
                std::fs::write(dir.join(CERT_FILE), &foreign.cert_chain_pem).unwrap();
                std::fs::write(dir.join(KEY_FILE), &foreign.key_pem).unwrap();
            }),
        ),
        (
            // A new certificate whose key has not been written (yet).
            "key_mismatch",
            Box::new(move |dir: &Path| {
                std::fs::write(dir.join(CERT_FILE), &other_key.cert_chain_pem).unwrap();
            }),
        ),
        (
            "unreadable",
            Box::new(|dir: &Path| std::fs::remove_file(dir.join(KEY_FILE)).unwrap()),
        ),
    ]
}

#[tokio::test]
async fn every_bad_update_is_refused_and_the_old_identity_serves() {
    let pki = pki();
    let (server_dir, client_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let good = leaf(&pki.cluster_a, &gateway_id());
    good.write_dir(server_dir.path(), true).unwrap();
    let mut registry = Registry::default();
    let metrics = IdentityMetrics::register(&mut registry);
    let gateway = Arc::new(
        CredentialStore::load(proxy_identity::CredentialPaths::in_dir(server_dir.path()))
            .unwrap()
            .with_metrics(metrics),
    );
    let sidecar = store_in(client_dir.path(), &leaf(&pki.cluster_b, &frontend_id()));
    let serial = gateway.current().serial().to_owned();

    let cases = bad_updates(&pki, &good);
    let total = cases.len();
    for (i, (reason, write)) in cases.into_iter().enumerate() {
        good.write_dir(server_dir.path(), true).unwrap();
        write(server_dir.path());
        let err = gateway.reload().unwrap_err();
        assert_eq!(err.reason(), reason, "case {i}: {err}");
        let status = gateway.status();
        assert_eq!(status.refusals, i as u64 + 1);
        let refusal = status.last_refusal.unwrap();
        assert_eq!(refusal.reason, reason);
        // The refusal names the file at fault.
        assert!(
            refusal
                .error
                .contains(&*server_dir.path().to_string_lossy()),
            "{}",
            refusal.error
        );
        assert_eq!(gateway.current().serial(), serial);

        // And the old identity still completes handshakes.
        let result = handshake(
            server_config(gateway.clone(), td_policy()),
            client_config(sidecar.clone(), PeerPolicy::Exact(gateway_id())),
        )
        .await;
        result.server.unwrap();
        result.client.unwrap();
    }
    assert_eq!(gateway.status().reloads, 0);

    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    let missing = [
        "identity_reload_refusals_total{reason=\"unparsable\"} 2",
        "identity_reload_refusals_total{reason=\"expired\"} 1",
        "identity_reload_refusals_total{reason=\"not_yet_valid\"} 1",
        "identity_reload_refusals_total{reason=\"untrusted\"} 1",
        "identity_reload_refusals_total{reason=\"key_mismatch\"} 1",
        "identity_reload_refusals_total{reason=\"unreadable\"} 1",
    ]
    .into_iter()
    .filter(|line| !text.contains(line))
    .collect::<Vec<_>>();
    assert!(missing.is_empty(), "{missing:?} missing from\n{text}");
    assert_eq!(total, 7);

    // A good update after all that is taken.
    let next = leaf(&pki.cluster_a, &gateway_id());
    next.write_dir(server_dir.path(), true).unwrap();
    gateway.reload().unwrap();
    assert_eq!(gateway.status().reloads, 1);
    assert!(text.contains("identity_leaf_expiry_timestamp_seconds "));
}

#[tokio::test]
async fn watcher_refuses_an_unchanged_bad_update_once() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let good = leaf(&pki.cluster_a, &gateway_id());
    let gateway = store_in(dir.path(), &good);
    let watcher = tokio::spawn(gateway.clone().watch(Duration::from_millis(10)));

    // A leaf whose key is not yet written: refused once, however many polls follow.
    let next = leaf(&pki.cluster_a, &gateway_id());
    replace_file(&dir.path().join(CERT_FILE), &next.cert_chain_pem);
    assert_eventually!(within STEP, gateway.status().refusals == 1);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gateway.status().refusals, 1);
    assert_eq!(
        gateway.status().last_refusal.unwrap().reason,
        "key_mismatch"
    );

    // The key lands: the pair is taken.
    replace_file(&dir.path().join(KEY_FILE), &next.key_pem);
    assert_eventually!(within STEP, gateway.status().reloads == 1);
    assert_eq!(
        gateway.current().certified_key().cert[0].as_ref(),
        leaf_der(&next)
    );
    watcher.abort();
}
