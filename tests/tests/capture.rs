//! `isthmus-init` for real: each test builds a pod namespace and a peer namespace
//! joined by a veth pair, installs the capture with the real binary, and checks where
//! real connections land. Needs root (fails, with instructions, without it) and the
//! `isthmus-init` binary (`cargo test --workspace` builds it).
#![allow(clippy::unwrap_used)]

use isthmus_test_support::test_cases;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};

use iptables_init::apply;
use iptables_init::backend::{self, Mode};
use iptables_init::config::{Config, Family};
use iptables_init::rules::{self, NatState};
use isthmus_tests::binary::{WorldExecutable, binary};
use isthmus_tests::netns::{Fam, Lab, Namespace, Pair, wait_with_timeout};
use isthmus_tests::tcp::{self, WAIT};
use isthmus_vocab::ports::{
    DEFAULT_ADMIN_PORT as ADMIN, DEFAULT_INBOUND_PORT as INBOUND,
    DEFAULT_OUTBOUND_PORT as OUTBOUND, PROXY_UID,
};
use proxy_core::addr::orig_dst;

/// Some other unprivileged user: the app.
const APP_UID: u32 = 2103;
const NOBODY: u32 = 65534;

/// The addresses of one family in the two-namespace topology.
struct Net {
    pod: IpAddr,
    peer: IpAddr,
    /// The peer's address on a second subnet, routed through the peer.
    other: IpAddr,
    other_subnet: &'static str,
}

fn net(fam: Fam) -> Net {
    let (other, other_subnet) = match fam {
        Fam::V4 => ("198.19.0.1", "198.19.0.0/24"),
        Fam::V6 => ("2001:2:0:1::1", "2001:2:0:1::/64"),
    };
    Net {
        pod: fam.pod_ip(),
        peer: fam.server_ip(),
        other: other.parse().unwrap(),
        other_subnet,
    }
}

/// A pod namespace and a peer namespace joined by a veth pair, with IPv4 and IPv6.
/// Field order matters: the helper copy outlives nothing, the lab drops last.
struct Pod {
    fam: Fam,
    net: Net,
    pod: Namespace,
    peer: Namespace,
    init: PathBuf,
    dial: WorldExecutable,
    /// Held for its drop: it deletes the namespaces.
    _lab: Lab,
}

impl Pod {
    fn new(fam: Fam) -> Self {
        let lab = Lab::new();
        let Pair {
            pod,
            server: peer,
            server_if: peer_if,
            ..
        } = lab.pair(true);
        peer.add_addr(&peer_if, "198.19.0.1/24").unwrap();
        peer.add_addr(&peer_if, "2001:2:0:1::1/64").unwrap();
        pod.add_route("198.19.0.0/24", "198.18.0.1").unwrap();
        pod.add_route("2001:2:0:1::/64", "2001:2::1").unwrap();
        let init = binary("isthmus-init");
        let dial = WorldExecutable::copy(std::path::Path::new(env!(
            "CARGO_BIN_EXE_isthmus-test-dial"
        )))
        .unwrap();
        Self {
            fam,
            net: net(fam),
            pod,
            peer,
            init,
            dial,
            _lab: lab,
        }
    }

    /// Runs `isthmus-init` in the pod with `args` (plus `--ipv6` for IPv6 tests).
    fn init(&self, args: &[&str]) -> String {
        let mut args: Vec<&str> = args.to_vec();
        if self.fam == Fam::V6 {
            args.push("--ipv6");
        }
        self.pod.exec(self.init.to_str().unwrap(), &args).unwrap()
    }

    fn listen(&self, ns: &Namespace, ip: IpAddr, port: u16) -> TcpListener {
        let addr = SocketAddr::new(ip, port);
        ns.run(|| tcp::listen(addr))
            .unwrap_or_else(|e| panic!("listening on {addr} in {}: {e}", ns.name()))
    }

    /// Connects from the pod as the test process (root, not the proxy) and sends `token`.
    fn send_from(&self, ns: &Namespace, ip: IpAddr, port: u16, token: &str) -> TcpStream {
        let addr = SocketAddr::new(ip, port);
        let mut stream = ns
            .run(|| tcp::connect(addr))
            .unwrap_or_else(|e| panic!("connecting from {} to {addr}: {e}", ns.name()));
        tcp::send(&mut stream, token).unwrap();
        stream
    }

