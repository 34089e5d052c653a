//! Gateways named by DNS, with the real binaries in network namespaces whose
//! hosts files (`ip netns exec` mounts `/etc/netns/<ns>/hosts` over `/etc/hosts`)
//! say where the names point:
//!
//! - a Link whose `gatewayAddress` is a name carries streams, and when the name
//!   moves to another peer gateway, new streams follow without a restart while a
//!   stream opened before finishes where it began; when the name stops resolving,
//!   the last good address keeps serving, and `/config` and the metrics say so;
//! - the same for the gateway a cluster's settings name, which the outbound side
//!   (here the standalone role, which dials its cluster's gateway exactly as the
//!   sidecar does, without needing capture) keeps resolved.
//!
//! The world: a bridge joins five namespaces. cluster-a has two gateways, a1
//! (198.18.0.2) and a2 (198.18.0.3), each in front of a backend that greets with
//! its gateway's name; cluster-b has two gateways, b1 (198.18.0.1), whose Link to
//! cluster-a names `gateway.cluster-a.test` (a1 in its hosts file), and b2
//! (198.18.0.4), whose Link names a2 by address; the client namespace
//! (198.18.0.10) runs the standalone proxy, whose cluster settings name its
//! gateway `gateway.cluster-b.test` (b1 in its hosts file). A stream's greeting
//! tells which path it took. Needs root, like every test here.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use isthmus_test_support::{Metrics, eventually_blocking};
use isthmus_tests::identity::Pki;
use isthmus_tests::multicluster::{
    MIRROR, NAMESPACE, cluster_settings, gateway_id, link, link_at, service, settings_at,
};
use isthmus_tests::netns::{Lab, Namespace};
use isthmus_tests::pod;
use isthmus_tests::tcp::{self, WAIT};
use isthmus_tests::wan::{Wan, proxy_command, write_files};
use isthmus_vocab::SpiffeId;

const A_NAME: &str = "gateway.cluster-a.test";
const B_NAME: &str = "gateway.cluster-b.test";
const HELLO: &str = "hello.default.svc.cluster.local:80";
/// Where every proxy's admin server and the standalone proxy listen, each on its
/// own namespace's loopback.
const ADMIN: &str = "127.0.0.1:4191";
const OUTBOUND: &str = "127.0.0.1:4140";
/// Each backend listens on its gateway namespace's loopback.
const BACKEND: &str = "127.0.0.1:8080";
/// How often the proxies look their gateways' names up again.
const REFRESH: &str = "1s";
/// Generous for a debug build on a shared machine: a refresh, a connection, slack.
const MOVE_WITHIN: Duration = Duration::from_secs(30);

/// A Link to cluster-a's gateway by the name `address`.
fn link_named(address: &str) -> String {
    let id = gateway_id("cluster-a").to_string();
    link_at(NAMESPACE, "cluster-a", address, 4143, &id, 4191)
}

