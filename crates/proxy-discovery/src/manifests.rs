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
/// (`multicluster.isthmus.io/v1alpha1`).
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        ServiceMirrorResource::crd(),
        LinkResource::crd(),
        ClusterSettingsResource::crd(),
    ]
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
