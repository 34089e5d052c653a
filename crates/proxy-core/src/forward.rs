//! The bidirectional forwarder: moves bytes between a downstream (the client side of
//! the proxy) and an upstream (the server side), in both directions at once.
//!
//! It owns the rules every forwarded connection follows, whatever carries it:
//! - a clean end of stream (EOF) on one side is passed on as a half-close
//!   (`shutdown(Write)`) to the other side, while the reverse direction keeps flowing;
//! - an error of one side is never turned into a clean close: [`forward_tcp`] resets
//!   (`SO_LINGER` 0, then close) both sockets so a truncated stream cannot pass for a
//!   complete one;
//! - a connection with no byte in either direction for [`ForwardConfig::idle_timeout`]
//!   is aborted;
//! - bytes are counted per chunk into shared [`ByteCounters`] (atomic adds only) and
//!   per connection into [`ForwardStats`];
//! - memory is bounded: between two plain sockets ([`tcp`]) chunks pass through
//!   one buffer per worker thread, a connection keeping only what a blocked write
//!   left over, and a bulk direction moves to a kernel pipe with zero-copy
//!   `splice(2)` on Linux ([`splice`]); other streams get a fixed buffer per
//!   direction ([`copy`]).
//!
//! One connection costs one task: both directions are polled by the same future, and
//! the per-chunk path neither allocates nor takes a lock.
//!
//! It deliberately does not decide where a connection goes, detect protocols
//! (`detect`), speak TLS or HTTP, or own metrics registration: the caller hands in
//! connected streams and the counters to bump. Connecting is offered as
//! [`connect_upstream`] so the connect timeout and its error share this module's
//! blame rules.
//!
//! `splice(2)` into a socket whose peer is gone raises `SIGPIPE` (it has no
//! `MSG_NOSIGNAL`); Rust's runtime ignores `SIGPIPE` before `main`, which this module
//! relies on, so such a write fails with `EPIPE` instead of killing the process.

mod copy;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod splice;
mod tcp;

use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::outcome::{Outcome, Reason};

/// Default [`ForwardConfig::idle_timeout`]: one hour, the default of Envoy's TCP proxy
/// that mesh users already expect. Long enough for pooled database connections that
/// idle between bursts, short enough to reclaim connections whose peer vanished
/// without a FIN or RST.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Default [`ForwardConfig::buffer_size`] of the copy loop, per direction: 16 KiB is
/// the largest TLS record's plaintext, so one read of a TLS stream fills it with a
/// whole record, and a connection costs 32 KiB of buffers in total (320 MiB for 10,000
/// connections). On loopback a 64 KiB buffer moved roughly 10% more bytes per second
/// in the forward bench, about the size of its run-to-run noise: not worth four
/// times the memory per connection.
pub const DEFAULT_BUFFER_SIZE: usize = 16 * 1024;

/// Default timeout of [`connect_upstream`]: a loopback or in-cluster connect takes
/// microseconds to milliseconds, and 10 s tolerates a few SYN retransmissions (1 s,
/// 3 s) before the client is told the upstream is unreachable.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Smallest buffer the copy loop accepts, so a misconfigured size of 0 cannot turn
/// every read into an end of stream.
const MIN_BUFFER_SIZE: usize = 512;

pub use crate::outcome::Side;

/// How one connection is forwarded.
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// The connection is aborted once no byte moved in either direction for this long.
    /// `Duration::ZERO` disables the timeout (as Envoy's `idle_timeout: 0s` does).
    pub idle_timeout: Duration,
    /// Size in bytes of the copy loop's buffer for streams other than two plain
    /// sockets, one per direction, allocated once per connection. Values below 512
    /// are raised to 512. Two plain sockets share a per-thread buffer instead.
    pub buffer_size: usize,
    /// Let a bulk direction between two plain TCP sockets switch to `splice(2)`
    /// through a pipe of its own (Linux). It keeps copying when a pipe cannot be
    /// created.
    pub splice: bool,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            buffer_size: DEFAULT_BUFFER_SIZE,
            splice: cfg!(any(target_os = "linux", target_os = "android")),
        }
    }
}

