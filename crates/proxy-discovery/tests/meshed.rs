//! Which endpoints are meshed pods, as both sources learn it: a Pod labelled
//! `isthmus.io/meshed: "true"` joined to its endpoints by `targetRef`. The
//! directory source reads Pod manifests; the Kubernetes source watches the
//! metadata of labelled Pods only. A gateway reaches a meshed endpoint over its
//! sidecar's tunnel only, so a wrong answer here is a plaintext path.
#![allow(clippy::unwrap_used)]

use isthmus_test_support::assert_eventually;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use isthmus_vocab::ClusterName;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use proxy_discovery::source::kube::KubeSource;
use proxy_discovery::{DirSource, Discovery, Snapshot};
use serde_json::json;
use test_apiserver::TestApiServer;
use tokio::sync::oneshot;

const STEP: Duration = Duration::from_secs(15);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

/// `(address, meshed)` of every endpoint of the exported `hello:80`.
fn meshed(snapshot: &Snapshot) -> Vec<(String, bool)> {
    snapshot
        .exported_endpoints("default", "hello", 80)
        .map(|eps| eps.iter().map(|e| (e.addr.to_string(), e.meshed)).collect())
        .unwrap_or_default()
}

fn pair(addr: &str, meshed: bool) -> (String, bool) {
    (addr.to_owned(), meshed)
}

/// [`meshed`] of hello-a's and hello-b's endpoints, `a` and `b`.
fn both(a: bool, b: bool) -> [(String, bool); 2] {
    [pair("198.18.1.10:8080", a), pair("198.18.1.11:8080", b)]
}

// ---- the directory source ----

const SERVICE_AND_SLICE: &str = "apiVersion: v1
kind: Service
metadata: {name: hello, labels: {mirror.isthmus.io/exported: \"true\"}}
spec:
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-1, labels: {kubernetes.io/service-name: hello}}
addressType: IPv4
endpoints:
- addresses: [198.18.1.10]
  targetRef: {kind: Pod, namespace: default, name: hello-a}
- addresses: [198.18.1.11]
  targetRef: {kind: Pod, namespace: default, name: hello-b}
ports: [{port: 8080, protocol: TCP}]
";

fn pod_yaml(name: &str, meshed: bool) -> String {
    let label = if meshed {
        ", isthmus.io/meshed: \"true\""
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: hello{label}}}}}\n\
         spec: {{containers: [{{name: app, image: hello}}]}}\n---\n"
    )
}

fn dir_source(dir: &Path) -> DirSource {
    DirSource::new(dir).with_cluster(ClusterName::parse("cluster-a").unwrap())
}

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[test]
fn the_directory_source_joins_pod_manifests_to_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "hello.yaml", SERVICE_AND_SLICE);
    // Without Pod manifests the endpoints name pods nobody has seen: they may be
    // meshed, so none is offered (never guessed plain).
    let snapshot = dir_source(dir.path()).load().unwrap();
    assert_eq!(
        snapshot.exported_endpoints("default", "hello", 80),
        Err(proxy_discovery::ExportRefusal::NoEndpoints)
    );
    write(
        dir.path(),
        "pods.yaml",
        &(pod_yaml("hello-a", true) + &pod_yaml("hello-b", false)),
    );
    let snapshot = dir_source(dir.path()).load().unwrap();
    assert_eq!(meshed(&snapshot), both(true, false));
}

#[tokio::test]
async fn the_directory_source_follows_a_pod_label_change() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "hello.yaml", SERVICE_AND_SLICE);
    write(
        dir.path(),
        "pods.yaml",
        &(pod_yaml("hello-a", true) + &pod_yaml("hello-b", false)),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let (discovery, _task) = dir_source(dir.path())
        .watch(Duration::from_millis(25), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    assert_eq!(meshed(&discovery.load()), both(true, false));
    write(
        dir.path(),
        "pods.yaml",
        &(pod_yaml("hello-a", false) + &pod_yaml("hello-b", true)),
    );
    assert_eventually!(within STEP, {
        meshed(&discovery.load())
            == both(false, true)
    }, "the relabelled pods");
    let _ = stop.send(());
}

// ---- the Kubernetes source ----

fn kube_service() -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "hello", "namespace": "default",
                     "labels": {"mirror.isthmus.io/exported": "true"}},
        "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]},
    }))
    .unwrap()
}

fn kube_slice() -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "hello-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "hello"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["198.18.1.10"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "namespace": "default", "name": "hello-a", "uid": "a"}},
            {"addresses": ["198.18.1.11"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "namespace": "default", "name": "hello-b", "uid": "b"}},
        ],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }))
    .unwrap()
}

fn kube_pod(name: &str, meshed: bool) -> Pod {
    let mut labels = json!({"app": "hello"});
    if meshed {
        labels["isthmus.io/meshed"] = json!("true");
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "hello"}]},
        "status": {"podIP": "198.18.1.10", "phase": "Running"},
    }))
    .unwrap()
}

async fn set_meshed(pods: &Api<Pod>, name: &str, meshed: bool) {
    let value = if meshed { json!("true") } else { json!(null) };
    let patch = json!({"metadata": {"labels": {"isthmus.io/meshed": value}}});
    within(pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
        .await
        .unwrap();
}

async fn watch(server: &TestApiServer) -> (Discovery, oneshot::Sender<()>) {
    let source = KubeSource::new(server.client(), ClusterName::parse("cluster-a").unwrap())
        .debounce(Duration::from_millis(20))
        .sync_timeout(Duration::from_secs(10));
    let (stop, stopped) = oneshot::channel::<()>();
    let (discovery, _task) = within(source.watch(async {
        let _ = stopped.await;
    }))
    .await
    .unwrap();
    (discovery, stop)
}

#[tokio::test]
async fn the_kube_source_watches_every_pod_and_joins_them_by_target_ref() {
    // The address the Service asks for must lie in the API server's range.
    let server = TestApiServer::builder()
        .service_cluster_ip_range("198.19.0.0/16".parse().unwrap())
        .start()
        .await
        .unwrap();
    let post = PostParams::default();
    let services: Api<Service> = Api::namespaced(server.client(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(server.client(), "default");
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    within(services.create(&post, &kube_service()))
        .await
        .unwrap();
    within(slices.create(&post, &kube_slice())).await.unwrap();
    within(pods.create(&post, &kube_pod("hello-a", true)))
        .await
        .unwrap();
    within(pods.create(&post, &kube_pod("hello-b", false)))
        .await
        .unwrap();

    let (discovery, stop) = watch(&server).await;
    assert_eq!(meshed(&discovery.load()), both(true, false));
    // Every pod is held, labelled or not (an unlabelled pod is known to be plain),
    // and of each only its metadata.
    let held: Vec<String> = discovery
        .load()
        .local()
        .pods
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(held, ["default/hello-a", "default/hello-b"]);

    // Labels change: the join follows.
    set_meshed(&pods, "hello-a", false).await;
    set_meshed(&pods, "hello-b", true).await;
    assert_eventually!(within STEP, {
        meshed(&discovery.load())
            == both(false, true)
    }, "the relabelled pods");
    // A pod that goes away while its (stale) endpoint remains: the endpoint names
    // a pod discovery no longer knows, which may be meshed, so it is left out
    // rather than guessed plain.
    within(pods.delete("hello-b", &Default::default()))
        .await
        .unwrap();
    assert_eventually!(within STEP, {
        meshed(&discovery.load()) == [pair("198.18.1.10:8080", false)]
    }, "the deleted pod");
    let _ = stop.send(());
}
