//! `/ready`: a leader is ready only after its first full sync (it could not
//! publish without its ClusterSettings, so it is not ready while they are
//! missing), and a standby as soon as the API server has answered its Lease
//! round, so a rolling update is never stuck behind the leader.

#![allow(clippy::unwrap_used)]

mod fixture;

use std::time::Duration;

use fixture::*;
use isthmus_controller::mirror::SettingsSource;

async fn status(addr: std::net::SocketAddr) -> String {
    let response = get(addr, "/ready").await;
    let line = response.lines().next().unwrap_or_default().to_owned();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
    format!("{line} {body}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_is_ready_only_after_its_first_full_sync() {
    let lab = Lab::new().await;
    let mut config = Lab::config("a");
    config.lease = None;
    config.settings = SettingsSource::Object("later".to_owned());
    let running = timed(
        "start",
        isthmus_controller::start(lab.local.client(), config),
    )
    .await
    .unwrap();
    let addr = running.metrics_addr().unwrap();
    metrics_show(addr, "isthmus_controller_leader 1").await;
    // Leading, with its caches filling, but no settings to publish with: give a
    // wrong answer several publish rounds to show.
    for _ in 0..5 {
        let now = status(addr).await;
        assert!(now.contains(" 503 "), "ready before a full sync: {now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut settings = lab
        .local
        .store()
        .get_value(
            "multicluster.isthmus.io/v1alpha1",
            "ClusterSettings",
            Some(NS),
            "cluster",
        )
        .unwrap();
    settings["metadata"] = serde_json::json!({"name": "later", "namespace": NS});
    lab.local.store().put_value(settings).unwrap();
    eventually("ready after the first full sync", || async {
        let now = status(addr).await;
        now.contains(" 200 ").then_some(now)
    })
    .await;
    assert!(status(addr).await.contains("ready (leader)"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_ready_once_the_api_server_answered() {
    let lab = Lab::new().await;
    let a = lab.controller("a").await;
    eventually("a leads", || async { a.is_leading().then_some(()) }).await;
    let b = lab.controller("b").await;
    let addr = b.metrics_addr().unwrap();
    let now = eventually("the standby is ready", || async {
        let now = status(addr).await;
        now.contains(" 200 ").then_some(now)
    })
    .await;
    assert!(now.contains("ready (standby)"), "{now}");
    assert!(!b.is_leading());
    b.stop().await;
    a.stop().await;
}
