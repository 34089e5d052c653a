//! The standalone role: the outbound side as an explicit HTTP proxy on loopback, so
//! a developer's process reaches mirrored services by name without iptables
//! (`HTTPS_PROXY=http://127.0.0.1:4140`, or `curl -x`).

use std::sync::Arc;

use anyhow::Result;
use proxy_core::explicit::Explicit;
use proxy_core::metrics::Direction;
use serde_json::json;
use tracing::info;

use super::{Base, bind_admin, bind_all, pool_json};
use crate::config::Config;
use crate::lookup::DiscoveryRoutes;

pub async fn run(config: Config) -> Result<()> {
    let listeners = bind_all("outbound-addr", &config.outbound_addrs)?;
    let admin_listener = bind_admin(config.admin_addr).await?;
    let base = Base::start(config).await?;
    let gateway = base.cluster_gateway().await?;
    let explicit = Arc::new(Explicit {
        lookup: DiscoveryRoutes {
            discovery: base.discovery.clone(),
        },
        gateway: gateway.clone(),
        connect_timeout: base.config.limits.connect_timeout,
        http: base.config.limits.http_settings(),
        forward: base.forward_config(),
        metrics: base.metrics.clone(),
    });
    let tasks = base.serve(listeners, explicit, Direction::Outbound);
    info!(listen = ?base.config.outbound_addrs, "standalone proxy serving (HTTP CONNECT and absolute-form)");

    let view = base.config_view(
        "standalone",
        move || json!({ "gateway": gateway.as_ref().map(pool_json) }),
    );
    base.run(admin_listener, view, tasks).await
}
