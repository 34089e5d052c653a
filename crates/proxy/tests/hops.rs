//! Identity on every hop, both directions, with real `isthmus-proxy` processes on
//! loopback: sidecar -> gateway, gateway -> peer gateway, gateway -> pod sidecar.
//!
//! Where the proxy dials, a fake peer with the wrong identity waits at the address
//! (the right SPIFFE ID from another cluster's issuer, or another cluster's gateway)
//! and counts the application bytes it receives after a finished handshake: the
//! proxy must send none. A fake peer with the right identity, set up the same way,
//! receives the HTTP/2 preface, which shows the count would see a leak. Where the
//! proxy accepts, callers with the wrong identity dial it and the origin behind it
//! counts connections: none may arrive, while a caller with the right identity
//! gets through.
//!
//! Not covered here: what a gateway does after refusing a pod's sidecar (delivery
//! to meshed pods is decided by discovery elsewhere); the bytes counted are those
//! the wrong-identity sidecar receives.

#![allow(clippy::unwrap_used)]

mod common;
mod trust;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use common::write_files;
use isthmus_tests::multicluster::meshed_service;
use trust::*;

const NET: u8 = 92;
/// The port the gateway dials a pod's sidecar on.
const POD_TUNNEL_PORT: u16 = 4143;

/// Who dials which listener, for what authority and cluster header.
type Caller<'a> = (&'a str, SocketAddr, Presented, &'a str, Vec<&'a [u8]>);

fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, NET, n))
}

/// `files` written into `manifests-<name>` under `root`, which it returns.
fn manifests(root: &Path, name: &str, files: &[(&str, String)]) -> std::path::PathBuf {
    let dir = root.join(format!("manifests-{name}"));
    write_files(&dir, files);
    dir
}

fn identity(
    root: &Path,
    name: &str,
    bundle: &proxy_identity::mint::LeafBundle,
) -> std::path::PathBuf {
    let dir = root.join(format!("identity-{name}"));
    write_identity(&dir, bundle);
    dir
}

