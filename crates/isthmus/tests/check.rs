//! `isthmus check` against the in-memory API server holding an installed cluster
//! (what `isthmus install` rendered, cert-manager and csi-driver-spiffe as their
//! charts install them, a minted issuer), and a link whose gateway is a TLS server
//! on loopback presenting a minted gateway identity: all checks pass on a healthy
//! cluster, and each failure mode fails its check with its hint and a non-zero exit
//! status, among them a cert-manager whose default approver would sign any SPIFFE
//! ID and an approver-policy that selects the mesh's issuer.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use proxy_identity::mint::{self, KeyAlgorithm};
use serde_json::json;
use test_apiserver::TestApiServer;

mod binary;
#[path = "check/fixtures.rs"]
mod fixtures;
mod installed;

use fixtures::*;
use installed::*;

#[tokio::test]
async fn a_healthy_cluster_passes_every_check() {
    let server = cluster().await;
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
        "✔ CSIDriver spiffe.csi.cert-manager.io: installed",
        "✔ csi-driver-spiffe approver Deployment cert-manager/cert-manager-csi-driver-spiffe-approver ready: 1/1 replicas ready",
        "✔ cert-manager cert-manager/cert-manager leaves approval to csi-driver-spiffe: default approver off",
        "✔ no approver-policy selects ClusterIssuer isthmus-issuer: 0 policies, none selects it",
        "✔ issuer Secret cert-manager/isthmus-issuer: ",
        "✔ link cluster-a credentials: Secret isthmus-system/cluster-a-credentials",
        &format!(
            "✔ link cluster-a gateway 127.0.0.1:{port}: reached 127.0.0.1:{port}, presents {GATEWAY_ID} of cluster cluster-a"
        ),
        "✔ service mirror default/hello-mirror (hello.default of cluster-a): mirrored",
        "all 16 checks passed",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
}

/// Every cluster's gateway holds the same SPIFFE ID: a Link whose address answers
/// with another cluster's gateway fails the check, naming the cluster the Link
/// expects and the one the gateway's issuer names, as the data plane would refuse
/// it.
#[tokio::test]
async fn a_link_answered_by_another_clusters_gateway_fails_naming_the_cluster() {
    let server = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    healthy(&server, &pki).await;
    let kubeconfig = kubeconfig(&server, dir.path());
    let port_c = gateway_a(&pki.gateway_c).await;
    put(&server, link(port_c, GATEWAY_ID));
    failed_only(
        &check(&kubeconfig).await,
        &format!("link cluster-a gateway 127.0.0.1:{port_c}"),
        &format!(
            "peer identity {GATEWAY_ID} was issued for cluster cluster-c, expected an identity \
             of cluster cluster-a"
        ),
        "that the Link's gatewayAddress is cluster cluster-a's gateway",
    );
}

