//! A sidecar whose UID the capture does not exempt, with the real `isthmus-init`
//! and `isthmus-proxy` in network namespaces.
//!
//! The capture is installed with `--proxy-uid` naming another user than the one the
//! sidecar runs as, so every upstream connection of the proxy is captured and
//! redirected to its own outbound listener again. Without loop detection each
//! forwarded connection opens another until the connection limit (bounded here by
//! `--max-connections`). With it, one application connection costs at most two
//! connections accepted by the proxy (the application's, and the proxy's own
//! upstream that came back and was refused as a loop), the application is reset at
//! once, and the log names the likely cause, once per burst.
//!
//! Needs root, like every test here. Figures print as `FIGURE name = value` lines.
#![allow(clippy::unwrap_used)]

use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use isthmus_tests::binary::{WorldExecutable, binary};
use isthmus_tests::figure::figure;
use isthmus_tests::identity;
use isthmus_tests::netns::{Lab, Namespace, Pair};
use isthmus_tests::pod::{self, metric};
use isthmus_tests::tcp::{self, WAIT};

/// The UID the capture exempts: not the sidecar's ([`pod::PROXY_UID`]).
const EXEMPT_UID: u32 = 2199;
/// The sidecar's connection limit: what ends a loop that is not detected.
const MAX_CONNECTIONS: usize = 64;
/// Application connections made, one after the other.
const ATTEMPTS: usize = 10;
const CAUSE: &str = "the capture does not exempt this proxy's UID 2102 (isthmus-init --proxy-uid)";

struct Setup {
    pod: Namespace,
    server: Namespace,
    log: std::path::PathBuf,
    _bin: WorldExecutable,
    _dir: tempfile::TempDir,
    /// Declared last: dropping it kills the sidecar and deletes the namespaces.
    lab: Lab,
}

impl Drop for Setup {
    fn drop(&mut self) {
        pod::show_log_if_failing(&self.log, "", String::new);
    }
}

fn setup() -> Setup {
    let lab = Lab::new();
    let Pair { pod, server, .. } = lab.pair(false);
    let uid = EXEMPT_UID.to_string();
    pod.exec(
        binary("isthmus-init").to_str().unwrap(),
        &["--proxy-uid", &uid],
    )
    .unwrap();

    let dir = tempfile::Builder::new()
        .prefix("isthmus-loops")
        .tempdir()
        .unwrap();
    let (identity, manifests) = pod::prepare_dirs(dir.path(), |d: &Path| {
        identity::mint_pod(d, "loops anchor").unwrap()
    })
    .unwrap();
    let log = dir.path().join("sidecar.log");
    let bin = WorldExecutable::copy(&binary("isthmus-proxy")).unwrap();
    let max = MAX_CONNECTIONS.to_string();
    let child = pod::start_sidecar(
        &pod,
        bin.path(),
        &identity,
        &manifests,
        &[
            "--connect-timeout",
            "1s",
            "--log",
            "info",
            "--max-connections",
            &max,
        ],
        &log,
    )
    .unwrap();
    lab.adopt(child);
    Setup {
        pod,
        server,
        log,
        _bin: bin,
        _dir: dir,
        lab,
    }
}

/// The sidecar's answer to `GET path` on its admin port, from inside the pod.
fn admin(s: &Setup, path: &str) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], pod::ADMIN_PORT));
    s.pod.run(|| pod::http_get(addr, path)).unwrap()
}

