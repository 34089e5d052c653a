//! The sidecar: outbound (the app's connections, by original destination) and
//! inbound (plain TCP for the app, and the mesh tunnel terminated with the pod's
//! identity).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::Result;
use proxy_core::addr::KernelOrigDst;
use proxy_core::inbound::{Inbound, InboundConfig, LocalDelivery};
use proxy_core::metrics::Direction;
use proxy_core::outbound::{Outbound, OutboundConfig};
use proxy_core::tunnel::H2Settings;
use proxy_core::tunnel::server::TunnelServer;
use serde_json::json;
use tracing::info;

use super::{Base, bind_admin, bind_all};
use crate::config::Config;
use crate::lookup::DiscoveryRoutes;

pub async fn run(config: Config) -> Result<()> {
    let outbound_listeners = bind_all("outbound-addr", &config.outbound_addrs)?;
    let inbound_listeners = bind_all("inbound-addr", &config.inbound_addrs)?;
    let admin_listener = bind_admin(config.admin_addr).await?;
    let base = Base::start(config).await?;
    let proxy_ports = base.config.proxy_ports();

    let gateway = base.cluster_gateway()?;

    let outbound = Arc::new(Outbound {
        lookup: DiscoveryRoutes {
            discovery: base.discovery.clone(),
        },
        gateway: gateway.clone(),
        orig_dst: Arc::new(KernelOrigDst),
        cfg: OutboundConfig {
            connect_timeout: base.config.connect_timeout,
            detect: base.detect_config(),
            opaque_ports: base.config.opaque_ports.clone(),
            forward: base.forward_config(),
            proxy_ports: proxy_ports.clone(),
        },
        http: base.http_proxy(Direction::Outbound),
        metrics: base.metrics.clone(),
    });

    let delivery = Arc::new(LocalDelivery {
        app_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        connect_timeout: base.config.connect_timeout,
        proxy_ports: proxy_ports.clone(),
    });
    let tunnel = TunnelServer::new(
        delivery,
        H2Settings::default(),
        base.forward_config(),
        base.metrics.clone(),
        Direction::Inbound,
    );
    let inbound = Arc::new(Inbound {
        tls: Some(proxy_identity::server_config(
            base.identity.clone(),
            base.own_trust_domain_policy(),
        )),
        peer_name: |conn| proxy_identity::peer_identity(conn).map(|id| Arc::from(id.to_string())),
        handshake_failed: base.handshake_observer(),
        tunnel,
        orig_dst: Arc::new(KernelOrigDst),
        cfg: InboundConfig {
            connect_timeout: base.config.connect_timeout,
            detect: base.detect_config(),
            opaque_ports: base.config.opaque_ports.clone(),
            forward: base.forward_config(),
            proxy_ports,
            tls_handshake_timeout: base.config.connect_timeout,
        },
        http: base.http_proxy(Direction::Inbound),
        metrics: base.metrics.clone(),
    });

    let mut tasks = base.serve(outbound_listeners, outbound, Direction::Outbound);
    tasks.extend(base.serve(inbound_listeners, inbound, Direction::Inbound));
    info!(
        outbound = ?base.config.outbound_addrs,
        inbound = ?base.config.inbound_addrs,
        admin = %base.config.admin_addr,
        "sidecar serving"
    );

    let identity = base.identity.clone();
    let discovery = base.discovery.clone();
    let cluster = base.config.cluster.clone();
    let view = Arc::new(move || {
        json!({
            "role": "sidecar",
            "cluster": cluster,
            "identity": identity.status(),
            "discovery": {
                "status": discovery.status(),
                "snapshot": discovery.snapshot().to_json(),
            },
            "gateway": gateway.as_ref().map(|pool| json!({
                "peer": pool.peer().name.as_ref(),
                "addr": pool.peer().addr.to_string(),
                "state": format!("{:?}", pool.state()),
            })),
        })
    });
    base.run(admin_listener, view, tasks).await
}
