//! Adapts discovery's indexes to proxy-core's seams: [`RouteLookup`] for the
//! sidecar and explicit proxy, [`GatewayLookup`] for the gateway.
//!
//! Discovery and the hot path share the vocabulary's [`Authority`] and
//! [`ClusterName`](isthmus_vocab::ClusterName), so a route is moved across, never
//! re-parsed: there is no second grammar to disagree with.

use std::collections::BTreeMap;
use std::net::IpAddr;

use isthmus_vocab::{Authority, Refusal};
use proxy_core::addr::OrigDstAddr;
use proxy_core::gateway::{Endpoint, GatewayLookup, LinkTarget};
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

/// The gateway's view of discovery: exported Services' endpoints from the
/// snapshot's export index, Links, and which addresses are still endpoints.
#[derive(Clone)]
pub struct DiscoveryExports {
    pub discovery: Discovery,
}

impl GatewayLookup for DiscoveryExports {
    fn exported(&self, authority: &Authority) -> Result<Vec<Endpoint>, Refusal> {
        let snapshot = self.discovery.load();
        let endpoints = snapshot
            .exported_endpoints_for(authority.as_str())
            .map_err(Refusal::from)?;
        Ok(endpoints
            .iter()
            .map(|e| Endpoint {
                addr: e.addr,
                meshed: e.meshed,
            })
            .collect())
    }

    fn links(&self) -> BTreeMap<String, LinkTarget> {
        self.discovery
            .load()
            .links()
            .iter()
            .map(|(cluster, link)| {
                let spec = &link.spec;
                let target = LinkTarget {
                    address: spec.gateway_address.as_str().to_owned(),
                    port: spec.gateway_port,
                    identity: spec.gateway_identity.as_str().to_owned(),
                    probe_period: spec.probe_spec.period.0,
                    probe_port: spec.probe_spec.port,
                    probe_path: spec.probe_spec.path.clone(),
                };
                (cluster.as_str().to_owned(), target)
            })
            .collect()
    }

    fn is_endpoint(&self, ip: IpAddr) -> bool {
        self.discovery.load().exports().endpoint_ips().contains(&ip)
    }
}