fn scrape(s: &Setup) -> String {
    let response = admin(s, "/metrics");
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// Connections the outbound listener took: those it served and those the
/// connection limit turned away.
fn accepted(metrics: &str) -> f64 {
    metric(metrics, "tcp_open_total", &[r#"direction="outbound""#])
        + metric(
            metrics,
            "tunnel_refusals_total",
            &[r#"direction="outbound""#, r#"reason="max_connections""#],
        )
}

/// Waits until the accepted count has not moved for a while (the loop, if any, has
/// run its course), at most [`WAIT`]; returns the last scrape.
fn settled(s: &Setup) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last = scrape(s);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = scrape(s);
        if accepted(&now) == accepted(&last) || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// How the application's connection ended: `reset`, `closed` (EOF), or a failure
/// if bytes came or nothing happened within [`WAIT`].
fn ending(stream: &mut std::net::TcpStream) -> Result<&'static str, String> {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => Ok("closed"),
        Ok(n) => Err(format!("{n} bytes came back: {:?}", &buf[..n])),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok("reset"),
        Err(e) => Err(format!("no end within {WAIT:?}: {e} ({:?})", e.kind())),
    }
}

#[test]
fn an_unexempted_proxy_uid_costs_at_most_two_connections_and_names_the_cause() {
    let s = setup();
    // A passthrough destination that must never be reached: every upstream
    // connection of the proxy is captured before it leaves the pod.
    let server_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 7000);
    let listener: TcpListener = s.server.run(|| tcp::listen(server_addr)).unwrap();

    let mut costs = Vec::new();
    for attempt in 0..ATTEMPTS {
        let before = accepted(&settled(&s));
        let started = Instant::now();
        // The application speaks only after the server does (as SMTP or MySQL
        // would): nothing but the loop check can end this connection before the
        // detection window.
        let outcome = match s.pod.run(|| tcp::connect(server_addr)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok("reset"),
            Err(e) => panic!("attempt {attempt}: connecting to {server_addr}: {e}"),
            Ok(mut stream) => ending(&mut stream),
        };
        let took = started.elapsed();
        let after = settled(&s);
        let cost = accepted(&after) - before;
        costs.push(cost);
        let outcome = outcome.unwrap_or_else(|e| {
            panic!("attempt {attempt}: {e}; the proxy accepted {cost} connections")
        });
        eprintln!(
            "attempt {attempt}: {outcome} after {took:?}; the proxy accepted {cost} connections"
        );
        figure("loop_app_connection_end_ms", took.as_millis());
        assert!(
            cost <= 2.0,
            "attempt {attempt}: one application connection cost {cost} proxy connections \
             (limit {MAX_CONNECTIONS}); ended {outcome} after {took:?}"
        );
        assert!(
            took < WAIT,
            "attempt {attempt}: the application waited {took:?}"
        );
        assert!(
            metric(
                &after,
                "tunnel_refusals_total",
                &[r#"direction="outbound""#, r#"reason="loop""#]
            ) > 0.0,
            "no refusal counted as a loop"
        );
    }
    figure(
        "loop_proxy_connections_per_app_connection_max",
        costs.iter().copied().fold(0.0, f64::max),
    );
    assert!(
        !tcp::pending(&listener).unwrap(),
        "a captured proxy connection reached the server"
    );

    // The cause is named, once for the whole burst (the warning is rate-limited).
    let log = std::fs::read_to_string(&s.log).unwrap();
    let causes = log.lines().filter(|l| l.contains(CAUSE)).count();
    assert_eq!(
        causes, 1,
        "expected one line naming the cause for {ATTEMPTS} loops, found {causes}"
    );
    // The sidecar still serves: the loop did not exhaust it.
    let ready = admin(&s, "/ready");
    assert!(
        ready.starts_with("HTTP/1.1 200"),
        "{ready}\n{}",
        s.lab.diagnostics()
    );
}

/// A gateway's listeners are bound to wildcards (`0.0.0.0:4143`), so comparing an
/// endpoint with their addresses never matches: an endpoint is the gateway itself
/// when its IP is one of the namespace's own and its port a listener's. The
/// predicate, in a namespace of known addresses, including one added after the
/// first lookup.
#[test]
fn an_endpoint_at_an_own_address_and_a_wildcard_listener_port_is_the_proxy() {
    use proxy_core::addr::LocalAddrs;

    let lab = Lab::new();
    // The peer namespace only gives the gateway's interface an address and a link.
    let Pair {
        pod: gw,
        pod_if: gw_if,
        ..
    } = lab.pair(false);
    let listeners: Vec<SocketAddr> = ["0.0.0.0:4143", "[::]:4191"]
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    let ports = || listeners.iter().map(SocketAddr::port);
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();

    let local = LocalAddrs::default();
    gw.run(|| {
        for own in [
            "198.18.0.2:4143",
            "127.0.0.1:4143",
            "[::1]:4191",
            "[::ffff:198.18.0.2]:4143",
        ] {
            assert!(local.is_own(addr(own), ports()), "{own} is the gateway");
        }
        for other in ["198.18.0.1:4143", "198.18.0.2:8080", "198.18.0.3:4143"] {
            assert!(!local.is_own(addr(other), ports()), "{other} is not");
        }
    });
    // An address added later counts once the list is read again (a miss re-reads
    // it at most once a second).
    gw.add_addr(&gw_if, "198.18.0.3/24").unwrap();
    let deadline = Instant::now() + WAIT;
    while !gw.run(|| local.is_own(addr("198.18.0.3:4143"), ports())) {
        assert!(
            Instant::now() < deadline,
            "198.18.0.3 was added but is not seen as the gateway's own"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
