//! HTTP-aware forwarding: once detection has seen HTTP, hyper proxies it request by
//! request so each request, status and latency is counted.
//!
//! The proxy stays transparent: one upstream connection per downstream connection
//! (no re-balancing, no header rewriting), HTTP/1 stays HTTP/1 and HTTP/2 stays
//! HTTP/2, and `Upgrade` (WebSocket) or `CONNECT` exchanges become raw byte streams
//! through [`forward_io`] after the upstream agrees.
//!
//! Bad input is answered here, never forwarded: detection sends here whatever an
//! origin might read as a request (or the HTTP/2 preface), so a head hyper cannot
//! parse gets `400` (too large: `431`) and a close, framing an origin could read
//! differently (see `framing`) gets `400` and a close, a request body the client
//! breaks gets `400` (not `502`), a head that trickles in is cut by
//! [`HttpSettings::header_read_timeout`], and HTTP/2 errors get `RST_STREAM` or
//! `GOAWAY` under the limits of [`H2Settings`], a padded field value `400`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Mutex, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::detect::Protocol;
use crate::forward::{ByteCounters, ForwardConfig, forward_io};
use crate::listen::ConnectionTasks;
use crate::metrics::{Direction, HttpLabels, HttpResponseLabels, ProxyMetrics};
use crate::outcome::{Outcome, Reason, Side};
use crate::tunnel::client::{RefusalCell, StreamRefused};
use crate::tunnel::{H2Settings, Io};

/// Default [`HttpSettings::header_read_timeout`]: ten seconds from a request's first
/// byte to its last header line. Real clients write a head in one go, so this only
/// ever fires on a stalled or hostile client (slowloris), and it bounds how long
/// one can hold a connection slot with a trickle of header bytes.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`HttpSettings::max_headers`]: hyper's own default, more than any browser
/// or gRPC client sends.
pub const DEFAULT_HTTP1_MAX_HEADERS: usize = 100;
/// Default [`HttpSettings::max_buf_size`]: 64 KiB fits the largest heads browsers
/// send (nginx allows 4 x 8 KiB, Envoy 60 KiB).
pub const DEFAULT_HTTP1_MAX_HEAD_BYTES: usize = 64 * 1024;
/// hyper's floor for [`HttpSettings::max_buf_size`] (it panics below it).
pub const MIN_HTTP1_MAX_HEAD_BYTES: usize = 8 * 1024;

/// Limits of the HTTP layer.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// An HTTP/1 request's head must be complete within this time of its FIRST byte;
    /// past it the connection is closed without an answer (as nginx does). The time
    /// a keep-alive connection sits idle between requests is not counted: that is
    /// the idle timeout's business, so the application's own keep-alive behaviour
    /// is unchanged. `None` disables it.
    pub header_read_timeout: Option<Duration>,
    /// Most headers in one HTTP/1 request; more get `431` and a close.
    pub max_headers: usize,
    /// Largest HTTP/1 read buffer, which bounds one request head: a larger head
    /// gets `431` (a longer request line `414`) and a close. At least
    /// [`MIN_HTTP1_MAX_HEAD_BYTES`].
    pub max_buf_size: usize,
    /// The transparent HTTP/2 path's settings, both towards the client and the server.
    pub h2: H2Settings,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
            max_headers: DEFAULT_HTTP1_MAX_HEADERS,
            max_buf_size: DEFAULT_HTTP1_MAX_HEAD_BYTES,
            h2: H2Settings::default(),
        }
    }
}

mod framing;

use framing::{BodyFault, RequestBody, h1_framing, h2_fields};

type ProxyBody = Either<Incoming, Empty<Bytes>>;

/// Why an HTTP-proxied connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP handshake with upstream failed")]
    UpstreamHandshake(#[source] hyper::Error),
    #[error("HTTP connection with downstream failed")]
    Downstream(#[source] hyper::Error),
    #[error("no bytes moved either way for {0:?} (idle timeout)")]
    IdleTimeout(Duration),
    #[error(
        "the client did not finish a request head within {0:?} of its first byte (header read timeout)"
    )]
    HeaderTimeout(Duration),
}

