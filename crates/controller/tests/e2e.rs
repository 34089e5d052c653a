//! The controller end to end against two in-memory API servers that speak the
//! Kubernetes REST and watch protocol: cluster-b (local, where the controller
//! runs) and cluster-a (remote, reached through a Link and the kubeconfig in its
//! Secret). Nothing here calls the reconcile directly: tests write objects and
//! watch what the controller does to the API servers.
#![allow(clippy::unwrap_used)]

mod fixture;

use fixture::*;
/// Where a mirrored Service says it comes from: the remote cluster (a label) and
/// the remote Service as `name.namespace` (an annotation).
fn mirrored_from(svc: &Service) -> (&str, &str) {
    (
        &svc.labels()["mirror.isthmus.io/remote-cluster"],
        &svc.annotations()["mirror.isthmus.io/remote-service"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_lifecycle_follows_the_remote_and_the_mirror() {
    let lab = Lab::new().await;
    lab.create_remote(&remote_service("hello", &[80], true))
        .await;
    let controller = lab.controller("a").await;

    // Create: the seed's mirror yields a local `hello`, owned by the mirror.
    let sm = lab.apply_seed().await;
    let svc = lab.local_service("hello", |s| ports(s) == [80]).await;
    let owner = &svc.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("ServiceMirror", "hello-mirror", sm.uid().unwrap().as_str())
    );
    assert_eq!(
        (owner.controller, owner.block_owner_deletion),
        (Some(true), Some(true))
    );
    assert_eq!(mirrored_from(&svc), ("cluster-a", "hello.default"));
    let managers: Vec<_> = svc
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, ["isthmus-controller"]);
    let ip = svc.spec.as_ref().unwrap().cluster_ip.clone().unwrap();

    let sm = lab.reason("hello-mirror", "Mirrored").await;
    let c = condition(&sm);
    assert_eq!(c.status, proxy_discovery::model::ConditionStatus::True);
    assert!(c.message.contains("hello"), "{}", c.message);
    let status = sm.status.clone().unwrap();
    let remote_rv = lab
        .remote_services()
        .get("hello")
        .await
        .unwrap()
        .resource_version();
    assert_eq!(status.remote_resource_version, remote_rv);
    assert_eq!(status.observed_generation, sm.metadata.generation);
    let contact: k8s_openapi::jiff::Timestamp =
        status.last_remote_contact.unwrap().parse().unwrap();
    assert!(
        k8s_openapi::jiff::Timestamp::now()
            .duration_since(contact)
            .as_secs()
            < 60
    );

    // The sidecars' ConfigMap routes the mirrored ClusterIP to the remote authority.
    let cms: Api<ConfigMap> = Api::namespaced(lab.local.client(), NS);
    let data = eventually("ConfigMap with hello", || async {
        let cm = cms.get_opt("isthmus-discovery").await.ok()??;
        let data = cm.data?;
        data[SERVICES_KEY].contains("hello").then_some(data)
    })
    .await;
    // The same ConfigMap in an application namespace, where its pods can mount it,
    // and in none that opted out.
    let namespaces: Api<Namespace> = Api::all(lab.local.client());
    for (name, labels) in [
        ("shop", serde_json::json!({})),
        (
            "legacy",
            serde_json::json!({"isthmus.io/discovery": "disabled"}),
        ),
    ] {
        let ns: Namespace = json(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }));
        create(&format!("namespace {name}"), &namespaces, &ns).await;
    }
    let shop: Api<ConfigMap> = Api::namespaced(lab.local.client(), "shop");
    eventually("the ConfigMap in namespace shop", || async {
        let cm = shop.get_opt("isthmus-discovery").await.ok()??;
        (cm.data? == data).then_some(())
    })
    .await;
    let legacy: Api<ConfigMap> = Api::namespaced(lab.local.client(), "legacy");
    assert!(
        legacy.get_opt("isthmus-discovery").await.unwrap().is_none(),
        "a namespace labelled isthmus.io/discovery: disabled got the ConfigMap"
    );
    let snapshot = load_published(&data);
    assert_routes_to_hello(
        snapshot
            .lookup_addr(&format!("{ip}:80").parse().unwrap())
            .unwrap(),
    );

    // The remote Service changes ports: the mirror follows, keeping its address.
    let patch = serde_json::json!({"spec": {"ports": [
        {"name": "http", "port": 80, "protocol": "TCP"}, {"name": "admin", "port": 9090, "protocol": "TCP"}]}});
    timed(
        "patch remote",
        lab.remote_services()
            .patch("hello", &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await
    .unwrap();
    let svc = lab.local_service("hello", |s| ports(s) == [80, 9090]).await;
    assert_eq!(svc.spec.as_ref().unwrap().cluster_ip.as_ref(), Some(&ip));

    // Update of the mirror: it now names another remote Service; the old mirrored
    // Service goes, the new one comes.
    lab.create_remote(&remote_service("hola", &[8080], true))
        .await;
    lab.retarget_mirror("hello-mirror", "hola").await;
    lab.local_service("hola", |s| ports(s) == [8080]).await;
    lab.local_service_gone("hello").await;
    // The watch of `hello` went with the need for it.
    let addr = controller.metrics_addr().unwrap();
    metrics_show(addr, "isthmus_controller_remote_watches 1\n").await;
    lab.retarget_mirror("hello-mirror", "hello").await;
    lab.local_service("hello", |s| ports(s) == [80, 9090]).await;
    lab.local_service_gone("hola").await;

    // The remote Service is deleted: so is the mirror's, and the status says why.
    lab.delete_remote("hello").await;
    lab.local_service_gone("hello").await;
    let sm = lab.reason("hello-mirror", "RemoteServiceNotFound").await;
    assert_eq!(
        condition(&sm).status,
        proxy_discovery::model::ConditionStatus::False
    );
    // ... and back.
    lab.create_remote(&remote_service("hello", &[80], true))
        .await;
    lab.local_service("hello", |s| ports(s) == [80]).await;
    lab.reason("hello-mirror", "Mirrored").await;

    // Deleting the ServiceMirror removes its Service (owner reference) and the
    // ConfigMap entry.
    delete(&lab.mirrors(), "hello-mirror").await;
    lab.local_service_gone("hello").await;
    eventually("ConfigMap without hello", || async {
        let cm = cms.get_opt("isthmus-discovery").await.ok()??;
        (!cm.data?[SERVICES_KEY].contains("hello")).then_some(())
    })
    .await;
    let text = metrics(controller.metrics_addr().unwrap()).await;
    assert!(
        text.contains("isthmus_controller_reconciles_total{reason=\"Mirrored\"}"),
        "{text}"
    );
    // No mirror needs the remote any more: its watch is gone.
    let addr = controller.metrics_addr().unwrap();
    metrics_show(addr, "isthmus_controller_remote_watches 0").await;
    timed("stop", controller.stop()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_their_cause_and_never_touch_an_unowned_service() {
    let lab = Lab::new().await;
    let controller = lab.controller("a").await;

    // Not exported.
    lab.create_remote(&remote_service("private", &[80], false))
        .await;
    let sm: ServiceMirrorResource = json(serde_json::json!({
        "apiVersion": "linkerd.io/v1alpha1", "kind": "ServiceMirror",
        "metadata": {"name": "private", "namespace": "default"},
        "spec": {"cluster": "cluster-a", "service": {"name": "private", "namespace": "default"}}
    }));
    lab.create_mirror(&sm).await;
    let sm = lab.reason("private", "NotExported").await;
    assert!(
        condition(&sm).message.contains("does not export"),
        "{}",
        condition(&sm).message
    );
    assert!(
        lab.local_services()
            .get_opt("private")
            .await
            .unwrap()
            .is_none()
    );

    // Unknown cluster.
    let sm: ServiceMirrorResource = json(serde_json::json!({
        "apiVersion": "linkerd.io/v1alpha1", "kind": "ServiceMirror",
        "metadata": {"name": "far", "namespace": "default"},
        "spec": {"cluster": "cluster-z", "service": {"name": "far"}}
    }));
    lab.create_mirror(&sm).await;
    lab.reason("far", "UnknownCluster").await;

    // A mirror the model rejects (a real API server's schema would refuse it;
    // this one stores it) gets a status naming the field, and does not stop the
    // others.
    let bad = serde_json::json!({
        "apiVersion": "linkerd.io/v1alpha1", "kind": "ServiceMirror",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"cluster": "Not_A_Cluster", "service": {"name": "bad"}}
    });
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        lab.local.client(),
        "default",
        &kube::api::ApiResource::erase::<ServiceMirrorResource>(&()),
    );
    create("bad mirror", &raw, &json(bad)).await;
    let bad = eventually("bad mirror reported", || async {
        let o = raw.get("bad").await.ok()?;
        let c = o.data.pointer("/status/conditions/0")?.clone();
        (c["reason"] == "InvalidSpec").then_some(c)
    })
    .await;
    let m = bad["message"].as_str().unwrap();
    assert!(
        m.contains("default/bad") && m.contains("Not_A_Cluster"),
        "{m}"
    );
    // Its status is written once, not on every event its own write causes.
    let rv = raw.get("bad").await.unwrap().resource_version();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(raw.get("bad").await.unwrap().resource_version(), rv);

    // A Link whose credentials Secret does not exist: the status names it.
    lab.create_link("cluster-c", "198.18.2.1").await;
    let sm: ServiceMirrorResource = json(serde_json::json!({
        "apiVersion": "linkerd.io/v1alpha1", "kind": "ServiceMirror",
        "metadata": {"name": "c", "namespace": "default"},
        "spec": {"cluster": "cluster-c", "service": {"name": "c"}}
    }));
    lab.create_mirror(&sm).await;
    let sm = lab.reason("c", "InvalidCredentials").await;
    let m = condition(&sm).message;
    assert!(m.contains("Secret isthmus/cluster-c-kubeconfig"), "{m}");

    // Name conflict: a local `hello` someone else made stays exactly as it is.
    lab.create_remote(&remote_service("hello", &[80], true))
        .await;
    let theirs: Service = json(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "hello", "namespace": "default", "labels": {"team": "web"}},
        "spec": {"clusterIP": "10.96.5.5", "ports": [{"port": 8443}], "selector": {"app": "web"}}
    }));
    let theirs = create("local Service", &lab.local_services(), &theirs).await;
    lab.apply_seed().await;
    let sm = lab.reason("hello-mirror", "NameConflict").await;
    assert_eq!(
        condition(&sm).status,
        proxy_discovery::model::ConditionStatus::False
    );
    assert!(condition(&sm).message.contains("left untouched"));
    // Give the controller time to do something wrong, then check it did not.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = lab.local_services().get("hello").await.unwrap();
    assert_eq!(now.resource_version(), theirs.resource_version());
    assert_eq!(now.spec, theirs.spec);
    assert!(now.metadata.owner_references.is_none());

    // Once their Service goes, the mirror takes the name.
    delete(&lab.local_services(), "hello").await;
    lab.local_service("hello", |s| s.metadata.owner_references.is_some())
        .await;
    lab.reason("hello-mirror", "Mirrored").await;
    timed("stop", controller.stop()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_remote_keeps_the_mirror_and_says_how_stale_it_is() {
    let (lab, controller) = Lab::seed_mirrored().await;
    let before = lab.local_service("hello", |s| ports(s) == [80]).await;

    timed("stop remote", lab.remote.stop()).await;
    let sm = lab.reason("hello-mirror", "RemoteUnreachable").await;
    let c = condition(&sm);
    // The mirror still serves its last known state, and says so.
    assert_eq!(c.status, proxy_discovery::model::ConditionStatus::True);
    assert!(
        c.message.contains("keeps its last known state"),
        "{}",
        c.message
    );
    assert!(c.message.contains("last reached"), "{}", c.message);
    assert!(sm.status.as_ref().unwrap().last_remote_contact.is_some());
    let addr = controller.metrics_addr().unwrap();
    eventually("staleness metric above 1s", || async {
        let text = metrics(addr).await;
        let line = text.lines().find(|l| {
            l.starts_with("isthmus_controller_remote_staleness_seconds{cluster=\"cluster-a\"}")
        })?;
        let v: f64 = line.rsplit(' ').next()?.parse().ok()?;
        (v >= 1.0).then_some(())
    })
    .await;
    // The age in the message grows while the remote stays away.
    eventually("message with a later age", || async {
        let sm = lab.mirrors().get("hello-mirror").await.ok()?;
        let m = condition(&sm).message;
        (m != c.message && m.contains("last reached")).then_some(())
    })
    .await;
    let during = lab.local_services().get("hello").await.unwrap();
    assert_eq!(during.resource_version(), before.resource_version());

    timed("restart remote", lab.remote.restart()).await.unwrap();
    lab.reason("hello-mirror", "Mirrored").await;
    let text = metrics(addr).await;
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("isthmus_controller_remote_staleness_seconds{cluster=\"cluster-a\"}")
        })
        .unwrap();
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(v < 5.0, "{line}");
    timed("stop", controller.stop()).await;
}

