//! End-to-end test of `isthmus lab` on `examples/three-clusters`: three clusters,
//! two namespaces, a two-port Service with two replicas, mirrors from two
//! clusters, a refused mirror of a Service that is not exported, and an unmeshed
//! pod beside meshed ones.
//!
//! It needs root (network namespaces, iptables) and the workspace's other
//! binaries (`isthmus-proxy`, `isthmus-init`) built beside `isthmus`; without
//! either it fails and says how to run it. It never skips.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

mod common;

use common::*;

/// curl's exit code when `--max-time` ran out: a call that hung.
const CURL_TIMED_OUT: u32 = 28;

/// One call a container's loop reported: `<what>: exit <code> in <ms> ms
/// [Server address: <addr> Server name: <name>]`.
#[derive(Debug)]
struct Call {
    exit: u32,
    address: Option<String>,
    name: Option<String>,
}

/// The calls named `what` that pod `pod` of `cluster` reported, in order.
fn calls(stdout: &str, cluster: &str, pod: &str, what: &str) -> Vec<Call> {
    let prefix = format!("[{cluster}/{pod}-");
    let marker = format!("] {what}: exit ");
    stdout
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.split_once(&marker).map(|(_, rest)| rest))
        .map(|rest| {
            let exit = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no exit code in {rest:?}"));
            let field = |name: &str| {
                rest.split_once(name)
                    .and_then(|(_, v)| v.split_whitespace().next())
                    .map(str::to_owned)
            };
            Call {
                exit,
                address: field("Server address: "),
                name: field("Server name: "),
            }
        })
        .collect()
}

#[test]
fn three_clusters_mirror_refuse_and_keep_an_unmeshed_pod_apart() {
    require_root();
    let (out, stdout, context) = lab_up(
        &example_dir("three-clusters"),
        &["--duration", "25s"],
        Duration::from_secs(100),
    );
    assert!(
        out.status.success(),
        "lab up failed ({}); {context}",
        out.status
    );

    // The refused mirror is reported with its reason; the other two are mirrored.
    assert!(
        stdout.lines().any(|l| l.starts_with(
            "[west] ServiceMirror tools/secret-mirror: NotExported: cluster east does not export Service tools/secret"
        )),
        "{context}"
    );
    for line in [
        "[west] ServiceMirror shop/catalog-mirror: mirrored catalog from east",
        "[west] ServiceMirror tools/stock-mirror: mirrored stock from south",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?}; {context}");
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("[west] pod tools/legacy-") && l.contains(", unmeshed")),
        "the unmeshed pod is not listed as such; {context}"
    );

    // The frontend's loop: every cross-cluster call answered; ~2 s per round over
    // 25 s, so at least 5 rounds whatever the machine's pace.
    let mut names = BTreeSet::new();
    for (what, port) in [("catalog:80", 8080), ("catalog:8081", 8081)] {
        let seen = calls(&stdout, "west", "frontend", what);
        assert!(seen.len() >= 5, "{what}: {} calls; {context}", seen.len());
        for call in &seen {
            assert_eq!(call.exit, 0, "{what} failed: {call:?}; {context}");
            let address = call.address.as_deref().unwrap_or_default();
            assert!(
                address.starts_with("198.18.1.") && address.ends_with(&format!(":{port}")),
                "{what} answered from {address:?}, not a catalog pod of east on {port}; {context}"
            );
            let name = call.name.clone().unwrap_or_default();
            assert!(name.starts_with("catalog-"), "{call:?}; {context}");
            names.insert(name);
        }
    }
    assert!(
        names.len() >= 2,
        "the catalog answered from one replica only: {names:?}; {context}"
    );
    let stock = calls(&stdout, "west", "frontend", "stock");
    assert!(stock.len() >= 5, "{context}");
    assert!(
        stock
            .iter()
            .all(|c| c.exit == 0 && c.name.as_deref().is_some_and(|n| n.starts_with("stock-"))),
        "stock (from south): {stock:?}; {context}"
    );

    // The refused mirror made no Service: each call fails at once (no hosts entry),
    // never by running into --max-time, and the loop keeps its pace.
    let secret = calls(&stdout, "west", "frontend", "secret");
    assert!(
        secret.len() >= 5,
        "{} secret calls; {context}",
        secret.len()
    );
    assert!(
        secret
            .iter()
            .all(|c| c.exit != 0 && c.exit != CURL_TIMED_OUT && c.name.is_none()),
        "secret: {secret:?}; {context}"
    );

    // The unmeshed pod reaches west's own web directly (through web's sidecar as
    // plain TCP) and is refused at once by the mirrored catalog: curl's 7 is the
    // reset kube-proxy's rule sends, where a silent drop would be a 28.
    let web = calls(&stdout, "west", "legacy", "web");
    assert!(web.len() >= 5, "{context}");
    assert!(
        web.iter()
            .all(|c| c.exit == 0 && c.name.as_deref().is_some_and(|n| n.starts_with("web-"))),
        "web from the unmeshed pod: {web:?}; {context}"
    );
    let mirrored = calls(&stdout, "west", "legacy", "catalog");
    assert!(mirrored.len() >= 5, "{context}");
    assert!(
        mirrored.iter().all(|c| c.exit == 7),
        "the mirrored catalog from the unmeshed pod: {mirrored:?}; {context}"
    );

    // Traffic crossed the gateways: west's for every mirrored call, east's for the
    // catalog, south's for stock.
    assert!(carried(&stdout, "west") >= 15.0, "{context}");
    assert!(carried(&stdout, "east") >= 10.0, "{context}");
    assert!(carried(&stdout, "south") >= 5.0, "{context}");
    // The unmeshed pod has no proxy to report.
    assert!(
        !stdout.lines().any(|l| l.starts_with("west/legacy-")),
        "{context}"
    );
    assert_nothing_left(&run_prefix(&stdout));
}
