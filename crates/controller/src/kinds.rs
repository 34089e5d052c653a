//! The edge between the API server's objects (k8s-openapi types and the CRD kinds
//! derived in proxy-discovery) and proxy-discovery's model, which the reconcile
//! speaks.
//!
//! Conversions go through the objects' JSON form, as both sides are the same
//! Kubernetes objects; the model keeps only what the mesh uses. This module does
//! not decide anything and does no I/O.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    ObjectMeta as KubeMeta, OwnerReference as KubeOwnerReference,
};
use kube::ResourceExt;
use proxy_discovery::model::{self, ObjectMeta, OwnerReference};

pub use proxy_discovery::model::{
    ClusterSettingsResource, LinkResource, LinkResourceSpec, ServiceMirrorApiStatus,
    ServiceMirrorResource,
};

/// A ServiceMirror as the controller watches it: one the model rejects is kept
/// as an error with its metadata, so it gets a status instead of stopping the
/// watch of every other mirror.
pub type MirrorObject = kube::core::DeserializeGuard<ServiceMirrorResource>;

/// The field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "isthmus-controller";

/// The condition type the controller publishes on every ServiceMirror.
pub const MIRRORED_CONDITION: &str = "Mirrored";

/// An object that cannot be put into the model's form.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The object's JSON does not fit the model (a field the model checks).
    #[error("{kind} {key}: {message}")]
    Invalid {
        /// `Service`, `ServiceMirror`, ...
        kind: &'static str,
        /// `namespace/name`.
        key: String,
        /// What the model rejected, naming the field.
        message: String,
    },
}

fn key_of(meta: &KubeMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace
            .as_deref()
            .unwrap_or(model::DEFAULT_NAMESPACE),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The model's `metadata` of an API object.
pub fn meta_to_model(meta: &KubeMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
        owner_references: meta
            .owner_references
            .iter()
            .flatten()
            .map(|o| OwnerReference {
                api_version: o.api_version.clone(),
                kind: o.kind.clone(),
                name: o.name.clone(),
                uid: Some(o.uid.clone()),
                controller: o.controller,
                block_owner_deletion: o.block_owner_deletion,
            })
            .collect(),
    }
}

/// An API `metadata` holding what the model's does (an owner without a uid gets
/// an empty one: the API server requires it, so the caller must have filled it).
pub fn meta_from_model(meta: &ObjectMeta) -> KubeMeta {
    let non_empty = |m: &BTreeMap<String, String>| (!m.is_empty()).then(|| m.clone());
    KubeMeta {
        name: Some(meta.name.clone()),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        labels: non_empty(&meta.labels),
        annotations: non_empty(&meta.annotations),
        owner_references: (!meta.owner_references.is_empty()).then(|| {
            meta.owner_references
                .iter()
                .map(|o| KubeOwnerReference {
                    api_version: o.api_version.clone(),
                    kind: o.kind.clone(),
                    name: o.name.clone(),
                    uid: o.uid.clone().unwrap_or_default(),
                    controller: o.controller,
                    block_owner_deletion: o.block_owner_deletion,
                })
                .collect()
        }),
        ..KubeMeta::default()
    }
}

/// The model's view of an API Service.
pub fn service_to_model(svc: &KubeService) -> Result<model::Service, ConvertError> {
    let invalid = |message: String| ConvertError::Invalid {
        kind: "Service",
        key: key_of(&svc.metadata),
        message,
    };
    let spec = match &svc.spec {
        Some(spec) => serde_json::to_value(spec)
            .and_then(serde_json::from_value)
            .map_err(|e| invalid(format!("spec: {e}")))?,
        None => model::ServiceSpec::default(),
    };
    Ok(model::Service {
        metadata: meta_to_model(&svc.metadata),
        spec,
    })
}

/// The API form of a model Service (what the controller applies).
pub fn service_from_model(svc: &model::Service) -> Result<KubeService, ConvertError> {
    let spec = serde_json::to_value(&svc.spec)
        .and_then(serde_json::from_value)
        .map_err(|e| ConvertError::Invalid {
            kind: "Service",
            key: format!("{}/{}", svc.metadata.namespace(), svc.metadata.name),
            message: format!("spec: {e}"),
        })?;
    Ok(KubeService {
        metadata: meta_from_model(&svc.metadata),
        spec: Some(spec),
        status: None,
    })
}

/// The model's view of an API ServiceMirror (status left out: the reconcile
/// computes it).
pub fn service_mirror_to_model(sm: &ServiceMirrorResource) -> model::ServiceMirror {
    model::ServiceMirror {
        metadata: meta_to_model(&sm.metadata),
        spec: sm.spec.clone(),
        status: None,
    }
}

