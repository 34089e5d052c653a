//! Relay rights under attack: three `isthmus-proxy gateway` processes on loopback
//! (cluster-a, cluster-b, cluster-c), every one holding the same SPIFFE ID as
//! `isthmus install` gives them, cluster-b's gateway linked to the other two.
//!
//! Only leaves verified through cluster-b's issuer (old or new, during a rollover)
//! may have gateway-b relay them to another cluster. The test makes many attempts
//! with valid mesh identities of other clusters, doctored chains, forged CAs and
//! odd spellings of the target, counts them, and checks that none was forwarded
//! and that neither origin (cluster-a's and cluster-c's hello) saw a connection
//! beyond the legitimate ones.

#![allow(clippy::unwrap_used)]

mod trust;

mod common;

use common::write_files;
use std::net::{IpAddr, Ipv4Addr};

use isthmus_tests::multicluster::service;
use trust::*;

const NET: u8 = 91;

struct Mesh {
    pki: Pki,
    echo_a: Echo,
    echo_c: Echo,
    _gw_a: Proxy,
    gw_b: Proxy,
    _gw_c: Proxy,
    gw_b_addr: std::net::SocketAddr,
    gw_a_addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(&proxy_identity::mint::default_anchor_name());
    for cluster in ["cluster-a", "cluster-b", "cluster-c"] {
        pki.add_issuer(cluster, cluster);
    }
    // cluster-b is rolling its issuer over: both are valid at once.
    pki.add_issuer("cluster-b-new", "cluster-b");

    let ip = |n| IpAddr::V4(Ipv4Addr::new(127, 0, NET, n));
    let echo_a = Echo::start(ip(11)).await;
    let echo_c = Echo::start(ip(13)).await;
    let (gw, admin): (Vec<_>, Vec<_>) = (1..=3)
        .map(|n| (free_addr(ip(n)), free_addr(ip(n))))
        .unzip();
    let mut proxies = Vec::new();
    for (i, cluster) in ["cluster-a", "cluster-b", "cluster-c"]
        .into_iter()
        .enumerate()
    {
        let identity = root.join(format!("identity-{cluster}"));
        write_identity(&identity, &pki.leaf(cluster, GATEWAY_ID));
        let manifests = root.join(format!("manifests-{cluster}"));
        std::fs::create_dir_all(&manifests).unwrap();
        write_files(&manifests, &[("settings.yaml", &settings(cluster, gw[i]))]);
        match cluster {
            "cluster-a" => {
                write_files(
                    &manifests,
                    &[("hello.yaml", &service("hello", echo_a.addr, true))],
                );
            }
            "cluster-c" => {
                write_files(
                    &manifests,
                    &[("hello.yaml", &service("hello", echo_c.addr, true))],
                );
            }
            _ => {
                write_files(
                    &manifests,
                    &[(
                        "links.yaml",
                        &format!(
                            "{}---\n{}",
                            link("cluster-a", gw[0], admin[0]),
                            link("cluster-c", gw[2], admin[2])
                        ),
                    )],
                );
            }
        }
        proxies.push(spawn(
            "gateway",
            cluster,
            &identity,
            &manifests,
            &[("inbound-addr", gw[i])],
            admin[i],
            root.join(format!("gateway-{cluster}.log")),
        ));
    }
    for proxy in &mut proxies {
        proxy.wait_ready().await;
    }
    let gw_c = proxies.pop().unwrap();
    let gw_b = proxies.pop().unwrap();
    let gw_a = proxies.pop().unwrap();
    for target in ["cluster-a", "cluster-c"] {
        eventually(&format!("gateway-b's link to {target}"), STEP, || async {
            let config = gw_b.config().await;
            (config["links"][target]["up"] == true).then_some(())
        })
        .await;
    }
    Mesh {
        pki,
        echo_a,
        echo_c,
        _gw_a: gw_a,
        gw_b,
        _gw_c: gw_c,
        gw_b_addr: gw[1],
        gw_a_addr: gw[0],
        dir,
    }
}

/// One attack: who, with what chain, asks gateway-b for what.
struct Attack {
    name: String,
    who: Presented,
    authority: String,
    clusters: Vec<Vec<u8>>,
}

fn attack(name: impl Into<String>, who: &Presented, authority: &str, clusters: &[&[u8]]) -> Attack {
    Attack {
        name: name.into(),
        who: who.clone(),
        authority: authority.to_owned(),
        clusters: clusters.iter().map(|c| c.to_vec()).collect(),
    }
}

