//! The sidecar for real: each test builds a pod namespace and a server namespace
//! joined by a veth pair, installs the capture with `isthmus-init`, starts
//! `isthmus-proxy sidecar` in the pod as the proxy UID, and sends the pod's own
//! connections (from the test process, as root, so they are captured) through it to
//! servers in the other namespace. What is checked is what an application sees:
//! bytes, half-closes, resets and timeouts, plus the sidecar's own metrics.
//!
//! Needs root (fails, with instructions, without it) and the `isthmus-init` and
//! `isthmus-proxy` binaries. `cargo test --workspace` builds them; `cargo test -p
//! isthmus-tests` alone does not, and would run whatever binaries `target` holds, so
//! build them first (`cargo build -p proxy -p iptables-init --bins`) when testing
//! this package on its own. Nothing here is mirrored: outbound connections take the
//! sidecar's passthrough path and inbound ones its plain delivery to the app (the
//! gateway tunnel has its end-to-end tests in the proxy crate).
#![allow(clippy::unwrap_used)]

use isthmus_test_support::test_cases;
use std::hash::{DefaultHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use isthmus_tests::netns::Fam;
use isthmus_tests::pod::{PodOptions, SidecarPod, metric};
use isthmus_tests::tcp::{self, WAIT};
use isthmus_tests::{h2c, identity};
use proxy_identity::mint::Validity;

mod http_traffic;
mod wire;

use wire::*;

/// The label of the sidecar's metrics for each direction.
const OUTBOUND: &str = r#"direction="outbound""#;
const INBOUND: &str = r#"direction="inbound""#;

/// Upper bound for the long tests (the bulk transfer, a thousand connections).
const LONG: Duration = Duration::from_secs(120);

/// The shared pod fixture, started for one address family, with what only this
/// suite reads of the sidecar.
struct Sidecar(SidecarPod);

impl std::ops::Deref for Sidecar {
    type Target = SidecarPod;
    fn deref(&self) -> &SidecarPod {
        &self.0
    }
}

impl Sidecar {
    /// The topology, the capture (`isthmus-init`, `--ipv6` for [`Fam::V6`]) and a
    /// ready sidecar started with `--connect-timeout 1s` and `extra` flags.
    fn start(fam: Fam, extra: &[&str]) -> Self {
        let mint = |dir: &Path| {
            identity::mint_leaf(
                dir,
                "sidecar test anchor",
                "spiffe://cluster.local/ns/default/sa/client",
                Validity::from_now(Duration::from_secs(3600)),
            )
            .unwrap();
        };
        let options = PodOptions {
            ipv6: fam == Fam::V6,
            extra,
            ..PodOptions::default()
        };
        Self(SidecarPod::start_with(mint, options).unwrap())
    }

    fn metrics(&self) -> String {
        self.curl_metrics()
    }

    /// Waits until the sidecar counted one outbound close for `reason`.
    fn expect_close(&self, reason: &str, what: &str) {
        let reason = format!(r#"reason="{reason}""#);
        self.expect_metric("tcp_close_total", &[OUTBOUND, &reason], 1.0, what);
    }

    /// Runs curl in the pod (bounded to 10s) with `args`; its output.
    fn curl(&self, args: &[&str]) -> String {
        let mut all = vec!["-sS", "--max-time", "10"];
        all.extend_from_slice(args);
        self.pod.exec("curl", &all).unwrap()
    }

    /// Fails unless each metric family with its labels is the value given already
    /// (one scrape for all): for what the sidecar counted before the client saw the
    /// outcome.
    fn assert_counts(&self, expected: &[(&str, &[&str], f64, &str)]) {
        let m = self.metrics();
        for &(family, labels, want, what) in expected {
            assert_eq!(metric(&m, family, labels), want, "{what}:\n{m}");
        }
    }

    /// Listens on the server's `port` and hands the one connection that must arrive
    /// there, with its peer, to `handle` on a thread of its own.
    fn serve<T: Send + 'static>(
        &self,
        port: u16,
        handle: impl FnOnce(TcpStream, SocketAddr) -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let listener = self.listen(port);
        std::thread::spawn(move || {
            let (stream, peer) = accept(&listener);
            handle(stream, peer)
        })
    }

    /// How many file descriptors the sidecar holds.
    fn open_fds(&self) -> usize {
        self.fds()
    }

    /// The sidecar's resident set, from `/proc/PID/status`, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{}/status", self.pid))
    }
}