/// Live byte counters, incremented per chunk (atomic adds only).
///
/// Clones share the same counters, so one set can be registered in a metrics
/// registry and handed to every connection of a listener or route.
#[derive(Clone, Debug, Default)]
pub struct ByteCounters {
    /// Bytes written to the upstream (sent by the client, prefix included).
    pub to_upstream: Counter,
    /// Bytes written to the downstream (sent by the server).
    pub to_downstream: Counter,
}

/// Bytes one connection forwarded, each counted once it was accepted by the
/// receiving side's writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Bytes written to the upstream, the detection prefix included.
    pub to_upstream: u64,
    /// Bytes written to the downstream.
    pub to_downstream: u64,
}

/// What went wrong, at the granularity callers act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorKind {
    /// The side reset or aborted the connection (`ECONNRESET`, `EPIPE`, `ECONNABORTED`).
    Reset,
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// The upstream did not accept the connection within the connect timeout.
    ConnectTimeout,
    /// The upstream refused the connection or could not be reached.
    Connect,
    /// Any other I/O error.
    Io,
}

/// Why a forwarded connection ended abnormally.
///
/// Its `Display` names the side and the cause; the underlying I/O error is the
/// `source`. Expected outcomes cost no allocation: the error is built once, when the
/// connection ends.
#[derive(Debug, thiserror::Error)]
#[error("{}", Described(self))]
pub struct ForwardError {
    side: Side,
    kind: ErrorKind,
    stats: ForwardStats,
    peer: Option<SocketAddr>,
    #[source]
    source: io::Error,
}

/// Renders a [`ForwardError`] without allocating a `String` first.
struct Described<'a>(&'a ForwardError);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        match e.kind {
            ErrorKind::Reset => write!(f, "{} reset the connection", e.side)?,
            ErrorKind::IdleTimeout => {
                f.write_str("connection idle for longer than the idle timeout")?
            }
            ErrorKind::ConnectTimeout => f.write_str("upstream connect timed out")?,
            ErrorKind::Connect => f.write_str("cannot connect to upstream")?,
            ErrorKind::Io => write!(f, "{} I/O error", e.side)?,
        }
        if let Some(peer) = e.peer {
            write!(f, " (peer {peer})")?;
        }
        write!(
            f,
            " after {} bytes to upstream and {} bytes to downstream",
            e.stats.to_upstream, e.stats.to_downstream
        )
    }
}

impl ForwardError {
    fn new(side: Side, source: io::Error, stats: ForwardStats) -> Self {
        let kind = if is_reset(&source) {
            ErrorKind::Reset
        } else {
            ErrorKind::Io
        };
        Self {
            side,
            kind,
            stats,
            peer: None,
            source,
        }
    }

    fn idle(stats: ForwardStats) -> Self {
        Self {
            side: Side::Local,
            kind: ErrorKind::IdleTimeout,
            stats,
            peer: None,
            source: io::ErrorKind::TimedOut.into(),
        }
    }

    /// A connection to `addr` that could not be made; `side` is
    /// [`Side::Local`] when the proxy's own socket failed before any packet left.
    pub(crate) fn connect_failed(side: Side, addr: SocketAddr, source: io::Error) -> Self {
        Self {
            side,
            kind: ErrorKind::Connect,
            stats: ForwardStats::default(),
            peer: Some(addr),
            source,
        }
    }

    fn with_peer(mut self, peer: Option<SocketAddr>) -> Self {
        self.peer = peer;
        self
    }

    /// The side that failed. An idle timeout is [`Side::Local`]: the proxy ended it.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Whether the connection was aborted because it was idle.
    pub fn is_idle_timeout(&self) -> bool {
        self.kind == ErrorKind::IdleTimeout
    }

    /// Whether the upstream connect timed out ([`connect_upstream`]).
    pub fn is_connect_timeout(&self) -> bool {
        self.kind == ErrorKind::ConnectTimeout
    }

    /// Whether [`side`](Self::side) reset or aborted the connection.
    pub fn is_reset(&self) -> bool {
        self.kind == ErrorKind::Reset
    }

