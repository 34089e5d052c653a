use super::*;
use crate::model::{EXPORTED_LABEL, parse_manifests};

fn view(cluster: &str, yaml: &str) -> ClusterView {
    let parsed = parse_manifests("test.yaml", yaml).unwrap();
    ClusterView::build(ClusterName::parse(cluster).unwrap(), parsed).unwrap()
}

const LINK: &str = "apiVersion: multicluster.isthmus.io/v1alpha1
kind: Link
metadata: {name: cluster-a}
spec:
  targetClusterName: cluster-a
  gatewayAddress: 198.18.1.1
  gatewayIdentity: spiffe://cluster-a.local/ns/isthmus/sa/gateway
---
apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata: {name: cluster-b}
spec:
  clusterName: cluster-b
  serviceCIDR: 198.18.128.0/24
";

const MIRROR: &str = "apiVersion: linkerd.io/v1alpha1
kind: ServiceMirror
metadata: {name: hello-mirror, namespace: default}
spec:
  cluster: cluster-a
  service: {name: hello}
";

fn remote_a(exported: bool) -> ClusterView {
    let labels = if exported {
        format!("labels: {{{EXPORTED_LABEL}: \"true\"}}")
    } else {
        String::new()
    };
    view(
        "cluster-a",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: default\n  {labels}\nspec:\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: grpc, port: 9090, protocol: TCP}}\n  selector: {{app: hello}}\n"
        ),
    )
}

fn remotes(v: ClusterView) -> BTreeMap<ClusterName, ClusterView> {
    BTreeMap::from([(v.name().clone(), v)])
}

fn ready_of(r: &Reconciled, name: &str) -> Condition {
    let m = &r.service_mirrors[&ServiceRef::new("default", name)];
    m.status.as_ref().unwrap().conditions[0].clone()
}

#[test]
fn mirrors_an_exported_service() {
    let local = view("cluster-b", &format!("{LINK}---\n{MIRROR}"));
    let r = reconcile_all(&local, &remotes(remote_a(true)));
    let svc = &r.services[&ServiceRef::new("default", "hello")];
    assert_eq!(svc.spec.selector, None);
    assert_eq!(svc.spec.ports.len(), 2);
    assert_eq!(svc.spec.ports[0].port, 80);
    assert_eq!(svc.spec.ports[0].target_port, None);
    let ip = svc.cluster_ips()[0];
    assert!(local.settings.spec.service_cidr.contains_usable(ip), "{ip}");
    assert_eq!(svc.metadata.labels[REMOTE_CLUSTER_LABEL], "cluster-a");
    assert_eq!(svc.metadata.labels[MIRRORED_SERVICE_LABEL], "true");
    assert_eq!(
        svc.metadata.annotations[REMOTE_SERVICE_ANNOTATION],
        "hello.default"
    );
    assert_eq!(svc.metadata.owner_references[0].name, "hello-mirror");
    let c = ready_of(&r, "hello-mirror");
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::True, "Mirrored")
    );
    assert_eq!(r.applied, vec![ServiceRef::new("default", "hello")]);
    // Same inputs, same answer, including the address.
    assert_eq!(reconcile_all(&local, &remotes(remote_a(true))), r);
}

#[test]
fn keeps_the_cluster_ip_it_already_owns() {
    let local = view("cluster-b", &format!("{LINK}---\n{MIRROR}"));
    let first = reconcile_all(&local, &remotes(remote_a(true)));
    let mut svc = first.services[&ServiceRef::new("default", "hello")].clone();
    svc.spec.cluster_ip = Some(ClusterIp::Addr("198.18.128.77".parse().unwrap()));
    svc.spec.cluster_ips.clear();
    let mut local2 = local.clone();
    local2
        .services
        .insert(ServiceRef::new("default", "hello"), svc);
    let again = reconcile_all(&local2, &remotes(remote_a(true)));
    let ip = again.services[&ServiceRef::new("default", "hello")].cluster_ips()[0];
    assert_eq!(ip.to_string(), "198.18.128.77");
}

#[test]
fn refuses_an_unknown_cluster() {
    let local = view("cluster-b", MIRROR);
    let r = reconcile_all(&local, &remotes(remote_a(true)));
    assert!(
        !r.services
            .contains_key(&ServiceRef::new("default", "hello"))
    );
    let c = ready_of(&r, "hello-mirror");
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::False, "UnknownCluster")
    );
    assert!(c.message.contains("cluster-a"), "{}", c.message);
}

#[test]
fn refuses_a_missing_remote_service() {
    let local = view(
        "cluster-b",
        &format!(
            "{LINK}---\n{}",
            MIRROR.replace("name: hello}", "name: nope}")
        ),
    );
    let r = reconcile_all(&local, &remotes(remote_a(true)));
    let c = ready_of(&r, "hello-mirror");
    assert_eq!(c.reason, "RemoteServiceNotFound");
    assert!(c.message.contains("default/nope"), "{}", c.message);
    // A linked cluster nothing is known of yet is empty, not unknown.
    let r = reconcile_all(&local, &BTreeMap::new());
    assert_eq!(ready_of(&r, "hello-mirror").reason, "RemoteServiceNotFound");
}

