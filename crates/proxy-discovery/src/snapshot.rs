//! [`Snapshot`]: one consistent, immutable state of discovery — the local cluster's
//! objects after the reconcile, what is known of each linked cluster, the
//! ServiceMirrors with their status, and the route index.
//!
//! Sources build a snapshot from [`ClusterView`]s and publish it whole; nothing
//! changes a snapshot afterwards. This module answers the questions the roles ask
//! of one state (which route, which link, which endpoints a gateway may reach); it
//! does not read files or watch anything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use isthmus_vocab::{ClusterName, Refusal};
use serde::Serialize;

use crate::index::exported::ExportIndex;
use crate::index::{GatewayRef, Index, Route};
use crate::model::{
    ClusterSettings, ClusterView, Link, MIRRORED_SERVICE_LABEL, Service, ServiceMirror, ServiceRef,
};
use crate::reconcile::{Reconciled, reconcile_all};

/// Why a gateway will not forward to a local service: discovery's finer reading of
/// what the tunnel answers as a [`Refusal`] (see the `From` impl).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ExportRefusal {
    /// This cluster has no such Service.
    #[error("no such service in this cluster")]
    NoSuchService,
    /// The Service exists but this cluster does not export it.
    #[error("service is not exported")]
    NotExported,
    /// The Service exists and is exported but has no ready endpoint on that port.
    #[error("service has no ready endpoints")]
    NoEndpoints,
    /// The Service has no such port, or its `targetPort` name cannot be resolved.
    #[error("service has no such port")]
    NoSuchPort,
}

/// What the tunnel answers: a missing service and a missing port are both
/// `no_route`, so a peer cannot probe which services exist by their ports.
impl From<ExportRefusal> for Refusal {
    fn from(refusal: ExportRefusal) -> Self {
        match refusal {
            ExportRefusal::NoSuchService | ExportRefusal::NoSuchPort => Refusal::NoRoute,
            ExportRefusal::NotExported => Refusal::NotExported,
            ExportRefusal::NoEndpoints => Refusal::NoEndpoints,
        }
    }
}

/// One endpoint a gateway may deliver to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExportedEndpoint {
    /// The pod's address and target port.
    pub addr: SocketAddr,
    /// Whether the pod runs a sidecar: then it is reached over the sidecar's mTLS
    /// tunnel only, never with plain TCP.
    pub meshed: bool,
}

/// One immutable state of discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The local cluster after the reconcile: its Services include the mirrored
    /// ones, its ServiceMirrors carry status.
    local: ClusterView,
    remotes: BTreeMap<ClusterName, ClusterView>,
    applied: Vec<ServiceRef>,
    deleted: Vec<ServiceRef>,
    gateway: Option<GatewayRef>,
    index: Index,
    exports: ExportIndex,
}

impl Snapshot {
    /// Reconciles `local`'s ServiceMirrors against `remotes` and indexes the
    /// result. Infallible: refusals end up in the mirrors' status, not as errors.
    pub fn build(local: ClusterView, remotes: BTreeMap<ClusterName, ClusterView>) -> Self {
        let Reconciled {
            services,
            service_mirrors,
            applied,
            deleted,
        } = reconcile_all(&local, &remotes);
        let mut local = local;
        local.services = services;
        local.service_mirrors = service_mirrors;
        let gateway = local.settings.spec.gateway.as_ref().map(|g| GatewayRef {
            address: g.address.clone(),
            port: g.port,
            identity: g.identity.clone(),
        });
        let index = Index::build(&local, gateway.as_ref());
        let exports = ExportIndex::build(&local);
        Self {
            local,
            remotes,
            applied,
            deleted,
            gateway,
            index,
            exports,
        }
    }

    /// A snapshot of a cluster with default settings and nothing in it.
    pub fn empty(cluster: ClusterName) -> Self {
        Self::build(ClusterView::empty(cluster), BTreeMap::new())
    }

    /// This cluster's name.
    pub fn cluster(&self) -> &ClusterName {
        self.local.name()
    }

    /// This cluster's settings.
    pub fn settings(&self) -> &ClusterSettings {
        &self.local.settings
    }

    /// This cluster's gateway, from its settings.
    pub fn gateway(&self) -> Option<&GatewayRef> {
        self.gateway.as_ref()
    }

    /// The local cluster as reconciled.
    pub fn local(&self) -> &ClusterView {
        &self.local
    }

    /// What is known of linked cluster `cluster`.
    pub fn remote(&self, cluster: &str) -> Option<&ClusterView> {
        self.remotes.get(cluster)
    }

    /// Every remote view, by cluster.
    pub fn remotes(&self) -> &BTreeMap<ClusterName, ClusterView> {
        &self.remotes
    }

    /// The Link to `cluster`.
    pub fn link(&self, cluster: &str) -> Option<&Link> {
        self.local.links.get(cluster)
    }

    /// Every Link, by target cluster.
    pub fn links(&self) -> &BTreeMap<ClusterName, Link> {
        &self.local.links
    }

