//! Store semantics without HTTP: generation, no-op writes, event history and
//! 410, garbage collection with several owners, namespace and CRD cascades.

use serde_json::{Value, json};

use super::*;

fn store(history: usize) -> Store {
    Store::new(Vec::new(), history, ServiceRange::default())
}

fn cm(name: &str, extra: Value) -> Value {
    let mut obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": name, "namespace": "ns"}});
    merge_patch(&mut obj, &extra);
    obj
}

fn rv(obj: &Value) -> u64 {
    meta_str(obj, "resourceVersion")
        .and_then(|s| s.parse().ok())
        .expect("every stored object has a numeric resourceVersion")
}

fn opts() -> WriteOpts<'static> {
    WriteOpts {
        manager: "test",
        scope: Scope::Main {
            status_subresource: false,
        },
        force: false,
        dry_run: false,
    }
}

fn configmaps(s: &Store) -> ResourceType {
    s.resolve("", "v1", "configmaps").expect("built in")
}

#[test]
fn generation_follows_spec_and_noops_keep_the_version() {
    let s = store(100);
    let rt = configmaps(&s);
    let created = s
        .put_value(cm("a", json!({"data": {"k": "1"}})))
        .expect("put");
    assert_eq!(created["metadata"]["generation"], 1);

    let relabelled = s
        .patch(
            &rt,
            "ns",
            "a",
            PatchKind::Merge,
            json!({"metadata": {"labels": {"x": "y"}}}),
            &opts(),
        )
        .expect("patch");
    assert_eq!(
        relabelled["metadata"]["generation"], 1,
        "labels are not spec"
    );
    let changed = s
        .patch(
            &rt,
            "ns",
            "a",
            PatchKind::Merge,
            json!({"data": {"k": "2"}}),
            &opts(),
        )
        .expect("patch");
    assert_eq!(changed["metadata"]["generation"], 2);

    let again = s
        .patch(
            &rt,
            "ns",
            "a",
            PatchKind::Merge,
            json!({"data": {"k": "2"}}),
            &opts(),
        )
        .expect("patch");
    assert_eq!(rv(&again), rv(&changed), "a write that changes nothing");
    assert_eq!(s.resource_version(), rv(&changed));
}

#[test]
fn history_expiry_gives_gone() {
    let s = store(2);
    let rt = configmaps(&s);
    for name in ["a", "b", "c"] {
        s.put_value(cm(name, json!({}))).expect("put");
    }
    // rv 1 was dropped: resuming after it is fine, resuming from before it is not.
    assert!(s.events_after(&rt, None, 1).is_ok());
    assert_eq!(s.events_after(&rt, None, 0).expect_err("expired").code, 410);
    let (events, now) = s.events_after(&rt, Some("ns"), 1).expect("retained");
    assert_eq!(now, 3);
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.kind == EventKind::Added));
}

#[test]
fn a_dependent_goes_with_its_last_owner() {
    let s = store(100);
    let a = s.put_value(cm("a", json!({}))).expect("put");
    let b = s.put_value(cm("b", json!({}))).expect("put");
    let owner = |o: &Value| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
                                    "name": o["metadata"]["name"], "uid": o["metadata"]["uid"]})
    };
    s.put_value(cm(
        "dep",
        json!({"metadata": {"ownerReferences": [owner(&a), owner(&b)]}}),
    ))
    .expect("put");
    s.delete_value("v1", "ConfigMap", Some("ns"), "a")
        .expect("delete a");
    assert!(
        s.get_value("v1", "ConfigMap", Some("ns"), "dep").is_some(),
        "b still owns it"
    );
    s.delete_value("v1", "ConfigMap", Some("ns"), "b")
        .expect("delete b");
    assert!(s.get_value("v1", "ConfigMap", Some("ns"), "dep").is_none());
}

#[test]
fn orphan_propagation_keeps_dependents() {
    let s = store(100);
    let rt = configmaps(&s);
    let a = s.put_value(cm("a", json!({}))).expect("put");
    s.put_value(cm(
        "dep",
        json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
                                                 "name": "a", "uid": a["metadata"]["uid"]}]}}),
    ))
    .expect("put");
    let orphan = DeleteOpts {
        orphan: true,
        ..DeleteOpts::default()
    };
    s.delete(&rt, "ns", "a", &orphan).expect("delete");
    assert!(s.get_value("v1", "ConfigMap", Some("ns"), "dep").is_some());
}

#[test]
fn deleting_a_namespace_or_a_crd_removes_what_is_in_it() {
    let s = store(100);
    s.put_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}}))
        .expect("namespace");
    s.put_value(cm("a", json!({}))).expect("put");
    s.delete_value("v1", "Namespace", None, "ns")
        .expect("delete ns");
    assert!(s.list_value("v1", "ConfigMap", None).is_empty());

    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.example.io"},
        "spec": {"group": "example.io", "scope": "Namespaced",
                 "names": {"plural": "gadgets", "kind": "Gadget"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "subresources": {"status": {}}}]},
    });
    let stored = s.put_value(crd).expect("crd");
    assert_eq!(stored["status"]["conditions"][1]["type"], "Established");
    let rt = s
        .resolve("example.io", "v1", "gadgets")
        .expect("served after the CRD");
    assert!(rt.status_subresource);
    s.put_value(json!({"apiVersion": "example.io/v1", "kind": "Gadget",
                       "metadata": {"name": "g", "namespace": "x"}}))
        .expect("gadget");
    s.delete_value(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        None,
        "gadgets.example.io",
    )
    .expect("delete crd");
    assert!(s.resolve("example.io", "v1", "gadgets").is_none());
    assert!(s.list_value("example.io/v1", "Gadget", None).is_empty());
}

#[test]
fn dry_run_changes_nothing() {
    let s = store(100);
    s.put_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}}))
        .expect("namespace");
    let before = s.resource_version();
    let rt = configmaps(&s);
    let dry = WriteOpts {
        dry_run: true,
        ..opts()
    };
    let answered = s
        .create(&rt, "ns", cm("a", json!({})), &dry)
        .expect("dry create");
    assert_eq!(answered["metadata"]["name"], "a");
    assert_eq!(s.resource_version(), before);
    assert!(s.list_value("v1", "ConfigMap", None).is_empty());
}

#[test]
fn timestamps_are_rfc3339() {
    let t = now_rfc3339();
    assert_eq!(t.len(), 20, "{t}");
    assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    assert!(t.starts_with("20"), "{t}");
}
