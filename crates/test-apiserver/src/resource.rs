//! The resource types the server knows: the built-in table, custom resources
//! registered by the builder or by creating a CustomResourceDefinition, and the
//! discovery documents (`/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`)
//! built from them.
//!
//! Not here: storage (see `store`) and routing (see `server`).

use serde_json::{Value, json};

/// One servable resource: `(group, version, plural)` plus what the REST layer
/// needs to know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group, empty for the core group.
    pub group: String,
    /// API version within the group (`v1`, `v1alpha1`).
    pub version: String,
    /// Lower-case plural used in URLs (`services`).
    pub plural: String,
    /// Kind of the objects (`Service`).
    pub kind: String,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether `/status` is a subresource: writes to the main resource then
    /// ignore `.status`, and writes to `/status` ignore everything else.
    pub status_subresource: bool,
}

impl ResourceType {
    /// A resource type without a status subresource.
    pub fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
            kind: kind.to_owned(),
            namespaced,
            status_subresource: false,
        }
    }

    /// The same type with a `/status` subresource.
    pub fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    /// The type of a kube-rs resource (k8s-openapi or `#[derive(CustomResource)]`),
    /// taking the scope from `namespaced`.
    pub fn of<K: kube::Resource<DynamicType = ()>>(namespaced: bool) -> Self {
        Self::new(
            &K::group(&()),
            &K::version(&()),
            &K::plural(&()),
            &K::kind(&()),
            namespaced,
        )
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name of a list of these objects.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub(crate) fn same_resource(&self, group: &str, plural: &str) -> bool {
        self.group == group && self.plural == plural
    }
}

/// The built-in types served by every server.
pub(crate) fn builtin() -> Vec<ResourceType> {
    let core = |plural: &str, kind: &str, namespaced: bool| {
        ResourceType::new("", "v1", plural, kind, namespaced)
    };
    vec![
        core("services", "Service", true).with_status(),
        core("endpoints", "Endpoints", true),
        core("secrets", "Secret", true),
        core("configmaps", "ConfigMap", true),
        core("namespaces", "Namespace", false).with_status(),
        core("serviceaccounts", "ServiceAccount", true),
        core("pods", "Pod", true).with_status(),
        core("nodes", "Node", false).with_status(),
        core("events", "Event", true),
        ResourceType::new("events.k8s.io", "v1", "events", "Event", true),
        ResourceType::new(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
        ),
        ResourceType::new("coordination.k8s.io", "v1", "leases", "Lease", true),
        ResourceType::new("apps", "v1", "deployments", "Deployment", true).with_status(),
        ResourceType::new("apps", "v1", "replicasets", "ReplicaSet", true).with_status(),
        ResourceType::new("apps", "v1", "daemonsets", "DaemonSet", true).with_status(),
        ResourceType::new("apps", "v1", "statefulsets", "StatefulSet", true).with_status(),
        ResourceType::new(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        )
        .with_status(),
        ResourceType::new("rbac.authorization.k8s.io", "v1", "roles", "Role", true),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
        ),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
        ),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
        ),
        ResourceType::new(
            "linkerd.io",
            "v1alpha1",
            "servicemirrors",
            "ServiceMirror",
            true,
        )
        .with_status(),
        ResourceType::new("multicluster.isthmus.io", "v1alpha1", "links", "Link", true)
            .with_status(),
    ]
}

/// The types a CustomResourceDefinition object declares (one per served
/// version), or `None` when it lacks the fields that name them.
pub(crate) fn from_crd(crd: &Value) -> Option<Vec<ResourceType>> {
    let spec = crd.get("spec")?;
    let group = spec.get("group")?.as_str()?;
    let names = spec.get("names")?;
    let plural = names.get("plural")?.as_str()?;
    let kind = names.get("kind")?.as_str()?;
    let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
    let versions = spec.get("versions")?.as_array()?;
    let types = versions
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
        .filter_map(|v| {
            let version = v.get("name")?.as_str()?;
            let mut t = ResourceType::new(group, version, plural, kind, namespaced);
            t.status_subresource = v.pointer("/subresources/status").is_some();
            Some(t)
        })
        .collect();
    Some(types)
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `/version`.
pub(crate) fn version_doc() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`.
pub(crate) fn core_versions_doc(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_versions(types: &[ResourceType], group: &str) -> Vec<String> {
    let mut versions: Vec<String> = Vec::new();
    for t in types.iter().filter(|t| t.group == group) {
        if !versions.contains(&t.version) {
            versions.push(t.version.clone());
        }
    }
    versions
}

fn group_doc(types: &[ResourceType], group: &str) -> Value {
    let versions: Vec<Value> = group_versions(types, group)
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({"name": group, "versions": versions, "preferredVersion": preferred})
}

/// `/apis`.
pub(crate) fn group_list_doc(types: &[ResourceType]) -> Value {
    let mut groups: Vec<&str> = Vec::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        if !groups.contains(&t.group.as_str()) {
            groups.push(&t.group);
        }
    }
    let groups: Vec<Value> = groups.iter().map(|g| group_doc(types, g)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`, or `None` when no type is in that group.
pub(crate) fn group_single_doc(types: &[ResourceType], group: &str) -> Option<Value> {
    if !types.iter().any(|t| t.group == group) {
        return None;
    }
    let mut doc = group_doc(types, group);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// `/api/v1` or `/apis/{group}/{version}`, or `None` when nothing is served there.
pub(crate) fn resource_list_doc(
    types: &[ResourceType],
    group: &str,
    version: &str,
) -> Option<Value> {
    let mut resources = Vec::new();
    for t in types
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        resources.push(json!({
            "name": t.plural,
            "singularName": t.kind.to_lowercase(),
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": VERBS,
        }));
        if t.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// Aggregated discovery (`apidiscovery.k8s.io/v2` `APIGroupDiscoveryList`) of the
/// core group (`core`) or of every named group, as `/api` and `/apis` answer
/// clients that ask for it in `Accept`.
pub(crate) fn aggregated_doc(types: &[ResourceType], core: bool) -> Value {
    let mut groups: Vec<&str> = Vec::new();
    for t in types.iter().filter(|t| t.group.is_empty() == core) {
        if !groups.contains(&t.group.as_str()) {
            groups.push(&t.group);
        }
    }
    let items: Vec<Value> = groups
        .iter()
        .map(|group| {
            let versions: Vec<Value> = group_versions(types, group)
                .iter()
                .map(|version| {
                    let resources: Vec<Value> = types
                        .iter()
                        .filter(|t| t.group == *group && t.version == *version)
                        .map(|t| {
                            let gvk =
                                json!({"group": t.group, "version": t.version, "kind": t.kind});
                            let subresources: Vec<Value> = if t.status_subresource {
                                vec![json!({"subresource": "status", "responseKind": gvk,
                                            "verbs": ["get", "patch", "update"]})]
                            } else {
                                Vec::new()
                            };
                            json!({
                                "resource": t.plural,
                                "responseKind": gvk,
                                "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": t.kind.to_lowercase(),
                                "verbs": VERBS,
                                "subresources": subresources,
                            })
                        })
                        .collect();
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": group}, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}
