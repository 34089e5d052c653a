//! The ServiceMirror reconcile: a ServiceMirror plus what is known of the remote
//! cluster gives the local mirrored Service and the mirror's status.
//!
//! [`reconcile`] decides one mirror and is a pure function of its inputs: no clock,
//! no I/O, no randomness, so every process that sees the same manifests computes
//! the same Service. Where an API server runs (the controller), it allocates the
//! mirrored Service's ClusterIP, as it does for every Service, and the reconcile
//! leaves the address out ([`ClusterIps::ApiServer`]); a directory of manifests
//! has no API server, and there the reconcile allocates from the cluster's
//! `serviceCIDR` itself ([`ClusterIps::Allocate`]).
//! [`reconcile_all`] runs it for every mirror of a cluster and applies the results,
//! including deleting what a removed mirror made. Publishing the status and writing
//! Services back to an API server is a source's business, not this module's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use isthmus_vocab::ClusterName;

use crate::model::policy::{policy_annotations, read_policy};
use crate::model::{
    Cidr, ClusterIp, ClusterView, Condition, ConditionStatus, MIRRORED_SERVICE_LABEL, ObjectMeta,
    OwnerReference, REMOTE_CLUSTER_LABEL, REMOTE_DOMAIN_ANNOTATION, REMOTE_SERVICE_ANNOTATION,
    Service, ServiceMirror, ServiceMirrorStatus, ServicePort, ServiceRef, ServiceSpec,
};

/// The condition type the reconcile reports on every ServiceMirror.
pub const READY_CONDITION: &str = "Ready";

/// Why a ServiceMirror is, or is not, mirrored: the `reason` of its `Ready`
/// condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MirrorReason {
    /// The mirrored Service exists and is current.
    Mirrored,
    /// No Link names `spec.cluster`.
    UnknownCluster,
    /// The remote cluster has no such Service.
    RemoteServiceNotFound,
    /// The remote Service exists but its cluster does not export it.
    NotExported,
    /// A local Service of that name exists and this mirror does not own it.
    NameConflict,
    /// The service range has no free address.
    NoAddressLeft,
}

impl MirrorReason {
    /// The CamelCase reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mirrored => "Mirrored",
            Self::UnknownCluster => "UnknownCluster",
            Self::RemoteServiceNotFound => "RemoteServiceNotFound",
            Self::NotExported => "NotExported",
            Self::NameConflict => "NameConflict",
            Self::NoAddressLeft => "NoAddressLeft",
        }
    }
}

/// Who gives a new mirrored Service its ClusterIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterIps<'a> {
    /// The API server, as for any Service created without `clusterIP`: the
    /// reconcile leaves the address out (or keeps the one the Service has).
    ApiServer,
    /// The reconcile, from this range: where no API server runs (a directory of
    /// manifests).
    Allocate(&'a Cidr),
}

/// What the local cluster looks like to the reconcile of one mirror.
#[derive(Debug, Clone, Copy)]
pub struct LocalState<'a> {
    /// Every local Service, including mirrored ones made so far.
    pub services: &'a BTreeMap<ServiceRef, Service>,
    /// Where a new mirrored Service's ClusterIP comes from.
    pub cluster_ips: ClusterIps<'a>,
}

/// The decision for one ServiceMirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorOutcome {
    /// The mirrored Service to have locally; `None` when refused.
    pub service: Option<Service>,
    /// Why.
    pub reason: MirrorReason,
    /// The mirror's status conditions.
    pub conditions: Vec<Condition>,
}

