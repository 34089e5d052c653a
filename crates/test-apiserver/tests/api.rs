//! The server through unmodified kube-rs clients: REST verbs, selectors,
//! watches (410 relist included), server-side apply, `/status`, garbage
//! collection, CRDs, and an outage with stop/restart.
#![allow(clippy::unwrap_used)]

use isthmus_test_support::assert_eventually;
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{CustomResource, CustomResourceExt, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use test_apiserver::{ResourceType, TestApiServer};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "example.io",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus"
)]
struct WidgetSpec {
    size: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    color: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
struct WidgetStatus {
    ready: bool,
}

const STEP: Duration = Duration::from_secs(10);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

/// Creates `obj` through `api` within a step; the object as stored.
async fn create<K>(api: &Api<K>, obj: &K) -> K
where
    K: Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    within(api.create(&PostParams::default(), obj))
        .await
        .unwrap()
}

/// A reflector of `api` with `config`, backing off on errors, once its first list
/// is in; abort the task to stop it.
async fn reflect(
    api: &Api<Service>,
    config: watcher::Config,
) -> (reflector::Store<Service>, tokio::task::JoinHandle<()>) {
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api.clone(), config).default_backoff());
    let task = tokio::spawn(stream.for_each(|_| async {}));
    within(reader.wait_until_ready()).await.unwrap();
    (reader, task)
}

fn service(name: &str, labels: serde_json::Value, port: i32) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"ports": [{"port": port}]},
    }))
    .unwrap()
}

fn code(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn crud_and_stale_replace() {
    let server = TestApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    let created = create(&api, &service("hello", json!({}), 80)).await;
    assert!(created.metadata.uid.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.creation_timestamp.is_some());

    let again = within(api.create(&PostParams::default(), &service("hello", json!({}), 80))).await;
    assert_eq!(code(again.unwrap_err()), (409, "AlreadyExists".into()));

    let mut got = within(api.get("hello")).await.unwrap();
    assert_eq!(got.metadata.uid, created.metadata.uid);
    got.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 81;
    let replaced = within(api.replace("hello", &PostParams::default(), &got))
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    assert_ne!(replaced.resource_version(), got.resource_version());

    // `got` still carries the old resourceVersion.
    let stale = within(api.replace("hello", &PostParams::default(), &got)).await;
    assert_eq!(code(stale.unwrap_err()), (409, "Conflict".into()));

    let patched = within(api.patch(
        "hello",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
    ))
    .await
    .unwrap();
    assert_eq!(patched.labels()["a"], "b");
    assert_eq!(patched.metadata.generation, Some(2), "metadata is not spec");

    let json_patched = within(
        api.patch(
            "hello",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(json!([
                    {"op": "replace", "path": "/spec/ports/0/port", "value": 82},
                    {"op": "add", "path": "/metadata/labels/c", "value": "d"},
                    {"op": "remove", "path": "/metadata/labels/a"},
                ]))
                .unwrap(),
            ),
        ),
    )
    .await
    .unwrap();
    assert_eq!(json_patched.spec.unwrap().ports.unwrap()[0].port, 82);
    assert_eq!(json_patched.metadata.labels.unwrap().len(), 1);

    let list = within(api.list(&ListParams::default())).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert!(list.metadata.resource_version.is_some());

    within(api.delete("hello", &DeleteParams::default()))
        .await
        .unwrap();
    let gone = within(api.get("hello")).await;
    assert_eq!(code(gone.unwrap_err()), (404, "NotFound".into()));
    let gone = within(api.delete("hello", &DeleteParams::default())).await;
    assert_eq!(code(gone.unwrap_err()).0, 404);
}