// ---- 1. HTTP with curl, and the metrics that counted it ----

#[test]
fn curl_through_the_sidecar_is_proxied_and_counted() {
    let s = Sidecar::start(Fam::V4, &[]);
    let server = s.serve(8080, move |mut stream, peer| {
        let head = answer_with_request_line(
            &mut stream,
            "server saw: ",
            "content-type: text/plain\r\nconnection: close\r\n",
        );
        (head, peer)
    });

    let before = s.metrics();
    let body = s.curl(&[&format!("http://{}:8080/hello?x=1", s.server_ip)]);
    assert_eq!(body, "server saw: GET /hello?x=1 HTTP/1.1\n");
    let (head, peer) = join_within(server, WAIT, "the HTTP server");
    assert_eq!(
        peer.ip(),
        s.pod_ip,
        "the server sees the pod's own address, not a proxy's"
    );
    assert!(
        head.to_ascii_lowercase().contains("user-agent: curl/"),
        "curl's request reached the server with its headers: {head:?}"
    );

    let after = s.metrics();
    let requests = |m: &str| metric(m, "http_requests_total", &[OUTBOUND]);
    let opened = |m: &str| metric(m, "tcp_open_total", &[OUTBOUND]);
    assert_eq!(
        requests(&after) - requests(&before),
        1.0,
        "one outbound HTTP request counted:\n{after}"
    );
    assert_eq!(
        opened(&after) - opened(&before),
        1.0,
        "one outbound TCP connection counted:\n{after}"
    );
    assert!(
        metric(
            &after,
            "http_responses_total",
            &[OUTBOUND, r#"status="200""#]
        ) >= 1.0,
        "the 200 counted:\n{after}"
    );
}

// ---- 2. bulk transfer both ways ----

/// Bytes each way in the bulk test.
const BULK: usize = 100 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// Writes [`BULK`] bytes of [`write_pattern`], then closes the write side.
fn send_bulk(stream: &mut TcpStream, seed: u64) -> u64 {
    let sum = write_pattern(stream, BULK, seed);
    stream.shutdown(Shutdown::Write).unwrap();
    sum
}

/// Reads to EOF; the byte count and checksum of what arrived.
fn receive_bulk(stream: &mut TcpStream) -> (usize, u64) {
    let mut hasher = DefaultHasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        match read_uninterrupted(stream, &mut buf).unwrap() {
            0 => return (total, hasher.finish()),
            n => {
                hasher.write(&buf[..n]);
                total += n;
            }
        }
    }
}