/// cluster-b's settings, naming its gateway `address`.
fn settings_named(address: &str) -> String {
    let id = gateway_id("cluster-b").to_string();
    settings_at(NAMESPACE, "cluster-b", address, 4143, &id)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Greets each connection with `name` and a newline, then echoes.
fn greeter(listener: TcpListener, name: &'static str) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let _ = stream.write_all(format!("{name}\n").as_bytes());
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

struct World {
    client: Namespace,
    b1: Namespace,
    logs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
    /// Dropped last: kills the proxies and deletes the namespaces.
    _lab: Lab,
}

impl Drop for World {
    fn drop(&mut self) {
        pod::show_logs_if_failing(&self.logs);
    }
}

impl World {
    fn start() -> Self {
        let lab = Lab::new();
        let wan = Wan::new(&lab);
        let place = |ip: &str| wan.place(ip);
        let b1 = place("198.18.0.1");
        let a1 = place("198.18.0.2");
        let a2 = place("198.18.0.3");
        let b2 = place("198.18.0.4");
        let client = place("198.18.0.10");
        b1.write_hosts(&format!("198.18.0.2 {A_NAME}\n")).unwrap();
        client
            .write_hosts(&format!("198.18.0.1 {B_NAME}\n"))
            .unwrap();
        for (ns, name) in [(&a1, "a1"), (&a2, "a2")] {
            greeter(ns.run(|| TcpListener::bind(BACKEND)).unwrap(), name);
        }

        let pki = Pki::new("dns gateways anchor");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let write = |proxy: &str, files: &[(&str, String)]| {
            write_files(&root.join(format!("manifests-{proxy}")), files);
        };
        for (proxy, own) in [("a1", "198.18.0.2:4143"), ("a2", "198.18.0.3:4143")] {
            write(
                proxy,
                &[
                    ("settings.yaml", cluster_settings("cluster-a", addr(own))),
                    ("hello.yaml", service("hello", addr(BACKEND), true)),
                ],
            );
        }
        let b2_link = link("cluster-a", addr("198.18.0.3:4143"), addr(ADMIN));
        for (proxy, own, link) in [
            ("b1", "198.18.0.1:4143", link_named(A_NAME)),
            ("b2", "198.18.0.4:4143", b2_link),
        ] {
            write(
                proxy,
                &[
                    ("settings.yaml", cluster_settings("cluster-b", addr(own))),
                    ("link.yaml", link),
                ],
            );
        }
        write(
            "client",
            &[
                ("settings.yaml", settings_named(B_NAME)),
                ("link.yaml", link_named(A_NAME)),
                (
                    "clusters/cluster-a/settings.yaml",
                    cluster_settings("cluster-a", addr("198.18.0.2:4143")),
                ),
                (
                    "clusters/cluster-a/hello.yaml",
                    service("hello", addr(BACKEND), true),
                ),
                ("mirror.yaml", MIRROR.to_owned()),
            ],
        );
        for (proxy, cluster, id) in [
            ("a1", "cluster-a", gateway_id("cluster-a")),
            ("a2", "cluster-a", gateway_id("cluster-a")),
            ("b1", "cluster-b", gateway_id("cluster-b")),
            ("b2", "cluster-b", gateway_id("cluster-b")),
            (
                "client",
                "cluster-b",
                SpiffeId::parse("spiffe://cluster.local/ns/default/sa/frontend").unwrap(),
            ),
        ] {
            pki.leaf(cluster, &id)
                .write_dir(&root.join(format!("identity-{proxy}")), false)
                .unwrap();
        }

        let mut logs = Vec::new();
        for (proxy, ns, role, inbound) in [
            ("a1", &a1, "gateway", "198.18.0.2:4143"),
            ("a2", &a2, "gateway", "198.18.0.3:4143"),
            ("b1", &b1, "gateway", "198.18.0.1:4143"),
            ("b2", &b2, "gateway", "198.18.0.4:4143"),
            ("client", &client, "standalone", ""),
        ] {
            let cluster = if proxy.starts_with('a') {
                "cluster-a"
            } else {
                "cluster-b"
            };
            let log = root.join(format!("{proxy}.log"));
            let mut cmd = proxy_command(ns, role, cluster, root, proxy, ADMIN);
            cmd.args(["--dns-refresh-interval", REFRESH])
                .args(["--reload-interval", "200ms", "--tunnel-connections", "1"])
                .args(["--log", "info,proxy_core=debug"]);
            if role == "gateway" {
                // The backends are on the gateway namespaces' loopback.
                cmd.args(["--inbound-addr", inbound, "--allow-local-endpoints"]);
            } else {
                cmd.args(["--outbound-addr", OUTBOUND]);
            }
            let child = cmd
                .env_clear()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            lab.adopt(child);
            logs.push(log);
        }
        World {
            client,
            b1,
            logs,
            _dir: dir,
            _lab: lab,
        }
    }

    /// A stream to hello through the standalone proxy, and the greeting that
    /// names the path it took; `None` while there is no path yet.
    fn open(&self) -> Option<(TcpStream, String)> {
        self.client.run(|| {
            let mut stream = tcp::connect(addr(OUTBOUND)).ok()?;
            write!(stream, "CONNECT {HELLO} HTTP/1.1\r\nhost: {HELLO}\r\n\r\n").ok()?;
            let head = read_until(&mut stream, b"\r\n\r\n")?;
            if !head.starts_with("HTTP/1.1 200") {
                return None;
            }
            let greeting = read_until(&mut stream, b"\n")?;
            Some((stream, greeting.trim().to_owned()))
        })
    }

    /// Waits until a new stream's greeting is `want`; how long that took.
    fn until_greeted_by(&self, want: &str) -> Duration {
        let started = Instant::now();
        eventually_blocking(&format!("a stream greeted by {want}"), MOVE_WITHIN, || {
            self.open().filter(|(_, got)| got == want).map(drop)
        });
        started.elapsed()
    }

    /// A sample of `family` with the label `label` on gateway b1's `/metrics`.
    fn b1_metric(&self, family: &str, label: &str) -> Option<f64> {
        let response = self
            .b1
            .run(|| pod::http_get(addr(ADMIN), "/metrics"))
            .unwrap();
        let (_, body) = response.split_once("\r\n\r\n")?;
        Metrics::parse(body).get(family, &[label])
    }

    /// `/config` of the proxy in `ns`, without whitespace.
    fn config(ns: &Namespace) -> String {
        let response = ns.run(|| pod::http_get(addr(ADMIN), "/config")).unwrap();
        response.split_whitespace().collect()
    }
}

/// Reads byte by byte until `end` (bounded by the stream's timeouts).
fn read_until(stream: &mut TcpStream, end: &[u8]) -> Option<String> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(end) {
        if stream.read(&mut byte).ok()? == 0 || got.len() > 4096 {
            return None;
        }
        got.push(byte[0]);
    }
    String::from_utf8(got).ok()
}

/// Writes `text` on a held stream and reads it back: the stream still carries.
fn still_carries(stream: &mut TcpStream, text: &str) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(text.as_bytes()).unwrap();
    let mut back = vec![0u8; text.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(String::from_utf8_lossy(&back), text);
}

fn move_name(ns: &Namespace, ip: &str, name: &str) {
    ns.write_hosts(&format!("{ip} {name}\n")).unwrap();
}

fn assert_dns(config: &str, want: &str) {
    let addresses = format!("\"addresses\":[\"{want}\"]");
    assert!(
        config.contains(&addresses),
        "/config lacks {addresses}: {config}"
    );
}

/// The proxy in `resolver` reaches a1 through `name` at `before`; once `name` points
/// at `after` in that namespace's hosts file (a gateway whose way leads to a2),
/// every new stream goes there without a restart, published as `figure`, while
/// the stream opened before finishes on the old address.
fn follows_its_name(
    resolver: fn(&World) -> &Namespace,
    name: &str,
    before: &str,
    after: &str,
    figure: &str,
) -> World {
    let world = World::start();
    world.until_greeted_by("a1");
    assert_dns(&World::config(resolver(&world)), &format!("{before}:4143"));
    let (mut held, greeting) = world.open().unwrap();
    assert_eq!(greeting, "a1");

    move_name(resolver(&world), after, name);
    let took = world.until_greeted_by("a2");
    eprintln!("FIGURE {figure} = {}", took.as_millis());
    assert_dns(&World::config(resolver(&world)), &format!("{after}:4143"));
    // Every new stream goes to the new address...
    for _ in 0..5 {
        assert_eq!(world.open().unwrap().1, "a2");
    }
    // ...while the stream opened before finishes on the old one.
    still_carries(&mut held, "still a1\n");
    world
}

#[test]
fn a_link_named_by_dns_follows_its_name_without_a_restart() {
    // gateway.cluster-a.test moves to a2, in gateway b1's hosts file only.
    let world = follows_its_name(
        |w| &w.b1,
        A_NAME,
        "198.18.0.2",
        "198.18.0.3",
        "dns_link_moved_ms",
    );

    // The name stops resolving (the namespace's nameserver does not answer): the
    // last good address keeps serving, and /config and the metrics say so.
    world.b1.write_hosts("").unwrap();
    let config = eventually_blocking("the failing lookup on /config", MOVE_WITHIN, || {
        Some(World::config(&world.b1)).filter(|c| c.contains("\"failing\":{"))
    });
    assert!(
        config.contains(&format!("cannotresolve{A_NAME}")),
        "/config does not say why: {config}"
    );
    assert_dns(&config, "198.18.0.3:4143");
    let name = format!("name=\"{A_NAME}:4143\"");
    assert_eq!(world.b1_metric("peer_dns_lookup_ok", &name), Some(0.0));
    assert_eq!(world.b1_metric("peer_dns_addresses", &name), Some(1.0));
    for _ in 0..3 {
        assert_eq!(world.open().unwrap().1, "a2");
    }
}

#[test]
fn a_cluster_gateway_named_by_dns_follows_its_name_without_a_restart() {
    // gateway.cluster-b.test moves to b2 (whose link goes to a2), in the client's
    // hosts file.
    drop(follows_its_name(
        |w| &w.client,
        B_NAME,
        "198.18.0.1",
        "198.18.0.4",
        "dns_cluster_gateway_moved_ms",
    ));
}
