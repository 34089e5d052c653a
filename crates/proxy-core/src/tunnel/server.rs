//! The tunnel's server end: terminates HTTP/2 on an already-authenticated stream and
//! turns each `CONNECT` into an upstream chosen by a [`TunnelHandler`].
//!
//! The same server runs in a sidecar's inbound listener (deliver to the local app)
//! and in a gateway (deliver to an exported service, or relay to a peer gateway):
//! only the handler differs.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response};
use isthmus_vocab::{
    Authority, CLUSTER_HEADER, ClusterName, ONE_REQUEST_H2, ONE_REQUEST_HEADER, ONE_REQUEST_HTTP1,
    REFUSAL_HEADER, Refusal,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::client::{Carries, TunnelStream};
use super::stream::{ConnectionError, H2Io, Pump, RelayError, drive_with_keepalive, idle};
use super::{BoxIo, H2Settings, Io};
use crate::forward::{ByteCounters, ForwardConfig, forward_io};
use crate::listen::ConnectionTasks;
use crate::metrics::{ConnectionGuard, Direction, ProxyMetrics};
use crate::outcome::{Outcome, Reason, Side};

/// A client that finished its TLS handshake must send the HTTP/2 preface within
/// this time; the connection is closed otherwise.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`TunnelServer::expiry_grace`].
pub const DEFAULT_EXPIRY_GRACE: Duration = Duration::from_secs(30);

/// The authenticated peer of a tunnel connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Its SPIFFE ID, as the TLS layer verified it.
    pub id: Option<Arc<str>>,
    /// The cluster whose issuer signed its leaf, read from the verified path; `None`
    /// when the leaf belongs to no cluster or the check failed. A gateway relays to
    /// other clusters only for peers of its own cluster.
    pub cluster: Option<ClusterName>,
    /// The earlier of the two leaves' `notAfter`: what the handshake proved holds
    /// no longer, so the connection opens no stream past it (a GOAWAY) and ends
    /// [`TunnelServer::expiry_grace`] later at the latest. `None`: no bound.
    pub expires: Option<SystemTime>,
}

/// One CONNECT stream as the handler sees it.
#[derive(Clone, Debug)]
pub struct TunnelRequest {
    pub authority: Authority,
    /// The cluster the client says the target lives in; absent for a sidecar's own pod.
    pub cluster: Option<ClusterName>,
    /// The authenticated peer.
    pub peer: Peer,
    /// The local address the tunnel connection arrived on, when it is a socket: a
    /// sidecar delivers to its app at this address, the pod's own.
    pub local: Option<SocketAddr>,
    /// Set when the stream carries exactly one HTTP request
    /// ([`ONE_REQUEST_HEADER`]); `None` for a whole connection's bytes.
    pub one_request: Option<OneRequest>,
}

impl TunnelRequest {
    /// What the stream carries, to say so again on the next hop's stream.
    pub fn carries(&self) -> Carries {
        match self.one_request {
            None => Carries::Connection,
            Some(OneRequest::Http1) => Carries::Http1Request,
            Some(OneRequest::H2) => Carries::H2Request,
        }
    }
}

/// What a stream marked with [`ONE_REQUEST_HEADER`] carries: the endpoint's
/// answer is one response the gateway may read the status of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OneRequest {
    /// One HTTP/1.1 request and its response.
    Http1,
    /// An HTTP/2 connection that carries one request.
    H2,
}

impl OneRequest {
    /// The header's value; an unknown one is ignored, and the stream's bytes are
    /// carried as a connection's, which they still are.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value == ONE_REQUEST_HTTP1.as_bytes() {
            Some(Self::Http1)
        } else if value == ONE_REQUEST_H2.as_bytes() {
            Some(Self::H2)
        } else {
            None
        }
    }

    /// The header value that marks such a stream.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => ONE_REQUEST_HTTP1,
            Self::H2 => ONE_REQUEST_H2,
        }
    }
}

/// Where a handler sends a stream.
pub enum Upstream {
    /// An established upstream (a socket, a TLS stream, a stream whose answer was
    /// awaited): the stream is answered `200` at once and forwarded.
    Connected(BoxIo),
    /// A stream to a further tunnel hop, just opened: the client's bytes flow on at
    /// once, and the client's answer is that hop's answer, refusal included.
    Relayed(TunnelStream),
}