impl HttpError {
    /// How the connection ended. A tunnel refusal behind the error is not read from
    /// it: the caller holds the stream's [`RefusalCell`].
    pub fn outcome(&self) -> Outcome {
        match self {
            HttpError::UpstreamHandshake(_) => Outcome::new(Side::Upstream, Reason::Http),
            HttpError::Downstream(_) => Outcome::new(Side::Downstream, Reason::Http),
            HttpError::IdleTimeout(_) => Outcome::new(Side::Local, Reason::IdleTimeout),
            HttpError::HeaderTimeout(_) => Outcome::new(Side::Downstream, Reason::HeaderTimeout),
        }
    }

    /// The `tcp_close_total` reason of a connection that ended with this error.
    pub fn close_reason(&self) -> &'static str {
        self.outcome().close_label()
    }
}

/// Proxies one HTTP connection.
#[derive(Clone, Debug)]
pub struct HttpProxy {
    pub metrics: ProxyMetrics,
    pub direction: Direction,
    pub settings: HttpSettings,
    pub forward: ForwardConfig,
}

struct Exchange {
    proxy: HttpProxy,
    /// Upgraded streams of this connection.
    upgrades: ConnectionTasks,
    /// Label used when a request carries no authority of its own.
    fallback_authority: Arc<str>,
    counters: ByteCounters,
    /// Where a tunnel upstream's refusal lands, so a failed request can be told
    /// from a refused stream.
    refusal: Option<RefusalCell>,
}

impl HttpProxy {
    /// Serves `downstream` (already detected as `protocol`) against `upstream` until
    /// either side closes or `drain` asks for a graceful end.
    pub async fn serve<D: Io, U: Io>(
        &self,
        downstream: D,
        upstream: U,
        protocol: Protocol,
        fallback_authority: &str,
        drain: CancellationToken,
    ) -> Result<(), HttpError> {
        self.serve_refusable(
            downstream,
            upstream,
            protocol,
            fallback_authority,
            drain,
            None,
        )
        .await
    }

    /// [`serve`](Self::serve) against a tunnel stream whose refusal lands in
    /// `refusal`: a request the refused stream failed ends the connection (the
    /// caller resets the client) instead of being answered `502`.
    pub async fn serve_refusable<D: Io, U: Io>(
        &self,
        downstream: D,
        upstream: U,
        protocol: Protocol,
        fallback_authority: &str,
        drain: CancellationToken,
        refusal: Option<RefusalCell>,
    ) -> Result<(), HttpError> {
        let exchange = Arc::new(Exchange {
            proxy: self.clone(),
            upgrades: ConnectionTasks::default(),
            fallback_authority: self.metrics.authority_label(fallback_authority),
            counters: self.metrics.byte_counters(self.direction),
            refusal,
        });
        // Every byte of an HTTP exchange crosses the downstream side, so watching it
        // alone is enough for the idle timeout the byte forwarder applies elsewhere.
        let clock = Arc::new(IdleClock::new());
        let head = match (protocol, self.settings.header_read_timeout) {
            (Protocol::Http2, _) | (_, None) => None,
            (_, Some(_)) => Some(Arc::new(HeadClock::new())),
        };
        let downstream = Tracked {
            inner: downstream,
            clock: clock.clone(),
            head: head.clone(),
        };
        let idle = clock.idle(self.forward.idle_timeout);
        let served = match protocol {
            Protocol::Http2 => {
                self.serve_h2(downstream, upstream, exchange.clone(), drain, idle)
                    .await
            }
            _ => {
                self.serve_h1(downstream, upstream, exchange.clone(), drain, idle, head)
                    .await
            }
        };
        exchange.upgrades.join().await;
        served
    }