/// Decides the local Service for `mirror`.
///
/// `remote` is what is known of `spec.cluster`, or `None` when no Link names it.
/// Refuses (no Service, `Ready=False` with a reason and a message naming the
/// objects) when the cluster is unknown, the remote Service does not exist or is not
/// exported, a local Service of that name exists that this mirror does not own
/// (it is never clobbered), or the service range is full.
///
/// The mirrored Service is named as the remote one, lives in the mirror's
/// namespace, has the remote ports (no `targetPort`: it has no pods), no selector,
/// and a ClusterIP kept from the Service this mirror already owns, or else
/// allocated by [`allocate_cluster_ip`] or left to the API server (see
/// [`ClusterIps`]).
pub fn reconcile(
    mirror: &ServiceMirror,
    remote: Option<&ClusterView>,
    local: LocalState<'_>,
) -> MirrorOutcome {
    let cluster = &mirror.spec.cluster;
    let remote_ref = ServiceRef::new(mirror.remote_namespace(), &mirror.spec.service.name);
    let local_ref = ServiceRef::new(mirror.metadata.namespace(), &mirror.spec.service.name);
    let refuse = |reason, message: String| MirrorOutcome {
        service: None,
        reason,
        conditions: vec![ready(ConditionStatus::False, reason, message)],
    };

    let Some(remote) = remote else {
        return refuse(
            MirrorReason::UnknownCluster,
            format!("spec.cluster: no Link names cluster {cluster}"),
        );
    };
    let Some(remote_svc) = remote.services.get(&remote_ref) else {
        return refuse(
            MirrorReason::RemoteServiceNotFound,
            format!("cluster {cluster} has no Service {remote_ref}"),
        );
    };
    if !remote.is_exported(remote_svc) {
        return refuse(
            MirrorReason::NotExported,
            format!(
                "cluster {cluster} does not export Service {remote_ref} (label it {}: \"true\" or list namespace {:?} in its exportedNamespaces)",
                crate::model::EXPORTED_LABEL,
                remote_ref.namespace
            ),
        );
    }
    let existing = local.services.get(&local_ref);
    if let Some(existing) = existing
        && !owned_by(existing, mirror)
    {
        return refuse(
            MirrorReason::NameConflict,
            format!(
                "a local Service {local_ref} exists that ServiceMirror {} does not own; it is left untouched",
                mirror.metadata.name
            ),
        );
    }

    let kept = existing
        .map(Service::cluster_ips)
        .and_then(|ips| ips.first().copied());
    let ip = match (kept, local.cluster_ips) {
        (Some(ip), _) => Some(ip),
        (None, ClusterIps::ApiServer) => None,
        (None, ClusterIps::Allocate(cidr)) => {
            let used: BTreeSet<IpAddr> = local
                .services
                .values()
                .flat_map(Service::cluster_ips)
                .collect();
            match allocate_cluster_ip(&local_ref, cidr, &used) {
                Some(ip) => Some(ip),
                None => {
                    return refuse(
                        MirrorReason::NoAddressLeft,
                        format!("no free address left in the service range {cidr} for {local_ref}"),
                    );
                }
            }
        }
    };

    let service = mirrored_service(mirror, remote.name(), remote, remote_svc, &local_ref, ip);
    MirrorOutcome {
        conditions: vec![mirrored_condition(mirror, &service)],
        service: Some(service),
        reason: MirrorReason::Mirrored,
    }
}

/// The `Ready=True` condition of `mirror` once `service` is its mirrored
/// Service, naming its address when it has one.
pub fn mirrored_condition(mirror: &ServiceMirror, service: &Service) -> Condition {
    let remote_ref = ServiceRef::new(mirror.remote_namespace(), &mirror.spec.service.name);
    let local_ref = ServiceRef::new(service.metadata.namespace(), &service.metadata.name);
    let ports: Vec<String> = service
        .spec
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.protocol.as_deref().unwrap_or("TCP")))
        .collect();
    let at = service
        .cluster_ips()
        .first()
        .map(|ip| format!(" at {ip}"))
        .unwrap_or_default();
    // A policy value that does not parse is ignored, and said here where the
    // mirror's author looks.
    let (_, ignored) = read_policy(&service.metadata.annotations);
    let ignored: String = ignored.iter().map(|e| format!("; {e}")).collect();
    ready(
        ConditionStatus::True,
        MirrorReason::Mirrored,
        format!(
            "Service {remote_ref} of cluster {} is mirrored as {local_ref}{at}, ports [{}]{ignored}",
            mirror.spec.cluster,
            ports.join(", ")
        ),
    )
}