#[tokio::test]
async fn generate_name_and_all_namespaces() {
    let server = TestApiServer::start().await;
    let client = server.client();
    for ns in ["a", "b"] {
        server
            .store()
            .put_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            .unwrap();
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let cm: ConfigMap = serde_json::from_value(
            json!({"metadata": {"generateName": "cm-"}, "data": {"k": "v"}}),
        )
        .unwrap();
        let created = create(&api, &cm).await;
        assert!(created.name_any().starts_with("cm-"));
        assert_eq!(created.namespace().as_deref(), Some(ns));
    }
    let all: Api<ConfigMap> = Api::all(client);
    assert_eq!(
        within(all.list(&ListParams::default()))
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    let page = within(all.list(&ListParams::default().limit(1)))
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = within(all.list(&ListParams::default().limit(1).continue_token(&token)))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_ne!(rest.items[0].namespace(), page.items[0].namespace());
}

#[tokio::test]
async fn label_and_field_selectors() {
    let server = TestApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    for (name, labels) in [
        ("web", json!({"app": "web", "tier": "front"})),
        ("db", json!({"app": "db", "tier": "back"})),
        ("bare", json!({})),
    ] {
        create(&api, &service(name, labels, 80)).await;
    }
    let names = |selector: &str, fields: &str| {
        let api = api.clone();
        let lp = ListParams::default().labels(selector).fields(fields);
        async move {
            let mut names: Vec<String> = within(api.list(&lp))
                .await
                .unwrap()
                .items
                .iter()
                .map(|s| s.name_any())
                .collect();
            names.sort();
            names
        }
    };
    assert_eq!(names("app=web", "").await, ["web"]);
    assert_eq!(names("app==web", "").await, ["web"]);
    assert_eq!(names("app!=web", "").await, ["bare", "db"]);
    assert_eq!(names("tier in (front,back)", "").await, ["db", "web"]);
    assert_eq!(names("tier notin (front)", "").await, ["bare", "db"]);
    assert_eq!(names("app", "").await, ["db", "web"]);
    assert_eq!(names("!app", "").await, ["bare"]);
    assert_eq!(names("", "metadata.name=db").await, ["db"]);
    assert_eq!(names("app", "metadata.name!=db").await, ["web"]);
    assert_eq!(
        names("", "metadata.namespace=other").await,
        Vec::<String>::new()
    );
    let bad = within(api.list(&ListParams::default().labels("app in nope"))).await;
    assert_eq!(code(bad.unwrap_err()).0, 400);
}

#[tokio::test]
async fn watch_reports_changes_in_order() {
    let server = TestApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    let rv = within(api.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = within(api.watch(&WatchParams::default().timeout(30), &rv))
        .await
        .unwrap()
        .boxed();
    create(&api, &service("w", json!({}), 80)).await;
    within(api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ports": [{"port": 81}]}})),
    ))
    .await
    .unwrap();
    within(api.delete("w", &DeleteParams::default()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match within(stream.next()).await.unwrap().unwrap() {
            WatchEvent::Added(s) => seen.push(("ADDED", s.spec.unwrap().ports.unwrap()[0].port)),
            WatchEvent::Modified(s) => {
                seen.push(("MODIFIED", s.spec.unwrap().ports.unwrap()[0].port))
            }
            WatchEvent::Deleted(s) => {
                seen.push(("DELETED", s.spec.unwrap().ports.unwrap()[0].port))
            }
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    assert_eq!(seen, [("ADDED", 80), ("MODIFIED", 81), ("DELETED", 81)]);

    // From "0": the current objects first.
    create(&api, &service("x", json!({}), 80)).await;
    let mut from_zero = within(api.watch(&WatchParams::default().timeout(30), "0"))
        .await
        .unwrap()
        .boxed();
    match within(from_zero.next()).await.unwrap().unwrap() {
        WatchEvent::Added(s) => assert_eq!(s.name_any(), "x"),
        other => panic!("expected ADDED x, got {other:?}"),
    }
}

#[tokio::test]
async fn too_old_resource_version_is_gone() {
    let server = TestApiServer::builder()
        .history_limit(3)
        .start()
        .await
        .unwrap();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    for i in 0..6 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).unwrap();
        create(&api, &cm).await;
    }
    let mut stream = within(api.watch(&WatchParams::default(), "1"))
        .await
        .unwrap()
        .boxed();
    match within(stream.next()).await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn server_side_apply() {
    let server = TestApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    let apply = |manager: &str, force: bool, body: serde_json::Value| {
        let api = api.clone();
        let mut pp = PatchParams::apply(manager);
        pp.force = force;
        async move { within(api.patch("s", &pp, &Patch::Apply(body))).await }
    };
    let base = |labels: serde_json::Value| {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "s", "labels": labels},
               "spec": {"ports": [{"port": 80}]}})
    };
    let created = apply("one", false, base(json!({"a": "1", "b": "2"})))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    let managed = created.metadata.managed_fields.unwrap();
    assert_eq!(managed.len(), 1);
    assert_eq!(managed[0].manager.as_deref(), Some("one"));
    assert_eq!(managed[0].operation.as_deref(), Some("Apply"));
    assert_eq!(managed[0].fields_type.as_deref(), Some("FieldsV1"));

    // The same manager changes a value and stops applying label b: it goes.
    let updated = apply("one", false, base(json!({"a": "10"}))).await.unwrap();
    assert_eq!(updated.labels().len(), 1);
    assert_eq!(updated.labels()["a"], "10");

    // Re-applying the same config is a no-op: same resourceVersion.
    let again = apply("one", false, base(json!({"a": "10"}))).await.unwrap();
    assert_eq!(again.resource_version(), updated.resource_version());

    // Another manager setting an owned field to another value conflicts.
    let other = json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "s", "labels": {"a": "20", "c": "3"}}});
    let err = apply("two", false, other.clone()).await.unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert!(s.message.contains("\"one\""), "{}", s.message);
            assert!(s.message.contains(".metadata.labels.a"), "{}", s.message);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Agreeing on the value is no conflict.
    apply(
        "two",
        false,
        json!({"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": "s", "labels": {"a": "10"}}}),
    )
    .await
    .unwrap();

    // Force takes ownership; then "one" no longer owns a, so dropping it
    // from one's config leaves two's value.
    let forced = apply("two", true, other).await.unwrap();
    assert_eq!(forced.labels()["a"], "20");
    assert_eq!(forced.labels()["c"], "3");
    let dropped = apply("one", false, base(json!({}))).await.unwrap();
    assert_eq!(dropped.labels()["a"], "20");

    // Apply without a field manager is refused.
    let no_manager =
        within(api.patch("s", &PatchParams::default(), &Patch::Apply(base(json!({}))))).await;
    assert_eq!(code(no_manager.unwrap_err()).0, 422);

    // A non-apply write takes the fields it changes from the appliers.
    within(api.patch(
        "s",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"c": "4"}}})),
    ))
    .await
    .unwrap();
    let err = apply(
        "two",
        false,
        json!({"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": "s", "labels": {"a": "20", "c": "3"}}}),
    )
    .await
    .unwrap_err();
    assert_eq!(code(err).0, 409);
}

