//! HTTP through the sidecar: an upgrade to a raw stream, the HTTP/1.1 details an
//! application relies on, HTTP/2 with prior knowledge, and an origin that fails
//! mid-response.

use super::*;

// ---- 9. an HTTP/1.1 upgrade ----

#[test]
fn a_websocket_upgrade_becomes_a_raw_stream_both_ways() {
    let s = Sidecar::start(Fam::V4, &[]);
    let server = s.serve(8081, move |mut stream, _| {
        let head = read_head(&mut stream).unwrap();
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                  upgrade: websocket\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            )
            .unwrap();
        // Raw bytes, not HTTP, from here on: the server speaks first.
        stream.write_all(b"\x81\x05hello").unwrap();
        let mut frame = [0u8; 7];
        stream.read_exact(&mut frame).unwrap();
        stream.write_all(&frame).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        head
    });

    let mut stream = s.connect(8081);
    write!(
        stream,
        "GET /chat HTTP/1.1\r\nhost: {}:8081\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        s.server_ip
    )
    .unwrap();
    let response = read_head(&mut stream).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 101"),
        "the 101 reaches the client: {response:?}"
    );
    assert!(response.to_ascii_lowercase().contains("upgrade: websocket"));
    let mut frame = [0u8; 7];
    stream.read_exact(&mut frame).unwrap();
    assert_eq!(&frame, b"\x81\x05hello");
    stream.write_all(b"\x82\x05world").unwrap();
    stream.read_exact(&mut frame).unwrap();
    assert_eq!(&frame, b"\x82\x05world", "the client's raw bytes, echoed");
    assert_eq!(ending(&mut stream, "after the server closed"), Ending::Eof);
    let head = join_within(server, WAIT, "the upgrade server").to_ascii_lowercase();
    assert!(head.starts_with("get /chat http/1.1"), "{head:?}");
    assert!(head.contains("upgrade: websocket"), "{head:?}");
    assert!(head.contains("connection: upgrade"), "{head:?}");
    drop(stream);
    s.expect_metric(
        "tcp_open_connections",
        &[OUTBOUND],
        0.0,
        "the connection counted closed once both ends closed",
    );
}

// ---- HTTP/1.1 details an application relies on ----

/// An HTTP/1.1 origin for `count` requests on one connection, each answered with
/// its request line; returns the heads it saw.
fn http_origin(s: &Sidecar, port: u16, count: usize) -> JoinHandle<Vec<String>> {
    s.serve(port, move |mut stream, _| {
        (0..count)
            .map(|_| answer_with_request_line(&mut stream, "origin saw: ", ""))
            .collect()
    })
}

#[test]
fn a_client_that_half_closes_after_its_request_gets_the_response() {
    let s = Sidecar::start(Fam::V4, &[]);
    let origin = http_origin(&s, 8080, 1);
    let mut stream = s.connect(8080);
    // Like `printf 'GET ...' | nc -N`: the request, then EOF, then the response.
    tcp::send(
        &mut stream,
        "GET /half HTTP/1.1\r\nhost: origin\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    let response = tcp::receive(&mut stream).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200")
            && response.ends_with("origin saw: GET /half HTTP/1.1\n"),
        "the response reaches a client that half-closed: {response:?}"
    );
    join_within(origin, WAIT, "the origin");
}

#[test]
fn keep_alive_requests_share_one_connection_and_are_each_counted() {
    let s = Sidecar::start(Fam::V4, &[]);
    let origin = http_origin(&s, 8080, 3);
    let url = |p: &str| format!("http://{}:8080/{p}", s.server_ip);
    let out = s.curl(&[&url("a"), &url("b"), &url("c")]);
    assert_eq!(
        out,
        "origin saw: GET /a HTTP/1.1\norigin saw: GET /b HTTP/1.1\norigin saw: GET /c HTTP/1.1\n"
    );
    let heads = join_within(origin, WAIT, "the origin");
    assert_eq!(heads.len(), 3, "all three on the origin's one connection");
    s.assert_counts(&[
        ("tcp_open_total", &[OUTBOUND], 1.0, "one connection"),
        ("http_requests_total", &[OUTBOUND], 3.0, "three requests"),
    ]);
    s.expect_metric(
        "tcp_open_connections",
        &[OUTBOUND],
        0.0,
        "curl's connection counted closed once both ends closed",
    );
}

