//! The admin server: `/metrics` (OpenMetrics text), `/live`, `/ready` and `/config`
//! (the routing table, identity and link state in effect, as JSON).
//!
//! It is for probes and scraping only: nothing here changes the proxy's state.
//!
//! # Exposure
//!
//! The admin port is reachable on the pod address (kubelet probes, Prometheus), so
//! what it tells a stranger is limited: `/live`, `/ready` and `/metrics` answer
//! everyone; `/config` (every Service and Link the proxy knows, its identity and
//! limits) and any later debug endpoint answer loopback peers only (127.0.0.0/8,
//! `::1`, and IPv4-mapped loopback), as Linkerd keeps `/env.json` local. Anyone else
//! gets `403` and a one-line body.
//!
//! # Resources
//!
//! The server runs on a thread of its own with a current-thread runtime ([`spawn`]),
//! apart from the data path's runtime, so probes are answered while the data path is
//! saturated. It serves at most [`AdminLimits::max_connections`] connections at once
//! (more are reset at once), closes a connection whose request head is not complete
//! within [`AdminLimits::header_read_timeout`] (idle keep-alive time included), and
//! backs off when accepting fails for lack of descriptors instead of retrying in a
//! busy loop.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Produces the `/config` document on demand.
pub type ConfigView = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Whether the proxy can serve now; `Err` says why not (shutting down, an expired
/// identity), and `/ready` shows it.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

pub struct Admin {
    pub registry: Arc<Registry>,
    pub ready: ReadyCheck,
    pub config: ConfigView,
}

/// Bounds on what the admin server holds; flags `--admin-max-connections` and
/// `--admin-header-read-timeout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminLimits {
    /// Connections served at once; more are reset at once.
    pub max_connections: usize,
    /// A request head (the first, or the next on a kept-alive connection) must be
    /// complete within this time, or the connection is closed.
    pub header_read_timeout: Duration,
}

/// Default [`AdminLimits::max_connections`]: a kubelet's three probes and a few
/// scrapers need a handful; this leaves room for bursts and still bounds the
/// descriptors a flood can take from the data path.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Default [`AdminLimits::header_read_timeout`]: probes and scrapers send their whole
/// request at once.
pub const DEFAULT_ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_ADMIN_HEADER_READ_TIMEOUT,
        }
    }
}

/// The first pause after a failed accept (EMFILE, ENFILE, ENOBUFS): the error repeats
/// at once until a descriptor is free, and the listener stays readable meanwhile,
/// so retrying without a pause spins a CPU.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause: accepting resumes at most this long after descriptors free up.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// The longest one admin connection is served. A client that sends requests but
/// never reads the answers would otherwise hold its slot, as the header read timeout
/// only runs while a request head is awaited.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Admin requests are a request line and a few headers; this bounds what one
/// connection may make the server buffer (hyper's floor is 8 KiB).
const MAX_BUF_SIZE: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;

/// Starts the admin server on a thread named `admin` with its own current-thread
/// runtime; it serves until `stop` is cancelled. `listener` must be non-blocking (as
/// tokio's `into_std` leaves it).
pub fn spawn(
    admin: Arc<Admin>,
    listener: std::net::TcpListener,
    limits: AdminLimits,
    stop: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin server's runtime")?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => admin.serve(listener, limits, stop).await,
                    Err(e) => {
                        warn!(error = %e, "admin listener unusable, admin server not started")
                    }
                }
            });
        })
        .context("starting the admin server's thread")
}