fn ready(status: ConditionStatus, reason: MirrorReason, message: String) -> Condition {
    Condition {
        type_: READY_CONDITION.to_owned(),
        status,
        reason: reason.as_str().to_owned(),
        message,
        last_transition_time: None,
    }
}

fn mirrored_service(
    mirror: &ServiceMirror,
    cluster: &ClusterName,
    remote: &ClusterView,
    remote_svc: &Service,
    local_ref: &ServiceRef,
    ip: Option<IpAddr>,
) -> Service {
    let mut metadata = ObjectMeta::named(&local_ref.namespace, &local_ref.name);
    metadata
        .labels
        .insert(MIRRORED_SERVICE_LABEL.to_owned(), "true".to_owned());
    metadata
        .labels
        .insert(REMOTE_CLUSTER_LABEL.to_owned(), cluster.to_string());
    metadata.annotations.insert(
        REMOTE_SERVICE_ANNOTATION.to_owned(),
        format!(
            "{}.{}",
            remote_svc.metadata.name,
            remote_svc.metadata.namespace()
        ),
    );
    metadata.annotations.insert(
        REMOTE_DOMAIN_ANNOTATION.to_owned(),
        remote.settings.spec.cluster_domain.clone(),
    );
    // The Service's timeouts and retries, set on the mirror, travel with the Service
    // the sidecars' route index is built from.
    for (key, value) in policy_annotations(&mirror.metadata.annotations) {
        metadata.annotations.insert(key.clone(), value.clone());
    }
    metadata.owner_references.push(OwnerReference {
        api_version: ServiceMirror::API_VERSION.to_owned(),
        kind: ServiceMirror::KIND.to_owned(),
        name: mirror.metadata.name.clone(),
        uid: mirror.metadata.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    });
    Service {
        metadata,
        spec: ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            cluster_ip: ip.map(ClusterIp::Addr),
            cluster_ips: ip.map(ClusterIp::Addr).into_iter().collect(),
            ports: remote_svc
                .spec
                .ports
                .iter()
                .map(|p| ServicePort {
                    name: p.name.clone(),
                    protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".to_owned())),
                    port: p.port,
                    target_port: None,
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
            selector: None,
        },
    }
}

/// Whether `svc` carries an ownerReference to `mirror` (same name, kind and API
/// group; and the same uid when both have one). Only such a Service may be
/// replaced or deleted on the mirror's behalf.
pub fn owned_by(svc: &Service, mirror: &ServiceMirror) -> bool {
    svc.metadata.namespace() == mirror.metadata.namespace()
        && svc.metadata.owner_references.iter().any(|o| {
            is_mirror_owner(o)
                && o.name == mirror.metadata.name
                && match (&o.uid, &mirror.metadata.uid) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        })
}

fn is_mirror_owner(o: &OwnerReference) -> bool {
    o.kind == ServiceMirror::KIND
        && o.api_version.split('/').next() == ServiceMirror::API_VERSION.split('/').next()
}

/// Picks a ClusterIP for `service` in `cidr`, outside `used`.
///
/// Deterministic: the start is the 64-bit FNV-1a hash of `namespace/name` modulo
/// the number of usable addresses, then the next free address in order (wrapping;
/// network and broadcast addresses excluded). `None` when every address is used.
pub fn allocate_cluster_ip(
    service: &ServiceRef,
    cidr: &Cidr,
    used: &BTreeSet<IpAddr>,
) -> Option<IpAddr> {
    let usable = cidr.usable();
    let start = u128::from(fnv1a(&format!("{}/{}", service.namespace, service.name))) % usable;
    // Among used.len() + 1 distinct candidates one is free, unless the range is
    // smaller than that and full.
    let tries = usable.min(used.len() as u128 + 1);
    (0..tries)
        .filter_map(|i| cidr.nth((start + i) % usable))
        .find(|ip| !used.contains(ip))
}

/// FNV-1a, 64 bit: tiny, and the same in every process and version (unlike std's
/// `DefaultHasher`, whose algorithm is not guaranteed).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The result of reconciling every ServiceMirror of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// The local Services after the reconcile: the given ones, plus or minus what
    /// the mirrors made.
    pub services: BTreeMap<ServiceRef, Service>,
    /// Every ServiceMirror with its status filled in.
    pub service_mirrors: BTreeMap<ServiceRef, ServiceMirror>,
    /// Mirrored Services created or updated.
    pub applied: Vec<ServiceRef>,
    /// Mirrored Services removed: their ServiceMirror is gone, or now refuses.
    pub deleted: Vec<ServiceRef>,
}