#[tokio::test]
async fn each_failure_fails_its_check_with_what_to_do() {
    let server = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let port = healthy(&server, &pki).await;
    let kubeconfig = kubeconfig(&server, dir.path());
    assert!(check(&kubeconfig).await.0);

    // The gateway's pods are not ready.
    let d = get(&server, "apps/v1 Deployment isthmus-system/isthmus-gateway");
    set(
        &server,
        "apps/v1 Deployment isthmus-system/isthmus-gateway",
        "status",
        json!({"replicas": 2, "readyReplicas": 0}),
    );
    failed_only(
        &check(&kubeconfig).await,
        "gateway Deployment isthmus-system/isthmus-gateway ready",
        "0/2 replicas ready",
        "kubectl -n isthmus-system describe deployment isthmus-gateway",
    );
    put(&server, d);

    // The controller has not published the proxies' ConfigMap.
    let cm = delete(&server, "v1 ConfigMap isthmus-system/isthmus-discovery");
    failed_only(
        &check(&kubeconfig).await,
        "discovery ConfigMap isthmus-system/isthmus-discovery",
        "not published",
        "kubectl -n isthmus-system logs deploy/isthmus-controller",
    );
    put(&server, cm);

    // No LoadBalancer address.
    let svc = get(&server, GATEWAY_SERVICE);
    set(&server, GATEWAY_SERVICE, "status", json!({}));
    failed_only(
        &check(&kubeconfig).await,
        "gateway Service isthmus-system/isthmus-gateway address",
        "no LoadBalancer address",
        "--gateway-address",
    );
    put(&server, svc);

    // The trust anchors of the issuer Secret are not the ones cluster-a's gateway
    // chains to: the link's handshake fails, naming the anchor.
    let other = mint::trust_anchor("other", days(1), KeyAlgorithm::EcdsaP256).unwrap();
    let other_issuer = mint::issuer(&other, "cluster-b", days(1), KeyAlgorithm::EcdsaP256).unwrap();
    put(&server, issuer_secret(&other_issuer));
    failed_only(
        &check(&kubeconfig).await,
        &format!("link cluster-a gateway 127.0.0.1:{port}"),
        "TLS handshake",
        "both clusters' issuers come from the same anchor",
    );
    // No anchors at all: the link is not checked, and says why.
    let mut no_anchors = issuer_secret(&pki.issuer_b);
    no_anchors["data"].as_object_mut().unwrap().remove("ca.crt");
    put(&server, no_anchors);
    failed_only(
        &check(&kubeconfig).await,
        &format!("link cluster-a gateway 127.0.0.1:{port}"),
        "not checked: the trust anchors are unknown: Secret cert-manager/isthmus-issuer has no ca.crt",
        "fix the issuer Secret",
    );
    put(&server, issuer_secret(&pki.issuer_b));

    // The issuer's Secret is missing.
    let issuer = delete(&server, "v1 Secret cert-manager/isthmus-issuer");
    let (ok, out) = check(&kubeconfig).await;
    assert!(!ok);
    assert!(
        out.contains("✘ issuer Secret cert-manager/isthmus-issuer: not found\n    hint: create it")
            && out.contains("--issuer DIR"),
        "{out}"
    );
    // Without the anchors the link is not checked, and says so.
    assert!(
        out.contains(
            "not checked: the trust anchors are unknown: no Secret cert-manager/isthmus-issuer"
        ),
        "{out}"
    );
    assert!(out.contains("2 of 16 checks failed"), "{out}");
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
    let creds = delete(&server, "v1 Secret isthmus-system/cluster-a-credentials");
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
        "apiextensions.k8s.io/v1 CustomResourceDefinition clustersettings.multicluster.isthmus.io",
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
    assert!(out.contains("2 of 16 checks failed"), "{out}");
}