impl Admin {
    /// Accepts and serves admin connections until `stop` is cancelled.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        limits: AdminLimits,
        stop: CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let mut acceptor = Acceptor {
            listener,
            reserve: Arc::new(Reserve::open()),
            backoff: proxy_core::backoff::Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX),
            failures: 0,
        };
        while let Some((stream, peer, on_reserve)) = acceptor.next(&stop).await {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(%peer, max = limits.max_connections, "admin connection limit reached, resetting");
                proxy_core::listen::reset(stream);
                continue;
            };
            if on_reserve {
                debug!(%peer, "descriptor table full: serving this admin connection on the reserved descriptor");
            }
            let reserve = acceptor.reserve.clone();
            let admin = self.clone();
            let header_read_timeout = limits.header_read_timeout;
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, std::convert::Infallible>(admin.respond(&req, peer)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .max_buf_size(MAX_BUF_SIZE)
                    .max_headers(MAX_HEADERS)
                    .serve_connection(TokioIo::new(stream), service);
                // Without hyper's shutdown, so that a connection on the reserve's
                // descriptor hands its socket back instead of closing it.
                match tokio::time::timeout(CONNECTION_LIFETIME, conn.without_shutdown()).await {
                    Ok(Ok(parts)) if on_reserve => reserve.take_back(parts.io.into_inner()),
                    Ok(Ok(_parts)) => {}
                    Ok(Err(e)) => debug!(%peer, error = %e, "admin connection failed"),
                    Err(_) => debug!(%peer, "admin connection open too long, closed"),
                }
                if on_reserve {
                    // The socket was dropped on an error: its descriptor is free
                    // again, for whoever asks first.
                    reserve.refill();
                }
                drop(slot);
            });
        }
    }

    fn respond(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        let local = is_loopback_peer(peer);
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n".into()),
            "/ready" => match (self.ready)() {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n").into(),
                ),
            },
            "/metrics" => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => {
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        response.headers_mut().insert(
                            header::CONTENT_TYPE,
                            http::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        response
                    }
                    Err(_) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "metrics encoding failed\n".into(),
                    ),
                }
            }
            "/config" if !local => {
                debug!(%peer, "/config asked from a non-loopback address, refused");
                text(
                    StatusCode::FORBIDDEN,
                    "forbidden: /config answers on loopback only\n".into(),
                )
            }
            "/config" => {
                let body = serde_json::to_vec_pretty(&(self.config)()).unwrap_or_default();
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                response
            }
            _ if local => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /ready, /live, /config\n".into(),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /ready, /live\n".into(),
            ),
        }
    }
}

/// The admin accept loop: backoff after failures, and the reserved descriptor.
struct Acceptor {
    listener: TcpListener,
    reserve: Arc<Reserve>,
    backoff: proxy_core::backoff::Backoff,
    /// Failed accepts since the last success, for one warning per streak.
    failures: u64,
}

impl Acceptor {
    /// The next connection, and whether it holds the reserve's descriptor (to be
    /// given back when it closes); `None` once `stop` is cancelled.
    async fn next(&mut self, stop: &CancellationToken) -> Option<(TcpStream, SocketAddr, bool)> {
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = stop.cancelled() => return None,
            };
            let error = match accepted {
                Ok((stream, peer)) => return Some(self.accepted(stream, peer, false)),
                Err(e) if is_connection_error(&e) => {
                    debug!(error = %e, "admin connection gone before it was accepted");
                    continue;
                }
                Err(e) => e,
            };
            if is_descriptor_exhaustion(&error) && self.reserve.release() {
                // accept(2) fails with EMFILE before it looks at its queue, so one
                // try into the descriptor just freed tells a waiting probe from an
                // empty queue (which clears the listener's readiness: no spin).
                let once = poll_fn(|cx| Poll::Ready(self.listener.poll_accept(cx))).await;
                match once {
                    Poll::Ready(Ok((stream, peer))) => {
                        return Some(self.accepted(stream, peer, true));
                    }
                    Poll::Pending => {
                        self.reserve.refill();
                        continue;
                    }
                    Poll::Ready(Err(_)) => self.reserve.refill(),
                }
            }
            if self.failures == 0 {
                warn!(error = %error, "admin accept failed, backing off until it succeeds");
            }
            self.failures += 1;
            tokio::select! {
                () = tokio::time::sleep(self.backoff.next_delay()) => {}
                () = stop.cancelled() => return None,
            }
            self.reserve.refill();
        }
    }

    fn accepted(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        on_reserve: bool,
    ) -> (TcpStream, SocketAddr, bool) {
        if self.failures > 0 {
            info!(failures = self.failures, "admin accept works again");
            self.failures = 0;
            self.backoff.reset();
        }
        (stream, peer, on_reserve)
    }
}