fn widget_api(server: &TestApiServer) -> Api<Widget> {
    Api::namespaced(server.client(), "default")
}

#[tokio::test]
async fn status_subresource_is_isolated() {
    let server = TestApiServer::builder()
        .resource(ResourceType::of::<Widget>(true).with_status())
        .start()
        .await
        .unwrap();
    let api = widget_api(&server);
    let mut w = Widget::new(
        "w",
        WidgetSpec {
            size: 1,
            color: None,
        },
    );
    w.status = Some(WidgetStatus { ready: true });
    let created = create(&api, &w).await;
    assert_eq!(created.status, None, "create ignores .status");

    let mut with_status = created.clone();
    with_status.status = Some(WidgetStatus { ready: true });
    with_status.spec.size = 99;
    let after = within(api.replace_status("w", &PostParams::default(), &with_status))
        .await
        .unwrap();
    assert_eq!(after.status, Some(WidgetStatus { ready: true }));
    assert_eq!(after.spec.size, 1, "/status ignores the spec");
    assert_eq!(after.metadata.generation, Some(1));

    let patched = within(api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"size": 2}, "status": {"ready": false}})),
    ))
    .await
    .unwrap();
    assert_eq!(patched.spec.size, 2);
    assert_eq!(
        patched.status,
        Some(WidgetStatus { ready: true }),
        "the main resource ignores .status"
    );
    assert_eq!(patched.metadata.generation, Some(2));

    let status_patched = within(api.patch_status(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"ready": false}})),
    ))
    .await
    .unwrap();
    assert_eq!(status_patched.status, Some(WidgetStatus { ready: false }));
    let got = within(api.get_status("w")).await.unwrap();
    assert_eq!(got.status, Some(WidgetStatus { ready: false }));

    // Server-side apply to /status, as controllers write conditions: only the
    // status is taken, and the manager is recorded for the status subresource.
    // The merge patch above made its writer the owner of .status.ready.
    let status_apply = |force: bool| {
        let api = api.clone();
        let mut pp = PatchParams::apply("status-writer");
        pp.force = force;
        async move {
            within(api.patch_status(
                "w",
                &pp,
                &Patch::Apply(json!({"apiVersion": "example.io/v1", "kind": "Widget",
                                     "metadata": {"name": "w"},
                                     "spec": {"size": 50}, "status": {"ready": true}})),
            ))
            .await
        }
    };
    match status_apply(false).await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            let cause = &s.details.unwrap().causes[0];
            assert_eq!(cause.reason, "FieldManagerConflict");
            assert_eq!(cause.field, ".status.ready");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let applied = status_apply(true).await.unwrap();
    assert_eq!(applied.status, Some(WidgetStatus { ready: true }));
    assert_eq!(applied.spec.size, 2);
    let entry = applied
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .find(|m| m.manager.as_deref() == Some("status-writer"))
        .unwrap();
    assert_eq!(entry.subresource.as_deref(), Some("status"));
    assert_eq!(entry.operation.as_deref(), Some("Apply"));
}

