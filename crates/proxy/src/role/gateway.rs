//! The gateway: terminates the mesh tunnel from its cluster's sidecars and from the
//! gateways of linked clusters, and either delivers a stream to a Service its own
//! cluster exports or relays it over the link to the target cluster's gateway.
//!
//! It is never an open relay: streams for its own cluster reach only exported
//! Services (by discovery, whatever the client's headers say), and a peer gateway
//! may not use it to reach a third cluster.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use proxy_core::forward::connect_upstream;
use proxy_core::metrics::Direction;
use proxy_core::pool::{Pool, PoolError};
use proxy_core::route::Authority;
use proxy_core::tunnel::server::{TunnelHandler, TunnelRequest, Upstream};
use proxy_core::tunnel::{BoxIo, Refusal};
use proxy_discovery::model::LinkSpec;
use proxy_discovery::{Discovery, ExportedEndpoint, Refusal as DiscoveryRefusal};
use proxy_identity::{ClusterName, PeerPolicy, SpiffeId};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Base, PoolMaker, bind_admin, bind_all, pool_json};
use crate::config::{Config, DEFAULT_INBOUND_PORT};

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LinkLabels {
    cluster: String,
}

/// One link's pool, and what it was built from (rebuilt when the Link changes).
struct LinkPool {
    spec: LinkSpec,
    pool: Pool,
    stop: CancellationToken,
    probe: Arc<Mutex<ProbeResult>>,
}

/// The last answer of a link's probe: an HTTP/2 PING round trip on the link's own
/// pooled mTLS connection, which the peer gateway's HTTP/2 stack answers without
/// opening a stream or touching any Service. It tells an operator whether the peer
/// is alive and answering on the tunnel; streams follow the pool's own state. The
/// Link's `probeSpec` gives the period; its port and path (the peer's admin port,
/// which is not exposed across clusters) are accepted for compatibility and unused.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct ProbeResult {
    ok: Option<bool>,
    /// The round trip or the error of the last probe.
    detail: String,
    latency_ms: Option<u64>,
    consecutive_failures: u32,
}

/// Probes one link every `probeSpec.period` until `stop` is cancelled.
async fn probe_link(
    cluster: String,
    pool: Pool,
    period: Duration,
    result: Arc<Mutex<ProbeResult>>,
    success: Gauge,
    stop: CancellationToken,
) {
    // A probe may take at most one period, and never more than a few seconds.
    let timeout = period.min(Duration::from_secs(5));
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
    let addr = pool.peer().addr;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let outcome = probe_once(&pool, timeout).await;
        let mut last = lock(&result);
        match outcome {
            Ok(round_trip) => {
                if last.ok == Some(false) {
                    info!(%cluster, %addr, "link probe succeeds again");
                }
                last.ok = Some(true);
                last.detail = format!("PING answered in {round_trip:?}");
                last.latency_ms = Some(u64::try_from(round_trip.as_millis()).unwrap_or(u64::MAX));
                last.consecutive_failures = 0;
            }
            Err(detail) => {
                if last.ok != Some(false) {
                    warn!(%cluster, %addr, %detail, "link probe failed");
                }
                last.ok = Some(false);
                last.detail = detail;
                last.latency_ms = None;
                last.consecutive_failures += 1;
            }
        }
        success.set(i64::from(last.ok == Some(true)));
    }
}

/// One PING round trip on the link's mTLS connection, within `timeout`.
async fn probe_once(pool: &Pool, timeout: Duration) -> Result<Duration, String> {
    pool.ping(timeout).await.map_err(|e| e.to_string())
}

struct GatewayHandler {
    cluster: String,
    discovery: Discovery,
    links: Mutex<HashMap<String, LinkPool>>,
    connect_timeout: Duration,
    next_endpoint: AtomicUsize,
    /// The gateway's own tunnel listener addresses (often wildcards): an endpoint
    /// at one of their ports on an address of this host would be a loop.
    own_addrs: HashSet<SocketAddr>,
    /// `--allow-local-endpoints`: a single-host lab's backends are on loopback.
    allow_local_endpoints: bool,
    /// The tunnel to each meshed pod's sidecar, made on first use.
    pods: Mutex<HashMap<IpAddr, PodTunnel>>,
    maker: PoolMaker,
    /// What a pod's sidecar must prove: an identity of our trust domain, issued by
    /// our own cluster's issuer.
    pod_policy: PeerPolicy,
}