    async fn serve_h1<D: Io, U: Io>(
        &self,
        downstream: D,
        upstream: U,
        exchange: Arc<Exchange>,
        drain: CancellationToken,
        idle: impl Future<Output = ()>,
        head: Option<Arc<HeadClock>>,
    ) -> Result<(), HttpError> {
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, RequestBody>(TokioIo::new(upstream))
            .await
            .map_err(HttpError::UpstreamHandshake)?;
        let closing = closing(drive_upstream(conn.with_upgrades(), "HTTP/1"), &drain);
        // HTTP/1 serves one request at a time, so this lock is never contended.
        let sender = Arc::new(Mutex::new(sender));
        let service_head = head.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let exchange = exchange.clone();
            let sender = sender.clone();
            // The head is complete: its timer stops until the request and its
            // response are both done and the next head's first byte arrives.
            let request = RequestInFlight::start(service_head.clone());
            let framing = h1_framing(&req);
            let fault = BodyFault::default();
            let req = req.map(|body| RequestBody {
                inner: InFlight::new(body, request.clone()),
                fault: fault.clone(),
            });
            async move {
                let response = match framing {
                    Err(why) => exchange.refuse(&req, why),
                    Ok(()) => {
                        let mut sender = sender.lock().await;
                        exchange
                            .forward(req, |req| sender.send_request(req), &fault)
                            .await?
                    }
                };
                Ok::<_, StreamRefused>(response.map(|body| InFlight::new(body, request)))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            // A client may send its request and shut down its write side before the
            // response (`nc -N`, scripted clients): plain TCP serves that, so must we.
            .half_close(true)
            .timer(TokioTimer::new())
            // hyper's own header timer also runs while a keep-alive connection waits
            // for its next request; ours (`head`) starts at the head's first byte.
            .header_read_timeout(None)
            .max_headers(self.settings.max_headers)
            .max_buf_size(self.settings.max_buf_size)
            .serve_connection(TokioIo::new(downstream), service)
            .with_upgrades();
        tokio::pin!(conn);
        let header_timeout = self.settings.header_read_timeout.unwrap_or_default();
        let head_expired = async {
            match &head {
                Some(head) => head.expired(header_timeout).await,
                None => std::future::pending().await,
            }
        };
        // Biased, the connection first: a request whose first bytes detection already
        // read must reach hyper before a drain that began meanwhile is honoured, or
        // the graceful shutdown would close the connection as idle and lose it.
        let result = tokio::select! {
            biased;
            res = conn.as_mut() => res,
            () = head_expired => {
                debug!(timeout = ?header_timeout, "request head not complete in time, closing");
                return Err(HttpError::HeaderTimeout(header_timeout));
            }
            () = closing => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            () = idle => return Err(HttpError::IdleTimeout(self.forward.idle_timeout)),
        };
        result.map_err(HttpError::Downstream)
    }

    async fn serve_h2<D: Io, U: Io>(
        &self,
        downstream: D,
        upstream: U,
        exchange: Arc<Exchange>,
        drain: CancellationToken,
        idle: impl Future<Output = ()>,
    ) -> Result<(), HttpError> {
        let h2 = &self.settings.h2;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .max_header_list_size(h2.max_header_list_size)
            .max_send_buf_size(h2.max_send_buf_size)
            .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
            .handshake::<_, Incoming>(TokioIo::new(upstream))
            .await
            .map_err(HttpError::UpstreamHandshake)?;
        let closing = closing(drive_upstream(conn, "HTTP/2"), &drain);
        let service = service_fn(move |req: Request<Incoming>| {
            let exchange = exchange.clone();
            let mut sender = sender.clone();
            async move {
                if let Err(why) = h2_fields(&req) {
                    return Ok(exchange.refuse(&req, why));
                }
                exchange
                    .forward(req, |req| sender.send_request(req), &BodyFault::default())
                    .await
            }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_concurrent_streams)
            .max_header_list_size(h2.max_header_list_size)
            .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
            .max_send_buf_size(h2.max_send_buf_size)
            .initial_stream_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .serve_connection(TokioIo::new(downstream), service);
        tokio::pin!(conn);
        // Biased, the connection first: a request whose first bytes detection already
        // read must reach hyper before a drain that began meanwhile is honoured, or
        // the graceful shutdown would close the connection as idle and lose it.
        let result = tokio::select! {
            biased;
            res = conn.as_mut() => res,
            () = closing => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            () = idle => return Err(HttpError::IdleTimeout(self.forward.idle_timeout)),
        };
        result.map_err(HttpError::Downstream)
    }
}

/// Drives an upstream client connection in a task of its own; the receiver
/// resolves once the connection has ended.
fn drive_upstream<F>(conn: F, protocol: &'static str) -> oneshot::Receiver<()>
where
    F: Future<Output = hyper::Result<()>> + Send + 'static,
{
    let (closed_tx, closed) = oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "upstream {protocol} connection ended");
        }
        let _ = closed_tx.send(());
    });
    closed
}

