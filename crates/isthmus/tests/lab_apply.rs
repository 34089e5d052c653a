//! End-to-end: a running lab runs what a cluster runs (an API server and the
//! controller per cluster, gateways discovering through the API), and `isthmus
//! lab apply` / `isthmus lab delete` of a ServiceMirror from another terminal
//! take effect in the data path within the issue's 5 s.
//!
//! Needs root and the workspace's binaries beside `isthmus`; fails without
//! them, never skips.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod common;

use common::*;

/// The bound the issue sets for a change to show in the data path.
const VISIBLE_WITHIN: Duration = Duration::from_secs(5);

/// cluster-a: hello, behind two Services (`hello` and `hello-two`).
fn cluster_a() -> String {
    let mut out = String::new();
    for service in ["hello", "hello-two"] {
        out += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {service}}}\n\
             spec: {{ports: [{{port: 80, targetPort: 8080}}], selector: {{app: hello}}}}\n---\n"
        );
    }
    out + concat!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: hello}\nspec:\n",
        "  template:\n    metadata: {labels: {app: hello}}\n    spec:\n      containers:\n",
        "      - {name: hello, image: 'nginxdemos/hello:plain-text', ports: [{containerPort: 8080}]}\n",
    )
}

/// cluster-b: a meshed client that only waits (the test calls from its namespace).
const CLUSTER_B: &str = concat!(
    "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: client}\nspec:\n",
    "  template:\n    metadata: {labels: {app: client}}\n    spec:\n      containers:\n",
    "      - {name: client, image: busybox, command: [/bin/sh, -c, sleep 600]}\n",
);

const MIRROR: &str = r#"apiVersion: linkerd.io/v1alpha1
kind: ServiceMirror
metadata:
  name: hello-two-mirror
  namespace: default
spec:
  cluster: cluster-a
  service:
    name: hello-two
    namespace: default
"#;

/// Kills the lab (SIGTERM, so it cleans up) when the test ends, however.
struct Lab(Child);

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The command lines of the processes whose command line mentions `needle`.
fn processes(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if line.contains(needle) {
                out.push(line);
            }
        }
    }
    out
}

/// `curl` of `url` inside namespace `ns`: its output when it succeeds.
fn curl_in(ns: &str, url: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "--fail", "-m", "2", url])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` every 100 ms until it holds or `within` passes; the time it
/// took, or `None`.
fn until(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() <= within {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn lab_change(verb: &str, file: &std::path::Path, prefix: &str) {
    let out = isthmus()
        .args(["lab", verb, "--cluster", "cluster-b", "--run", prefix])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "isthmus lab {verb} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_lab_runs_the_control_plane_and_follows_apply_and_delete_within_5s() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    for (cluster, manifests, settings) in [
        ("cluster-a", cluster_a(), "exportedNamespaces: [default]\n"),
        ("cluster-b", CLUSTER_B.to_owned(), ""),
    ] {
        let dir = tmp.path().join(cluster);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("app.yaml"), manifests).unwrap();
        std::fs::write(dir.join("isthmus.yaml"), settings).unwrap();
    }
    let (child, lines) = lab_up_lines(tmp.path(), "240s");
    let lab = Lab(child);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !seen.iter().any(|l: &String| l.contains(": running")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("the lab did not start:\n{}", seen.join("\n")),
        }
    }
    let context = seen.join("\n");
    let prefix = run_prefix(&context);
    let client_ns = seen
        .iter()
        .find(|l| l.starts_with("[cluster-b] pod default/client-"))
        .and_then(|l| l.split("(ip netns exec ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no client pod; {context}"))
        .to_owned();

    // What a cluster runs, per cluster.
    let run = format!("/run/isthmus-lab/{prefix}/");
    for cluster in ["cluster-a", "cluster-b"] {
        let apiservers = processes(&format!("{run}kube/{cluster}/kubeconfig"));
        assert!(
            apiservers.iter().any(|p| p.contains("test-apiserver")),
            "no API server for {cluster}: {apiservers:?}"
        );
        let controllers: Vec<String> = processes(&format!("--settings {cluster}"))
            .into_iter()
            .filter(|p| p.starts_with(&format!("{run}bin/isthmus-controller run")))
            .collect();
        assert!(!controllers.is_empty(), "no controller for {cluster}");
        let gateways: Vec<String> = processes(&format!("gateway --cluster {cluster}"))
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
    std::fs::write(&file, MIRROR).unwrap();

    lab_change("apply", &file, &prefix);
    let answered = until(VISIBLE_WITHIN, || {
        curl_in(&client_ns, url).is_some_and(|body| body.contains("Server name: hello-"))
    });
    assert!(
        answered.is_some(),
        "hello-two did not answer within {VISIBLE_WITHIN:?} of `isthmus lab apply`"
    );

    lab_change("delete", &file, &prefix);
    let refused = until(VISIBLE_WITHIN, || curl_in(&client_ns, url).is_none());
    assert!(
        refused.is_some(),
        "hello-two still answers {VISIBLE_WITHIN:?} after `isthmus lab delete`"
    );
    drop(lab);
    assert_nothing_left(&prefix);
}