/// A cluster where something other than csi-driver-spiffe's approver could approve
/// for the mesh's issuer, or where the driver is missing, fails the check that
/// says so, with what to fix.
#[tokio::test]
async fn the_identity_set_up_is_verified_with_what_to_fix() {
    let server = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    healthy(&server, &pki).await;
    let kubeconfig = kubeconfig(&server, dir.path());
    assert!(check(&kubeconfig).await.0);

    // cert-manager's default approver runs: it would sign any SPIFFE ID for anyone
    // allowed to create a CertificateRequest.
    for args in [
        &["--v=2"][..],
        &["--controllers=*"][..],
        &["--controllers", "*,certificaterequests-approver"][..],
    ] {
        put(&server, cert_manager(args));
        failed_only(
            &check(&kubeconfig).await,
            "cert-manager cert-manager/cert-manager leaves approval to csi-driver-spiffe",
            "cert-manager's default approver is on",
            "--controllers=*,-certificaterequests-approver",
        );
    }
    // Both spellings of the flag that turns it off are read.
    for args in [
        &["--controllers=*,-certificaterequests-approver"][..],
        &["--controllers", "-certificaterequests-approver"][..],
    ] {
        put(&server, cert_manager(args));
        assert!(check(&kubeconfig).await.0, "{args:?}");
    }
    delete(&server, "apps/v1 Deployment cert-manager/cert-manager");
    failed_only(
        &check(&kubeconfig).await,
        "cert-manager cert-manager/cert-manager leaves approval",
        "Deployment not found",
        "--cert-manager-deployment",
    );
    put(&server, cert_manager(APPROVER_OFF));

    // csi-driver-spiffe is not installed, or its approver is not ready.
    delete(
        &server,
        "storage.k8s.io/v1 CSIDriver spiffe.csi.cert-manager.io",
    );
    failed_only(
        &check(&kubeconfig).await,
        "CSIDriver spiffe.csi.cert-manager.io",
        "not installed",
        "app.issuer.name",
    );
    put(&server, csi_driver());
    put(&server, approver(0));
    failed_only(
        &check(&kubeconfig).await,
        "csi-driver-spiffe approver Deployment cert-manager/cert-manager-csi-driver-spiffe-approver ready",
        "0/1 replicas ready",
        "kubectl -n cert-manager describe deployment cert-manager-csi-driver-spiffe-approver",
    );
    delete(
        &server,
        "apps/v1 Deployment cert-manager/cert-manager-csi-driver-spiffe-approver",
    );
    failed_only(
        &check(&kubeconfig).await,
        "csi-driver-spiffe approver Deployment",
        "not found",
        "install cert-manager's csi-driver-spiffe",
    );
    put(&server, approver(1));

    // An approver-policy that selects the mesh's issuer (by name, by wildcard, or
    // by selecting every issuer) is a second approver; one for other issuers is not.
    put(
        &server,
        policy(
            "other-issuers",
            Some(json!({"name": "letsencrypt-*", "kind": "ClusterIssuer"})),
        ),
    );
    assert!(check(&kubeconfig).await.0);
    for (name, issuer_ref) in [
        (
            "by-name",
            Some(
                json!({"name": "isthmus-issuer", "kind": "ClusterIssuer", "group": "cert-manager.io"}),
            ),
        ),
        ("by-wildcard", Some(json!({"name": "*", "kind": "*Issuer"}))),
        ("every-issuer", None),
    ] {
        put(&server, policy(name, issuer_ref));
        failed_only(
            &check(&kubeconfig).await,
            "no approver-policy selects ClusterIssuer isthmus-issuer",
            &format!("CertificateRequestPolicy {name} selects it"),
            &format!("narrow spec.selector.issuerRef of {name}"),
        );
        let policy = format!("policy.cert-manager.io/v1alpha1 CertificateRequestPolicy {name}");
        delete(&server, &policy);
    }
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
    use clap::Parser as _;
    use k8s_openapi::api::core::v1::Service;
    use kube::Api;
    use proxy_discovery::model::ServiceMirrorResource;

    let a = cluster().await;
    let b = cluster().await;
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
    gateway_load_balancer(&a, "198.18.7.1");
    let ca =
        mint::trust_anchor("api server of cluster-a", days(1), KeyAlgorithm::EcdsaP256).unwrap();
    fill_reader_token(
        &a,
        &[("token", "reader-token"), ("ca.crt", &ca.ca.cert_pem)],
    );
    put(&b, csi_driver());
    put(&b, approver(1));
    put(
        &b,
        cert_manager(&["--controllers=*,-certificaterequests-approver"]),
    );
    put(&b, issuer_secret(&pki.issuer_b));
    mesh_pods_ready(&b);
    gateway_load_balancer(&b, "198.18.7.2");

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

    // The controller of cluster-b with the arguments install gave it, as one
    // replica without a Lease, its metrics on a free loopback port.
    let deployment = get(&b, "apps/v1 Deployment isthmus-system/isthmus-controller");
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    let mut args: Vec<String> = serde_json::from_value(args.clone()).unwrap();
    let metrics = args.iter().position(|a| a == "--metrics-addr").unwrap();
    args[metrics + 1] = "127.0.0.1:0".to_owned();
    let cli = isthmus_controller::config::Cli::try_parse_from(
        std::iter::once("isthmus-controller")
            .chain(args.iter().map(String::as_str))
            .chain(["--no-leader-election"]),
    )
    .unwrap();
    let isthmus_controller::config::Command::Run(run) = cli.command else {
        panic!("install runs the controller with {args:?}")
    };
    let controller = isthmus_controller::start(b.client(), run.into_config("check").unwrap());
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