    /// Starts the dial helper in the pod as `uid`; finish it with [`finish`].
    fn dial_as(&self, uid: u32, ip: IpAddr, port: u16, token: &str, bind: Option<IpAddr>) -> Child {
        let mut cmd = Command::new(self.dial.path());
        cmd.arg(SocketAddr::new(ip, port).to_string()).arg(token);
        if let Some(bind) = bind {
            cmd.arg(bind.to_string());
        }
        self.pod.spawn_as(cmd, uid, uid).unwrap()
    }
}

/// Waits for the dial helper, which ends once the listener side closed.
fn finish(child: Child) -> SocketAddr {
    let out = wait_with_timeout(child, WAIT * 2).unwrap();
    assert!(
        out.status.success(),
        "dial helper failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Accepts the connection that must arrive at `listener`, checks its token, and
/// returns it with the client's address.
fn arrival(listener: &TcpListener, token: &str) -> (TcpStream, SocketAddr) {
    let local = listener.local_addr().unwrap();
    let (mut stream, peer) = tcp::accept_within(listener, WAIT)
        .unwrap()
        .unwrap_or_else(|| panic!("no connection arrived at {local} within {WAIT:?}"));
    assert_eq!(
        tcp::receive(&mut stream).unwrap(),
        token,
        "token at {local}"
    );
    (stream, peer)
}

/// [`arrival`] of a redirected connection, whose original destination must be
/// `destination`.
fn redirected(
    listener: &TcpListener,
    token: &str,
    destination: SocketAddr,
) -> (TcpStream, SocketAddr) {
    let (stream, client) = arrival(listener, token);
    let found = orig_dst(&stream, stream.local_addr().unwrap())
        .unwrap_or_else(|e| panic!("no original destination on {stream:?}: {e}"))
        .0;
    assert_eq!(found, destination, "original destination of {token:?}");
    (stream, client)
}

fn assert_nothing_at(listener: &TcpListener) {
    assert!(
        !tcp::pending(listener).unwrap(),
        "a connection arrived at {} that should not have",
        listener.local_addr().unwrap()
    );
}

// ---- outbound ----

/// A connection from the pod to the peer's port 8080, sending `token`, lands on
/// `outbound` with its original destination, and never at the peer.
fn assert_captured(p: &Pod, outbound: &TcpListener, token: &str) {
    let server = p.listen(&p.peer, p.net.peer, 8080);
    let _client = p.send_from(&p.pod, p.net.peer, 8080, token);
    let (_stream, _) = redirected(outbound, token, SocketAddr::new(p.net.peer, 8080));
    assert_nothing_at(&server);
}

fn outbound_is_redirected_with_original_destination(fam: Fam) {
    let p = Pod::new(fam);
    p.init(&["--backend", "nft"]);
    let outbound = p.listen(&p.pod, p.fam.any(), OUTBOUND);
    assert_captured(&p, &outbound, "app");
}

fn proxy_uid_reaches_the_destination_directly(fam: Fam) {
    let p = Pod::new(fam);
    p.init(&[]);
    let outbound = p.listen(&p.pod, p.fam.any(), OUTBOUND);
    let server = p.listen(&p.peer, p.net.peer, 8080);

    let child = p.dial_as(PROXY_UID, p.net.peer, 8080, "proxy", None);
    let (stream, client) = arrival(&server, "proxy");
    assert_eq!(client.ip(), p.net.pod, "the server sees the pod's address");
    drop(stream);
    finish(child);
    assert_nothing_at(&outbound);

    // The same program under another UID is captured: the exemption is the UID's.
    let child = p.dial_as(APP_UID, p.net.peer, 8080, "app", None);
    let (stream, _) = redirected(&outbound, "app", SocketAddr::new(p.net.peer, 8080));
    drop(stream);
    finish(child);
    assert_nothing_at(&server);
}

fn skipped_ports_subnets_and_loopback_are_not_captured(fam: Fam) {
    let p = Pod::new(fam);
    p.init(&[
        "--skip-outbound-ports",
        "8081,9000-9010",
        "--skip-outbound-subnets",
        p.net.other_subnet,
    ]);
    let outbound = p.listen(&p.pod, p.fam.any(), OUTBOUND);
    let direct = [
        (&p.peer, p.net.peer, 8081, "skipped port"),
        (&p.peer, p.net.peer, 9005, "skipped range"),
        (&p.peer, p.net.other, 8080, "skipped subnet"),
        (&p.pod, p.fam.loopback(), 8080, "loopback"),
        (&p.pod, p.net.pod, 8082, "own pod address"),
    ];
    for (ns, ip, port, token) in direct {
        let listener = p.listen(ns, ip, port);
        let _client = p.send_from(&p.pod, ip, port, token);
        arrival(&listener, token);
        assert_nothing_at(&outbound);
    }

    assert_captured(&p, &outbound, "captured");
}

fn include_subnets_limit_capture(fam: Fam) {
    let p = Pod::new(fam);
    p.init(&["--include-outbound-subnets", p.net.other_subnet]);
    let outbound = p.listen(&p.pod, p.fam.any(), OUTBOUND);

    let other = p.listen(&p.peer, p.net.other, 8080);
    let _c = p.send_from(&p.pod, p.net.other, 8080, "included");
    let (_stream, _) = redirected(&outbound, "included", SocketAddr::new(p.net.other, 8080));
    assert_nothing_at(&other);

    let server = p.listen(&p.peer, p.net.peer, 8080);
    let _c = p.send_from(&p.pod, p.net.peer, 8080, "not included");
    arrival(&server, "not included");
    assert_nothing_at(&outbound);
}

// ---- inbound ----

fn inbound_is_redirected_and_admin_is_not(fam: Fam) {
    let p = Pod::new(fam);
    p.init(&[]);
    let [inbound, admin, app] =
        [INBOUND, ADMIN, 8080].map(|port| p.listen(&p.pod, p.fam.any(), port));

    let _c = p.send_from(&p.peer, p.net.pod, 8080, "to app");
    let (_stream, client) = redirected(&inbound, "to app", SocketAddr::new(p.net.pod, 8080));
    assert_eq!(client.ip(), p.net.peer);
    assert_nothing_at(&app);

    let _c = p.send_from(&p.peer, p.net.pod, ADMIN, "probe");
    let (stream, _) = arrival(&admin, "probe");
    assert_eq!(stream.local_addr().unwrap().port(), ADMIN);
    assert_nothing_at(&inbound);

    // A gateway's mTLS addresses the inbound port itself.
    let _c = p.send_from(&p.peer, p.net.pod, INBOUND, "direct");
    let (stream, _) = arrival(&inbound, "direct");
    assert_eq!(stream.local_addr().unwrap().port(), INBOUND);
}

fn proxy_calling_its_own_pod_goes_through_inbound(fam: Fam) {
    let p = Pod::new(fam);
    // IPv4 has all of 127.0.0.0/8 on lo; IPv6 only ::1, so isthmus-init --ipv6
    // assigns the proxy's inbound source ::6 itself.
    p.init(&[]);
    let [inbound, admin, app] =
        [INBOUND, ADMIN, 8080].map(|port| p.listen(&p.pod, p.fam.any(), port));

    // The proxy forwarding to its own pod IP lands on its inbound port.
    let child = p.dial_as(PROXY_UID, p.net.pod, 8080, "self", None);
    let (stream, _) = redirected(&inbound, "self", SocketAddr::new(p.net.pod, 8080));
    drop(stream);
    finish(child);
    assert_nothing_at(&app);

    // The proxy delivering inbound traffic from its inbound source reaches the app.
    let child = p.dial_as(
        PROXY_UID,
        p.net.pod,
        8080,
        "deliver",
        Some(p.fam.inbound_source()),
    );
    let (stream, client) = arrival(&app, "deliver");
    assert_eq!(client.ip(), p.fam.inbound_source());
    drop(stream);
    finish(child);

    // Skipped inbound ports stay skipped for the proxy's own calls too.
    let child = p.dial_as(PROXY_UID, p.net.pod, ADMIN, "admin", None);
    drop(arrival(&admin, "admin"));
    finish(child);

    // The app calling its own pod IP talks to itself directly.
    let child = p.dial_as(APP_UID, p.net.pod, 8080, "app to itself", None);
    drop(arrival(&app, "app to itself"));
    finish(child);
    assert_nothing_at(&inbound);
}

test_cases!(for [v4: Fam::V4, v6: Fam::V6]
    outbound_is_redirected_with_original_destination,
    proxy_uid_reaches_the_destination_directly,
    skipped_ports_subnets_and_loopback_are_not_captured,
    include_subnets_limit_capture,
    inbound_is_redirected_and_admin_is_not,
    proxy_calling_its_own_pod_goes_through_inbound,

);

// ---- lifecycle: idempotence, dry run, cleanup, atomicity, both backends ----

fn tool(mode: Mode, fam: Fam, verb: &str) -> String {
    let program = match fam {
        Fam::V4 => "iptables",
        Fam::V6 => "ip6tables",
    };
    match verb {
        "" => format!("{program}-{mode}"),
        verb => format!("{program}-{mode}-{verb}"),
    }
}

/// `iptables-save` and `ip6tables-save` of `mode`, without comments and counters.
fn snapshot(ns: &Namespace, mode: Mode) -> String {
    let mut out = String::new();
    for fam in [Fam::V4, Fam::V6] {
        let save = ns.exec(&tool(mode, fam, "save"), &[] as &[&str]).unwrap();
        for line in save.lines().filter(|l| !l.starts_with('#')) {
            let line = match line.rfind(" [") {
                Some(i) if line.starts_with(':') => &line[..i],
                _ => line,
            };
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("----\n");
    }
    out
}

fn add_foreign_rules(ns: &Namespace, mode: Mode) {
    for fam in [Fam::V4, Fam::V6] {
        let t = tool(mode, fam, "");
        for args in [
            &["-t", "nat", "-N", "FOREIGN"][..],
            &["-t", "nat", "-A", "FOREIGN", "-j", "RETURN"],
            &["-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "FOREIGN"],
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "9",
                "-j",
                "RETURN",
            ],
            &[
                "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT",
            ],
        ] {
            ns.exec(&t, args).unwrap();
        }
    }
}

fn lifecycle(mode: Mode) {
    let p = Pod::new(Fam::V6);
    let other = match mode {
        Mode::Nft => Mode::Legacy,
        Mode::Legacy => Mode::Nft,
    };
    add_foreign_rules(&p.pod, mode);
    let before = snapshot(&p.pod, mode);
    let other_before = snapshot(&p.pod, other);
    assert!(!before.contains("ISTHMUS"));

    // `auto` finds the backend the foreign rules live in.
    p.init(&["--backend", "auto"]);
    let first = snapshot(&p.pod, mode);
    assert_eq!(
        snapshot(&p.pod, other),
        other_before,
        "the other backend is untouched"
    );
    for chain in rules::CHAINS {
        assert_eq!(
            first.matches(&format!(":{chain} -")).count(),
            2,
            "{chain} in both families:\n{first}"
        );
    }
    assert!(first.contains("-A FOREIGN -j RETURN"));
    assert!(first.contains("-A PREROUTING -p tcp -m tcp --dport 9 -j RETURN"));

    p.init(&["--backend", &mode.to_string()]);
    assert_eq!(
        snapshot(&p.pod, mode),
        first,
        "a second run changes nothing"
    );

    // A dry run, even of different settings or of a cleanup, changes nothing.
    let dry = p.init(&[
        "--dry-run",
        "--outbound-port",
        "5000",
        "--backend",
        &mode.to_string(),
    ]);
    assert!(dry.contains("--to-ports 5000"), "{dry}");
    assert!(
        !dry.contains("-A PREROUTING") && !dry.contains("-A OUTPUT"),
        "jumps exist already, a run would not add them:\n{dry}"
    );
    p.init(&["--dry-run", "--cleanup"]);
    assert_eq!(snapshot(&p.pod, mode), first, "a dry run changes nothing");

    // Without --ipv6, a cleanup still removes the IPv6 capture.
    p.pod
        .exec(p.init.to_str().unwrap(), &["--cleanup"])
        .unwrap();
    assert_eq!(
        snapshot(&p.pod, mode),
        before,
        "cleanup leaves exactly the rules that were there before"
    );
    let again = p.init(&["--cleanup", "--backend", &mode.to_string()]);
    assert!(again.contains("no capture rules to remove"), "{again}");
    assert_eq!(snapshot(&p.pod, mode), before);
}

test_cases!(lifecycle {
    apply_twice_dry_run_and_cleanup_nft: Mode::Nft,
    apply_twice_dry_run_and_cleanup_legacy: Mode::Legacy,
});

/// A restore that fails at its last line leaves the previous rules as they were.
fn failing_restore_changes_nothing(mode: Mode) {
    let p = Pod::new(Fam::V4);
    p.init(&["--backend", &mode.to_string()]);
    let before = snapshot(&p.pod, mode);

    let result = p.pod.run(|| {
        let tools = backend::locate(mode, Family::V4).unwrap();
        let state: NatState = apply::save_nat(&tools).unwrap();
        let config = Config {
            outbound_port: 5000,
            skip_outbound_ports: "25".parse().unwrap(),
            ..Config::default()
        };
        let text = rules::render_install(&config, Family::V4, &state);
        let late_failure = text.replace(
            "COMMIT\n",
            "-A ISTHMUS_OUTPUT -p tcp -j ISTHMUS_NO_SUCH_CHAIN\nCOMMIT\n",
        );
        assert!(late_failure.contains("NO_SUCH_CHAIN"));
        apply::run_restore(&tools, &late_failure, false)
    });
    let err = result.expect_err("a rule jumping to a missing chain must fail");
    assert!(err.to_string().contains("restore"), "{err}");
    assert_eq!(
        snapshot(&p.pod, mode),
        before,
        "the failed transaction left the rules as they were"
    );
}

test_cases!(failing_restore_changes_nothing {
    failing_restore_changes_nothing_nft: Mode::Nft,
    failing_restore_changes_nothing_legacy: Mode::Legacy,
});

#[test]
fn without_permission_it_fails_saying_so() {
    let p = Pod::new(Fam::V4);
    let init = WorldExecutable::copy(&p.init).unwrap();
    for backend in ["nft", "legacy"] {
        let mut cmd = Command::new(init.path());
        cmd.args(["--backend", backend]);
        let out = wait_with_timeout(p.pod.spawn_as(cmd, NOBODY, NOBODY).unwrap(), WAIT).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{backend}: {stderr}");
        assert!(
            stderr.contains("denied permission") && stderr.contains("CAP_NET_ADMIN"),
            "{backend}: {stderr}"
        );
    }
    assert!(!snapshot(&p.pod, Mode::Nft).contains("ISTHMUS"));
    assert!(!snapshot(&p.pod, Mode::Legacy).contains("ISTHMUS"));
}

/// When IPv6 fails after IPv4 went in on a namespace without our rules, IPv4 is
/// removed again. nft's `--test` does not resolve jump targets, so a jump to a
/// missing chain passes the pre-flight check and fails only on commit.
#[test]
fn a_late_ipv6_failure_rolls_back_ipv4() {
    let p = Pod::new(Fam::V6);
    let before = snapshot(&p.pod, Mode::Nft);
    let config = Config {
        ipv6: true,
        backend: iptables_init::config::BackendChoice::Nft,
        ..Config::default()
    };
    let err = p.pod.run(|| {
        let mut plan = apply::plan(&config, apply::Action::Install, false).unwrap();
        let v6 = plan
            .steps
            .iter_mut()
            .find(|s| s.family == Family::V6)
            .unwrap();
        let text = v6.text.take().unwrap();
        v6.text = Some(text.replace(
            "COMMIT\n",
            "-A ISTHMUS_OUTPUT -p tcp -j ISTHMUS_NO_SUCH_CHAIN\nCOMMIT\n",
        ));
        apply::execute(&plan).expect_err("the IPv6 transaction must fail")
    });
    let msg = err.to_string();
    assert!(
        msg.contains("IPv4 rules were applied but IPv6 rules were not")
            && msg.contains("removed again"),
        "{msg}"
    );
    // The nat table itself may now exist (empty): the tools create it on first use.
    let after = snapshot(&p.pod, Mode::Nft);
    assert!(
        !after.contains("ISTHMUS") && !after.contains("-A "),
        "before:\n{before}\nafter:\n{after}"
    );
}
