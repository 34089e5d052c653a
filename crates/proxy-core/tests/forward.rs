//! In-process tests of the forwarder over loopback sockets: bulk transfers with
//! checksums, half-close, reset propagation, idle timeout, server-speaks-first through
//! detection, and many concurrent connections. Each behaviour runs on both the copy
//! loop and the splice path.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use proxy_core::detect::{DetectConfig, Protocol, detect};
use proxy_core::forward::{
    ByteCounters, ForwardConfig, ForwardError, ForwardStats, Side, connect_upstream, forward_io,
    forward_tcp,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const MIB: usize = 1024 * 1024;

/// Awaits `fut`, failing the test with `what` if it takes longer than `secs`.
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
}

/// How [`connect_upstream`] to `addr` fails, within 10 s.
async fn connect_error(addr: SocketAddr, timeout: Duration) -> ForwardError {
    within(10, "connect", connect_upstream(addr, timeout))
        .await
        .expect_err("the connect must fail")
}

fn config(splice: bool) -> ForwardConfig {
    ForwardConfig {
        splice,
        ..ForwardConfig::default()
    }
}

/// What the in-process proxy reports for one connection.
#[derive(Debug)]
struct Outcome {
    detected: Option<(Protocol, bool)>,
    result: Result<ForwardStats, ForwardError>,
}

/// A listener on 127.0.0.1 that forwards every accepted connection to `upstream`,
/// optionally after protocol detection. Aborted on drop.
struct Proxy {
    addr: SocketAddr,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    counters: ByteCounters,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    async fn start(
        upstream: SocketAddr,
        cfg: ForwardConfig,
        detection: Option<DetectConfig>,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, outcomes) = mpsc::unbounded_channel();
        let counters = ByteCounters::default();
        let shared = counters.clone();
        let task = tokio::spawn(async move {
            loop {
                let (mut down, _) = listener.accept().await.unwrap();
                let (tx, cfg, counters, detection) =
                    (tx.clone(), cfg.clone(), shared.clone(), detection.clone());
                tokio::spawn(async move {
                    let (prefix, detected) = match detection {
                        Some(dc) => {
                            let d = detect(&mut down, &dc).await.unwrap();
                            (d.prefix.freeze(), Some((d.protocol, d.timed_out)))
                        }
                        None => (bytes::Bytes::new(), None),
                    };
                    let up = connect_upstream(upstream, Duration::from_secs(5))
                        .await
                        .unwrap();
                    let result = forward_tcp(down, up, &prefix, &cfg, &counters).await;
                    let _ = tx.send(Outcome { detected, result });
                });
            }
        });
        Proxy {
            addr,
            outcomes,
            counters,
            task,
        }
    }

    async fn outcome(&mut self) -> Outcome {
        within(30, "the forwarder's outcome", self.outcomes.recv())
            .await
            .unwrap()
    }
}

/// A listener on 127.0.0.1 and the address to give the proxy as upstream.
async fn upstream_listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// Deterministic pseudo-random bytes (xorshift64*), eight at a time.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_exact_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            chunk.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
    }
}

/// An order-sensitive checksum (FNV-1a over 64-bit words) that gives the same value
/// however the stream is cut into reads.
#[derive(Default)]
struct Digest {
    state: u64,
    len: u64,
    carry: [u8; 8],
    carried: usize,
}

impl Digest {
    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.carried > 0 {
            let take = (8 - self.carried).min(data.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&data[..take]);
            self.carried += take;
            data = &data[take..];
            if self.carried < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.carry));
            self.carried = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.mix(u64::from_le_bytes(w.try_into().unwrap()));
        }
        let rest = words.remainder();
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
    }

    fn mix(&mut self, w: u64) {
        self.state = (self.state ^ w).wrapping_mul(0x0000_0100_0000_01b3) ^ 0xcbf2_9ce4_8422_2325;
    }

    fn finish(mut self) -> (u64, u64) {
        if self.carried > 0 {
            let mut last = [0u8; 8];
            last[..self.carried].copy_from_slice(&self.carry[..self.carried]);
            self.mix(u64::from_le_bytes(last));
        }
        (self.len, self.state)
    }
}