#[tokio::test]
async fn crd_creation_makes_the_kind_servable() {
    let server = TestApiServer::start().await;
    let widgets = widget_api(&server);
    let before = within(widgets.list(&ListParams::default())).await;
    assert_eq!(code(before.unwrap_err()).0, 404);
    let crds: Api<CustomResourceDefinition> = Api::all(server.client());
    create(&crds, &Widget::crd()).await;
    let w = Widget::new(
        "w",
        WidgetSpec {
            size: 3,
            color: Some("red".into()),
        },
    );
    create(&widgets, &w).await;
    let got = within(widgets.get("w")).await.unwrap();
    assert_eq!(got.spec, w.spec);

    let discovery = within(kube::Discovery::new(server.client()).run())
        .await
        .unwrap();
    assert!(discovery.has_group("example.io"));
    assert!(discovery.has_group("linkerd.io"));
    let aggregated = within(kube::Discovery::new(server.client()).run_aggregated())
        .await
        .unwrap();
    let (resource, caps) = aggregated
        .resolve_gvk(&kube::api::GroupVersionKind::gvk(
            "example.io",
            "v1",
            "Widget",
        ))
        .expect("aggregated discovery names the CRD's kind");
    assert_eq!(resource.plural, "widgets");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(aggregated.has_group("apps"));
    let (services, _) = aggregated
        .resolve_gvk(&kube::api::GroupVersionKind::gvk("", "v1", "Service"))
        .expect("aggregated discovery of the core group");
    assert_eq!(services.plural, "services");

    within(crds.delete(Widget::crd_name(), &DeleteParams::default()))
        .await
        .unwrap();
    let after = within(widgets.get("w")).await;
    assert_eq!(code(after.unwrap_err()).0, 404);
}

