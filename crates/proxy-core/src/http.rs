//! HTTP-aware forwarding: once detection has seen HTTP, hyper proxies it request by
//! request so each request, status and latency is counted.
//!
//! The proxy stays transparent: one upstream connection per downstream connection
//! (no re-balancing, no header rewriting), HTTP/1 stays HTTP/1 and HTTP/2 stays
//! HTTP/2, and `Upgrade` (WebSocket) or `CONNECT` exchanges become raw byte streams
//! through [`forward_io`] after the upstream agrees.

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
use tokio::sync::{Mutex, oneshot, watch};
use tokio::time::Instant;
use tracing::debug;

use crate::detect::Protocol;
use crate::forward::{ByteCounters, ForwardConfig, forward_io};
use crate::listen::ConnectionTasks;
use crate::metrics::{Direction, HttpLabels, HttpResponseLabels, ProxyMetrics};
use crate::tunnel::{H2Settings, Io};

/// Limits of the HTTP layer.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// A client must send a request's headers within this time. Off by default:
    /// hyper starts this timer whenever it waits for a request head, idle time
    /// between keep-alive requests included, so it would close idle keep-alive
    /// connections that the application's server keeps open: a visible change for a
    /// transparent proxy. Idle connections end at the idle timeout instead, and the
    /// connection limit bounds slow clients.
    pub header_read_timeout: Option<Duration>,
    /// Most headers in one HTTP/1 request.
    pub max_headers: usize,
    /// Largest HTTP/1 read buffer, which bounds one request head.
    pub max_buf_size: usize,
    pub h2: H2Settings,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: None,
            max_headers: 100,
            // hyper's floor is 8 KiB; 64 KiB fits the largest heads browsers send.
            max_buf_size: 64 * 1024,
            h2: H2Settings::default(),
        }
    }
}

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
}

impl HttpError {
    /// The `tcp_close_total` reason of a connection that ended with this error.
    pub fn close_reason(&self) -> &'static str {
        match self {
            HttpError::IdleTimeout(_) => "idle_timeout",
            _ => "http_error",
        }
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
        drain: watch::Receiver<bool>,
    ) -> Result<(), HttpError> {
        let exchange = Arc::new(Exchange {
            proxy: self.clone(),
            upgrades: ConnectionTasks::default(),
            fallback_authority: self.metrics.authority_label(fallback_authority),
            counters: self.metrics.byte_counters(self.direction),
        });
        // Every byte of an HTTP exchange crosses the downstream side, so watching it
        // alone is enough for the idle timeout the byte forwarder applies elsewhere.
        let clock = Arc::new(IdleClock::new());
        let downstream = Tracked {
            inner: downstream,
            clock: clock.clone(),
        };
        let idle = clock.idle(self.forward.idle_timeout);
        let served = match protocol {
            Protocol::Http2 => {
                self.serve_h2(downstream, upstream, exchange.clone(), drain, idle)
                    .await
            }
            _ => {
                self.serve_h1(downstream, upstream, exchange.clone(), drain, idle)
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
        mut drain: watch::Receiver<bool>,
        idle: impl Future<Output = ()>,
    ) -> Result<(), HttpError> {
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Incoming>(TokioIo::new(upstream))
            .await
            .map_err(HttpError::UpstreamHandshake)?;
        let (closed_tx, mut upstream_closed) = oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream HTTP/1 connection ended");
            }
            let _ = closed_tx.send(());
        });
        // HTTP/1 serves one request at a time, so this lock is never contended.
        let sender = Arc::new(Mutex::new(sender));
        let service = service_fn(move |req| {
            let exchange = exchange.clone();
            let sender = sender.clone();
            async move {
                let mut sender = sender.lock().await;
                Ok::<_, std::convert::Infallible>(
                    exchange.forward(req, |req| sender.send_request(req)).await,
                )
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            // A client may send its request and shut down its write side before the
            // response (`nc -N`, scripted clients): plain TCP serves that, so must we.
            .half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(self.settings.header_read_timeout)
            .max_headers(self.settings.max_headers)
            .max_buf_size(self.settings.max_buf_size)
            .serve_connection(TokioIo::new(downstream), service)
            .with_upgrades();
        tokio::pin!(conn);
        let result = tokio::select! {
            res = conn.as_mut() => res,
            _ = &mut upstream_closed => {
                // The server closed its side: let the response in flight finish, then
                // close ours too instead of answering the next request with an error.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = crate::listen::drained(&mut drain) => {
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
        mut drain: watch::Receiver<bool>,
        idle: impl Future<Output = ()>,
    ) -> Result<(), HttpError> {
        let h2 = &self.settings.h2;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .handshake::<_, Incoming>(TokioIo::new(upstream))
            .await
            .map_err(HttpError::UpstreamHandshake)?;
        let (closed_tx, mut upstream_closed) = oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream HTTP/2 connection ended");
            }
            let _ = closed_tx.send(());
        });
        let service = service_fn(move |req| {
            let exchange = exchange.clone();
            let mut sender = sender.clone();
            async move {
                Ok::<_, std::convert::Infallible>(
                    exchange.forward(req, |req| sender.send_request(req)).await,
                )
            }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_concurrent_streams)
            .max_header_list_size(h2.max_header_list_size)
            .initial_stream_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .serve_connection(TokioIo::new(downstream), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            res = conn.as_mut() => res,
            _ = &mut upstream_closed => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = crate::listen::drained(&mut drain) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            () = idle => return Err(HttpError::IdleTimeout(self.forward.idle_timeout)),
        };
        result.map_err(HttpError::Downstream)
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

/// An [`Io`] that marks its [`IdleClock`] whenever bytes move through it.
struct Tracked<T> {
    inner: T,
    clock: Arc<IdleClock>,
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
    async fn forward<F, Fut>(&self, mut req: Request<Incoming>, send: F) -> Response<ProxyBody>
    where
        F: FnOnce(Request<Incoming>) -> Fut,
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
        proxy.metrics.http_requests.get_or_create(&labels).inc();
        let wants_upgrade =
            req.method() == http::Method::CONNECT || req.headers().contains_key(header::UPGRADE);
        let downstream_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));

        let response = match send(req).await {
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
                debug!(error = %e, authority = %authority, "upstream request failed");
                let mut response = Response::new(Either::Right(Empty::new()));
                *response.status_mut() = StatusCode::BAD_GATEWAY;
                response
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
        response
    }
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
}
