//! HTTP/1 request smuggling against the real sidecar behind the real capture, and
//! through the whole chain: sidecar -> gateway-b -> gateway-a -> the destination
//! pod's sidecar -> origin, every hop a real `isthmus-proxy` process in network
//! namespaces (the gateways and the destination pod share the server namespace,
//! on addresses of their own).
//!
//! Each payload ([`payloads::all`]) is written with an innocent request pipelined
//! behind it on the same connection, to a raw origin ([`origin`]) that records the
//! bytes it got and parses them strictly. Per payload the test asserts:
//!
//! - the origin parsed exactly as many requests (head and whole body) as the
//!   sidecar counted (`http_requests_total` on its `/metrics`);
//! - nothing reached the origin with both `Content-Length` and
//!   `Transfer-Encoding`, nor anything a strict origin rejects;
//! - the payload was either refused by the proxy (`400`/`414`/`431`, connection
//!   closed, no request completed at the origin) or reached the origin as exactly
//!   one well-framed request, as the payload's expectation says.
//!
//! A table of payload -> outcome is printed. Needs root, like every test here.
#![allow(clippy::unwrap_used)]

mod origin;
mod payloads;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isthmus_tests::binary::binary;
use isthmus_tests::identity::Pki;
use isthmus_tests::multicluster::{
    MIRROR, cluster_settings, gateway_id, link, meshed_service, service,
};
use isthmus_tests::pod::{self, SidecarPod};
use isthmus_tests::tcp;
use isthmus_vocab::SpiffeId;

use origin::{End, Origin};
use payloads::{Expect, INNOCENT, Pace, Payload};

/// Bound on one payload's exchange; far above any timeout in play.
const EXCHANGE: Duration = Duration::from_secs(15);
/// The sidecar's detect timeout, which [`Pace::Stall`] outlasts.
const DETECT_TIMEOUT: Duration = Duration::from_secs(1);
const ORIGIN_PORT: u16 = 8080;

/// Where a payload is sent and what counts it.
struct Target<'a> {
    sidecar: &'a SidecarPod,
    dst: SocketAddr,
    origin: Origin,
}

impl Target<'_> {
    fn connect(&self) -> TcpStream {
        self.sidecar.pod.run(|| tcp::connect(self.dst)).unwrap()
    }

    /// The sidecar's outbound `http_requests_total`, all authorities.
    fn counted(&self) -> u64 {
        let metrics = self.sidecar.metrics().unwrap();
        pod::metric(&metrics, "http_requests_total", &["direction=\"outbound\""]) as u64
    }
}

/// One payload's result, a row of the table.
struct Row {
    name: &'static str,
    expect: Expect,
    statuses: Vec<u16>,
    eof: bool,
    origin: String,
    counted: u64,
    heads: usize,
    verdict: Result<&'static str, String>,
}

/// The responses in `bytes`: status and body of each, in order.
fn responses(mut bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        let status = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_default();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let body_end = (end + 4 + len).min(bytes.len());
        out.push((status, bytes[end + 4..body_end].to_vec()));
        bytes = &bytes[body_end..];
    }
    out
}

