//! The lab's scheduler and network plan: from the clusters as read, decides every
//! address, pod and identity, each Service's Endpoints (the pods it selects), the
//! kube-proxy rules and the hosts files.
//!
//! Everything here is a pure function of the input, so a plan can be checked
//! without root. Addresses, all from the benchmarking range:
//!
//! | what | address |
//! | --- | --- |
//! | cluster `i`'s bridge (pod subnet `198.18.<i+1>.0/24`) | `198.18.<i+1>.1` |
//! | cluster `i`'s gateway on that bridge | `198.18.<i+1>.2` |
//! | cluster `i`'s pods | `198.18.<i+1>.10` and up |
//! | cluster `i`'s service range | `198.19.<8 i>.0/21` |
//! | the WAN between gateways (`198.18.250.0/24`) | gateway `i` at `198.18.250.<i+1>`, named `gateway.<cluster>.isthmus-lab.test` |
//! | cluster `i`'s gateway Service (its ClusterIP) | `198.19.<8 i>.1` |
//! | cluster `i`'s API server, as pods reach it | `198.18.251.<i+1>:6443` |
//! | cluster `i`'s controller replicas | `198.18.<i+1>.3` to `.9` |
//!
//! A pod whose template carries the annotation `isthmus.io/inject: disabled` (as
//! linkerd's `linkerd.io/inject: disabled`) is unmeshed ([`PodPlan::meshed`]): no
//! capture, no sidecar, no identity; it still gets its hosts file and the
//! kube-proxy rules, so it reaches its own cluster's ClusterIPs directly.
//!
//! Creating namespaces and processes is [`super::net`] and [`super::run`]'s job;
//! mirrored Services are the controller's, read back from each cluster's API
//! server.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proxy_discovery::ServiceRef;
use proxy_discovery::model::{
    Cidr, ClusterIp, Container, Deployment, EXPORTED_LABEL, EndpointAddress, EndpointPort,
    EndpointSubset, Endpoints, ObjectMeta, ObjectReference, Service, TargetPort,
};
use proxy_discovery::reconcile::allocate_cluster_ip;

use super::spec::{ClusterSpec, LabSpec};

/// Most clusters a lab holds: the service ranges are /21s of 198.19.0.0/16.
pub const MAX_CLUSTERS: usize = 32;
/// Most pods per cluster: `.10` to `.249` of the cluster's /24.
pub const MAX_PODS: usize = 240;
/// The tunnel port of gateways and sidecars: the mesh's default.
pub const TUNNEL_PORT: u16 = isthmus_vocab::ports::DEFAULT_INBOUND_PORT;
/// The admin port of every proxy: the mesh's default.
pub const ADMIN_PORT: u16 = isthmus_vocab::ports::DEFAULT_ADMIN_PORT;
/// Where a gateway's delay relay listens on the WAN, when `--wan-delay` is set.
pub const RELAY_PORT: u16 = 4153;
/// The namespace of the gateway and the mesh's objects: `isthmus install`'s.
pub const GATEWAY_NAMESPACE: &str = crate::install::NAMESPACE;
/// The iptables chain that stands in for kube-proxy in every pod.
pub const SERVICES_CHAIN: &str = "LAB_SERVICES";
/// The pod-template annotation that keeps a pod out of the mesh when `disabled`.
pub const INJECT_ANNOTATION: &str = "isthmus.io/inject";
/// The WAN's network, prefix 24.
pub const WAN_NET: [u8; 3] = [198, 18, 250];
/// The first lines of every hosts file the lab writes.
const LOCALHOST: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
/// The domain of the gateways' public names (a reserved test domain, RFC 2606).
pub const GATEWAY_DOMAIN: &str = "isthmus-lab.test";

/// A plan that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Too many clusters, pods, or an address that does not fit.
    #[error("{0}")]
    Invalid(String),
}

