//! ClusterIP allocation through unmodified kube-rs clients, as a controller
//! meets it on a real cluster: addresses come from the configured service
//! range, a requested one outside it or already taken is refused with the real
//! server's 422, `clusterIP` cannot change, and a deleted Service frees its
//! address.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use test_apiserver::TestApiServer;

fn service(name: &str, spec: Value) -> Service {
    let mut spec = spec;
    spec["ports"] = json!([{"port": 80}]);
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .unwrap()
}

async fn create(api: &Api<Service>, name: &str, spec: Value) -> Result<Service, kube::Error> {
    api.create(&PostParams::default(), &service(name, spec))
        .await
}

fn ip_of(svc: &Service) -> IpAddr {
    let spec = svc.spec.as_ref().unwrap();
    let ip: IpAddr = spec.cluster_ip.as_deref().unwrap().parse().unwrap();
    assert_eq!(spec.cluster_ips.as_deref(), Some(&[ip.to_string()][..]));
    ip
}

fn refusal(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn server(range: &str) -> (TestApiServer, Api<Service>, IpNet) {
    let range: IpNet = range.parse().unwrap();
    let server = TestApiServer::builder()
        .service_cluster_ip_range(range)
        .start()
        .await
        .unwrap();
    let api = Api::namespaced(server.client(), "default");
    (server, api, range)
}

#[tokio::test]
async fn allocates_from_the_configured_range() {
    // kind's range and EKS's: neither is the 10.96.0.0/12 default.
    for cidr in ["10.96.0.0/16", "172.20.0.0/16"] {
        let (_server, api, range) = server(cidr).await;
        let mut seen = Vec::new();
        for i in 0..20 {
            let created = create(&api, &format!("s{i}"), json!({})).await.unwrap();
            let ip = ip_of(&created);
            assert!(range.contains(&ip), "{ip} outside {range}");
            assert_ne!(
                ip,
                range.network(),
                "the network address is never handed out"
            );
            assert!(!seen.contains(&ip), "{ip} handed out twice");
            seen.push(ip);
        }
        // Server-side apply without an address gets one too.
        let applied = api
            .patch(
                "applied",
                &PatchParams::apply("test"),
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "applied"}, "spec": {"ports": [{"port": 80}]}})),
            )
            .await
            .unwrap();
        assert!(range.contains(&ip_of(&applied)));
    }
}

#[tokio::test]
async fn refuses_addresses_outside_the_range_or_taken() {
    let (_server, api, _) = server("10.96.0.0/16").await;
    // (name, address, what the refusal says), as kube-apiserver words it.
    let far = "Service \"far\" is invalid: spec.clusterIPs: Invalid value: [\"10.100.0.10\"]: failed to allocate IP 10.100.0.10: the provided IP (10.100.0.10) is not in the valid range. The range of valid IPs is 10.96.0.0/16";
    let refused = [
        ("far", "10.100.0.10", far),
        ("twin", "10.96.0.10", "provided IP is already allocated"),
    ];

    let fixed = create(&api, "fixed", json!({"clusterIP": "10.96.0.10"}))
        .await
        .unwrap();
    assert_eq!(ip_of(&fixed), "10.96.0.10".parse::<IpAddr>().unwrap());
    for (name, ip, said) in refused {
        let err = create(&api, name, json!({"clusterIP": ip}))
            .await
            .unwrap_err();
        let (code, message) = refusal(err);
        assert_eq!(code, 422);
        assert!(message.contains(said), "{message}");
    }

    // Deleting frees the address.
    api.delete("fixed", &DeleteParams::default()).await.unwrap();
    let twin = create(&api, "twin", json!({"clusterIP": "10.96.0.10"}))
        .await
        .unwrap();
    assert_eq!(ip_of(&twin), "10.96.0.10".parse::<IpAddr>().unwrap());

    // Headless and ExternalName Services take no address.
    let headless = create(&api, "headless", json!({"clusterIP": "None"}))
        .await
        .unwrap();
    assert_eq!(headless.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    let external = create(
        &api,
        "external",
        json!({"type": "ExternalName", "externalName": "db.example"}),
    )
    .await
    .unwrap();
    assert_eq!(external.spec.unwrap().cluster_ip, None);
}

#[tokio::test]
async fn cluster_ip_is_immutable() {
    let (_server, api, _) = server("10.96.0.0/16").await;
    let created = create(&api, "hello", json!({})).await.unwrap();
    let ip = ip_of(&created);
    let other = if ip.to_string() == "10.96.0.77" {
        "10.96.0.78"
    } else {
        "10.96.0.77"
    };
    let immutable = |err: kube::Error| {
        let (code, message) = refusal(err);
        assert_eq!(code, 422);
        assert!(
            message.contains(&format!(
                "spec.clusterIP: Invalid value: \"{other}\": field is immutable"
            )),
            "{message}"
        );
    };

    let mut replaced = created.clone();
    replaced.spec.as_mut().unwrap().cluster_ip = Some(other.to_owned());
    replaced.spec.as_mut().unwrap().cluster_ips = None;
    immutable(
        api.replace("hello", &PostParams::default(), &replaced)
            .await
            .unwrap_err(),
    );
    immutable(
        api.patch(
            "hello",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"clusterIP": other, "clusterIPs": [other]}})),
        )
        .await
        .unwrap_err(),
    );
    immutable(
        api.patch(
            "hello",
            &PatchParams::apply("test").force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "hello"}, "spec": {"clusterIP": other}})),
        )
        .await
        .unwrap_err(),
    );

    // A write that leaves the address out keeps it, as the real registry does.
    let mut without = created.clone();
    let spec = without.spec.as_mut().unwrap();
    spec.cluster_ip = None;
    spec.cluster_ips = None;
    spec.ports.as_mut().unwrap()[0].port = 81;
    let kept = api
        .replace("hello", &PostParams::default(), &without)
        .await
        .unwrap();
    assert_eq!(ip_of(&kept), ip);
    let applied = api
        .patch(
            "hello",
            &PatchParams::apply("other").force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "hello"}, "spec": {"ports": [{"port": 82}]}})),
        )
        .await
        .unwrap();
    assert_eq!(ip_of(&applied), ip);
}
