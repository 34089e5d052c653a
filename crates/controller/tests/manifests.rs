//! The checked-in `deploy/` files are what the code generates, parse as
//! Kubernetes objects, and the RBAC grants exactly the calls the controller makes.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use isthmus_controller::kinds::ServiceMirrorResource;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use proxy_discovery::manifests::{self, NAME};
use serde::Deserialize;

fn deploy(file: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

fn docs(text: &str) -> Vec<serde_yaml_ng::Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_yaml_ng::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn deploy_crds_are_what_the_code_generates() {
    let (path, text) = deploy("crds.yaml");
    assert!(
        text == manifests::crds_yaml().unwrap(),
        "{} differs from the CRDs the Rust kinds generate; regenerate it with\n  cargo run -p isthmus-controller -- crds > deploy/crds.yaml",
        path.display()
    );
}

/// Every `description` under `value`, with where it is.
fn descriptions(value: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match v {
                    serde_json::Value::String(text) if key == "description" => {
                        out.push((at.to_owned(), text.clone()));
                    }
                    _ => descriptions(v, &format!("{at}.{key}"), out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                descriptions(v, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn crds_read_well_in_kubectl() {
    for crd in manifests::crds() {
        let kind = crd.spec.names.kind.clone();
        let json = serde_json::to_value(&crd).unwrap();
        let mut found = Vec::new();
        descriptions(&json, &kind, &mut found);
        assert!(
            found.len() > 5,
            "{kind}: its fields lost their descriptions"
        );
        for (at, text) in &found {
            assert!(
                !text.contains('`') && !text.contains('[') && !text.contains("Auto-generated"),
                "{at}: the description {text:?} is rustdoc, not what kubectl explain should print"
            );
        }
        for version in &crd.spec.versions {
            let columns: Vec<_> = version
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| (c.name.as_str(), c.json_path.as_str()))
                .collect();
            assert_eq!(
                columns.last(),
                Some(&("Age", ".metadata.creationTimestamp")),
                "{kind}: no AGE column last"
            );
        }
        let short = crd.spec.names.short_names.clone().unwrap_or_default();
        match kind.as_str() {
            "ServiceMirror" => {
                assert_eq!(short, ["sm"]);
                let columns: Vec<_> = crd.spec.versions[0]
                    .additional_printer_columns
                    .iter()
                    .flatten()
                    .map(|c| c.name.as_str())
                    .collect();
                for wanted in ["Cluster", "Service", "Status"] {
                    assert!(columns.contains(&wanted), "ServiceMirror lacks {wanted}");
                }
            }
            "Link" => assert_eq!(short, ["lnk"]),
            _ => {}
        }
    }
    assert_eq!(
        manifests::plain("see [`Link`] and [the docs](https://x/y) for `a`"),
        "see Link and the docs for a"
    );
}

#[test]
fn deploy_rbac_is_what_the_code_generates() {
    let (path, text) = deploy("controller-rbac.yaml");
    assert!(
        text == manifests::rbac_yaml("isthmus").unwrap(),
        "{} differs from the RBAC the code generates; regenerate it with\n  cargo run -p isthmus-controller -- rbac --namespace isthmus > deploy/controller-rbac.yaml",
        path.display()
    );
}

#[test]
fn crds_parse_as_kubernetes_objects_and_accept_the_seed() {
    let (_, text) = deploy("crds.yaml");
    let crds: Vec<CustomResourceDefinition> = docs(&text)
        .into_iter()
        .map(|d| serde_yaml_ng::from_value(d).unwrap())
        .collect();
    let names: Vec<_> = crds
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "servicemirrors.linkerd.io",
            "links.multicluster.isthmus.io",
            "clustersettings.multicluster.isthmus.io"
        ]
    );
    let sm = &crds[0];
    assert_eq!(sm.spec.group, "linkerd.io");
    assert_eq!(sm.spec.names.kind, "ServiceMirror");
    assert_eq!(sm.spec.scope, "Namespaced");
    let v = &sm.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(
        v.subresources.as_ref().unwrap().status.is_some(),
        "status subresource"
    );
    let schema = v
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    let spec = &schema.properties.as_ref().unwrap()["spec"];
    let props = spec.properties.as_ref().unwrap();
    assert_eq!(props.keys().collect::<Vec<_>>(), ["cluster", "service"]);
    let service = props["service"].properties.as_ref().unwrap();
    assert_eq!(service.keys().collect::<Vec<_>>(), ["name", "namespace"]);

    let link = &crds[1];
    let spec = &link.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap()
        .properties
        .as_ref()
        .unwrap()["spec"];
    let fields: BTreeSet<&str> = spec
        .properties
        .as_ref()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "targetClusterName",
            "gatewayAddress",
            "gatewayPort",
            "gatewayIdentity",
            "probeSpec",
            "credentialsSecret"
        ])
    );

    // The seed's ServiceMirror, verbatim, is an object of the kind.
    let seed =
        include_str!("../../proxy-discovery/tests/fixtures/seed/cluster-b-servicemirror.yaml");
    let sm: ServiceMirrorResource = serde_yaml_ng::from_str(seed).unwrap();
    assert_eq!(
        (sm.spec.cluster.as_str(), sm.spec.service.name.as_str()),
        ("cluster-a", "hello")
    );
}

