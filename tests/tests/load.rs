//! Load on the real sidecar under capture, in network namespaces:
//!
//! - a connection storm past `--max-connections`: the excess is reset promptly
//!   while the established connections keep working;
//! - 10,000 idle connections held at once, and 1,000 HTTP/2 connections with 100
//!   open streams each, with the sidecar's memory per connection and per stream
//!   (printed as figures, never asserted: the machine is shared);
//! - 5,000 distinct authorities: the `/metrics` label set stays within its cap.
//!
//! Every loop is bounded in count and time. Figures print as `FIGURE name = value`
//! lines for `tests/figures`. Needs root, like every test here.
#![allow(clippy::unwrap_used)]

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use isthmus_tests::figure::figure;
use isthmus_tests::h2c;
use isthmus_tests::identity;
use isthmus_tests::pod::{self, SidecarPod, metric};
use isthmus_tests::tcp::{self, read_once};
use tokio_util::sync::CancellationToken;

/// Upper bound of each load phase.
const PHASE: Duration = Duration::from_secs(120);

/// Writes the client pod's identity into `dir`.
fn mint_pod(dir: &Path) {
    identity::mint_pod(dir, "load anchor").unwrap();
}

fn echo_round_trip(stream: &mut TcpStream, token: &str) {
    stream.write_all(token.as_bytes()).unwrap();
    let mut back = vec![0u8; token.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, token.as_bytes());
}

/// The sidecar's RSS once it has settled: the largest of a few samples a short
/// while apart, so allocator work still in flight is counted.
fn settled_rss(s: &SidecarPod) -> u64 {
    let mut rss = 0;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        rss = rss.max(pod::rss_kib(s.pid).unwrap());
    }
    rss
}

// ---- a connection storm ----