#[test]
fn refuses_a_service_that_is_not_exported() {
    let local = view("cluster-b", &format!("{LINK}---\n{MIRROR}"));
    let r = reconcile_all(&local, &remotes(remote_a(false)));
    assert_eq!(ready_of(&r, "hello-mirror").reason, "NotExported");
    assert!(r.applied.is_empty());
    // Exporting the whole namespace is the other way.
    let mut a = remote_a(false);
    a.settings.spec.exported_namespaces = vec!["default".into()];
    let r = reconcile_all(&local, &remotes(a));
    assert_eq!(ready_of(&r, "hello-mirror").reason, "Mirrored");
}

#[test]
fn never_clobbers_a_service_it_does_not_own() {
    let mine = "apiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: default}\nspec:\n  clusterIP: 198.18.128.9\n  ports: [{port: 80}]\n  selector: {app: mine}\n";
    let local = view("cluster-b", &format!("{LINK}---\n{MIRROR}---\n{mine}"));
    let r = reconcile_all(&local, &remotes(remote_a(true)));
    let c = ready_of(&r, "hello-mirror");
    assert_eq!(c.reason, "NameConflict");
    assert!(c.message.contains("default/hello"), "{}", c.message);
    assert_eq!(
        r.services[&ServiceRef::new("default", "hello")],
        local.services[&ServiceRef::new("default", "hello")]
    );
    assert!(r.deleted.is_empty());
}

#[test]
fn an_owner_reference_with_another_uid_is_not_ownership() {
    let stale = "apiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: default\n  ownerReferences:\n  - {apiVersion: linkerd.io/v1alpha1, kind: ServiceMirror, name: hello-mirror, uid: old}\nspec: {ports: [{port: 80}]}\n";
    let mirror = MIRROR.replace("namespace: default}", "namespace: default, uid: new}");
    let local = view("cluster-b", &format!("{LINK}---\n{mirror}---\n{stale}"));
    let r = reconcile_all(&local, &remotes(remote_a(true)));
    // The stale Service is an orphan of a mirror that no longer exists: removed,
    // and the new mirror then takes the name.
    assert_eq!(r.deleted, vec![ServiceRef::new("default", "hello")]);
    assert_eq!(ready_of(&r, "hello-mirror").reason, "Mirrored");
}

#[test]
fn deleting_the_mirror_removes_what_it_made() {
    let local = view("cluster-b", &format!("{LINK}---\n{MIRROR}"));
    let made = reconcile_all(&local, &remotes(remote_a(true)));
    let mut without = local.clone();
    without.service_mirrors.clear();
    without.services = made.services.clone();
    let r = reconcile_all(&without, &remotes(remote_a(true)));
    assert!(r.services.is_empty(), "{:?}", r.services);
    assert_eq!(r.deleted, vec![ServiceRef::new("default", "hello")]);
}

#[test]
fn a_refusing_mirror_drops_its_old_service() {
    let local = view("cluster-b", &format!("{LINK}---\n{MIRROR}"));
    let made = reconcile_all(&local, &remotes(remote_a(true)));
    let mut next = local.clone();
    next.services = made.services.clone();
    let r = reconcile_all(&next, &remotes(remote_a(false)));
    assert!(r.services.is_empty());
    assert_eq!(r.deleted, vec![ServiceRef::new("default", "hello")]);
}

#[test]
fn allocation_is_stable_and_probes_past_used_addresses() {
    let cidr = Cidr::parse("198.18.0.0/24").unwrap();
    let svc = ServiceRef::new("default", "hello");
    let first = allocate_cluster_ip(&svc, &cidr, &BTreeSet::new()).unwrap();
    assert_eq!(
        allocate_cluster_ip(&svc, &cidr, &BTreeSet::new()),
        Some(first)
    );
    let second = allocate_cluster_ip(&svc, &cidr, &BTreeSet::from([first])).unwrap();
    assert_ne!(first, second);
    assert!(cidr.contains_usable(second));
    // The start depends only on the name, so it is fixed across processes and
    // versions: pin it.
    assert_eq!(fnv1a("default/hello"), 0xc634_9b2a_1e8f_40c1);
    let tiny = Cidr::parse("198.18.0.0/30").unwrap();
    let all: BTreeSet<IpAddr> = ["198.18.0.1", "198.18.0.2"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(allocate_cluster_ip(&svc, &tiny, &all), None);
}

#[test]
fn a_full_range_refuses() {
    let local_yaml = format!(
        "{}---\n{MIRROR}---\napiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{clusterIP: 198.18.128.1, ports: [{{port: 1}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: b}}\nspec: {{clusterIP: 198.18.128.2, ports: [{{port: 1}}]}}\n",
        LINK.replace("198.18.128.0/24", "198.18.128.0/30")
    );
    let r = reconcile_all(&view("cluster-b", &local_yaml), &remotes(remote_a(true)));
    assert_eq!(ready_of(&r, "hello-mirror").reason, "NoAddressLeft");
}

#[test]
fn two_mirrors_of_one_name_first_wins() {
    let second = MIRROR.replace("hello-mirror", "z-other");
    let local = view("cluster-b", &format!("{LINK}---\n{MIRROR}---\n{second}"));
    let r = reconcile_all(&local, &remotes(remote_a(true)));
    assert_eq!(ready_of(&r, "hello-mirror").reason, "Mirrored");
    assert_eq!(ready_of(&r, "z-other").reason, "NameConflict");
}
