//! Server-side apply merges the lists a real API server keys (Service
//! `spec.ports` by `port` and `protocol`, `containers` by `name`, a container's
//! `ports` by `containerPort` and `protocol`, its `env` by `name`): two field
//! managers each keep the elements they apply, a manager owns its elements
//! field by field (a different value under the same key is a conflict naming
//! the element as the real server does), and an element its manager stops
//! applying goes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use test_apiserver::TestApiServer;

const STEP: Duration = Duration::from_secs(10);

/// Applies `body` to the object `web` through `api` as `manager`.
async fn apply<K>(api: &Api<K>, manager: &str, body: Value) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let params = PatchParams::apply(manager);
    tokio::time::timeout(STEP, api.patch("web", &params, &Patch::Apply(body)))
        .await
        .expect("step timed out")
}

/// A server, and the API of `K` in its namespace `default`.
async fn start<K: Resource<Scope = k8s_openapi::NamespaceResourceScope>>() -> (TestApiServer, Api<K>)
where
    K::DynamicType: Default,
{
    let server = TestApiServer::start().await;
    let api = Api::namespaced(server.client(), "default");
    (server, api)
}

/// The message of a 409, or a panic.
fn conflict<K: std::fmt::Debug>(result: Result<K, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(s)) if s.code == 409 => s.message,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn service(ports: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "default"},
           "spec": {"ports": ports}})
}

/// The `[port, targetPort]` pairs of a Service, in order.
fn ports(svc: &Service) -> Vec<(i32, Option<String>)> {
    let spec = svc.spec.clone().unwrap();
    spec.ports
        .unwrap()
        .iter()
        .map(|p| {
            let target = p.target_port.as_ref().map(|t| match t {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
            });
            (p.port, target)
        })
        .collect()
}

#[tokio::test]
async fn service_ports_merge_by_port_and_protocol() {
    let (_server, api) = start::<Service>().await;
    let http = json!([{"name": "http", "port": 80, "targetPort": 8080}]);
    apply(&api, "app", service(http)).await.unwrap();
    // Another manager adds its own port: both stay.
    let metrics = json!([{"name": "metrics", "port": 9090}]);
    let both = apply(&api, "metrics", service(metrics)).await.unwrap();
    assert_eq!(
        ports(&both),
        vec![(80, Some("8080".to_owned())), (9090, None)]
    );
    let managed = serde_json::to_string(&both.meta().managed_fields).unwrap();
    assert!(
        managed.contains(r#"k:{\"port\":9090,\"protocol\":\"TCP\"}"#),
        "the metrics manager owns its port by key: {managed}"
    );

    // The same key with another value is the first manager's field.
    let message = conflict(
        apply(
            &api,
            "metrics",
            service(json!([
                {"name": "metrics", "port": 9090},
                {"name": "http", "port": 80, "targetPort": 8081},
            ])),
        )
        .await,
    );
    assert!(message.contains("\"app\""), "{message}");
    assert!(
        message.contains(r#".spec.ports[port=80,protocol="TCP"].targetPort"#),
        "{message}"
    );
    // UDP 9090 is another element than TCP 9090.
    let udp = apply(
        &api,
        "dns",
        service(json!([{"name": "dns", "port": 9090, "protocol": "UDP"}])),
    )
    .await
    .unwrap();
    assert_eq!(ports(&udp).len(), 3);

    // The first manager stops applying its port: it goes, the others stay.
    let https = json!([{"name": "https", "port": 443}]);
    let left = apply(&api, "app", service(https)).await.unwrap();
    assert_eq!(ports(&left), vec![(9090, None), (9090, None), (443, None)]);
}

fn deployment(containers: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "web", "namespace": "default"},
           "spec": {"selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": containers}}}})
}

#[tokio::test]
async fn containers_their_ports_and_env_merge_by_key() {
    let (_server, api) = start::<Deployment>().await;
    apply(
        &api,
        "app",
        deployment(json!([{
            "name": "web", "image": "web:1",
            "ports": [{"containerPort": 8080}],
            "env": [{"name": "A", "value": "1"}],
        }])),
    )
    .await
    .unwrap();
    // An injector's manager adds an env value and a port to the app's container,
    // and a container of its own.
    let merged = apply(&api, "injector", deployment(json!([
        {"name": "web", "ports": [{"containerPort": 4191}], "env": [{"name": "B", "value": "2"}]},
        {"name": "proxy", "image": "proxy:1"},
    ])))
    .await
    .unwrap();
    let spec = merged.spec.unwrap().template.spec.unwrap();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["web", "proxy"]);
    let web = &spec.containers[0];
    assert_eq!(web.image.as_deref(), Some("web:1"));
    let env: Vec<(&str, Option<&str>)> = (web.env.iter().flatten())
        .map(|e| (e.name.as_str(), e.value.as_deref()))
        .collect();
    assert_eq!(env, [("A", Some("1")), ("B", Some("2"))]);
    let container_ports: Vec<i32> = (web.ports.iter().flatten())
        .map(|p| p.container_port)
        .collect();
    assert_eq!(container_ports, [8080, 4191]);

    // The app's env value under the same name is the app's field.
    let message = conflict(
        apply(
            &api,
            "injector",
            deployment(json!([
                {"name": "web", "env": [{"name": "A", "value": "9"}]},
            ])),
        )
        .await,
    );
    assert!(message.contains("\"app\""), "{message}");
    assert!(
        message.contains(r#".spec.template.spec.containers[name="web"].env[name="A"].value"#),
        "{message}"
    );

    // The injector stops applying its container: it goes, the app's stays whole.
    let left = apply(
        &api,
        "injector",
        deployment(json!([
            {"name": "web", "env": [{"name": "B", "value": "2"}]},
        ])),
    )
    .await
    .unwrap();
    let spec = left.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.containers.len(), 1);
    let ports: Vec<i32> = (spec.containers[0].ports.iter().flatten())
        .map(|p| p.container_port)
        .collect();
    assert_eq!(ports, [8080], "the injector's port went with its apply");
}