#[tokio::test]
async fn finalizers_and_owner_garbage_collection() {
    let server = TestApiServer::start().await;
    let client = server.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap();
    let owner = create(&cms, &owner).await;
    let dependent: Secret = serde_json::from_value(json!({"metadata": {
        "name": "dep",
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                             "uid": owner.uid().unwrap()}],
    }}))
    .unwrap();
    create(&secrets, &dependent).await;

    // A finalizer holds the owner: deletion only marks it.
    within(cms.patch(
        "owner",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["example.io/hold"]}})),
    ))
    .await
    .unwrap();
    within(cms.delete("owner", &DeleteParams::default()))
        .await
        .unwrap();
    let marked = within(cms.get("owner")).await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    let added = within(cms.patch(
        "owner",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["example.io/hold", "example.io/more"]}})),
    ))
    .await;
    assert_eq!(
        code(added.unwrap_err()).0,
        422,
        "no new finalizer while deleting"
    );
    assert!(within(secrets.get("dep")).await.is_ok());

    // Removing the finalizer completes the deletion, and the dependent goes too.
    // (While the owner is only marked, it still exists: dependents stay.)
    within(cms.patch(
        "owner",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    ))
    .await
    .unwrap();
    assert_eq!(code(within(cms.get("owner")).await.unwrap_err()).0, 404);
    assert_eq!(code(within(secrets.get("dep")).await.unwrap_err()).0, 404);

    // A dependent written after its owner is gone is collected as the
    // garbage collector would: the write succeeds, the object does not stay.
    let late = create(&secrets, &dependent).await;
    assert_eq!(late.name_any(), "dep");
    assert_eq!(code(within(secrets.get("dep")).await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn errors_are_status_objects() {
    let server = TestApiServer::builder()
        .body_limit(1024)
        .start()
        .await
        .unwrap();
    let unknown: Api<kube::api::DynamicObject> = Api::namespaced_with(
        server.client(),
        "default",
        &kube::api::ApiResource {
            group: "nope.io".into(),
            version: "v1".into(),
            api_version: "nope.io/v1".into(),
            kind: "Nope".into(),
            plural: "nopes".into(),
        },
    );
    let err = within(unknown.list(&ListParams::default()))
        .await
        .unwrap_err();
    assert_eq!(code(err), (404, "NotFound".into()));

    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let big: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "big"}, "data": {"k": "x".repeat(4096)}}),
    )
    .unwrap();
    let err = within(api.create(&PostParams::default(), &big))
        .await
        .unwrap_err();
    assert_eq!(code(err), (413, "RequestEntityTooLarge".into()));
}

#[tokio::test]
async fn store_access_without_http() {
    let server = TestApiServer::start().await;
    let stored = server
        .store()
        .put(&service("seeded", json!({"x": "y"}), 80))
        .unwrap();
    assert!(stored.metadata.uid.is_some());
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    assert_eq!(within(api.get("seeded")).await.unwrap().labels()["x"], "y");
    server
        .store()
        .put_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": "c", "namespace": "default"}}))
        .unwrap();
    assert_eq!(server.store().list::<ConfigMap>(None).len(), 1);
    server
        .store()
        .delete_typed::<Service>(Some("default"), "seeded")
        .unwrap();
    assert!(
        server
            .store()
            .get::<Service>(Some("default"), "seeded")
            .is_none()
    );
}

#[tokio::test]
async fn reflector_survives_outage_and_relists_after_410() {
    let server = TestApiServer::builder()
        .history_limit(3)
        .bookmark_interval(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    create(&api, &service("first", json!({}), 80)).await;

    let (reader, task) = reflect(&api, watcher::Config::default()).await;
    assert_eventually!(within STEP, reader.len() == 1, "first in the reflector");

    server.stop().await;
    assert!(!server.is_running());
    assert!(
        within(api.get("first")).await.is_err(),
        "stopped server answers"
    );
    // Changes made while the API is unreachable, more than the history holds:
    // the watcher's resourceVersion is then too old and it must relist.
    for i in 0..5 {
        server
            .store()
            .put(&service(&format!("during-{i}"), json!({}), 80))
            .unwrap();
    }
    server
        .store()
        .delete_typed::<Service>(Some("default"), "first")
        .unwrap();
    server.restart().await.unwrap();

    assert_eventually!(within STEP, {
        let mut names: Vec<String> = reader.state().iter().map(|s| s.name_any()).collect();
        names.sort();
        names == ["during-0", "during-1", "during-2", "during-3", "during-4"]
    }, "the reflector to catch up after the outage");
    create(&api, &service("after", json!({}), 80)).await;
    assert_eventually!(within STEP, reader.len() == 6, "a live change after recovery");
    task.abort();
}

#[tokio::test]
async fn streaming_list_watcher() {
    let server = TestApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    create(&api, &service("a", json!({}), 80)).await;
    let (reader, task) = reflect(&api, watcher::Config::default().streaming_lists()).await;
    assert_eq!(reader.len(), 1);
    create(&api, &service("b", json!({}), 80)).await;
    assert_eventually!(within STEP, reader.len() == 2, "b via the streaming watcher");
    task.abort();
}

#[tokio::test]
async fn kubeconfig_reaches_the_server() {
    let server = TestApiServer::start().await;
    let kubeconfig = server.kubeconfig();
    let yaml = serde_yaml_ng::to_string(&kubeconfig).unwrap();
    assert!(yaml.contains(&server.url()));
    let config = within(kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    ))
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let version = within(client.apiserver_version()).await.unwrap();
    assert_eq!(version.major, "1");
}

