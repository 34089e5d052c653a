//! Reading what happened: metrics, ends of streams, resets.

use super::*;

/// `isthmus_refusals_total{direction, reason}`.
pub fn refusals(metrics: &ProxyMetrics, direction: Direction, reason: &'static str) -> u64 {
    metrics
        .refusals
        .get_or_create(&RefusalLabels { direction, reason })
        .get()
}

/// `tcp_close_total{direction, reason}`.
pub fn closes(metrics: &ProxyMetrics, direction: Direction, reason: &'static str) -> u64 {
    metrics
        .tcp_closed
        .get_or_create(&TcpCloseLabels { direction, reason })
        .get()
}

/// Waits until `check` holds, polling, for at most [`STEP`].
pub async fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_or(what, check, String::new).await
}

/// [`eventually`], adding `context()` (metrics, say) to the failure message.
pub async fn eventually_or(
    what: &str,
    mut check: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {STEP:?}: {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next item `rx` receives, failing the test after [`STEP`] with `none`.
pub async fn next_within<T>(rx: &mut mpsc::UnboundedReceiver<T>, none: &str) -> T {
    tokio::time::timeout(STEP, rx.recv())
        .await
        .expect(none)
        .expect("the fixture's channel closed")
}

/// Waits until `check` holds of `metrics`, showing them if it does not.
pub async fn counted(metrics: &ProxyMetrics, what: &str, check: impl Fn(&ProxyMetrics) -> bool) {
    eventually_or(what, || check(metrics), || metrics_text(metrics)).await
}

/// A counter by direction and reason: [`refusals`] or [`closes`].
pub type Count = fn(&ProxyMetrics, Direction, &'static str) -> u64;

/// Waits until `count` of `direction` and `reason` is `n`.
pub async fn counts(
    metrics: &ProxyMetrics,
    count: Count,
    direction: Direction,
    reason: &'static str,
    n: u64,
) {
    let what = format!("{direction:?} {reason} counted {n} times");
    let check = || count(metrics, direction, reason) == n;
    eventually_or(&what, check, || metrics_text(metrics)).await
}

/// Writes `request`, ends the writing half, and asserts the reply read up to an
/// orderly end is `reply`.
pub async fn assert_exchange<S>(stream: &mut S, request: &[u8], reply: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request).await.unwrap();
    stream.shutdown().await.unwrap();
    let (got, end) = read_to_end(stream).await;
    end.unwrap_or_else(|e| panic!("the reply to {request:?} ended with {e}"));
    assert_eq!(got, reply, "the reply to {request:?}");
}

/// Reads `stream` to an orderly end, which must bring `greeting`; then sends
/// `words` and ends the stream: `origin`, whose side ended first, must still read
/// exactly `words`, up to an orderly end.
pub async fn assert_heard_after_greeting<S>(
    stream: &mut S,
    greeting: &[u8],
    words: &[u8],
    origin: &mut Origin,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (got, end) = read_to_end(stream).await;
    end.unwrap_or_else(|e| panic!("the greeting ended with {e}"));
    assert_eq!(got, greeting);
    stream.write_all(words).await.unwrap();
    stream.shutdown().await.unwrap();
    let served = origin.next_served().await;
    assert_eq!(
        (served.received.as_slice(), served.ended),
        (words, Ended::Eof)
    );
}

/// Reads until the connection ends and returns how: its bytes and whether the end
/// was a reset (`Err`) or an orderly end of stream (`Ok`).
pub async fn read_to_end<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(STEP, stream.read(&mut buf))
            .await
            .expect("the connection neither ended nor sent in time")
        {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Asserts the connection ends with a reset (not an orderly end of stream).
pub async fn assert_reset(stream: &mut TcpStream, what: &str) {
    let (got, end) = read_to_end(stream).await;
    match end {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected a reset, got {other:?} after {got:?}"),
    }
}

/// Asserts a connection the proxy resets before it could be used ends with a
/// reset, at the connect or at the first read.
pub async fn assert_reset_early(connected: io::Result<TcpStream>, what: &str) {
    match connected {
        Ok(mut stream) => assert_reset(&mut stream, what).await,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected a reset, connect failed with {e}"),
    }
}

/// The metrics as Prometheus text, for failure messages.
pub fn metrics_text(metrics: &ProxyMetrics) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// Connects to `addr` until the connect is refused (a listener that closed), for
/// at most [`STEP`]; a connection that still got through is dropped at once.
pub async fn assert_refuses_connections(addr: SocketAddr, what: &str) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return,
            // Accepted before the listener closed, and reset by its handler.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{what}: connect failed with {e}, not refused"),
            Ok(stream) => drop(stream),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still accepting connections after {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Resets `stream` (RST), as an app that aborts does.
pub fn abort(stream: TcpStream) {
    proxy_core::listen::reset(stream);
}
