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
        Err(ExportRefusal::NoSuchService)
    );
    assert_eq!(hello_target(&s), Err(ExportRefusal::NotExported));
    let s = snap(&format!("{SETTINGS}{HELLO}"));
    assert_eq!(
        s.exported_target("default", "hello", 81),
        Err(ExportRefusal::NoSuchPort)
    );
    assert_eq!(hello_target(&s), Err(ExportRefusal::NoEndpoints));
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
    assert_targets(&s, &["198.18.0.10:8080", "198.18.0.20:8080"]);
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
    assert_eq!(hello_target(&s), Err(ExportRefusal::NoSuchPort));
    let s = snap(&format!("{SETTINGS}{HELLO}{eps}{dep}"));
    assert_targets(&s, &["198.18.0.10:8080"]);
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
    assert_targets(&s, &["[2001:2::5]:8080"]);
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
        Err(ExportRefusal::NotExported)
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
        assert_eq!(
            s.exported_target_for(a),
            Err(ExportRefusal::NoSuchService),
            "{a}"
        );
    }
    assert_eq!(
        s.exported_target_for("hello.default:81"),
        Err(ExportRefusal::NoSuchPort)
    );
}

#[test]
fn links_and_remotes_by_str() {
    let s = snap(&format!("{SETTINGS}{HELLO}"));
    assert!(s.link("cluster-b").is_none());
    assert!(s.remote("cluster-b").is_none());
}

