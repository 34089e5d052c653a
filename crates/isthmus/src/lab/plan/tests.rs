use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use proxy_discovery::ServiceRef;

use super::*;
use crate::lab::spec::LabSpec;

fn seed_plan(delay: u64) -> Plan {
    Plan::new(&LabSpec::seed().expect("seed"), delay).expect("plan")
}

#[test]
fn the_seed_is_placed_in_the_lab_ranges() {
    let plan = seed_plan(0);
    let a = plan.cluster("cluster-a").expect("a");
    let b = plan.cluster("cluster-b").expect("b");
    assert_eq!(a.pods.len(), 1);
    assert_eq!(a.pods[0].ip, Ipv4Addr::new(198, 18, 1, 10));
    assert!(a.pods[0].name.starts_with("hello-deployment-"));
    assert!(a.pods[0].name.ends_with("-0"));
    assert_eq!(
        a.pods[0].identity,
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(b.pods[0].ip, Ipv4Addr::new(198, 18, 2, 10));
    assert_eq!(a.gateway_ip, Ipv4Addr::new(198, 18, 1, 2));
    assert_eq!(b.wan_ip, Ipv4Addr::new(198, 18, 250, 2));
    let hello = &a.services[&ServiceRef::new("default", "hello")];
    let ip = hello.cluster_ips()[0];
    assert!(a.service_cidr.contains_usable(ip), "{ip}");
    assert_eq!(a.service_cidr.to_string(), "198.19.0.0/21");
    assert_eq!(b.service_cidr.to_string(), "198.19.8.0/21");
}

#[test]
fn endpoints_follow_ready_pods_and_kube_proxy_rules_follow_endpoints() {
    let plan = seed_plan(0);
    let a = plan.cluster("cluster-a").expect("a");
    let eps = plan.endpoints(a, &|_| true);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].subsets[0].addresses[0].ip.to_string(), "198.18.1.10");
    assert_eq!(eps[0].subsets[0].ports[0].port, 8080);
    let routes = plan.service_routes(a, &|_| true);
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].front.port(), 80);
    assert_eq!(
        routes[0].backends,
        [SocketAddr::from(([198, 18, 1, 10], 8080))]
    );
    let rules = service_rules(&routes);
    assert!(
        rules.contains(&format!(
            "-A LAB_SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 198.18.1.10:8080",
            routes[0].front.ip()
        )),
        "{rules}"
    );
    // Without a ready pod the Service has no endpoints and is answered with a reset.
    let none = plan.service_routes(a, &|_| false);
    assert!(none[0].backends.is_empty());
    assert!(service_rules(&none).contains("-j REJECT --reject-with tcp-reset"));
}

#[test]
fn three_replicas_split_evenly() {
    let routes = [ServiceRoute {
        service: ServiceRef::new("default", "x"),
        front: SocketAddr::from(([198, 19, 0, 5], 80)),
        backends: vec![
            SocketAddr::from(([198, 18, 1, 10], 80)),
            SocketAddr::from(([198, 18, 1, 11], 80)),
            SocketAddr::from(([198, 18, 1, 12], 80)),
        ],
    }];
    let rules = service_rules(&routes);
    assert!(rules.contains("--probability 0.33333 -j DNAT --to-destination 198.18.1.10:80"));
    assert!(rules.contains("--probability 0.50000 -j DNAT --to-destination 198.18.1.11:80"));
    assert!(rules.contains("--dport 80 -j DNAT --to-destination 198.18.1.12:80"));
}

#[test]
fn hosts_files_name_services_as_kubernetes_dns_does() {
    let plan = seed_plan(0);
    let b = plan.cluster("cluster-b").expect("b");
    let pod = &b.pods[0];
    let ips = BTreeMap::from([(
        ServiceRef::new("default", "hello"),
        IpAddr::from([198, 19, 8, 7]),
    )]);
    let hosts = hosts_file(b, pod, &ips);
    assert!(
        hosts.contains(&format!("198.18.2.10\t{}\n", pod.name)),
        "{hosts}"
    );
    assert!(
        hosts.contains(
            "198.19.8.7\thello.default.svc.cluster.local hello.default.svc hello.default hello\n"
        ),
        "{hosts}"
    );
}

