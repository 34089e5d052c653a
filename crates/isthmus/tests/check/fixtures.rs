//! The fixtures of the `isthmus check` tests: an in-memory API server holding an
//! installed cluster, cert-manager and csi-driver-spiffe as their charts install
//! them, a minted PKI, cluster-a's gateway on loopback, and the assertions on what
//! the check prints.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use isthmus_vocab::{SpiffeId, TrustDomain};
use proxy_identity::mint::{self, CertificateAuthority, KeyAlgorithm, LeafBundle, Validity};
use proxy_identity::{CredentialPaths, CredentialStore, PeerPolicy};
use serde_json::{Value, json};
use test_apiserver::{ResourceType, TestApiServer};
use tokio::net::TcpListener;

pub(crate) use crate::binary::STEP;
use crate::installed::*;
pub(crate) const GATEWAY_ID: &str = "spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway";

pub(crate) async fn isthmus(args: &[&str]) -> std::process::Output {
    crate::binary::run_async(args).await
}

pub(crate) fn days(n: u64) -> Validity {
    Validity::from_now(Duration::from_secs(n * 86_400))
}

/// The API server of a cluster with the kinds the checks read that are not
/// built in: csi-driver-spiffe's CSIDriver and approver-policy's policies.
pub(crate) async fn cluster() -> TestApiServer {
    TestApiServer::builder()
        .resource(ResourceType::new(
            "storage.k8s.io",
            "v1",
            "csidrivers",
            "CSIDriver",
            false,
        ))
        .resource(ResourceType::new(
            "policy.cert-manager.io",
            "v1alpha1",
            "certificaterequestpolicies",
            "CertificateRequestPolicy",
            false,
        ))
        .start()
        .await
        .unwrap()
}

/// cert-manager's controller Deployment, with `args`.
pub(crate) fn cert_manager(args: &[&str]) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "cert-manager", "namespace": "cert-manager"},
        "spec": {
            "selector": {"matchLabels": {"app": "cert-manager"}},
            "template": {
                "metadata": {"labels": {"app": "cert-manager"}},
                "spec": {"containers": [{"name": "cert-manager-controller", "args": args}]},
            },
        },
        "status": {"replicas": 1, "readyReplicas": 1},
    })
}

/// As the cert-manager chart runs it with `disableAutoApproval=true`.
pub(crate) const APPROVER_OFF: &[&str] = &[
    "--v=2",
    "--cluster-resource-namespace=$(POD_NAMESPACE)",
    "--controllers=-certificaterequests-approver",
];

pub(crate) fn approver(ready: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "cert-manager-csi-driver-spiffe-approver", "namespace": "cert-manager"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "approver"}},
            "template": {
                "metadata": {"labels": {"app": "approver"}},
                "spec": {"containers": [{"name": "approver", "image": "approver"}]},
            },
        },
        "status": {"replicas": 1, "readyReplicas": ready},
    })
}

pub(crate) fn csi_driver() -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver",
        "metadata": {"name": "spiffe.csi.cert-manager.io"},
        "spec": {"podInfoOnMount": true, "volumeLifecycleModes": ["Ephemeral"]},
    })
}

pub(crate) fn policy(name: &str, issuer_ref: Option<Value>) -> Value {
    let mut selector = json!({"namespace": {"matchNames": ["*"]}});
    if let Some(issuer_ref) = issuer_ref {
        selector["issuerRef"] = issuer_ref;
    }
    json!({
        "apiVersion": "policy.cert-manager.io/v1alpha1", "kind": "CertificateRequestPolicy",
        "metadata": {"name": name},
        "spec": {"allowed": {"uris": {"values": ["*"]}}, "selector": selector},
    })
}

/// One trust anchor, an issuer per cluster, and each cluster's gateway leaf.
pub(crate) struct Pki {
    pub(crate) issuer_b: CertificateAuthority,
    pub(crate) gateway_a: LeafBundle,
    /// cluster-c's gateway: the same SPIFFE ID as cluster-a's, another issuer.
    pub(crate) gateway_c: LeafBundle,
}

pub(crate) fn pki() -> Pki {
    let anchor =
        mint::trust_anchor("check test anchor", days(30), KeyAlgorithm::EcdsaP256).unwrap();
    let issuer_a = mint::issuer(&anchor, "cluster-a", days(20), KeyAlgorithm::EcdsaP256).unwrap();
    let issuer_b = mint::issuer(&anchor, "cluster-b", days(20), KeyAlgorithm::EcdsaP256).unwrap();
    let id = SpiffeId::parse(GATEWAY_ID).unwrap();
    let gateway_a = mint::leaf(&issuer_a, &id, days(2), KeyAlgorithm::EcdsaP256).unwrap();
    let issuer_c = mint::issuer(&anchor, "cluster-c", days(20), KeyAlgorithm::EcdsaP256).unwrap();
    let gateway_c = mint::leaf(&issuer_c, &id, days(2), KeyAlgorithm::EcdsaP256).unwrap();
    Pki {
        issuer_b,
        gateway_a,
        gateway_c,
    }
}

