//! [`ClusterView`]: the objects of one cluster, grouped and keyed, as a source has
//! read them. The local cluster and each linked cluster get one.
//!
//! Building a view checks what single documents cannot: one ClusterSettings per
//! cluster, no object defined twice, one Link per target cluster.

use std::collections::BTreeMap;

use isthmus_vocab::ClusterName;

use super::manifest::{Object, Origin, OtherObject, Parsed};
use super::{
    ClusterSettings, Deployment, EXPORTED_LABEL, EndpointSlice, Endpoints, Link,
    MIRRORED_SERVICE_LABEL, Pod, Service, ServiceMirror, ServiceRef,
};

/// Objects that cannot be put together into one cluster's view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// The same kind/namespace/name appears twice.
    #[error("{second}: {kind} {key} is already defined at {first}")]
    Duplicate {
        /// `Kind`.
        kind: String,
        /// `namespace/name`.
        key: String,
        /// Where it was first defined.
        first: Origin,
        /// Where it is defined again.
        second: Origin,
    },
    /// The cluster's name is given two ways that disagree.
    #[error(
        "{origin}: spec.clusterName: {found:?} does not match the cluster {expected:?} these manifests are for"
    )]
    ClusterMismatch {
        /// Where the ClusterSettings is.
        origin: Origin,
        /// The name it gives.
        found: ClusterName,
        /// The name the caller expects.
        expected: ClusterName,
    },
    /// Two Links name the same target cluster.
    #[error("{second}: spec.targetClusterName: cluster {cluster:?} is already linked at {first}")]
    DuplicateLink {
        /// The target cluster.
        cluster: ClusterName,
        /// The first Link.
        first: Origin,
        /// The second Link.
        second: Origin,
    },
    /// A Link points at the cluster itself.
    #[error("{origin}: spec.targetClusterName: a cluster cannot link to itself ({cluster:?})")]
    SelfLink {
        /// Where the Link is.
        origin: Origin,
        /// This cluster.
        cluster: ClusterName,
    },
}

/// What is known of one cluster: its settings and its objects, keyed by
/// `namespace/name` (ordered, so everything derived from a view is deterministic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// The cluster's settings (defaults when its manifests hold none).
    pub settings: ClusterSettings,
    /// Services.
    pub services: BTreeMap<ServiceRef, Service>,
    /// Endpoints, keyed like the Service they back.
    pub endpoints: BTreeMap<ServiceRef, Endpoints>,
    /// EndpointSlices, keyed by their own name.
    pub endpoint_slices: BTreeMap<ServiceRef, EndpointSlice>,
    /// Deployments.
    pub deployments: BTreeMap<ServiceRef, Deployment>,
    /// Pods (metadata only), keyed by `namespace/name`.
    pub pods: BTreeMap<ServiceRef, Pod>,
    /// ServiceMirrors (as read; the reconcile adds status).
    pub service_mirrors: BTreeMap<ServiceRef, ServiceMirror>,
    /// Links, keyed by target cluster.
    pub links: BTreeMap<ClusterName, Link>,
    /// Objects of kinds the mesh does not model.
    pub others: Vec<OtherObject>,
    /// Where each object was read, keyed by `(kind, namespace/name)`.
    pub origins: BTreeMap<(String, ServiceRef), Origin>,
}

impl ClusterView {
    /// A view with default settings and no objects.
    pub fn empty(cluster: ClusterName) -> Self {
        Self {
            settings: ClusterSettings::defaults(cluster),
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            endpoint_slices: BTreeMap::new(),
            deployments: BTreeMap::new(),
            pods: BTreeMap::new(),
            service_mirrors: BTreeMap::new(),
            links: BTreeMap::new(),
            others: Vec::new(),
            origins: BTreeMap::new(),
        }
    }

