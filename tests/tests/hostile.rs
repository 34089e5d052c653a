//! Hostile input against the real sidecar behind the real capture: malformed and
//! oversize HTTP/1 heads, an oversize HTTP/2 header list, slowloris and silent
//! clients on the transparent (outbound) path, and the TLS policy of the inbound
//! mesh port.
//!
//! What the transparent path answers (ARCHITECTURE.md, "Limits and hostile input"):
//! a connection whose request line detection recognised as HTTP is parsed by the
//! sidecar, so a head it cannot parse gets `400` (`431` when too large) from the
//! sidecar itself and never reaches the app. Detection recognises whatever a
//! lenient origin would read as a request (an odd method or version, a request
//! line over 8 KiB included); only what no HTTP server reads as a request is
//! opaque and passes through untouched, as any TCP does.
//!
//! Each test asserts the answer within a generous bound, that a bystander is still
//! served, and that the sidecar's descriptors return to their baseline. Needs root
//! and the `isthmus-init` and `isthmus-proxy` binaries (see `sidecar.rs`).
#![allow(clippy::unwrap_used)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus_tests::pod::{self, PodOptions, SidecarPod};
use isthmus_tests::tcp::{self, WAIT, closed_within, read_response};
use isthmus_tests::tls_probe::{handshake_over, probe_config};
use isthmus_tests::{h2c, identity};
use isthmus_vocab::SpiffeId;
use proxy_identity::mint::{self, KeyAlgorithm, Validity};
use proxy_identity::rustls::pki_types::ServerName;
use proxy_identity::rustls::{self, ClientConfig, ClientConnection};

/// Bound on "the proxy closed it": several times any timeout the tests set.
const CLOSE_BOUND: Duration = Duration::from_secs(20);
const ORIGIN_PORT: u16 = 8080;

/// The shared pod fixture, with the issuer of the pod's identity (for client
/// leaves) and what only this suite checks.
struct Sidecar {
    fixture: SidecarPod,
    issuer: mint::CertificateAuthority,
    validity: Validity,
}

impl std::ops::Deref for Sidecar {
    type Target = SidecarPod;
    fn deref(&self) -> &SidecarPod {
        &self.fixture
    }
}

impl Sidecar {
    fn start(extra: &[&str]) -> Self {
        let validity = Validity::from_now(Duration::from_secs(3600));
        let mut issuer = None;
        let mint = |identity: &Path| {
            issuer = Some(
                identity::mint_leaf(
                    identity,
                    "hostile test anchor",
                    "spiffe://cluster.local/ns/default/sa/app",
                    validity,
                )
                .unwrap(),
            );
        };
        let options = PodOptions {
            log: "info,proxy_core=debug",
            extra,
            ..PodOptions::default()
        };
        let fixture = SidecarPod::start_with(mint, options).unwrap();
        Self {
            fixture,
            issuer: issuer.unwrap(),
            validity,
        }
    }

    fn metrics(&self) -> String {
        self.curl_metrics()
    }

    /// Waits (bounded) until the sidecar holds no more descriptors than `baseline`.
    fn fds_return_to(&self, baseline: usize) {
        pod::fds_return_to(self.pid, baseline, CLOSE_BOUND, "the sidecar");
    }

