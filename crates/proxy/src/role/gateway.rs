//! The gateway role: proxy-core's [`Gateway`] wired to discovery, this proxy's
//! identity, its metrics and `/config`.

use std::sync::Arc;

use anyhow::Result;
use isthmus_vocab::ports::DEFAULT_INBOUND_PORT;
use isthmus_vocab::{ClusterName, SpiffeId};
use proxy_core::gateway::{
    Gateway, GatewayConfig, GatewayMetrics, GatewayTls, LinkView, ServiceView,
};
use proxy_core::inbound::ListenerRole;
use proxy_core::metrics::Direction;
use proxy_identity::rustls::ClientConfig;
use proxy_identity::{CredentialStore, PeerPolicy};
use serde_json::json;
use tracing::info;

use super::{Base, bind_admin, bind_all, pool_json};
use crate::config::Config;
use crate::lookup::DiscoveryExports;

/// The gateway's client TLS, from this proxy's identity.
struct IdentityTls {
    identity: Arc<CredentialStore>,
    /// What a pod's sidecar must prove: an identity of our trust domain, issued by
    /// our own cluster's issuer.
    pod_policy: PeerPolicy,
}

impl GatewayTls for IdentityTls {
    fn link(&self, cluster: &ClusterName, identity: &SpiffeId) -> Arc<ClientConfig> {
        proxy_identity::client_config(
            self.identity.clone(),
            PeerPolicy::Exact(identity.clone()).in_cluster(cluster.clone()),
        )
    }

    fn pod(&self) -> Arc<ClientConfig> {
        proxy_identity::client_config(self.identity.clone(), self.pod_policy.clone())
    }
}

/// A link as `/config` shows it: its pool and its last probe.
fn link_json(link: &LinkView) -> serde_json::Value {
    let mut entry = pool_json(&link.pool);
    let probe = &link.probe;
    entry["probe"] = json!({
        "ok": probe.ok,
        "detail": probe.detail,
        "latency_ms": probe.latency_ms,
        "consecutive_failures": probe.consecutive_failures,
    });
    entry
}

/// An exported Service's endpoints as the balancer scores them, for `/config`.
fn service_json(service: &ServiceView) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = service
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "address": e.addr.to_string(),
                "state": e.health.as_str(),
                "ewma_ms": (e.ewma_ms * 1000.0).round() / 1000.0,
                "in_flight": e.in_flight,
                "consecutive_failures": e.consecutive_failures,
                "ejections": e.ejections,
            })
        })
        .collect();
    json!(endpoints)
}

pub async fn run(config: Config) -> Result<()> {
    let inbound_listeners = bind_all("inbound-addr", &config.inbound_addrs)?;
    let admin_listener = bind_admin(config.admin_addr).await?;
    let mut base = Base::start(config).await?;

    let metrics = GatewayMetrics::default();
    metrics.register(&mut base.registry);
    let gateway = Gateway::new(
        GatewayConfig {
            cluster: base.cluster.clone(),
            connect_timeout: base.config.limits.connect_timeout,
            own_addrs: inbound_listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .chain(admin_listener.local_addr().ok())
                .collect(),
            allow_local_endpoints: base.config.allow_local_endpoints,
            pod_port: DEFAULT_INBOUND_PORT,
            pools: base.pool_settings(),
            balance: Default::default(),
        },
        Arc::new(DiscoveryExports {
            discovery: base.discovery.clone(),
        }),
        Arc::new(IdentityTls {
            identity: base.identity.clone(),
            pod_policy: base.own_cluster_policy(),
        }),
        metrics,
        base.shutdown.child_token(),
        base.tasks.clone(),
    );
    base.tasks
        .spawn(gateway.clone().follow(base.discovery.subscribe()));

    let inbound = base.inbound(gateway.clone(), ListenerRole::Gateway);
    let tasks = base.serve(inbound_listeners, inbound, Direction::Gateway);
    info!(inbound = ?base.config.inbound_addrs, admin = %base.config.admin_addr, "gateway serving");

    let view = base.config_view("gateway", move || {
        let links: serde_json::Map<String, serde_json::Value> = gateway
            .links()
            .iter()
            .map(|link| (link.cluster.to_string(), link_json(link)))
            .collect();
        let exported: serde_json::Map<String, serde_json::Value> = gateway
            .endpoints()
            .iter()
            .map(|service| (service.service.to_string(), service_json(service)))
            .collect();
        json!({ "links": links, "exported": exported })
    });
    base.run(admin_listener, view, tasks).await
}
