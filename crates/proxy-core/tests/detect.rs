//! Protocol detection: the pure classifier on many prefixes, and `detect` over
//! in-memory streams with paused time (timeouts cost no wall-clock time).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use proxy_core::detect::{
    DetectConfig, H2_PREFACE, MAX_REQUEST_LINE, Prefixed, Protocol, Stall, classify, detect,
    undecided,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
use tokio::time::Instant;

use Protocol::{Http1, Http2, Opaque};

/// Asserts `classify` gives `want` for each input, naming the input on failure.
fn all_classify_as(want: Option<Protocol>, inputs: &[&[u8]]) {
    for input in inputs {
        assert_eq!(
            classify(input),
            want,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn http1_request_lines() {
    all_classify_as(
        Some(Http1),
        &[
            b"GET / HTTP/1.1\r\n",
            b"GET / HTTP/1.0\r\n",
            b"POST /api/v1/items?x=1&y=%20 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"CONNECT hello.default.svc.cluster.local:80 HTTP/1.1\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"GET http://example.com/ HTTP/1.1\r\n",
            b"UPDATEREDIRECTREF /x HTTP/1.1\r\n",
            b"get /lowercase-is-a-token HTTP/1.1\r\n",
            b"GET / HTTP/1.1\n",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\n",
            // "PRI" is a token too; only the exact preface is HTTP/2.
            b"PRI * HTTP/1.1\r\n",
        ],
    );
}

/// What some origin reads as a request, though RFC 9112 or hyper would not: each
/// is HTTP/1 so that the proxy parses it (and refuses what hyper refuses) instead
/// of forwarding it raw. Each decides as soon as `HTTP/` is seen.
#[test]
fn what_lenient_origins_read_as_a_request_is_http1() {
    let long_method = format!("{} / HTTP/1.1\r\n", "A".repeat(64));
    all_classify_as(
        Some(Http1),
        &[
            // Empty lines before the request line (RFC 9112 §2.2; httparse and
            // nginx skip any number), in every spelling.
            b"\r\nGET / HTTP/1.1\r\n",
            b"\nGET / HTTP/1.1\r\n",
            b"\r\n\r\n\n\r\nPOST / HTTP/1.1\r\n",
            b"\rGET / HTTP/1.1\r\n",
            // Leading whitespace (Apache outside strict mode trims it).
            b" GET / HTTP/1.1\r\n",
            b"\t\r\n GET / HTTP/1.1\r\n",
            // A bare CR in the target: nginx ends the line there, Apache splits on it.
            b"GET /a\rb HTTP/1.1\r\n",
            b"GET /\r HTTP/1.1\r\n",
            // Other separators and runs of them (nginx, Apache).
            b"GET  / HTTP/1.1\r\n",
            b"GET\t/\tHTTP/1.1\r\n",
            b"GET\x0b/\x0cHTTP/1.1\r\n",
            // Spaces inside the target (nginx takes "/a b").
            b"GET /a b HTTP/1.1\r\n",
            // Methods that are not tokens, or long, or odd (answered 400/501, but read).
            b"GE(T / HTTP/1.1\r\n",
            long_method.as_bytes(),
            b"M-SEARCH * HTTP/1.1\r\n",
            // Other versions and spellings (nginx reads HTTP/1.2 as 1.1).
            b"GET / HTTP/1.2\r\n",
            b"GET / HTTP/2.0\r\n",
            b"GET / HTTP/9.7\r\n",
            b"GET / http/1.1\r\n",
            b"GET / HTTP/1.1 \r\n",
            b"GET / HTTP/1.1\rX",
            b"GET HTTP/1.1\r\n",
            // Control bytes and obs-text in the target.
            b"GET /\x01 HTTP/1.1\r\n",
            b"GET /\x00 HTTP/1.1\r\n",
            b"GET /\xff HTTP/1.1\r\n",
            // HTTP/0.9 (nginx serves `GET /`): decided at the line's end.
            b"GET /\r\n",
            b"GET /index.html\n",
            b"GET http://example.com/\r\n",
            // A broken copy of the preface is not HTTP/2 but is still a request line.
            b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
        ],
    );
    // Decided at `HTTP/`, before the version or the line end arrive.
    all_classify_as(
        Some(Http1),
        &[b"GET / HTTP/", b"\r\nGET / http/", b"GET /a b HTTP/"],
    );
}

#[test]
fn opaque_is_decided_when_no_origin_could_read_a_request() {
    all_classify_as(
        Some(Opaque),
        &[
            // A TLS ClientHello record header.
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"\x16",
            // Postgres startup, Redis RESP, memcached, SSH, SMTP, STOMP.
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"*1\r\n$4\r\nPING\r\n",
            b"get foo\r\n",
            b"set k 0 0 5\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"EHLO pod\r\n",
            b"CONNECT\n",
            b"PING\r\n",
            // A word, then a byte no method holds.
            b"GET\x00",
            b"\r\n\x16\x03\x01",
            b"caf\xc3\xa9 / HTTP/1.1\r\n",
            // A line without a version whose target is no path (no HTTP/0.9 either).
            b"GET foo\r\n",
            b"GET *\r\n",
            b"GET \r\n",
            // More than a target before the line end: not HTTP/0.9 either.
            b"OPTIONS rtsp://h/x RTSP/1.0\r\n",
            b"DESCRIBE rtsp://h/x RTSP/1.0\r\n",
            b"GET /a b\r\n",
        ],
    );
    // Decided without waiting for the rest of the line.
    assert_eq!(classify(b"\x16\x03"), Some(Opaque));
    assert_eq!(classify(b"GE\x00T / HTTP/1.1"), Some(Opaque));
}

#[test]
fn incomplete_prefixes_wait_for_more() {
    all_classify_as(
        None,
        &[
            b"",
            b"G",
            b"GET",
            b"GET ",
            b"GET /very/long/path",
            b"GET / ",
            b"GET / HTTP",
            b"GET / htt",
            b"\r\n",
            b"\r\n\r\n\r\n",
            b" \t",
            b"\r\nGET",
            b"GET /a\rb",
            b"GET foo",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
        ],
    );
}

#[test]
fn http2_preface() {
    assert_eq!(classify(H2_PREFACE), Some(Http2));
    let mut with_settings = H2_PREFACE.to_vec();
    with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    assert_eq!(classify(&with_settings), Some(Http2));
    // The preface after an empty line is no preface: an HTTP/1 line (hyper
    // refuses its version).
    let mut late = b"\r\n".to_vec();
    late.extend_from_slice(H2_PREFACE);
    assert_eq!(classify(&late), Some(Http1));
}

#[test]
fn long_methods_and_targets_stay_undecided_never_opaque() {
    let method = vec![b'A'; 64];
    assert_eq!(classify(&method), None, "a 64-byte method so far");
    let mut line = b"GET /".to_vec();
    line.resize(MAX_REQUEST_LINE + 10, b'a');
    assert_eq!(classify(&line), None, "a target past the limit so far");
    line.extend_from_slice(b" HTTP/1.1\r\n");
    assert_eq!(
        classify(&line),
        Some(Http1),
        "a request line past the limit"
    );
    let empty_lines = b"\r\n".repeat(MAX_REQUEST_LINE);
    assert_eq!(classify(&empty_lines), None, "8 KiB of empty lines so far");
}

#[test]
fn stalled_prefixes_are_http1_only_when_they_start_like_a_request() {
    // Trickled request lines: the rest could reach the origin after the timeout.
    for prefix in [
        &b"G"[..],
        b"PO",
        b"GET",
        b"GET ",
        b"GET /",
        b"DELETE x",
        b"\r\n",
        b"\r\n\r\n ",
        b"\r\nPOST /a\rb",
        b"FOO /x",
        b"anything *",
        b"M http://host/",
        // Any method token, any case, whole or still being typed: an origin that
        // takes any token (Go's) reads ` / HTTP/1.1` arriving after the stall.
        b"PROPFIND",
        b"PROPFIND ",
        b"get",
        b"get ",
        b"get /",
        b"PING",
        b"g",
        b"x-Custom.Method_1!",
        b"\r\nmkcol ",
        &[b'A'; 32],
    ] {
        assert_stalled_as(prefix, Http1);
        let what = String::from_utf8_lossy(prefix);
        assert_eq!(undecided(prefix, Stall::Eof), Opaque, "{what:?}");
    }
    // Plain TCP clients that write a few words and wait for an answer.
    for prefix in [
        &b""[..],
        b"first, ",
        b"hello over ipv6",
        b"get key",
        b"{\"a\": 1, \"b\": ",
        b"hello, world",
        b"ping?",
        b"caf\xc3\xa9",
        // Longer than any method: a line of text.
        &[b'A'; 33],
    ] {
        assert_stalled_as(prefix, Opaque);
    }
}

/// What a prefix that stalls is taken for, at the timeout and at the size limit alike.
fn assert_stalled_as(prefix: &[u8], want: Protocol) {
    let what = String::from_utf8_lossy(prefix);
    for stall in [Stall::Timeout, Stall::Limit] {
        assert_eq!(undecided(prefix, stall), want, "{what:?} at {stall:?}");
    }
}

fn cfg(timeout: Duration) -> DetectConfig {
    DetectConfig {
        timeout,
        ..DetectConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn silent_client_is_opaque_after_the_timeout() {
    let (_client, mut server) = duplex(1024);
    let start = Instant::now();
    let d = detect(&mut server, &cfg(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(d.protocol, Opaque);
    assert!(d.timed_out);
    assert!(d.prefix.is_empty());
    assert_eq!(start.elapsed(), Duration::from_secs(1), "virtual time");
}

#[tokio::test(start_paused = true)]
async fn a_request_line_that_stalls_is_http1_on_timeout() {
    // A trickled request line must not pass as opaque: its rest could arrive after
    // the timeout and be read by the origin as a request the proxy never parsed.
    assert_detected(b"GET / HT", false, (Http1, true)).await;
}

#[tokio::test(start_paused = true)]
async fn request_in_pieces_is_http1_and_keeps_every_byte() {
    let (mut client, mut server) = duplex(1024);
    let writer = tokio::spawn(async move {
        for piece in [&b"GE"[..], b"T /x HT", b"TP/1.1\r", b"\nHost: a\r\n\r\n"] {
            client.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client
    });
    let start = Instant::now();
    let d = detect(&mut server, &cfg(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!((d.protocol, d.timed_out), (Http1, false));
    assert!(d.prefix.starts_with(b"GET /x HTTP/"), "{:?}", d.prefix);
    // Decided on the third piece, at `HTTP/`, not at the timeout.
    assert!(start.elapsed() < Duration::from_secs(1));
    drop(writer.await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn empty_lines_then_a_request_one_byte_per_segment_is_http1() {
    let (mut client, mut server) = duplex(1024);
    let request = b"\r\n\r\nGET\t/a\rb HTTP/1.1\r\nHost: a\r\n\r\n";
    let writer = tokio::spawn(async move {
        for byte in request {
            client.write_all(&[*byte]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        client
    });
    let d = detect(&mut server, &cfg(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!((d.protocol, d.timed_out), (Http1, false));
    assert_eq!(&d.prefix[..], b"\r\n\r\nGET\t/a\rb HTTP/");
    drop(writer.await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn tls_client_hello_is_opaque_at_once() {
    let (mut client, mut server) = duplex(1024);
    client
        .write_all(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
        .await
        .unwrap();
    let start = Instant::now();
    let d = detect(&mut server, &cfg(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!((d.protocol, d.timed_out), (Opaque, false));
    assert_eq!(start.elapsed(), Duration::ZERO, "no waiting for more bytes");
    assert_eq!(d.prefix.len(), 11);
}

#[tokio::test(start_paused = true)]
async fn preface_split_across_reads_is_http2() {
    let (mut client, mut server) = duplex(1024);
    let writer = tokio::spawn(async move {
        client.write_all(&H2_PREFACE[..10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(&H2_PREFACE[10..]).await.unwrap();
        client
    });
    let d = detect(&mut server, &cfg(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!((d.protocol, d.timed_out), (Http2, false));
    assert_eq!(&d.prefix[..], &H2_PREFACE[..]);
    drop(writer.await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn eof_before_a_decision_is_opaque() {
    assert_detected(b"GET /", true, (Opaque, false)).await;
}

/// Detects over a client that wrote `written` and then, if `closed`, closed: the
/// protocol and whether detection timed out are `want`, and the prefix is every
/// byte written.
async fn assert_detected(written: &[u8], closed: bool, want: (Protocol, bool)) {
    let (mut client, mut server) = duplex(1024);
    client.write_all(written).await.unwrap();
    let _open = (!closed).then_some(client);
    let d = detect(&mut server, &cfg(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!((d.protocol, d.timed_out), want);
    assert_eq!(&d.prefix[..], written);
}

#[tokio::test(start_paused = true)]
async fn max_prefix_bounds_what_is_read() {
    let (mut client, mut server) = duplex(64 * 1024);
    let mut long = b"GET /".to_vec();
    long.resize(5000, b'a');
    client.write_all(&long).await.unwrap();
    let config = DetectConfig {
        timeout: Duration::from_secs(1),
        max_prefix: 100,
    };
    let d = detect(&mut server, &config).await.unwrap();
    // Still a request line at the limit: the HTTP path parses (or refuses) it.
    assert_eq!((d.protocol, d.timed_out), (Http1, false));
    assert_eq!(d.prefix.len(), 100, "never reads past max_prefix");
    // The rest is still in the stream for the forwarder.
    let mut rest = vec![0u8; 4900];
    server.read_exact(&mut rest).await.unwrap();
}

#[tokio::test]
async fn prefixed_replays_then_reads_and_writes_through() {
    let (mut client, server) = duplex(1024);
    client.write_all(b" world").await.unwrap();
    let mut io = Prefixed::new(Bytes::from_static(b"hello"), server);
    let mut three = [0u8; 3];
    io.read_exact(&mut three).await.unwrap();
    assert_eq!(&three, b"hel");
    let mut rest = [0u8; 8];
    io.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"lo world");
    io.write_all(b"reply").await.unwrap();
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"reply");

    let mut io = Prefixed::new(Bytes::from_static(b"abc"), tokio::io::empty());
    let mut one = [0u8; 1];
    io.read_exact(&mut one).await.unwrap();
    let (left, _inner) = io.into_parts();
    assert_eq!(&left[..], b"bc");
}

#[test]
fn labels() {
    assert_eq!(Http1.as_str(), "http1");
    assert_eq!(Http2.as_str(), "http2");
    assert_eq!(Opaque.to_string(), "opaque");
}
