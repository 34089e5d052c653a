//! Adapts discovery's indexes to proxy-core's seams: [`RouteLookup`] for the
//! sidecar and explicit proxy, [`GatewayLookup`] for the gateway.
//!
//! Discovery and the hot path share the vocabulary's [`Authority`] and
//! [`ClusterName`](isthmus_vocab::ClusterName), so a route is moved across, never
//! re-parsed: there is no second grammar to disagree with.

use std::collections::BTreeMap;
use std::net::IpAddr;

use isthmus_vocab::{Authority, ClusterName, Refusal};
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
            cluster,
            authority,
            policy,
            ..
        }) => Route::Mirrored {
            cluster: cluster.clone(),
            authority: authority.clone(),
            policy: policy.clone(),
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

    fn links(&self) -> BTreeMap<ClusterName, LinkTarget> {
        self.discovery
            .load()
            .links()
            .iter()
            .map(|(cluster, link)| {
                let spec = &link.spec;
                let target = LinkTarget {
                    address: spec.gateway_address.as_str().to_owned(),
                    port: spec.gateway_port,
                    identity: spec.gateway_identity.clone(),
                    probe_period: spec.probe_spec.period.0,
                    probe_port: spec.probe_spec.port,
                    probe_path: spec.probe_spec.path.clone(),
                };
                (cluster.clone(), target)
            })
            .collect()
    }

    fn is_endpoint(&self, ip: IpAddr) -> bool {
        self.discovery.load().exports().endpoint_ips().contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proxy_discovery::Snapshot;
    use proxy_discovery::model::{ClusterView, parse_manifests};

    use super::*;

    const MANIFESTS: &str = "apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata: {name: a}
spec: {clusterName: cluster-a, exportedNamespaces: [default]}
---
apiVersion: multicluster.isthmus.io/v1alpha1
kind: Link
metadata: {name: cluster-b}
spec:
  targetClusterName: cluster-b
  gatewayAddress: 198.18.0.2
  gatewayPort: 15443
  gatewayIdentity: spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway
---
apiVersion: v1
kind: Service
metadata: {name: hello}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: hidden, namespace: private}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: idle}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-abc, labels: {kubernetes.io/service-name: hello}}
addressType: IPv4
endpoints:
- addresses: [198.18.1.10]
ports: [{name: http, port: 8080}]
";

    fn exports() -> DiscoveryExports {
        let cluster = ClusterName::parse("cluster-a").unwrap();
        let objects = parse_manifests("a.yaml", MANIFESTS).unwrap();
        let view = ClusterView::build(cluster, objects).unwrap();
        DiscoveryExports {
            discovery: Discovery::new(Snapshot::build(view, BTreeMap::new())),
        }
    }

    fn exported(lookup: &DiscoveryExports, authority: &str) -> Result<Vec<Endpoint>, Refusal> {
        lookup.exported(&Authority::parse(authority).unwrap())
    }

    #[test]
    fn discoverys_answers_become_the_gateways_refusals() {
        let lookup = exports();
        assert_eq!(
            exported(&lookup, "hello.default.svc.cluster.local:80"),
            Ok(vec![Endpoint {
                addr: "198.18.1.10:8080".parse().unwrap(),
                meshed: false
            }])
        );
        for (authority, refusal) in [
            ("hidden.private:80", Refusal::NotExported),
            ("idle.default:80", Refusal::NoEndpoints),
            ("nothing.default:80", Refusal::NoRoute),
            ("hello.default:81", Refusal::NoRoute),
            ("hello.default.svc.other.domain:80", Refusal::NoRoute),
        ] {
            assert_eq!(exported(&lookup, authority), Err(refusal), "{authority}");
        }
        assert!(lookup.is_endpoint("198.18.1.10".parse().unwrap()));
        assert!(!lookup.is_endpoint("198.18.1.11".parse().unwrap()));
    }

    #[test]
    fn links_carry_what_the_gateway_dials() {
        let links = exports().links();
        let link = &links[&ClusterName::parse("cluster-b").unwrap()];
        assert_eq!(link.address, "198.18.0.2");
        assert_eq!(link.port, 15443);
        assert_eq!(
            link.identity.as_str(),
            "spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway"
        );
        assert_eq!(links.len(), 1);
    }
}
