//! The route index the hot path reads: original destination `IP:port`, or a
//! service authority, to a [`Route`].
//!
//! An [`Index`] is built once per snapshot and never changed; a new one replaces it
//! whole (see [`crate::source::Discovery`]), so a lookup is a `HashMap` get with no
//! lock and no allocation. What to do with a route (dial, tunnel, refuse) is the
//! proxy's business.

pub mod exported;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use isthmus_vocab::{Authority, ClusterName, ServicePolicy, SpiffeId};
use serde::Serialize;

use crate::model::policy::read_policy;
use crate::model::{
    ClusterView, GatewayAddress, MIRRORED_SERVICE_LABEL, REMOTE_CLUSTER_LABEL,
    REMOTE_DOMAIN_ANNOTATION, REMOTE_SERVICE_ANNOTATION, Service, ServiceRef,
};

/// Where a connection to a service address goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "route", rename_all = "snake_case")]
pub enum Route {
    /// A Service of this cluster: pass the connection through to its original
    /// destination untouched.
    Local {
        /// The Service.
        service: ServiceRef,
        /// The Service port.
        port: u16,
    },
    /// A mirrored Service: tunnel to `cluster` through this cluster's gateway.
    Remote {
        /// The local mirrored Service (for logs and metrics).
        service: ServiceRef,
        /// The cluster the Service lives in.
        cluster: ClusterName,
        /// The remote Service's authority: its name and namespace in the remote
        /// cluster, the remote cluster's domain, and the port
        /// (`hello.default.svc.cluster.local:80`).
        authority: Authority,
        /// This cluster's gateway; `None` when ClusterSettings names none, in
        /// which case the connection cannot be tunnelled and must be refused.
        gateway: Option<GatewayRef>,
        /// The Service's timeouts and retries, from its policy annotations.
        #[serde(serialize_with = "serialize_policy")]
        policy: Arc<ServicePolicy>,
    },
}

/// A policy as `/config` shows it: durations as text, absent settings as `null`.
fn serialize_policy<S: serde::Serializer>(
    policy: &Arc<ServicePolicy>,
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct View {
        request_timeout: Option<String>,
        response_timeout: Option<String>,
        retry_limit: u32,
        retry_timeout: Option<String>,
        retry_statuses: Vec<String>,
        retry_any_method: bool,
    }
    let text = |d: Option<std::time::Duration>| d.map(|d| crate::model::GoDuration(d).to_string());
    View {
        request_timeout: text(policy.request_timeout),
        response_timeout: text(policy.response_timeout),
        retry_limit: policy.retry_limit,
        retry_timeout: text(policy.retry_timeout),
        retry_statuses: policy
            .retry_statuses
            .iter()
            .map(|r| r.to_string())
            .collect(),
        retry_any_method: policy.retry_any_method,
    }
    .serialize(s)
}

/// A gateway to dial, and the identity it must prove.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct GatewayRef {
    /// IP address or DNS name.
    pub address: GatewayAddress,
    /// Tunnel port.
    pub port: u16,
    /// The SPIFFE ID the gateway must present.
    pub identity: SpiffeId,
}

/// Longest authority the slow path normalises without allocating: a 253-byte DNS
/// name, `:` and a 5-digit port, rounded up.
const MAX_AUTHORITY: usize = 272;

/// Immutable lookup tables from address and authority to route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    by_addr: HashMap<SocketAddr, Route>,
    /// Keys are lowercase, without trailing dot.
    by_authority: HashMap<Box<str>, Route>,
}

impl Index {
    /// Indexes every TCP port of every Service of `cluster` (mirrored ones
    /// included, as the reconcile left them): each ClusterIP:port, and the
    /// authorities `name.ns.svc.<clusterDomain>:port`, `name.ns.svc:port` and
    /// `name.ns:port`. `gateway` is this cluster's gateway, put into remote routes.
    pub fn build(cluster: &ClusterView, gateway: Option<&GatewayRef>) -> Self {
        let mut index = Self::default();
        let domain = &cluster.settings.spec.cluster_domain;
        for (key, svc) in &cluster.services {
            let remote = remote_of(svc);
            if svc.metadata.has_label(MIRRORED_SERVICE_LABEL, "true") && remote.is_none() {
                tracing::warn!(service = %key,
                    "mirrored Service lacks valid remote-cluster/remote-service labels; routing it as local");
            }
            let policy = remote.as_ref().map(|_| {
                let (policy, ignored) = read_policy(&svc.metadata.annotations);
                for error in ignored {
                    tracing::warn!(service = %key, "mirrored Service {error}");
                }
                Arc::new(policy)
            });
            for sp in svc.spec.ports.iter().filter(|p| p.is_tcp()) {
                let route = match (&remote, &policy) {
                    (Some((cluster, host)), Some(policy)) => {
                        match Authority::from_parts(host, sp.port) {
                            Ok(authority) => Route::Remote {
                                service: key.clone(),
                                cluster: cluster.clone(),
                                authority,
                                gateway: gateway.cloned(),
                                policy: policy.clone(),
                            },
                            // Port 0, which manifests refuse already: no route rather
                            // than a tunnel to an authority the far gateway refuses.
                            Err(e) => {
                                tracing::warn!(service = %key, error = %e, "mirrored Service port has no valid authority; not routed");
                                continue;
                            }
                        }
                    }
                    _ => Route::Local {
                        service: key.clone(),
                        port: sp.port,
                    },
                };
                for ip in svc.cluster_ips() {
                    index
                        .by_addr
                        .insert(SocketAddr::new(ip, sp.port), route.clone());
                }
                let (name, ns, port) = (&key.name, &key.namespace, sp.port);
                for host in [
                    format!("{name}.{ns}.svc.{domain}"),
                    format!("{name}.{ns}.svc"),
                    format!("{name}.{ns}"),
                ] {
                    index
                        .by_authority
                        .insert(format!("{host}:{port}").into_boxed_str(), route.clone());
                }
            }
        }
        index
    }