fn send(target: &Target<'_>, payload: &Payload) -> Row {
    let before = target.counted();
    let first = target.origin.accepted();
    let mut stream = target.connect();
    stream.set_read_timeout(Some(EXCHANGE)).unwrap();
    let mut all = payload.bytes.clone();
    all.extend_from_slice(INNOCENT);
    // A proxy that refuses may close before everything is written: that is fine.
    let _ = match payload.pace {
        Pace::AtOnce => stream.write_all(&all),
        Pace::Trickle => (|| {
            for byte in &all[..40] {
                stream.write_all(std::slice::from_ref(byte))?;
                std::thread::sleep(Duration::from_millis(5));
            }
            stream.write_all(&all[40..])
        })(),
        Pace::Stall { split } => stream.write_all(&all[..split]).and_then(|()| {
            std::thread::sleep(DETECT_TIMEOUT + Duration::from_millis(500));
            stream.write_all(&all[split..])
        }),
    };
    let started = Instant::now();
    let mut received = Vec::new();
    let mut eof = false;
    let mut buf = [0u8; 4096];
    while started.elapsed() < EXCHANGE {
        match stream.read(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => received.extend_from_slice(&buf[..n]),
            // A reset after a refusal still ends the connection.
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                eof = true;
                break;
            }
            Err(_) => break,
        }
    }
    drop(stream);
    // Each client connection brings the origin one connection (opened while
    // detection reads), possibly accepted a little after the proxy let go of it:
    // wait for it, so that it is not taken for the next payload's.
    let deadline = Instant::now() + Duration::from_secs(3);
    while target.origin.accepted() == first && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The origin side ends once the proxy let go of it.
    let deadline = Instant::now() + EXCHANGE;
    let conns = loop {
        let conns = target.origin.since(first);
        if conns.iter().all(|c| c.end != End::Open) || Instant::now() > deadline {
            break conns;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // What the origin parsed: whole requests. A head whose body never completed
    // (the proxy cut it when the client broke the body) is not a request.
    let heads: usize = conns.iter().map(|c| c.requests.len()).sum();
    // Counters are scraped; give the sidecar a moment to agree.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut counted = target.counted() - before;
    while counted != heads as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        counted = target.counted() - before;
    }
    let statuses: Vec<u16> = responses(&received)
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| *s >= 200)
        .collect();
    let requests: Vec<&origin::Parsed> = conns.iter().flat_map(|c| &c.requests).collect();
    let origin = requests
        .iter()
        .map(|r| {
            let target: String = r.target.chars().take(24).collect();
            format!("{} {target}", r.method)
        })
        .chain(conns.iter().filter_map(|c| match &c.end {
            End::Clean | End::Open => None,
            end => Some(format!("{end:?}")),
        }))
        .collect::<Vec<_>>()
        .join(", ");
    let verdict = judge(payload, &statuses, eof, &conns, heads, counted);
    Row {
        name: payload.name,
        expect: payload.expect,
        statuses,
        eof,
        origin,
        counted,
        heads,
        verdict,
    }
}

fn judge(
    payload: &Payload,
    statuses: &[u16],
    eof: bool,
    conns: &[origin::Connection],
    heads: usize,
    counted: u64,
) -> Result<&'static str, String> {
    for c in conns {
        if let End::Malformed(why) = &c.end {
            return Err(format!(
                "the origin got bytes no strict origin accepts ({why}): {:?}",
                String::from_utf8_lossy(&c.bytes[..c.bytes.len().min(200)])
            ));
        }
        if c.requests.iter().any(origin::Parsed::has_cl_and_te) {
            return Err(
                "a request reached the origin with Content-Length and Transfer-Encoding".into(),
            );
        }
    }
    if heads as u64 != counted {
        return Err(format!(
            "the origin parsed {heads} requests, the sidecar counted {counted}"
        ));
    }
    let requests: Vec<&origin::Parsed> = conns.iter().flat_map(|c| &c.requests).collect();
    let smuggled: Vec<_> = requests
        .iter()
        .filter(|r| r.target != "/innocent")
        .collect();
    let refused = matches!(statuses.first(), Some(400 | 414 | 431));
    match payload.expect {
        Expect::Refused if refused && eof && requests.is_empty() => Ok("refused"),
        Expect::Refused => Err(format!(
            "expected a refusal and a close; got statuses {statuses:?}, eof {eof}, {} requests at the origin",
            requests.len()
        )),
        Expect::Forwarded if statuses.first() == Some(&200) && smuggled.len() == 1 => {
            Ok("one request")
        }
        Expect::Forwarded => Err(format!(
            "expected one well-framed request; got statuses {statuses:?}, {} non-innocent requests at the origin",
            smuggled.len()
        )),
    }
}