    /// Bytes forwarded in each direction before the error.
    pub fn stats(&self) -> ForwardStats {
        self.stats
    }

    /// The peer address of the failed side, when known ([`connect_upstream`] and
    /// [`forward_tcp`] record it).
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// How the connection ended, for its close label, reset and log line.
    pub fn outcome(&self) -> Outcome {
        let reason = match self.kind {
            ErrorKind::IdleTimeout => Reason::IdleTimeout,
            ErrorKind::ConnectTimeout => Reason::ConnectTimeout,
            ErrorKind::Connect => Reason::ConnectError,
            ErrorKind::Reset => Reason::Reset,
            ErrorKind::Io => Reason::Error,
        };
        Outcome::new(self.side, reason)
    }

    /// The metric label for why the connection closed: `idle_timeout`,
    /// `connect_timeout`, `connect_error`, `upstream_reset`, `downstream_reset`, `upstream_error`,
    /// `downstream_error`, `local_error` or `policy` ([`Outcome::close_label`]).
    pub fn close_reason(&self) -> &'static str {
        self.outcome().close_label()
    }
}

/// A tunnel stream its peer reset (HTTP/2 `RST_STREAM` or `GOAWAY`) reads as
/// `ConnectionReset` too: the tunnel maps it so when it turns h2's error into I/O.
fn is_reset(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Which end of one direction failed: its source (read) or its destination (write).
#[derive(Debug)]
enum End {
    Src,
    Dst,
    /// The proxy's own resource in between, such as the splice pipe.
    Local,
}

/// The error of one direction, before it is attributed to a [`Side`].
#[derive(Debug)]
struct DirError {
    end: End,
    error: io::Error,
}

impl DirError {
    fn src(error: io::Error) -> Self {
        Self {
            end: End::Src,
            error,
        }
    }

    fn dst(error: io::Error) -> Self {
        Self {
            end: End::Dst,
            error,
        }
    }

    fn local(error: io::Error) -> Self {
        Self {
            end: End::Local,
            error,
        }
    }

    /// Attributes the error to a side, given which side the direction reads from.
    fn into_forward(self, src: Side, dst: Side, stats: ForwardStats) -> ForwardError {
        let side = match self.end {
            End::Src => src,
            End::Dst => dst,
            End::Local => Side::Local,
        };
        ForwardError::new(side, self.error, stats)
    }
}

/// The idle deadline shared by both directions of one connection.
///
/// Activity only records a timestamp; the timer is re-armed lazily when it fires, so
/// a busy connection never touches the timer wheel per chunk.
struct IdleTimer {
    timeout: Option<Duration>,
    last_activity: Instant,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout: (!timeout.is_zero()).then_some(timeout),
            last_activity: Instant::now(),
        }
    }

    fn deadline(&self) -> Instant {
        match self.timeout {
            // An overflowing deadline is as good as none.
            Some(t) => self.last_activity.checked_add(t).unwrap_or_else(far_future),
            None => far_future(),
        }
    }

    /// Ready once the connection has been idle for the whole timeout.
    fn poll_expired(
        &mut self,
        cx: &mut Context<'_>,
        active: bool,
        mut sleep: Pin<&mut Sleep>,
    ) -> Poll<()> {
        if self.timeout.is_none() {
            return Poll::Pending;
        }
        if active {
            self.last_activity = Instant::now();
        }
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.deadline();
            if deadline <= Instant::now() {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

fn far_future() -> Instant {
    // About 30 years, as tokio's own "never" does; far enough, and cannot overflow.
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// Forwards between two plain TCP sockets until both directions have ended.
///
/// `prefix` holds bytes already read from `downstream` (by protocol detection); they
/// reach `upstream` before anything else. Small chunks are read and written straight
/// through a per-thread buffer; with `cfg.splice` on Linux, a direction whose reads
/// fill that buffer (a bulk flow) moves on through a kernel pipe with `splice(2)`,
/// its bytes never entering user space.
///
/// A clean EOF on one side half-closes (`shutdown(Write)`) the other and the reverse
/// direction keeps flowing; the call returns once both directions ended. On an error
/// of either side, or the idle timeout, both sockets are reset (`SO_LINGER` 0, then
/// close) so neither peer mistakes a truncated stream for a complete one; the error
/// says which side failed. Both sockets get `TCP_NODELAY`: the proxy must not add
/// Nagle delay on top of the application's own choice.
pub async fn forward_tcp(
    mut downstream: TcpStream,
    mut upstream: TcpStream,
    prefix: &[u8],
    cfg: &ForwardConfig,
    counters: &ByteCounters,
) -> Result<ForwardStats, ForwardError> {
    for s in [&downstream, &upstream] {
        if let Err(e) = s.set_nodelay(true) {
            // Only latency suffers; the connection itself is fine.
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a forwarded socket");
        }
    }
    match forward_tcp_inner(&mut downstream, &mut upstream, prefix, cfg, counters).await {
        Ok(stats) => Ok(stats),
        Err(e) => {
            let peer = match e.side {
                Side::Downstream => downstream.peer_addr().ok(),
                Side::Upstream => upstream.peer_addr().ok(),
                Side::Peer | Side::Local | Side::Policy => None,
            };
            reset(&downstream);
            reset(&upstream);
            Err(e.with_peer(peer))
        }
    }
}

async fn forward_tcp_inner(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    prefix: &[u8],
    cfg: &ForwardConfig,
    counters: &ByteCounters,
) -> Result<ForwardStats, ForwardError> {
    tcp::forward(downstream, upstream, prefix, cfg, counters).await
}

/// Aborts a socket: `SO_LINGER` 0 turns the close into an RST, which the peer reads
/// as `ECONNRESET` rather than a clean end of stream.
fn reset(stream: &TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        // The close that follows then sends a FIN; nothing better is possible.
        tracing::debug!(error = %e, "cannot set SO_LINGER 0 before resetting a socket");
    }
}

/// Forwards between any two byte streams (TLS, HTTP/2 CONNECT streams, upgraded
/// HTTP) with the copy loop, until both directions have ended.
///
/// Same rules as [`forward_tcp`] for the prefix, half-close (`poll_shutdown` of the
/// other side on EOF), idle timeout and counting. Written data is flushed whenever the
/// reading side has nothing more for now, so buffered writers (TLS) never hold bytes
/// back. On error the streams are dropped as they are: resetting a generic stream
/// (an RST, an HTTP/2 `RST_STREAM`) is the caller's job.
pub async fn forward_io<D, U>(
    mut downstream: D,
    mut upstream: U,
    prefix: &[u8],
    cfg: &ForwardConfig,
    counters: &ByteCounters,
) -> Result<ForwardStats, ForwardError>
where
    D: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    copy::forward(&mut downstream, &mut upstream, prefix, cfg, counters).await
}

/// Connects to an upstream within `timeout`, with blame set for the forwarder's
/// rules: a refusal or unreachable host is an [`Side::Upstream`] error naming the
/// address (`close_reason() == "connect_error"`), and a timeout is
/// [`ForwardError::is_connect_timeout`] (`close_reason() == "connect_timeout"`).
pub async fn connect_upstream(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ForwardError> {
    connect_within(TcpStream::connect(addr), addr, timeout).await
}

/// [`connect_upstream`]'s timeout and blame around any connect future (one that
/// started from a socket the caller made, say).
pub(crate) async fn connect_within(
    connect: impl Future<Output = io::Result<TcpStream>>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ForwardError> {
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ForwardError::connect_failed(Side::Upstream, addr, e)),
        Err(_elapsed) => Err(ForwardError {
            side: Side::Upstream,
            kind: ErrorKind::ConnectTimeout,
            stats: ForwardStats::default(),
            peer: Some(addr),
            source: io::ErrorKind::TimedOut.into(),
        }),
    }
}

/// The two directions of one connection, as one pollable state.
///
/// `poll_up` moves bytes downstream -> upstream and `poll_down` the reverse; each
/// returns `Ready(Ok)` once its direction ended cleanly (EOF passed on) and is not
/// polled again after that.
trait Directions {
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DirError>>;
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DirError>>;
    /// Running totals of both directions.
    fn stats(&self) -> ForwardStats;
}

/// Drives both directions of one connection to completion within one future.
///
/// The first error, or the idle timeout, ends the whole connection at once; a
/// direction that ended cleanly leaves the other one running (half-close).
async fn drive<T: Directions>(
    idle_timeout: Duration,
    mut dirs: T,
) -> Result<ForwardStats, ForwardError> {
    let mut idle = IdleTimer::new(idle_timeout);
    let mut sleep = pin!(tokio::time::sleep_until(idle.deadline()));
    let mut up_done = false;
    let mut down_done = false;
    poll_fn(|cx| {
        let before = dirs.stats();
        if !up_done {
            match dirs.poll_up(cx) {
                Poll::Ready(Ok(())) => up_done = true,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(e.into_forward(
                        Side::Downstream,
                        Side::Upstream,
                        dirs.stats(),
                    )));
                }
                Poll::Pending => {}
            }
        }
        if !down_done {
            match dirs.poll_down(cx) {
                Poll::Ready(Ok(())) => down_done = true,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(e.into_forward(
                        Side::Upstream,
                        Side::Downstream,
                        dirs.stats(),
                    )));
                }
                Poll::Pending => {}
            }
        }
        let after = dirs.stats();
        if up_done && down_done {
            return Poll::Ready(Ok(after));
        }
        if idle
            .poll_expired(cx, after != before, sleep.as_mut())
            .is_ready()
        {
            return Poll::Ready(Err(ForwardError::idle(after)));
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {

    #[test]
    fn tunnel_stream_resets_count_as_resets() {
        let cancelled = crate::tunnel::h2_io_error(h2::Error::from(h2::Reason::CANCEL));
        let reset = ForwardError::new(Side::Downstream, cancelled, ForwardStats::default());
        assert!(reset.is_reset(), "{reset}");
        assert_eq!(reset.close_reason(), "downstream_reset");
        let other = ForwardError::new(
            Side::Downstream,
            io::Error::other("disk on fire"),
            ForwardStats::default(),
        );
        assert_eq!(other.close_reason(), "downstream_error");
    }
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn connection_futures_are_send_and_small() {
        // One task per connection: the future must be Send to be spawned, and small
        // because thousands of them live at once (buffers are on the heap).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let a = TcpStream::connect(addr).await.unwrap();
            let (b, _) = listener.accept().await.unwrap();
            let cfg = ForwardConfig::default();
            let counters = ByteCounters::default();
            let fut = forward_tcp(a, b, b"", &cfg, &counters);
            assert_send(&fut);
            let size = std::mem::size_of_val(&fut);
            assert!(size <= 2048, "forward_tcp future is {size} bytes");
            drop(fut);
            let (x, _) = tokio::io::duplex(64);
            let (y, _) = tokio::io::duplex(64);
            let fut = forward_io(x, y, b"", &cfg, &counters);
            assert_send(&fut);
        });
    }

    #[test]
    fn close_reasons_name_side_and_cause() {
        let stats = ForwardStats::default();
        let reset = ForwardError::new(Side::Upstream, io::ErrorKind::ConnectionReset.into(), stats);
        assert!(reset.is_reset());
        assert_eq!(reset.close_reason(), "upstream_reset");
        assert!(
            reset
                .to_string()
                .starts_with("upstream reset the connection")
        );
        let err = ForwardError::new(Side::Downstream, io::ErrorKind::TimedOut.into(), stats);
        assert!(!err.is_reset());
        assert_eq!(err.close_reason(), "downstream_error");
        let idle = ForwardError::idle(ForwardStats {
            to_upstream: 3,
            to_downstream: 4,
        });
        assert!(idle.is_idle_timeout());
        assert_eq!(idle.side(), Side::Local);
        assert_eq!(idle.close_reason(), "idle_timeout");
        assert!(
            idle.to_string()
                .contains("3 bytes to upstream and 4 bytes to downstream")
        );
        let local = ForwardError::new(Side::Local, io::ErrorKind::OutOfMemory.into(), stats);
        assert_eq!(local.close_reason(), "local_error");
    }
}