    /// Every ServiceMirror, with its status as reconciled.
    pub fn service_mirrors(&self) -> impl Iterator<Item = &ServiceMirror> {
        self.local.service_mirrors.values()
    }

    /// The ServiceMirror `namespace/name`.
    pub fn service_mirror(&self, namespace: &str, name: &str) -> Option<&ServiceMirror> {
        self.local
            .service_mirrors
            .get(&ServiceRef::new(namespace, name))
    }

    /// The Services the reconcile made (mirrored Services).
    pub fn mirrored_services(&self) -> impl Iterator<Item = &Service> {
        self.local
            .services
            .values()
            .filter(|s| s.metadata.has_label(MIRRORED_SERVICE_LABEL, "true"))
    }

    /// The local Service `namespace/name` (mirrored ones included).
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.local.service(namespace, name)
    }

    /// Mirrored Services created or updated by this snapshot's reconcile.
    pub fn applied(&self) -> &[ServiceRef] {
        &self.applied
    }

    /// Services the reconcile removed (their ServiceMirror is gone or refuses).
    pub fn deleted(&self) -> &[ServiceRef] {
        &self.deleted
    }

    /// The route index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Route for an original destination; see [`Index::lookup_addr`].
    pub fn lookup_addr(&self, addr: &SocketAddr) -> Option<&Route> {
        self.index.lookup_addr(addr)
    }

    /// Route for an authority; see [`Index::lookup_authority`].
    pub fn lookup_authority(&self, authority: &str) -> Option<&Route> {
        self.index.lookup_authority(authority)
    }

    /// What a gateway may forward a tunnelled `namespace/name:port` to: the ready
    /// endpoint addresses of an exported local Service, at the resolved target
    /// port, sorted. [`Snapshot::exported_endpoints`] also says which are meshed.
    pub fn exported_target(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, ExportRefusal> {
        self.exported_endpoints(namespace, name, port)
            .map(|eps| eps.iter().map(|e| e.addr).collect())
    }

    /// The endpoints of [`Snapshot::exported_target`], each with whether it is a
    /// meshed pod (reached only over its sidecar's tunnel), from the
    /// [`ExportIndex`] built with this snapshot.
    ///
    /// Endpoints are read from `Endpoints` (subset ports matched to the Service port
    /// by name) and `EndpointSlice`s (`kubernetes.io/service-name` label). A subset
    /// without ports uses the Service's `targetPort`; a named one is resolved
    /// through the container ports of Deployments whose pod labels match the
    /// Service's selector. An endpoint is meshed when its `targetRef` names a Pod
    /// labelled [`crate::model::MESHED_POD_LABEL`]; an address listed both ways
    /// counts as meshed, so a second listing never opens a plain path to a pod.
    /// An endpoint naming a pod discovery has not seen is left out until it has.
    pub fn exported_endpoints(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Result<Arc<[ExportedEndpoint]>, ExportRefusal> {
        self.exports.endpoints(namespace, name, port)
    }

    /// [`Snapshot::exported_target`] for a tunnel's `:authority`:
    /// `name.ns.svc.<clusterDomain>:port`, `name.ns.svc:port` or `name.ns:port`
    /// of this cluster. Any other authority is [`ExportRefusal::NoSuchService`].
    pub fn exported_target_for(&self, authority: &str) -> Result<Vec<SocketAddr>, ExportRefusal> {
        self.exported_endpoints_for(authority)
            .map(|eps| eps.iter().map(|e| e.addr).collect())
    }

    /// [`Snapshot::exported_endpoints`] for a tunnel's `:authority`, named as in
    /// [`Snapshot::exported_target_for`].
    pub fn exported_endpoints_for(
        &self,
        authority: &str,
    ) -> Result<Arc<[ExportedEndpoint]>, ExportRefusal> {
        self.exports.endpoints_for(authority)
    }

    /// The gateway's index of exported Services and their endpoints.
    pub fn exports(&self) -> &ExportIndex {
        &self.exports
    }

    /// A JSON view for `/config` and tooling: cluster, settings, links, Services,
    /// ServiceMirrors with status, and the route index.
    pub fn to_json(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct View<'a> {
            cluster: &'a ClusterName,
            settings: &'a ClusterSettings,
            links: Vec<&'a Link>,
            services: Vec<&'a Service>,
            service_mirrors: Vec<&'a ServiceMirror>,
            remote_clusters: Vec<&'a ClusterName>,
            routes: &'a Index,
        }
        let view = View {
            cluster: self.cluster(),
            settings: self.settings(),
            links: self.local.links.values().collect(),
            services: self.local.services.values().collect(),
            service_mirrors: self.local.service_mirrors.values().collect(),
            remote_clusters: self.remotes.keys().collect(),
            routes: &self.index,
        };
        // Every part is plain data with string keys; serialising cannot fail.
        serde_json::to_value(view).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }
}

#[cfg(test)]
mod tests;