    /// A plain `GET /` through the sidecar that must be answered 200.
    fn bystander_served(&self) {
        let mut stream = self.connect(ORIGIN_PORT);
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: origin\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
}

/// Every byte each connection brought to the origin, in accept order.
type Received = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

/// An HTTP/1.1 origin: answers `200 ok` to each complete head and records every
/// byte it receives. Runs (bounded) until the returned flag is set.
fn origin(listener: TcpListener) -> (Received, Arc<AtomicBool>) {
    let received: Received = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (all, done) = (received.clone(), stop.clone());
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
            let Ok(Some((mut stream, _))) =
                tcp::accept_within(&listener, Duration::from_millis(100))
            else {
                continue;
            };
            let log = Arc::new(Mutex::new(Vec::new()));
            all.lock().unwrap().push(log.clone());
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                    head.extend_from_slice(&buf[..n]);
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (received, stop)
}

fn bytes_received(received: &Received) -> Vec<Vec<u8>> {
    received
        .lock()
        .unwrap()
        .iter()
        .map(|log| log.lock().unwrap().clone())
        .collect()
}

/// A sidecar started with `flags` (split on spaces), the origin on [`ORIGIN_PORT`]
/// behind it, a bystander served, and the sidecar's descriptors then.
fn with_origin(flags: &str) -> (Sidecar, Received, Arc<AtomicBool>, usize) {
    let flags: Vec<&str> = flags.split(' ').collect();
    let s = Sidecar::start(&flags);
    let (received, stop) = origin(s.listen(ORIGIN_PORT));
    s.bystander_served();
    let baseline = s.fds();
    (s, received, stop, baseline)
}

#[test]
fn malformed_http1_is_answered_by_the_sidecar_and_unrecognised_bytes_pass_through() {
    let (s, received, stop, baseline) =
        with_origin("--http1-max-headers 50 --http1-max-head-bytes 16384");

    let line = |rest: &str| format!("GET / HTTP/1.1\r\n{rest}\r\n").into_bytes();
    let parsed: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a bare CR", line("host: x\rfoo: bar\r\n"), "400"),
        (
            "a bare LF line with a NUL",
            line("host: x\nx-a: b\0c\r\n"),
            "400",
        ),
        ("obs-fold", line("host: x\r\nx-a: b\r\n  folded\r\n"), "400"),
        ("a space before the colon", line("host : x\r\n"), "400"),
        (
            "a bad method",
            b"G(T / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "a bad version",
            b"GET / HTTP/9.7\r\nhost: x\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "an empty line and a bare CR in the target",
            b"\r\nGET /a\rb HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            "400",
        ),
        (
            "one huge header",
            line(&format!("host: x\r\nx-big: {}\r\n", "b".repeat(20_000))),
            "431",
        ),
        (
            "thousands of small headers",
            line(&format!("host: x\r\n{}", "x-h: 1\r\n".repeat(3000))),
            "431",
        ),
        (
            "more headers than --http1-max-headers",
            line(&format!("host: x\r\n{}", "x-h: 1\r\n".repeat(60))),
            "431",
        ),
    ];
    let before = bytes_received(&received).len();
    for (what, request, status) in &parsed {
        let mut stream = s.connect(ORIGIN_PORT);
        let _ = stream.write_all(request);
        let answer = closed_within(&mut stream, CLOSE_BOUND, what);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: expected {status}, got {answer:?}"
        );
    }
    // The sidecar connects upstream while it detects, so the origin saw these
    // connections, but not one byte of what the sidecar refused.
    for bytes in &bytes_received(&received)[before..] {
        assert!(
            bytes.is_empty(),
            "the app got bytes of a refused head: {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        );
    }

    // What no HTTP server reads as a request: forwarded as opaque bytes, untouched
    // (the origin here answers any blank-line-terminated text).
    let unrecognised: Vec<(&str, Vec<u8>)> = vec![
        (
            "an SSH banner",
            b"SSH-2.0-OpenSSH_9.6\r\nhost: x\r\n\r\n".to_vec(),
        ),
        ("a memcached get", b"get key\r\nhost: x\r\n\r\n".to_vec()),
        (
            "a line with no version and no path",
            b"HELLO there\r\nhost: x\r\n\r\n".to_vec(),
        ),
    ];
    for (what, request) in &unrecognised {
        let before = bytes_received(&received).len();
        let mut stream = s.connect(ORIGIN_PORT);
        stream.write_all(request).unwrap();
        // Our origin answers any head; what matters is that it got the exact bytes.
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200", "{what}");
        let got = bytes_received(&received)[before..].concat();
        assert_eq!(got, *request, "{what}: the app got other bytes");
    }

    s.bystander_served();
    s.fds_return_to(baseline);
    stop.store(true, Ordering::SeqCst);
}