/// One descriptor held back from the start (`/dev/null`), so that a probe can be
/// answered while the data path has filled the descriptor table: it is closed to
/// accept one admin connection, as libev and nginx do. When that connection is
/// done its socket is shut down (the client sees the close) but its descriptor is
/// kept as the new reserve: closing and reopening would leave a moment in which
/// the data path's accept loop, on another thread, takes the descriptor for good.
/// Without a reserve a full table fails `/live`, and a kubelet restarts a proxy
/// that is only under pressure, dropping every connection it carries.
///
/// Between closing a reserved descriptor and accepting into it there is still a
/// moment in which another thread's open or accept can take it, so
/// [`RESERVED_DESCRIPTORS`] are kept: losing one to that race leaves another.
struct Reserve(std::sync::Mutex<Vec<std::os::fd::OwnedFd>>);

/// Descriptors the admin server holds in reserve.
const RESERVED_DESCRIPTORS: usize = 2;

impl Reserve {
    fn open() -> Self {
        let reserve = Self(std::sync::Mutex::new(Vec::new()));
        reserve.refill();
        reserve
    }

    /// Closes one reserved descriptor; `false` if none was held.
    fn release(&self) -> bool {
        self.slot().pop().is_some()
    }

    /// Reopens reserved descriptors up to [`RESERVED_DESCRIPTORS`] (best effort:
    /// the table may still be full).
    fn refill(&self) {
        let mut held = self.slot();
        while held.len() < RESERVED_DESCRIPTORS {
            match std::fs::File::open("/dev/null") {
                Ok(null) => held.push(null.into()),
                Err(_) => return,
            }
        }
    }

    /// Keeps the descriptor of a finished connection's socket as the reserve,
    /// shut down both ways; closes it if the reserve is full already.
    fn take_back(&self, stream: TcpStream) {
        let Ok(stream) = stream.into_std() else {
            return;
        };
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let mut held = self.slot();
        if held.len() < RESERVED_DESCRIPTORS {
            held.push(stream.into());
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Vec<std::os::fd::OwnedFd>> {
        // Held for one assignment: a panic cannot tear it.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// EMFILE (this process's table is full) or ENFILE (the system's). The values are
/// Linux's errno numbers; std has no error kind for them.
fn is_descriptor_exhaustion(e: &std::io::Error) -> bool {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(e.raw_os_error(), Some(ENFILE | EMFILE))
}

/// Whether `peer` is this host's loopback: only those see `/config`. An IPv4
/// loopback peer of a dual-stack IPv6 listener arrives as `::ffff:127.x.y.z`.
pub fn is_loopback_peer(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// Accept errors that concern one connection (it was reset while queued), not the
/// listener: the next accept may succeed at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
    )
}

fn text(status: StatusCode, body: std::borrow::Cow<'static, str>) -> Response<Full<Bytes>> {
    let body = match body {
        std::borrow::Cow::Borrowed(s) => Bytes::from_static(s.as_bytes()),
        std::borrow::Cow::Owned(s) => Bytes::from(s),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}

/// Binds the admin listener, naming the address on failure.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin listener on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_are_local() {
        for local in [
            "127.0.0.1:1",
            "127.9.8.7:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback_peer(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "198.18.0.1:1",
            "10.0.0.1:1",
            "0.0.0.0:1",
            "[::]:1",
            "[2001:2::1]:1",
            "[::ffff:198.18.0.1]:1",
        ] {
            assert!(!is_loopback_peer(remote.parse().unwrap()), "{remote}");
        }
    }
}