#[tokio::test]
async fn dry_run_and_delete_preconditions() {
    let server = TestApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let answered = within(api.create(&dry, &service("dry", json!({}), 80)))
        .await
        .unwrap();
    assert_eq!(answered.name_any(), "dry");
    assert_eq!(code(within(api.get("dry")).await.unwrap_err()).0, 404);

    let created = create(&api, &service("real", json!({}), 80)).await;
    within(api.delete("real", &DeleteParams::default().dry_run()))
        .await
        .unwrap();
    assert!(within(api.get("real")).await.is_ok());

    let wrong_uid = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("not-the-uid".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    let err = within(api.delete("real", &wrong_uid)).await.unwrap_err();
    assert_eq!(code(err), (409, "Conflict".into()));
    let right_uid = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: created.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    within(api.delete("real", &right_uid)).await.unwrap();
    assert_eq!(code(within(api.get("real")).await.unwrap_err()).0, 404);

    // Apply needs the apiVersion and kind of the resource it is sent to.
    let err = within(api.patch(
        "x",
        &PatchParams::apply("m"),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})),
    ))
    .await
    .unwrap_err();
    assert_eq!(code(err).0, 400);
}

#[tokio::test]
async fn pages_do_not_repeat_after_concurrent_deletes() {
    let server = TestApiServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    for name in ["a", "b", "c", "d"] {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        create(&api, &cm).await;
    }
    let first = within(api.list(&ListParams::default().limit(2)))
        .await
        .unwrap();
    assert_eq!(first.metadata.remaining_item_count, Some(2));
    within(api.delete("a", &DeleteParams::default()))
        .await
        .unwrap();
    let token = first.metadata.continue_.unwrap();
    let second = within(api.list(&ListParams::default().limit(2).continue_token(&token)))
        .await
        .unwrap();
    let names: Vec<String> = second.items.iter().map(|c| c.name_any()).collect();
    assert_eq!(names, ["c", "d"]);
    assert!(second.metadata.continue_.is_none());
}

/// A controller in the kube-runtime style: every ConfigMap gets a Secret it owns,
/// written with server-side apply.
async fn reconcile_configmap(
    cm: std::sync::Arc<ConfigMap>,
    client: std::sync::Arc<kube::Client>,
) -> Result<kube::runtime::controller::Action, kube::Error> {
    let secrets: Api<Secret> =
        Api::namespaced((*client).clone(), &cm.namespace().unwrap_or_default());
    let owner = cm.controller_owner_ref(&()).unwrap();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{}-secret", cm.name_any()), "ownerReferences": [owner]},
        "stringData": {"copied": cm.data.clone().unwrap_or_default().get("k").cloned().unwrap_or_default()},
    });
    secrets
        .patch(
            &format!("{}-secret", cm.name_any()),
            &PatchParams::apply("test-controller").force(),
            &Patch::Apply(secret),
        )
        .await?;
    Ok(kube::runtime::controller::Action::await_change())
}