/// Resolves when a downstream connection is to close gracefully: the upstream
/// connection ended (the server closed its side: the response in flight finishes,
/// then ours closes too instead of answering the next request with an error), or a
/// drain began.
async fn closing(upstream_closed: oneshot::Receiver<()>, drain: &CancellationToken) {
    tokio::select! {
        biased;
        _ = upstream_closed => {}
        () = drain.cancelled() => {}
    }
}

/// When bytes last moved through a connection, for its idle timeout.
#[derive(Debug)]
struct IdleClock {
    origin: Instant,
    /// Milliseconds after `origin`.
    last: AtomicU64,
}

impl IdleClock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte moved for `timeout`; never when `timeout` is zero.
    async fn idle(&self, timeout: Duration) {
        if timeout.is_zero() {
            return std::future::pending().await;
        }
        loop {
            let last = self.origin + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The header read timeout of one HTTP/1 connection: started by the first byte
/// read while no request is in flight, stopped when hyper hands over the parsed
/// head, and re-armed once that request's body and response are both done.
///
/// hyper's own `header_read_timeout` cannot do this: it runs whenever hyper waits
/// for a head, idle keep-alive time included.
#[derive(Debug)]
pub(crate) struct HeadClock {
    origin: Instant,
    /// [`WAITING`], [`BUSY`], or one plus the milliseconds after `origin` at which
    /// the current head's first byte arrived.
    state: AtomicU64,
    started: tokio::sync::Notify,
}

/// No request in flight and no byte of the next head seen.
const WAITING: u64 = 0;
/// A request is in flight: bytes read are its body, not a head.
const BUSY: u64 = u64::MAX;

impl HeadClock {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            state: AtomicU64::new(WAITING),
            started: tokio::sync::Notify::new(),
        }
    }

    /// Bytes were read from the client.
    fn on_read(&self) {
        if self.state.load(Ordering::Relaxed) != WAITING {
            return;
        }
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(BUSY - 2);
        if self
            .state
            .compare_exchange(WAITING, ms + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.started.notify_one();
        }
    }

    /// Resolves once a head has been coming in for `timeout` without completing.
    pub(crate) async fn expired(&self, timeout: Duration) {
        loop {
            let started = self.started.notified();
            tokio::pin!(started);
            // Registered before the state is read, so a start in between still wakes us.
            started.as_mut().enable();
            let state = self.state.load(Ordering::Acquire);
            if state == WAITING || state == BUSY {
                started.await;
                continue;
            }
            let deadline = self.origin + Duration::from_millis(state - 1) + timeout;
            tokio::time::sleep_until(deadline).await;
            if self.state.load(Ordering::Acquire) == state {
                return;
            }
        }
    }
}

/// One request from its parsed head until both its body and its response are done
/// (the last clone dropped), when the [`HeadClock`] waits for the next head again.
#[derive(Debug)]
pub(crate) struct RequestInFlight(Option<Arc<HeadClock>>);

