//! [`Snapshot`]: one consistent, immutable state of discovery — the local cluster's
//! objects after the reconcile, what is known of each linked cluster, the
//! ServiceMirrors with their status, and the route index.
//!
//! Sources build a snapshot from [`ClusterView`]s and publish it whole; nothing
//! changes a snapshot afterwards. This module answers the questions the roles ask
//! of one state (which route, which link, which endpoints a gateway may reach); it
//! does not read files or watch anything.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use isthmus_vocab::{Authority, ClusterName, Refusal};
use serde::Serialize;

use crate::index::{GatewayRef, Index, Route};
use crate::model::{
    ClusterSettings, ClusterView, EndpointMesh, EndpointPort, Link, MIRRORED_SERVICE_LABEL,
    Service, ServiceMirror, ServicePort, ServiceRef, TargetPort,
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
        Self {
            local,
            remotes,
            applied,
            deleted,
            gateway,
            index,
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
            .map(|eps| eps.into_iter().map(|e| e.addr).collect())
    }

    /// The endpoints of [`Snapshot::exported_target`], each with whether it is a
    /// meshed pod (reached only over its sidecar's tunnel).
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
    ) -> Result<Vec<ExportedEndpoint>, ExportRefusal> {
        let svc = self
            .local
            .service(namespace, name)
            .ok_or(ExportRefusal::NoSuchService)?;
        if !self.local.is_exported(svc) {
            return Err(ExportRefusal::NotExported);
        }
        let sp = svc
            .port(port)
            .filter(|p| p.is_tcp())
            .ok_or(ExportRefusal::NoSuchPort)?;
        let mut addrs: BTreeMap<SocketAddr, bool> = BTreeMap::new();
        let mut add = |addr: SocketAddr, meshed: bool| *addrs.entry(addr).or_default() |= meshed;
        let mut unresolved = false;
        let key = ServiceRef::new(namespace, name);
        if let Some(eps) = self.local.endpoints.get(&key) {
            for subset in &eps.subsets {
                let target = if subset.ports.is_empty() {
                    self.resolve_target_port(svc, sp)
                } else {
                    matching_port(&subset.ports, sp)
                };
                let Some(target) = target else {
                    unresolved |= subset.ports.is_empty();
                    continue;
                };
                for a in &subset.addresses {
                    match self.local.endpoint_mesh(namespace, a.target_ref.as_ref()) {
                        EndpointMesh::UnknownPod => {}
                        mesh => add(SocketAddr::new(a.ip, target), mesh == EndpointMesh::Meshed),
                    }
                }
            }
        }
        for slice in self.local.endpoint_slices.values() {
            if slice.metadata.namespace() != namespace || slice.service_name() != Some(name) {
                continue;
            }
            let target = if slice.ports.is_empty() {
                self.resolve_target_port(svc, sp)
            } else {
                matching_port(&slice.ports, sp)
            };
            let Some(target) = target else {
                unresolved |= slice.ports.is_empty();
                continue;
            };
            for ep in &slice.endpoints {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                let meshed = match self.local.endpoint_mesh(namespace, ep.target_ref.as_ref()) {
                    EndpointMesh::UnknownPod => continue,
                    mesh => mesh == EndpointMesh::Meshed,
                };
                for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                    add(SocketAddr::new(ip, target), meshed);
                }
            }
        }
        if addrs.is_empty() {
            return Err(if unresolved {
                ExportRefusal::NoSuchPort
            } else {
                ExportRefusal::NoEndpoints
            });
        }
        Ok(addrs
            .into_iter()
            .map(|(addr, meshed)| ExportedEndpoint { addr, meshed })
            .collect())
    }

    /// [`Snapshot::exported_target`] for a tunnel's `:authority`:
    /// `name.ns.svc.<clusterDomain>:port`, `name.ns.svc:port` or `name.ns:port`
    /// of this cluster. Any other authority is [`ExportRefusal::NoSuchService`].
    pub fn exported_target_for(&self, authority: &str) -> Result<Vec<SocketAddr>, ExportRefusal> {
        self.exported_endpoints_for(authority)
            .map(|eps| eps.into_iter().map(|e| e.addr).collect())
    }

    /// [`Snapshot::exported_endpoints`] for a tunnel's `:authority`, named as in
    /// [`Snapshot::exported_target_for`].
    pub fn exported_endpoints_for(
        &self,
        authority: &str,
    ) -> Result<Vec<ExportedEndpoint>, ExportRefusal> {
        let authority = Authority::parse(authority).map_err(|_| ExportRefusal::NoSuchService)?;
        let host = authority.host();
        let domain = &self.local.settings.spec.cluster_domain;
        let short = host
            .strip_suffix(domain.as_str())
            .and_then(|h| h.strip_suffix('.'))
            .unwrap_or(host);
        let short = short.strip_suffix(".svc").unwrap_or(short);
        match short.split('.').collect::<Vec<_>>()[..] {
            [name, namespace] => self.exported_endpoints(namespace, name, authority.port()),
            _ => Err(ExportRefusal::NoSuchService),
        }
    }

    /// `targetPort` as a number: itself, `port` when absent, or a container port of
    /// that name in a Deployment the Service selects.
    fn resolve_target_port(&self, svc: &Service, sp: &ServicePort) -> Option<u16> {
        match &sp.target_port {
            None => Some(sp.port),
            Some(TargetPort::Number(n)) => Some(*n),
            Some(TargetPort::Name(port_name)) => {
                let selector = svc.spec.selector.as_ref()?;
                self.local
                    .deployments
                    .values()
                    .filter(|d| d.metadata.namespace() == svc.metadata.namespace())
                    .filter(|d| {
                        let labels = &d.spec.template.metadata.labels;
                        !selector.is_empty()
                            && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                    })
                    .flat_map(|d| &d.spec.template.spec.containers)
                    .flat_map(|c| &c.ports)
                    .find(|p| p.name.as_deref() == Some(port_name.as_str()))
                    .map(|p| p.container_port)
            }
        }
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

/// The endpoint port serving Service port `sp`: same name, or the only port when
/// the Service port is unnamed.
fn matching_port(ports: &[EndpointPort], sp: &ServicePort) -> Option<u16> {
    let wanted = sp.name.as_deref().filter(|n| !n.is_empty());
    ports
        .iter()
        .filter(|p| p.protocol.as_deref().is_none_or(|pr| pr == "TCP"))
        .find(|p| match wanted {
            Some(n) => p.name.as_deref() == Some(n),
            None => p.name.as_deref().is_none_or(str::is_empty) || ports.len() == 1,
        })
        .map(|p| p.port)
}

#[cfg(test)]
mod tests;