#[tokio::test]
async fn kube_runtime_controller_reconciles_and_gc_follows() {
    let server = TestApiServer::start().await;
    let client = server.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let controller = kube::runtime::Controller::new(cms.clone(), watcher::Config::default())
        .owns(secrets.clone(), watcher::Config::default())
        .run(
            reconcile_configmap,
            |_, _, _| kube::runtime::controller::Action::requeue(Duration::from_millis(100)),
            std::sync::Arc::new(client.clone()),
        )
        .for_each(|_| async {});
    let task = tokio::spawn(controller);

    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"k": "v1"}})).unwrap();
    create(&cms, &cm).await;
    let store = server.store().clone();
    assert_eventually!(within STEP, {
        store.get::<Secret>(Some("default"), "cfg-secret").is_some()
    }, "the controller's Secret");
    let secret = store.get::<Secret>(Some("default"), "cfg-secret").unwrap();
    assert!(
        secret.string_data.is_none(),
        "stringData is folded into data"
    );
    assert_eq!(secret.data.clone().unwrap()["copied"].0, b"v1");
    let managers: Vec<String> = secret
        .metadata
        .managed_fields
        .unwrap_or_default()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, ["test-controller"]);

    within(cms.delete("cfg", &DeleteParams::default()))
        .await
        .unwrap();
    assert_eventually!(within STEP, {
        store.get::<Secret>(Some("default"), "cfg-secret").is_none()
    }, "the owned Secret collected");
    task.abort();
}

#[tokio::test]
async fn selector_watch_sees_objects_enter_and_leave() {
    let server = TestApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    let mut stream = within(api.watch(&WatchParams::default().labels("app=web").timeout(30), "0"))
        .await
        .unwrap()
        .boxed();
    within(api.create(
        &PostParams::default(),
        &service("s", json!({"app": "db"}), 80),
    ))
    .await
    .unwrap();
    let relabel = |app: &str| {
        let api = api.clone();
        let patch = Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
        async move {
            within(api.patch("s", &PatchParams::default(), &patch))
                .await
                .unwrap()
        }
    };
    relabel("web").await;
    relabel("db").await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match within(stream.next()).await.unwrap().unwrap() {
            WatchEvent::Added(s) => seen.push(("ADDED", s.labels()["app"].clone())),
            WatchEvent::Deleted(s) => seen.push(("DELETED", s.labels()["app"].clone())),
            WatchEvent::Modified(s) => seen.push(("MODIFIED", s.labels()["app"].clone())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    assert_eq!(
        seen,
        [("ADDED", "web".to_owned()), ("DELETED", "db".to_owned())]
    );
}

#[tokio::test]
async fn stop_ends_open_watches_and_refuses_connections() {
    let server = TestApiServer::start().await;
    let api: Api<Service> = Api::namespaced(server.client(), "default");
    let mut stream = within(api.watch(&WatchParams::default().timeout(290), "0"))
        .await
        .unwrap()
        .boxed();
    server.stop().await;
    // The stream ends, or reports the broken connection; it does not hang.
    match within(stream.next()).await {
        None | Some(Err(_)) => {}
        Some(Ok(event)) => panic!("unexpected event after stop: {event:?}"),
    }
    let refused = within(tokio::net::TcpStream::connect(server.addr())).await;
    assert!(refused.is_err(), "the port is closed while stopped");
    server.restart().await.unwrap();
    assert!(within(api.list(&ListParams::default())).await.is_ok());
}

#[tokio::test]
async fn kube_runtime_event_recorder_publishes() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let server = TestApiServer::start().await;
    let client = server.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "cfg"}})).unwrap();
    let cm = create(&cms, &cm).await;
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "test-controller".into(),
            instance: None,
        },
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "Synced".into(),
        note: Some("all good".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    // The second publish of the same event patches its series.
    for _ in 0..2 {
        within(recorder.publish(&event, &cm.object_ref(&())))
            .await
            .unwrap();
    }
    let events = server
        .store()
        .list::<k8s_openapi::api::events::v1::Event>(Some("default"));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason.as_deref(), Some("Synced"));
}
