//! One warm pool per Link to another cluster's gateway, rebuilt when its Link
//! changes, and the probe that tells an operator whether the peer answers.
//!
//! A Link may name the peer gateway by an IP address or by a DNS name (a cloud
//! LoadBalancer's hostname): the pool then follows the name's addresses as
//! [`crate::resolve`] keeps them, without a rebuild.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_vocab::ClusterName;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Gateway, LinkLabels, LinkTarget, lock};
use crate::pool::Pool;
use crate::resolve::GatewayHost;

/// One link's pool, and what it was built from (rebuilt when the Link changes).
pub(super) struct LinkPool {
    target: LinkTarget,
    pub(super) pool: Pool,
    stop: CancellationToken,
    probe: Arc<Mutex<ProbeResult>>,
}

impl LinkPool {
    pub(super) fn view(&self, cluster: &ClusterName) -> LinkView {
        LinkView {
            cluster: cluster.clone(),
            pool: self.pool.clone(),
            probe: lock(&self.probe).clone(),
        }
    }
}

/// A link as `/config` shows it.
#[derive(Clone, Debug)]
pub struct LinkView {
    pub cluster: ClusterName,
    pub pool: Pool,
    pub probe: ProbeResult,
}

/// The last answer of a link's probe: an HTTP/2 PING round trip on the link's own
/// pooled mTLS connection, which the peer gateway's HTTP/2 stack answers without
/// opening a stream or touching any Service. It tells an operator whether the peer
/// is alive and answering on the tunnel; streams follow the pool's own state. The
/// Link's `probeSpec` gives the period; its port and path (the peer's admin port,
/// which is not exposed across clusters) are accepted for compatibility and unused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeResult {
    /// `None` until the first probe has answered.
    pub ok: Option<bool>,
    /// The round trip or the error of the last probe.
    pub detail: String,
    pub latency_ms: Option<u64>,
    pub consecutive_failures: u32,
}

impl Gateway {
    /// Keeps one warm pool per Link, rebuilding those whose Link changed.
    pub(super) fn sync_links(&self) {
        let wanted = self.lookup.links();
        let mut links = lock(&self.links);
        links.retain(|cluster, link| {
            let keep = wanted.get(cluster) == Some(&link.target);
            if !keep {
                link.stop.cancel();
                info!(%cluster, "link removed or changed, closing its pool");
            }
            keep
        });
        for (cluster, target) in wanted {
            if links.contains_key(&cluster) {
                continue;
            }
            if let Some(link) = self.link_pool(&cluster, target) {
                links.insert(cluster, link);
            }
        }
    }

    /// A pool and its probe for the Link to `cluster`; `None` (with a warning) when
    /// the Link cannot be used.
    fn link_pool(&self, cluster: &ClusterName, target: LinkTarget) -> Option<LinkPool> {
        let host = match GatewayHost::parse(&target.address) {
            Ok(host) => host,
            Err(e) => {
                warn!(%cluster, error = %e, "link gateway address unusable; link unusable");
                return None;
            }
        };
        // The peer gateway must hold the Link's identity AND a leaf of the target
        // cluster's issuer: the TLS config checks both.
        let tls = self.tls.link(cluster, &target.identity);
        // Cancelled with the process shutdown, or alone when the Link changes.
        let stop = self.shutdown.child_token();
        info!(%cluster, gateway = %host, port = target.port, identity = %target.identity, "linking to peer gateway");
        let pool = self.cfg.pools.spawn_to(
            format!("link/{cluster}"),
            &host,
            target.port,
            tls,
            self.cfg.pools.connections,
            stop.clone(),
            &self.tasks,
        );
        let probe = Arc::new(Mutex::new(ProbeResult::default()));
        self.tasks.spawn(probe_link(
            cluster.to_string(),
            pool.clone(),
            target.probe_period,
            probe.clone(),
            self.metrics.probe_success(cluster.as_str()),
            stop.clone(),
        ));
        Some(LinkPool {
            target,
            pool,
            stop,
            probe,
        })
    }

    /// Sets `gateway_link_up` for every link.
    pub(super) fn publish_link_health(&self) {
        for (cluster, link) in lock(&self.links).iter() {
            self.metrics
                .link_up
                .get_or_create(&LinkLabels {
                    cluster: cluster.to_string(),
                })
                .set(i64::from(link.pool.state().is_up()));
        }
    }
}

/// Probes one link every `period` until `stop` is cancelled.
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
    let addr = pool.addresses().target().clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let outcome = pool.ping(timeout).await.map_err(|e| e.to_string());
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