/// Writes `len` pattern bytes (a multiple of 8), then half-closes; returns the checksum.
async fn send_pattern<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, len: usize) -> (u64, u64) {
    let mut pattern = Pattern(seed);
    let mut digest = Digest::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        pattern.fill(&mut buf[..n]);
        digest.update(&buf[..n]);
        w.write_all(&buf[..n]).await.unwrap();
        left -= n;
    }
    w.shutdown().await.unwrap();
    digest.finish()
}

/// Reads to EOF; returns the checksum of everything read.
async fn receive_digest<R: AsyncRead + Unpin>(r: &mut R) -> (u64, u64) {
    let mut digest = Digest::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            return digest.finish();
        }
        digest.update(&buf[..n]);
    }
}

#[test]
fn digest_ignores_how_the_stream_is_cut() {
    let mut data = vec![0u8; 1000];
    Pattern(7).fill(&mut data);
    let mut whole = Digest::default();
    whole.update(&data[..997]);
    let mut parts = Digest::default();
    for piece in data[..997].chunks(13) {
        parts.update(piece);
    }
    assert_eq!(whole.finish(), parts.finish());
    let mut swapped = data[..997].to_vec();
    swapped.swap(0, 9);
    let mut other = Digest::default();
    other.update(&swapped);
    let mut again = Digest::default();
    again.update(&data[..997]);
    assert_ne!(other.finish(), again.finish());
}

/// 100 MiB each way at the same time, checksums compared end to end.
async fn bulk_both_ways(splice: bool) {
    const LEN: usize = 100 * MIB;
    let (server, up_addr) = upstream_listener().await;
    let mut proxy = Proxy::start(up_addr, config(splice), None).await;
    let server = tokio::spawn(async move {
        let (s, _) = server.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        let sent = tokio::spawn(async move { send_pattern(&mut w, 2, LEN).await });
        let received = receive_digest(&mut r).await;
        (sent.await.unwrap(), received)
    });
    let client = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut r, mut w) = client.into_split();
    let sent = tokio::spawn(async move { send_pattern(&mut w, 1, LEN).await });
    let client_received = within(120, "client receiving 100 MiB", receive_digest(&mut r)).await;
    let client_sent = within(120, "client sending 100 MiB", sent).await.unwrap();
    let (server_sent, server_received) = within(120, "server side", server).await.unwrap();

    assert_eq!(client_sent.0, LEN as u64);
    assert_eq!(server_received, client_sent, "client -> server checksum");
    assert_eq!(client_received, server_sent, "server -> client checksum");
    let stats = proxy.outcome().await.result.unwrap();
    let want = ForwardStats {
        to_upstream: LEN as u64,
        to_downstream: LEN as u64,
    };
    assert_eq!(stats, want);
    assert_eq!(proxy.counters.to_upstream.get(), LEN as u64);
    assert_eq!(proxy.counters.to_downstream.get(), LEN as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_100_mib_each_way_copy() {
    bulk_both_ways(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_100_mib_each_way_splice() {
    bulk_both_ways(true).await;
}

async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
    let mut out = Vec::new();
    within(10, "read to EOF", r.read_to_end(&mut out))
        .await
        .unwrap();
    out
}

/// The client shuts down its write side first; the server still answers after
/// seeing the EOF, and the reply reaches the client.
async fn client_half_close(splice: bool) {
    let (server, up_addr) = upstream_listener().await;
    let mut proxy = Proxy::start(up_addr, config(splice), None).await;
    let server = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let request = read_to_end(&mut s).await;
        s.write_all(b"reply to ").await.unwrap();
        s.write_all(&request).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut client).await, b"reply to request");
    within(10, "server", server).await.unwrap();
    let stats = proxy.outcome().await.result.unwrap();
    assert_eq!((stats.to_upstream, stats.to_downstream), (7, 16));
}

/// The server shuts down its write side first (a banner, then EOF); the client still
/// sends afterwards and the server receives it.
async fn server_half_close(splice: bool) {
    let (server, up_addr) = upstream_listener().await;
    let mut proxy = Proxy::start(up_addr, config(splice), None).await;
    let server = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        s.write_all(b"banner").await.unwrap();
        s.shutdown().await.unwrap();
        read_to_end(&mut s).await
    });
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(read_to_end(&mut client).await, b"banner");
    // Sent after the server's EOF reached the client: the other direction still flows.
    client.write_all(b"late data").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(within(10, "server", server).await.unwrap(), b"late data");
    let stats = proxy.outcome().await.result.unwrap();
    assert_eq!((stats.to_upstream, stats.to_downstream), (9, 6));
}