    /// Groups parsed objects into the view of cluster `cluster`.
    ///
    /// A ClusterSettings among them must name `cluster`; without one, the view gets
    /// [`ClusterSettings::defaults`].
    pub fn build(
        cluster: ClusterName,
        objects: impl IntoIterator<Item = Parsed>,
    ) -> Result<Self, ViewError> {
        let mut view = Self::empty(cluster.clone());
        let mut settings_seen = false;
        let mut link_origins: BTreeMap<ClusterName, Origin> = BTreeMap::new();
        for Parsed { origin, object } in objects {
            let kind = object.kind().to_owned();
            let (ns, name) = object.key();
            let key = ServiceRef::new(ns, name);
            if !matches!(object, Object::Other(_)) {
                if let Some(first) = view.origins.get(&(kind.clone(), key.clone())) {
                    return Err(ViewError::Duplicate {
                        kind,
                        key: key.to_string(),
                        first: first.clone(),
                        second: origin,
                    });
                }
                // One ClusterSettings per cluster, whatever its name.
                if let Object::ClusterSettings(_) = object
                    && settings_seen
                    && let Some((_, first)) = view
                        .origins
                        .iter()
                        .find(|((k, _), _)| k == ClusterSettings::KIND)
                {
                    return Err(ViewError::Duplicate {
                        kind,
                        key: "(one per cluster)".to_owned(),
                        first: first.clone(),
                        second: origin,
                    });
                }
                view.origins.insert((kind, key.clone()), origin.clone());
            }
            match object {
                Object::Service(o) => {
                    view.services.insert(key, o);
                }
                Object::Endpoints(o) => {
                    view.endpoints.insert(key, o);
                }
                Object::EndpointSlice(o) => {
                    view.endpoint_slices.insert(key, o);
                }
                Object::Deployment(o) => {
                    view.deployments.insert(key, o);
                }
                Object::Pod(o) => {
                    view.pods.insert(key, o);
                }
                Object::ServiceMirror(o) => {
                    view.service_mirrors.insert(key, o);
                }
                Object::Link(o) => {
                    let target = o.spec.target_cluster_name.clone();
                    if target == cluster {
                        return Err(ViewError::SelfLink { origin, cluster });
                    }
                    if let Some(first) = link_origins.get(&target) {
                        return Err(ViewError::DuplicateLink {
                            cluster: target,
                            first: first.clone(),
                            second: origin,
                        });
                    }
                    link_origins.insert(target.clone(), origin);
                    view.links.insert(target, o);
                }
                Object::ClusterSettings(o) => {
                    if o.spec.cluster_name != cluster {
                        return Err(ViewError::ClusterMismatch {
                            origin,
                            found: o.spec.cluster_name,
                            expected: cluster,
                        });
                    }
                    settings_seen = true;
                    view.settings = o;
                }
                Object::Other(o) => view.others.push(o),
            }
        }
        Ok(view)
    }

    /// The cluster's name.
    pub fn name(&self) -> &ClusterName {
        &self.settings.spec.cluster_name
    }

    /// The Service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services.get(&ServiceRef::new(namespace, name))
    }

    /// How the endpoint in namespace `namespace` whose `targetRef` is `target`
    /// may be reached: over its sidecar only when it names a pod this view holds
    /// with [`super::MESHED_POD_LABEL`]; plain when it names a pod without it, or
    /// no pod at all (an address of something outside the cluster's pods); not at
    /// all when it names a pod this view has not seen, because that pod may be
    /// meshed and a guess of "plain" would send it plaintext.
    pub fn endpoint_mesh(
        &self,
        namespace: &str,
        target: Option<&super::ObjectReference>,
    ) -> EndpointMesh {
        let Some((ns, name)) = target.and_then(|t| t.pod_key(namespace)) else {
            return EndpointMesh::Plain;
        };
        match self.pods.get(&ServiceRef::new(ns, name)) {
            Some(pod) if pod.is_meshed() => EndpointMesh::Meshed,
            Some(_) => EndpointMesh::Plain,
            None => EndpointMesh::UnknownPod,
        }
    }

    /// Whether linked clusters may reach `svc`: it carries `EXPORTED_LABEL: "true"`
    /// or its namespace is listed in `exportedNamespaces`. A mirrored Service is
    /// never exported, so traffic cannot hop from cluster to cluster.
    pub fn is_exported(&self, svc: &Service) -> bool {
        if svc.metadata.has_label(MIRRORED_SERVICE_LABEL, "true") {
            return false;
        }
        svc.metadata.has_label(EXPORTED_LABEL, "true")
            || self
                .settings
                .spec
                .exported_namespaces
                .iter()
                .any(|ns| ns == svc.metadata.namespace())
    }
}

/// How the gateway may reach one endpoint, as [`ClusterView::endpoint_mesh`] reads
/// it from discovery (never from a probe of the pod).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointMesh {
    /// A meshed pod: over its sidecar's mTLS tunnel, or not at all.
    Meshed,
    /// Not a meshed pod: plain TCP.
    Plain,
    /// A pod discovery has not seen (yet): not reached.
    UnknownPod,
}