#[test]
fn slowloris_and_silent_clients_are_closed_by_their_timeouts_while_others_are_served() {
    let (s, _received, stop, baseline) =
        with_origin("--header-read-timeout 2s --detect-timeout 500ms --idle-timeout 4s");

    // A keep-alive connection idle between requests is the idle timeout's, not
    // the header timeout's: it serves a second request after 3 s of quiet.
    let mut keep = s.connect(ORIGIN_PORT);
    keep.write_all(b"GET / HTTP/1.1\r\nhost: origin\r\n\r\n")
        .unwrap();
    let first = read_response(&mut keep, WAIT);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    // Slowloris: a request line, then a header byte every 500 ms.
    let mut slow = s.connect(ORIGIN_PORT);
    slow.set_nodelay(true).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: origin\r\nx-slow: ")
        .unwrap();
    let started = Instant::now();
    let cut = loop {
        std::thread::sleep(Duration::from_millis(500));
        if slow.write_all(b"a").is_err() {
            break true;
        }
        slow.set_nonblocking(true).unwrap();
        let mut probe = [0u8; 64];
        let gone = matches!(slow.read(&mut probe), Ok(0))
            || matches!(slow.read(&mut probe), Err(ref e) if e.kind() == io::ErrorKind::ConnectionReset);
        slow.set_nonblocking(false).unwrap();
        if gone {
            break true;
        }
        if started.elapsed() > CLOSE_BOUND {
            break false;
        }
        s.bystander_served();
    };
    assert!(cut, "a trickled head was not cut within {CLOSE_BOUND:?}");

    keep.write_all(b"GET / HTTP/1.1\r\nhost: origin\r\n\r\n")
        .unwrap();
    let second = read_response(&mut keep, WAIT);
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "idle keep-alive: {second}"
    );
    drop(keep);

    // Silence during detection: after --detect-timeout the connection is opaque
    // (a server-speaks-first protocol would now be served); silent both ways, it
    // is closed by --idle-timeout.
    let mut silent = s.connect(ORIGIN_PORT);
    s.bystander_served();
    closed_within(&mut silent, CLOSE_BOUND, "a silent client");
    drop((slow, silent));

    s.bystander_served();
    s.fds_return_to(baseline);
    let metrics = s.metrics();
    assert!(metrics.contains("header_timeout"), "{metrics}");
    assert!(metrics.contains("idle_timeout"), "{metrics}");
    stop.store(true, Ordering::SeqCst);
}

/// An h2c origin answering every stream 200, until `stop` is set (bounded).
fn h2_origin(listener: TcpListener, stop: Arc<AtomicBool>) {
    h2c::spawn_server(
        listener,
        Duration::from_secs(120),
        move |listener| async move {
            while !stop.load(Ordering::SeqCst) {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        let response = http::Response::builder().status(200).body(()).unwrap();
                        let _ = respond.send_response(response, true);
                    }
                });
            }
        },
    );
}

