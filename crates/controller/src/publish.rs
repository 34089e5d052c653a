//! The sidecars' view: a ConfigMap whose keys are manifest files that
//! `proxy_discovery::source::dir::DirSource` loads unchanged when the ConfigMap is
//! mounted as a directory, so sidecars learn mirrored ClusterIPs without watching
//! the API server.
//!
//! The data: `cluster.yaml` (this cluster's ClusterSettings: name, trust domain,
//! gateway address and identity), `links.yaml` (the Links, without credentials),
//! `mirrored-services.yaml` (every mirrored Service with its ClusterIPs, ports,
//! and the labels and annotations naming the remote cluster and authority). The
//! mirrored Services are written without their owner references: a sidecar's
//! directory has no ServiceMirrors, and the directory source would otherwise
//! take them for orphans. The ConfigMap is rendered from what is in the cluster
//! (the Services the controller applied), not from intentions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Service as KubeService};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta as KubeMeta;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use proxy_discovery::model::{
    ClusterSettings, Link, MIRRORED_SERVICE_LABEL, Service, ServiceMirror,
};
use serde::Serialize;

use crate::kinds::{self, FIELD_MANAGER, LinkResource};

/// The key holding the ClusterSettings.
pub const SETTINGS_KEY: &str = "cluster.yaml";
/// The key holding the Links.
pub const LINKS_KEY: &str = "links.yaml";
/// The key holding the mirrored Services.
pub const SERVICES_KEY: &str = "mirrored-services.yaml";

/// Errors rendering or writing the ConfigMap.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// An object did not render as YAML.
    #[error("ConfigMap {configmap}: cannot render {what}")]
    Render {
        /// `namespace/name` of the ConfigMap.
        configmap: String,
        /// Which object.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Writing it failed.
    #[error("ConfigMap {configmap}: apply failed")]
    Apply {
        /// `namespace/name` of the ConfigMap.
        configmap: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
}

fn manifest<T: Serialize>(
    api_version: &str,
    kind: &str,
    obj: &T,
    configmap: &str,
    what: String,
) -> Result<String, PublishError> {
    let render = |source: Box<dyn std::error::Error + Send + Sync>| PublishError::Render {
        configmap: configmap.to_owned(),
        what: what.clone(),
        source,
    };
    let mut value = serde_json::to_value(obj).map_err(|e| render(Box::new(e)))?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".to_owned(), api_version.into());
        map.insert("kind".to_owned(), kind.into());
    }
    let text = serde_yaml_ng::to_string(&value).map_err(|e| render(Box::new(e)))?;
    Ok(format!("---\n{text}"))
}

/// The ConfigMap data for `settings`, `links` and the mirrored Services among
/// `services` (Services carrying the mirrored-service label and an owner
/// reference to a ServiceMirror), in name order, so equal inputs give equal bytes.
pub fn render(
    configmap: &str,
    settings: &ClusterSettings,
    links: &[LinkResource],
    services: &[KubeService],
) -> Result<BTreeMap<String, String>, PublishError> {
    let mut data = BTreeMap::new();
    data.insert(
        SETTINGS_KEY.to_owned(),
        manifest(
            ClusterSettings::API_VERSION,
            ClusterSettings::KIND,
            &ClusterSettings {
                metadata: proxy_discovery::model::ObjectMeta {
                    uid: None,
                    ..settings.metadata.clone()
                },
                spec: settings.spec.clone(),
            },
            configmap,
            "ClusterSettings".to_owned(),
        )?,
    );

    let mut links: Vec<Link> = links.iter().map(kinds::link_to_model).collect();
    links.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut text = String::new();
    for mut link in links {
        link.metadata.uid = None;
        text += &manifest(
            Link::API_VERSION,
            Link::KIND,
            &link,
            configmap,
            format!("Link {}", link.metadata.name),
        )?;
    }
    data.insert(LINKS_KEY.to_owned(), text);

    let mut mirrored: Vec<Service> = services
        .iter()
        .filter_map(|s| kinds::service_to_model(s).ok())
        .filter(|s| {
            s.metadata.has_label(MIRRORED_SERVICE_LABEL, "true")
                && s.metadata
                    .owner_references
                    .iter()
                    .any(|o| o.kind == ServiceMirror::KIND)
        })
        .collect();
    mirrored.sort_by(|a, b| {
        (a.metadata.namespace(), &a.metadata.name).cmp(&(b.metadata.namespace(), &b.metadata.name))
    });
    let mut text = String::new();
    for mut svc in mirrored {
        svc.metadata.owner_references.clear();
        svc.metadata.uid = None;
        let what = format!("Service {}/{}", svc.metadata.namespace(), svc.metadata.name);
        text += &manifest(Service::API_VERSION, Service::KIND, &svc, configmap, what)?;
    }
    data.insert(SERVICES_KEY.to_owned(), text);
    Ok(data)
}

/// Writes the ConfigMap by server-side apply when its data changed since the
/// last write of this publisher.
pub struct Publisher {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
    last: Option<BTreeMap<String, String>>,
}

impl Publisher {
    /// A publisher of ConfigMap `namespace/name`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            last: None,
        }
    }

    /// `namespace/name` of the ConfigMap.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Renders from the stores and applies when different; `true` when written.
    pub async fn publish(
        &mut self,
        settings: &ClusterSettings,
        links: &Store<LinkResource>,
        services: &Store<KubeService>,
    ) -> Result<bool, PublishError> {
        let links: Vec<LinkResource> = links.state().iter().map(|l| (**l).clone()).collect();
        let services: Vec<KubeService> = services.state().iter().map(|s| (**s).clone()).collect();
        let data = render(&self.key(), settings, &links, &services)?;
        if self.last.as_ref() == Some(&data) {
            return Ok(false);
        }
        let cm = ConfigMap {
            metadata: KubeMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_owned(),
                        FIELD_MANAGER.to_owned(),
                    )]
                    .into(),
                ),
                ..KubeMeta::default()
            },
            data: Some(data.clone()),
            ..ConfigMap::default()
        };
        let mut value = serde_json::to_value(&cm).map_err(|e| PublishError::Render {
            configmap: self.key(),
            what: "the ConfigMap".to_owned(),
            source: Box::new(e),
        })?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "ConfigMap".into();
        // The ConfigMap is the controller's own: force takes back any field
        // someone edited by hand.
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await
            .map_err(|source| PublishError::Apply {
                configmap: self.key(),
                source,
            })?;
        self.last = Some(data);
        Ok(true)
    }
}