/// One pod: a replica of a Deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    /// `<deployment>-<template hash>-<replica>`.
    pub name: String,
    /// The Deployment's namespace.
    pub namespace: String,
    /// The Deployment's name.
    pub deployment: String,
    /// The pod's address on its cluster's bridge.
    pub ip: Ipv4Addr,
    /// The template's labels.
    pub labels: BTreeMap<String, String>,
    /// The template's containers.
    pub containers: Vec<Container>,
    /// The sidecar's SPIFFE ID (`ns/<namespace>/sa/default`).
    pub identity: String,
    /// Whether the pod gets `isthmus-init` and a sidecar: false when its template
    /// says `isthmus.io/inject: disabled`.
    pub meshed: bool,
}

/// A local Service's port as kube-proxy programs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    /// `namespace/name` of the Service.
    pub service: ServiceRef,
    /// ClusterIP:port.
    pub front: SocketAddr,
    /// Ready pods' address:targetPort.
    pub backends: Vec<SocketAddr>,
}

/// One cluster, placed.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    /// The cluster as read.
    pub spec: ClusterSpec,
    /// `198.18.<i+1>.1`: the bridge's own address, the pods' route for ClusterIPs.
    pub bridge_ip: Ipv4Addr,
    /// `198.18.<i+1>.2`.
    pub gateway_ip: Ipv4Addr,
    /// `198.18.250.<i+1>`.
    pub wan_ip: Ipv4Addr,
    /// `198.19.<8 i>.0/21`.
    pub service_cidr: Cidr,
    /// The gateway Service's ClusterIP (`.1` of the service range, as
    /// `isthmus install --gateway-cluster-ip` pins it).
    pub gateway_cluster_ip: IpAddr,
    /// The gateway's SPIFFE ID.
    pub gateway_identity: String,
    /// The pods, in the order they were made: those of the manifests, then any
    /// a Deployment scaled up or a deleted pod's replacement added while the
    /// lab runs. None is ever removed, so a pod's name and address are never
    /// reused within a run.
    pub pods: Vec<PodPlan>,
    /// Local Services with their ClusterIP (and the export label for `exports`).
    pub services: BTreeMap<ServiceRef, Service>,
}

/// Every cluster, placed.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The clusters, in name order.
    pub clusters: Vec<ClusterPlan>,
    /// Added latency on the WAN, per direction, in milliseconds (0: none).
    pub wan_delay_ms: u64,
}