/// Waits until `fake` has seen `connections` connections (`what` trying it), then
/// gives its line of the report: `label`, and the connections and bytes it saw.
async fn tried(
    fake: &FakePeer,
    what: &str,
    connections: usize,
    label: &'static str,
) -> (&'static str, usize, usize) {
    eventually(what, STEP, || async {
        (fake.connections() >= connections).then_some(())
    })
    .await;
    (label, fake.connections(), fake.bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hop_talks_to_a_peer_of_the_wrong_identity() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(&proxy_identity::mint::default_anchor_name());
    for cluster in ["cluster-a", "cluster-b", "cluster-c"] {
        pki.add_issuer(cluster, cluster);
    }
    let foreign = Pki::new(&proxy_identity::mint::default_anchor_name());
    foreign.add_issuer("cluster-a", "cluster-a");

    // The app of the meshed pod 127.0.92.20, on every address: whichever way the
    // pod's sidecar delivers, it arrives here and is counted.
    let app = Echo::start(IpAddr::V4(Ipv4Addr::UNSPECIFIED)).await;
    let app_port = app.addr.port();
    let pod_ip = ip(20);
    let wrong_pod_ip = ip(21);
    // What listens at the wrong pod's app port: whatever reaches it came in plain
    // text after the gateway refused the pod's sidecar (reported, not judged here).
    let plain_catcher = Echo::start(wrong_pod_ip).await;

    let gw_a_addr = free_addr(ip(1));
    let gw_b_addr = free_addr(ip(2));
    let fake_link = free_addr(ip(3));
    let fake_gateway_wrong = free_addr(ip(4));
    let fake_gateway_right = free_addr(ip(5));
    let gw_a_admin = free_addr(ip(1));
    let gw_b_admin = free_addr(ip(2));

    // cluster-a: its gateway exports `hello` (the meshed pod) and `wrongpod`, whose
    // address answers the mesh port with a leaf of cluster-b's issuer; discovery says
    // both pods are meshed, so neither may be reached in plain text.
    let gw_a_dir = manifests(
        root,
        "gateway-a",
        &[
            ("settings.yaml", settings("cluster-a", gw_a_addr)),
            (
                "hello.yaml",
                meshed_service("hello", SocketAddr::new(pod_ip, app_port), true),
            ),
            (
                "wrongpod.yaml",
                meshed_service("wrongpod", plain_catcher.addr, true),
            ),
        ],
    );
    let wrong_pod = FakePeer::start(
        SocketAddr::new(wrong_pod_ip, POD_TUNNEL_PORT),
        &Presented::of(&pki.leaf("cluster-b", WORKLOAD_ID)),
    )
    .await;
    // A cluster's gateway, with its leaf written as `name`'s identity.
    let gateway = |cluster: &str, name: &str, dir: &Path, addr, admin| {
        spawn(
            "gateway",
            cluster,
            &identity(root, name, &pki.leaf(cluster, GATEWAY_ID)),
            dir,
            &[("inbound-addr", addr)],
            admin,
            root.join(format!("{name}.log")),
        )
    };
    let mut gw_a = gateway("cluster-a", "gateway-a", &gw_a_dir, gw_a_addr, gw_a_admin);
    // The meshed pod's sidecar.
    let pod_dir = manifests(
        root,
        "pod-a",
        &[("settings.yaml", settings("cluster-a", gw_a_addr))],
    );
    let mut pod = spawn(
        "sidecar",
        "cluster-a",
        &identity(root, "pod-a", &pki.leaf("cluster-a", WORKLOAD_ID)),
        &pod_dir,
        &[
            ("inbound-addr", SocketAddr::new(pod_ip, POD_TUNNEL_PORT)),
            ("outbound-addr", free_addr(pod_ip)),
        ],
        free_addr(pod_ip),
        root.join("pod-a.log"),
    );

    // cluster-b: its gateway links to cluster-a (the real gateway) and to
    // cluster-c, where another cluster's gateway (cluster-a's leaf, the shared
    // gateway ID) waits.
    let fake_c = FakePeer::start(
        fake_link,
        &Presented::of(&pki.leaf("cluster-a", GATEWAY_ID)),
    )
    .await;
    let gw_b_dir = manifests(
        root,
        "gateway-b",
        &[
            ("settings.yaml", settings("cluster-b", gw_b_addr)),
            (
                "links.yaml",
                format!(
                    "{}---\n{}",
                    link("cluster-a", gw_a_addr, gw_a_admin),
                    link("cluster-c", fake_link, gw_a_admin)
                ),
            ),
        ],
    );
    let mut gw_b = gateway("cluster-b", "gateway-b", &gw_b_dir, gw_b_addr, gw_b_admin);
    // Two sidecars of cluster-b whose settings name a gateway that is not theirs
    // (the gateway ID from cluster-a's issuer), and the same from cluster-b's.
    let fake_gw_wrong = FakePeer::start(
        fake_gateway_wrong,
        &Presented::of(&pki.leaf("cluster-a", GATEWAY_ID)),
    )
    .await;
    let fake_gw_right = FakePeer::start(
        fake_gateway_right,
        &Presented::of(&pki.leaf("cluster-b", GATEWAY_ID)),
    )
    .await;
    let mut sidecars = Vec::new();
    for (name, gateway, n) in [
        ("sidecar-b-wrong", fake_gateway_wrong, 6),
        ("sidecar-b-right", fake_gateway_right, 7),
    ] {
        let dir = manifests(
            root,
            name,
            &[("settings.yaml", settings("cluster-b", gateway))],
        );
        sidecars.push(spawn(
            "sidecar",
            "cluster-b",
            &identity(root, name, &pki.leaf("cluster-b", WORKLOAD_ID)),
            &dir,
            &[
                ("inbound-addr", free_addr(ip(n))),
                ("outbound-addr", free_addr(ip(n))),
            ],
            free_addr(ip(n)),
            root.join(format!("{name}.log")),
        ));
    }
    for proxy in [&mut gw_a, &mut pod, &mut gw_b]
        .into_iter()
        .chain(sidecars.iter_mut())
    {
        proxy.wait_ready().await;
    }

    let mut report = Vec::new();
    let b_workload = Presented::of(&pki.leaf("cluster-b", WORKLOAD_ID));

    // Controls: the whole chain works, and the right-identity fake gateway hears
    // its sidecar's HTTP/2 preface.
    eventually("gateway-b's link to cluster-a", STEP, || async {
        (gw_b.config().await["links"]["cluster-a"]["up"] == true).then_some(())
    })
    .await;
    assert_eq!(
        attempt(
            gw_b_addr,
            &b_workload,
            "hello.default.svc.cluster.local:80",
            &[b"cluster-a"]
        )
        .await,
        Outcome::Opened,
        "sidecar-b -> gateway-b -> gateway-a -> pod sidecar -> app"
    );
    eventually("the app to see the control stream", STEP, || async {
        (app.accepted() == 1).then_some(())
    })
    .await;
    eventually(
        "the right-identity gateway to hear its sidecar",
        STEP,
        || async { (fake_gw_right.bytes() > 0).then_some(()) },
    )
    .await;
    let app_before = app.accepted();

    // sidecar -> gateway, outward: the sidecar refuses a gateway of another cluster
    // holding its gateway's ID.
    // Its verdict, read once: the byte counts below are the test.
    let state = sidecars[0].config().await["gateway"]["state"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    report.push(
        tried(
            &fake_gw_wrong,
            "sidecar-b-wrong to try its gateway",
            2,
            "sidecar -> gateway: gateway of another cluster with the gateway ID",
        )
        .await,
    );
    eprintln!("sidecar-b-wrong's gateway pool: {state}");

    // gateway -> peer gateway, outward: gateway-b refuses cluster-a's gateway at the
    // address of cluster-c's, and a stream for cluster-c is refused.
    let link_outcome = attempt(
        gw_b_addr,
        &b_workload,
        "hello.default.svc.cluster.local:80",
        &[b"cluster-c"],
    )
    .await;
    report.push(
        tried(
            &fake_c,
            "gateway-b to try its link to cluster-c",
            1,
            "gateway -> peer gateway: another cluster's gateway at the link's address",
        )
        .await,
    );

    // gateway -> pod sidecar, outward: gateway-a refuses a pod sidecar of cluster-b.
    let wrongpod_outcome = attempt(
        gw_a_addr,
        &b_workload,
        "wrongpod.default.svc.cluster.local:80",
        &[b"cluster-a"],
    )
    .await;
    report.push(
        tried(
            &wrong_pod,
            "gateway-a to try the pod's sidecar",
            1,
            "gateway -> pod sidecar: a sidecar with a leaf of cluster-b's issuer",
        )
        .await,
    );

    // Inward: callers with the wrong identity dial each listener; the app behind
    // counts what arrives.
    let pod_tunnel = SocketAddr::new(pod_ip, POD_TUNNEL_PORT);
    let to_app = format!("{pod_ip}:{app_port}");
    let foreign_leaf = Presented::of(&foreign.leaf("cluster-a", WORKLOAD_ID));
    let inward: Vec<Caller<'_>> = vec![
        (
            "pod sidecar <- gateway of cluster-b (shared gateway ID)",
            pod_tunnel,
            Presented::of(&pki.leaf("cluster-b", GATEWAY_ID)),
            &to_app,
            vec![],
        ),
        (
            "pod sidecar <- workload of cluster-c",
            pod_tunnel,
            Presented::of(&pki.leaf("cluster-c", WORKLOAD_ID)),
            &to_app,
            vec![],
        ),
        (
            "pod sidecar <- gateway ID from another trust anchor",
            pod_tunnel,
            Presented::of(&foreign.leaf("cluster-a", GATEWAY_ID)),
            &to_app,
            vec![],
        ),
        (
            "pod sidecar <- leaf signed by the anchor",
            pod_tunnel,
            Presented::of(&forged_leaf(pki.anchor(), GATEWAY_ID)),
            &to_app,
            vec![],
        ),
        (
            "gateway <- sidecar of another trust anchor",
            gw_a_addr,
            foreign_leaf.clone(),
            "hello.default.svc.cluster.local:80",
            vec![b"cluster-a"],
        ),
        (
            "gateway <- peer gateway of another trust anchor",
            gw_b_addr,
            Presented::of(&foreign.leaf("cluster-a", GATEWAY_ID)),
            "hello.default.svc.cluster.local:80",
            vec![b"cluster-a"],
        ),
        (
            "gateway <- leaf of another trust domain",
            gw_a_addr,
            Presented::of(&pki.leaf("cluster-a", "spiffe://other.example/ns/default/sa/frontend")),
            "hello.default.svc.cluster.local:80",
            vec![b"cluster-a"],
        ),
    ];
    let mut let_in = Vec::new();
    let mut inward_report = Vec::new();
    for (what, to, who, authority, clusters) in &inward {
        let before = app.accepted();
        let outcome = attempt(*to, who, authority, clusters).await;
        if !matches!(outcome, Outcome::Failed(_)) {
            let_in.push(format!("{what}: {outcome:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        inward_report.push((what, outcome, app.accepted() - before));
    }
    // Control: the pod's own gateway identity is let in.
    assert_eq!(
        attempt(
            pod_tunnel,
            &Presented::of(&pki.leaf("cluster-a", GATEWAY_ID)),
            &to_app,
            &[]
        )
        .await,
        Outcome::Opened
    );
    eventually("the app to see the control stream", STEP, || async {
        (app.accepted() > app_before).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    for (what, connections, bytes) in &report {
        eprintln!(
            "{what:<75} {connections} handshake(s) begun, {bytes} application bytes received"
        );
    }
    for (what, outcome, reached) in &inward_report {
        let outcome = match outcome {
            Outcome::Failed(e) => format!("refused ({e})"),
            other => format!("{other:?}"),
        };
        eprintln!("{what:<60} {reached} app connection(s); {outcome}");
    }
    eprintln!(
        "right-identity control: {} application bytes reached the fake gateway",
        fake_gw_right.bytes()
    );
    eprintln!(
        "after refusing the wrong pod sidecar, gateway-a answered {wrongpod_outcome:?} and \
         delivered {} plain-text connection(s) to the pod's app port",
        plain_catcher.accepted()
    );
    assert_eq!(
        plain_catcher.accepted(),
        0,
        "gateway-a fell back to plain text for a meshed pod whose sidecar it refused"
    );
    assert_eq!(
        (fake_gw_wrong.bytes(), fake_c.bytes(), wrong_pod.bytes()),
        (0, 0, 0),
        "a proxy sent application bytes to a peer of the wrong identity"
    );
    assert!(
        let_in.is_empty(),
        "callers of the wrong identity let in: {let_in:#?}"
    );
    assert_eq!(
        app.accepted(),
        app_before + 1,
        "a caller of the wrong identity reached the app"
    );
    assert!(
        matches!(link_outcome, Outcome::Refused(_, ref reason) if reason == "link_down"),
        "a stream to cluster-c, whose link is another cluster's gateway: {link_outcome:?}"
    );
    assert!(
        state.starts_with("down"),
        "sidecar-b-wrong's gateway pool: {state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_does_not_start_with_a_leaf_outside_its_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(&proxy_identity::mint::default_anchor_name());
    for cluster in ["cluster-a", "cluster-b"] {
        pki.add_issuer(cluster, cluster);
    }
    let cases = [
        (
            "gateway",
            "of cluster-b's issuer",
            pki.leaf("cluster-b", GATEWAY_ID),
            "by the issuer of cluster cluster-b",
        ),
        (
            "sidecar",
            "of cluster-b's issuer",
            pki.leaf("cluster-b", WORKLOAD_ID),
            "by the issuer of cluster cluster-b",
        ),
        (
            "gateway",
            "signed by the anchor",
            forged_leaf(pki.anchor(), GATEWAY_ID),
            "by no cluster's issuer",
        ),
        (
            "standalone",
            "signed by the anchor",
            forged_leaf(pki.anchor(), WORKLOAD_ID),
            "by no cluster's issuer",
        ),
    ];
    for (n, (role, what, leaf, expected)) in cases.iter().enumerate() {
        let name = format!("{role}-{n}");
        let identity = identity(root, &name, leaf);
        let manifests = manifests(root, &name, &[]);
        let listen = free_addr(ip(40 + n as u8));
        let flag = if *role == "standalone" {
            "outbound-addr"
        } else {
            "inbound-addr"
        };
        let mut proxy = spawn(
            role,
            "cluster-a",
            &identity,
            &manifests,
            &[(flag, listen)],
            free_addr(ip(40 + n as u8)),
            root.join(format!("{name}.log")),
        );
        let status = proxy.wait_exit(STEP).await;
        let log = proxy.log_text();
        assert!(!status.success(), "{role} with a leaf {what} started");
        let cert = identity.join("tls.crt");
        for needle in [
            cert.to_str().unwrap(),
            expected,
            "this proxy serves cluster cluster-a",
        ] {
            assert!(
                log.contains(needle),
                "{role} with a leaf {what}: {needle:?} not in:\n{log}"
            );
        }
        eprintln!(
            "{role} with a leaf {what}: {}",
            log.lines().last().unwrap_or_default()
        );
    }
}