/// Bytes of the request body and of the response body in the HTTP bulk test.
const HTTP_BULK: usize = 32 * 1024 * 1024;

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no content-length in {head:?}"))
}

#[test]
fn large_http_bodies_cross_the_http_proxy_intact() {
    let s = Sidecar::start(Fam::V4, &[]);
    let origin = s.serve(8080, move |mut stream, _| {
        stream.set_read_timeout(Some(WAIT * 4)).unwrap();
        let head = read_head(&mut stream).unwrap();
        let got = read_pattern(&mut stream, content_length(&head));
        write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {HTTP_BULK}\r\n\r\n"
        )
        .unwrap();
        let sent = write_pattern(&mut stream, HTTP_BULK, 0x5eed_0004);
        (head, got, sent)
    });

    let started = Instant::now();
    let mut stream = s.connect(8080);
    stream.set_read_timeout(Some(WAIT * 4)).unwrap();
    write!(
        stream,
        "POST /upload HTTP/1.1\r\nhost: origin\r\ncontent-type: application/octet-stream\r\ncontent-length: {HTTP_BULK}\r\n\r\n"
    )
    .unwrap();
    let sent = write_pattern(&mut stream, HTTP_BULK, 0x5eed_0003);
    let head = read_head(&mut stream).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(content_length(&head), HTTP_BULK);
    let got = read_pattern(&mut stream, HTTP_BULK);
    let (origin_head, origin_got, origin_sent) = join_within(origin, LONG, "the origin");
    eprintln!(
        "32 MiB up and 32 MiB down through the HTTP proxy in {:?}",
        started.elapsed()
    );
    assert!(
        origin_head.starts_with("POST /upload HTTP/1.1"),
        "{origin_head:?}"
    );
    assert_eq!(origin_got, sent, "request body checksum");
    assert_eq!(got, origin_sent, "response body checksum");
    s.assert_counts(&[(
        "http_requests_total",
        &[OUTBOUND],
        1.0,
        "it took the HTTP path",
    )]);
}

#[test]
fn a_request_line_split_across_segments_is_still_detected_as_http() {
    let s = Sidecar::start(Fam::V4, &[]);
    let origin = http_origin(&s, 8080, 1);
    let mut stream = s.connect(8080);
    stream.set_nodelay(true).unwrap();
    stream.write_all(b"GE").unwrap();
    // Well inside the 1s detection window, but long enough to be a separate read.
    std::thread::sleep(Duration::from_millis(200));
    stream
        .write_all(b"T /split HTTP/1.1\r\nhost: origin\r\nconnection: close\r\n\r\n")
        .unwrap();
    let response = tcp::receive(&mut stream).unwrap();
    assert!(
        response.ends_with("origin saw: GET /split HTTP/1.1\n"),
        "{response:?}"
    );
    join_within(origin, WAIT, "the origin");
    s.assert_counts(&[(
        "http_requests_total",
        &[OUTBOUND],
        1.0,
        "detected as HTTP although its first segment was two bytes",
    )]);
}

