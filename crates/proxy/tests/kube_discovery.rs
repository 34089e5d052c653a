//! A gateway started with `--discovery kube` learns its cluster from an API server
//! (the in-memory test server, reached through a kubeconfig): the Services and
//! EndpointSlices of what it exports, its ClusterSettings and Links, and changes to
//! them while it runs.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use isthmus_vocab::SpiffeId;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams};
use proxy_discovery::model::ClusterSettingsResource;
use proxy_identity::mint::{self, KeyAlgorithm, Validity};
use serde_json::json;
use test_apiserver::{ResourceType, TestApiServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(20);

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn free_port() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    listener.local_addr().unwrap()
}

async fn config(admin: SocketAddr) -> Option<serde_json::Value> {
    let exchange = async {
        let mut stream = TcpStream::connect(admin).await?;
        stream
            .write_all(b"GET /config HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = timeout(STEP, exchange).await.ok()?.ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// The names of the Services the gateway's discovery holds.
fn services(config: &serde_json::Value) -> Vec<String> {
    config["discovery"]["snapshot"]["services"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|s| s["metadata"]["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `/config` at `admin` until `check` finds what it wants in it.
async fn eventually<T>(
    what: &str,
    admin: SocketAddr,
    check: impl Fn(&serde_json::Value) -> Option<T>,
) -> T {
    isthmus_test_support::eventually(what, STEP, || async {
        config(admin).await.as_ref().and_then(&check)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_discovers_its_cluster_through_the_api_server() {
    let server = TestApiServer::builder()
        .resource(ResourceType::of::<ClusterSettingsResource>(true))
        .start()
        .await
        .unwrap();
    let settings: ClusterSettingsResource = serde_json::from_value(json!({
        "apiVersion": "multicluster.isthmus.io/v1alpha1", "kind": "ClusterSettings",
        "metadata": {"name": "cluster-a", "namespace": "isthmus-system"},
        "spec": {"clusterName": "cluster-a", "exportedNamespaces": ["default"]},
    }))
    .unwrap();
    server.store().put(&settings).unwrap();
    let hello: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    server.store().put(&hello).unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "hello-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "hello"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
    .unwrap();
    server.store().put(&slice).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.write_kubeconfig(dir.path()).unwrap();
    let validity = Validity::from_now(Duration::from_secs(3600));
    let anchor = mint::trust_anchor(
        &mint::default_anchor_name(),
        validity,
        KeyAlgorithm::EcdsaP256,
    )
    .unwrap();
    let issuer = mint::issuer(&anchor, "cluster-a", validity, KeyAlgorithm::EcdsaP256).unwrap();
    let id =
        SpiffeId::parse("spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway").unwrap();
    let identity = dir.path().join("identity");
    mint::leaf(&issuer, &id, validity, KeyAlgorithm::EcdsaP256)
        .unwrap()
        .write_dir(&identity, false)
        .unwrap();

    let (inbound, admin) = (free_port().await, free_port().await);
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    let _gateway = Gateway(
        Command::new(env!("CARGO_BIN_EXE_isthmus-proxy"))
            .args(["gateway", "--cluster", "cluster-a", "--discovery", "kube"])
            .arg("--allow-local-endpoints")
            .arg("--identity-dir")
            .arg(&identity)
            .args(["--inbound-addr", &inbound.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--log", "info"])
            .env_clear()
            .env("KUBECONFIG", &kubeconfig)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log_path = dir.path().join("gateway.log");
    let found = eventually("the gateway to list hello from the API", admin, |c| {
        services(c).contains(&"hello".to_owned()).then(|| c.clone())
    })
    .await;
    let snapshot = &found["discovery"]["snapshot"];
    assert_eq!(
        snapshot["settings"]["spec"]["exportedNamespaces"],
        json!(["default"]),
        "{}",
        std::fs::read_to_string(&log_path).unwrap()
    );

    // A Service created while it runs appears; a deleted one goes.
    let world: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "world", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]},
    }))
    .unwrap();
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    api.create(&Default::default(), &world).await.unwrap();
    api.delete("hello", &DeleteParams::default()).await.unwrap();
    eventually("world to appear and hello to go", admin, |c| {
        let names = services(c);
        (names.contains(&"world".to_owned()) && !names.contains(&"hello".to_owned())).then_some(())
    })
    .await;
}
