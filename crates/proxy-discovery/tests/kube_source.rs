//! The Kubernetes API source against the in-memory API server: objects reach
//! the index, changes and deletions follow, a bad object and an API outage keep
//! the last good state serving, and recovery picks up what changed meanwhile.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use isthmus_vocab::ClusterName;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use proxy_discovery::model::{ClusterSettingsResource, LinkResource};
use proxy_discovery::source::kube::{KubeSource, KubeSourceError};
use proxy_discovery::{Discovery, Route, ServiceRef};
use serde_json::json;
use test_apiserver::{ResourceType, TestApiServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const STEP: Duration = Duration::from_secs(15);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn service(name: &str, ip: &str, port: i32) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"mirror.isthmus.io/exported": "true"}},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
                 "sessionAffinity": "None", "ipFamilies": ["IPv4"],
                 "ports": [{"port": port, "protocol": "TCP", "targetPort": 8080}],
                 "selector": {"app": name}},
        "status": {"loadBalancer": {}},
    }))
    .unwrap()
}

fn slice(name: &str, service: &str, ip: &str) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true, "serving": true},
                       // No targetRef: an address that is no pod's is reached plain;
                       // one naming a pod the source has not seen would be left out
                       // (tests/meshed.rs).
                       "nodeName": "node-1"}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
    .unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Running {
    discovery: Discovery,
    task: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

fn source(server: &TestApiServer) -> KubeSource {
    KubeSource::new(server.client(), ClusterName::parse("cluster-a").unwrap())
        .debounce(Duration::from_millis(20))
        .probe_interval(Duration::from_millis(100))
        .sync_timeout(Duration::from_secs(10))
}

async fn start(source: KubeSource) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let (discovery, task) = within(source.watch(async {
        let _ = stopped.await;
    }))
    .await
    .unwrap();
    Running {
        discovery,
        task,
        stop: Some(stop),
    }
}

fn hello_route() -> Route {
    Route::Local {
        service: ServiceRef::new("default", "hello"),
        port: 80,
    }
}

#[tokio::test]
async fn services_and_slices_reach_the_index_and_follow_changes() {
    let server = TestApiServer::start().await;
    let services: Api<Service> = Api::namespaced(server.client(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(server.client(), "default");
    within(services.create(&PostParams::default(), &service("hello", "10.96.0.10", 80)))
        .await
        .unwrap();
    within(slices.create(
        &PostParams::default(),
        &slice("hello-abc", "hello", "10.0.0.5"),
    ))
    .await
    .unwrap();

    let running = start(source(&server)).await;
    let snap = running.discovery.snapshot();
    assert_eq!(
        snap.lookup_addr(&addr("10.96.0.10:80")),
        Some(&hello_route())
    );
    assert_eq!(
        snap.lookup_authority("hello.default.svc.cluster.local:80"),
        Some(&hello_route())
    );
    assert_eq!(
        snap.exported_target("default", "hello", 80),
        Ok(vec![addr("10.0.0.5:8080")])
    );
    assert_eq!(running.discovery.generation(), 1);

    // A change is reflected.
    within(services.patch(
        "hello",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"ports": [{"port": 81, "protocol": "TCP", "targetPort": 8080}]}}),
        ),
    ))
    .await
    .unwrap();
    eventually("port 81 in the index", || {
        let snap = running.discovery.load();
        snap.lookup_addr(&addr("10.96.0.10:81")).is_some()
            && snap.lookup_addr(&addr("10.96.0.10:80")).is_none()
    })
    .await;

    // A second slice of the same Service adds its endpoint.
    within(slices.create(
        &PostParams::default(),
        &slice("hello-def", "hello", "10.0.0.6"),
    ))
    .await
    .unwrap();
    eventually("both slices' endpoints", || {
        running
            .discovery
            .load()
            .exported_target("default", "hello", 81)
            == Ok(vec![addr("10.0.0.5:8080"), addr("10.0.0.6:8080")])
    })
    .await;

    // A deleted Service disappears.
    within(services.delete("hello", &DeleteParams::default()))
        .await
        .unwrap();
    eventually("hello gone from the index", || {
        let snap = running.discovery.load();
        snap.lookup_addr(&addr("10.96.0.10:81")).is_none()
            && snap
                .lookup_authority("hello.default.svc.cluster.local:81")
                .is_none()
    })
    .await;
    assert!(!running.discovery.status().stale);
}

#[tokio::test]
async fn a_bad_object_keeps_the_last_good_state() {
    let server = TestApiServer::start().await;
    server
        .store()
        .put(&service("hello", "10.96.0.10", 80))
        .unwrap();
    let running = start(source(&server)).await;
    let generation = running.discovery.generation();

    // The API server takes it; the model does not (a port must fit 16 bits).
    let services: Api<Service> = Api::namespaced(server.client(), "default");
    within(services.create(&PostParams::default(), &service("bad", "10.96.0.11", 70000)))
        .await
        .unwrap();
    eventually("the failure to be reported", || {
        running.discovery.status().stale
    })
    .await;
    let status = running.discovery.status();
    let error = status.last_error.unwrap();
    assert!(
        error.contains("/api/v1/namespaces/default/services/bad"),
        "{error}"
    );
    assert!(error.contains("port"), "{error}");
    assert_eq!(running.discovery.generation(), generation);
    assert_eq!(
        running.discovery.load().lookup_addr(&addr("10.96.0.10:80")),
        Some(&hello_route())
    );

    within(services.delete("bad", &DeleteParams::default()))
        .await
        .unwrap();
    eventually("recovery once the bad object is gone", || {
        !running.discovery.status().stale
    })
    .await;
    assert!(running.discovery.generation() > generation);
}

