use std::collections::BTreeMap;

use super::*;
use crate::model::parse_manifests;
use crate::snapshot::Snapshot;

const LOCAL: &str = "apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata: {name: b}
spec:
  clusterName: cluster-b
  clusterDomain: b.example
  serviceCIDR: 198.18.128.0/24
  gateway: {address: 198.18.0.2, identity: spiffe://cluster-b.local/ns/isthmus/sa/gateway}
---
apiVersion: multicluster.isthmus.io/v1alpha1
kind: Link
metadata: {name: cluster-a}
spec:
  targetClusterName: cluster-a
  gatewayAddress: 198.18.0.1
  gatewayIdentity: spiffe://cluster-a.local/ns/isthmus/sa/gateway
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [198.18.128.10, \"2001:2::10\"]
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: linkerd.io/v1alpha1
kind: ServiceMirror
metadata: {name: hello-mirror, namespace: default}
spec: {cluster: cluster-a, service: {name: hello, namespace: apps}}
";

const REMOTE: &str = "apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata: {name: a}
spec: {clusterName: cluster-a, clusterDomain: a.example, exportedNamespaces: [apps]}
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: apps}
spec: {ports: [{port: 8080}]}
";

fn snapshot() -> Snapshot {
    let b = ClusterName::parse("cluster-b").unwrap();
    let a = ClusterName::parse("cluster-a").unwrap();
    let local = ClusterView::build(b, parse_manifests("l.yaml", LOCAL).unwrap()).unwrap();
    let remote = ClusterView::build(a.clone(), parse_manifests("r.yaml", REMOTE).unwrap()).unwrap();
    Snapshot::build(local, BTreeMap::from([(a, remote)]))
}

#[test]
fn local_services_by_address_and_authority() {
    let s = snapshot();
    let want = Route::Local {
        service: ServiceRef::new("shop", "web"),
        port: 80,
    };
    assert_eq!(
        s.lookup_addr(&"198.18.128.10:80".parse().unwrap()),
        Some(&want)
    );
    assert_eq!(
        s.lookup_addr(&"[2001:2::10]:80".parse().unwrap()),
        Some(&want)
    );
    for a in [
        "web.shop.svc.b.example:80",
        "web.shop.svc:80",
        "web.shop:80",
        "WEB.Shop.SVC.b.example.:80",
    ] {
        assert_eq!(s.lookup_authority(a), Some(&want), "{a}");
    }
    // UDP ports are not captured, so not indexed; wrong ports and names miss.
    assert_eq!(s.lookup_addr(&"198.18.128.10:53".parse().unwrap()), None);
    assert_eq!(s.lookup_addr(&"198.18.128.10:81".parse().unwrap()), None);
    assert_eq!(s.lookup_authority("web.shop.svc.cluster.local:80"), None);
    assert_eq!(s.lookup_authority("web.shop.svc.b.example"), None);
    assert_eq!(s.lookup_authority(&format!("{}:80", "a".repeat(400))), None);
}

#[test]
fn mirrored_services_route_to_the_remote_authority_via_the_gateway() {
    let s = snapshot();
    let mirrored = s.service("default", "hello").unwrap();
    let ip = mirrored.cluster_ips()[0];
    let route = s.lookup_addr(&SocketAddr::new(ip, 8080)).unwrap();
    let Route::Remote {
        service,
        cluster,
        authority,
        gateway,
        ..
    } = route
    else {
        panic!("{route:?}")
    };
    assert_eq!(service, &ServiceRef::new("default", "hello"));
    assert_eq!(cluster.as_str(), "cluster-a");
    // The remote name, namespace and domain, not the local ones.
    assert_eq!(authority.as_str(), "hello.apps.svc.a.example:8080");
    let gw = gateway.as_ref().unwrap();
    assert_eq!((gw.address.as_str(), gw.port), ("198.18.0.2", 4143));
    assert_eq!(
        s.lookup_authority("hello.default.svc.b.example:8080"),
        Some(route)
    );
}

#[test]
fn serialises_for_config() {
    let s = snapshot();
    let json = serde_json::to_value(s.index()).unwrap();
    assert_eq!(json["addresses"]["198.18.128.10:80"]["route"], "local");
    assert_eq!(json["authorities"]["web.shop:80"]["service"]["name"], "web");
    assert_eq!(s.index().addr_len(), 3);
    assert_eq!(s.index().authority_len(), 6);
}

/// The ServiceMirror's policy annotations reach the route (and `/config`); a value
/// that does not parse is named in the mirror's status and only it is ignored.
#[test]
fn a_mirrors_policy_annotations_ride_its_route() {
    let annotated = LOCAL.replace(
        "metadata: {name: hello-mirror, namespace: default}",
        "metadata:
  name: hello-mirror
  namespace: default
  annotations:
    timeout.isthmus.io/request: 200ms
    retry.isthmus.io/limit: \"5\"
    retry.isthmus.io/http: sometimes",
    );
    let b = ClusterName::parse("cluster-b").unwrap();
    let a = ClusterName::parse("cluster-a").unwrap();
    let local = ClusterView::build(b, parse_manifests("l.yaml", &annotated).unwrap()).unwrap();
    let remote = ClusterView::build(a.clone(), parse_manifests("r.yaml", REMOTE).unwrap()).unwrap();
    let s = Snapshot::build(local, BTreeMap::from([(a, remote)]));
    let Some(Route::Remote { policy, .. }) = s.lookup_authority("hello.default.svc.b.example:8080")
    else {
        panic!("no remote route")
    };
    assert_eq!(
        **policy,
        ServicePolicy {
            request_timeout: Some(std::time::Duration::from_millis(200)),
            retry_limit: 5,
            ..ServicePolicy::default()
        }
    );
    let json = serde_json::to_value(s.index()).unwrap();
    let shown = &json["authorities"]["hello.default.svc.b.example:8080"]["policy"];
    assert_eq!(shown["request_timeout"], "200ms");
    assert_eq!(shown["retry_limit"], 5);
    assert_eq!(shown["response_timeout"], serde_json::Value::Null);
    let mirror = s.service_mirror("default", "hello-mirror").unwrap();
    let status = serde_json::to_string(&mirror.status).unwrap();
    assert!(
        status.contains("annotation retry.isthmus.io/http: \\\"sometimes\\\""),
        "{status}"
    );
}