/// The warm tunnel pool to one meshed pod's sidecar (its inbound port), closed
/// when the pod stops being an endpoint.
struct PodTunnel {
    pool: Pool,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GatewayHandler {
    fn pool_for(&self, cluster: &str) -> Option<Pool> {
        lock(&self.links).get(cluster).map(|l| l.pool.clone())
    }

    async fn deliver_local(&self, request: &TunnelRequest) -> Result<BoxIo, Refusal> {
        let endpoints = self
            .discovery
            .load()
            .exported_endpoints_for(request.authority.as_str())
            .map_err(|refusal| match refusal {
                DiscoveryRefusal::NoSuchService | DiscoveryRefusal::NoSuchPort => Refusal::NoRoute,
                DiscoveryRefusal::NotExported => Refusal::NotExported,
                DiscoveryRefusal::NoEndpoints => Refusal::NoEndpoints,
            })?;
        if endpoints.is_empty() {
            return Err(Refusal::NoEndpoints);
        }
        let start = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
        let mut last = Refusal::NoEndpoints;
        // Try each endpoint once, starting round-robin, so one dead pod does not
        // fail the stream while others are up.
        for i in 0..endpoints.len() {
            let endpoint = endpoints[(start + i) % endpoints.len()];
            // Whatever its port, an endpoint on this host reaches the gateway's own
            // admin server (which trusts a loopback peer) or a neighbour on the
            // host, never a pod of the Service. Listeners are wildcards by default:
            // the tunnel's ports are refused even where local endpoints are allowed.
            let local = proxy_core::addr::LocalAddrs::shared();
            if (!self.allow_local_endpoints && local.is_this_host(endpoint.addr.ip()))
                || local.is_own(endpoint.addr, self.own_addrs.iter().map(SocketAddr::port))
            {
                last = Refusal::Loop;
                continue;
            }
            match self.connect_endpoint(endpoint).await {
                Ok(stream) => return Ok(stream),
                Err(refusal) => {
                    warn!(authority = %request.authority, endpoint = %endpoint.addr, meshed = endpoint.meshed, reason = refusal.as_str(), "endpoint unreachable");
                    last = refusal;
                }
            }
        }
        Err(last)
    }

    /// One endpoint: a meshed pod (discovery says so) over its sidecar's tunnel
    /// and never otherwise, an unmeshed one with plain TCP.
    async fn connect_endpoint(&self, endpoint: ExportedEndpoint) -> Result<BoxIo, Refusal> {
        let addr = endpoint.addr;
        if endpoint.meshed {
            let authority = Authority::parse(&addr.to_string()).map_err(|_| Refusal::BadRequest)?;
            // The answer is awaited here, a round trip inside the cluster, so that
            // a pod whose sidecar or app is down is skipped for the next endpoint.
            // Whatever fails, nothing is sent to the pod in plaintext: a sidecar
            // that is down, or that cannot prove an identity of our trust domain,
            // is no reason to drop the encryption and authentication it stands for.
            return match self
                .pod_pool(addr.ip())
                .open_answered(&authority, None)
                .await
            {
                Ok(stream) => Ok(Box::new(stream)),
                Err(e) => {
                    debug!(endpoint = %addr, error = %e, "meshed endpoint unreachable over its sidecar's tunnel");
                    Err(match e {
                        // The sidecar's verdict on its app port stands.
                        PoolError::Refused {
                            refusal:
                                refusal @ (Refusal::UpstreamRefused
                                | Refusal::UpstreamTimeout
                                | Refusal::Loop),
                            ..
                        } => refusal,
                        // No sidecar answers, or something that is not one.
                        _ => Refusal::UpstreamRefused,
                    })
                }
            };
        }
        match connect_upstream(addr, self.connect_timeout).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(Box::new(stream))
            }
            Err(e) if e.is_connect_timeout() => Err(Refusal::UpstreamTimeout),
            Err(_) => Err(Refusal::UpstreamRefused),
        }
    }

    /// The warm tunnel pool to the sidecar of the meshed pod at `ip`, made on
    /// first use.
    fn pod_pool(&self, ip: IpAddr) -> Pool {
        let mut pods = lock(&self.pods);
        if let Some(tunnel) = pods.get(&ip) {
            return tunnel.pool.clone();
        }
        let stop = self.maker.shutdown.child_token();
        let pool = self.maker.pool_with(
            format!("pod/{ip}"),
            SocketAddr::new(ip, DEFAULT_INBOUND_PORT),
            self.pod_policy.clone(),
            1,
            stop.clone(),
        );
        pods.insert(
            ip,
            PodTunnel {
                pool: pool.clone(),
                stop,
            },
        );
        pool
    }

    /// Forgets pods that are no longer anyone's endpoint, closing their pools, so
    /// pod churn does not accumulate connections.
    fn forget_departed_pods(&self) {
        let snapshot = self.discovery.load();
        let view = snapshot.local();
        let live: HashSet<IpAddr> = view
            .endpoints
            .values()
            .flat_map(|e| &e.subsets)
            .flat_map(|s| &s.addresses)
            .map(|a| a.ip)
            .chain(
                view.endpoint_slices
                    .values()
                    .flat_map(|s| &s.endpoints)
                    .flat_map(|e| &e.addresses)
                    .filter_map(|a| a.parse().ok()),
            )
            .collect();
        lock(&self.pods).retain(|ip, tunnel| {
            let keep = live.contains(ip);
            if !keep {
                tunnel.stop.cancel();
            }
            keep
        });
    }
}