/// Samples both replicas' leadership until `to` (named `name`) leads, failing if
/// both ever lead at once or `to` has not taken over by the deadline. It watches
/// views that outlive the replicas, so `from` may stop or be dropped meanwhile.
fn watch_takeover(from: &Running, to: &Running, name: &str) -> tokio::task::JoinHandle<()> {
    let (from, to, name) = (from.leadership(), to.leadership(), name.to_owned());
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        while start.elapsed() < DEADLINE {
            let (x, y) = (from.is_leading(), to.is_leading());
            assert!(!(x && y), "two replicas led at once");
            if y {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("{name} did not take over within {DEADLINE:?}");
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_fails_over_and_only_the_leader_writes() {
    let lab = Lab::new().await;
    lab.create_remote(&remote_service("hello", &[80], true))
        .await;
    lab.create_remote(&remote_service("second", &[81], true))
        .await;
    let leases: Api<Lease> = Api::namespaced(lab.local.client(), NS);
    let holder = |want: &'static str| {
        let leases = leases.clone();
        async move {
            eventually(&format!("Lease held by {want}"), || async {
                let l = leases.get_opt("isthmus-controller").await.ok()??;
                let spec = l.spec?;
                (spec.holder_identity.as_deref() == Some(want)).then_some(spec)
            })
            .await
        }
    };

    let a = lab.controller("a").await;
    let spec = holder("a").await;
    assert_eq!(spec.lease_duration_seconds, Some(2));
    assert!(spec.acquire_time.is_some() && spec.renew_time.is_some());
    let b = lab.controller("b").await;
    lab.apply_seed().await;
    lab.local_service("hello", |_| true).await;
    // Renewals keep the Lease with a; b stands by.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(a.is_leading() && !b.is_leading());
    assert_eq!(holder("a").await.lease_transitions, Some(0));

    // Watch both replicas while a goes away: never two leaders at once.
    let sampler = watch_takeover(&a, &b, "b");
    let stopped_at = tokio::time::Instant::now();
    timed("a stops", a.stop()).await;
    timed("b takes over", sampler).await.unwrap();
    // A figure for the log, not an assertion: machines differ.
    eprintln!(
        "takeover after a released Lease: {:?}",
        stopped_at.elapsed()
    );

    let spec = holder("b").await;
    assert_eq!(spec.lease_transitions, Some(1));
    assert!(b.is_leading());
    // b writes now: a new mirror is served.
    let sm: ServiceMirrorResource = json(serde_json::json!({
        "apiVersion": "linkerd.io/v1alpha1", "kind": "ServiceMirror",
        "metadata": {"name": "second", "namespace": "default"},
        "spec": {"cluster": "cluster-a", "service": {"name": "second"}}
    }));
    lab.create_mirror(&sm).await;
    lab.local_service("second", |s| ports(s) == [81]).await;
    lab.reason("second", "Mirrored").await;

    // A crash: b ends without releasing the Lease. c waits out the duration from
    // when it last saw the record change, by its own clock, then takes over; b's
    // own deadline has long passed by then.
    let c = lab.controller("c").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!c.is_leading());
    let sampler = watch_takeover(&b, &c, "c");
    let crashed_at = tokio::time::Instant::now();
    drop(b);
    timed("c takes over", sampler).await.unwrap();
    eprintln!(
        "takeover after a crash (2s Lease): {:?}",
        crashed_at.elapsed()
    );
    assert!(
        crashed_at.elapsed() >= Duration::from_secs(1),
        "c took over before the crashed leader's Lease could expire"
    );
    let spec = holder("c").await;
    assert_eq!(spec.lease_transitions, Some(2));
    delete(&lab.mirrors(), "second").await;
    lab.local_service_gone("second").await;
    timed("stop c", c.stop()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_cluster_settings_export_namespaces_and_name_the_domain() {
    let lab = Lab::new().await;
    let remote = lab.remote.client();
    create_cluster_settings(
        &remote,
        serde_json::json!({"clusterName": "cluster-a", "clusterDomain": "a.example",
            "exportedNamespaces": ["shared"]}),
    )
    .await;
    // Not labelled: exported only because its namespace is.
    let mut svc = remote_service("db", &[5432], false);
    svc.metadata.namespace = Some("shared".to_owned());
    create_namespace(&remote, "shared").await;
    create("shared", &Api::namespaced(remote.clone(), "shared"), &svc).await;
    let controller = lab.controller("a").await;
    let sm: ServiceMirrorResource = json(serde_json::json!({
        "apiVersion": "linkerd.io/v1alpha1", "kind": "ServiceMirror",
        "metadata": {"name": "db", "namespace": "default"},
        "spec": {"cluster": "cluster-a", "service": {"name": "db", "namespace": "shared"}}
    }));
    lab.create_mirror(&sm).await;
    let svc = lab.local_service("db", |s| ports(s) == [5432]).await;
    assert_eq!(
        svc.annotations()["mirror.isthmus.io/remote-cluster-domain"],
        "a.example"
    );
    assert_eq!(mirrored_from(&svc), ("cluster-a", "db.shared"));
    lab.reason("db", "Mirrored").await;

    // The remote stops exporting the namespace: the mirror goes.
    let patch = serde_json::json!({"spec": {"exportedNamespaces": []}});
    let api: Api<ClusterSettingsResource> = Api::namespaced(remote, NS);
    timed(
        "unexport",
        api.patch("cluster", &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await
    .unwrap();
    lab.local_service_gone("db").await;
    lab.reason("db", "NotExported").await;
    timed("stop", controller.stop()).await;
}