/// As in istio's capture: the app talking to itself over `lo` (its own pod address
/// included) is left alone, so the sidecar neither sees nor breaks it.
#[test]
fn the_app_calling_its_own_pod_address_bypasses_the_sidecar() {
    let s = Sidecar::start(Fam::V4, &[]);
    let app = s
        .pod
        .run(|| tcp::listen(SocketAddr::from(([0, 0, 0, 0], 8080))))
        .unwrap();
    let app_side = echo_server(app, 1);
    let own = SocketAddr::new(s.pod_ip, 8080);
    let mut stream = s
        .pod
        .run(|| tcp::connect(own))
        .unwrap_or_else(|e| panic!("connecting from the pod to its own {own}: {e}"));
    stream.write_all(b"to myself").unwrap();
    assert_eq!(read_exact_string(&mut stream, 9), "to myself");
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(ending(&mut stream, "after the half-close"), Ending::Eof);
    join_within(app_side, WAIT, "the app");
    s.assert_counts(&[("tcp_open_total", &[], 0.0, "the sidecar saw no connection")]);
}

#[test]
fn an_idle_http_keep_alive_connection_is_closed_by_the_proxy() {
    let s = Sidecar::start(Fam::V4, &["--idle-timeout", "2s"]);
    let origin = s.serve(8080, move |mut stream, _| {
        // Longer than the client waits below: the origin never ends it first.
        stream.set_read_timeout(Some(WAIT * 3)).unwrap();
        let head = read_head(&mut stream).unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
            .unwrap();
        // Keep-alive on both sides: only the proxy's idle timeout ends this.
        let mut rest = Vec::new();
        let end = stream.read_to_end(&mut rest).map(|_| rest);
        (head, end)
    });
    let mut stream = s.connect(8080);
    stream
        .write_all(b"GET /idle HTTP/1.1\r\nhost: origin\r\n\r\n")
        .unwrap();
    let head = read_head(&mut stream).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(read_exact_string(&mut stream, 3), "ok\n");
    closed_when_idle(&mut stream, "an idle keep-alive HTTP connection");
    let (origin_head, origin_end) = join_within(origin, WAIT * 4, "the origin");
    assert!(origin_head.starts_with("GET /idle"), "{origin_head:?}");
    assert!(
        origin_end.as_ref().map_or(true, |rest| rest.is_empty()),
        "the origin got bytes after the request: {origin_end:?}"
    );
    s.expect_close("idle_timeout", "the close counted as an idle timeout");
}

// ---- HTTP/2 with prior knowledge (gRPC's transport) ----

/// An h2c origin: answers each stream with its path until it has served `streams`
/// and their connections closed; returns how many connections they came on.
fn h2_origin(listener: TcpListener, streams: usize) -> JoinHandle<Option<usize>> {
    h2c::spawn_server(listener, WAIT * 2, move |listener| async move {
        let (mut served, mut connections) = (0, 0);
        while served < streams {
            let (socket, _) = listener.accept().await.unwrap();
            connections += 1;
            let mut conn = h2::server::handshake(socket).await.unwrap();
            while let Some(stream) = conn.accept().await {
                let (request, mut respond) = stream.unwrap();
                let body = format!("h2 origin saw {}\n", request.uri().path());
                let response = http::Response::builder().status(200).body(()).unwrap();
                let mut send = respond.send_response(response, false).unwrap();
                send.send_data(bytes::Bytes::from(body), true).unwrap();
                served += 1;
            }
        }
        connections
    })
}

/// Sends GETs for `paths` on one h2c connection, all before reading any response
/// (so they are in flight together), and returns the bodies in order. Call it on a
/// thread inside the client's namespace.
fn h2_get_multiplexed(addr: SocketAddr, paths: &[&str]) -> Vec<String> {
    h2c::block_on(WAIT * 2, "the h2 exchange", async {
        let (client, driver) = h2c::connect(addr).await;
        let mut client = client.ready().await.unwrap();
        let mut pending = Vec::new();
        for path in paths {
            let request = http::Request::get(format!("http://{addr}{path}"))
                .body(())
                .unwrap();
            let (response, _) = client.send_request(request, true).unwrap();
            pending.push(response);
            client = client.ready().await.unwrap();
        }
        let mut bodies = Vec::new();
        for response in pending {
            let response = response.await.unwrap();
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                body.flow_control().release_capacity(chunk.len()).unwrap();
                bytes.extend_from_slice(&chunk);
            }
            bodies.push(String::from_utf8(bytes).unwrap());
        }
        drop(client);
        driver.abort();
        bodies
    })
}

