use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use proxy_discovery::{DirSource, Route, ServiceRef};

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
fn the_written_manifests_mirror_hello_into_cluster_b() {
    let plan = seed_plan(0);
    let tmp = tempfile::tempdir().expect("tempdir");
    for c in &plan.clusters {
        for (rel, text) in plan.manifests(c, &|_| true, true) {
            let path = tmp.path().join(c.spec.name.as_str()).join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
    }
    let b = plan.cluster("cluster-b").expect("b");
    let snapshot = DirSource::new(tmp.path().join("cluster-b"))
        .with_cluster(b.spec.name.clone())
        .load()
        .expect("cluster-b's manifests load");
    let hello = snapshot
        .service("default", "hello")
        .expect("mirrored hello");
    let ip = hello.cluster_ips()[0];
    assert!(b.service_cidr.contains_usable(ip), "{ip}");
    match snapshot.lookup_addr(&SocketAddr::new(ip, 80)) {
        Some(Route::Remote { .. }) => {}
        other => panic!("hello's ClusterIP routes {other:?}"),
    }
    assert_eq!(
        snapshot.gateway().map(|g| g.address.to_string()),
        Some("198.18.2.2".to_owned())
    );
    let link = snapshot.link("cluster-a").expect("link to cluster-a");
    assert_eq!(link.spec.gateway_address.to_string(), "198.18.250.1");
    assert_eq!(link.spec.gateway_port, TUNNEL_PORT);
    // cluster-a delivers hello to its pod.
    let a = plan.cluster("cluster-a").expect("a");
    let snapshot_a = DirSource::new(tmp.path().join("cluster-a"))
        .with_cluster(a.spec.name.clone())
        .load()
        .expect("cluster-a's manifests load");
    assert_eq!(
        snapshot_a
            .exported_target_for("hello.default.svc.cluster.local:80")
            .expect("exported"),
        [SocketAddr::from(([198, 18, 1, 10], 8080))]
    );
}

#[test]
fn links_can_be_held_back() {
    let plan = seed_plan(0);
    let b = plan.cluster("cluster-b").expect("b");
    let mesh = |links| {
        plan.manifests(b, &|_| true, links)
            .into_iter()
            .find(|(rel, _)| rel == "mesh.yaml")
            .expect("mesh.yaml")
            .1
    };
    assert!(mesh(true).contains("kind: Link"));
    assert!(!mesh(false).contains("kind: Link"));
    let objects = |links| {
        plan.manifests(b, &|_| true, links)
            .into_iter()
            .find(|(rel, _)| rel == "objects.yaml")
            .expect("objects.yaml")
            .1
    };
    assert!(objects(true).contains("kind: ServiceMirror"));
    assert!(!objects(false).contains("kind: ServiceMirror"));
}

#[test]
fn a_wan_delay_points_links_at_the_relay() {
    let plan = seed_plan(40);
    let a = plan.cluster("cluster-a").expect("a");
    assert_eq!(plan.link(a).spec.gateway_port, RELAY_PORT);
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
fn mirrored_services_are_rejected_by_kube_proxy() {
    let svc: Service = serde_yaml_ng::from_str(
        "metadata: {name: catalog, namespace: shop}\nspec:\n  clusterIP: 198.19.16.9\n  ports:\n  - {name: http, port: 80}\n  - {name: admin, port: 8081}\n  - {name: dns, port: 53, protocol: UDP}\n",
    )
    .expect("a Service");
    let mirrored = BTreeMap::from([(ServiceRef::new("shop", "catalog"), svc)]);
    let routes = mirrored_routes(&mirrored);
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(routes.iter().all(|r| r.backends.is_empty()));
    let rules = service_rules(&routes);
    for port in [80, 8081] {
        assert!(
            rules.contains(&format!(
                "-A LAB_SERVICES -d 198.19.16.9/32 -p tcp -m tcp --dport {port} -j REJECT --reject-with tcp-reset"
            )),
            "{rules}"
        );
    }
    assert!(!rules.contains("DNAT"), "{rules}");
}

#[test]
fn in_west_the_refused_mirror_makes_no_service_and_the_others_are_rejected_by_kube_proxy() {
    let plan = three_clusters();
    let tmp = tempfile::tempdir().expect("tempdir");
    for c in &plan.clusters {
        for (rel, text) in plan.manifests(c, &|_| true, true) {
            let path = tmp.path().join(c.spec.name.as_str()).join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
    }
    let west = plan.cluster("west").expect("west");
    let snapshot = DirSource::new(tmp.path().join("west"))
        .with_cluster(west.spec.name.clone())
        .load()
        .expect("west's manifests load");
    assert!(snapshot.service("tools", "secret").is_none());
    let mirrored: BTreeMap<ServiceRef, Service> = snapshot
        .local()
        .services
        .iter()
        .filter(|(key, _)| !west.services.contains_key(key))
        .map(|(key, svc)| (key.clone(), svc.clone()))
        .collect();
    assert_eq!(
        mirrored.keys().cloned().collect::<Vec<_>>(),
        [
            ServiceRef::new("shop", "catalog"),
            ServiceRef::new("tools", "stock")
        ]
    );
    let routes = mirrored_routes(&mirrored);
    let mut ports: Vec<(String, u16)> = routes
        .iter()
        .map(|r| (r.service.name.clone(), r.front.port()))
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        [
            ("catalog".to_owned(), 80),
            ("catalog".to_owned(), 8081),
            ("stock".to_owned(), 80)
        ]
    );
    for r in &routes {
        assert!(r.backends.is_empty(), "{r:?}");
        // The sidecar still tunnels it: the ClusterIP routes to the remote cluster.
        match snapshot.lookup_addr(&r.front) {
            Some(Route::Remote { .. }) => {}
            other => panic!("{} routes {other:?}", r.front),
        }
    }
}

/// Writes every cluster's manifests of `plan` under `root/<cluster>`.
fn write_all(plan: &Plan, root: &std::path::Path) {
    for c in &plan.clusters {
        for (rel, text) in plan.manifests(c, &|_| true, true) {
            let path = root.join(c.spec.name.as_str()).join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
    }
}

#[test]
fn meshed_pods_are_labelled_and_named_by_their_endpoints() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/three-clusters");
    let plan = Plan::new(&LabSpec::read(&dir).expect("three-clusters"), 0).expect("plan");
    let tmp = tempfile::tempdir().expect("tempdir");
    write_all(&plan, tmp.path());
    let load = |name: &str| {
        let c = plan.cluster(name).expect(name);
        DirSource::new(tmp.path().join(name))
            .with_cluster(c.spec.name.clone())
            .load()
            .expect("manifests load")
    };
    // east's catalog replicas run sidecars: its gateway reaches them only over
    // their tunnels.
    let east = load("east");
    let catalog = east
        .exported_endpoints("shop", "catalog", 80)
        .expect("catalog is exported");
    assert_eq!(catalog.len(), 2);
    assert!(catalog.iter().all(|e| e.meshed), "{catalog:?}");
    // west's legacy pod is not injected: a Pod without the label.
    let west = load("west");
    let legacy: Vec<_> = west
        .local()
        .pods
        .values()
        .filter(|p| p.metadata.name.starts_with("legacy-"))
        .collect();
    assert_eq!(legacy.len(), 1);
    assert!(!legacy[0].is_meshed(), "{legacy:?}");
    let web: Vec<_> = west
        .local()
        .pods
        .values()
        .filter(|p| p.metadata.name.starts_with("web-"))
        .collect();
    assert!(
        !web.is_empty() && web.iter().all(|p| p.is_meshed()),
        "{web:?}"
    );
}

#[test]
fn an_unmeshed_backend_is_an_unmeshed_endpoint() {
    let mut plan = seed_plan(0);
    let a = plan
        .clusters
        .iter_mut()
        .find(|c| c.spec.name.as_str() == "cluster-a")
        .expect("a");
    a.pods[0].meshed = false;
    let tmp = tempfile::tempdir().expect("tempdir");
    write_all(&plan, tmp.path());
    let a = plan.cluster("cluster-a").expect("a");
    let snapshot = DirSource::new(tmp.path().join("cluster-a"))
        .with_cluster(a.spec.name.clone())
        .load()
        .expect("cluster-a's manifests load");
    let hello = snapshot
        .exported_endpoints("default", "hello", 80)
        .expect("exported");
    assert_eq!(hello.len(), 1);
    assert!(!hello[0].meshed, "{hello:?}");
}