/// Decides where a stream goes. Refusing is the normal way to say no: the refusal
/// reaches the client as a status and is counted here.
pub trait TunnelHandler: Send + Sync + 'static {
    fn open(
        &self,
        request: &TunnelRequest,
    ) -> impl Future<Output = Result<Upstream, Refusal>> + Send;
}

/// Serves tunnel connections for one listener.
pub struct TunnelServer<H> {
    handler: Arc<H>,
    settings: H2Settings,
    forward: ForwardConfig,
    metrics: ProxyMetrics,
    direction: Direction,
    expiry_grace: Duration,
}

impl<H: TunnelHandler> TunnelServer<H> {
    pub fn new(
        handler: Arc<H>,
        settings: H2Settings,
        forward: ForwardConfig,
        metrics: ProxyMetrics,
        direction: Direction,
    ) -> Arc<Self> {
        Arc::new(Self {
            handler,
            settings,
            forward,
            metrics,
            direction,
            expiry_grace: DEFAULT_EXPIRY_GRACE,
        })
    }

    /// The same server, whose connections past their [`Peer::expires`] let streams
    /// in flight run for `grace` (the proxy's drain grace) before they are cut.
    pub fn with_expiry_grace(self: Arc<Self>, grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            handler: self.handler.clone(),
            settings: self.settings.clone(),
            forward: self.forward.clone(),
            metrics: self.metrics.clone(),
            direction: self.direction,
            expiry_grace: grace,
        })
    }

    /// How long streams in flight may run once a connection passed its deadline.
    pub fn expiry_grace(&self) -> Duration {
        self.expiry_grace
    }

    /// Serves one connection until the peer closes it or `drain` is cancelled, after
    /// which a GOAWAY lets streams in flight finish and refuses new ones.
    pub async fn serve_connection<I: Io>(
        self: &Arc<Self>,
        io: I,
        peer: Peer,
        drain: CancellationToken,
    ) -> Result<(), ConnectionError> {
        self.serve_connection_on(io, peer, None, drain).await
    }

    /// [`TunnelServer::serve_connection`] for a connection that arrived on the
    /// socket address `local`, which each [`TunnelRequest`] carries.
    pub async fn serve_connection_on<I: Io>(
        self: &Arc<Self>,
        io: I,
        peer: Peer,
        local: Option<SocketAddr>,
        drain: CancellationToken,
    ) -> Result<(), ConnectionError> {
        let s = &self.settings;
        let handshake = h2::server::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_concurrent_streams(s.max_concurrent_streams)
            .max_header_list_size(s.max_header_list_size)
            .max_pending_accept_reset_streams(s.max_pending_accept_reset_streams)
            .max_send_buffer_size(s.max_send_buf_size)
            .handshake::<_, Bytes>(io);
        let mut connection = tokio::time::timeout(PREFACE_TIMEOUT, handshake)
            .await
            .map_err(|_| ConnectionError::PrefaceTimeout(PREFACE_TIMEOUT))?
            .map_err(ConnectionError::H2)?;
        let ping_pong = connection.ping_pong();
        // The keepalive runs beside the accept loop; `drive_with_keepalive` gets a
        // connection future that never ends, so it reports only a missed PING.
        let mut keepalive = pin!(drive_with_keepalive(
            std::future::pending(),
            ping_pong,
            s.keepalive_interval,
            s.keepalive_timeout,
        ));
        let streams = ConnectionTasks::default();
        let mut draining = false;
        let expires = peer.expires.map(deadline_instant);
        let mut expired = false;
        let cut_at = expires.map(|at| at + self.expiry_grace);
        let result = loop {
            tokio::select! {
                accepted = connection.accept() => match accepted {
                    Some(Ok((request, respond))) => {
                        let server = self.clone();
                        let peer = peer.clone();
                        // A stream that crossed the GOAWAY in flight: the leaves no
                        // longer vouch for the peer.
                        let lapsed = expires.is_some_and(|at| tokio::time::Instant::now() >= at);
                        streams.spawn(async move { server.stream(request, respond, peer, local, lapsed).await });
                    }
                    Some(Err(e)) => break Err(ConnectionError::H2(e)),
                    None => break Ok(()),
                },
                missed = &mut keepalive => break missed,
                () = drain.cancelled(), if !draining => {
                    connection.graceful_shutdown();
                    draining = true;
                }
                _ = sleep_until_some(expires), if !expired => {
                    info!(peer = peer.id.as_deref(), "a leaf of this tunnel connection expired: no new streams");
                    expired = true;
                    if !draining {
                        connection.graceful_shutdown();
                        draining = true;
                    }
                }
                _ = sleep_until_some(cut_at), if expired => {
                    info!(peer = peer.id.as_deref(), grace = ?self.expiry_grace, "expired tunnel connection still busy after its grace: closing it");
                    streams.abort();
                    break Ok(());
                }
            }
        };
        streams.join().await;
        result
    }

    async fn stream(
        self: Arc<Self>,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: Peer,
        local: Option<SocketAddr>,
        lapsed: bool,
    ) {
        let tunnel_request = match parse_request(&request, peer, local) {
            Ok(parsed) => parsed,
            Err(refusal) => return self.refuse(&mut respond, refusal, None),
        };
        if lapsed {
            return self.refuse(&mut respond, Refusal::Forbidden, Some(&tunnel_request));
        }
        let recv = request.into_body();
        let upstream = match self.handler.open(&tunnel_request).await {
            Ok(upstream) => upstream,
            Err(refusal) => return self.refuse(&mut respond, refusal, Some(&tunnel_request)),
        };
        let mut guard = self.metrics.open_connection(self.direction);
        let counters = self.metrics.byte_counters(self.direction);
        match upstream {
            Upstream::Connected(upstream) => {
                let send = match respond.send_response(Response::new(()), false) {
                    Ok(send) => send,
                    Err(e) => {
                        guard.set_outcome(Outcome::new(Side::Downstream, Reason::Error));
                        debug!(authority = %tunnel_request.authority, error = %e, "tunnel stream gone before its answer");
                        return;
                    }
                };
                let downstream = H2Io::new(send, Some(recv));
                if let Err(e) =
                    forward_io(downstream, upstream, &[], &self.forward, &counters).await
                {
                    guard.set_outcome(e.outcome());
                    debug!(authority = %tunnel_request.authority, error = %e, "tunnel stream ended");
                }
            }
            Upstream::Relayed(next) => {
                self.relay(recv, respond, next, &tunnel_request, &mut guard, &counters)
                    .await
            }
        }
    }

    /// Passes a stream on to the next hop frame by frame: the client's bytes go on
    /// before the next hop answered, and its answer, refusal or `200`, is repeated.
    async fn relay(
        &self,
        recv: RecvStream,
        mut respond: SendResponse<Bytes>,
        next: TunnelStream,
        request: &TunnelRequest,
        guard: &mut ConnectionGuard,
        counters: &ByteCounters,
    ) {
        let Some((next_send, answer)) = next.into_pending() else {
            guard.set_outcome(Outcome::new(Side::Local, Reason::Error));
            return self.refuse(&mut respond, Refusal::LinkDown, Some(request));
        };
        let activity = AtomicU64::new(0);
        let mut upload = Pump::new(recv, next_send);
        let mut answer = pin!(answer);
        let answer = loop {
            tokio::select! {
                biased;
                answer = &mut answer => break answer,
                sent = upload.run(&counters.to_upstream, &activity), if !upload.is_done() => {
                    if let Err(e) = sent {
                        // The client gave up (or its hop failed) before the answer.
                        guard.set_outcome(e.outcome(Side::Downstream));
                        debug!(authority = %request.authority, error = %e, "relayed stream ended before its answer");
                        return;
                    }
                }
            }
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                info!(authority = %request.authority, error = %e, "the next hop's tunnel connection failed");
                guard.set_outcome(Outcome::refused_here(Refusal::LinkDown));
                return self.refuse(&mut respond, Refusal::LinkDown, Some(request));
            }
        };
        if !answer.status().is_success() {
            let header = answer.headers().get(REFUSAL_HEADER).map(|v| v.as_bytes());
            let refusal = Refusal::from_response(answer.status(), header);
            guard.set_outcome(Outcome::refused_by_peer(refusal));
            return self.refuse(&mut respond, refusal, Some(request));
        }
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(e) => {
                guard.set_outcome(Outcome::new(Side::Downstream, Reason::Error));
                debug!(authority = %request.authority, error = %e, "relayed stream gone before its answer");
                return;
            }
        };
        let mut download = Pump::new(answer.into_body(), send);
        let both = async {
            tokio::try_join!(
                async {
                    if upload.is_done() {
                        return Ok(());
                    }
                    upload
                        .run(&counters.to_upstream, &activity)
                        .await
                        .map_err(|e| (Side::Downstream, e))
                },
                async {
                    download
                        .run(&counters.to_downstream, &activity)
                        .await
                        .map_err(|e| (Side::Upstream, e))
                },
            )
        };
        let idle_timeout = self.forward.idle_timeout;
        let result = tokio::select! {
            result = both => result.map(|_| ()),
            () = idle(&activity, idle_timeout) => Err((Side::Local, RelayError::Idle(idle_timeout))),
        };
        if let Err((read_side, e)) = result {
            guard.set_outcome(e.outcome(read_side));
            debug!(authority = %request.authority, error = %e, "relayed stream ended");
        }
    }

    fn refuse(
        &self,
        respond: &mut SendResponse<Bytes>,
        refusal: Refusal,
        request: Option<&TunnelRequest>,
    ) {
        self.metrics
            .refused(self.direction, Outcome::refused_here(refusal));
        match request {
            Some(r) => info!(
                direction = ?self.direction,
                authority = %r.authority,
                cluster = r.cluster.as_ref().map(ClusterName::as_str),
                peer = r.peer.id.as_deref(),
                reason = refusal.as_str(),
                "tunnel stream refused"
            ),
            None => {
                info!(direction = ?self.direction, reason = refusal.as_str(), "malformed tunnel request refused")
            }
        }
        let mut response = Response::new(());
        *response.status_mut() = refusal.status();
        response.headers_mut().insert(
            REFUSAL_HEADER,
            http::HeaderValue::from_static(refusal.as_str()),
        );
        // The answer ends the stream; whatever the client already sent is dropped.
        if let Err(e) = respond.send_response(response, true) {
            debug!(error = %e, "refused tunnel stream gone before its answer");
        }
    }
}

