//! Least privilege, with the grants `isthmus install` and `isthmus link`
//! render, on API servers that enforce RBAC: the controller of cluster-b
//! (through its ServiceAccount) mirrors cluster-a's `hello` reading cluster-a
//! with the link reader's token, and the gateway of cluster-a loads its
//! discovery through its ServiceAccount. A request beyond a grant is 403.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use isthmus_controller::mirror::{ReconcileTiming, SettingsSource};
use isthmus_controller::remote::RemoteTiming;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::Api;
use kube::api::{DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams};
use proxy_discovery::source::kube::KubeSource;
use serde_json::{Value, json};
use test_apiserver::TestApiServer;

const STEP: Duration = Duration::from_secs(20);
const NS: &str = "isthmus-system";

async fn isthmus(args: &[&str]) -> String {
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .env_clear()
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(STEP, cmd).await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "isthmus {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Applies every document of `yaml` the server serves, in order, as the admin
/// would with `kubectl apply --server-side`.
async fn apply(server: &TestApiServer, yaml: &str) {
    let client = server.client();
    for de in serde_yaml_ng::Deserializer::from_str(yaml) {
        let doc: Value = serde::Deserialize::deserialize(de).unwrap();
        if doc.is_null() {
            continue;
        }
        let api_version = doc["apiVersion"].as_str().unwrap();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let kind = doc["kind"].as_str().unwrap();
        let gvk = GroupVersionKind::gvk(group, version, kind);
        // cert-manager's kinds and PodDisruptionBudgets are not served here.
        let Ok((resource, caps)) = kube::discovery::pinned_kind(&client, &gvk).await else {
            continue;
        };
        let api: Api<DynamicObject> = match doc["metadata"]["namespace"].as_str() {
            Some(ns) if caps.scope == kube::discovery::Scope::Namespaced => {
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            _ => Api::all_with(client.clone(), &resource),
        };
        let name = doc["metadata"]["name"].as_str().unwrap();
        api.patch(name, &PatchParams::apply("kubectl"), &Patch::Apply(&doc))
            .await
            .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
    }
}

fn forbidden(result: Result<impl std::fmt::Debug, kube::Error>, what: &str) {
    match result {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403, got {other:?}"),
    }
}

async fn rbac_cluster() -> TestApiServer {
    TestApiServer::builder()
        .authorize_rbac()
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_works_with_its_rendered_grant_and_no_more() {
    let a = rbac_cluster().await;
    let b = rbac_cluster().await;
    apply(
        &a,
        &isthmus(&[
            "install",
            "--cluster",
            "cluster-a",
            "--export-namespace",
            "default",
        ])
        .await,
    )
    .await;
    apply(&b, &isthmus(&["install", "--cluster", "cluster-b"]).await).await;

    // cluster-a: its hello, and the gateway's LoadBalancer address.
    let hello: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {"ports": [{"port": 80, "targetPort": 8080}], "selector": {"app": "hello"}}}))
    .unwrap();
    Api::<Service>::namespaced(a.client(), "default")
        .create(&PostParams::default(), &hello)
        .await
        .unwrap();
    Api::<Service>::namespaced(a.client(), NS)
        .patch_status(
            "isthmus-gateway",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.18.7.1"}]}}})),
        )
        .await
        .unwrap();

    // The gateway of cluster-a loads its discovery as `--discovery kube` does.
    let gateway = a.service_account_client(NS, "isthmus-gateway").unwrap();
    let source = KubeSource::new(gateway.clone(), "cluster-a".parse().unwrap())
        .with_mesh_kinds()
        .sync_timeout(Duration::from_secs(10));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (discovery, _task) = tokio::time::timeout(
        STEP,
        source.watch(async {
            let _ = stopped.await;
        }),
    )
    .await
    .unwrap()
    .expect("the gateway's grant lets it list and watch what it routes by");
    assert!(
        discovery
            .snapshot()
            .local()
            .service("default", "hello")
            .is_some(),
        "the gateway sees hello"
    );
    forbidden(
        Api::<Secret>::all(gateway.clone())
            .list(&ListParams::default())
            .await,
        "the gateway listing Secrets",
    );
    let _ = stop.send(());

    // `isthmus link` on cluster-a (as its admin) hands cluster-b the link
    // reader's token; cluster-b's controller reads cluster-a with it.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("a.kubeconfig");
    std::fs::write(
        &kubeconfig,
        serde_yaml_ng::to_string(&a.kubeconfig()).unwrap(),
    )
    .unwrap();
    let link = isthmus(&[
        "link",
        "--cluster",
        "cluster-a",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ])
    .await;
    apply(&b, &link).await;
    let reader = a.service_account_client(NS, "isthmus-link-reader").unwrap();
    forbidden(
        Api::<Secret>::namespaced(reader, NS)
            .get("isthmus-link-reader-token")
            .await,
        "the link reader reading a Secret",
    );

    let controller = b.service_account_client(NS, "isthmus-controller").unwrap();
    forbidden(
        Api::<Secret>::all(controller.clone())
            .list(&ListParams::default())
            .await,
        "the controller listing Secrets of every namespace",
    );
    let config = isthmus_controller::Config {
        namespace: NS.to_owned(),
        settings: SettingsSource::Object("cluster-b".to_owned()),
        lease: Some(isthmus_controller::lease::LeaseConfig {
            namespace: NS.to_owned(),
            name: "isthmus-controller".to_owned(),
            identity: "least-privilege".to_owned(),
            lease_duration: Duration::from_secs(2),
        }),
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
    };
    let running = tokio::time::timeout(STEP, isthmus_controller::start(controller, config))
        .await
        .unwrap()
        .unwrap();
    apply(
        &b,
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../proxy-discovery/tests/fixtures/seed/cluster-b-servicemirror.yaml"
        ))
        .unwrap(),
    )
    .await;

    let services: Api<Service> = Api::namespaced(b.client(), "default");
    let configmaps: Api<ConfigMap> = Api::namespaced(b.client(), NS);
    let mirrors: Api<DynamicObject> = Api::namespaced_with(
        b.client(),
        "default",
        &kube::api::ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("linkerd.io", "v1alpha1", "ServiceMirror"),
            "servicemirrors",
        ),
    );
    let mirrored =
        isthmus_test_support::eventually("hello mirrored and published", STEP, || async {
            let svc = services.get_opt("hello").await.ok()??;
            let mirror = mirrors.get("hello-mirror").await.ok()?;
            let reason = mirror
                .data
                .pointer("/status/conditions/0/reason")?
                .as_str()?;
            let published = configmaps.get_opt("isthmus-discovery").await.ok()??;
            let services_yaml = published.data?.get("mirrored-services.yaml")?.clone();
            (reason == "Mirrored" && services_yaml.contains("name: hello")).then_some(svc)
        })
        .await;
    assert!(mirrored.spec.unwrap().cluster_ip.is_some());
    tokio::time::timeout(STEP, running.stop()).await.unwrap();
}
