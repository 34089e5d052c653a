//! What installing the controller takes: the CRDs, generated from the mesh kinds'
//! Rust types, and the RBAC objects granting exactly the API calls the controller
//! makes.
//!
//! Both are returned as k8s-openapi objects, for `isthmus install` to render, and
//! as YAML for the controller's `crds` and `rbac` commands and the checked-in
//! `deploy/` files. They live beside the kinds rather than in the controller so
//! that the operator CLI renders them without linking the controller's runtime.
//! Applying them is not this module's business.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResourceExt;
use serde::Serialize;

use crate::model::{ClusterSettingsResource, LinkResource, ServiceMirrorResource};

/// The name of the controller's ServiceAccount, roles and bindings.
pub const NAME: &str = "isthmus-controller";

/// The CRDs of the mesh's kinds: `ServiceMirror` (`linkerd.io/v1alpha1`, as the
/// seed has it, with a status subresource), `Link` and `ClusterSettings`
/// (`multicluster.isthmus.io/v1alpha1`), as `kubectl` shows them: short names, an
/// AGE column, and descriptions in plain text (`kubectl explain` prints rustdoc's
/// backticks and link brackets as they are).
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        for_kubectl(
            ServiceMirrorResource::crd(),
            &["sm"],
            "A Service of another cluster, made reachable here: a local Service of the \
             same name, routed through the mesh to the cluster a Link names. Annotations \
             set its HTTP requests' policy: timeout.isthmus.io/request (to the response \
             head; 504 past it), timeout.isthmus.io/response (to the response's end), \
             retry.isthmus.io/limit (retries, default 2), retry.isthmus.io/timeout (per \
             attempt), retry.isthmus.io/http (statuses retried: 5xx, gateway-error, \
             503, 500-504), retry.isthmus.io/any-method (true: retry any method).",
            &[(
                "Status",
                ".status.conditions[?(@.type==\"Mirrored\")].status",
            )],
        ),
        for_kubectl(
            LinkResource::crd(),
            &["lnk"],
            "A peer cluster: its gateway, the identity that gateway presents, and the \
             credentials for its API server.",
            &[],
        ),
        for_kubectl(
            ClusterSettingsResource::crd(),
            &[],
            "This cluster's settings in the mesh: its name, trust domain, exported \
             namespaces and gateway.",
            &[],
        ),
    ]
}

/// `crd` with `short_names`, a description of the kind, plain-text descriptions,
/// `columns` (name, JSON path) and an AGE column last (as kubectl's own kinds).
fn for_kubectl(
    mut crd: CustomResourceDefinition,
    short_names: &[&str],
    description: &str,
    columns: &[(&str, &str)],
) -> CustomResourceDefinition {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceColumnDefinition as Column;
    if !short_names.is_empty() {
        crd.spec.names.short_names = Some(short_names.iter().map(|s| (*s).to_owned()).collect());
    }
    for version in &mut crd.spec.versions {
        let printed = version
            .additional_printer_columns
            .get_or_insert_with(Vec::new);
        let column = |name: &str, type_: &str, json_path: &str| Column {
            name: name.to_owned(),
            type_: type_.to_owned(),
            json_path: json_path.to_owned(),
            ..Column::default()
        };
        for (name, path) in columns {
            printed.push(column(name, "string", path));
        }
        printed.push(column("Age", "date", ".metadata.creationTimestamp"));
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            schema.description = Some(description.to_owned());
            let mut json = serde_json::to_value(&*schema).unwrap_or_default();
            plain_descriptions(&mut json);
            if let Ok(plain) = serde_json::from_value(json) {
                *schema = plain;
            }
        }
    }
    crd
}

/// Every `description` under `value` without rustdoc's markup.
fn plain_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(text) if key == "description" => {
                        *text = plain(text);
                    }
                    _ => plain_descriptions(v),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(plain_descriptions),
        _ => {}
    }
}

/// `text` without backticks, and with `[x]`, `[`x`]` and `[x](target)` links
/// written as `x`.
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        match c {
            '`' => {}
            '[' => match rest.find(']') {
                Some(end) => {
                    out.push_str(&plain(&rest[..end]));
                    rest = &rest[end + 1..];
                    if let Some(target) = rest.strip_prefix('(') {
                        rest = target.find(')').map_or(rest, |close| &target[close + 1..]);
                    }
                }
                None => out.push(c),
            },
            _ => out.push(c),
        }
    }
    out
}