/// A wall-clock deadline on tokio's clock, so that paused-time tests see it too.
fn deadline_instant(at: SystemTime) -> tokio::time::Instant {
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn parse_request<B>(
    req: &Request<B>,
    peer: Peer,
    local: Option<SocketAddr>,
) -> Result<TunnelRequest, Refusal> {
    if req.method() != Method::CONNECT {
        return Err(Refusal::BadRequest);
    }
    let authority = req
        .uri()
        .authority()
        .and_then(|a| Authority::parse(a.as_str()).ok())
        .ok_or(Refusal::BadRequest)?;
    let cluster = match req.headers().get(CLUSTER_HEADER) {
        None => None,
        Some(value) => {
            let name = value.to_str().map_err(|_| Refusal::BadRequest)?;
            Some(ClusterName::parse(name).map_err(|_| Refusal::BadRequest)?)
        }
    };
    let one_request = req
        .headers()
        .get(ONE_REQUEST_HEADER)
        .and_then(|v| OneRequest::parse(v.as_bytes()));
    Ok(TunnelRequest {
        authority,
        cluster,
        peer,
        local,
        one_request,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(authority: &str, cluster: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().method(Method::CONNECT).uri(authority);
        if let Some(c) = cluster {
            builder = builder.header(CLUSTER_HEADER, c);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn requests_are_checked_before_any_handler_runs() {
        let ok = parse_request(
            &connect("hello.default.svc.cluster.local:80", Some("cluster-a")),
            Peer::default(),
            None,
        )
        .unwrap();
        assert_eq!(ok.authority.as_str(), "hello.default.svc.cluster.local:80");
        assert_eq!(ok.cluster.unwrap().as_str(), "cluster-a");
        assert_eq!(ok.one_request, None);
        let mut one = connect("hello.default.svc.cluster.local:80", None);
        for (value, expected) in [
            ("http/1.1", Some(OneRequest::Http1)),
            ("h2", Some(OneRequest::H2)),
            ("spdy/3", None),
        ] {
            one.headers_mut()
                .insert(ONE_REQUEST_HEADER, value.parse().unwrap());
            let parsed = parse_request(&one, Peer::default(), None).unwrap();
            assert_eq!(parsed.one_request, expected, "{value}");
        }
        assert_eq!(
            parse_request(
                &connect("hello:80", Some("Cluster A")),
                Peer::default(),
                None
            )
            .unwrap_err(),
            Refusal::BadRequest
        );
        let get = Request::builder().uri("http://hello:80/").body(()).unwrap();
        assert_eq!(
            parse_request(&get, Peer::default(), None).unwrap_err(),
            Refusal::BadRequest
        );
    }
}
