//! The sidecar: outbound (the app's connections, by original destination) and
//! inbound (plain TCP for the app, and the mesh tunnel terminated with the pod's
//! identity), delivered to the app at the pod's own address unless the pod opted
//! in to loopback delivery (`--inbound-loopback`).

use std::sync::Arc;

use anyhow::Result;
use proxy_core::addr::KernelOrigDst;
use proxy_core::inbound::{AppAddress, ListenerRole, LocalDelivery};
use proxy_core::metrics::Direction;
use proxy_core::outbound::{Outbound, OutboundConfig};
use serde_json::json;
use tracing::info;

use super::{Base, bind_admin, bind_all, pool_json};
use crate::config::Config;
use crate::lookup::DiscoveryRoutes;

pub async fn run(config: Config) -> Result<()> {
    let outbound_listeners = bind_all("outbound-addr", &config.outbound_addrs)?;
    let inbound_listeners = bind_all("inbound-addr", &config.inbound_addrs)?;
    let admin_listener = bind_admin(config.admin_addr).await?;
    let base = Base::start(config).await?;
    let proxy_ports = base.config.proxy_ports();

    let gateway = base.cluster_gateway().await?;

    let outbound = Arc::new(Outbound {
        lookup: DiscoveryRoutes {
            discovery: base.discovery.clone(),
        },
        gateway: gateway.clone(),
        orig_dst: Arc::new(KernelOrigDst),
        cfg: OutboundConfig {
            connect_timeout: base.config.limits.connect_timeout,
            detect: base.detect_config(),
            opaque_ports: base.config.opaque_ports.clone(),
            forward: base.forward_config(),
            proxy_ports: proxy_ports.clone(),
        },
        http: base.http_proxy(Direction::Outbound),
        metrics: base.metrics.clone(),
        retry_budgets: Default::default(),
    });

    let app = base.config.app_address();
    if app == AppAddress::Loopback {
        info!(
            "--inbound-loopback: delivering inbound traffic to the app on loopback, where listeners bound to loopback only are reachable from the mesh"
        );
    }
    let delivery = Arc::new(LocalDelivery {
        app,
        connect_timeout: base.config.limits.connect_timeout,
        proxy_ports: proxy_ports.clone(),
    });
    let inbound = base.inbound(delivery, ListenerRole::Sidecar);

    let mut tasks = base.serve(outbound_listeners, outbound, Direction::Outbound);
    tasks.extend(base.serve(inbound_listeners, inbound, Direction::Inbound));
    info!(
        outbound = ?base.config.outbound_addrs,
        inbound = ?base.config.inbound_addrs,
        admin = %base.config.admin_addr,
        "sidecar serving"
    );

    let view = base.config_view("sidecar", move || {
        json!({
            "gateway": gateway.as_ref().map(pool_json),
            "inbound_loopback": app == AppAddress::Loopback,
        })
    });
    base.run(admin_listener, view, tasks).await
}
