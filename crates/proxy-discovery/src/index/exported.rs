//! The gateway's index: for each exported Service port of this cluster, the
//! endpoints a gateway may deliver a tunnel stream to, and which of them are meshed.
//!
//! Built once per snapshot beside the route index, so a stream's lookup is a parse
//! of its authority and two hash lookups rather than a scan of every EndpointSlice.
//! The answers are those [`crate::Snapshot::exported_endpoints`] documents.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use isthmus_vocab::Authority;

use crate::model::{
    ClusterView, EndpointMesh, EndpointPort, EndpointSlice, Service, ServicePort, ServiceRef,
    TargetPort,
};
use crate::snapshot::{ExportRefusal, ExportedEndpoint};

/// One Service's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Exports {
    /// The Service exists but linked clusters may not reach it.
    NotExported,
    /// Each TCP port of an exported Service, with its endpoints or why it has none.
    Ports(HashMap<u16, Result<Arc<[ExportedEndpoint]>, ExportRefusal>>),
}

/// Exported Services and their endpoints, by Service; immutable once built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportIndex {
    services: HashMap<ServiceRef, Exports>,
    /// This cluster's domain, stripped from a tunnel's authority.
    domain: String,
    /// Every address any Endpoints or EndpointSlice lists, ready or not: a pod no
    /// longer among them is nobody's endpoint, and its sidecar tunnel can close.
    endpoint_ips: Arc<HashSet<IpAddr>>,
}

impl ExportIndex {
    /// Indexes every Service of `cluster` (as the reconcile left it).
    pub fn build(cluster: &ClusterView) -> Self {
        let mut slices: HashMap<ServiceRef, Vec<&EndpointSlice>> = HashMap::new();
        for slice in cluster.endpoint_slices.values() {
            if let Some(name) = slice.service_name() {
                slices
                    .entry(ServiceRef::new(slice.metadata.namespace(), name))
                    .or_default()
                    .push(slice);
            }
        }
        let services = cluster
            .services
            .iter()
            .map(|(key, svc)| {
                let exports = if cluster.is_exported(svc) {
                    let slices = slices.get(key).map_or(&[][..], Vec::as_slice);
                    Exports::Ports(
                        svc.spec
                            .ports
                            .iter()
                            .filter(|p| p.is_tcp())
                            .map(|sp| {
                                let endpoints = endpoints_of(cluster, key, svc, sp, slices);
                                (sp.port, endpoints.map(Arc::from))
                            })
                            .collect(),
                    )
                } else {
                    Exports::NotExported
                };
                (key.clone(), exports)
            })
            .collect();
        let endpoint_ips = cluster
            .endpoints
            .values()
            .flat_map(|e| &e.subsets)
            .flat_map(|s| &s.addresses)
            .map(|a| a.ip)
            .chain(
                cluster
                    .endpoint_slices
                    .values()
                    .flat_map(|s| &s.endpoints)
                    .flat_map(|e| &e.addresses)
                    .filter_map(|a| a.parse().ok()),
            )
            .collect();
        Self {
            services,
            domain: cluster.settings.spec.cluster_domain.clone(),
            endpoint_ips: Arc::new(endpoint_ips),
        }
    }

