//! The mirrored Service's ClusterIP comes from the local API server, whatever
//! its service range: the controller creates the Service without an address,
//! reads back the one allocated, and publishes that one to the sidecars.
#![allow(clippy::unwrap_used)]

mod fixture;

use std::net::IpAddr;

use fixture::*;

/// A cluster whose API server allocates from `range`, mirroring the seed.
async fn mirrored_address(range: &str) {
    let range: ipnet::IpNet = range.parse().unwrap();
    let local = TestApiServer::builder()
        .service_cluster_ip_range(range)
        .start()
        .await
        .unwrap();
    let lab = Lab::with_local(local).await;
    lab.create_remote(&remote_service("hello", &[80], true))
        .await;
    let _controller = lab.controller("a").await;
    lab.apply_seed().await;

    let svc = lab
        .local_service("hello", |s| {
            s.spec
                .as_ref()
                .and_then(|s| s.cluster_ip.as_ref())
                .is_some()
        })
        .await;
    let ip: IpAddr = svc.spec.unwrap().cluster_ip.unwrap().parse().unwrap();
    assert!(range.contains(&ip), "{ip} is outside {range}");
    // The controller does not own the address: the API server does.
    let owned = serde_json::to_string(&svc.metadata.managed_fields).unwrap();
    assert!(!owned.contains("f:clusterIP"), "{owned}");

    let sm = lab.reason("hello-mirror", "Mirrored").await;
    let message = condition(&sm).message;
    assert!(message.contains(&format!(" at {ip},")), "{message}");

    let cms: Api<ConfigMap> = Api::namespaced(lab.local.client(), NS);
    let published = eventually("the allocated address published", || async {
        let data = cms.get_opt("isthmus-discovery").await.ok()??.data?;
        let services = data.get(SERVICES_KEY)?.clone();
        services.contains("hello").then_some(services)
    })
    .await;
    assert!(
        published.contains(&format!("clusterIP: {ip}")),
        "{published}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_cluster_allocates_the_mirrored_address() {
    mirrored_address("10.96.0.0/16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eks_cluster_allocates_the_mirrored_address() {
    mirrored_address("172.20.0.0/16").await;
}
