//! End-to-end tests of `isthmus lab`: the seed, verbatim, on this machine.
//!
//! They need root (network namespaces, iptables) and the workspace's other
//! binaries (`isthmus-proxy`, `isthmus-init`) built beside `isthmus`; without
//! either they fail and say how to run them. They never skip.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::*;

/// The packets of a pcap file (classic format, either byte order).
fn pcap_packets(bytes: &[u8]) -> Vec<&[u8]> {
    assert!(bytes.len() >= 24, "no pcap header");
    let le = match bytes[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => panic!("not a pcap file"),
    };
    let u32_at = |i: usize| {
        let b: [u8; 4] = bytes[i..i + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let mut packets = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32_at(at + 8) as usize;
        let start = at + 16;
        if start + len > bytes.len() {
            break;
        }
        packets.push(&bytes[start..start + len]);
        at = start + len;
    }
    packets
}

/// How many packet records of a pcap file were captured shorter than sent.
fn pcap_truncated(bytes: &[u8]) -> usize {
    let le = matches!(
        bytes[..4],
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]
    );
    let u32_at = |i: usize| {
        let b: [u8; 4] = bytes[i..i + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let (mut at, mut truncated) = (24, 0);
    while at + 16 <= bytes.len() {
        let (captured, sent) = (u32_at(at + 8) as usize, u32_at(at + 12) as usize);
        truncated += usize::from(captured < sent);
        at += 16 + captured;
    }
    truncated
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_seed_runs_verbatim_and_crosses_both_gateways_encrypted() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let pcap = tmp.path().join("wan.pcap");
    let inside_a = tmp.path().join("cluster-a.pcap");
    let child = isthmus()
        .args(["lab", "up"])
        .arg(example_dir("seed"))
        .args(["--duration", "20s", "--capture-wan"])
        .arg(&pcap)
        .arg("--capture-cluster")
        .arg(format!("cluster-a={}", inside_a.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        out.status.success(),
        "lab up failed ({}); {context}",
        out.status
    );

    let frontend = |needle: &str| {
        stdout
            .lines()
            .filter(|l| l.starts_with("[cluster-b/frontend-deployment-") && l.contains(needle))
            .count()
    };
    assert!(
        frontend("] Server name: hello-deployment-") >= 2,
        "frontend did not print hello's answer; {context}"
    );
    assert!(
        frontend("] Response: 0") >= 2,
        "no repeated `Response: 0`; {context}"
    );
    assert_eq!(frontend("] Response: 22"), 0, "a call failed; {context}");
    assert!(carried(&stdout, "cluster-a") >= 2.0, "{context}");
    assert!(carried(&stdout, "cluster-b") >= 2.0, "{context}");

    let bytes = std::fs::read(&pcap).unwrap();
    let packets = pcap_packets(&bytes);
    assert!(
        packets.len() >= 10,
        "the capture of the WAN holds {} packets: it did not see the traffic",
        packets.len()
    );
    for needle in [
        &b"Server name:"[..],
        b"Server address:",
        b"hello-deployment-",
    ] {
        assert!(
            !contains(&bytes, needle),
            "{:?} crossed the WAN in cleartext",
            String::from_utf8_lossy(needle)
        );
    }
    // The control: the search could have found hello's answer. Every packet was
    // captured whole (so a cleartext answer would lie in the file as sent), and the
    // WAN carried TLS application-data records, which is where the answer went.
    // (Link probes used to be a cleartext control; they ride the mTLS link now.)
    assert_eq!(
        pcap_truncated(&bytes),
        0,
        "the WAN capture cut packets short: the search proves nothing"
    );
    assert!(
        contains(&bytes, &[0x17, 0x03, 0x03]),
        "the WAN capture shows no TLS application data: it did not see the tunnel"
    );
    // Inside cluster-a the answer stays encrypted too: gateway-a delivers to the
    // meshed hello pod over mTLS into its sidecar.
    let inside = std::fs::read(&inside_a).unwrap();
    assert!(
        pcap_packets(&inside).len() >= 10,
        "the capture inside cluster-a did not see the traffic"
    );
    for needle in [&b"Server name:"[..], b"Server address:"] {
        assert!(
            !contains(&inside, needle),
            "{:?} crossed cluster-a's network in cleartext",
            String::from_utf8_lossy(needle)
        );
    }
    assert_nothing_left(&run_prefix(&stdout));
}

#[test]
fn lab_down_removes_what_a_killed_run_left() {
    require_root();
    let (mut child, rx) = lab_up_lines(&example_dir("seed"), "60s");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut prefix = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                panic!("lab did not start within 60s: {e}");
            }
        };
        if prefix.is_none() && line.starts_with("isthmus lab ") {
            prefix = Some(run_prefix(&line));
        }
        if line.contains(": running") {
            break;
        }
    }
    let prefix = prefix.unwrap();
    // A kill leaves no chance to clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !namespaces_of(&prefix).is_empty(),
        "the killed run left nothing to remove"
    );

    let out = wait_output(
        isthmus()
            .args(["lab", "down"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lab down failed: {stdout}");
    assert!(
        stdout.contains(&format!("removed lab run {prefix}")),
        "{stdout}"
    );
    assert_nothing_left(&prefix);
    // Nothing of the run survives in any namespace: its processes are gone too.
    let leftover = Command::new("pgrep")
        .args(["-f", &format!("/run/isthmus-lab/{prefix}/")])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "processes of the run left: {}",
        String::from_utf8_lossy(&leftover.stdout)
    );
}

#[test]
fn an_image_the_lab_cannot_run_is_named_before_anything_is_built() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let cluster = tmp.path().join("cluster-x");
    std::fs::create_dir(&cluster).unwrap();
    std::fs::write(
        cluster.join("db.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: db\nspec:\n  template:\n    metadata:\n      labels: {app: db}\n    spec:\n      containers:\n      - name: redis\n        image: redis:7\n",
    )
    .unwrap();
    let out = wait_output(
        isthmus()
            .args(["lab", "up"])
            .arg(tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in [
        "redis:7",
        "container redis",
        "cluster cluster-x",
        "nginxdemos/hello:plain-text",
        "command",
    ] {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("isthmus lab isl"),
        "the lab started building"
    );
}

#[test]
fn without_root_the_lab_says_what_it_needs() {
    require_root();
    // A copy any UID can run: the checkout may not be readable by others.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = tmp.path().join("isthmus");
    std::fs::copy(env!("CARGO_BIN_EXE_isthmus"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    for sub in ["up", "down"] {
        let mut cmd = Command::new(&bin);
        cmd.args(["lab", sub])
            .current_dir(tmp.path())
            .uid(65534)
            .gid(65534)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = wait_output(cmd.spawn().unwrap(), Duration::from_secs(30));
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(
                "isthmus lab needs root (network namespaces, iptables): run it with sudo"
            ),
            "lab {sub}: {stderr}"
        );
    }
}

/// Runs a lab of one cluster `c1` holding `manifests` for `duration`: the output,
/// its stdout, and both streams as a failure message's context.
fn run_one_cluster(manifests: &str, duration: &str) -> (std::process::Output, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = tmp.path().join("c1");
    std::fs::create_dir(&cluster).unwrap();
    std::fs::write(cluster.join("app.yaml"), manifests).unwrap();
    lab_up(
        tmp.path(),
        &["--duration", duration],
        Duration::from_secs(90),
    )
}

/// A Deployment `client` whose one container runs `script` with the host's shell.
fn client(script: &str) -> String {
    let body: String = script.lines().map(|l| format!("          {l}\n")).collect();
    format!(
        concat!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: client}}\n",
            "spec:\n  template:\n    metadata: {{labels: {{app: client}}}}\n",
            "    spec:\n      containers:\n      - name: client\n        image: busybox\n",
            "        command: [/bin/sh, -c]\n        args:\n        - |\n{body}",
        ),
        body = body
    )
}

const REPLICAS_LAB: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ports:
  - port: 80
    targetPort: http
  selector:
    app: web
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: nginxdemos/hello:plain-text
        ports:
        - containerPort: 9000
          name: http
---
"#;

const REPLICAS_LAB_CLIENT: &str = r#"sleep 1
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  curl -s --fail -m 5 http://web.default.svc.cluster.local/ | grep 'Server name'
done
exit 3
"#;

#[test]
fn a_local_service_spreads_over_replicas_and_a_failed_container_fails_the_run() {
    require_root();
    let (out, stdout, context) = run_one_cluster(
        &format!("{REPLICAS_LAB}{}", client(REPLICAS_LAB_CLIENT)),
        "10s",
    );
    let answered_by = |replica: &str| {
        stdout
            .lines()
            .filter(|l| l.starts_with("[c1/client-") && l.contains("Server name: web-"))
            .filter(|l| l.ends_with(replica))
            .count()
    };
    // 20 calls split at random between two replicas: each gets some (all on one
    // side has a chance of 2 in a million).
    let (first, second) = (answered_by("-0"), answered_by("-1"));
    assert_eq!(first + second, 20, "not every call was answered; {context}");
    assert!(
        first > 0 && second > 0,
        "calls not spread: {first}/{second}; {context}"
    );
    // The container's `exit 3` is a failed pod: the run says so and fails.
    assert!(!out.status.success(), "{context}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAILED: container c1/client-")
                && l.ends_with("/client exited (exit status: 3)")),
        "{context}"
    );
    assert_nothing_left(&run_prefix(&stdout));
}