#[test]
fn http2_prior_knowledge_streams_share_one_connection_and_are_counted() {
    let s = Sidecar::start(Fam::V4, &[]);
    let origin = h2_origin(s.listen(8082), 3);
    // curl first, as an application would use it. One URL: with several, the curl
    // of this system (7.88) failed on the reused connection even without the
    // sidecar in the path, so multiplexing is checked with the h2 client below.
    let out = s.curl(&[
        "--http2-prior-knowledge",
        &format!("http://{}:8082/curl", s.server_ip),
    ]);
    assert_eq!(out, "h2 origin saw /curl\n");
    // Then two streams in flight at once on one connection.
    let addr = SocketAddr::new(s.server_ip, 8082);
    let bodies = s.pod.run(|| h2_get_multiplexed(addr, &["/one", "/two"]));
    assert_eq!(bodies, ["h2 origin saw /one\n", "h2 origin saw /two\n"]);
    let connections = join_within(origin, WAIT * 3, "the h2 origin")
        .expect("the h2 origin finished within its deadline");
    assert_eq!(
        connections, 2,
        "curl's connection, then the multiplexed one"
    );
    s.assert_counts(&[
        ("tcp_open_total", &[OUTBOUND], 2.0, "two connections"),
        (
            "http_requests_total",
            &[OUTBOUND],
            3.0,
            "three HTTP/2 requests",
        ),
        (
            "http_responses_total",
            &[OUTBOUND, r#"status="200""#],
            3.0,
            "three 200s",
        ),
    ]);
    s.expect_metric(
        "tcp_open_connections",
        &[OUTBOUND],
        0.0,
        "both HTTP/2 connections counted closed",
    );
}

// ---- an origin that fails mid-response ----

/// Reads until EOF or an error, keeping what arrived; the ending says which.
fn read_until_end(stream: &mut TcpStream) -> (Vec<u8>, Ending) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match read_uninterrupted(stream, &mut buf) {
            Ok(0) => return (got, Ending::Eof),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (got, Ending::Reset),
            Err(e) => panic!(
                "expected the response to end, got {e} after {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

#[test]
fn an_origin_reset_mid_response_never_looks_like_a_complete_response() {
    let s = Sidecar::start(Fam::V4, &[]);
    for (port, framing) in [
        (8083, "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"),
        (8084, "content-length: 1000\r\n\r\nhello"),
        (8085, "connection: close\r\n\r\nhello"),
    ] {
        let origin = s.serve(port, move |mut stream, _| {
            read_head(&mut stream).unwrap();
            write!(stream, "HTTP/1.1 200 OK\r\n{framing}").unwrap();
            // Let the partial response reach the client before the reset.
            std::thread::sleep(Duration::from_millis(200));
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let mut stream = s.connect(port);
        stream
            .write_all(b"GET /partial HTTP/1.1\r\nhost: origin\r\n\r\n")
            .unwrap();
        let (got, end) = read_until_end(&mut stream);
        join_within(origin, WAIT, "the origin");
        let text = String::from_utf8_lossy(&got).into_owned();
        eprintln!("{framing:?}: the client got {text:?}, then {end:?}");
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
        let head_end = text.find("\r\n\r\n").expect("a complete head") + 4;
        let (head, body) = text.split_at(head_end);
        let head = head.to_ascii_lowercase();
        // However the proxy frames the body, a client must be able to tell it is cut.
        let looks_complete = if head.contains("transfer-encoding: chunked") {
            body.ends_with("0\r\n\r\n")
        } else if head.contains("content-length:") {
            body.len() >= content_length(&head)
        } else {
            // Close-delimited: only a reset tells a cut body from a whole one.
            end == Ending::Eof
        };
        assert!(
            !looks_complete,
            "{framing:?}: the origin's reset reached the client as a complete response: {text:?} then {end:?}"
        );
    }
}
