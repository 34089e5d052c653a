//! The link probe rides the mTLS tunnel: two real `isthmus-proxy gateway` processes
//! on loopback, linked both ways, whose Links' `probeSpec` names a port where nothing
//! listens (as when a peer's admin port is not exposed across clusters).
//!
//! The probe must still succeed (a PING round trip on the link's pooled connection),
//! with `gateway_link_probe_success` and the `/config` probe view saying so, and
//! must fail once the peer gateway is gone.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Proxy, write_files};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use isthmus_tests::identity::Pki;
use isthmus_tests::multicluster::{cluster_settings, gateway_id, link};
use isthmus_tests::pod::{http_get, metric};
use proxy_identity::mint;

const STEP: Duration = Duration::from_secs(10);

fn free_addr(ip: Ipv4Addr) -> SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

fn start(cluster: &str, root: &Path, inbound: SocketAddr, admin: SocketAddr) -> Proxy {
    Proxy::command(
        env!("CARGO_BIN_EXE_isthmus-proxy"),
        "gateway",
        cluster,
        &root.join(format!("identity-{cluster}")),
        &root.join(format!("manifests-{cluster}")),
        admin,
        root.join(format!("{cluster}.log")),
    )
    .arg("--allow-local-endpoints")
    .args(["--inbound-addr", &inbound.to_string()])
    .args(["--connect-timeout", "2s"])
    .start()
}

fn body(admin: SocketAddr, path: &str) -> String {
    let response = http_get(admin, path).unwrap_or_default();
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Polls every 100 ms until `ok` holds for gateway `admin`'s (metrics, config).
fn wait_for(what: &str, admin: SocketAddr, ok: impl Fn(&str, &str) -> bool) -> (String, String) {
    let deadline = Instant::now() + STEP;
    loop {
        let (metrics, config) = (body(admin, "/metrics"), body(admin, "/config"));
        if ok(&metrics, &config) {
            return (metrics, config);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{config}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `"probe": {...}` object of `/config` for the link to `cluster`, as text.
fn probe_view(config: &str) -> String {
    let start = config.find("\"probe\"").unwrap_or(0);
    let end = config[start..]
        .find('}')
        .map_or(config.len(), |e| start + e + 1);
    config[start..end].to_owned()
}

#[test]
fn the_link_probe_is_a_ping_on_the_tunnel_not_a_call_to_the_admin_port() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(&mint::default_anchor_name());
    let (ip_a, ip_b) = (Ipv4Addr::new(127, 0, 93, 1), Ipv4Addr::new(127, 0, 93, 2));
    let (inbound_a, admin_a) = (free_addr(ip_a), free_addr(ip_a));
    let (inbound_b, admin_b) = (free_addr(ip_b), free_addr(ip_b));
    // Where the Links' probeSpec points: nothing listens there.
    let nowhere = free_addr(Ipv4Addr::new(127, 0, 93, 3));
    for (cluster, own, peer, peer_inbound) in [
        ("cluster-a", inbound_a, "cluster-b", inbound_b),
        ("cluster-b", inbound_b, "cluster-a", inbound_a),
    ] {
        pki.leaf(cluster, &gateway_id(cluster))
            .write_dir(&root.join(format!("identity-{cluster}")), false)
            .unwrap();
        let manifests = root.join(format!("manifests-{cluster}"));
        std::fs::create_dir_all(&manifests).unwrap();
        write_files(
            &manifests,
            &[
                ("settings.yaml", &cluster_settings(cluster, own)),
                ("link.yaml", &link(peer, peer_inbound, nowhere)),
            ],
        );
    }
    let gw_a = start("cluster-a", root, inbound_a, admin_a);
    let _gw_b = start("cluster-b", root, inbound_b, admin_b);

    let (metrics, config) = wait_for(
        "gateway-b's probe of cluster-a to succeed",
        admin_b,
        |m, c| {
            metric(m, "gateway_link_probe_success", &["cluster=\"cluster-a\""]) == 1.0
                && metric(m, "gateway_link_up", &["cluster=\"cluster-a\""]) == 1.0
                && probe_view(c).contains("\"ok\": true")
        },
    );
    let view = probe_view(&config);
    eprintln!("probe of a live peer whose probeSpec port is closed: {view}");
    assert!(view.contains("PING answered"), "{view}");
    assert_eq!(
        metric(
            &metrics,
            "gateway_link_probe_success",
            &["cluster=\"cluster-a\""]
        ),
        1.0
    );

    drop(gw_a);
    let (_, config) = wait_for("gateway-b's probe of cluster-a to fail", admin_b, |m, c| {
        metric(m, "gateway_link_probe_success", &["cluster=\"cluster-a\""]) == 0.0
            && probe_view(c).contains("\"ok\": false")
    });
    eprintln!("probe of a dead peer: {}", probe_view(&config));
}