#[test]
fn gateways_resolve_every_clusters_gateway_name_to_its_wan_address() {
    let plan = seed_plan(0);
    let hosts = gateway_hosts_file(&plan);
    for (cluster, wan) in [("cluster-a", "198.18.250.1"), ("cluster-b", "198.18.250.2")] {
        let name = gateway_name(cluster);
        assert_eq!(name, format!("gateway.{cluster}.isthmus-lab.test"));
        assert!(
            proxy_discovery::model::GatewayAddress::parse(&name).is_ok_and(|a| a.ip().is_none()),
            "{name} is a name a Link accepts"
        );
        assert!(hosts.contains(&format!("{wan}\t{name}\n")), "{hosts}");
    }
}

fn three_clusters() -> Plan {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/three-clusters");
    let spec = LabSpec::read(&dir).expect("the three-clusters example reads");
    Plan::new(&spec, 0).expect("the three-clusters example places")
}

#[test]
fn the_inject_annotation_keeps_a_pod_out_of_the_mesh() {
    let plan = three_clusters();
    let west = plan.cluster("west").expect("west");
    let meshed: BTreeMap<&str, bool> = west
        .pods
        .iter()
        .map(|p| (p.deployment.as_str(), p.meshed))
        .collect();
    assert_eq!(
        meshed,
        BTreeMap::from([("frontend", true), ("legacy", false), ("web", true)])
    );
    // Every pod of the seed is meshed: no annotation means enabled.
    assert!(
        seed_plan(0)
            .clusters
            .iter()
            .all(|c| c.pods.iter().all(|p| p.meshed))
    );
}

#[test]
fn an_inject_value_other_than_enabled_or_disabled_names_the_deployment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c1 = dir.path().join("c1");
    std::fs::create_dir(&c1).expect("mkdir");
    std::fs::write(
        c1.join("app.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app\n  namespace: tools\nspec:\n  template:\n    metadata:\n      annotations:\n        isthmus.io/inject: off\n    spec:\n      containers:\n      - name: app\n        image: nginxdemos/hello:plain-text\n",
    )
    .expect("write");
    let spec = LabSpec::read(dir.path()).expect("reads");
    let err = Plan::new(&spec, 0).expect_err("an unknown inject value is refused");
    let text = err.to_string();
    for needle in [
        "Deployment tools/app",
        "cluster c1",
        "isthmus.io/inject",
        "\"off\"",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from {text}");
    }
}

#[test]
fn a_multi_port_service_with_replicas_routes_each_port_to_every_replica() {
    let plan = three_clusters();
    let east = plan.cluster("east").expect("east");
    let by_port: BTreeMap<u16, Vec<SocketAddr>> = plan
        .service_routes(east, &|_| true)
        .into_iter()
        .filter(|r| r.service == ServiceRef::new("shop", "catalog"))
        .map(|r| (r.front.port(), r.backends))
        .collect();
    assert_eq!(
        by_port,
        BTreeMap::from([
            (
                80,
                vec![
                    SocketAddr::from(([198, 18, 1, 10], 8080)),
                    SocketAddr::from(([198, 18, 1, 11], 8080))
                ]
            ),
            (
                8081,
                vec![
                    SocketAddr::from(([198, 18, 1, 10], 8081)),
                    SocketAddr::from(([198, 18, 1, 11], 8081))
                ]
            ),
        ])
    );
}

#[test]
fn pods_added_later_take_new_names_and_addresses() {
    let plan = seed_plan(0);
    let a = plan.cluster("cluster-a").expect("a");
    let key = ServiceRef::new("default", "hello-deployment");
    let d = a.spec.view.deployments[&key].clone();
    let mut plan = plan.clone();
    let first = plan.next_pod(0, &key, &d).expect("a second pod");
    assert_eq!(first.ip, Ipv4Addr::new(198, 18, 1, 11));
    assert!(first.name.ends_with("-1"), "{}", first.name);
    assert_eq!(first.labels, a.pods[0].labels);
    plan.clusters[0].pods.push(first.clone());
    let second = plan.next_pod(0, &key, &d).expect("a third pod");
    assert_eq!(second.ip, Ipv4Addr::new(198, 18, 1, 12));
    assert!(second.name.ends_with("-2"), "{}", second.name);
    assert_ne!(second.name, first.name);
}
