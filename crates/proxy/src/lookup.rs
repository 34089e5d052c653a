//! Adapts the discovery index to proxy-core's [`RouteLookup`] seam.
//!
//! Discovery and the hot path share the vocabulary's [`Authority`] and
//! [`ClusterName`](isthmus_vocab::ClusterName), so a route is moved across, never
//! re-parsed: there is no second grammar to disagree with.

use isthmus_vocab::Authority;
use proxy_core::addr::OrigDstAddr;
use proxy_core::route::{Route, RouteLookup};
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
        }) => Route::Mirrored {
            cluster: cluster.clone(),
            authority: authority.clone(),
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
