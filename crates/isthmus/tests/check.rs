//! `isthmus check` against the in-memory API server holding an installed cluster
//! (what `isthmus install` rendered, with minted identities), and a link whose
//! gateway is a TLS server on loopback presenting a minted gateway identity: all
//! checks pass on a healthy cluster, and each failure mode fails its check with
//! its hint and a non-zero exit status.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proxy_identity::mint::{self, Authority, KeyAlgorithm, LeafBundle, Validity};
use proxy_identity::{
    CredentialPaths, CredentialStore, Credentials, PeerPolicy, SpiffeId, TrustDomain,
};
use serde_json::{Value, json};
use test_apiserver::TestApiServer;
use tokio::net::TcpListener;

const STEP: Duration = Duration::from_secs(30);
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway";

async fn isthmus(args: &[&str]) -> std::process::Output {
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .env_clear()
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(STEP, cmd).await.unwrap().unwrap()
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|de| serde::Deserialize::deserialize(de).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn b64(bytes: &[u8]) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())).unwrap()
}

fn days(n: u64) -> Validity {
    Validity::from_now(Duration::from_secs(n * 86_400))
}

/// One trust anchor, an issuer per cluster, and each cluster's gateway leaf.
struct Pki {
    issuer_b: Authority,
    gateway_a: LeafBundle,
    gateway_b: LeafBundle,
}

fn pki() -> Pki {
    let anchor =
        mint::trust_anchor("check test anchor", days(30), KeyAlgorithm::EcdsaP256).unwrap();
    let issuer_a = mint::issuer(&anchor, "cluster-a", days(20), KeyAlgorithm::EcdsaP256).unwrap();
    let issuer_b = mint::issuer(&anchor, "cluster-b", days(20), KeyAlgorithm::EcdsaP256).unwrap();
    let id = SpiffeId::parse(GATEWAY_ID).unwrap();
    let gateway_a = mint::leaf(&issuer_a, &id, days(2), KeyAlgorithm::EcdsaP256).unwrap();
    let gateway_b = mint::leaf(&issuer_b, &id, days(2), KeyAlgorithm::EcdsaP256).unwrap();
    Pki {
        issuer_b,
        gateway_a,
        gateway_b,
    }
}

fn store(leaf: &LeafBundle) -> Arc<CredentialStore> {
    let paths = CredentialPaths::in_dir("minted");
    let creds = Credentials::from_pem(
        &paths,
        leaf.cert_chain_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        leaf.anchors_pem.as_bytes(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    Arc::new(CredentialStore::from_credentials(paths, creds))
}

/// cluster-a's gateway on loopback: completes TLS handshakes with mesh peers, for
/// as long as the test runs (the task ends with the test's runtime).
async fn gateway_a(leaf: &LeafBundle) -> u16 {
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

fn put(server: &TestApiServer, obj: Value) {
    server
        .store()
        .put_value(obj.clone())
        .unwrap_or_else(|e| panic!("putting {} {}: {e:?}", obj["kind"], obj["metadata"]["name"]));
}

fn get(server: &TestApiServer, api: &str, kind: &str, ns: Option<&str>, name: &str) -> Value {
    server.store().get_value(api, kind, ns, name).unwrap()
}

fn delete(server: &TestApiServer, api: &str, kind: &str, ns: Option<&str>, name: &str) {
    server.store().delete_value(api, kind, ns, name).unwrap();
}

fn identity_secret(leaf: &LeafBundle) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "isthmus-gateway-identity", "namespace": "isthmus-system"},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": b64(leaf.cert_chain_pem.as_bytes()),
            "tls.key": b64(leaf.key_pem.as_bytes()),
            "ca.crt": b64(leaf.anchors_pem.as_bytes()),
        },
    })
}