/// Sends every payload to `target`, prints the table, fails naming each failure.
fn run_suite(label: &str, target: &Target<'_>) {
    let rows: Vec<Row> = payloads::all().iter().map(|p| send(target, p)).collect();
    println!(
        "\n{label}: {} payloads, each followed by a pipelined request",
        rows.len()
    );
    println!(
        "{:<38} {:<9} {:<14} {:<4} {:<7} {:<6} origin parsed => verdict",
        "payload", "expect", "client got", "eof", "counted", "origin"
    );
    for r in &rows {
        println!(
            "{:<38} {:<9} {:<14} {:<4} {:<7} {:<6} {} => {}",
            r.name,
            format!("{:?}", r.expect),
            format!("{:?}", r.statuses),
            r.eof,
            r.counted,
            r.heads,
            r.origin,
            match &r.verdict {
                Ok(v) => (*v).to_owned(),
                Err(e) => format!("FAIL: {e}"),
            }
        );
    }
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|r| r.verdict.as_ref().err().map(|e| format!("{}: {e}", r.name)))
        .collect();
    let through = rows
        .iter()
        .filter(|r| r.expect == Expect::Refused && r.verdict.is_err())
        .count();
    println!(
        "FIGURE smuggling_{label}_payloads = {}\nFIGURE smuggling_{label}_failures = {}\nFIGURE smuggling_{label}_refusals_missed = {through}",
        rows.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{label}: {} of {} payloads failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

fn mint_pod(dir: &Path) {
    isthmus_tests::identity::mint_pod(dir, "smuggling anchor").unwrap();
}

#[test]
fn smuggling_through_the_sidecar_reaches_the_origin_as_counted_and_well_framed() {
    let s = SidecarPod::start(mint_pod, &[]).unwrap();
    let listener = s
        .server
        .run(|| tcp::listen(s.server_addr(ORIGIN_PORT)))
        .unwrap();
    let target = Target {
        sidecar: &s,
        dst: s.server_addr(ORIGIN_PORT),
        origin: Origin::serve(listener),
    };
    run_suite("sidecar", &target);
    target.origin.stop();
}

/// Where cluster-b's mirrored Services get their ClusterIPs; `default/hello`
/// lands on [`HELLO_IP`] (FNV-1a of `default/hello`, as the discovery fixtures pin).
const SERVICE_CIDR: &str = "198.19.128.0/17";
const HELLO_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 251, 140);

/// Prints the chain's logs when a test fails.
struct Logs(Vec<PathBuf>);

impl Drop for Logs {
    fn drop(&mut self) {
        pod::show_logs_if_failing(&self.0);
    }
}