#[test]
fn a_connection_storm_past_the_limit_is_refused_while_established_ones_carry_on() {
    const LIMIT: usize = 50;
    const STORM: usize = 500;
    let s = SidecarPod::start(mint_pod, &["--max-connections", "50"]).unwrap();
    tcp::echo_forever(
        s.server.run(|| tcp::listen(s.server_addr(9100))).unwrap(),
        PHASE,
    );
    let target = s.server_addr(9100);
    let mut established: Vec<TcpStream> = (0..LIMIT)
        .map(|i| {
            let mut stream = s.pod.run(|| tcp::connect(target)).unwrap();
            echo_round_trip(&mut stream, &format!("held {i:03}\n"));
            stream
        })
        .collect();

    // The storm: every connection opened before any is read, from four threads.
    let started = Instant::now();
    let storm: Vec<TcpStream> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    s.pod.run(|| {
                        (0..STORM / 4)
                            .map(|_| tcp::connect(target))
                            .collect::<Vec<_>>()
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .filter_map(Result::ok)
            .collect()
    });
    let opened = started.elapsed();
    // While the excess is being refused, the established connections still work.
    for (i, stream) in established.iter_mut().enumerate().step_by(5) {
        echo_round_trip(stream, &format!("during {i:03}\n"));
    }
    let mut refused = STORM - storm.len();
    let mut slowest = opened;
    let mut served = 0;
    for mut stream in storm {
        let _ = stream.write_all(b"storm\n");
        let mut buf = [0u8; 16];
        // The read timeout (WAIT) turns a hang into a failure.
        match read_once(&mut stream, &mut buf) {
            Ok(0) => refused += 1,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => refused += 1,
            Ok(_) => served += 1,
            Err(e) => panic!("a storm connection neither served nor refused: {e}"),
        }
        slowest = slowest.max(started.elapsed());
    }
    for (i, stream) in established.iter_mut().enumerate() {
        echo_round_trip(stream, &format!("after {i:03}\n"));
    }
    let metrics = s.metrics().unwrap();
    let counted = metric(
        &metrics,
        "tunnel_refusals_total",
        &[r#"reason="max_connections""#],
    );
    figure(
        "storm_refused",
        format!(
            "{refused} of {STORM} over a limit of {LIMIT} ({served} served), all ended within {} ms",
            slowest.as_millis()
        ),
    );
    assert_eq!(
        served, 0,
        "connections past the limit were served while {LIMIT} were held"
    );
    assert_eq!(refused, STORM);
    assert!(
        counted >= STORM as f64,
        "refusals counted: {counted}\n{metrics}"
    );
    assert!(slowest < PHASE, "the storm took {slowest:?}");
    assert!(s.running());
}

// ---- memory per idle connection ----

#[test]
fn ten_thousand_idle_connections_are_held_and_their_memory_is_published() {
    const WANTED: usize = 10_000;
    let s = SidecarPod::start(mint_pod, &["--max-connections", "20000"]).unwrap();
    // Each connection costs the sidecar two descriptors (downstream and upstream),
    // the test one (the server ends wait in the listen queue, unaccepted), and two
    // local ports in the pod.
    let test_limit = pod::raise_nofile(std::process::id(), 65_536).unwrap();
    let proxy_limit = pod::raise_nofile(s.pid, 65_536).unwrap();
    let fit = usize::try_from(proxy_limit.min(test_limit).saturating_sub(64) / 2).unwrap();
    let connections = WANTED.min(fit);
    if connections < WANTED {
        eprintln!(
            "holding {connections} connections, not {WANTED}: the open-files limit is \
             {proxy_limit} (raising it needs CAP_SYS_RESOURCE)"
        );
    }
    s.pod
        .exec(
            "sysctl",
            &["-qw", "net.ipv4.ip_local_port_range=10000 65000"],
        )
        .unwrap();
    s.server
        .exec("sysctl", &["-qw", "net.core.somaxconn=65535"])
        .unwrap();
    let addr = s.server_addr(9200);
    // A listener nobody accepts from: the kernel completes each handshake and
    // queues the connection, so the server side costs no descriptors.
    let listener = s.server.run(|| {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&addr.into()).unwrap();
        socket.listen(65_535).unwrap();
        socket
    });
    let rss_before = settled_rss(&s);
    let fds_before = pod::open_fds(s.pid).unwrap();

    let started = Instant::now();
    let mut clients: Vec<TcpStream> = s.pod.run(|| {
        (0..connections)
            .map(|i| {
                assert!(
                    started.elapsed() < PHASE,
                    "{i} connections opened in {PHASE:?}"
                );
                tcp::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"))
            })
            .collect()
    });
    let opened = started.elapsed();
    // Every connection is open end to end once the sidecar has forwarded it: idle
    // connections wait out protocol detection (1 s), then go upstream as opaque.
    let deadline = Instant::now() + PHASE;
    loop {
        let metrics = s.metrics().unwrap();
        let open = metric(
            &metrics,
            "tcp_open_connections",
            &[r#"direction="outbound""#],
        );
        let fds = pod::open_fds(s.pid).unwrap();
        if open == connections as f64 && fds >= fds_before + 2 * connections {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar holds {open} connections and {fds} descriptors, expected \
             {connections} and {}",
            fds_before + 2 * connections
        );
        assert!(s.running(), "the sidecar died");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss_held = settled_rss(&s);
    let fds_held = pod::open_fds(s.pid).unwrap();
    // Connections taken from the queue now carry bytes both ways: a token from the
    // server's end reaches one of the clients, and its answer comes back.
    let listener: TcpListener = listener.into();
    listener.set_nonblocking(false).unwrap();
    for client in &clients {
        client.set_nonblocking(true).unwrap();
    }
    for k in 0..3 {
        let (mut server, _) = listener.accept().unwrap();
        server.set_read_timeout(Some(tcp::WAIT)).unwrap();
        let token = format!("idle {k}\n");
        server.write_all(token.as_bytes()).unwrap();
        let deadline = Instant::now() + tcp::WAIT;
        let client = loop {
            let mut buf = [0u8; 16];
            if let Some(client) = clients
                .iter_mut()
                .find(|c| c.peek(&mut buf).is_ok_and(|n| n > 0))
            {
                break client;
            }
            assert!(Instant::now() < deadline, "token {k} reached no client");
            std::thread::sleep(Duration::from_millis(10));
        };
        client.set_nonblocking(false).unwrap();
        let mut got = vec![0u8; token.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, token.as_bytes());
        client.write_all(&got).unwrap();
        server.read_exact(&mut got).unwrap();
        assert_eq!(got, token.as_bytes());
        client.set_nonblocking(true).unwrap();
    }
    drop(clients);
    drop(listener);
    pod::fds_return_to(
        s.pid,
        fds_before + 4,
        PHASE,
        "the sidecar after the connections closed",
    );
    let rss_after = settled_rss(&s);
    let per_connection = rss_held.saturating_sub(rss_before) as f64 * 1024.0 / connections as f64;
    figure(
        "idle_connection_bytes",
        format!(
            "{per_connection:.0} per idle connection (RSS {rss_before} KiB before, {rss_held} KiB \
             with {connections} held, {rss_after} KiB after they closed; {} descriptors held; \
             opened in {} ms)",
            fds_held - fds_before,
            opened.as_millis()
        ),
    );
    assert!(s.running());
}

// ---- HTTP/2: 1,000 connections x 100 streams ----

/// An h2c origin that answers every request's headers at once and keeps each
/// stream open (no end of stream) until `stop` is cancelled; counts streams seen.
/// Its lifetime is the test's, not a clock's: a bound of its own, shorter than the
/// test's phases on a loaded machine, would drop every held stream while the test
/// still counts them.
fn h2_holding_origin(listener: TcpListener, streams: Arc<AtomicUsize>, stop: CancellationToken) {
    h2c::spawn_server(listener, PHASE * 4, move |listener| async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => return,
            };
            let Ok((socket, _)) = accepted else {
                continue;
            };
            let streams = streams.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::Builder::new()
                    .max_concurrent_streams(1000)
                    .handshake::<_, bytes::Bytes>(socket)
                    .await
                else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    let response = http::Response::builder().status(200).body(()).unwrap();
                    if let Ok(send) = respond.send_response(response, false) {
                        held.push(send);
                        streams.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
}

#[test]
fn a_thousand_http2_connections_with_a_hundred_streams_each_are_held() {
    const CONNECTIONS: usize = 1_000;
    const STREAMS: usize = 100;
    let s = SidecarPod::start(mint_pod, &["--max-connections", "20000"]).unwrap();
    pod::raise_nofile(std::process::id(), 65_536).unwrap();
    pod::raise_nofile(s.pid, 65_536).unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    // Stopped when the test ends, passing or failing.
    let _stop_origin = stop.clone().drop_guard();
    h2_holding_origin(
        s.server.run(|| tcp::listen(s.server_addr(9300))).unwrap(),
        seen.clone(),
        stop,
    );
    let target = s.server_addr(9300);
    let rss_before = settled_rss(&s);
    let (conns_tx, conns_rx) = std::sync::mpsc::channel::<()>();
    let (streams_tx, streams_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let pod_ns = s.pod.clone();
    // The client holds its streams until the test says it has measured: each of the
    // test's phases has its own bound below, and this one only covers them all.
    let client = std::thread::spawn(move || {
        pod_ns.run(move || {
            h2c::block_on(PHASE * 4, "the h2 client", async move {
                let mut senders = Vec::with_capacity(CONNECTIONS);
                for _ in 0..CONNECTIONS {
                    senders.push(h2c::connect(target).await.0);
                }
                let mut settled = Vec::with_capacity(CONNECTIONS);
                for client in senders {
                    settled.push(client.ready().await.unwrap());
                }
                conns_tx.send(()).unwrap();
                let mut held = Vec::with_capacity(CONNECTIONS * STREAMS);
                for (i, client) in settled.iter_mut().enumerate() {
                    for j in 0..STREAMS {
                        let request = http::Request::post(format!("http://{target}/{i}/{j}"))
                            .body(())
                            .unwrap();
                        let mut ready = client.clone().ready().await.unwrap();
                        let (response, body) = ready.send_request(request, false).unwrap();
                        held.push((response, body));
                    }
                }
                streams_tx.send(()).unwrap();
                // Held open until the test has measured (or failed: then the channel
                // closes).
                let _ = tokio::task::spawn_blocking(move || done_rx.recv()).await;
                drop(held);
            });
        });
    });

    conns_rx
        .recv_timeout(PHASE)
        .expect("1,000 h2 connections were set up within the phase");
    let rss_connections = settled_rss(&s);
    streams_rx
        .recv_timeout(PHASE)
        .expect("the streams were sent within the phase");
    let deadline = Instant::now() + PHASE;
    while seen.load(Ordering::Relaxed) < CONNECTIONS * STREAMS {
        assert!(
            Instant::now() < deadline,
            "the origin saw {} of {} streams",
            seen.load(Ordering::Relaxed),
            CONNECTIONS * STREAMS
        );
        assert!(s.running(), "the sidecar died under the streams");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_streams = settled_rss(&s);
    let fds = pod::open_fds(s.pid).unwrap();
    assert!(s.running());
    done_tx.send(()).unwrap();
    let deadline = Instant::now() + PHASE;
    while !client.is_finished() {
        assert!(Instant::now() < deadline, "the h2 client hangs");
        std::thread::sleep(Duration::from_millis(50));
    }
    client.join().unwrap();
    let per_connection =
        rss_connections.saturating_sub(rss_before) as f64 * 1024.0 / CONNECTIONS as f64;
    let per_stream = rss_streams.saturating_sub(rss_connections) as f64 * 1024.0
        / (CONNECTIONS * STREAMS) as f64;
    figure(
        "h2_connection_bytes",
        format!(
            "{per_connection:.0} per HTTP/2 connection (RSS {rss_before} KiB before, \
             {rss_connections} KiB with {CONNECTIONS} connections)"
        ),
    );
    figure(
        "h2_stream_bytes",
        format!(
            "{per_stream:.0} per open HTTP/2 stream (RSS {rss_streams} KiB with \
             {CONNECTIONS} x {STREAMS} streams held; {fds} descriptors)"
        ),
    );
}

// ---- bounded metric labels ----

/// An HTTP/1.1 keep-alive origin answering every request at once.
fn fast_origin(listener: TcpListener) {
    listener.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(PHASE));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                            .is_err()
                        {
                            return;
                        }
                    }
                    match read_once(&mut stream, &mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
}

#[test]
fn five_thousand_authorities_keep_the_metric_labels_bounded() {
    const AUTHORITIES: usize = 5_000;
    const CONNECTIONS: usize = 4;
    let s = SidecarPod::start(mint_pod, &[]).unwrap();
    fast_origin(s.server.run(|| tcp::listen(s.server_addr(8080))).unwrap());
    let target = s.server_addr(8080);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..CONNECTIONS {
            let s = &s;
            scope.spawn(move || {
                s.pod.run(|| {
                    let mut stream = tcp::connect(target).unwrap();
                    let mut reader = io::BufReader::new(stream.try_clone().unwrap());
                    for i in (c..AUTHORITIES).step_by(CONNECTIONS) {
                        assert!(started.elapsed() < PHASE, "requests took over {PHASE:?}");
                        write!(
                            stream,
                            "GET / HTTP/1.1\r\nhost: svc-{i}.tenant.example:80\r\n\r\n"
                        )
                        .unwrap();
                        let mut response = [0u8; 41];
                        reader.read_exact(&mut response).unwrap_or_else(|e| {
                            panic!("request {i}: {e}");
                        });
                        assert!(
                            response.starts_with(b"HTTP/1.1 200"),
                            "request {i}: {}",
                            String::from_utf8_lossy(&response)
                        );
                        // The rest of the head and the body, up to "ok\n".
                        let mut line = String::new();
                        while line != "ok\n" {
                            line.clear();
                            io::BufRead::read_line(&mut reader, &mut line).unwrap();
                            assert!(!line.is_empty(), "request {i}: the response was cut");
                        }
                    }
                });
            });
        }
    });
    let metrics = s.metrics().unwrap();
    let mut authorities: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .filter_map(|l| {
            let rest = &l[l.find("authority=\"")? + "authority=\"".len()..];
            Some(&rest[..rest.find('"')?])
        })
        .collect();
    authorities.sort_unstable();
    authorities.dedup();
    let total = metric(
        &metrics,
        "http_requests_total",
        &[r#"direction="outbound""#],
    );
    let cap = proxy_core::metrics::MAX_AUTHORITY_LABELS;
    figure(
        "authority_labels",
        format!(
            "{} distinct values after {AUTHORITIES} authorities (cap {cap} plus \"other\"); \
             /metrics is {} bytes",
            authorities.len(),
            metrics.len()
        ),
    );
    assert_eq!(total, AUTHORITIES as f64, "every request is counted");
    assert!(
        authorities.len() <= cap + 1,
        "{} authority label values, cap {cap}",
        authorities.len()
    );
    assert!(authorities.contains(&"other"), "{authorities:?}");
}