/// The controller's identity and permissions, for a controller running in
/// `namespace` (its control-plane namespace, where Links, their Secrets, the
/// ClusterSettings, the Lease and the published ConfigMap live).
#[derive(Debug, Clone, PartialEq)]
pub struct Rbac {
    /// `isthmus-controller` in `namespace`.
    pub service_account: ServiceAccount,
    /// What the controller does in every namespace: ServiceMirrors and Services.
    pub cluster_role: ClusterRole,
    /// Binds [`Rbac::cluster_role`] to the ServiceAccount.
    pub cluster_role_binding: ClusterRoleBinding,
    /// What the controller does in its own namespace only.
    pub role: Role,
    /// Binds [`Rbac::role`] to the ServiceAccount.
    pub role_binding: RoleBinding,
}

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// The RBAC objects for a controller in `namespace`.
///
/// Cluster-wide: ServiceMirrors get/list/watch, their status patch; Services
/// get/list/watch, create/patch (server-side apply of mirrored Services, which
/// creates them) and delete (of a mirrored Service whose mirror now refuses). In
/// `namespace`: Links list/watch, ClusterSettings get, Secrets get (the Links'
/// kubeconfigs), ConfigMaps create/patch (server-side apply of the sidecars'
/// discovery ConfigMap), Leases get/create/update (leader election).
pub fn rbac(namespace: &str) -> Rbac {
    let meta = |ns: Option<&str>| ObjectMeta {
        name: Some(NAME.to_owned()),
        namespace: ns.map(str::to_owned),
        labels: Some([("app.kubernetes.io/name".to_owned(), NAME.to_owned())].into()),
        ..ObjectMeta::default()
    };
    let subject = Subject {
        kind: "ServiceAccount".to_owned(),
        name: NAME.to_owned(),
        namespace: Some(namespace.to_owned()),
        ..Subject::default()
    };
    Rbac {
        service_account: ServiceAccount {
            metadata: meta(Some(namespace)),
            ..ServiceAccount::default()
        },
        cluster_role: ClusterRole {
            metadata: meta(None),
            rules: Some(vec![
                rule("linkerd.io", &["servicemirrors"], &["get", "list", "watch"]),
                rule("linkerd.io", &["servicemirrors/status"], &["patch"]),
                rule(
                    "",
                    &["services"],
                    &["get", "list", "watch", "create", "patch", "delete"],
                ),
                // The discovery ConfigMap goes into every namespace, so that any
                // pod can mount it.
                rule("", &["namespaces"], &["list", "watch"]),
                rule("", &["configmaps"], &["create", "patch"]),
                // Events on ServiceMirrors (kube-runtime's recorder).
                rule("events.k8s.io", &["events"], &["create", "patch"]),
            ]),
            ..ClusterRole::default()
        },
        cluster_role_binding: ClusterRoleBinding {
            metadata: meta(None),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".to_owned(),
                kind: "ClusterRole".to_owned(),
                name: NAME.to_owned(),
            },
            subjects: Some(vec![subject.clone()]),
        },
        role: Role {
            metadata: meta(Some(namespace)),
            rules: Some(vec![
                rule("multicluster.isthmus.io", &["links"], &["list", "watch"]),
                rule("multicluster.isthmus.io", &["clustersettings"], &["get"]),
                rule("", &["secrets"], &["get"]),
                rule(
                    "coordination.k8s.io",
                    &["leases"],
                    &["get", "create", "update"],
                ),
            ]),
        },
        role_binding: RoleBinding {
            metadata: meta(Some(namespace)),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".to_owned(),
                kind: "Role".to_owned(),
                name: NAME.to_owned(),
            },
            subjects: Some(vec![subject]),
        },
    }
}

/// What the credentials in a Link's Secret need in the remote cluster: read its
/// Services, and list its ClusterSettings (which namespaces it exports, its DNS
/// domain). Install it there and bind it to the identity of the kubeconfig.
pub fn remote_reader_role() -> ClusterRole {
    ClusterRole {
        metadata: ObjectMeta {
            name: Some(format!("{NAME}-remote-reader")),
            ..ObjectMeta::default()
        },
        rules: Some(vec![
            rule("", &["services"], &["get", "list", "watch"]),
            rule("multicluster.isthmus.io", &["clustersettings"], &["list"]),
        ]),
        ..ClusterRole::default()
    }
}

/// Errors rendering manifests.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// An object did not serialise to YAML.
    #[error("cannot render {what} as YAML")]
    Yaml {
        /// Which object.
        what: String,
        /// Why.
        #[source]
        source: serde_yaml_ng::Error,
    },
}

fn yaml_docs<T: Serialize>(objects: &[(String, &T)]) -> Result<String, RenderError> {
    let mut out = String::new();
    for (what, obj) in objects {
        out.push_str("---\n");
        out.push_str(
            &crate::kubectl_yaml::to_string(obj).map_err(|source| RenderError::Yaml {
                what: what.clone(),
                source,
            })?,
        );
    }
    Ok(out)
}

/// [`crds`] as multi-document YAML (what `isthmus-controller crds` prints and
/// `deploy/crds.yaml` holds).
pub fn crds_yaml() -> Result<String, RenderError> {
    let crds = crds();
    let docs: Vec<(String, &CustomResourceDefinition)> = crds
        .iter()
        .map(|c| {
            (
                format!("CRD {}", c.metadata.name.as_deref().unwrap_or("")),
                c,
            )
        })
        .collect();
    yaml_docs(&docs)
}

/// [`rbac`] and [`remote_reader_role`] as multi-document YAML (what
/// `isthmus-controller rbac` prints and `deploy/controller-rbac.yaml` holds for
/// namespace `isthmus`).
pub fn rbac_yaml(namespace: &str) -> Result<String, RenderError> {
    let r = rbac(namespace);
    let mut out = yaml_docs(&[("ServiceAccount".to_owned(), &r.service_account)])?;
    out += &yaml_docs(&[("ClusterRole".to_owned(), &r.cluster_role)])?;
    out += &yaml_docs(&[("ClusterRoleBinding".to_owned(), &r.cluster_role_binding)])?;
    out += &yaml_docs(&[("Role".to_owned(), &r.role)])?;
    out += &yaml_docs(&[("RoleBinding".to_owned(), &r.role_binding)])?;
    out += &yaml_docs(&[("remote ClusterRole".to_owned(), &remote_reader_role())])?;
    Ok(out)
}
