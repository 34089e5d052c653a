//! End-to-end: the lab's Links name the peer gateways by DNS, as `isthmus link`
//! writes a cloud load balancer's hostname, and the lab's gateways resolve those
//! names through their namespace's hosts file. When the name moves to another
//! address of the peer's gateway (a load balancer replaced), traffic follows
//! without a restart: the old address then refuses every packet, and hello still
//! answers.
//!
//! Needs root and the workspace's binaries beside `isthmus`; fails without
//! them, never skips.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

mod common;

use common::*;

const HELLO: &str = "http://hello.default.svc.cluster.local/";
/// cluster-a's gateway on the WAN, as the lab places it.
const OLD: &str = "198.18.250.1";
/// The address the name moves to: free in the WAN's /24 (gateways take `.1`
/// to `.32`).
const NEW: &str = "198.18.250.200";
const NAME: &str = "gateway.cluster-a.isthmus-lab.test";
/// The gateways look names up every 30 s by default: one period, a lookup,
/// and slack for a loaded machine.
const MOVE_WITHIN: Duration = Duration::from_secs(75);
/// How long hello gets to answer after a change of path.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

fn run_in(ns: &str, args: &[&str]) -> String {
    let out = exec_in(ns, args);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} in {ns}: {said}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// cluster-b's gateway's `/config`, without whitespace.
fn config(gateway_ns: &str) -> String {
    curl_in(gateway_ns, "http://127.0.0.1:4191/config")
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

/// The pid of cluster-b's gateway in run `prefix`.
fn gateway_pid(prefix: &str) -> u32 {
    let bin = format!("/run/isthmus-lab/{prefix}/bin/isthmus-proxy gateway --cluster cluster-b");
    let found: Vec<u32> = processes(&bin)
        .into_iter()
        .filter(|(_, l)| l.starts_with(&bin))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(found.len(), 1, "cluster-b's gateway: {found:?}");
    found[0]
}

fn answers(client_ns: &str) -> bool {
    curl_in(client_ns, HELLO).is_some_and(|body| body.contains("Server name: hello-"))
}

#[test]
fn a_link_named_by_dns_moves_with_its_name_without_a_restart() {
    let (_dir, lab, client_ns) = hello_lab();
    let (a_gw, b_gw) = (lab.gateway_ns("cluster-a"), lab.gateway_ns("cluster-b"));
    let pid = gateway_pid(&lab.prefix);
    assert!(
        until(ANSWER_WITHIN, || answers(&client_ns)).is_some(),
        "hello does not answer; {}",
        lab.context()
    );
    // The Link names cluster-a's gateway, and the name resolves where it is.
    let before = config(&b_gw);
    assert!(
        before.contains(NAME) && before.contains(&format!("\"addresses\":[\"{OLD}:4143\"]")),
        "cluster-b's gateway does not reach {NAME} at {OLD}: {before}"
    );

    // The load balancer moves: cluster-a's gateway takes a second address, and
    // the name points there in the hosts file of cluster-b's gateway (written in
    // place: a bind mount follows the file, not its name).
    run_in(
        &a_gw,
        &["ip", "addr", "add", &format!("{NEW}/24"), "dev", "wan0"],
    );
    let hosts = format!("/etc/netns/{b_gw}/hosts");
    let text = std::fs::read_to_string(&hosts).unwrap();
    assert!(
        text.contains(&format!("{OLD}\t{NAME}\n")),
        "{hosts}: {text}"
    );
    std::fs::write(
        &hosts,
        text.replace(&format!("{OLD}\t{NAME}"), &format!("{NEW}\t{NAME}")),
    )
    .unwrap();
    let moved = until(MOVE_WITHIN, || {
        config(&b_gw).contains(&format!("\"addresses\":[\"{NEW}:4143\"]"))
    });
    assert!(
        moved.is_some(),
        "cluster-b's gateway did not follow {NAME} to {NEW} within {MOVE_WITHIN:?}: {}",
        config(&b_gw)
    );

    // The old address refuses everything from now on: what still answers went
    // the new way.
    run_in(
        &a_gw,
        &[
            "iptables-nft",
            "-I",
            "INPUT",
            "-d",
            OLD,
            "-p",
            "tcp",
            "--dport",
            "4143",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
    );
    assert!(
        until(ANSWER_WITHIN, || answers(&client_ns)).is_some(),
        "hello stopped answering once {OLD} refused"
    );
    for i in 0..5 {
        assert!(answers(&client_ns), "call {i} after the move failed");
    }
    let on_new = run_in(
        &a_gw,
        &[
            "ss",
            "-Htn",
            "state",
            "established",
            "src",
            &format!("{NEW}:4143"),
        ],
    );
    assert!(!on_new.trim().is_empty(), "no link connection on {NEW}");
    assert_eq!(
        gateway_pid(&lab.prefix),
        pid,
        "cluster-b's gateway restarted"
    );
    let prefix = lab.prefix.clone();
    drop(lab);
    assert_nothing_left(&prefix);
}