impl TunnelHandler for GatewayHandler {
    async fn open(&self, request: &TunnelRequest) -> Result<Upstream, Refusal> {
        let target = request
            .cluster
            .as_ref()
            .map_or(self.cluster.as_str(), |c| c.as_str());
        if target == self.cluster {
            return self.deliver_local(request).await.map(Upstream::Connected);
        }
        // Another cluster: only this cluster's own workloads may go there, those whose
        // leaf verified through our cluster's issuer (the peer's cluster is read from
        // that verified path, never from the chain as sent). Relaying for anyone else,
        // a peer gateway or a workload of a linked cluster, would make this gateway
        // an open relay.
        let from_own_cluster = request
            .peer
            .cluster
            .as_ref()
            .is_some_and(|peer_cluster| peer_cluster.as_str() == self.cluster);
        if !from_own_cluster {
            return Err(Refusal::Forbidden);
        }
        let Some(pool) = self.pool_for(target) else {
            return Err(Refusal::UnknownCluster);
        };
        // Relayed as soon as the stream is open: the client's bytes cross the link
        // behind the CONNECT, and the peer gateway's answer is passed back as it is.
        pool.open(&request.authority, request.cluster.as_ref())
            .await
            .map(Upstream::Relayed)
            .map_err(|e| {
                info!(cluster = target, authority = %request.authority, error = %e, "relay to peer gateway failed");
                e.refusal()
            })
    }
}

