//! The gateway: terminates the mesh tunnel from its cluster's sidecars and from the
//! gateways of linked clusters, and either delivers a stream to a Service its own
//! cluster exports or relays it over the link to the target cluster's gateway.
//!
//! It is never an open relay: streams for its own cluster reach only exported
//! Services (by discovery, whatever the client's headers say), and a peer gateway
//! may not use it to reach a third cluster.
//!
//! # Seams
//! Like outbound's [`crate::route::RouteLookup`], the gateway is handed what it
//! must not know the origin of:
//! - a [`GatewayLookup`]: the exported Services' endpoints, the Links, and which
//!   addresses are still endpoints (the proxy adapts discovery's index to it);
//! - a [`GatewayTls`]: the client TLS configs for links and for meshed pods (the
//!   proxy builds them from its identity, with the peer checks they carry).
//!
//! # Layout
//! - [`relay`]: the policy, per stream: deliver, relay or refuse.
//! - [`deliver`]: delivery to pods, meshed or plain.
//! - [`balance`]: which endpoint a stream goes to, by latency, load and failures.
//! - [`observe`]: what an endpoint's answer tells the balancer.
//! - [`links`]: one warm pool per Link and its probe.

mod balance;
mod deliver;
mod links;
mod observe;
mod relay;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use isthmus_vocab::{Authority, ClusterName, Refusal, SpiffeId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pool::{Pool, PoolSettings};

pub use balance::{
    BalanceSettings, DEFAULT_DECAY, DEFAULT_FAILURES_TO_EJECT, DEFAULT_LATENCY_FLOOR, DEFAULT_RTT,
    EndpointView, Health, ServiceView,
};
pub use links::{LinkView, ProbeResult};

/// One endpoint of an exported Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The pod's address and target port.
    pub addr: SocketAddr,
    /// Whether the pod runs a sidecar: then it is reached over the sidecar's mTLS
    /// tunnel only, never with plain TCP.
    pub meshed: bool,
}

/// A Link to another cluster's gateway, as the gateway needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkTarget {
    /// The peer gateway's address as the Link spells it: an IP address, or a DNS
    /// name the link's pool keeps resolved.
    pub address: String,
    pub port: u16,
    /// The SPIFFE ID the peer gateway must present.
    pub identity: SpiffeId,
    /// How often the link is probed.
    pub probe_period: Duration,
    /// The probe's port and path in the Link: accepted for compatibility and
    /// unused (the probe is a PING on the link's own connection), but a change
    /// rebuilds the link as any change of the Link does.
    pub probe_port: u16,
    pub probe_path: String,
}

/// What the gateway asks of discovery. Implementations must not block: the
/// lookup runs once per stream on the runtime's worker threads.
pub trait GatewayLookup: Send + Sync + 'static {
    /// The endpoints of the exported Service `authority` names in this cluster;
    /// [`Refusal::NoRoute`], [`Refusal::NotExported`] or [`Refusal::NoEndpoints`]
    /// when there are none to deliver to.
    fn exported(&self, authority: &Authority) -> Result<Vec<Endpoint>, Refusal>;
    /// Every Link, by target cluster.
    fn links(&self) -> BTreeMap<ClusterName, LinkTarget>;
    /// Whether `ip` is still any Service's endpoint (ready or not): a pod that is
    /// not gets its sidecar tunnel closed.
    fn is_endpoint(&self, ip: IpAddr) -> bool;
}

/// The client TLS configs the gateway dials with; each carries its peer check.
pub trait GatewayTls: Send + Sync + 'static {
    /// For the link to `cluster`'s gateway: it must hold `identity` AND a leaf of
    /// `cluster`'s issuer, since gateways may share one SPIFFE ID and any
    /// cluster's issuer can mint any ID.
    fn link(&self, cluster: &ClusterName, identity: &SpiffeId) -> Arc<rustls::ClientConfig>;
    /// For a meshed pod's sidecar: an identity of our trust domain, issued by our
    /// own cluster's issuer.
    fn pod(&self) -> Arc<rustls::ClientConfig>;
}