#[tokio::test]
async fn client_half_close_copy() {
    client_half_close(false).await;
}

#[tokio::test]
async fn client_half_close_splice() {
    client_half_close(true).await;
}

#[tokio::test]
async fn server_half_close_copy() {
    server_half_close(false).await;
}

#[tokio::test]
async fn server_half_close_splice() {
    server_half_close(true).await;
}

/// Reads until the stream ends; returns the bytes and how it ended.
async fn read_until_end<R: AsyncRead + Unpin>(r: &mut R) -> (usize, io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match within(10, "read until the stream ends", r.read(&mut buf)).await {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n,
            Err(e) => return (total, Err(e)),
        }
    }
}

/// The upstream resets mid-stream: the client must see a reset, never a clean EOF
/// that would pass for a complete response.
async fn upstream_reset(splice: bool) {
    let (server, up_addr) = upstream_listener().await;
    let mut proxy = Proxy::start(up_addr, config(splice), None).await;
    let server = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        // The client's request proves the forwarder runs before the reset.
        let mut request = [0u8; 3];
        s.read_exact(&mut request).await.unwrap();
        s.write_all(&[7u8; 256 * 1024]).await.unwrap();
        s.set_zero_linger().unwrap();
        drop(s);
    });
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"GET").await.unwrap();
    within(10, "server", server).await.unwrap();
    let (read, end) = read_until_end(&mut client).await;
    let err = end.expect_err("the client saw a clean EOF after an upstream reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert!(read <= 256 * 1024);
    let err = proxy.outcome().await.result.unwrap_err();
    assert_eq!(err.side(), Side::Upstream, "{err}");
    assert!(err.is_reset(), "{err}");
    assert_eq!(err.close_reason(), "upstream_reset");
}

