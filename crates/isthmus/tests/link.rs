//! `isthmus link` against the in-memory API server holding what `isthmus install`
//! rendered: the printed Secret's kubeconfig reaches that API server with the link
//! reader's token, the Link names the gateway and probes it on the tunnel port
//! (never the admin port, which is not on the LoadBalancer), and what is missing is
//! named with what to do.

#![allow(clippy::unwrap_used)]

mod binary;
mod installed;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, Service};
use kube::Api;
use proxy_discovery::model::LinkResource;
use serde_json::{Value, json};
use test_apiserver::TestApiServer;

use binary::STEP;
use installed::*;

async fn isthmus(args: &[&str]) -> std::process::Output {
    binary::run_async(args).await
}

/// `isthmus link --cluster CLUSTER --kubeconfig KUBECONFIG EXTRA`.
async fn run_link(kubeconfig: &str, cluster: &str, extra: &[&str]) -> std::process::Output {
    let args = ["link", "--cluster", cluster, "--kubeconfig", kubeconfig];
    isthmus(&[&args[..], extra].concat()).await
}

/// Puts every object of `isthmus install --cluster NAME` that the API server
/// serves.
async fn install(server: &TestApiServer, cluster: &str) {
    let out = isthmus(&["install", "--cluster", cluster]).await;
    assert!(out.status.success());
    put_installed(server, &String::from_utf8(out.stdout).unwrap());
}

fn write_kubeconfig(server: &TestApiServer, dir: &Path) -> String {
    let path = server.write_kubeconfig(dir).unwrap();
    path.to_str().unwrap().to_owned()
}

/// What Kubernetes does after install: the LoadBalancer gets an address, and the
/// token controller fills the link reader's Secret.
fn cluster_catches_up(server: &TestApiServer, lb: bool, token: bool) {
    if lb {
        gateway_load_balancer(server, "198.18.7.1");
    }
    if token {
        let ca = api_server_ca();
        let data = [
            ("token", "reader-token-123"),
            ("ca.crt", &ca),
            ("namespace", "isthmus-system"),
        ];
        fill_reader_token(server, &data);
    }
}

/// A CA certificate standing in for the API server's.
fn api_server_ca() -> String {
    use proxy_identity::mint::{self, KeyAlgorithm, Validity};
    mint::trust_anchor(
        "api server CA",
        Validity::from_now(Duration::from_secs(3600)),
        KeyAlgorithm::EcdsaP256,
    )
    .unwrap()
    .ca
    .cert_pem
}

#[tokio::test]
async fn link_prints_a_working_kubeconfig_and_the_link() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(&server, dir.path());
    install(&server, "cluster-a").await;
    cluster_catches_up(&server, true, true);

    let out = run_link(&kubeconfig, "cluster-a", &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The test server's URL is a loopback one: the user is told.
    assert!(stderr.contains("--api-server"), "{stderr}");
    let docs = docs(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(docs.len(), 2);
    let secret: Secret = serde_json::from_value(docs[0].clone()).unwrap();
    let link: LinkResource = serde_json::from_value(docs[1].clone()).unwrap();

    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("cluster-a-credentials")
    );
    assert_eq!(secret.metadata.namespace.as_deref(), Some("isthmus-system"));
    assert_eq!(link.metadata.name.as_deref(), Some("cluster-a"));
    assert_eq!(link.metadata.namespace.as_deref(), Some("isthmus-system"));
    let spec = &link.spec;
    assert_eq!(
        spec.credentials_secret.as_deref(),
        Some("cluster-a-credentials")
    );
    assert_eq!(spec.link.target_cluster_name.as_str(), "cluster-a");
    assert_eq!(spec.link.gateway_address.as_str(), "198.18.7.1");
    assert_eq!(spec.link.gateway_port, 4143);
    // The only port of the gateway's LoadBalancer.
    assert_eq!(spec.link.probe_spec.port, 4143);
    assert_eq!(
        spec.link.gateway_identity.as_str(),
        "spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway"
    );

    // The kubeconfig carries the reader's token and CA, and reaches the cluster.
    let text = &secret.data.unwrap()["kubeconfig"].0;
    let config: kube::config::Kubeconfig = serde_yaml_ng::from_slice(text).unwrap();
    let raw: Value = serde_yaml_ng::from_slice(text).unwrap();
    assert_eq!(raw["users"][0]["user"]["token"], "reader-token-123");
    assert_eq!(
        raw["clusters"][0]["cluster"]["server"],
        server.url().trim_end_matches('/').to_owned() + "/"
    );
    let ca = config.clusters[0]
        .cluster
        .as_ref()
        .unwrap()
        .certificate_authority_data
        .clone()
        .unwrap();
    let ca: k8s_openapi::ByteString = serde_json::from_value(json!(ca)).unwrap();
    assert!(
        String::from_utf8(ca.0)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let remote = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(remote).unwrap();
    let services: Api<Service> = Api::namespaced(client, "isthmus-system");
    let gateway = tokio::time::timeout(STEP, services.get("isthmus-gateway"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gateway.metadata.name.as_deref(), Some("isthmus-gateway"));

    // --api-server and --gateway-address override what the cluster says.
    let out = run_link(
        &kubeconfig,
        "cluster-a",
        &[
            "--api-server",
            "https://api.cluster-a.example:6443",
            "--gateway-address",
            "gateway.cluster-a.example",
        ],
    )
    .await;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("gatewayAddress: gateway.cluster-a.example"),
        "{text}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("--api-server"));

    // A gateway Service of an older install still lists the admin port: the Link
    // probes the tunnel port all the same, and follows the tunnel port it is given.
    let mut svc = get(&server, GATEWAY_SERVICE);
    svc["spec"]["ports"] = json!([
        {"name": "isthmus-tunnel", "port": 14143, "targetPort": "isthmus-tunnel", "protocol": "TCP"},
        {"name": "isthmus-admin", "port": 4191, "targetPort": "isthmus-admin", "protocol": "TCP"},
    ]);
    put(&server, svc);
    for (extra, port) in [(None, 14143), (Some("4243"), 4243)] {
        let args: Vec<&str> = extra.iter().flat_map(|p| ["--gateway-port", p]).collect();
        let out = run_link(&kubeconfig, "cluster-a", &args).await;
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let link = text.split("---\n").nth(1).unwrap();
        let link: LinkResource = serde_yaml_ng::from_str(link).unwrap();
        assert_eq!(link.spec.link.gateway_port, port);
        assert_eq!(link.spec.link.probe_spec.port, port, "{extra:?}");
    }
}

#[tokio::test]
async fn what_is_missing_is_named_with_what_to_do() {
    let server = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write_kubeconfig(&server, dir.path());
    let link_a = || run_link(&kubeconfig, "cluster-a", &[]);

    let out = link_a().await;
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("no Service isthmus-system/isthmus-gateway")
            && stderr.contains("isthmus install --cluster cluster-a"),
        "{stderr}"
    );

    install(&server, "cluster-a").await;
    let out = link_a().await;
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("no LoadBalancer address yet") && stderr.contains("--gateway-address"),
        "{stderr}"
    );

    cluster_catches_up(&server, true, false);
    let out = link_a().await;
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("isthmus-link-reader-token has no token yet"),
        "{stderr}"
    );

    cluster_catches_up(&server, false, true);
    assert!(link_a().await.status.success());

    let out = run_link(&kubeconfig, "Cluster A", &[]).await;
    assert!(String::from_utf8(out.stderr).unwrap().contains("--cluster"));
    let out = run_link("/nonexistent/kubeconfig", "a", &[]).await;
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("--kubeconfig /nonexistent/kubeconfig")
    );
}