impl RequestInFlight {
    pub(crate) fn start(clock: Option<Arc<HeadClock>>) -> Arc<Self> {
        if let Some(clock) = &clock {
            clock.state.store(BUSY, Ordering::Release);
        }
        Arc::new(Self(clock))
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        if let Some(clock) = &self.0 {
            let _ =
                clock
                    .state
                    .compare_exchange(BUSY, WAITING, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

/// A body that keeps its request "in flight" until hyper drops it, which it does
/// once the body is fully sent (or abandoned).
#[derive(Debug)]
pub(crate) struct InFlight<B> {
    inner: B,
    _request: Arc<RequestInFlight>,
}

impl<B> InFlight<B> {
    pub(crate) fn new(inner: B, request: Arc<RequestInFlight>) -> Self {
        Self {
            inner,
            _request: request,
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for InFlight<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// An [`Io`] that marks its [`IdleClock`] whenever bytes move through it, and its
/// [`HeadClock`] (if any) whenever bytes arrive.
pub(crate) struct Tracked<T> {
    inner: T,
    clock: Arc<IdleClock>,
    head: Option<Arc<HeadClock>>,
}

impl<T> Tracked<T> {
    /// Tracks only request heads, for a connection with no idle timeout of its own.
    pub(crate) fn head_only(inner: T, head: Option<Arc<HeadClock>>) -> Self {
        Self {
            inner,
            clock: Arc::new(IdleClock::new()),
            head,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.touch();
            if let Some(head) = &this.head {
                head.on_read();
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Exchange {
    /// Forwards one request. A tunnel refusal is returned as an error rather than
    /// answered: the connection is then dropped and the client reset, as for a
    /// refused TCP connection, instead of reading a response the mesh made up.
    ///
    /// A request whose body the client broke (`fault` set: bad chunk framing, a
    /// forbidden trailer) is answered `400` and the connection closed: the client
    /// is to blame, and the upstream connection, cut mid-body, is not reused.
    async fn forward<B, F, Fut>(
        &self,
        mut req: Request<B>,
        send: F,
        fault: &BodyFault,
    ) -> Result<Response<ProxyBody>, StreamRefused>
    where
        F: FnOnce(Request<B>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Incoming>, hyper::Error>>,
    {
        let proxy = &self.proxy;
        let start = Instant::now();
        let authority = match request_authority(&req) {
            Some(a) => proxy.metrics.authority_label(a),
            None => self.fallback_authority.clone(),
        };
        let labels = HttpLabels {
            direction: proxy.direction,
            authority: authority.clone(),
        };
        let wants_upgrade =
            req.method() == http::Method::CONNECT || req.headers().contains_key(header::UPGRADE);
        let downstream_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));

        let sent = send(req).await;
        // Counted once the exchange's outcome is known: a request the client broke
        // mid-body was refused, not forwarded, and may never have reached the
        // upstream at all, so `http_requests` counts only what the upstream was
        // given whole (or failed on).
        if !(sent.is_err() && fault.is_set()) {
            proxy.metrics.http_requests.get_or_create(&labels).inc();
        }
        let response = match sent {
            Ok(mut response) => {
                let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS
                    || (response.status().is_success() && downstream_upgrade.is_some());
                if let (true, Some(downstream)) = (upgraded, downstream_upgrade) {
                    let upstream = hyper::upgrade::on(&mut response);
                    let forward = proxy.forward.clone();
                    let counters = self.counters.clone();
                    self.upgrades.spawn(async move {
                        match tokio::try_join!(downstream, upstream) {
                            Ok((down, up)) => {
                                if let Err(e) = forward_io(
                                    TokioIo::new(down),
                                    TokioIo::new(up),
                                    &[],
                                    &forward,
                                    &counters,
                                )
                                .await
                                {
                                    debug!(error = %e, "upgraded stream ended");
                                }
                            }
                            Err(e) => debug!(error = %e, "upgrade did not complete"),
                        }
                    });
                }
                response.map(Either::Left)
            }
            Err(e) => {
                if let Some(refusal) = self.refusal.as_ref().and_then(RefusalCell::get) {
                    return Err(StreamRefused(refusal));
                }
                if fault.is_set() {
                    debug!(error = %e, authority = %authority, "client sent a broken request body");
                    close_with(StatusCode::BAD_REQUEST)
                } else {
                    debug!(error = %e, authority = %authority, "upstream request failed");
                    let mut response = Response::new(Either::Right(Empty::new()));
                    *response.status_mut() = StatusCode::BAD_GATEWAY;
                    response
                }
            }
        };
        proxy
            .metrics
            .http_responses
            .get_or_create(&HttpResponseLabels {
                direction: proxy.direction,
                authority,
                status: response.status().as_u16(),
            })
            .inc();
        proxy
            .metrics
            .http_latency
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        Ok(response)
    }
}

impl Exchange {
    /// Answers a request the proxy will not forward with `400` and a close, counted
    /// as a response but not as a request: `http_requests` counts what went upstream.
    fn refuse<B>(&self, req: &Request<B>, why: &'static str) -> Response<ProxyBody> {
        let proxy = &self.proxy;
        let authority = match request_authority(req) {
            Some(a) => proxy.metrics.authority_label(a),
            None => self.fallback_authority.clone(),
        };
        debug!(%authority, reason = why, "refused a malformed request");
        let response = close_with(StatusCode::BAD_REQUEST);
        proxy
            .metrics
            .http_responses
            .get_or_create(&HttpResponseLabels {
                direction: proxy.direction,
                authority,
                status: response.status().as_u16(),
            })
            .inc();
        response
    }
}

/// An empty response with `status` that closes the connection after it.
fn close_with(status: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// The authority a request names: its URI's (HTTP/2, absolute-form) or its Host header.
fn request_authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_after_a_quiet_timeout() {
        let clock = Arc::new(IdleClock::new());
        let (a, mut b) = tokio::io::duplex(64);
        let mut tracked = Tracked {
            inner: a,
            clock: clock.clone(),
            head: None,
        };
        let timeout = Duration::from_secs(2);
        let start = Instant::now();
        let idle = clock.idle(timeout);
        tokio::pin!(idle);
        // Bytes each way at 1.5s and 3s keep it alive; quiet from 3s, it fires at 5s.
        tokio::select! {
            () = &mut idle => panic!("idle fired while bytes were moving"),
            () = async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                b.write_all(b"in").await.unwrap();
                let mut buf = [0u8; 2];
                tracked.read_exact(&mut buf).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                tracked.write_all(b"out").await.unwrap();
            } => {}
        }
        idle.await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_timeout_never_fires() {
        let clock = IdleClock::new();
        let waited = tokio::time::timeout(Duration::from_secs(3600), clock.idle(Duration::ZERO));
        assert!(waited.await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_timer_starts_at_a_heads_first_byte_not_while_idle() {
        let head = Arc::new(HeadClock::new());
        let timeout = Duration::from_secs(2);
        let expired = head.expired(timeout);
        tokio::pin!(expired);
        // A connection idle for an hour between requests is not the head timer's.
        let idle = tokio::time::timeout(Duration::from_secs(3600), expired.as_mut());
        assert!(idle.await.is_err());
        // The first byte starts it; the head completing (a request in flight)
        // stops it, however long the request takes.
        let start = Instant::now();
        head.on_read();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let request = RequestInFlight::start(Some(head.clone()));
        head.on_read();
        let busy = tokio::time::timeout(Duration::from_secs(3600), expired.as_mut());
        assert!(busy.await.is_err());
        // Done: the next head's first byte starts it again, and a head that does not
        // complete is cut `timeout` after that byte.
        drop(request);
        let next = Instant::now();
        head.on_read();
        expired.await;
        assert_eq!(next.elapsed(), timeout);
        assert!(start.elapsed() > timeout);
    }
}