/// The client resets: the server must see a reset too.
async fn downstream_reset(splice: bool) {
    let (server, up_addr) = upstream_listener().await;
    let mut proxy = Proxy::start(up_addr, config(splice), None).await;
    let server = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        read_until_end(&mut s).await
    });
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"partial req").await.unwrap();
    // Wait until the forwarder has passed the bytes on, so the reset hits mid-stream.
    let echoed = within(10, "bytes through the forwarder", async {
        while proxy.counters.to_upstream.get() < 11 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    echoed.await;
    client.set_zero_linger().unwrap();
    drop(client);
    let (read, end) = within(10, "server", server).await.unwrap();
    let err = end.expect_err("the server saw a clean EOF after a client reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert!(read <= 11);
    let err = proxy.outcome().await.result.unwrap_err();
    assert_eq!(err.side(), Side::Downstream, "{err}");
    assert!(err.is_reset(), "{err}");
    assert_eq!(err.close_reason(), "downstream_reset");
}

#[tokio::test]
async fn upstream_reset_resets_client_copy() {
    upstream_reset(false).await;
}

#[tokio::test]
async fn upstream_reset_resets_client_splice() {
    upstream_reset(true).await;
}

#[tokio::test]
async fn downstream_reset_resets_server_copy() {
    downstream_reset(false).await;
}

#[tokio::test]
async fn downstream_reset_resets_server_splice() {
    downstream_reset(true).await;
}

/// A connected client and server with `forward_tcp` running between them in a task.
async fn connected(
    cfg: ForwardConfig,
    prefix: &'static [u8],
) -> (
    TcpStream,
    TcpStream,
    JoinHandle<Result<ForwardStats, ForwardError>>,
) {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (server, up_addr) = upstream_listener().await;
    let client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (down, _) = front.accept().await.unwrap();
    let up = TcpStream::connect(up_addr).await.unwrap();
    let (server, _) = server.accept().await.unwrap();
    let task =
        tokio::spawn(
            async move { forward_tcp(down, up, prefix, &cfg, &ByteCounters::default()).await },
        );
    (client, server, task)
}

/// With time paused, an idle connection is aborted after exactly the idle timeout,
/// and both peers see a reset.
async fn idle_timeout(splice: bool) {
    const IDLE: Duration = Duration::from_secs(600);
    let cfg = ForwardConfig {
        idle_timeout: IDLE,
        ..config(splice)
    };
    let (mut client, mut server, task) = connected(cfg, b"").await;
    // One round trip so the forwarder is running before time stops.
    client.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    within(10, "first byte", server.read_exact(&mut one))
        .await
        .unwrap();

    tokio::time::pause();
    let start = tokio::time::Instant::now();
    // Virtual time: this waits for no wall-clock second.
    let result = tokio::time::timeout(IDLE * 3, task)
        .await
        .expect("forwarder still running")
        .unwrap();
    let idle_for = start.elapsed();
    tokio::time::resume();

    let err = result.unwrap_err();
    assert!(err.is_idle_timeout(), "{err}");
    assert_eq!(err.close_reason(), "idle_timeout");
    assert_eq!(err.stats().to_upstream, 1);
    assert!(
        idle_for >= IDLE,
        "closed after {idle_for:?} of virtual time"
    );
    let (_, end) = read_until_end(&mut client).await;
    assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    let (_, end) = read_until_end(&mut server).await;
    assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn idle_timeout_closes_idle_connection_copy() {
    idle_timeout(false).await;
}

#[tokio::test]
async fn idle_timeout_closes_idle_connection_splice() {
    idle_timeout(true).await;
}

/// Traffic in either direction keeps a connection alive past the idle timeout.
/// Real time here: paused time races the reactor when sockets are busy.
async fn activity_defers_idle_timeout(splice: bool) {
    let cfg = ForwardConfig {
        idle_timeout: Duration::from_secs(2),
        ..config(splice)
    };
    let (mut client, mut server, task) = connected(cfg, b"").await;
    let mut one = [0u8; 1];
    // 15 x 200 ms = 3 s of traffic, alternating directions, against a 2 s timeout.
    for i in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if i % 2 == 0 {
            client.write_all(b"c").await.unwrap();
            within(10, "byte to server", server.read_exact(&mut one))
                .await
                .unwrap();
        } else {
            server.write_all(b"s").await.unwrap();
            within(10, "byte to client", client.read_exact(&mut one))
                .await
                .unwrap();
        }
    }
    assert!(
        !task.is_finished(),
        "the connection was closed while active"
    );
    client.shutdown().await.unwrap();
    server.shutdown().await.unwrap();
    let stats = within(10, "forwarder end", task).await.unwrap().unwrap();
    assert_eq!((stats.to_upstream, stats.to_downstream), (8, 7));
}

#[tokio::test]
async fn activity_defers_idle_timeout_copy() {
    activity_defers_idle_timeout(false).await;
}

#[tokio::test]
async fn activity_defers_idle_timeout_splice() {
    activity_defers_idle_timeout(true).await;
}

#[tokio::test]
async fn prefix_reaches_upstream_first() {
    for splice in [false, true] {
        let (mut client, mut server, task) = connected(config(splice), b"GET / HTTP/1.1\r\n").await;
        client.write_all(b"Host: a\r\n\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(
            read_to_end(&mut server).await,
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        server.shutdown().await.unwrap();
        let stats = within(10, "forwarder end", task).await.unwrap().unwrap();
        assert_eq!(stats.to_upstream, 27, "splice={splice}");
    }
}

/// A server-speaks-first protocol (an SMTP-like banner): the client sends nothing,
/// detection times out, and the connection is forwarded as opaque.
async fn server_speaks_first(splice: bool) {
    let (server, up_addr) = upstream_listener().await;
    let detection = DetectConfig {
        timeout: Duration::from_millis(100),
        ..DetectConfig::default()
    };
    let mut proxy = Proxy::start(up_addr, config(splice), Some(detection)).await;
    let server = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        s.write_all(b"220 mail.example ESMTP ready\r\n")
            .await
            .unwrap();
        let mut line = [0u8; 6];
        s.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"QUIT\r\n");
        s.write_all(b"221 bye\r\n").await.unwrap();
        s.shutdown().await.unwrap();
        read_to_end(&mut s).await
    });
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let mut banner = [0u8; 30];
    within(10, "banner", client.read_exact(&mut banner))
        .await
        .unwrap();
    assert_eq!(&banner, b"220 mail.example ESMTP ready\r\n");
    client.write_all(b"QUIT\r\n").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut client).await, b"221 bye\r\n");
    assert_eq!(within(10, "server", server).await.unwrap(), b"");
    let outcome = proxy.outcome().await;
    assert_eq!(outcome.detected, Some((Protocol::Opaque, true)));
    assert_eq!(outcome.result.unwrap().to_downstream, 39);
}