#[test]
fn an_http2_header_list_over_the_limit_is_refused_and_the_connection_lives_on() {
    let s = Sidecar::start(&["--h2-max-header-list-size", "4096"]);
    let stop = Arc::new(AtomicBool::new(false));
    h2_origin(s.listen(ORIGIN_PORT), stop.clone());
    let addr = SocketAddr::new(s.server_ip, ORIGIN_PORT);
    let baseline = s.fds();
    let (big, normal) = s.pod.run(|| {
        h2c::block_on(WAIT * 2, "the h2 exchange", async {
            let (client, driver) = h2c::connect(addr).await;
            let mut client = client.ready().await.unwrap();
            let request = http::Request::get(format!("http://{addr}/big"))
                .header("x-padding", "p".repeat(6000))
                .body(())
                .unwrap();
            let (response, _) = client.send_request(request, true).unwrap();
            let big = match response.await {
                Ok(response) => format!("status {}", response.status().as_u16()),
                Err(e) => format!("reset: {:?}", e.reason()),
            };
            let mut client = client.ready().await.unwrap();
            let request = http::Request::get(format!("http://{addr}/ok"))
                .body(())
                .unwrap();
            let (response, _) = client.send_request(request, true).unwrap();
            let normal = response.await.map(|r| r.status().as_u16());
            drop(client);
            driver.abort();
            (big, normal)
        })
    });
    // h2 answers a header list over SETTINGS_MAX_HEADER_LIST_SIZE with 431 and
    // resets the stream; the app never sees the request.
    assert_eq!(big, "status 431", "an oversize header list");
    assert_eq!(
        normal.unwrap(),
        200,
        "the next stream on the same connection"
    );
    s.fds_return_to(baseline);
    stop.store(true, Ordering::SeqCst);
}

/// A handshake over `sock`, then the server's first bytes (its HTTP/2 SETTINGS, or
/// a late alert). `Ok` when served.
fn handshake(sock: TcpStream, config: Arc<ClientConfig>, peer: IpAddr) -> Result<(), String> {
    let conn = ClientConnection::new(config, ServerName::IpAddress(peer.into())).unwrap();
    handshake_over(sock, conn, WAIT).map(drop)
}

#[test]
fn the_inbound_mesh_port_refuses_tls12_plaintext_certless_and_slow_clients() {
    let s = Sidecar::start(&["--tls-handshake-timeout", "2s"]);
    let peer_leaf = mint::leaf(
        &s.issuer,
        &SpiffeId::parse("spiffe://cluster.local/ns/isthmus-multicluster/sa/gateway").unwrap(),
        s.validity,
        KeyAlgorithm::EcdsaP256,
    )
    .unwrap();
    let (good, _) = probe_config(&[&rustls::version::TLS13], Some(&peer_leaf)).unwrap();
    handshake(s.connect_inbound(), good.clone(), s.pod_ip).unwrap();
    let baseline = s.fds();

    let (tls12, seen) = probe_config(&[&rustls::version::TLS12], Some(&peer_leaf)).unwrap();
    let err = handshake(s.connect_inbound(), tls12, s.pod_ip).unwrap_err();
    assert!(err.contains("AlertReceived(ProtocolVersion)"), "{err}");
    assert!(
        !seen.load(Ordering::SeqCst),
        "a TLS 1.2 client saw our certificate"
    );

    let (certless, _) = probe_config(&[&rustls::version::TLS13], None).unwrap();
    let err = handshake(s.connect_inbound(), certless, s.pod_ip).unwrap_err();
    assert!(err.contains("AlertReceived(CertificateRequired)"), "{err}");

    let mut plain = s.connect_inbound();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
        .unwrap();
    let answer = closed_within(&mut plain, CLOSE_BOUND, "plaintext on the mesh port");
    assert!(answer.is_empty() || answer[0] == 0x15, "{answer:?}");

    // Silent and truncated handshakes: closed (the silent one by the handshake
    // timeout) while a real peer is served meanwhile.
    let mut silent = s.connect_inbound();
    let mut truncated = s.connect_inbound();
    truncated
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    truncated.shutdown(Shutdown::Write).unwrap();
    handshake(s.connect_inbound(), good.clone(), s.pod_ip).unwrap();
    closed_within(&mut truncated, CLOSE_BOUND, "a truncated handshake");
    closed_within(&mut silent, CLOSE_BOUND, "a silent mesh client");
    drop((plain, silent, truncated));

    handshake(s.connect_inbound(), good, s.pod_ip).unwrap();
    s.fds_return_to(baseline);
    let metrics = s.metrics();
    assert!(metrics.contains("tls_handshake_timeout"), "{metrics}");
}