/// How the gateway is set up; the wiring fills it from flags.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// This gateway's cluster.
    pub cluster: ClusterName,
    /// Plain TCP to an unmeshed endpoint must connect within this time.
    pub connect_timeout: Duration,
    /// The gateway's own listener addresses (often wildcards): an endpoint at one
    /// of their ports on an address of this host would be a loop.
    pub own_addrs: HashSet<SocketAddr>,
    /// `--allow-local-endpoints`: a single-host lab's backends are on loopback.
    pub allow_local_endpoints: bool,
    /// The port of a meshed pod's sidecar tunnel (its inbound port).
    pub pod_port: u16,
    /// How pools to links and pods connect.
    pub pools: PoolSettings,
    /// How endpoints are scored and ejected.
    pub balance: BalanceSettings,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LinkLabels {
    cluster: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    service: String,
    endpoint: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointStateLabels {
    service: String,
    endpoint: String,
    state: &'static str,
}

/// The gateway's own metrics: link health by cluster, and the exported Services'
/// endpoints as the balancer sees them. Endpoint series exist only for the
/// endpoints the balancer currently knows.
#[derive(Clone, Default)]
pub struct GatewayMetrics {
    link_up: Family<LinkLabels, Gauge>,
    probe_success: Family<LinkLabels, Gauge>,
    endpoint_ewma: Family<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    endpoint_in_flight: Family<EndpointLabels, Gauge>,
    endpoint_state: Family<EndpointStateLabels, Gauge>,
    ejections: Family<ServiceLabels, Counter>,
    /// The endpoint series published last, so departed endpoints' are removed.
    published: Arc<Mutex<HashSet<EndpointLabels>>>,
}

impl GatewayMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gateway_link_up",
            "Whether the link to a peer cluster's gateway has an established connection",
            self.link_up.clone(),
        );
        registry.register(
            "gateway_link_probe_success",
            "Whether the last probe of a peer gateway (a PING on the link's mTLS connection, every probeSpec period) succeeded",
            self.probe_success.clone(),
        );
        registry.register(
            "gateway_endpoint_latency_ewma_ms",
            "An exported Service endpoint's peak-EWMA latency in milliseconds, as the balancer scores it",
            self.endpoint_ewma.clone(),
        );
        registry.register(
            "gateway_endpoint_in_flight",
            "Streams open to an exported Service endpoint",
            self.endpoint_in_flight.clone(),
        );
        registry.register(
            "gateway_endpoint_state",
            "1 for an exported Service endpoint's balancer state (active, ejected, probation), 0 for the others",
            self.endpoint_state.clone(),
        );
        registry.register(
            "gateway_endpoint_ejections",
            "Ejections of an exported Service's endpoints after consecutive failures",
            self.ejections.clone(),
        );
    }

    fn ejections(&self, service: &Authority) -> Counter {
        self.ejections
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .clone()
    }

    /// Sets every known endpoint's series and removes those of departed ones.
    fn publish_endpoints(&self, services: &[ServiceView]) {
        let mut current = HashSet::new();
        for service in services {
            for endpoint in &service.endpoints {
                let labels = EndpointLabels {
                    service: service.service.to_string(),
                    endpoint: endpoint.addr.to_string(),
                };
                self.endpoint_ewma
                    .get_or_create(&labels)
                    .set(endpoint.ewma_ms);
                self.endpoint_in_flight
                    .get_or_create(&labels)
                    .set(i64::try_from(endpoint.in_flight).unwrap_or(i64::MAX));
                for health in Health::ALL {
                    self.endpoint_state
                        .get_or_create(&state_labels(&labels, health))
                        .set(i64::from(health == endpoint.health));
                }
                current.insert(labels);
            }
        }
        let mut published = lock(&self.published);
        for gone in published.difference(&current) {
            self.endpoint_ewma.remove(gone);
            self.endpoint_in_flight.remove(gone);
            for health in Health::ALL {
                self.endpoint_state.remove(&state_labels(gone, health));
            }
        }
        // A Service no longer exported loses its ejection count too.
        let live: HashSet<&str> = current.iter().map(|l| l.service.as_str()).collect();
        for service in published.iter().map(|l| &l.service) {
            if !live.contains(service.as_str()) {
                self.ejections.remove(&ServiceLabels {
                    service: service.clone(),
                });
            }
        }
        *published = current;
    }

    fn probe_success(&self, cluster: &str) -> Gauge {
        self.probe_success
            .get_or_create(&LinkLabels {
                cluster: cluster.to_owned(),
            })
            .clone()
    }
}