    /// The endpoints of the exported Service `namespace/name` on Service port `port`.
    pub fn endpoints(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Result<Arc<[ExportedEndpoint]>, ExportRefusal> {
        match self.services.get(&ServiceRef::new(namespace, name)) {
            None => Err(ExportRefusal::NoSuchService),
            Some(Exports::NotExported) => Err(ExportRefusal::NotExported),
            Some(Exports::Ports(ports)) => {
                ports.get(&port).ok_or(ExportRefusal::NoSuchPort)?.clone()
            }
        }
    }

    /// [`ExportIndex::endpoints`] for a tunnel's `:authority`:
    /// `name.ns.svc.<clusterDomain>:port`, `name.ns.svc:port` or `name.ns:port` of
    /// this cluster. Any other authority is [`ExportRefusal::NoSuchService`].
    pub fn endpoints_for(&self, authority: &str) -> Result<Arc<[ExportedEndpoint]>, ExportRefusal> {
        let authority = Authority::parse(authority).map_err(|_| ExportRefusal::NoSuchService)?;
        let host = authority.host();
        let short = host
            .strip_suffix(self.domain.as_str())
            .and_then(|h| h.strip_suffix('.'))
            .unwrap_or(host);
        let short = short.strip_suffix(".svc").unwrap_or(short);
        match short.split_once('.') {
            Some((name, namespace)) if !namespace.contains('.') => {
                self.endpoints(namespace, name, authority.port())
            }
            _ => Err(ExportRefusal::NoSuchService),
        }
    }

    /// Every address an Endpoints or EndpointSlice of this cluster lists.
    pub fn endpoint_ips(&self) -> &Arc<HashSet<IpAddr>> {
        &self.endpoint_ips
    }
}

/// The ready endpoints of Service port `sp` of the exported `svc`, from its
/// Endpoints (subset ports matched by name) and its EndpointSlices `slices`.
fn endpoints_of(
    cluster: &ClusterView,
    key: &ServiceRef,
    svc: &Service,
    sp: &ServicePort,
    slices: &[&EndpointSlice],
) -> Result<Vec<ExportedEndpoint>, ExportRefusal> {
    let namespace = key.namespace.as_str();
    let mut addrs: BTreeMap<SocketAddr, bool> = BTreeMap::new();
    let mut add = |addr: SocketAddr, meshed: bool| *addrs.entry(addr).or_default() |= meshed;
    let mut unresolved = false;
    if let Some(eps) = cluster.endpoints.get(key) {
        for subset in &eps.subsets {
            let Some(target) = listing_target(cluster, svc, sp, &subset.ports, &mut unresolved)
            else {
                continue;
            };
            for a in &subset.addresses {
                match cluster.endpoint_mesh(namespace, a.target_ref.as_ref()) {
                    EndpointMesh::UnknownPod => {}
                    mesh => add(SocketAddr::new(a.ip, target), mesh == EndpointMesh::Meshed),
                }
            }
        }
    }
    for slice in slices {
        let Some(target) = listing_target(cluster, svc, sp, &slice.ports, &mut unresolved) else {
            continue;
        };
        for ep in &slice.endpoints {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let meshed = match cluster.endpoint_mesh(namespace, ep.target_ref.as_ref()) {
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

/// The port an Endpoints subset's or an EndpointSlice's addresses serve `sp` on:
/// its port of that name, or for a listing without ports the Service's target
/// port. `None` leaves the listing out; a listing without ports whose target
/// cannot be resolved also sets `unresolved`.
fn listing_target(
    cluster: &ClusterView,
    svc: &Service,
    sp: &ServicePort,
    ports: &[EndpointPort],
    unresolved: &mut bool,
) -> Option<u16> {
    let target = if ports.is_empty() {
        resolve_target_port(cluster, svc, sp)
    } else {
        matching_port(ports, sp)
    };
    *unresolved |= target.is_none() && ports.is_empty();
    target
}

/// `targetPort` as a number: itself, `port` when absent, or a container port of
/// that name in a Deployment the Service selects.
fn resolve_target_port(cluster: &ClusterView, svc: &Service, sp: &ServicePort) -> Option<u16> {
    match &sp.target_port {
        None => Some(sp.port),
        Some(TargetPort::Number(n)) => Some(*n),
        Some(TargetPort::Name(port_name)) => {
            let selector = svc.spec.selector.as_ref()?;
            cluster
                .deployments
                .values()
                .filter(|d| d.metadata.namespace() == svc.metadata.namespace())
                .filter(|d| {
                    let labels = &d.spec.template.metadata.labels;
                    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .flat_map(|d| &d.spec.template.spec.containers)
                .flat_map(|c| &c.ports)
                .find(|p| p.name.as_deref() == Some(port_name.as_str()))
                .map(|p| p.container_port)
        }
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