/// Reconciles every ServiceMirror of `local` against `remotes`, in `namespace/name`
/// order (so a name two mirrors want goes to the first, the same everywhere).
///
/// A cluster is known when `local` has a Link to it; a linked cluster missing from
/// `remotes` is seen as empty. A Service owned by a ServiceMirror that no longer
/// exists is deleted, and so is the Service of a mirror that now refuses (except
/// for a name conflict, where the Service is not the mirror's).
pub fn reconcile_all(
    local: &ClusterView,
    remotes: &BTreeMap<ClusterName, ClusterView>,
) -> Reconciled {
    let mut services = local.services.clone();
    let mut deleted = Vec::new();
    let mut applied = Vec::new();

    // Orphans first: their addresses become free for the mirrors below.
    let orphans: Vec<ServiceRef> = services
        .iter()
        .filter(|(key, svc)| {
            let owners: Vec<&OwnerReference> = svc
                .metadata
                .owner_references
                .iter()
                .filter(|o| is_mirror_owner(o))
                .collect();
            !owners.is_empty()
                && owners.iter().all(|o| {
                    local
                        .service_mirrors
                        .get(&ServiceRef::new(&key.namespace, &o.name))
                        .is_none_or(|m| !owned_by(svc, m))
                })
        })
        .map(|(key, _)| key.clone())
        .collect();
    for key in orphans {
        services.remove(&key);
        deleted.push(key);
    }

    let mut service_mirrors = BTreeMap::new();
    for (key, mirror) in &local.service_mirrors {
        let empty;
        let remote = if local.links.contains_key(&mirror.spec.cluster) {
            Some(match remotes.get(&mirror.spec.cluster) {
                Some(view) => view,
                None => {
                    empty = ClusterView::empty(mirror.spec.cluster.clone());
                    &empty
                }
            })
        } else {
            None
        };
        let outcome = reconcile(
            mirror,
            remote,
            LocalState {
                services: &services,
                cluster_ips: ClusterIps::Allocate(&local.settings.spec.service_cidr),
            },
        );
        let local_ref = ServiceRef::new(mirror.metadata.namespace(), &mirror.spec.service.name);
        match outcome.service {
            Some(svc) => {
                services.insert(local_ref.clone(), svc);
                applied.push(local_ref);
            }
            None => {
                if services
                    .get(&local_ref)
                    .is_some_and(|s| owned_by(s, mirror))
                {
                    services.remove(&local_ref);
                    deleted.push(local_ref);
                }
            }
        }
        let mut mirror = mirror.clone();
        mirror.status = Some(ServiceMirrorStatus {
            conditions: outcome.conditions,
        });
        service_mirrors.insert(key.clone(), mirror);
    }
    Reconciled {
        services,
        service_mirrors,
        applied,
        deleted,
    }
}

#[cfg(test)]
mod tests;
