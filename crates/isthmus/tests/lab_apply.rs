//! End-to-end: a running lab runs what a cluster runs (an API server and the
//! controller per cluster, gateways discovering through the API), and `isthmus
//! lab apply` / `isthmus lab delete` of a ServiceMirror from another terminal
//! take effect in the data path within the 5 s.
//!
//! Needs root and the workspace's binaries beside `isthmus`; fails without
//! them, never skips.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

mod common;

use common::*;

/// The bound the issue sets for a change to show in the data path.
const VISIBLE_WITHIN: Duration = Duration::from_secs(5);

#[test]
fn the_lab_runs_the_control_plane_and_follows_apply_and_delete_within_5s() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    two_clusters(tmp.path(), 1, "");
    let lab = LiveLab::start(tmp.path(), "240s");
    let prefix = lab.prefix.clone();
    let client_ns = lab.pod_ns("cluster-b", "client");

    // What a cluster runs, per cluster.
    let run = format!("/run/isthmus-lab/{prefix}/");
    let lines =
        |needle: &str| -> Vec<String> { processes(needle).into_iter().map(|(_, l)| l).collect() };
    for cluster in ["cluster-a", "cluster-b"] {
        let apiservers = lines(&format!("{run}kube/{cluster}/kubeconfig"));
        assert!(
            apiservers.iter().any(|p| p.contains("test-apiserver")),
            "no API server for {cluster}: {apiservers:?}"
        );
        let controllers: Vec<String> = lines(&format!("--settings {cluster}"))
            .into_iter()
            .filter(|p| p.starts_with(&format!("{run}bin/isthmus-controller run")))
            .collect();
        assert!(!controllers.is_empty(), "no controller for {cluster}");
        let gateways: Vec<String> = lines(&format!("gateway --cluster {cluster}"))
            .into_iter()
            .filter(|p| p.starts_with(&format!("{run}bin/isthmus-proxy")))
            .collect();
        assert!(
            gateways.len() == 1 && gateways[0].contains("--discovery kube"),
            "{cluster}'s gateway does not discover through the API: {gateways:?}"
        );
    }

    let url = "http://hello-two.default.svc.cluster.local/";
    assert_eq!(
        curl_in(&client_ns, url),
        None,
        "hello-two answers before its mirror"
    );
    let file = tmp.path().join("mirror.yaml");
    std::fs::write(&file, mirror("hello-two")).unwrap();

    lab.change("apply", "cluster-b", &file);
    let answered = until(VISIBLE_WITHIN, || {
        curl_in(&client_ns, url).is_some_and(|body| body.contains("Server name: hello-"))
    });
    assert!(
        answered.is_some(),
        "hello-two did not answer within {VISIBLE_WITHIN:?} of `isthmus lab apply`"
    );

    lab.change("delete", "cluster-b", &file);
    let refused = until(VISIBLE_WITHIN, || curl_in(&client_ns, url).is_none());
    assert!(
        refused.is_some(),
        "hello-two still answers {VISIBLE_WITHIN:?} after `isthmus lab delete`"
    );
    drop(lab);
    assert_nothing_left(&prefix);
}