#[tokio::test]
async fn server_speaks_first_after_detection_timeout_copy() {
    server_speaks_first(false).await;
}

#[tokio::test]
async fn server_speaks_first_after_detection_timeout_splice() {
    server_speaks_first(true).await;
}

/// Many connections at once through one proxy, each echoing its own pattern.
async fn many_concurrent(splice: bool) {
    const CONNS: u64 = 100;
    const LEN: usize = 256 * 1024;
    let (server, up_addr) = upstream_listener().await;
    let mut proxy = Proxy::start(up_addr, config(splice), None).await;
    let echo = tokio::spawn(async move {
        loop {
            let (s, _) = server.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
    });
    let mut clients = Vec::new();
    for seed in 1..=CONNS {
        let addr = proxy.addr;
        clients.push(tokio::spawn(async move {
            let (mut r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
            let sent = tokio::spawn(async move { send_pattern(&mut w, seed, LEN).await });
            let received = receive_digest(&mut r).await;
            assert_eq!(received, sent.await.unwrap(), "connection {seed}");
        }));
    }
    for c in clients {
        within(60, "a concurrent connection", c).await.unwrap();
    }
    for _ in 0..CONNS {
        let stats = proxy.outcome().await.result.unwrap();
        assert_eq!(
            (stats.to_upstream, stats.to_downstream),
            (LEN as u64, LEN as u64)
        );
    }
    assert_eq!(proxy.counters.to_upstream.get(), CONNS * LEN as u64);
    assert_eq!(proxy.counters.to_downstream.get(), CONNS * LEN as u64);
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections_copy() {
    many_concurrent(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections_splice() {
    many_concurrent(true).await;
}

/// The generic path over in-memory streams: prefix first, both half-closes, counts.
#[tokio::test]
async fn forward_io_passes_prefix_half_close_and_counts() {
    let (mut client, down) = tokio::io::duplex(1024);
    let (up, mut server) = tokio::io::duplex(1024);
    let counters = ByteCounters::default();
    let shared = counters.clone();
    let task =
        tokio::spawn(async move { forward_io(down, up, b"pre:", &config(false), &shared).await });
    client.write_all(b"hello").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut server).await, b"pre:hello");
    server.write_all(b"world").await.unwrap();
    server.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut client).await, b"world");
    let stats = within(10, "forward_io end", task).await.unwrap().unwrap();
    assert_eq!((stats.to_upstream, stats.to_downstream), (9, 5));
    assert_eq!(
        (counters.to_upstream.get(), counters.to_downstream.get()),
        (9, 5)
    );
}

/// A generic stream that fails mid-transfer is blamed on its side.
#[tokio::test]
async fn forward_io_blames_the_failing_side() {
    struct Broken;
    impl AsyncRead for Broken {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }
    impl AsyncWrite for Broken {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }
    let (_client, down) = tokio::io::duplex(1024);
    let err = within(
        10,
        "forward_io",
        forward_io(down, Broken, b"", &config(false), &ByteCounters::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.side(), Side::Upstream);
    assert_eq!(err.close_reason(), "upstream_reset");
}

#[tokio::test]
async fn connect_upstream_names_the_refusing_peer() {
    // Bind then drop: the port is (almost certainly) closed right after.
    let (l, addr) = upstream_listener().await;
    drop(l);
    let err = connect_error(addr, Duration::from_secs(5)).await;
    assert_eq!(err.side(), Side::Upstream);
    assert_eq!(err.peer(), Some(addr));
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(!err.is_connect_timeout());
}

#[tokio::test]
async fn connect_upstream_times_out_on_a_silent_listener() {
    // A listener with a zero backlog that never accepts: once one connection waits in
    // its queue, the kernel drops further SYNs, so the next connect hangs. Real time,
    // with a short timeout: the wait happens in the kernel.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    socket.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(socket.into()).unwrap();
    let addr = listener.local_addr().unwrap();
    let _queued = within(10, "first connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let err = connect_error(addr, Duration::from_millis(300)).await;
    assert!(err.is_connect_timeout(), "{err}");
    assert_eq!(err.close_reason(), "connect_timeout");
    assert_eq!(err.side(), Side::Upstream);
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    drop(listener);
}
