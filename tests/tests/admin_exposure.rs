//! What the admin port tells whom, on the wire: a real sidecar behind the real
//! capture in a pod namespace (198.18.0.2), asked from a second namespace
//! (198.18.0.1) and from inside the pod, on loopback and on the pod address.
//!
//! `/ready`, `/live` and `/metrics` answer everyone (kubelet probes and scrapers
//! come from the node); `/config` (the routing table, identity and limits) answers
//! loopback peers only, anyone else gets `403` and not one byte of it. Needs root
//! and the `isthmus-init` and `isthmus-proxy` binaries (see `sidecar.rs`).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use isthmus_tests::identity::mint_pod;
use isthmus_tests::pod::{ADMIN_PORT, SidecarPod, http_get};

/// Strings of the `/config` document that must not leak: the cluster, the
/// identity, the limits, discovery.
const CONFIG_MARKERS: [&str; 6] = [
    "cluster-b",
    "spiffe://",
    "limits",
    "discovery",
    "max_connections",
    "{",
];

fn status(response: &str) -> u16 {
    response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// `/config` from `addr` must be refused with a short body and nothing of the
/// document; `who` names the asker in failures.
fn assert_refused(response: &str, who: &str) {
    assert_eq!(
        status(response),
        403,
        "{who}: /config answered {response:?}"
    );
    let body = body(response);
    assert!(body.len() < 100, "{who}: a long refusal body: {body:?}");
    for marker in CONFIG_MARKERS {
        assert!(
            !body.contains(marker),
            "{who}: the refusal carries {marker:?} of the config: {body:?}"
        );
    }
}

#[test]
fn config_answers_loopback_only_and_probes_answer_everyone() {
    let pod = SidecarPod::start(|dir| mint_pod(dir, "admin exposure").unwrap(), &[]).unwrap();
    let remote = SocketAddr::new(pod.pod_ip, ADMIN_PORT);

    // From another namespace, as a node's kubelet or a scraper would come.
    let answers = pod.server.run(|| {
        [
            "/ready",
            "/live",
            "/metrics",
            "/config",
            "/config?pretty",
            "/nothing",
        ]
        .map(|path| (path, http_get(remote, path).unwrap()))
    });
    for (path, response) in &answers[..3] {
        assert_eq!(
            status(response),
            200,
            "{path} from 198.18.0.1: {response:?}"
        );
    }
    assert_eq!(body(&answers[0].1), "ready\n");
    assert!(
        body(&answers[2].1).contains("identity_leaf_expired 0"),
        "/metrics from 198.18.0.1 lacks the identity metrics"
    );
    assert_refused(&answers[3].1, "198.18.0.1");
    assert_refused(&answers[4].1, "198.18.0.1 (with a query)");
    assert_eq!(status(&answers[5].1), 404);
    assert!(
        !body(&answers[5].1).contains("/config"),
        "a stranger's 404 advertises /config: {:?}",
        answers[5].1
    );

    // From inside the pod, to the pod's own (non-loopback) address: still refused.
    let own_address = pod.pod.run(|| http_get(remote, "/config").unwrap());
    assert_refused(&own_address, "the pod's own address");

    // From inside the pod on loopback: the whole document.
    let local = pod.admin("/config").unwrap();
    assert_eq!(status(&local), 200, "/config on loopback: {local:?}");
    let config = body(&local);
    for field in [
        "\"cluster\": \"cluster-b\"",
        "\"admin_max_connections\": 64",
        "\"valid_now\": true",
        "spiffe://cluster.local/ns/default/sa/client",
    ] {
        assert!(
            config.contains(field),
            "/config on loopback lacks {field}: {config}"
        );
    }
    eprintln!(
        "from 198.18.0.1: /ready /live /metrics 200, /config {}; from {remote}: /config {}; \
         from 127.0.0.1: /config {} ({} bytes)",
        status(&answers[3].1),
        status(&own_address),
        status(&local),
        body(&local).len()
    );
}
