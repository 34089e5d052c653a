//! HTTP-aware forwarding: once detection has seen HTTP, hyper proxies it request by
//! request so each request, status and latency is counted.
//!
//! The proxy stays transparent (no header rewriting): HTTP/1 stays HTTP/1 and
//! HTTP/2 stays HTTP/2, and `Upgrade` (WebSocket) or `CONNECT` exchanges become raw
//! byte streams through [`forward_io`] after the upstream agrees. A passthrough or
//! inbound connection keeps one upstream connection; a mirrored Service's requests
//! each ride a tunnel stream of their own, under the Service's timeouts and retries
//! ([`upstream`], [`retry`], [`replay`]).
//!
//! Bad input is answered here, never forwarded: detection sends here whatever an
//! origin might read as a request (or the HTTP/2 preface), so a head hyper cannot
//! parse gets `400` (too large: `431`) and a close, framing an origin could read
//! differently (see `framing`) gets `400` and a close, a request body the client
//! breaks gets `400` (not `502`), a head that trickles in is cut by
//! [`HttpSettings::header_read_timeout`], and HTTP/2 errors get `RST_STREAM` or
//! `GOAWAY` under the limits of [`H2Settings`], a padded field value `400`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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

mod clock;
mod framing;
mod replay;
mod retry;
mod upstream;

use clock::IdleClock;
pub(crate) use clock::{HeadClock, InFlight, RequestInFlight, Tracked};
use framing::{BodyFault, RequestBody, h1_framing, h2_fields};
pub use replay::DEFAULT_REPLAY_LIMIT;
pub use retry::{BudgetSettings, RetryBudget, RetryBudgets, RetryReason};
use upstream::{Failure, h2_client};
pub use upstream::{MirroredTarget, PerRequest, UpstreamBody, UpstreamBodyError};

type ProxyBody = Either<UpstreamBody, Empty<Bytes>>;

/// Where a connection's requests go.
pub enum HttpUpstream<U> {
    /// All of them over one upstream connection (HTTP/1 in turn, HTTP/2 multiplexed).
    Shared(U),
    /// Each on a tunnel stream of its own.
    PerRequest(Arc<PerRequest>),
}

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
        let upstream = HttpUpstream::Shared(upstream);
        self.serve_upstream(
            downstream,
            upstream,
            protocol,
            fallback_authority,
            drain,
            refusal,
        )
        .await
    }

    /// [`serve_refusable`](Self::serve_refusable) against either kind of upstream.
    /// With [`HttpUpstream::PerRequest`], a request whose streams were refused is not
    /// answered: an HTTP/1 connection ends (the caller resets the client, reading
    /// the refusal from the [`PerRequest`]), an HTTP/2 request's stream is reset.
    pub async fn serve_upstream<D: Io, U: Io>(
        &self,
        downstream: D,
        upstream: HttpUpstream<U>,
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
        let downstream = Tracked::new(downstream, clock.clone(), head.clone());
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
        upstream: HttpUpstream<U>,
        exchange: Arc<Exchange>,
        drain: CancellationToken,
        idle: impl Future<Output = ()>,
        head: Option<Arc<HeadClock>>,
    ) -> Result<(), HttpError> {
        let (sender, upstream_closed) = match upstream {
            HttpUpstream::Shared(upstream) => {
                let (sender, conn) = hyper::client::conn::http1::Builder::new()
                    .handshake::<_, RequestBody>(TokioIo::new(upstream))
                    .await
                    .map_err(HttpError::UpstreamHandshake)?;
                let closed = drive_upstream(conn.with_upgrades(), "HTTP/1");
                // HTTP/1 serves one request at a time, so this lock is never contended.
                (HttpUpstream::Shared(Mutex::new(sender)), Some(closed))
            }
            HttpUpstream::PerRequest(upstream) => (HttpUpstream::PerRequest(upstream), None),
        };
        let closing = closing(upstream_closed, &drain);
        let sender = Arc::new(sender);
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
                    Ok(()) => match &*sender {
                        HttpUpstream::Shared(sender) => {
                            let mut sender = sender.lock().await;
                            let send = |req| async move {
                                Ok(sender.send_request(req).await?.map(UpstreamBody::shared))
                            };
                            exchange.forward(req, send, &fault).await?
                        }
                        HttpUpstream::PerRequest(upstream) => {
                            exchange
                                .forward(req, |req| upstream.send(req), &fault)
                                .await?
                        }
                    },
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
        upstream: HttpUpstream<U>,
        exchange: Arc<Exchange>,
        drain: CancellationToken,
        idle: impl Future<Output = ()>,
    ) -> Result<(), HttpError> {
        let h2 = &self.settings.h2;
        let (sender, upstream_closed) = match upstream {
            HttpUpstream::Shared(upstream) => {
                let (sender, conn) = h2_client(h2)
                    .handshake::<_, Incoming>(TokioIo::new(upstream))
                    .await
                    .map_err(HttpError::UpstreamHandshake)?;
                (
                    HttpUpstream::Shared(sender),
                    Some(drive_upstream(conn, "HTTP/2")),
                )
            }
            HttpUpstream::PerRequest(upstream) => (HttpUpstream::PerRequest(upstream), None),
        };
        let closing = closing(upstream_closed, &drain);
        let service = service_fn(move |req: Request<Incoming>| {
            let exchange = exchange.clone();
            let sender = match &sender {
                HttpUpstream::Shared(sender) => HttpUpstream::Shared(sender.clone()),
                HttpUpstream::PerRequest(upstream) => HttpUpstream::PerRequest(upstream.clone()),
            };
            async move {
                if let Err(why) = h2_fields(&req) {
                    return Ok(exchange.refuse(&req, why));
                }
                let fault = BodyFault::default();
                match sender {
                    HttpUpstream::Shared(mut sender) => {
                        let send = |req| async move {
                            Ok(sender.send_request(req).await?.map(UpstreamBody::shared))
                        };
                        exchange.forward(req, send, &fault).await
                    }
                    HttpUpstream::PerRequest(upstream) => {
                        exchange
                            .forward(req, |req| upstream.send(req), &fault)
                            .await
                    }
                }
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
async fn closing(upstream_closed: Option<oneshot::Receiver<()>>, drain: &CancellationToken) {
    let upstream_closed = async {
        match upstream_closed {
            Some(closed) => {
                let _ = closed.await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        () = upstream_closed => {}
        () = drain.cancelled() => {}
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
        Fut: std::future::Future<Output = Result<Response<UpstreamBody>, Failure>>,
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
            Err(Failure::Refused(outcome)) => {
                let refusal = outcome
                    .refusal()
                    .unwrap_or(isthmus_vocab::Refusal::LinkDown);
                return Err(StreamRefused(refusal));
            }
            Err(Failure::TimedOut(timeout)) => {
                debug!(?timeout, authority = %authority, "no response head before the deadline");
                let mut response = Response::new(Either::Right(Empty::new()));
                *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                response
            }
            Err(Failure::Http(e)) => {
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