/// `who` asking gateway-b for [`HELLO`] in cluster-a (back where it came from) and
/// in cluster-c (onward), named `<what> to <cluster>`.
fn back_and_onward(what: &str, who: &Presented) -> [Attack; 2] {
    ["cluster-a", "cluster-c"].map(|target| {
        attack(
            format!("{what} to {target}"),
            who,
            HELLO,
            &[target.as_bytes()],
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_leaves_of_the_gateways_own_issuers_are_relayed() {
    let mesh = mesh().await;
    let pki = &mesh.pki;
    let gw_b = mesh.gw_b_addr;
    let pem = |key: &str| pki.issuer(key).ca.cert_pem.clone();
    let (ia, ib, ic, ib_new) = (
        pem("cluster-a"),
        pem("cluster-b"),
        pem("cluster-c"),
        pem("cluster-b-new"),
    );
    let anchor = pki.anchor().ca.cert_pem.clone();

    // Legitimate: workloads of cluster-b, from the old and the new issuer, whatever
    // order their chain comes in.
    let b_old = pki.leaf("cluster-b", WORKLOAD_ID);
    let b_new = pki.leaf("cluster-b-new", WORKLOAD_ID);
    let legit = [
        ("old issuer", Presented::of(&b_old), "cluster-a"),
        ("new issuer", Presented::of(&b_new), "cluster-a"),
        (
            "old issuer, new one sent first",
            Presented::doctored(&b_old, &[&ib_new, &ib]),
            "cluster-a",
        ),
        (
            "new issuer, old one sent first",
            Presented::doctored(&b_new, &[&ib, &ib_new]),
            "cluster-c",
        ),
        (
            "old issuer, onward to c",
            Presented::of(&b_old),
            "cluster-c",
        ),
    ];
    for (what, who, target) in &legit {
        let outcome = attempt(gw_b, who, HELLO, &[target.as_bytes()]).await;
        assert_eq!(
            outcome,
            Outcome::Opened,
            "legitimate relay ({what}) to {target}"
        );
    }
    eventually(
        "the legitimate streams to reach the origins",
        STEP,
        || async { (mesh.echo_a.accepted() == 3 && mesh.echo_c.accepted() == 2).then_some(()) },
    )
    .await;
    let reached = (mesh.echo_a.accepted(), mesh.echo_c.accepted());

    // Valid mesh identities of other clusters.
    let a_workload = pki.leaf("cluster-a", WORKLOAD_ID);
    let a_gateway = pki.leaf("cluster-a", GATEWAY_ID);
    let c_gateway = pki.leaf("cluster-c", GATEWAY_ID);
    let c_minted_b_workload = pki.leaf(
        "cluster-c",
        "spiffe://cluster.local/ns/default/sa/frontend-b",
    );
    let a_minted_b_gateway = pki.leaf(
        "cluster-a",
        "spiffe://cluster.local/ns/isthmus-multicluster/sa/gateway-cluster-b",
    );
    let real_b_leaf_pem = first_pem(&b_old.cert_chain_pem);
    // Forged: a leaf of the anchor itself, CAs under issuers (the issuers' path
    // length forbids them), a self-signed CA wearing cluster-b's issuer name.
    let by_anchor = forged_leaf(pki.anchor(), WORKLOAD_ID);
    let sub_of_b = forged_ca(&pki.issuer("cluster-b"), "cluster-b", Some(0));
    let under_sub_of_b = forged_leaf(&sub_of_b, WORKLOAD_ID);
    let sub_of_a = forged_ca(&pki.issuer("cluster-a"), "cluster-b", Some(0));
    let under_sub_of_a = forged_leaf(&sub_of_a, WORKLOAD_ID);
    let impostor = impostor_ca("cluster-b");
    let under_impostor = forged_leaf(&impostor, WORKLOAD_ID);
    let other_td = pki.leaf("cluster-a", "spiffe://other.example/ns/default/sa/frontend");

    let aw = Presented::of(&a_workload);
    let mut attacks = Vec::new();
    // Doctored chains around cluster-a's workload leaf: the gateway's own issuer
    // prepended, appended, duplicated, after a foreign leaf, the anchor included.
    let doctored: Vec<(&str, Vec<&str>)> = vec![
        ("as minted", vec![&ia]),
        ("gateway-b's issuer prepended", vec![&ib, &ia]),
        ("gateway-b's issuer appended", vec![&ia, &ib]),
        ("gateway-b's issuer duplicated first", vec![&ib, &ib, &ia]),
        (
            "both issuers, reordered and repeated",
            vec![&ia, &ib, &ia, &ib],
        ),
        ("gateway-b's new issuer first", vec![&ib_new, &ia]),
        ("anchor included", vec![&ib, &anchor, &ia]),
        ("anchor second", vec![&anchor, &ia]),
        (
            "gateway-b's issuer after a cluster-b leaf",
            vec![&real_b_leaf_pem, &ib, &ia],
        ),
    ];
    for (what, rest) in &doctored {
        let who = Presented::doctored(&a_workload, rest);
        attacks.extend(back_and_onward(
            &format!("cluster-a workload, {what},"),
            &who,
        ));
    }
    attacks.push(attack(
        "cluster-a workload sending only gateway-b's issuer",
        &Presented::doctored(&a_workload, &[&ib]),
        HELLO,
        &[b"cluster-c"],
    ));
    // Other clusters' gateways (the shared gateway ID), hopping back and onward.
    for (what, who) in [
        ("cluster-a's gateway", Presented::of(&a_gateway)),
        (
            "cluster-a's gateway with gateway-b's issuer first",
            Presented::doctored(&a_gateway, &[&ib, &ia]),
        ),
        ("cluster-c's gateway", Presented::of(&c_gateway)),
        (
            "cluster-c's gateway with both of gateway-b's issuers",
            Presented::doctored(&c_gateway, &[&ib, &ib_new, &ic]),
        ),
        // Identities of cluster-b minted by other clusters' issuers.
        (
            "cluster-b's workload ID from cluster-c's issuer",
            Presented::doctored(&c_minted_b_workload, &[&ib, &ic]),
        ),
        (
            "cluster-b's gateway ID (per-cluster form) from cluster-a's issuer",
            Presented::of(&a_minted_b_gateway),
        ),
    ] {
        attacks.extend(back_and_onward(what, &who));
    }
    // Forged CAs and leaves outside the anchor -> issuer -> leaf shape.
    for (what, who) in [
        ("leaf signed by the anchor", Presented::of(&by_anchor)),
        (
            "leaf signed by the anchor, sending gateway-b's issuer",
            Presented::doctored(&by_anchor, &[&ib]),
        ),
        (
            "leaf under a CA under cluster-b's issuer",
            Presented::of(&under_sub_of_b),
        ),
        (
            "leaf under a cluster-b CA under cluster-a's issuer",
            Presented::of(&under_sub_of_a),
        ),
        (
            "leaf under a self-signed CA named like cluster-b's issuer",
            Presented::doctored(&under_impostor, &[&impostor.ca.cert_pem, &ib]),
        ),
        (
            "cluster-a leaf of another trust domain",
            Presented::of(&other_td),
        ),
    ] {
        attacks.push(attack(
            format!("{what} to cluster-a"),
            &who,
            HELLO,
            &[b"cluster-a"],
        ));
    }
    // Spellings of the target cluster, by the strongest attacker (gateway-b's issuer
    // in its chain).
    let strong = Presented::doctored(&a_workload, &[&ib, &ia]);
    for spelling in [
        &b"Cluster-A"[..],
        b"CLUSTER-C",
        b"cluster-a.",
        b" cluster-a",
        b"cluster-a ",
        b"cluster-a\t",
        "clüster-a".as_bytes(),
        "cluster\u{2010}a".as_bytes(),
        b"",
        b"cluster-a,cluster-c",
        b"cluster-b,cluster-a",
        b"cluster-a;cluster-b",
    ] {
        attacks.push(attack(
            format!("target spelled {:?}", String::from_utf8_lossy(spelling)),
            &strong,
            HELLO,
            &[spelling],
        ));
    }
    // The gateway's own cluster by header or by its absence, reaching for the other
    // clusters' services by authority; two headers; IP literals.
    let echo_a_ip = mesh.echo_a.addr.to_string();
    let echo_c_v6 = format!("[::1]:{}", mesh.echo_c.addr.port());
    let gw_a = mesh.gw_a_addr.to_string();
    for (what, authority, clusters) in [
        (
            "own cluster by header, cluster-a's service",
            HELLO,
            vec![&b"cluster-b"[..]],
        ),
        ("no cluster header, cluster-a's service", HELLO, vec![]),
        (
            "own cluster by header, a's service by a cluster-a name",
            "hello.default.svc.cluster-a.local:80",
            vec![b"cluster-b"],
        ),
        (
            "own cluster first of two headers",
            HELLO,
            vec![b"cluster-b", b"cluster-a"],
        ),
        (
            "other cluster first of two headers",
            HELLO,
            vec![b"cluster-a", b"cluster-b"],
        ),
        ("cluster-a origin by IP", &echo_a_ip, vec![b"cluster-a"]),
        (
            "cluster-a origin by IP, own cluster",
            &echo_a_ip,
            vec![b"cluster-b"],
        ),
        ("cluster-a origin by IP, no header", &echo_a_ip, vec![]),
        (
            "cluster-c origin by IPv6 literal",
            &echo_c_v6,
            vec![b"cluster-c"],
        ),
        ("gateway-a's tunnel port by IP", &gw_a, vec![b"cluster-a"]),
        (
            "gateway-a's tunnel port by IP, own cluster",
            &gw_a,
            vec![b"cluster-b"],
        ),
    ] {
        attacks.push(attack(what, &strong, authority, &clusters));
        attacks.push(attack(
            format!("{what} (plain cluster-a workload)"),
            &aw,
            authority,
            &clusters,
        ));
    }

    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    let mut forwarded = Vec::new();
    for a in &attacks {
        let clusters: Vec<&[u8]> = a.clusters.iter().map(Vec::as_slice).collect();
        let outcome = attempt(gw_b, &a.who, &a.authority, &clusters).await;
        let label = match &outcome {
            Outcome::Opened => {
                forwarded.push(a.name.clone());
                "opened".to_owned()
            }
            Outcome::Refused(status, reason) => format!("refused {status} {reason}"),
            Outcome::Failed(_) => "refused at TLS".to_owned(),
            Outcome::Hung => "no answer".to_owned(),
        };
        eprintln!("{:<80} {label}", a.name);
        *outcomes.entry(label).or_default() += 1;
    }
    // A moment for anything forwarded to arrive.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let after = (mesh.echo_a.accepted(), mesh.echo_c.accepted());
    eprintln!(
        "relay attempts through gateway-b: {} made, {} forwarded; by outcome: {outcomes:?}; \
         origin connections beyond the {} legitimate ones: cluster-a {}, cluster-c {}",
        attacks.len(),
        forwarded.len(),
        legit.len(),
        after.0 - reached.0,
        after.1 - reached.1
    );
    assert!(attacks.len() >= 30, "only {} attempts", attacks.len());
    assert!(forwarded.is_empty(), "forwarded: {forwarded:#?}");
    assert!(
        !outcomes.contains_key("no answer"),
        "refusals must be prompt: {outcomes:?}"
    );
    assert_eq!(after, reached, "an attempt reached an origin");
    // The gateways stay up and the legitimate path still works.
    assert_eq!(
        attempt(gw_b, &Presented::of(&b_new), HELLO, &[b"cluster-c"]).await,
        Outcome::Opened
    );
    // gateway-b counted each of its refusals by reason.
    let metrics = mesh.gw_b.metrics().await;
    let forbidden = metrics
        .lines()
        .find(|l| {
            l.starts_with("tunnel_refusals_total{")
                && l.contains("direction=\"gateway\",reason=\"forbidden\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
        .unwrap_or(0);
    assert_eq!(
        Some(&forbidden),
        outcomes.get("refused 403 forbidden"),
        "gateway-b's forbidden count"
    );

    // gateway-b's own leaf rolls over to the new issuer: leaves of both issuers are
    // still relayed, a leaf of cluster-a's issuer still never is.
    let serial = mesh.gw_b.config().await["identity"]["serial"].clone();
    write_identity(
        &mesh.dir.path().join("identity-cluster-b"),
        &pki.leaf("cluster-b-new", GATEWAY_ID),
    );
    eventually("gateway-b to rotate its leaf", STEP, || async {
        let identity = mesh.gw_b.config().await["identity"].clone();
        (identity["serial"] != serial).then_some(())
    })
    .await;
    for (what, who, expected) in [
        ("old issuer", Presented::of(&b_old), true),
        ("new issuer", Presented::of(&b_new), true),
        (
            "cluster-a, gateway-b's new issuer first",
            Presented::doctored(&a_workload, &[&ib_new, &ia]),
            false,
        ),
        ("cluster-a's gateway", Presented::of(&a_gateway), false),
    ] {
        let outcome = attempt(gw_b, &who, HELLO, &[b"cluster-c"]).await;
        assert_eq!(
            outcome == Outcome::Opened,
            expected,
            "after gateway-b's rollover, {what}: {outcome:?}"
        );
    }
}