fn link(port: u16, identity: &str) -> Value {
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

fn mirror(status: Option<(&str, &str, &str)>) -> Value {
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
async fn healthy(server: &TestApiServer, pki: &Pki) -> u16 {
    let out = isthmus(&[
        "install",
        "--cluster",
        "cluster-b",
        "--gateway-cluster-ip",
        "10.96.100.43",
    ])
    .await;
    assert!(out.status.success());
    for doc in docs(&String::from_utf8(out.stdout).unwrap()) {
        // cert-manager's kinds and policy/v1 are not served by the test API server.
        if !["cert-manager.io/v1", "policy/v1"].contains(&doc["apiVersion"].as_str().unwrap()) {
            put(server, doc);
        }
    }
    for name in ["isthmus-controller", "isthmus-gateway"] {
        let mut d = get(
            server,
            "apps/v1",
            "Deployment",
            Some("isthmus-system"),
            name,
        );
        d["status"] = json!({"replicas": 2, "readyReplicas": 2});
        put(server, d);
    }
    put(
        server,
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "isthmus-discovery", "namespace": "isthmus-system"},
            "data": {"cluster.yaml": "", "links.yaml": "", "mirrored-services.yaml": ""},
        }),
    );
    let mut svc = get(
        server,
        "v1",
        "Service",
        Some("isthmus-system"),
        "isthmus-gateway",
    );
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.18.7.2"}]}});
    put(server, svc);
    put(server, identity_secret(&pki.gateway_b));
    put(
        server,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "isthmus-issuer", "namespace": "cert-manager"},
            "type": "kubernetes.io/tls",
            "data": {
                "tls.crt": b64(format!("{}{}", pki.issuer_b.ca.cert_pem, pki.issuer_b.chain_pem).as_bytes()),
                "tls.key": b64(pki.issuer_b.ca.key_pem.as_bytes()),
            },
        }),
    );
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

