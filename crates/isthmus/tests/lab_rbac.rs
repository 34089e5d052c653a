//! End-to-end: least privilege in the lab, as on a cluster. Each API server
//! authorizes by RBAC; the controller and the gateway of each cluster run
//! with a token of the ServiceAccount their Deployment names, so they may do
//! what `isthmus install` grants them and no more (reading Secrets of the
//! mesh's namespace is 403 for both), and traffic still flows through them;
//! `isthmus lab kubeconfig` still prints the admin's kubeconfig.
//!
//! Needs root and the workspace's binaries beside `isthmus`; fails without
//! them, never skips.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

mod common;

use common::*;

const HELLO: &str = "http://hello.default.svc.cluster.local/";
const SECRETS: &str = "/api/v1/namespaces/isthmus-system/secrets";

/// The value of the first `key:` line of a kubeconfig.
fn field(kubeconfig: &str, key: &str) -> String {
    kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no {key} in the kubeconfig:\n{kubeconfig}"))
}

/// The HTTP status of GET `server` + `path` with bearer `token`.
fn status(server: &str, path: &str, token: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{server}{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `KUBECONFIG` of the one process whose command line starts with
/// `start` and mentions `cluster`.
fn kubeconfig_of(start: &str, cluster: &str) -> String {
    let found: Vec<u32> = processes(start)
        .into_iter()
        .filter(|(_, l)| l.starts_with(start) && l.contains(&format!(" {cluster}")))
        .map(|(pid, _)| pid)
        .collect();
    assert!(!found.is_empty(), "no {start} for {cluster}");
    let environ = std::fs::read(format!("/proc/{}/environ", found[0])).unwrap();
    String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|e| e.strip_prefix("KUBECONFIG="))
        .unwrap_or_else(|| panic!("{start} of {cluster} has no KUBECONFIG"))
        .to_owned()
}

#[test]
fn components_hold_only_their_grants_and_the_admin_keeps_its_kubeconfig() {
    let (_dir, lab, client) = hello_lab();
    assert!(
        until(Duration::from_secs(30), || curl_in(&client, HELLO)
            .is_some())
        .is_some(),
        "hello does not answer through the controller's and gateways' grants"
    );
    let run = format!("/run/isthmus-lab/{}/", lab.prefix);
    for cluster in ["cluster-a", "cluster-b"] {
        let apiserver = processes(&format!("{run}kube/{cluster}/kubeconfig"));
        assert!(
            apiserver
                .iter()
                .any(|(_, l)| l.contains("--authorization-mode RBAC")),
            "{cluster}'s API server does not authorize by RBAC: {apiserver:?}"
        );
        let out = isthmus()
            .args(["lab", "kubeconfig", cluster, "--run", &lab.prefix])
            .output()
            .unwrap();
        let admin = String::from_utf8_lossy(&out.stdout).into_owned();
        let server = field(&admin, "server");
        assert_eq!(status(&server, SECRETS, &field(&admin, "token")), "200");

        for (start, account, allowed) in [
            (
                format!("{run}bin/isthmus-proxy gateway"),
                "isthmus-gateway",
                "/apis/discovery.k8s.io/v1/endpointslices",
            ),
            (
                format!("{run}bin/isthmus-controller run"),
                "isthmus-controller",
                "/apis/linkerd.io/v1alpha1/servicemirrors",
            ),
        ] {
            let path = kubeconfig_of(&start, cluster);
            assert_eq!(
                path,
                format!("{run}kube/{cluster}/sa-isthmus-system-{account}.kubeconfig"),
                "{start} of {cluster} does not run as its ServiceAccount"
            );
            let token = field(&std::fs::read_to_string(&path).unwrap(), "token");
            assert_eq!(
                status(&server, allowed, &token),
                "200",
                "{account}: {allowed}"
            );
            assert_eq!(
                status(&server, SECRETS, &token),
                "403",
                "{account}: {SECRETS}"
            );
        }
    }
    let prefix = lab.prefix.clone();
    drop(lab);
    assert_nothing_left(&prefix);
}