/// Every API call the controller makes: (API group, resource, verb, scope).
/// `cluster` means in any namespace (ClusterRole), `namespace` only in its own
/// (Role).
const CALLS: &[(&str, &str, &str, &str)] = &[
    // events.rs: kube-runtime's recorder creates an event, and patches it when
    // the same one recurs.
    ("events.k8s.io", "events", "create", "cluster"),
    ("events.k8s.io", "events", "patch", "cluster"),
    // run.rs: the Controller's list+watch of ServiceMirrors; mirror.rs: a live
    // get before creating a Service for one or deleting an orphan; status patch.
    ("linkerd.io", "servicemirrors", "get", "cluster"),
    ("linkerd.io", "servicemirrors", "list", "cluster"),
    ("linkerd.io", "servicemirrors", "watch", "cluster"),
    ("linkerd.io", "servicemirrors/status", "patch", "cluster"),
    // run.rs: the Service reflector; mirror.rs: get before apply, apply (patch,
    // which creates a new one), delete of an owned Service.
    ("", "services", "list", "cluster"),
    ("", "services", "watch", "cluster"),
    ("", "services", "get", "cluster"),
    ("", "services", "patch", "cluster"),
    ("", "services", "create", "cluster"),
    ("", "services", "delete", "cluster"),
    // run.rs: the Link reflector; mirror.rs: ClusterSettings get; remote.rs:
    // the Link's Secret get.
    ("multicluster.isthmus.io", "links", "list", "namespace"),
    ("multicluster.isthmus.io", "links", "watch", "namespace"),
    (
        "multicluster.isthmus.io",
        "clustersettings",
        "get",
        "namespace",
    ),
    ("", "secrets", "get", "namespace"),
    // run.rs: the namespace reflector; publish.rs: server-side apply of the
    // ConfigMap in every namespace (creates it the first time).
    ("", "namespaces", "list", "cluster"),
    ("", "namespaces", "watch", "cluster"),
    ("", "configmaps", "patch", "cluster"),
    ("", "configmaps", "create", "cluster"),
    // lease.rs: get, create, replace (update).
    ("coordination.k8s.io", "leases", "get", "namespace"),
    ("coordination.k8s.io", "leases", "create", "namespace"),
    ("coordination.k8s.io", "leases", "update", "namespace"),
];

fn grants(rules: &[PolicyRule], scope: &str) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    assert_ne!(v, "*", "no wildcard verbs");
                    assert_ne!(res, "*", "no wildcard resources");
                    out.insert((g.clone(), res.clone(), v.clone(), scope.to_owned()));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_parses_and_grants_exactly_the_calls() {
    let (_, text) = deploy("controller-rbac.yaml");
    let docs = docs(&text);
    assert_eq!(docs.len(), 6);
    let sa: ServiceAccount = serde_yaml_ng::from_value(docs[0].clone()).unwrap();
    let cr: ClusterRole = serde_yaml_ng::from_value(docs[1].clone()).unwrap();
    let crb: ClusterRoleBinding = serde_yaml_ng::from_value(docs[2].clone()).unwrap();
    let role: Role = serde_yaml_ng::from_value(docs[3].clone()).unwrap();
    let rb: RoleBinding = serde_yaml_ng::from_value(docs[4].clone()).unwrap();
    let remote: ClusterRole = serde_yaml_ng::from_value(docs[5].clone()).unwrap();

    assert_eq!(sa.metadata.namespace.as_deref(), Some("isthmus"));
    for (binding_ref, subjects) in [(&crb.role_ref, &crb.subjects), (&rb.role_ref, &rb.subjects)] {
        assert_eq!(binding_ref.name, NAME);
        let s = &subjects.as_ref().unwrap()[0];
        assert_eq!(
            (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
            ("ServiceAccount", NAME, Some("isthmus"))
        );
    }
    assert_eq!(crb.role_ref.kind, "ClusterRole");
    assert_eq!(
        (rb.role_ref.kind.as_str(), rb.metadata.namespace.as_deref()),
        ("Role", Some("isthmus"))
    );
    assert_eq!(role.metadata.namespace.as_deref(), Some("isthmus"));

    let mut granted = grants(cr.rules.as_deref().unwrap(), "cluster");
    granted.extend(grants(role.rules.as_deref().unwrap(), "namespace"));
    let wanted: BTreeSet<_> = CALLS
        .iter()
        .map(|(g, r, v, s)| {
            (
                (*g).to_owned(),
                (*r).to_owned(),
                (*v).to_owned(),
                (*s).to_owned(),
            )
        })
        .collect();
    assert_eq!(granted, wanted);

    // The remote cluster only needs to let the Link's identity read Services
    // (remote.rs: the watch, list and the probe's get) and list ClusterSettings.
    let remote = grants(remote.rules.as_deref().unwrap(), "cluster");
    let mut expected: BTreeSet<_> = ["get", "list", "watch"]
        .iter()
        .map(|v| {
            (
                String::new(),
                "services".to_owned(),
                (*v).to_owned(),
                "cluster".to_owned(),
            )
        })
        .collect();
    expected.insert((
        "multicluster.isthmus.io".to_owned(),
        "clustersettings".to_owned(),
        "list".to_owned(),
        "cluster".to_owned(),
    ));
    assert_eq!(remote, expected);

    // The library's objects are the file's.
    let r = manifests::rbac("isthmus");
    assert_eq!((r.cluster_role, r.role), (cr, role));
}
