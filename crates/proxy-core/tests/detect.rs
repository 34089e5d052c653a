//! Protocol detection: the pure classifier on many prefixes, and `detect` over
//! in-memory streams with paused time (timeouts cost no wall-clock time).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use proxy_core::detect::{
    DetectConfig, H2_PREFACE, MAX_REQUEST_LINE, Prefixed, Protocol, classify, detect,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
use tokio::time::Instant;

use Protocol::{Http1, Http2, Opaque};

#[test]
fn http1_request_lines() {
    for line in [
        &b"GET / HTTP/1.1\r\n"[..],
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
    ] {
        assert_eq!(
            classify(line),
            Some(Http1),
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn opaque_is_decided_at_the_first_impossible_byte() {
    for prefix in [
        // A TLS ClientHello record header.
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"\x16",
        // Postgres startup, Redis RESP, memcached, SSH (if a client spoke first).
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
        b"*1\r\n$4\r\nPING\r\n",
        b"get foo\r\n",
        b"set k 0 0 5\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        // Broken request lines.
        b" GET / HTTP/1.1\r\n",
        b"GET  / HTTP/1.1\r\n",
        b"GE(T / HTTP/1.1\r\n",
        b"GET /\x01 HTTP/1.1\r\n",
        b"GET / HTTP/2.0\r\n",
        b"GET / HTTP/1.2\r\n",
        b"GET / HTTP/1.1\rX",
        b"GET / HTTP/1.1 \r\n",
        b"GET / http/1.1\r\n",
        b"\r\nGET / HTTP/1.1\r\n",
        // Diverges from the preface after its first line.
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
    ] {
        assert_eq!(
            classify(prefix),
            Some(Opaque),
            "{:?}",
            String::from_utf8_lossy(prefix)
        );
    }
    // Decided without the rest of the line.
    assert_eq!(classify(b"GET / HTTP/3"), Some(Opaque));
    assert_eq!(classify(b"GET / X"), Some(Opaque));
}

#[test]
fn incomplete_prefixes_wait_for_more() {
    for prefix in [
        &b""[..],
        b"G",
        b"GET",
        b"GET ",
        b"GET /very/long/path",
        b"GET / ",
        b"GET / HTTP/1.",
        b"GET / HTTP/1.1",
        b"GET / HTTP/1.1\r",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
    ] {
        assert_eq!(
            classify(prefix),
            None,
            "{:?}",
            String::from_utf8_lossy(prefix)
        );
    }
}

#[test]
fn http2_preface() {
    assert_eq!(classify(H2_PREFACE), Some(Http2));
    let mut with_settings = H2_PREFACE.to_vec();
    with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    assert_eq!(classify(&with_settings), Some(Http2));
}

#[test]
fn limits_make_long_tokens_and_lines_opaque() {
    let method = vec![b'A'; 64];
    assert_eq!(classify(&method), Some(Opaque), "a 64-byte method");
    let mut line = b"GET /".to_vec();
    line.resize(MAX_REQUEST_LINE + 10, b'a');
    assert_eq!(
        classify(&line),
        Some(Opaque),
        "a request line past the limit"
    );
    let mut ok = b"GET /".to_vec();
    ok.resize(MAX_REQUEST_LINE - 11, b'a');
    ok.extend_from_slice(b" HTTP/1.1\r\n");
    assert_eq!(classify(&ok), Some(Http1), "a request line at the limit");
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
async fn partial_request_line_is_kept_on_timeout() {
    let (mut client, mut server) = duplex(1024);
    client.write_all(b"GET / HT").await.unwrap();
    let d = detect(&mut server, &cfg(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!((d.protocol, d.timed_out), (Opaque, true));
    assert_eq!(&d.prefix[..], b"GET / HT");
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
    assert!(
        d.prefix.starts_with(b"GET /x HTTP/1.1\r\n"),
        "{:?}",
        d.prefix
    );
    // Decided on the fourth piece, not at the timeout.
    assert!(start.elapsed() < Duration::from_secs(1));
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
    let (mut client, mut server) = duplex(1024);
    client.write_all(b"GET /").await.unwrap();
    drop(client);
    let d = detect(&mut server, &cfg(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!((d.protocol, d.timed_out), (Opaque, false));
    assert_eq!(&d.prefix[..], b"GET /");
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
    assert_eq!((d.protocol, d.timed_out), (Opaque, false));
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