impl Plan {
    /// Places `spec`'s clusters and pods and allocates ClusterIPs.
    pub fn new(spec: &LabSpec, wan_delay_ms: u64) -> Result<Self, PlanError> {
        if spec.clusters.len() > MAX_CLUSTERS {
            return Err(PlanError::Invalid(format!(
                "{} holds {} clusters; the lab places at most {MAX_CLUSTERS}",
                spec.source,
                spec.clusters.len()
            )));
        }
        let mut clusters = Vec::new();
        for (index, c) in spec.clusters.iter().enumerate() {
            clusters.push(place(index, c)?);
        }
        Ok(Self {
            clusters,
            wan_delay_ms,
        })
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&ClusterPlan> {
        self.clusters.iter().find(|c| c.spec.name.as_str() == name)
    }

    /// The next pod of Deployment `key` (`d`, as the API server holds it now) in
    /// cluster `ci`, as a ReplicaSet scaling up would make it (see
    /// `ClusterPlan::pods` for how names and addresses are chosen).
    pub fn next_pod(
        &self,
        ci: usize,
        key: &ServiceRef,
        d: &Deployment,
    ) -> Result<PodPlan, PlanError> {
        let c = &self.clusters[ci];
        let third = c.bridge_ip.octets()[2];
        pod_for(&c.spec, &c.pods, key, d, |host| {
            Ipv4Addr::new(198, 18, third, host)
        })
    }

    /// Endpoints of every selecting Service of `c` (those the user wrote are kept
    /// as written), listing the pods for which `ready` holds.
    pub fn endpoints(&self, c: &ClusterPlan, ready: &dyn Fn(&PodPlan) -> bool) -> Vec<Endpoints> {
        let mut out = Vec::new();
        for (key, svc) in &c.services {
            if let Some(written) = c.spec.view.endpoints.get(key) {
                out.push(written.clone());
                continue;
            }
            if svc.spec.selector.as_ref().is_none_or(BTreeMap::is_empty) {
                continue;
            }
            // Pods of one template resolve named ports alike; group by the result.
            let mut groups: BTreeMap<Vec<(Option<String>, u16)>, Vec<&PodPlan>> = BTreeMap::new();
            for pod in selected(c, svc).filter(|p| ready(p)) {
                let ports: Vec<(Option<String>, u16)> = svc
                    .spec
                    .ports
                    .iter()
                    .filter_map(|sp| {
                        target_port(pod, sp.target_port.as_ref(), sp.port)
                            .map(|t| (sp.name.clone(), t))
                    })
                    .collect();
                groups.entry(ports).or_default().push(pod);
            }
            let subsets = groups
                .into_iter()
                .map(|(ports, pods)| EndpointSubset {
                    addresses: pods
                        .into_iter()
                        .map(|pod| EndpointAddress {
                            ip: IpAddr::V4(pod.ip),
                            hostname: None,
                            // What tells a gateway whether the pod is meshed.
                            target_ref: Some(ObjectReference::pod(&pod.namespace, &pod.name)),
                        })
                        .collect(),
                    not_ready_addresses: Vec::new(),
                    ports: ports
                        .into_iter()
                        .map(|(name, port)| EndpointPort {
                            name,
                            port,
                            protocol: Some("TCP".to_owned()),
                        })
                        .collect(),
                })
                .collect();
            out.push(Endpoints {
                metadata: ObjectMeta::named(&key.namespace, &key.name),
                subsets,
            });
        }
        out
    }

    /// What kube-proxy would program for `c`: every TCP port of every local Service
    /// with a ClusterIP, and its ready backends.
    pub fn service_routes(
        &self,
        c: &ClusterPlan,
        ready: &dyn Fn(&PodPlan) -> bool,
    ) -> Vec<ServiceRoute> {
        let endpoints: BTreeMap<ServiceRef, Endpoints> = self
            .endpoints(c, ready)
            .into_iter()
            .map(|e| (ServiceRef::new(e.metadata.namespace(), &e.metadata.name), e))
            .collect();
        let mut routes = Vec::new();
        for (key, svc) in &c.services {
            let Some(ip) = svc.cluster_ips().into_iter().next() else {
                continue;
            };
            for sp in svc.spec.ports.iter().filter(|p| p.is_tcp()) {
                let mut backends = Vec::new();
                for subset in endpoints
                    .get(key)
                    .map(|e| e.subsets.as_slice())
                    .unwrap_or_default()
                {
                    let port = subset
                        .ports
                        .iter()
                        .find(|p| p.name == sp.name || subset.ports.len() == 1)
                        .map(|p| p.port);
                    if let Some(port) = port {
                        backends
                            .extend(subset.addresses.iter().map(|a| SocketAddr::new(a.ip, port)));
                    }
                }
                routes.push(ServiceRoute {
                    service: key.clone(),
                    front: SocketAddr::new(ip, sp.port),
                    backends,
                });
            }
        }
        routes
    }
}

/// The `iptables-restore --noflush` input that (re)programs the kube-proxy chain:
/// ClusterIP:port DNAT to a random ready backend, and a reset for a Service with
/// none (as kube-proxy rejects Services without endpoints). The chain is flushed
/// by the restore, so applying it again replaces it.
///
/// The reset sits in the filter table, which sees a meshed app's connection after
/// the capture's nat REDIRECT has turned it towards the sidecar: it only ever
/// meets connections that really go to the ClusterIP (an unmeshed pod's, or the
/// sidecar's own passthrough).
pub fn service_rules(routes: &[ServiceRoute]) -> String {
    let mut nat = format!("*nat\n:{SERVICES_CHAIN} - [0:0]\n");
    let mut filter = format!("*filter\n:{SERVICES_CHAIN} - [0:0]\n");
    for r in routes {
        let m = format!(
            "-A {SERVICES_CHAIN} -d {}/32 -p tcp -m tcp --dport {}",
            r.front.ip(),
            r.front.port()
        );
        if r.backends.is_empty() {
            let _ = writeln!(filter, "{m} -j REJECT --reject-with tcp-reset");
            continue;
        }
        let n = r.backends.len();
        for (i, b) in r.backends.iter().enumerate() {
            let left = n - i;
            if left > 1 {
                // Of the `left` backends still to choose from, this one takes 1/left:
                // kube-proxy's way to an even split.
                let _ = writeln!(
                    nat,
                    "{m} -m statistic --mode random --probability {:.5} -j DNAT --to-destination {b}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(nat, "{m} -j DNAT --to-destination {b}");
            }
        }
    }
    nat.push_str("COMMIT\n");
    filter.push_str("COMMIT\n");
    nat + &filter
}

/// The hosts file of `pod`: itself, and every Service of its cluster (local and
/// mirrored, `ips`) as `name.namespace`, `name.namespace.svc`,
/// `name.namespace.svc.<domain>`, plus the bare `name` for its own namespace.
pub fn hosts_file(c: &ClusterPlan, pod: &PodPlan, ips: &BTreeMap<ServiceRef, IpAddr>) -> String {
    let mut out = String::from(LOCALHOST);
    let _ = writeln!(out, "{}\t{}", pod.ip, pod.name);
    let domain = c.spec.cluster_domain();
    for (key, ip) in ips {
        let (name, ns) = (&key.name, &key.namespace);
        let mut names = format!("{name}.{ns}.svc.{domain} {name}.{ns}.svc {name}.{ns}");
        if *ns == pod.namespace {
            names.push(' ');
            names.push_str(name);
        }
        let _ = writeln!(out, "{ip}\t{names}");
    }
    out
}

/// The public DNS name of `cluster`'s gateway, as a cloud load balancer gets one:
/// what the lab's Links name, resolved through the gateways' hosts files.
pub fn gateway_name(cluster: &str) -> String {
    format!("gateway.{cluster}.{GATEWAY_DOMAIN}")
}

/// The hosts file of every gateway: each cluster's gateway name at its WAN
/// address, as public DNS answers for every load balancer.
pub fn gateway_hosts_file(plan: &Plan) -> String {
    let mut out = String::from(LOCALHOST);
    for c in &plan.clusters {
        let _ = writeln!(out, "{}\t{}", c.wan_ip, gateway_name(c.spec.name.as_str()));
    }
    out
}

/// The pods of `c` that `svc` selects (same namespace, every selector label).
pub fn selected<'a>(c: &'a ClusterPlan, svc: &'a Service) -> impl Iterator<Item = &'a PodPlan> {
    let selector = svc.spec.selector.clone().unwrap_or_default();
    c.pods.iter().filter(move |p| {
        !selector.is_empty()
            && p.namespace == svc.metadata.namespace()
            && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
    })
}

/// `targetPort` on `pod`: the number, a container port of that name, or `port`.
fn target_port(pod: &PodPlan, target: Option<&TargetPort>, port: u16) -> Option<u16> {
    match target {
        None => Some(port),
        Some(TargetPort::Number(n)) => Some(*n),
        Some(TargetPort::Name(name)) => pod
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

fn place(index: usize, c: &ClusterSpec) -> Result<ClusterPlan, PlanError> {
    let third = u8::try_from(index + 1).expect("at most MAX_CLUSTERS clusters");
    let net = |host: u8| Ipv4Addr::new(198, 18, third, host);
    let service_cidr = Cidr::parse(&format!("198.19.{}.0/21", index * 8))
        .expect("a /21 of 198.19.0.0/16 is a valid CIDR");
    let mut pods = Vec::new();
    for (key, d) in &c.view.deployments {
        for _ in 0..d.spec.replicas {
            pods.push(pod_for(c, &pods, key, d, net)?);
        }
    }
    let mut services = c.view.services.clone();
    let gateway_cluster_ip = IpAddr::V4(Ipv4Addr::new(198, 19, third.saturating_sub(1) * 8, 1));
    let mut used: BTreeSet<IpAddr> = BTreeSet::from([gateway_cluster_ip]);
    for (key, svc) in &services {
        for ip in svc.cluster_ips() {
            if !service_cidr.contains_usable(ip) {
                return Err(PlanError::Invalid(format!(
                    "Service {key} of cluster {} asks for clusterIP {ip}, outside the cluster's service range {service_cidr} in the lab",
                    c.name
                )));
            }
            used.insert(ip);
        }
    }
    for (key, svc) in services.iter_mut() {
        if c.exports.contains(key) {
            svc.metadata
                .labels
                .insert(EXPORTED_LABEL.to_owned(), "true".to_owned());
        }
        if svc.spec.cluster_ip.is_some() || !svc.spec.cluster_ips.is_empty() {
            continue;
        }
        let ip = allocate_cluster_ip(key, &service_cidr, &used).ok_or_else(|| {
            PlanError::Invalid(format!(
                "cluster {}: no free ClusterIP left in {service_cidr} for Service {key}",
                c.name
            ))
        })?;
        used.insert(ip);
        svc.spec.cluster_ip = Some(ClusterIp::Addr(ip));
    }
    Ok(ClusterPlan {
        spec: c.clone(),
        bridge_ip: net(1),
        gateway_ip: net(2),
        wan_ip: Ipv4Addr::new(WAN_NET[0], WAN_NET[1], WAN_NET[2], third),
        service_cidr,
        gateway_cluster_ip,
        // What csi-driver-spiffe issues the gateway `isthmus install` renders: its
        // ServiceAccount's identity, the same name in every cluster.
        gateway_identity: format!(
            "spiffe://{}/ns/{GATEWAY_NAMESPACE}/sa/{}",
            c.trust_domain(),
            crate::install::GATEWAY
        ),
        pods,
        services,
    })
}

/// The next pod of Deployment `key` (`d`) in cluster `c`, which already holds
/// `pods`: the next replica number of that Deployment and the next address of
/// the cluster (neither ever reused within a run, so a name or an address
/// always means one pod).
fn pod_for(
    c: &ClusterSpec,
    pods: &[PodPlan],
    key: &ServiceRef,
    d: &Deployment,
    net: impl Fn(u8) -> Ipv4Addr,
) -> Result<PodPlan, PlanError> {
    let meshed = match d.spec.template.metadata.annotations.get(INJECT_ANNOTATION) {
        None => true,
        Some(v) if v == "enabled" => true,
        Some(v) if v == "disabled" => false,
        Some(v) => {
            return Err(PlanError::Invalid(format!(
                "Deployment {key} of cluster {}: spec.template.metadata.annotations[{INJECT_ANNOTATION:?}] is {v:?}; use \"enabled\" (the default) or \"disabled\"",
                c.name
            )));
        }
    };
    if pods.len() >= MAX_PODS {
        return Err(PlanError::Invalid(format!(
            "cluster {} asks for more than {MAX_PODS} pods (Deployment {key} has replicas: {})",
            c.name, d.spec.replicas
        )));
    }
    let hash = fnv1a(&format!(
        "{}/{}/{}",
        c.name,
        key,
        serde_yaml_ng::to_string(&d.spec.template).unwrap_or_default()
    ));
    let replica = pods
        .iter()
        .filter(|p| p.namespace == key.namespace && p.deployment == key.name)
        .count();
    let host = u8::try_from(10 + pods.len()).expect("bounded by MAX_PODS");
    Ok(PodPlan {
        name: format!("{}-{:05x}-{replica}", key.name, hash & 0xfffff),
        namespace: key.namespace.clone(),
        deployment: key.name.clone(),
        ip: net(host),
        labels: d.spec.template.metadata.labels.clone(),
        containers: d.spec.template.spec.containers.clone(),
        identity: format!(
            "spiffe://{}/ns/{}/sa/default",
            c.trust_domain(),
            key.namespace
        ),
        meshed,
    })
}

/// FNV-1a, 64 bit: stable across processes and versions, for pod-template hashes.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests;
