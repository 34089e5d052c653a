//! The seed's scenario: cluster-b's ServiceMirror of cluster-a's `hello`, the
//! reconcile on its own and through the directory source, and every refusal.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use isthmus_vocab::ClusterName;
use proxy_discovery::model::{
    Cidr, ClusterView, ConditionStatus, Object, Service, ServiceMirror, parse_manifests,
};
use proxy_discovery::reconcile::{ClusterIps, LocalState, MirrorReason, reconcile};
use proxy_discovery::{DirSource, ExportRefusal, Route, ServiceRef};

fn parse(rel: &str) -> Vec<proxy_discovery::model::Parsed> {
    parse_manifests(rel, &common::read_fixture(rel)).unwrap()
}

fn cluster_a(exported: bool) -> ClusterView {
    let mut objects = parse("seed/cluster-a.yaml");
    if exported {
        objects.extend(parse("mesh/cluster-a-settings.yaml"));
    }
    ClusterView::build(ClusterName::parse("cluster-a").unwrap(), objects).unwrap()
}

fn seed_mirror() -> ServiceMirror {
    let mut parsed = parse("seed/cluster-b-servicemirror.yaml");
    assert_eq!(parsed.len(), 1);
    match parsed.remove(0).object {
        Object::ServiceMirror(m) => m,
        other => panic!("{other:?}"),
    }
}

fn expected_service() -> Service {
    match parse("expected/hello-mirrored-service.yaml")
        .remove(0)
        .object
    {
        Object::Service(s) => s,
        other => panic!("{other:?}"),
    }
}

fn b_cidr() -> Cidr {
    Cidr::parse("198.19.128.0/17").unwrap()
}

#[test]
fn the_seed_mirror_is_accepted_verbatim() {
    let m = seed_mirror();
    assert_eq!(m.metadata.name, "hello-mirror");
    assert_eq!(m.spec.cluster.as_str(), "cluster-a");
    assert_eq!(m.remote_namespace(), "default");
}

#[test]
fn reconcile_of_the_seed_gives_the_expected_mirrored_service() {
    let out = reconcile(
        &seed_mirror(),
        Some(&cluster_a(true)),
        LocalState {
            services: &BTreeMap::new(),
            cluster_ips: ClusterIps::Allocate(&b_cidr()),
        },
    );
    assert_eq!(out.reason, MirrorReason::Mirrored);
    assert_eq!(out.service.as_ref(), Some(&expected_service()));
    let c = &out.conditions[0];
    assert_eq!(
        (c.type_.as_str(), c.status),
        ("Ready", ConditionStatus::True)
    );
    assert_eq!(
        c.message,
        "Service default/hello of cluster cluster-a is mirrored as default/hello at 198.19.251.140, ports [80/TCP]"
    );
    // Written out, it is a manifest that parses back to the same Service.
    let yaml = serde_yaml_ng::to_string(&Object::Service(out.service.clone().unwrap())).unwrap();
    let back = parse_manifests("out.yaml", &yaml).unwrap().remove(0).object;
    assert_eq!(back, Object::Service(expected_service()));
}

fn refused(
    remote: Option<&ClusterView>,
    local: &BTreeMap<ServiceRef, Service>,
) -> (MirrorReason, String) {
    let out = reconcile(
        &seed_mirror(),
        remote,
        LocalState {
            services: local,
            cluster_ips: ClusterIps::Allocate(&b_cidr()),
        },
    );
    assert_eq!(out.service, None);
    let c = &out.conditions[0];
    assert_eq!(c.status, ConditionStatus::False);
    assert_eq!(c.reason, out.reason.as_str());
    (out.reason, c.message.clone())
}

#[test]
fn every_refusal_says_why() {
    let none = BTreeMap::new();
    let (r, msg) = refused(None, &none);
    assert_eq!(r, MirrorReason::UnknownCluster);
    assert!(msg.contains("cluster-a"), "{msg}");

    let (r, msg) = refused(Some(&cluster_a(false)), &none);
    assert_eq!(r, MirrorReason::NotExported);
    assert!(
        msg.contains("default/hello") && msg.contains("mirror.isthmus.io/exported"),
        "{msg}"
    );

    let empty = ClusterView::empty(ClusterName::parse("cluster-a").unwrap());
    let (r, msg) = refused(Some(&empty), &none);
    assert_eq!(r, MirrorReason::RemoteServiceNotFound);
    assert!(msg.contains("default/hello"), "{msg}");

    // cluster-b's own `hello`, not made by the mirror, is never clobbered.
    let mut theirs = expected_service();
    theirs.metadata.owner_references.clear();
    let local = BTreeMap::from([(ServiceRef::new("default", "hello"), theirs)]);
    let (r, msg) = refused(Some(&cluster_a(true)), &local);
    assert_eq!(r, MirrorReason::NameConflict);
    assert!(
        msg.contains("default/hello") && msg.contains("hello-mirror"),
        "{msg}"
    );
}