pub(crate) fn store(leaf: &LeafBundle) -> Arc<CredentialStore> {
    let paths = CredentialPaths::in_dir("minted");
    let creds = leaf
        .credentials(&paths, std::time::SystemTime::now())
        .unwrap();
    Arc::new(CredentialStore::from_credentials(paths, creds))
}

/// cluster-a's gateway on loopback: completes TLS handshakes with mesh peers, for
/// as long as the test runs (the task ends with the test's runtime).
pub(crate) async fn gateway_a(leaf: &LeafBundle) -> u16 {
    let config = proxy_identity::server_config(
        store(leaf),
        PeerPolicy::TrustDomain(TrustDomain::parse("cluster.local").unwrap()),
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        // Bounded: a test run makes a handful of checks.
        for _ in 0..100 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(STEP, acceptor.accept(tcp)).await;
            });
        }
    });
    port
}

/// The ClusterIssuer's Secret as `isthmus install --issuer` renders it.
pub(crate) fn issuer_secret(issuer: &CertificateAuthority) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "isthmus-issuer", "namespace": "cert-manager"},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": b64(format!("{}{}", issuer.ca.cert_pem, issuer.chain_pem).as_bytes()),
            "tls.key": b64(issuer.ca.key_pem.as_bytes()),
            "ca.crt": b64(issuer.anchors_pem.as_bytes()),
        },
    })
}

pub(crate) fn link(port: u16, identity: &str) -> Value {
    json!({
        "apiVersion": "multicluster.isthmus.io/v1alpha1", "kind": "Link",
        "metadata": {"name": "cluster-a", "namespace": "isthmus-system"},
        "spec": {
            "targetClusterName": "cluster-a",
            "gatewayAddress": "127.0.0.1",
            "gatewayPort": port,
            "gatewayIdentity": identity,
            "credentialsSecret": "cluster-a-credentials",
        },
    })
}

pub(crate) fn mirror(status: Option<(&str, &str, &str)>) -> Value {
    let mut m = json!({
        "apiVersion": "linkerd.io/v1alpha1", "kind": "ServiceMirror",
        "metadata": {"name": "hello-mirror", "namespace": "default"},
        "spec": {"cluster": "cluster-a", "service": {"name": "hello", "namespace": "default"}},
    });
    if let Some((s, reason, message)) = status {
        m["status"] = json!({"conditions": [
            {"type": "Mirrored", "status": s, "reason": reason, "message": message}
        ]});
    }
    m
}

/// A healthy cluster-b: installed, identities issued, pods ready, linked to
/// cluster-a, and the seed's mirror reconciled.
pub(crate) async fn healthy(server: &TestApiServer, pki: &Pki) -> u16 {
    let out = isthmus(&[
        "install",
        "--cluster",
        "cluster-b",
        "--gateway-cluster-ip",
        "10.96.100.43",
    ])
    .await;
    assert!(out.status.success());
    put_installed(server, &String::from_utf8(out.stdout).unwrap());
    mesh_pods_ready(server);
    put(
        server,
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "isthmus-discovery", "namespace": "isthmus-system"},
            "data": {"cluster.yaml": "", "links.yaml": "", "mirrored-services.yaml": ""},
        }),
    );
    gateway_load_balancer(server, "198.18.7.2");
    // cert-manager and csi-driver-spiffe, as their charts install them.
    put(server, csi_driver());
    put(server, approver(1));
    put(server, cert_manager(APPROVER_OFF));
    put(server, issuer_secret(&pki.issuer_b));
    let port = gateway_a(&pki.gateway_a).await;
    put(
        server,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "cluster-a-credentials", "namespace": "isthmus-system"},
            "data": {"kubeconfig": b64(b"apiVersion: v1\nkind: Config\n")},
        }),
    );
    put(server, link(port, GATEWAY_ID));
    put(
        server,
        mirror(Some((
            "True",
            "Mirrored",
            "hello.default.svc.cluster.local:80 as 10.96.0.10",
        ))),
    );
    port
}

pub(crate) fn kubeconfig(server: &TestApiServer, dir: &Path) -> String {
    let path = server.write_kubeconfig(dir).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Runs the check: (passed, stdout).
pub(crate) async fn check(kubeconfig: &str) -> (bool, String) {
    let out = isthmus(&["check", "--kubeconfig", kubeconfig, "--timeout", "3s"]).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.is_empty() || out.status.code() == Some(1),
        "{stderr}"
    );
    (out.status.success(), stdout)
}

/// Asserts that the run failed, with the check named `name` failed with `detail`
/// and a hint containing `hint`, and every other check passed.
#[track_caller]
pub(crate) fn failed_only(result: &(bool, String), name: &str, detail: &str, hint: &str) {
    let (ok, out) = result;
    assert!(!ok, "the check passed:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    let failed: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with('✘'))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(failed.len(), 1, "exactly one check fails:\n{out}");
    let line = lines[failed[0]];
    assert!(
        line.contains(name) && line.contains(detail),
        "{line}\n{out}"
    );
    let hint_line = lines[failed[0] + 1];
    assert!(
        hint_line.trim_start().starts_with("hint:") && hint_line.contains(hint),
        "{hint_line}\n{out}"
    );
}