const PODS: &str = "apiVersion: v1
kind: Pod
metadata: {name: meshed-0, labels: {app: hello, isthmus.io/meshed: \"true\"}}
spec: {containers: [{name: app, image: hello}]}
status: {podIP: 198.18.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-0, labels: {app: hello}}
---
apiVersion: v1
kind: Pod
metadata: {name: other-ns, namespace: web, labels: {isthmus.io/meshed: \"true\"}}
---
apiVersion: v1
kind: Pod
metadata: {name: not-true, labels: {isthmus.io/meshed: \"yes\"}}
---
";

/// An EndpointSlice of `hello` on its `http` port 8080, listing `endpoints`
/// (the lines under `endpoints:`).
fn hello_slice(endpoints: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: hello-abc, labels: {{kubernetes.io/service-name: hello}}}}
addressType: IPv4
endpoints:
{endpoints}ports: [{{name: http, port: 8080}}]
---
"
    )
}

/// Where a stream to `hello`'s port 80 goes.
fn hello_target(s: &Snapshot) -> Result<Vec<SocketAddr>, ExportRefusal> {
    s.exported_target("default", "hello", 80)
}

/// Asserts that `hello` on port 80 is exported to exactly `addrs`, in order.
fn assert_targets(s: &Snapshot, addrs: &[&str]) {
    let want: Vec<SocketAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
    assert_eq!(hello_target(s), Ok(want));
}

/// `hello`'s exported endpoints on port 80, as address and whether meshed.
fn hello_endpoints(s: &Snapshot) -> Vec<(String, bool)> {
    s.exported_endpoints("default", "hello", 80)
        .unwrap()
        .iter()
        .map(endpoint)
        .collect()
}

fn endpoint(ep: &ExportedEndpoint) -> (String, bool) {
    (ep.addr.to_string(), ep.meshed)
}

#[test]
fn endpoints_are_meshed_when_their_target_ref_names_a_labelled_pod_and_unknown_pods_are_left_out() {
    let slice = hello_slice(
        "- addresses: [198.18.1.10]
  targetRef: {kind: Pod, namespace: default, name: meshed-0}
- addresses: [198.18.1.11]
  targetRef: {kind: Pod, namespace: default, name: plain-0}
- addresses: [198.18.1.12]
  targetRef: {kind: Pod, namespace: default, name: not-seen}
- addresses: [198.18.1.13]
- addresses: [198.18.1.14]
  targetRef: {kind: Pod, name: meshed-0}
- addresses: [198.18.1.15]
  targetRef: {kind: Pod, namespace: default, name: other-ns}
- addresses: [198.18.1.16]
  targetRef: {kind: Node, namespace: default, name: meshed-0}
- addresses: [198.18.1.17]
  targetRef: {kind: Pod, namespace: default, name: not-true}
",
    );
    let s = snap(&format!("{SETTINGS}{HELLO}{PODS}{slice}"));
    let got = hello_endpoints(&s);
    let want = |ip: &str, meshed| (format!("{ip}:8080"), meshed);
    assert_eq!(
        got,
        vec![
            want("198.18.1.10", true),
            // An unlabelled pod, no reference: plain TCP. A pod not seen (.12) may
            // be meshed: it is left out, never guessed plain.
            want("198.18.1.11", false),
            want("198.18.1.13", false),
            // No namespace in the reference: the slice's own.
            want("198.18.1.14", true),
            // The same name in another namespace is another pod, one not seen
            // in `default` (.15): left out too.
            // Only a Pod can be meshed.
            want("198.18.1.16", false),
            want("198.18.1.17", false),
        ]
    );
    // The authority form answers the same, and the plain address list holds the same.
    assert_eq!(
        s.exported_endpoints_for("hello.default.svc.cluster.local:80")
            .unwrap()
            .iter()
            .map(endpoint)
            .collect::<Vec<_>>(),
        got
    );
    assert_eq!(hello_target(&s).unwrap().len(), 6);
}

#[test]
fn endpoints_objects_join_pods_too_and_a_double_listing_stays_meshed() {
    let endpoints = "apiVersion: v1
kind: Endpoints
metadata: {name: hello}
subsets:
- addresses:
  - ip: 198.18.1.10
    targetRef: {kind: Pod, namespace: default, name: meshed-0}
  - ip: 198.18.1.11
    targetRef: {kind: Pod, namespace: default, name: plain-0}
  ports: [{name: http, port: 8080}]
---
";
    // The meshed pod's address also appears in a slice without a reference: it
    // must not become plain because one listing forgot to name the pod.
    let slice = hello_slice("- addresses: [198.18.1.10]\n");
    let s = snap(&format!("{SETTINGS}{HELLO}{PODS}{endpoints}{slice}"));
    let got = hello_endpoints(&s);
    assert_eq!(
        got,
        vec![
            ("198.18.1.10:8080".to_owned(), true),
            ("198.18.1.11:8080".to_owned(), false)
        ]
    );
}

#[test]
fn a_pod_losing_its_label_is_no_longer_meshed() {
    let slice = hello_slice(
        "- addresses: [198.18.1.10]
  targetRef: {kind: Pod, namespace: default, name: meshed-0}
",
    );
    let meshed = snap(&format!("{SETTINGS}{HELLO}{PODS}{slice}"));
    assert!(meshed.exported_endpoints("default", "hello", 80).unwrap()[0].meshed);
    let relabelled = PODS.replace("isthmus.io/meshed: \"true\"}}\nspec", "x: y}}\nspec");
    let plain = snap(&format!("{SETTINGS}{HELLO}{relabelled}{slice}"));
    assert!(!plain.exported_endpoints("default", "hello", 80).unwrap()[0].meshed);
}

#[test]
fn the_export_index_keeps_services_apart_and_knows_every_endpoint_address() {
    // Two Services named hello, one exported (default) and one not (other), each
    // with a slice; the unexported one's slice must not leak into the exported one.
    let other = "apiVersion: v1
kind: Service
metadata: {name: hello, namespace: other}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-other, namespace: other, labels: {kubernetes.io/service-name: hello}}
addressType: IPv4
endpoints:
- addresses: [198.18.2.10]
ports: [{name: http, port: 8080}]
---
";
    let slice = hello_slice(
        "- addresses: [198.18.1.10]
- addresses: [198.18.1.11]
  conditions: {ready: false}
",
    );
    let s = snap(&format!("{SETTINGS}{HELLO}{other}{slice}"));
    let got = hello_endpoints(&s);
    assert_eq!(got, vec![("198.18.1.10:8080".to_owned(), false)]);
    assert_eq!(
        s.exported_endpoints("other", "hello", 80),
        Err(ExportRefusal::NotExported)
    );
    assert_eq!(
        s.exported_endpoints_for("hello.other.svc.cluster.local:80"),
        Err(ExportRefusal::NotExported)
    );
    // A gateway keeps a pod's tunnel while any Service lists the pod, ready or not.
    let ips = s.exports().endpoint_ips();
    for ip in ["198.18.1.10", "198.18.1.11", "198.18.2.10"] {
        assert!(ips.contains(&ip.parse().unwrap()), "{ip}");
    }
    assert_eq!(ips.len(), 3);
}

#[test]
fn export_refusals_answer_as_the_tunnel_refusals() {
    for (refusal, wire) in [
        (
            ExportRefusal::NoSuchService,
            isthmus_vocab::Refusal::NoRoute,
        ),
        (ExportRefusal::NoSuchPort, isthmus_vocab::Refusal::NoRoute),
        (
            ExportRefusal::NotExported,
            isthmus_vocab::Refusal::NotExported,
        ),
        (
            ExportRefusal::NoEndpoints,
            isthmus_vocab::Refusal::NoEndpoints,
        ),
    ] {
        assert_eq!(isthmus_vocab::Refusal::from(refusal), wire, "{refusal:?}");
    }
}