fn write(path: PathBuf, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// [`write`]s each file, named relative to `dir`.
fn write_all(dir: &Path, files: &[(&str, String)]) {
    for (name, text) in files {
        write(dir.join(name), text);
    }
}

#[test]
fn smuggling_through_the_chain_reaches_the_origin_as_counted_and_well_framed() {
    let pki = Pki::new("smuggling chain anchor");
    let frontend = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/frontend").unwrap();
    let mut s = SidecarPod::start(
        |dir| {
            pki.leaf("cluster-b", &frontend)
                .write_dir(dir, false)
                .unwrap();
        },
        &["--reload-interval", "200ms"],
    )
    .unwrap();
    // gateway-b on the server namespace's own address; gateway-a and the hello
    // pod on addresses of their own in the same namespace.
    let ip = |last| IpAddr::V4(Ipv4Addr::new(198, 18, 0, last));
    s.server.add_addr("lo", "198.18.0.3/32").unwrap();
    s.server.add_addr("lo", "198.18.0.5/32").unwrap();
    s.pod.add_route("198.19.0.0/16", "198.18.0.1").unwrap();
    let gw_b = SocketAddr::new(ip(1), 4143);
    let admin_b = SocketAddr::new(ip(1), 4191);
    let gw_a = SocketAddr::new(ip(3), 4143);
    let admin_a = SocketAddr::new(ip(3), 4191);
    let hello_pod = SocketAddr::new(ip(5), ORIGIN_PORT);
    let hello_admin = SocketAddr::new(ip(5), 4191);
    // The app listens on every address of its pod: the pod's sidecar delivers to
    // it on loopback or on the pod's address.
    let listener = s
        .server
        .run(|| tcp::listen(SocketAddr::from(([0, 0, 0, 0], ORIGIN_PORT))))
        .unwrap();
    let origin = Origin::serve(listener);

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let a = root.join("manifests-cluster-a");
    let b = root.join("manifests-cluster-b");
    let remote = |m: &Path| {
        write_all(
            m,
            &[
                (
                    "clusters/cluster-a/settings.yaml",
                    cluster_settings("cluster-a", gw_a),
                ),
                (
                    "clusters/cluster-a/hello.yaml",
                    service("hello", hello_pod, true),
                ),
                ("link.yaml", link("cluster-a", gw_a, admin_a)),
            ],
        );
    };
    write_all(
        &a,
        &[
            ("settings.yaml", cluster_settings("cluster-a", gw_a)),
            ("hello.yaml", meshed_service("hello", hello_pod, true)),
            ("link.yaml", link("cluster-b", gw_b, admin_b)),
        ],
    );
    write_all(
        &b,
        &[("settings.yaml", cluster_settings("cluster-b", gw_b))],
    );
    remote(&b);
    let mut identities = vec![
        ("gateway-a", "cluster-a", gateway_id("cluster-a")),
        ("gateway-b", "cluster-b", gateway_id("cluster-b")),
        (
            "hello",
            "cluster-a",
            SpiffeId::parse("spiffe://cluster.local/ns/default/sa/hello").unwrap(),
        ),
    ];
    let mut logs = Logs(vec![s.log.clone()]);
    for (name, cluster, id) in identities.drain(..) {
        pki.leaf(cluster, &id)
            .write_dir(&root.join(format!("identity-{name}")), false)
            .unwrap();
    }
    // The hello pod's sidecar first, ready before any gateway may probe it.
    let procs: [(&str, &str, &str, Vec<String>); 3] = [
        (
            "hello",
            "sidecar",
            "cluster-a",
            vec![
                format!("--inbound-addr={}", SocketAddr::new(ip(5), 4143)),
                "--outbound-addr=127.0.0.1:14140".to_owned(),
                format!("--admin-addr={hello_admin}"),
            ],
        ),
        (
            "gateway-a",
            "gateway",
            "cluster-a",
            vec![
                format!("--inbound-addr={gw_a}"),
                format!("--admin-addr={admin_a}"),
                // The hello pod shares gateway-a's namespace here, so its
                // address is one of gateway-a's own host.
                "--allow-local-endpoints".to_owned(),
            ],
        ),
        (
            "gateway-b",
            "gateway",
            "cluster-b",
            vec![
                format!("--inbound-addr={gw_b}"),
                format!("--admin-addr={admin_b}"),
            ],
        ),
    ];
    for (name, role, cluster, addrs) in procs {
        let log = root.join(format!("{name}.log"));
        let manifests = if cluster == "cluster-a" { &a } else { &b };
        let mut cmd = s.server.command(binary("isthmus-proxy"));
        cmd.args([role, "--cluster", cluster, "--identity-dir"])
            .arg(root.join(format!("identity-{name}")))
            .arg("--manifests")
            .arg(manifests)
            .args(&addrs)
            .args([
                "--reload-interval",
                "200ms",
                "--log",
                "info,proxy_core=debug",
            ]);
        s.lab.spawn_logged(&mut cmd, &log);
        logs.0.push(log);
        if name == "hello" {
            let started = Instant::now();
            while !s
                .server
                .run(|| pod::http_get(hello_admin, "/ready"))
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                assert!(
                    started.elapsed() < pod::READY,
                    "the hello pod's sidecar is not ready"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // The client pod's sidecar: cluster-b's settings with its gateway, the remote
    // cluster's Services, and the seed's ServiceMirror.
    let settings = cluster_settings("cluster-b", gw_b).replacen(
        "spec:\n",
        &format!("spec:\n  serviceCIDR: {SERVICE_CIDR}\n"),
        1,
    );
    write(s.manifests.join("settings.yaml"), &settings);
    remote(&s.manifests);
    write(s.manifests.join("mirror.yaml"), MIRROR);
    // The gateway of the cluster settings is read at start.
    s.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    s.restart().unwrap();

    let dst = SocketAddr::from((HELLO_IP, 80));
    let started = Instant::now();
    loop {
        let answer = s.pod.run(|| -> std::io::Result<String> {
            let mut c = tcp::connect(dst)?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"GET /warm HTTP/1.1\r\nHost: hello\r\nConnection: close\r\n\r\n")?;
            let mut out = Vec::new();
            let _ = c.read_to_end(&mut out);
            Ok(String::from_utf8_lossy(&out).into_owned())
        });
        if answer.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the chain did not carry a request within 60 s: {answer:?}\n/config: {}",
            s.admin("/config").unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let target = Target {
        sidecar: &s,
        dst,
        origin,
    };
    run_suite("chain", &target);
    // Every payload went through the destination pod's sidecar, not around it.
    let hello_metrics = s
        .server
        .run(|| pod::http_get(hello_admin, "/metrics"))
        .unwrap();
    let inbound = pod::metric(&hello_metrics, "tcp_open_total", &["direction=\"inbound\""]);
    assert!(
        inbound as usize > payloads::all().len(),
        "the hello pod's sidecar carried {inbound} connections:\n{hello_metrics}"
    );
    target.origin.stop();
    drop(logs);
}
