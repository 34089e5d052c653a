//! HTTP/2 field values with leading or trailing whitespace (RFC 9113 §8.2.1: malformed)
//! on the transparent HTTP/2 path: refused by the proxy, never forwarded; the
//! connection serves well-formed requests on. In memory: an h2 client and an h2
//! origin on either side of `HttpProxy::serve` over duplex pipes.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use proxy_core::detect::Protocol;
use proxy_core::forward::ForwardConfig;
use proxy_core::http::{HttpProxy, HttpSettings};
use proxy_core::metrics::{Direction, ProxyMetrics};
use tokio::io::duplex;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const STEP: Duration = Duration::from_secs(10);

/// The header values of every request the origin received.
type Seen = Arc<Mutex<Vec<Vec<(String, Vec<u8>)>>>>;

/// An h2 origin on `io` that records each request's fields and answers `200`.
async fn origin(io: tokio::io::DuplexStream, seen: Seen) {
    let mut conn = h2::server::handshake(io).await.unwrap();
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        let fields = req
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        seen.lock().unwrap().push(fields);
        let response = Response::builder().status(200).body(()).unwrap();
        respond.send_response(response, true).unwrap();
    }
}

#[tokio::test]
async fn padded_http2_field_values_are_refused_and_never_forwarded() {
    let (client_io, proxy_down) = duplex(64 * 1024);
    let (proxy_up, origin_io) = duplex(64 * 1024);
    let seen = Seen::default();
    tokio::spawn(origin(origin_io, seen.clone()));
    let proxy = HttpProxy {
        metrics: ProxyMetrics::default(),
        direction: Direction::Outbound,
        settings: HttpSettings::default(),
        forward: ForwardConfig::default(),
    };
    let drain = CancellationToken::new();
    tokio::spawn(async move {
        let _ = proxy
            .serve(proxy_down, proxy_up, Protocol::Http2, "origin:80", drain)
            .await;
    });
    let (client, conn) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(conn);

    // Each padded value, alone on a request that is otherwise fine.
    let cases: [(&str, &[u8]); 5] = [
        ("x-lead-space", b" v"),
        ("x-trail-space", b"v "),
        ("x-lead-tab", b"\tv"),
        ("x-trail-tab", b"v\t"),
        ("transfer-encoding-ish", b" chunked"),
    ];
    for (name, value) in cases {
        let mut client = timeout(STEP, client.clone().ready())
            .await
            .unwrap()
            .unwrap();
        let req = Request::builder()
            .method("GET")
            .uri("http://origin/padded")
            .header(name, http::HeaderValue::from_bytes(value).unwrap())
            .body(())
            .unwrap();
        let (response, _) = client.send_request(req, true).unwrap();
        let answer = timeout(STEP, response).await.unwrap();
        // A 400 or a stream reset: either way, a refusal.
        if let Ok(response) = answer {
            assert_eq!(
                response.status(),
                StatusCode::BAD_REQUEST,
                "{name}: {value:?}"
            );
        }
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "padded values reached the origin: {:?}",
        seen.lock().unwrap()
    );

    // Inner whitespace is fine, and the connection still serves.
    let mut client = timeout(STEP, client.ready()).await.unwrap().unwrap();
    let req = Request::builder()
        .method("GET")
        .uri("http://origin/fine")
        .header("x-inner", "a b\tc")
        .body(())
        .unwrap();
    let (response, _) = client.send_request(req, true).unwrap();
    let response = timeout(STEP, response).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0]
            .iter()
            .any(|(n, v)| n == "x-inner" && v == b"a b\tc"),
        "{seen:?}"
    );
}