/// Keeps one warm pool per Link in discovery, rebuilding those whose Link changed.
fn sync_links(
    maker: &PoolMaker,
    handler: &GatewayHandler,
    probe_success: &Family<LinkLabels, Gauge>,
) {
    let snapshot = handler.discovery.load();
    let mut links = lock(&handler.links);
    let wanted: BTreeMap<String, LinkSpec> = snapshot
        .links()
        .iter()
        .map(|(name, link)| (name.as_str().to_owned(), link.spec.clone()))
        .collect();
    links.retain(|cluster, link| {
        let keep = wanted.get(cluster) == Some(&link.spec);
        if !keep {
            link.stop.cancel();
            info!(%cluster, "link removed or changed, closing its pool");
        }
        keep
    });
    for (cluster, spec) in wanted {
        if links.contains_key(&cluster) {
            continue;
        }
        let ip: IpAddr = match spec.gateway_address.as_str().parse() {
            Ok(ip) => ip,
            Err(_) => {
                warn!(%cluster, address = spec.gateway_address.as_str(), "link gateway address is not an IP address; link unusable");
                continue;
            }
        };
        let identity = match SpiffeId::parse(spec.gateway_identity.as_str()) {
            Ok(id) => id,
            Err(e) => {
                warn!(%cluster, error = %e, "link gateway identity is not a valid SPIFFE ID; link unusable");
                continue;
            }
        };
        // The peer gateway must hold the Link's identity AND a leaf of the target
        // cluster's issuer: gateways may share one SPIFFE ID, and any cluster's issuer
        // can mint any ID, so the ID alone does not say which cluster answers.
        let target = match ClusterName::parse(&cluster) {
            Ok(target) => target,
            Err(e) => {
                warn!(%cluster, error = %e, "link target is not a cluster name; link unusable");
                continue;
            }
        };
        // A child of the process shutdown: cancelled with it, or alone when the
        // Link changes, and no task is needed to tie the two.
        let stop = maker.shutdown.child_token();
        let addr = SocketAddr::new(ip, spec.gateway_port);
        info!(%cluster, %addr, %identity, "linking to peer gateway");
        let pool = maker.pool(
            format!("link/{cluster}"),
            addr,
            PeerPolicy::Exact(identity).in_cluster(target),
            stop.clone(),
        );
        let probe = Arc::new(Mutex::new(ProbeResult::default()));
        let success = probe_success
            .get_or_create(&LinkLabels {
                cluster: cluster.clone(),
            })
            .clone();
        maker.tasks.spawn(probe_link(
            cluster.clone(),
            pool.clone(),
            spec.probe_spec.period.0,
            probe.clone(),
            success,
            stop.clone(),
        ));
        links.insert(
            cluster,
            LinkPool {
                spec,
                pool,
                stop,
                probe,
            },
        );
    }
}

pub async fn run(config: Config) -> Result<()> {
    let inbound_listeners = bind_all("inbound-addr", &config.inbound_addrs)?;
    let admin_listener = bind_admin(config.admin_addr).await?;
    let mut base = Base::start(config).await?;

    let handler = Arc::new(GatewayHandler {
        cluster: base.config.cluster.clone(),
        discovery: base.discovery.clone(),
        links: Mutex::new(HashMap::new()),
        connect_timeout: base.config.limits.connect_timeout,
        next_endpoint: AtomicUsize::new(0),
        own_addrs: inbound_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .chain(admin_listener.local_addr().ok())
            .collect(),
        allow_local_endpoints: base.config.allow_local_endpoints,
        pods: Mutex::new(HashMap::new()),
        maker: base.pool_maker(),
        pod_policy: base.own_cluster_policy(),
    });
    let link_up: Family<LinkLabels, Gauge> = Family::default();
    base.registry.register(
        "gateway_link_up",
        "Whether the link to a peer cluster's gateway has an established connection",
        link_up.clone(),
    );
    let probe_success: Family<LinkLabels, Gauge> = Family::default();
    base.registry.register(
        "gateway_link_probe_success",
        "Whether the last probe of a peer gateway (a PING on the link's mTLS connection, every probeSpec period) succeeded",
        probe_success.clone(),
    );
    let maker = base.pool_maker();
    sync_links(&maker, &handler, &probe_success);
    {
        // Follow discovery changes for links, and publish link health.
        let handler = handler.clone();
        let mut changes = base.discovery.subscribe();
        let shutdown = base.shutdown.clone();
        base.tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = changes.changed() => sync_links(&maker, &handler, &probe_success),
                    _ = tick.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                handler.forget_departed_pods();
                for (cluster, link) in lock(&handler.links).iter() {
                    link_up
                        .get_or_create(&LinkLabels {
                            cluster: cluster.clone(),
                        })
                        .set(i64::from(link.pool.state().is_up()));
                }
            }
        });
    }

    let inbound = base.inbound(handler.clone(), Direction::Gateway);
    let tasks = base.serve(inbound_listeners, inbound, Direction::Gateway);
    info!(inbound = ?base.config.inbound_addrs, admin = %base.config.admin_addr, "gateway serving");

    let view_handler = handler.clone();
    let view = base.config_view("gateway", move || {
        let links: serde_json::Map<String, serde_json::Value> = lock(&view_handler.links)
            .iter()
            .map(|(cluster, link)| {
                let mut entry = pool_json(&link.pool);
                entry["probe"] = json!(lock(&link.probe).clone());
                (cluster.clone(), entry)
            })
            .collect();
        json!({ "links": links })
    });
    base.run(admin_listener, view, tasks).await
}