const ENDPOINTS_LAB: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ports:
  - port: 80
    targetPort: 9000
  selector:
    app: web
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web-a
spec:
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: nginxdemos/hello:plain-text
        ports:
        - containerPort: 9000
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web-b
spec:
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: quits
        image: busybox
        command: ["/bin/sh", "-c", "sleep 3; echo quitting"]
---
"#;

const ENDPOINTS_LAB_CLIENT: &str = r#"sleep 6
for i in 1 2 3 4 5 6 7 8 9 10; do
  curl -s --fail -m 3 http://web/ | grep 'Server name' || echo "call failed"
done
sleep 60
"#;

#[test]
fn endpoints_follow_the_pods() {
    require_root();
    let (out, stdout, context) = run_one_cluster(
        &format!("{ENDPOINTS_LAB}{}", client(ENDPOINTS_LAB_CLIENT)),
        "12s",
    );
    // web-b never listens and quits after 3 s, exiting 0: not a failure. From
    // then on only web-a backs the Service, so every later call reaches it.
    assert!(out.status.success(), "{context}");
    let client: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("[c1/client-"))
        .collect();
    let answered = client
        .iter()
        .filter(|l| l.contains("Server name: web-a-"))
        .count();
    assert_eq!(answered, 10, "{context}");
    assert!(
        !client.iter().any(|l| l.contains("call failed")),
        "{context}"
    );
    assert_nothing_left(&run_prefix(&stdout));
}

#[test]
fn the_wan_delay_sits_on_the_path_between_the_gateways() {
    require_root();
    let (out, stdout, context) = lab_up(
        &example_dir("seed"),
        &["--duration", "8s", "--wan-delay", "100"],
        Duration::from_secs(90),
    );
    assert!(out.status.success(), "{context}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("cluster-b called hello.default.svc.cluster.local: "))
        .unwrap_or_else(|| panic!("no call summary; {context}"));
    let mean_ms: f64 = line
        .split(", ")
        .find_map(|part| part.strip_suffix(" ms mean to response headers"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no mean in {line:?}"));
    // A lower bound, not a speed: the request and its answer each wait 100 ms in
    // the relay, whatever the machine.
    assert!(mean_ms >= 200.0, "{line}; {context}");
    assert!(
        !stdout.lines().any(|l| l.ends_with("] Response: 22")),
        "a call failed; {context}"
    );
    assert_nothing_left(&run_prefix(&stdout));
}
