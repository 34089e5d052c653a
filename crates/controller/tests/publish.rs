//! The published ConfigMap, mounted as a directory, is what the directory source
//! loads: a mirrored ClusterIP:port resolves to the remote authority through the
//! cluster's gateway.
#![allow(clippy::unwrap_used)]

mod fixture;

use fixture::{assert_routes_to_hello, load_published};

use isthmus_controller::kinds::LinkResource;
use isthmus_controller::publish::{SERVICES_KEY, SETTINGS_KEY, render};
use isthmus_vocab::{ClusterName, SpiffeId};
use k8s_openapi::api::core::v1::Service;
use proxy_discovery::model::{ClusterSettings, GatewayAddress, GatewaySpec};

fn service(json: serde_json::Value) -> Service {
    serde_json::from_value(json).unwrap()
}

#[test]
fn the_configmap_loads_with_the_directory_source_and_routes_to_the_remote() {
    let mut settings = ClusterSettings::defaults(ClusterName::parse("cluster-b").unwrap());
    settings.spec.gateway = Some(GatewaySpec {
        address: GatewayAddress::parse("198.18.1.1").unwrap(),
        port: 4143,
        identity: SpiffeId::parse("spiffe://cluster.local/ns/isthmus/sa/gateway").unwrap(),
    });
    let link: LinkResource = serde_json::from_value(serde_json::json!({
        "apiVersion": "multicluster.isthmus.io/v1alpha1", "kind": "Link",
        "metadata": {"name": "cluster-a", "namespace": "isthmus", "uid": "l1"},
        "spec": {"targetClusterName": "cluster-a", "gatewayAddress": "198.18.0.1",
            "gatewayIdentity": "spiffe://cluster.local/ns/isthmus/sa/gateway",
            "credentialsSecret": "cluster-a-kubeconfig"}
    }))
    .unwrap();
    let mirrored = service(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "hello", "namespace": "default", "uid": "s1", "resourceVersion": "9",
            "labels": {"mirror.isthmus.io/mirrored-service": "true", "mirror.isthmus.io/remote-cluster": "cluster-a"},
            "annotations": {"mirror.isthmus.io/remote-service": "hello.default",
                "mirror.isthmus.io/remote-cluster-domain": "cluster.local"},
            "ownerReferences": [{"apiVersion": "linkerd.io/v1alpha1", "kind": "ServiceMirror",
                "name": "hello", "uid": "m1", "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.7.7", "clusterIPs": ["10.96.7.7"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }));
    // A plain local Service is not the sidecars' business here.
    let plain = service(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "frontend", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}
    }));
    let data = render(
        "isthmus/isthmus-discovery",
        &settings,
        &[link],
        &[plain, mirrored],
    )
    .unwrap();
    assert!(!data[SERVICES_KEY].contains("frontend"));
    assert!(
        !data[SERVICES_KEY].contains("ownerReferences"),
        "{}",
        data[SERVICES_KEY]
    );
    assert!(data[SETTINGS_KEY].contains("198.18.1.1"));
    assert!(!data.values().any(|v| v.contains("credentials")));

    let snapshot = load_published(&data);
    assert_eq!(snapshot.cluster().as_str(), "cluster-b");
    assert!(snapshot.link("cluster-a").is_some());
    assert_routes_to_hello(
        snapshot
            .lookup_addr(&"10.96.7.7:80".parse().unwrap())
            .unwrap(),
    );
    // Rendering is deterministic: same inputs, same bytes (no needless writes).
    assert_eq!(
        render("isthmus/isthmus-discovery", &settings, &[], &[]).unwrap(),
        render("isthmus/isthmus-discovery", &settings, &[], &[]).unwrap()
    );
}
