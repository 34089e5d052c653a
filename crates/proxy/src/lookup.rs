//! Adapts the discovery index to proxy-core's [`RouteLookup`] seam.

use proxy_core::addr::OrigDstAddr;
use proxy_core::route::{Authority, ClusterName, Route, RouteLookup};
use proxy_discovery::{Discovery, Route as DiscoveryRoute};

/// Routes from the current discovery snapshot; lookups take no lock.
#[derive(Clone)]
pub struct DiscoveryRoutes {
    pub discovery: Discovery,
}

fn convert(route: Option<&DiscoveryRoute>) -> Route {
    match route {
        Some(DiscoveryRoute::Remote {
            cluster, authority, ..
        }) => match Authority::parse(authority.as_str()) {
            Ok(authority) => Route::Mirrored {
                cluster: ClusterName::new(cluster.as_str()),
                authority,
            },
            // Discovery validated it already; a disagreement means pass through
            // rather than send the connection somewhere unintended.
            Err(_) => Route::Passthrough,
        },
        Some(DiscoveryRoute::Local { .. }) | None => Route::Passthrough,
    }
}

impl RouteLookup for DiscoveryRoutes {
    fn route_addr(&self, dst: OrigDstAddr) -> Route {
        convert(self.discovery.load().lookup_addr(&dst.0))
    }

    fn route_authority(&self, authority: &Authority) -> Route {
        convert(self.discovery.load().lookup_authority(authority.as_str()))
    }
}