#[tokio::test]
async fn an_api_outage_keeps_serving_and_recovery_catches_up() {
    let server = TestApiServer::builder()
        .history_limit(4)
        .start()
        .await
        .unwrap();
    server
        .store()
        .put(&service("hello", "10.96.0.10", 80))
        .unwrap();
    let running = start(source(&server)).await;

    server.stop().await;
    eventually("the outage to be reported", || {
        running.discovery.failed_reloads() > 0
    })
    .await;
    assert!(running.discovery.status().stale);
    assert_eq!(
        running.discovery.load().lookup_addr(&addr("10.96.0.10:80")),
        Some(&hello_route()),
        "the last good state keeps serving"
    );

    // Changes while the API is unreachable; more writes than the server's event
    // history holds, so the watchers' resourceVersions expire and they relist.
    server
        .store()
        .put(&service("late", "10.96.0.20", 80))
        .unwrap();
    server
        .store()
        .delete_typed::<Service>(Some("default"), "hello")
        .unwrap();
    for i in 0..6 {
        let cm: ConfigMap = serde_json::from_value(
            json!({"metadata": {"name": format!("noise-{i}"), "namespace": "default"}}),
        )
        .unwrap();
        server.store().put(&cm).unwrap();
    }
    server.restart().await.unwrap();

    eventually("the changes made during the outage", || {
        let snap = running.discovery.load();
        snap.lookup_addr(&addr("10.96.0.20:80")).is_some()
            && snap.lookup_addr(&addr("10.96.0.10:80")).is_none()
    })
    .await;
    eventually("the state to be current again", || {
        !running.discovery.status().stale
    })
    .await;
}

fn mesh_server_builder() -> test_apiserver::Builder {
    TestApiServer::builder().resource(ResourceType::of::<ClusterSettingsResource>(true))
}

#[tokio::test]
async fn links_and_cluster_settings_with_mesh_kinds() {
    let server = mesh_server_builder().start().await.unwrap();
    let mut hello = service("hello", "10.96.0.10", 80);
    hello.metadata.labels = None;
    server.store().put(&hello).unwrap();
    let link: LinkResource = serde_json::from_value(json!({
        "apiVersion": "multicluster.isthmus.io/v1alpha1", "kind": "Link",
        "metadata": {"name": "cluster-b", "namespace": "isthmus"},
        "spec": {"targetClusterName": "cluster-b", "gatewayAddress": "198.18.0.3",
                 "gatewayPort": 4143,
                 "gatewayIdentity": "spiffe://cluster-b.local/ns/isthmus/sa/gateway",
                 "credentialsSecret": "cluster-b-credentials"},
    }))
    .unwrap();
    server.store().put(&link).unwrap();
    let settings: ClusterSettingsResource = serde_json::from_value(json!({
        "apiVersion": "multicluster.isthmus.io/v1alpha1", "kind": "ClusterSettings",
        "metadata": {"name": "cluster-a", "namespace": "isthmus"},
        "spec": {"clusterName": "cluster-a", "trustDomain": "cluster-a.local",
                 "exportedNamespaces": ["default"]},
    }))
    .unwrap();
    server.store().put(&settings).unwrap();

    let running = start(source(&server).with_mesh_kinds()).await;
    let snap = running.discovery.snapshot();
    let link = snap.link("cluster-b").expect("the Link is read");
    assert_eq!(link.spec.gateway_port, 4143);
    assert_eq!(snap.settings().spec.trust_domain, "cluster-a.local");
    // Exported through the namespace, not a label.
    assert!(
        snap.local()
            .is_exported(snap.local().service("default", "hello").unwrap())
    );

    let links: Api<LinkResource> = Api::namespaced(server.client(), "isthmus");
    within(links.delete("cluster-b", &DeleteParams::default()))
        .await
        .unwrap();
    eventually("the Link gone", || {
        running.discovery.load().link("cluster-b").is_none()
    })
    .await;
}

#[tokio::test]
async fn start_fails_when_a_resource_is_not_served() {
    // No ClusterSettings CRD on this server.
    let server = TestApiServer::start().await;
    let err = within(
        source(&server)
            .with_mesh_kinds()
            .sync_timeout(Duration::from_millis(500))
            .watch(std::future::pending()),
    )
    .await
    .unwrap_err();
    match &err {
        KubeSourceError::InitialSync { pending, .. } => assert_eq!(pending, "clustersettings"),
        other => panic!("expected InitialSync, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("clustersettings"), "{text}");
    assert!(
        text.contains("404") || text.contains("NotFound") || text.contains("not find"),
        "{text}"
    );
}