fn kubeconfig(server: &TestApiServer, dir: &Path) -> String {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        serde_yaml_ng::to_string(&server.kubeconfig()).unwrap(),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

/// Runs the check: (passed, stdout).
async fn check(kubeconfig: &str) -> (bool, String) {
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
fn failed_only(result: &(bool, String), name: &str, detail: &str, hint: &str) {
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

#[tokio::test]
async fn a_healthy_cluster_passes_every_check() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let port = healthy(&server, &pki).await;
    let kubeconfig = kubeconfig(&server, dir.path());
    let (ok, out) = check(&kubeconfig).await;
    assert!(ok, "{out}");
    for expected in [
        "✔ CRD servicemirrors.linkerd.io: installed",
        "✔ CRD links.multicluster.isthmus.io: installed",
        "✔ CRD clustersettings.multicluster.isthmus.io: installed",
        "✔ cluster settings in isthmus-system: cluster cluster-b, trust domain cluster.local, gateway 10.96.100.43:4143",
        "✔ controller Deployment isthmus-system/isthmus-controller ready: 2/2 replicas ready",
        "✔ discovery ConfigMap isthmus-system/isthmus-discovery: published (cluster.yaml, links.yaml, mirrored-services.yaml)",
        "✔ gateway Deployment isthmus-system/isthmus-gateway ready: 2/2 replicas ready",
        "✔ gateway Service isthmus-system/isthmus-gateway address: LoadBalancer 198.18.7.2",
        &format!(
            "✔ gateway identity Secret isthmus-system/isthmus-gateway-identity: {GATEWAY_ID}, expires in 47 hours"
        ),
        "✔ issuer Secret cert-manager/isthmus-issuer: ",
        "✔ link cluster-a credentials: Secret isthmus-system/cluster-a-credentials",
        &format!(
            "✔ link cluster-a gateway 127.0.0.1:{port}: reached 127.0.0.1:{port}, presents {GATEWAY_ID}"
        ),
        "✔ service mirror default/hello-mirror (hello.default of cluster-a): mirrored",
        "all 13 checks passed",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
}

#[tokio::test]
async fn each_failure_fails_its_check_with_what_to_do() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let port = healthy(&server, &pki).await;
    let kubeconfig = kubeconfig(&server, dir.path());
    assert!(check(&kubeconfig).await.0);

    // The gateway's pods are not ready.
    let d = get(
        &server,
        "apps/v1",
        "Deployment",
        Some("isthmus-system"),
        "isthmus-gateway",
    );
    let mut down = d.clone();
    down["status"] = json!({"replicas": 2, "readyReplicas": 0});
    put(&server, down);
    failed_only(
        &check(&kubeconfig).await,
        "gateway Deployment isthmus-system/isthmus-gateway ready",
        "0/2 replicas ready",
        "kubectl -n isthmus-system describe deployment isthmus-gateway",
    );
    put(&server, d);

    // The controller has not published the proxies' ConfigMap.
    let cm = get(
        &server,
        "v1",
        "ConfigMap",
        Some("isthmus-system"),
        "isthmus-discovery",
    );
    delete(
        &server,
        "v1",
        "ConfigMap",
        Some("isthmus-system"),
        "isthmus-discovery",
    );
    failed_only(
        &check(&kubeconfig).await,
        "discovery ConfigMap isthmus-system/isthmus-discovery",
        "not published",
        "kubectl -n isthmus-system logs deploy/isthmus-controller",
    );
    put(&server, cm);

    // No LoadBalancer address.
    let svc = get(
        &server,
        "v1",
        "Service",
        Some("isthmus-system"),
        "isthmus-gateway",
    );
    let mut bare = svc.clone();
    bare["status"] = json!({});
    put(&server, bare);
    failed_only(
        &check(&kubeconfig).await,
        "gateway Service isthmus-system/isthmus-gateway address",
        "no LoadBalancer address",
        "--gateway-address",
    );
    put(&server, svc);

    // The gateway certificate is about to expire: cert-manager did not renew it.
    let anchor = mint::trust_anchor("short", days(1), KeyAlgorithm::EcdsaP256).unwrap();
    // The anchor signs issuers only.
    let issuer = mint::issuer(
        &anchor,
        "cluster-b",
        Validity::from_now(Duration::from_secs(3600)),
        KeyAlgorithm::EcdsaP256,
    )
    .unwrap();
    let short = mint::leaf(
        &issuer,
        &SpiffeId::parse(GATEWAY_ID).unwrap(),
        Validity::from_now(Duration::from_secs(1800)),
        KeyAlgorithm::EcdsaP256,
    )
    .unwrap();
    put(&server, identity_secret(&short));
    let result = check(&kubeconfig).await;
    // The link handshake fails too: cluster-a does not trust this anchor.
    assert!(
        result.1.contains("✘ link cluster-a gateway"),
        "{}",
        result.1
    );
    assert!(
        result.1.contains("less than --min-validity")
            && result
                .1
                .contains("kubectl -n isthmus-system describe certificate isthmus-gateway"),
        "{}",
        result.1
    );
    // No identity at all: the link is not checked, and says so.
    delete(
        &server,
        "v1",
        "Secret",
        Some("isthmus-system"),
        "isthmus-gateway-identity",
    );
    let (ok, out) = check(&kubeconfig).await;
    assert!(!ok);
    assert!(
        out.contains(
            "✘ gateway identity Secret isthmus-system/isthmus-gateway-identity: not found"
        ),
        "{out}"
    );
    assert!(
        out.contains("not checked: the local gateway's identity is needed"),
        "{out}"
    );
    put(&server, identity_secret(&pki.gateway_b));

    // The issuer's Secret is missing.
    let issuer = get(
        &server,
        "v1",
        "Secret",
        Some("cert-manager"),
        "isthmus-issuer",
    );
    delete(
        &server,
        "v1",
        "Secret",
        Some("cert-manager"),
        "isthmus-issuer",
    );
    failed_only(
        &check(&kubeconfig).await,
        "issuer Secret cert-manager/isthmus-issuer",
        "not found",
        "--issuer DIR",
    );
    put(&server, issuer);

    // The Link expects another identity than the gateway presents.
    put(
        &server,
        link(port, "spiffe://cluster.local/ns/elsewhere/sa/impostor"),
    );
    failed_only(
        &check(&kubeconfig).await,
        &format!("link cluster-a gateway 127.0.0.1:{port}"),
        "TLS handshake",
        "the gateway must present spiffe://cluster.local/ns/elsewhere/sa/impostor",
    );

    // The gateway is not reachable: nothing listens on the Link's port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    put(&server, link(closed, GATEWAY_ID));
    failed_only(
        &check(&kubeconfig).await,
        &format!("link cluster-a gateway 127.0.0.1:{closed}"),
        "cannot connect",
        "firewalls",
    );
    put(&server, link(port, GATEWAY_ID));

    // The Link's credentials are missing.
    let creds = get(
        &server,
        "v1",
        "Secret",
        Some("isthmus-system"),
        "cluster-a-credentials",
    );
    delete(
        &server,
        "v1",
        "Secret",
        Some("isthmus-system"),
        "cluster-a-credentials",
    );
    failed_only(
        &check(&kubeconfig).await,
        "link cluster-a credentials",
        "not found",
        "isthmus link --cluster cluster-a",
    );
    put(&server, creds);

    // Mirrors: each reason gets its own advice.
    for (reason, hint) in [
        ("NotExported", "mirror.isthmus.io/exported=true"),
        ("UnknownCluster", "no Link names cluster cluster-a"),
        ("RemoteServiceNotFound", "has no Service hello.default"),
        ("NameConflict", "this mirror does not own"),
        ("RemoteUnreachable", "keeps its last known state"),
    ] {
        put(
            &server,
            mirror(Some(("False", reason, "as the controller says"))),
        );
        failed_only(
            &check(&kubeconfig).await,
            "service mirror default/hello-mirror",
            reason,
            hint,
        );
    }
    put(&server, mirror(None));
    failed_only(
        &check(&kubeconfig).await,
        "service mirror default/hello-mirror",
        "no status yet",
        "check the controller Deployment",
    );
    put(&server, mirror(Some(("True", "Mirrored", "ok"))));

    // The CRDs are gone (the Link and mirror CRDs take their objects with them).
    delete(
        &server,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        None,
        "clustersettings.multicluster.isthmus.io",
    );
    let (ok, out) = check(&kubeconfig).await;
    assert!(!ok);
    assert!(
        out.contains(
            "✘ CRD clustersettings.multicluster.isthmus.io: not installed\n    \
             hint: install the mesh: isthmus install --cluster NAME | kubectl apply -f -"
        ),
        "{out}"
    );
    // Without the kind, the settings cannot be read either, and the check says why.
    assert!(
        out.contains("✘ cluster settings in isthmus-system: cannot list ClusterSettings: the API server answered 404 NotFound"),
        "{out}"
    );
    assert!(out.contains("2 of 13 checks failed"), "{out}");
}

#[tokio::test]
async fn an_unreachable_api_server_is_an_error_naming_it() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig(&server, dir.path());
    server.stop().await;
    let out = isthmus(&["check", "--kubeconfig", &kubeconfig, "--timeout", "2s"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("reaching the API server at")
            && stderr.contains(&server.addr().port().to_string()),
        "{stderr}"
    );
}

/// Puts every document of `text` the test API server serves, in `namespace` when
/// the manifest names none (as `kubectl apply` would with that namespace).
fn apply(server: &TestApiServer, text: &str) {
    for mut doc in docs(text) {
        let api = doc["apiVersion"].as_str().unwrap();
        // cert-manager's kinds and policy/v1 are not served by the test API server.
        if ["cert-manager.io/v1", "policy/v1"].contains(&api) {
            continue;
        }
        let cluster_scoped = [
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
        ]
        .contains(&doc["kind"].as_str().unwrap());
        if !cluster_scoped && doc["metadata"]["namespace"].is_null() {
            doc["metadata"]["namespace"] = json!("default");
        }
        put(server, doc);
    }
}

async fn ok(args: &[&str]) -> String {
    let out = isthmus(args).await;
    assert!(
        out.status.success(),
        "isthmus {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The steps of the README's "On real clusters" at the API level: install both clusters, link
/// cluster-b to cluster-a with the printed kubeconfig, the seed injected and its
/// ServiceMirror applied; the real controller, running against cluster-b, reads
/// hello from cluster-a through the link reader's kubeconfig and mirrors it, and
/// `isthmus check` on cluster-b passes. (The data path is the lab's to prove.)
#[tokio::test]
async fn the_real_cluster_steps_mirror_hello_and_check_passes() {
    use isthmus_controller::mirror::{ReconcileTiming, SettingsSource};
    use isthmus_controller::remote::RemoteTiming;
    use k8s_openapi::api::core::v1::Service;
    use kube::Api;
    use proxy_discovery::model::ServiceMirrorResource;

    let a = TestApiServer::start().await;
    let b = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig_a = {
        let path = dir.path().join("a");
        std::fs::create_dir(&path).unwrap();
        kubeconfig(&a, &path)
    };
    let kubeconfig_b = kubeconfig(&b, dir.path());
    let pki = pki();
    let seed = |file: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/seed")
            .join(file)
            .to_str()
            .unwrap()
            .to_owned()
    };

    // 2. Install both clusters; cluster-a exports the seed's namespace.
    let ip = ["--gateway-cluster-ip", "10.96.100.43"];
    let mut install_a = vec![
        "install",
        "--cluster",
        "cluster-a",
        "--export-namespace",
        "default",
    ];
    install_a.extend(ip);
    apply(&a, &ok(&install_a).await);
    let mut install_b = vec!["install", "--cluster", "cluster-b"];
    install_b.extend(ip);
    apply(&b, &ok(&install_b).await);
    // What the clusters do after install: the load balancer's address, the reader's
    // token, cert-manager's certificates, ready pods.
    let mut svc = get(
        &a,
        "v1",
        "Service",
        Some("isthmus-system"),
        "isthmus-gateway",
    );
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.18.7.1"}]}});
    put(&a, svc);
    let mut token = get(
        &a,
        "v1",
        "Secret",
        Some("isthmus-system"),
        "isthmus-link-reader-token",
    );
    let ca =
        mint::trust_anchor("api server of cluster-a", days(1), KeyAlgorithm::EcdsaP256).unwrap();
    token["data"] =
        json!({"token": b64(b"reader-token"), "ca.crt": b64(ca.ca.cert_pem.as_bytes())});
    put(&a, token);
    put(&b, identity_secret(&pki.gateway_b));
    put(
        &b,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "isthmus-issuer", "namespace": "cert-manager"},
            "data": {"tls.crt": b64(pki.issuer_b.ca.cert_pem.as_bytes())},
        }),
    );
    for name in ["isthmus-controller", "isthmus-gateway"] {
        let mut d = get(&b, "apps/v1", "Deployment", Some("isthmus-system"), name);
        d["status"] = json!({"replicas": 2, "readyReplicas": 2});
        put(&b, d);
    }
    let mut svc = get(
        &b,
        "v1",
        "Service",
        Some("isthmus-system"),
        "isthmus-gateway",
    );
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.18.7.2"}]}});
    put(&b, svc);

    // 3. Link cluster-b to cluster-a. The gateway answering for cluster-a is a TLS
    // server on loopback, so the address and port are given.
    let port = gateway_a(&pki.gateway_a).await.to_string();
    let link = ok(&[
        "link",
        "--cluster",
        "cluster-a",
        "--kubeconfig",
        &kubeconfig_a,
        "--gateway-address",
        "127.0.0.1",
        "--gateway-port",
        &port,
    ])
    .await;
    apply(&b, &link);

    // 4. The seed, injected, and its ServiceMirror.
    apply(
        &a,
        &ok(&[
            "inject",
            "--cluster",
            "cluster-a",
            &seed("cluster-a/cluster-a.yaml"),
        ])
        .await,
    );
    apply(
        &b,
        &ok(&[
            "inject",
            "--cluster",
            "cluster-b",
            &seed("cluster-b/cluster-b.yaml"),
        ])
        .await,
    );
    apply(
        &b,
        &std::fs::read_to_string(seed("cluster-b/cluster-b-servicemirror.yaml")).unwrap(),
    );

    // The controller of cluster-b, as install runs it (one replica, no Lease).
    let controller = isthmus_controller::start(
        b.client(),
        isthmus_controller::Config {
            namespace: "isthmus-system".to_owned(),
            settings: SettingsSource::Object("cluster-b".to_owned()),
            lease: None,
            metrics_addr: None,
            configmap: "isthmus-discovery".to_owned(),
            publish_interval: Duration::from_millis(100),
            remote: RemoteTiming {
                probe_interval: Duration::from_millis(200),
                call_timeout: Duration::from_secs(1),
            },
            timing: ReconcileTiming {
                resync: Duration::from_secs(30),
                stale_refresh: Duration::from_millis(300),
                contact_refresh: Duration::from_secs(1),
            },
        },
    );
    let controller = tokio::time::timeout(STEP, controller)
        .await
        .unwrap()
        .unwrap();

    // The mirror becomes Mirrored, and hello appears in cluster-b.
    let mirrors: Api<ServiceMirrorResource> = Api::namespaced(b.client(), "default");
    let services: Api<Service> = Api::namespaced(b.client(), "default");
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let mirror = tokio::time::timeout(STEP, mirrors.get("hello-mirror"))
            .await
            .unwrap()
            .unwrap();
        let mirrored = mirror.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == "Mirrored" && c.status == proxy_discovery::model::ConditionStatus::True
            })
        });
        let hello = tokio::time::timeout(STEP, services.get_opt("hello"))
            .await
            .unwrap()
            .unwrap();
        if mirrored && hello.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hello was not mirrored into cluster-b: {:?}",
            mirror.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 5. Check cluster-b: everything passes, the mirror and the link included.
    let deadline = tokio::time::Instant::now() + STEP;
    let out = loop {
        let (passed, out) = check(&kubeconfig_b).await;
        if passed {
            break out;
        }
        // The ConfigMap is published shortly after the mirror.
        assert!(tokio::time::Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for expected in [
        "✔ service mirror default/hello-mirror (hello.default of cluster-a): mirrored",
        &format!("✔ link cluster-a gateway 127.0.0.1:{port}: reached"),
        "✔ discovery ConfigMap isthmus-system/isthmus-discovery: published",
        "✔ cluster settings in isthmus-system: cluster cluster-b",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
    controller.stop().await;
}