/// The model's view of an API Link (credentials left out: only the controller
/// reads them).
pub fn link_to_model(link: &LinkResource) -> model::Link {
    model::Link {
        metadata: meta_to_model(&link.metadata),
        spec: link.spec.link.clone(),
    }
}

/// The model's view of an API ClusterSettings.
pub fn settings_to_model(settings: &ClusterSettingsResource) -> model::ClusterSettings {
    model::ClusterSettings {
        metadata: meta_to_model(&settings.metadata),
        spec: settings.spec.clone(),
    }
}

/// `namespace/name` of any API object, for logs and messages.
pub fn object_key<K: ResourceExt>(obj: &K) -> String {
    format!(
        "{}/{}",
        obj.namespace().as_deref().unwrap_or(""),
        obj.name_any()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_discovery::model::{ClusterIp, ServiceMirrorSpec};

    fn kube_service() -> KubeService {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "hello", "namespace": "default", "uid": "u1",
                "resourceVersion": "7", "labels": {"app": "hello"},
                "ownerReferences": [{"apiVersion": "linkerd.io/v1alpha1", "kind": "ServiceMirror",
                    "name": "hello", "uid": "m1", "controller": true, "blockOwnerDeletion": true}]},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "sessionAffinity": "None",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
            "status": {"loadBalancer": {}}
        }))
        .unwrap()
    }

    #[test]
    fn service_converts_both_ways_keeping_what_the_model_holds() {
        let svc = service_to_model(&kube_service()).unwrap();
        assert_eq!(svc.metadata.owner_references[0].uid.as_deref(), Some("m1"));
        assert_eq!(
            svc.spec.cluster_ip,
            Some(ClusterIp::Addr("10.96.0.10".parse().unwrap()))
        );
        assert_eq!(svc.spec.ports[0].port, 80);
        let back = service_from_model(&svc).unwrap();
        assert_eq!(service_to_model(&back).unwrap(), svc);
        let owner = &back.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.controller, owner.uid.as_str()), (Some(true), "m1"));
    }

    #[test]
    fn a_bad_port_names_the_service_and_field() {
        let mut svc = kube_service();
        svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 0;
        let err = service_to_model(&svc).unwrap_err().to_string();
        assert!(err.starts_with("Service default/hello: spec:"), "{err}");
    }

    #[test]
    fn the_seed_service_mirror_is_accepted_verbatim() {
        let seed = "apiVersion: linkerd.io/v1alpha1\nkind: ServiceMirror\nmetadata:\n  name: hello\nspec:\n  cluster: cluster-a\n  service:\n    name: hello\n    namespace: default\n";
        let sm: ServiceMirrorResource = serde_yaml_ng::from_str(seed).unwrap();
        let m = service_mirror_to_model(&sm);
        assert_eq!(m.spec.cluster.as_str(), "cluster-a");
        assert_eq!(m.remote_namespace(), "default");
        let spec: ServiceMirrorSpec = serde_json::from_value(serde_json::json!({
            "cluster": "cluster-a", "service": {"name": "hello", "namespace": "default"}}))
        .unwrap();
        assert_eq!(sm.spec, spec);
    }

    #[test]
    fn a_link_carries_credentials_beside_the_model_fields() {
        let link: LinkResource = serde_json::from_value(serde_json::json!({
            "apiVersion": "multicluster.isthmus.io/v1alpha1", "kind": "Link",
            "metadata": {"name": "cluster-a", "namespace": "isthmus"},
            "spec": {"targetClusterName": "cluster-a", "gatewayAddress": "198.18.0.1",
                "gatewayIdentity": "spiffe://cluster-a.local/ns/isthmus/sa/gateway",
                "credentialsSecret": "cluster-a-kubeconfig"}
        }))
        .unwrap();
        assert_eq!(
            link.spec.credentials_secret.as_deref(),
            Some("cluster-a-kubeconfig")
        );
        let m = link_to_model(&link);
        assert_eq!(m.spec.gateway_port, model::DEFAULT_GATEWAY_PORT);
        // The model's form, as a sidecar reads it, has no credentials.
        let text = serde_json::to_string(&m).unwrap();
        assert!(!text.contains("credentials"), "{text}");
        let again: LinkResourceSpec =
            serde_json::from_value(serde_json::to_value(&link.spec).unwrap()).unwrap();
        assert_eq!(again, link.spec);
    }
}