#[test]
fn the_directory_source_routes_the_seed() {
    let dir = common::cluster_b_dir(true);
    let snap = DirSource::load_once(dir.path()).unwrap();
    assert_eq!(snap.cluster().as_str(), "cluster-b");
    assert_eq!(snap.service("default", "hello"), Some(&expected_service()));
    let route = snap
        .lookup_addr(&"198.19.251.140:80".parse().unwrap())
        .unwrap();
    let Route::Remote {
        cluster,
        authority,
        gateway,
        ..
    } = route
    else {
        panic!("{route:?}")
    };
    assert_eq!(cluster.as_str(), "cluster-a");
    assert_eq!(authority.as_str(), "hello.default.svc.cluster.local:80");
    let gw = gateway.as_ref().unwrap();
    assert_eq!(gw.address.as_str(), "198.19.0.2");
    assert_eq!(
        gw.identity.as_str(),
        "spiffe://cluster-b.local/ns/isthmus/sa/gateway"
    );
    assert_eq!(
        snap.lookup_authority("hello.default.svc.cluster.local:80"),
        Some(route)
    );
    // frontend is local and has no ClusterIP in the seed: only its names route.
    assert!(matches!(
        snap.lookup_authority("frontend.default:80"),
        Some(Route::Local { .. })
    ));
    let link = snap.link("cluster-a").unwrap();
    assert_eq!(link.spec.gateway_port, 4143);
    assert_eq!(
        link.spec.probe_spec.period.0,
        std::time::Duration::from_secs(3)
    );
    let mirror = snap.service_mirror("default", "hello-mirror").unwrap();
    assert_eq!(
        mirror.status.as_ref().unwrap().conditions[0].reason,
        "Mirrored"
    );
    // The Deployment is kept for the lab.
    assert_eq!(snap.local().deployments.len(), 1);
}

#[test]
fn cluster_a_gateway_resolves_the_exported_hello() {
    // Named after the cluster, as the lab names its per-cluster folders.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cluster-a");
    common::put(&dir, "seed/cluster-a.yaml", "cluster-a.yaml");
    common::put(&dir, "mesh/cluster-a-endpoints.yaml", "endpoints.yaml");
    // Without settings the cluster takes its name from the directory, and exports
    // nothing.
    let snap = DirSource::load_once(&dir).unwrap();
    assert_eq!(snap.cluster().as_str(), "cluster-a");
    assert_eq!(
        snap.exported_target("default", "hello", 80),
        Err(ExportRefusal::NotExported)
    );
    common::put(&dir, "mesh/cluster-a-settings.yaml", "settings.yaml");
    let snap = DirSource::load_once(&dir).unwrap();
    let want: SocketAddr = "198.18.1.10:8080".parse().unwrap();
    assert_eq!(snap.exported_target("default", "hello", 80), Ok(vec![want]));
    assert_eq!(
        snap.exported_target("default", "hello", 8080),
        Err(ExportRefusal::NoSuchPort)
    );
    assert_eq!(
        snap.exported_target("default", "nope", 80),
        Err(ExportRefusal::NoSuchService)
    );
}

#[test]
fn a_missing_link_refuses_through_the_source() {
    let dir = common::cluster_b_dir(true);
    std::fs::remove_file(dir.path().join("link-cluster-a.yaml")).unwrap();
    let snap = DirSource::load_once(dir.path()).unwrap();
    assert_eq!(snap.service("default", "hello"), None);
    let c = &snap
        .service_mirror("default", "hello-mirror")
        .unwrap()
        .status
        .as_ref()
        .unwrap()
        .conditions[0];
    assert_eq!(c.reason, "UnknownCluster");
    assert!(snap.index().addrs().is_empty());
}

#[test]
fn source_errors_name_the_file_and_field() {
    let dir = common::cluster_b_dir(true);
    let bad = dir.path().join("clusters/cluster-a/broken.yml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  ports:\n  - port: http\n",
    )
    .unwrap();
    let err = DirSource::load_once(dir.path()).unwrap_err().to_string();
    assert!(err.starts_with(&bad.display().to_string()), "{err}");
    assert!(
        err.contains("document 1 (Service default/x): spec.ports[0].port: "),
        "{err}"
    );

    std::fs::remove_file(&bad).unwrap();
    std::fs::write(
        dir.path().join("dup.yaml"),
        common::read_fixture("seed/cluster-b-servicemirror.yaml"),
    )
    .unwrap();
    let err = DirSource::load_once(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("ServiceMirror default/hello-mirror is already defined at"),
        "{err}"
    );

    std::fs::remove_file(dir.path().join("dup.yaml")).unwrap();
    let err = DirSource::new(dir.path())
        .with_cluster(ClusterName::parse("cluster-c").unwrap())
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("settings.yaml: document 1: spec.clusterName"),
        "{err}"
    );
}