    /// The route for an original destination (ClusterIP:port, IPv4 or IPv6).
    pub fn lookup_addr(&self, addr: &SocketAddr) -> Option<&Route> {
        self.by_addr.get(addr)
    }

    /// The route for `name.ns.svc.<domain>:port`, `name.ns.svc:port` or
    /// `name.ns:port`, in any case, with or without a trailing dot on the host.
    /// An authority without a port is not guessed at: the caller knows the scheme.
    pub fn lookup_authority(&self, authority: &str) -> Option<&Route> {
        // Clients nearly always send the normalised form: try it as is first, so a
        // hit costs one hash lookup, and only rework what could match after folding.
        if let Some(route) = self.by_authority.get(authority) {
            return Some(route);
        }
        let (host, port) = authority.rsplit_once(':')?;
        let needs_normalising = host.ends_with('.') || host.bytes().any(|b| b.is_ascii_uppercase());
        if !needs_normalising {
            return None;
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        let len = host.len() + 1 + port.len();
        if len > MAX_AUTHORITY {
            return None;
        }
        // Normalise on the stack: the hot path does not allocate.
        let mut buf = [0u8; MAX_AUTHORITY];
        buf[..host.len()].copy_from_slice(host.as_bytes());
        buf[..host.len()].make_ascii_lowercase();
        buf[host.len()] = b':';
        buf[host.len() + 1..len].copy_from_slice(port.as_bytes());
        // ASCII case folding keeps UTF-8 valid, so this cannot fail for a &str input.
        let key = std::str::from_utf8(&buf[..len]).ok()?;
        self.by_authority.get(key)
    }

    /// Number of address entries.
    pub fn addr_len(&self) -> usize {
        self.by_addr.len()
    }

    /// Number of authority entries.
    pub fn authority_len(&self) -> usize {
        self.by_authority.len()
    }

    /// All address entries, sorted (for `/config` and tests; not for the hot path).
    pub fn addrs(&self) -> BTreeMap<SocketAddr, &Route> {
        self.by_addr.iter().map(|(k, v)| (*k, v)).collect()
    }

    /// All authority entries, sorted (for `/config` and tests; not for the hot path).
    pub fn authorities(&self) -> BTreeMap<&str, &Route> {
        self.by_authority.iter().map(|(k, v)| (&**k, v)).collect()
    }
}

impl Serialize for Index {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            addresses: BTreeMap<String, &'a Route>,
            authorities: BTreeMap<&'a str, &'a Route>,
        }
        View {
            addresses: self
                .by_addr
                .iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            authorities: self.authorities(),
        }
        .serialize(s)
    }
}

/// The cluster and the host (`name.ns.svc.<domain>`) of the remote Service a
/// mirrored Service stands for, from the labels and annotations the reconcile writes.
fn remote_of(svc: &Service) -> Option<(ClusterName, String)> {
    let meta = &svc.metadata;
    if !meta.has_label(MIRRORED_SERVICE_LABEL, "true") {
        return None;
    }
    let cluster = ClusterName::parse(meta.labels.get(REMOTE_CLUSTER_LABEL)?).ok()?;
    let (name, ns) = meta
        .annotations
        .get(REMOTE_SERVICE_ANNOTATION)?
        .split_once('.')?;
    let domain = meta
        .annotations
        .get(REMOTE_DOMAIN_ANNOTATION)
        .map_or(crate::model::DEFAULT_DOMAIN, String::as_str);
    // The pieces end up in an authority; only accept what makes a valid one, in
    // the authority's canonical spelling.
    let probe = Authority::parse(&format!("{name}.{ns}.svc.{domain}:1")).ok()?;
    Some((cluster, probe.host().to_owned()))
}

#[cfg(test)]
mod tests;