#[test]
fn a_hundred_mebibytes_each_way_arrive_intact() {
    let s = Sidecar::start(Fam::V4, &[]);
    let server = s.serve(9000, move |stream, _| {
        let mut reader = stream.try_clone().unwrap();
        let receiving = std::thread::spawn(move || receive_bulk(&mut reader));
        let mut writer = stream;
        let sent = send_bulk(&mut writer, 0x5eed_0002);
        (sent, receiving.join().unwrap())
    });

    let started = Instant::now();
    let stream = s.connect(9000);
    let mut reader = stream.try_clone().unwrap();
    let receiving = std::thread::spawn(move || receive_bulk(&mut reader));
    let mut writer = stream;
    let client_sent = send_bulk(&mut writer, 0x5eed_0001);
    let (client_got, client_sum) = join_within(receiving, LONG, "the client's reader");
    let (server_sent, (server_got, server_sum)) = join_within(server, LONG, "the server");
    let elapsed = started.elapsed();

    assert_eq!(server_got, BULK, "bytes from the client at the server");
    assert_eq!(client_got, BULK, "bytes from the server at the client");
    assert_eq!(server_sum, client_sent, "checksum of client -> server");
    assert_eq!(client_sum, server_sent, "checksum of server -> client");
    eprintln!(
        "100 MiB each way through the sidecar in {elapsed:?} ({:.0} MiB/s per direction)",
        100.0 / elapsed.as_secs_f64()
    );
    for flow in ["to_upstream", "to_downstream"] {
        s.expect_metric(
            "tcp_transfer_bytes_total",
            &[OUTBOUND, &format!(r#"flow="{flow}""#)],
            BULK as f64,
            "bytes counted",
        );
    }
}

// ---- 3. half-close ----

#[test]
fn a_half_close_reaches_the_server_and_its_reply_still_arrives() {
    let s = Sidecar::start(Fam::V4, &[]);
    let server = s.serve(9001, move |mut stream, _| {
        // read_to_string returns only at EOF: the client's half-close must arrive.
        let request = tcp::receive(&mut stream).unwrap();
        // Written after the EOF: the other direction is still open.
        write!(stream, "reply to {request:?}").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        request
    });

    let mut stream = s.connect(9001);
    tcp::send(&mut stream, "half-closed request").unwrap();
    let reply = tcp::receive(&mut stream).unwrap();
    assert_eq!(
        join_within(server, WAIT * 2, "the server"),
        "half-closed request"
    );
    assert_eq!(reply, r#"reply to "half-closed request""#);

    // The other way round: the server finishes first, the client keeps writing.
    let server = s.serve(9011, move |mut stream, _| {
        tcp::send(&mut stream, "server done").unwrap();
        tcp::receive(&mut stream).unwrap()
    });
    let mut stream = s.connect(9011);
    stream.write_all(b"first, ").unwrap();
    assert_eq!(tcp::receive(&mut stream).unwrap(), "server done");
    // Written after the server's EOF arrived.
    tcp::send(&mut stream, "then the rest").unwrap();
    assert_eq!(
        join_within(server, WAIT * 2, "the server"),
        "first, then the rest"
    );
}

// ---- 4. a reset mid-stream ----

#[test]
fn a_server_reset_mid_stream_resets_the_client() {
    let s = Sidecar::start(Fam::V4, &[]);
    let server = s.serve(9002, move |mut stream, _| {
        assert_eq!(read_exact_string(&mut stream, 3), "go?");
        stream.write_all(&[b'x'; 1000]).unwrap();
        // Resets only once the client has the bytes, so the reset cannot overtake them.
        assert_eq!(read_exact_string(&mut stream, 3), "got");
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(stream);
        Instant::now()
    });

    let mut stream = s.connect(9002);
    // Not a method token: a lone word that could be one (`go`) waits, stalled, for
    // the request line an origin that takes any method would read.
    stream.write_all(b"go?").unwrap();
    let mut partial = [0u8; 1000];
    stream.read_exact(&mut partial).unwrap();
    assert!(partial.iter().all(|&b| b == b'x'));
    stream.write_all(b"got").unwrap();
    let end = ending(&mut stream, "after the server's reset");
    let reset_at = join_within(server, WAIT * 2, "the server");
    assert_eq!(
        end,
        Ending::Reset,
        "the server's reset reaches the client as a reset, not a clean EOF"
    );
    eprintln!(
        "the client saw the reset {:?} after the server sent it",
        reset_at.elapsed()
    );

    // And the other way: the client's reset reaches the server as a reset.
    let server = s.serve(9012, move |mut stream, _| {
        assert_eq!(read_exact_string(&mut stream, 3), "go?");
        stream.write_all(b"ok").unwrap();
        ending(&mut stream, "the server after the client's reset")
    });
    let mut stream = s.connect(9012);
    stream.write_all(b"go?").unwrap();
    assert_eq!(read_exact_string(&mut stream, 2), "ok");
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    assert_eq!(
        join_within(server, WAIT * 2, "the server"),
        Ending::Reset,
        "the client's reset reaches the server as a reset, not a clean EOF"
    );
    for reason in ["upstream_reset", "downstream_reset"] {
        s.expect_close(reason, "one close counted with the side that reset");
    }
}

// ---- 5. unreachable destinations ----

#[test]
fn an_unreachable_destination_fails_the_client_promptly() {
    // A detection window longer than any wait here: the client below waits for the
    // server without sending, so only the refusal itself may end its connection.
    let s = Sidecar::start(Fam::V4, &["--detect-timeout", "30s"]);
    // Black hole: the server namespace drops SYNs to this port, so only the
    // sidecar's --connect-timeout (1s) ends the attempt.
    s.server
        .exec(
            "iptables",
            &["-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "DROP"],
        )
        .unwrap();

    for (port, reason) in [(9, "upstream_refused"), (9999, "upstream_timeout")] {
        let started = Instant::now();
        let addr = SocketAddr::new(s.server_ip, port);
        // The reset can beat the client's own connect call (its handshake was with
        // the sidecar): then connect itself reports it.
        let end = match s.pod.run(|| tcp::connect(addr)) {
            Ok(mut stream) => ending(&mut stream, &format!("a connection to port {port}")),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ending::Reset,
            Err(e) => panic!("connecting from the pod to {addr}: {e}"),
        };
        eprintln!(
            "port {port} ({reason}): {end:?} after {:?}",
            started.elapsed()
        );
        assert_eq!(
            end,
            Ending::Reset,
            "port {port}: refused promptly with a reset"
        );
        s.expect_close(reason, "the refusal counted with its reason");
    }
}

// ---- 6. idle timeout ----

#[test]
fn an_idle_connection_is_closed_by_the_proxy() {
    let s = Sidecar::start(Fam::V4, &["--idle-timeout", "2s"]);
    let server = s.serve(9003, move |mut stream, _| {
        // Longer than the client waits below: the server never ends it first.
        stream.set_read_timeout(Some(WAIT * 3)).unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&buf).unwrap();
        // The server idles too; what ends the connection is the proxy.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).map(|_| rest)
    });

    let mut stream = s.connect(9003);
    stream.write_all(b"ping?").unwrap();
    assert_eq!(read_exact_string(&mut stream, 5), "ping?");
    closed_when_idle(&mut stream, "an idle connection");
    // The server's side is closed as well (reset or EOF, never left open).
    let server_end = join_within(server, WAIT * 4, "the server");
    assert!(
        server_end.as_ref().map_or(true, |rest| rest.is_empty()),
        "the server got bytes after the echo: {server_end:?}"
    );
    s.expect_close("idle_timeout", "the close counted as an idle timeout");
}

/// Waits for the proxy to end `stream` (`what`), idle on both sides, and checks it
/// waited for its 2s idle timeout first.
fn closed_when_idle(stream: &mut TcpStream, what: &str) {
    let idle_from = Instant::now();
    let end = ending(stream, &format!("{what} (closed by the proxy within 5s?)"));
    let idle = idle_from.elapsed();
    eprintln!("{what} ended ({end:?}) after {idle:?}");
    assert!(
        idle >= Duration::from_millis(1500),
        "closed after {idle:?}: sooner than the 2s idle timeout"
    );
}

// ---- 7. a thousand concurrent connections ----

#[test]
fn a_thousand_concurrent_connections_are_all_served() {
    const CONNECTIONS: usize = 1000;
    let s = Sidecar::start(Fam::V4, &[]);
    let rss_idle = s.rss_kib();
    let fds_idle = s.open_fds();
    let server = echo_server(s.listen(9004), CONNECTIONS);

    let started = Instant::now();
    let mut streams = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        assert!(
            started.elapsed() < LONG,
            "opening connections took over {LONG:?}"
        );
        let mut stream = s.connect(9004);
        writeln!(stream, "connection {i:04}").unwrap();
        streams.push(stream);
    }
    // Every connection is open at once: all were opened before any is read.
    for (i, stream) in streams.iter_mut().enumerate() {
        let want = format!("connection {i:04}\n");
        assert_eq!(read_exact_string(stream, want.len()), want);
    }
    s.assert_counts(&[(
        "tcp_open_connections",
        &[OUTBOUND],
        CONNECTIONS as f64,
        "the sidecar holds every connection open",
    )]);
    let rss = s.rss_kib();
    eprintln!(
        "{CONNECTIONS} connections echoed in {:?}; sidecar RSS {} KiB idle, {} KiB with them open",
        started.elapsed(),
        rss_idle,
        rss
    );
    assert!(
        rss < 200 * 1024,
        "sidecar RSS {rss} KiB with {CONNECTIONS} connections (bound 200 MiB)"
    );
    for stream in &streams {
        stream.shutdown(Shutdown::Write).unwrap();
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        assert_eq!(
            ending(stream, &format!("connection {i} after its half-close")),
            Ending::Eof
        );
    }
    let peers = join_within(server, LONG, "the echo server");
    assert_eq!(peers.len(), CONNECTIONS);
    assert!(peers.iter().all(|p| p.ip() == s.pod_ip));
    drop(streams);

    // Nothing is left behind: no connection counted open, no socket or pipe kept.
    s.expect_metric(
        "tcp_open_connections",
        &[OUTBOUND],
        0.0,
        "every connection counted closed",
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let fds = s.open_fds();
        // The slack covers the admin connection of the metrics scrape.
        if fds <= fds_idle + 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar holds {fds} descriptors after its connections closed, {fds_idle} before"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- 8. server speaks first ----

/// A server that greets first, then answers one line.
fn banner_server(s: &Sidecar, port: u16) -> JoinHandle<String> {
    s.serve(port, move |mut stream, _| {
        stream.write_all(b"220 banner first\r\n").unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            assert_eq!(
                read_uninterrupted(&mut stream, &mut byte).unwrap(),
                1,
                "client closed early"
            );
            line.push(byte[0]);
        }
        stream.write_all(b"250 ok\r\n").unwrap();
        String::from_utf8(line).unwrap()
    })
}

#[test]
fn a_server_that_speaks_first_is_served() {
    let s = Sidecar::start(Fam::V4, &[]);
    // 25 is one of the default --opaque-ports (no detection); 2525 is not, so there
    // the sidecar must give up waiting for the client after --detect-timeout.
    for port in [25, 2525] {
        let server = banner_server(&s, port);
        let mut stream = s.connect(port);
        let started = Instant::now();
        let banner = read_exact_string(&mut stream, "220 banner first\r\n".len());
        let waited = started.elapsed();
        assert_eq!(banner, "220 banner first\r\n", "port {port}");
        stream.write_all(b"EHLO pod\r\n").unwrap();
        assert_eq!(
            read_exact_string(&mut stream, 8),
            "250 ok\r\n",
            "port {port}"
        );
        assert_eq!(
            join_within(server, WAIT, "the banner server"),
            "EHLO pod\r\n"
        );
        eprintln!("port {port}: banner after {waited:?}");
    }
}

// ---- 10. IPv6 ----

#[test]
fn tcp_over_ipv6_goes_through_the_sidecar() {
    let s = Sidecar::start(Fam::V6, &[]);
    let server = echo_server(s.listen(9005), 1);
    let mut stream = s.connect(9005);
    stream.write_all(b"over ipv6").unwrap();
    assert_eq!(read_exact_string(&mut stream, 9), "over ipv6");
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(ending(&mut stream, "after the half-close"), Ending::Eof);
    let peers = join_within(server, WAIT, "the echo server");
    assert_eq!(
        peers[0].ip(),
        s.pod_ip,
        "the server sees the pod's IPv6 address"
    );
    s.assert_counts(&[(
        "tcp_open_total",
        &[OUTBOUND],
        1.0,
        "the IPv6 connection went through the sidecar",
    )]);

    // HTTP over IPv6 too, with curl.
    let server = s.serve(8080, move |mut stream, peer| {
        let head = read_head(&mut stream).unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nv6\n")
            .unwrap();
        (head, peer)
    });
    let body = s.curl(&["http://[2001:2::1]:8080/six"]);
    assert_eq!(body, "v6\n");
    let (head, peer) = join_within(server, WAIT, "the HTTP server");
    assert!(head.starts_with("GET /six HTTP/1.1"), "{head:?}");
    assert_eq!(peer.ip(), s.pod_ip);
    s.assert_counts(&[(
        "http_requests_total",
        &[OUTBOUND],
        1.0,
        "the IPv6 request counted",
    )]);
}

// ---- inbound: plain TCP from outside the pod to its app ----

fn inbound_plain_tcp_reaches_the_app_through_the_sidecar(fam: Fam) {
    let s = Sidecar::start(fam, &[]);
    // The app listens on every address of the pod, as most do.
    let any = fam.any();
    let app = s
        .pod
        .run(|| tcp::listen(SocketAddr::new(any, 8080)))
        .unwrap();
    let app_side = std::thread::spawn(move || {
        let (mut stream, peer) = accept(&app);
        let request = tcp::receive(&mut stream).unwrap();
        write!(stream, "app got {request:?}").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        peer
    });
    let pod_addr = SocketAddr::new(s.pod_ip, 8080);
    let mut stream = s
        .server
        .run(|| tcp::connect(pod_addr))
        .unwrap_or_else(|e| panic!("connecting from the server namespace to {pod_addr}: {e}"));
    tcp::send(&mut stream, "from outside").unwrap();
    assert_eq!(
        tcp::receive(&mut stream).unwrap(),
        r#"app got "from outside""#
    );
    let peer = join_within(app_side, WAIT, "the app");
    assert_eq!(
        peer.ip(),
        fam.inbound_source(),
        "the app is reached by the sidecar from its inbound source"
    );
    s.assert_counts(&[
        (
            "tcp_open_total",
            &[INBOUND],
            1.0,
            "the connection went through the inbound listener",
        ),
        (
            "tcp_open_total",
            &[OUTBOUND],
            0.0,
            "the app's reply did not loop through outbound",
        ),
    ]);
}

test_cases!(inbound_plain_tcp_reaches_the_app_through_the_sidecar {
    inbound_plain_tcp_reaches_the_app_through_the_sidecar_v4: Fam::V4,
    inbound_plain_tcp_reaches_the_app_through_the_sidecar_v6: Fam::V6,
});

/// Writes `len` bytes (a multiple of [`CHUNK`]): a pseudo-random block whose first
/// 8 bytes carry the chunk's index, so a lost, repeated or reordered chunk changes
/// the checksum. Returns the checksum of what was written.
fn write_pattern(stream: &mut TcpStream, len: usize, seed: u64) -> u64 {
    let mut block = vec![0u8; CHUNK];
    let mut x = seed | 1;
    for byte in block.iter_mut() {
        // xorshift64: cheap, deterministic, not compressible by anything on the path.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    let mut hasher = DefaultHasher::new();
    for i in 0..len / CHUNK {
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        stream.write_all(&block).unwrap();
        hasher.write(&block);
    }
    hasher.finish()
}

/// Reads exactly `len` bytes; their checksum.
fn read_pattern(stream: &mut TcpStream, len: usize) -> u64 {
    let mut hasher = DefaultHasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = read_uninterrupted(stream, &mut buf[..left.min(CHUNK)]).unwrap();
        assert!(n > 0, "EOF with {left} of {len} body bytes missing");
        hasher.write(&buf[..n]);
        left -= n;
    }
    hasher.finish()
}

// ---- shutdown ----

#[test]
fn sigterm_drains_open_connections_and_stops_accepting() {
    let s = Sidecar::start(Fam::V4, &["--shutdown-grace", "20s"]);
    let server = echo_server(s.listen(9006), 1);
    let mut stream = s.connect(9006);
    stream.write_all(b"before:").unwrap();
    assert_eq!(read_exact_string(&mut stream, 7), "before:");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(s.pid).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // New connections are no longer taken: the capture still sends them to the
    // outbound port, where nothing listens once the listener closed.
    let addr = SocketAddr::new(s.server_ip, 9006);
    let deadline = Instant::now() + WAIT;
    loop {
        match s.pod.run(|| tcp::connect(addr)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "connections still accepted {WAIT:?} after SIGTERM: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // The open connection keeps working through the grace period...
    stream.write_all(b"after").unwrap();
    assert_eq!(read_exact_string(&mut stream, 5), "after");
    assert!(
        s.running(),
        "the sidecar exited with a connection still open"
    );
    // ...and once it closes, the sidecar exits without waiting out the grace.
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(ending(&mut stream, "after the half-close"), Ending::Eof);
    join_within(server, WAIT, "the echo server");
    let deadline = Instant::now() + WAIT;
    while s.running() {
        assert!(
            Instant::now() < deadline,
            "the sidecar still runs {WAIT:?} after its last connection closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
