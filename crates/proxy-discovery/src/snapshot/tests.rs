use super::*;
use crate::model::parse_manifests;

fn snap(yaml: &str) -> Snapshot {
    let name = ClusterName::parse("cluster-a").unwrap();
    Snapshot::build(
        ClusterView::build(name, parse_manifests("a.yaml", yaml).unwrap()).unwrap(),
        BTreeMap::new(),
    )
}

const SETTINGS: &str = "apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata: {name: a}
spec: {clusterName: cluster-a, exportedNamespaces: [default]}
---
";

const HELLO: &str = "apiVersion: v1
kind: Service
metadata: {name: hello}
spec:
  ports: [{name: http, port: 80, targetPort: web}]
  selector: {app: hello}
---
";

#[test]
fn refusals() {
    let s = snap(HELLO);
    assert_eq!(
        s.exported_target("default", "nope", 80),
        Err(Refusal::NoSuchService)
    );
    assert_eq!(
        s.exported_target("default", "hello", 80),
        Err(Refusal::NotExported)
    );
    let s = snap(&format!("{SETTINGS}{HELLO}"));
    assert_eq!(
        s.exported_target("default", "hello", 81),
        Err(Refusal::NoSuchPort)
    );
    assert_eq!(
        s.exported_target("default", "hello", 80),
        Err(Refusal::NoEndpoints)
    );
}

#[test]
fn endpoints_by_port_name() {
    let eps = "apiVersion: v1
kind: Endpoints
metadata: {name: hello}
subsets:
- addresses: [{ip: 198.18.0.20}, {ip: 198.18.0.10}]
  notReadyAddresses: [{ip: 198.18.0.30}]
  ports: [{name: http, port: 8080}, {name: other, port: 1}]
";
    let s = snap(&format!("{SETTINGS}{HELLO}{eps}"));
    let got = s.exported_target("default", "hello", 80).unwrap();
    assert_eq!(
        got,
        vec![
            "198.18.0.10:8080".parse().unwrap(),
            "198.18.0.20:8080".parse().unwrap()
        ]
    );
}

#[test]
fn named_target_port_through_deployment_container_ports() {
    let eps = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: hello}\nsubsets: [{addresses: [{ip: 198.18.0.10}]}]\n---\n";
    let dep = "apiVersion: apps/v1
kind: Deployment
metadata: {name: hello-deployment}
spec:
  template:
    metadata: {labels: {app: hello, tier: x}}
    spec:
      containers: [{name: hello, image: i, ports: [{containerPort: 8080, name: web}]}]
";
    let s = snap(&format!("{SETTINGS}{HELLO}{eps}"));
    assert_eq!(
        s.exported_target("default", "hello", 80),
        Err(Refusal::NoSuchPort)
    );
    let s = snap(&format!("{SETTINGS}{HELLO}{eps}{dep}"));
    assert_eq!(
        s.exported_target("default", "hello", 80).unwrap(),
        vec!["198.18.0.10:8080".parse().unwrap()]
    );
}

#[test]
fn endpoint_slices() {
    let slice = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-abc, labels: {kubernetes.io/service-name: hello}}
addressType: IPv6
endpoints:
- addresses: [\"2001:2::5\"]
- addresses: [\"2001:2::6\"]
  conditions: {ready: false}
ports: [{name: http, port: 8080}]
";
    let s = snap(&format!("{SETTINGS}{HELLO}{slice}"));
    assert_eq!(
        s.exported_target("default", "hello", 80).unwrap(),
        vec!["[2001:2::5]:8080".parse().unwrap()]
    );
}

#[test]
fn mirrored_services_are_never_exported() {
    let svc = "apiVersion: v1
kind: Service
metadata: {name: m, labels: {mirror.isthmus.io/mirrored-service: \"true\", mirror.isthmus.io/exported: \"true\"}}
spec: {ports: [{port: 80}]}
";
    let s = snap(&format!("{SETTINGS}{svc}"));
    assert_eq!(
        s.exported_target("default", "m", 80),
        Err(Refusal::NotExported)
    );
}

#[test]
fn json_view() {
    let s = snap(&format!("{SETTINGS}{HELLO}"));
    let j = s.to_json();
    assert_eq!(j["cluster"], "cluster-a");
    assert_eq!(j["settings"]["spec"]["serviceCIDR"], "10.96.0.0/12");
    assert_eq!(j["services"][0]["metadata"]["name"], "hello");
}

#[test]
fn exported_target_for_an_authority() {
    let eps = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: hello}\nsubsets: [{addresses: [{ip: 198.18.0.10}], ports: [{name: http, port: 8080}]}]\n";
    let s = snap(&format!("{SETTINGS}{HELLO}{eps}"));
    let want: Vec<SocketAddr> = vec!["198.18.0.10:8080".parse().unwrap()];
    for a in [
        "hello.default.svc.cluster.local:80",
        "Hello.Default.svc.cluster.local.:80",
        "hello.default.svc:80",
        "hello.default:80",
    ] {
        assert_eq!(s.exported_target_for(a), Ok(want.clone()), "{a}");
    }
    for a in [
        "hello:80",
        "hello.default.svc.other.domain:80",
        "hello.default.svc.cluster.local",
        "x.y.z:80",
    ] {
        assert_eq!(s.exported_target_for(a), Err(Refusal::NoSuchService), "{a}");
    }
    assert_eq!(
        s.exported_target_for("hello.default:81"),
        Err(Refusal::NoSuchPort)
    );
}

#[test]
fn links_and_remotes_by_str() {
    let s = snap(&format!("{SETTINGS}{HELLO}"));
    assert!(s.link("cluster-b").is_none());
    assert!(s.remote("cluster-b").is_none());
}