/// The gateway's tunnel handler (see the module docs), with its link and pod pools.
pub struct Gateway {
    cfg: GatewayConfig,
    lookup: Arc<dyn GatewayLookup>,
    tls: Arc<dyn GatewayTls>,
    metrics: GatewayMetrics,
    links: Mutex<HashMap<ClusterName, links::LinkPool>>,
    /// The tunnel to each meshed pod's sidecar, made on first use.
    pods: Mutex<HashMap<IpAddr, deliver::PodTunnel>>,
    balancer: balance::Balancer,
    /// The gateway's node of the process's cancellation tree: each link pool's
    /// token is a child of it.
    shutdown: CancellationToken,
    /// Where the pools' and probes' tasks are counted.
    tasks: TaskTracker,
}

impl Gateway {
    /// A gateway with no link pool yet: [`Gateway::follow`] keeps them.
    pub fn new(
        cfg: GatewayConfig,
        lookup: Arc<dyn GatewayLookup>,
        tls: Arc<dyn GatewayTls>,
        metrics: GatewayMetrics,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        let ejections = metrics.clone();
        let balancer = balance::Balancer::new(cfg.balance.clone(), move |service| {
            ejections.ejections(service)
        });
        Arc::new(Self {
            cfg,
            lookup,
            tls,
            metrics,
            links: Mutex::new(HashMap::new()),
            pods: Mutex::new(HashMap::new()),
            balancer,
            shutdown,
            tasks,
        })
    }

    /// Keeps one warm pool per Link (rebuilt when its Link changes) each time
    /// `changes` fires, and every second forgets departed pods and endpoints and
    /// publishes link health and endpoint scores; returns on shutdown.
    pub async fn follow<T: Send + Sync>(self: Arc<Self>, mut changes: watch::Receiver<T>) {
        self.sync_links();
        let shutdown = self.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Once discovery is gone nothing changes any more; health is still published.
        let mut open = true;
        loop {
            tokio::select! {
                changed = changes.changed(), if open => match changed {
                    Ok(()) => self.sync_links(),
                    Err(_) => open = false,
                },
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            self.forget_departed_pods();
            self.balancer
                .retain(|service| self.lookup.exported(service).ok());
            self.metrics.publish_endpoints(&self.balancer.view());
            self.publish_link_health();
        }
    }

    /// Every exported Service the gateway delivered to, with its endpoints'
    /// scores and states, for `/config`.
    pub fn endpoints(&self) -> Vec<ServiceView> {
        self.balancer.view()
    }

    /// Every link with its pool and last probe, for `/config`.
    pub fn links(&self) -> Vec<LinkView> {
        lock(&self.links)
            .iter()
            .map(|(cluster, link)| link.view(cluster))
            .collect()
    }

    fn pool_for(&self, cluster: &str) -> Option<Pool> {
        lock(&self.links).get(cluster).map(|l| l.pool.clone())
    }
}

fn state_labels(endpoint: &EndpointLabels, health: Health) -> EndpointStateLabels {
    EndpointStateLabels {
        service: endpoint.service.clone(),
        endpoint: endpoint.endpoint.clone(),
        state: health.as_str(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
