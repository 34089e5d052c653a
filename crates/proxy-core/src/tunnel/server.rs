//! The tunnel's server end: terminates HTTP/2 on an already-authenticated stream and
//! turns each `CONNECT` into an upstream chosen by a [`TunnelHandler`].
//!
//! The same server runs in a sidecar's inbound listener (deliver to the local app)
//! and in a gateway (deliver to an exported service, or relay to a peer gateway):
//! only the handler differs.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;
use tracing::{debug, info};

use super::{BoxIo, CLUSTER_HEADER, H2Settings, Io, REFUSAL_HEADER, Refusal};
use crate::forward::{ForwardConfig, forward_io};
use crate::listen::ConnectionTasks;
use crate::metrics::{Direction, ProxyMetrics};
use crate::route::{Authority, ClusterName};

/// The authenticated peer of a tunnel connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Its SPIFFE ID, as the TLS layer verified it.
    pub id: Option<Arc<str>>,
    /// Whether it belongs to this proxy's own cluster (same issuer): only those may
    /// ask a gateway to reach another cluster.
    pub local: bool,
}

/// One CONNECT stream as the handler sees it.
#[derive(Clone, Debug)]
pub struct TunnelRequest {
    pub authority: Authority,
    /// The cluster the client says the target lives in; absent for a sidecar's own pod.
    pub cluster: Option<ClusterName>,
    /// The authenticated peer.
    pub peer: Peer,
}

/// Decides where a stream goes. Refusing is the normal way to say no: the refusal
/// reaches the client as a status and is counted here.
pub trait TunnelHandler: Send + Sync + 'static {
    fn open(&self, request: &TunnelRequest) -> impl Future<Output = Result<BoxIo, Refusal>> + Send;
}

/// Serves tunnel connections for one listener.
pub struct TunnelServer<H> {
    handler: Arc<H>,
    settings: H2Settings,
    forward: ForwardConfig,
    metrics: ProxyMetrics,
    direction: Direction,
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
        })
    }

    /// Serves one connection until the peer closes it or `drain` turns true, after
    /// which a GOAWAY lets streams in flight finish and refuses new ones.
    pub async fn serve_connection<I: Io>(
        self: &Arc<Self>,
        io: I,
        peer: Peer,
        mut drain: watch::Receiver<bool>,
    ) -> Result<(), hyper::Error> {
        let streams = Arc::new(ConnectionTasks::default());
        let server = self.clone();
        let service_streams = streams.clone();
        let service = service_fn(move |req| {
            let server = server.clone();
            let peer = peer.clone();
            let streams = service_streams.clone();
            async move { Ok::<_, std::convert::Infallible>(server.stream(req, peer, &streams).await) }
        });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.settings.max_concurrent_streams)
            .initial_stream_window_size(self.settings.stream_window)
            .initial_connection_window_size(self.settings.connection_window)
            .max_header_list_size(self.settings.max_header_list_size)
            .max_pending_accept_reset_streams(self.settings.max_pending_accept_reset_streams)
            .max_send_buf_size(self.settings.max_send_buf_size)
            .keep_alive_interval(self.settings.keepalive_interval)
            .keep_alive_timeout(self.settings.keepalive_timeout);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            res = conn.as_mut() => res,
            _ = crate::listen::drained(&mut drain) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        streams.join().await;
        result
    }

    async fn stream(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: Peer,
        streams: &ConnectionTasks,
    ) -> Response<Empty<Bytes>> {
        let request = match parse_request(&req, peer) {
            Ok(request) => request,
            Err(refusal) => return self.refuse(refusal, None),
        };
        let upstream = match self.handler.open(&request).await {
            Ok(upstream) => upstream,
            Err(refusal) => return self.refuse(refusal, Some(&request)),
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let metrics = self.metrics.clone();
        let direction = self.direction;
        let forward = self.forward.clone();
        streams.spawn(async move {
            let mut guard = metrics.open_connection(direction);
            let counters = metrics.byte_counters(direction);
            match on_upgrade.await {
                Ok(stream) => {
                    match forward_io(TokioIo::new(stream), upstream, &[], &forward, &counters).await
                    {
                        Ok(_) => {}
                        Err(e) => {
                            guard.set_reason(e.close_reason());
                            debug!(authority = %request.authority, error = %e, "tunnel stream ended");
                        }
                    }
                }
                Err(e) => {
                    guard.set_reason("downstream_error");
                    debug!(authority = %request.authority, error = %e, "tunnel stream never opened");
                }
            }
        });
        Response::new(Empty::new())
    }

    fn refuse(&self, refusal: Refusal, request: Option<&TunnelRequest>) -> Response<Empty<Bytes>> {
        self.metrics.refused(self.direction, refusal.as_str());
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
        let mut response = Response::new(Empty::new());
        *response.status_mut() = refusal.status();
        response.headers_mut().insert(
            REFUSAL_HEADER,
            http::HeaderValue::from_static(refusal.as_str()),
        );
        response
    }
}

fn parse_request<B>(req: &Request<B>, peer: Peer) -> Result<TunnelRequest, Refusal> {
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
            if name.is_empty()
                || name.len() > 63
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(Refusal::BadRequest);
            }
            Some(ClusterName::new(name))
        }
    };
    Ok(TunnelRequest {
        authority,
        cluster,
        peer,
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
        )
        .unwrap();
        assert_eq!(ok.authority.as_str(), "hello.default.svc.cluster.local:80");
        assert_eq!(ok.cluster.unwrap().as_str(), "cluster-a");
        assert_eq!(
            parse_request(&connect("hello:80", Some("Cluster A")), Peer::default()).unwrap_err(),
            Refusal::BadRequest
        );
        let get = Request::builder().uri("http://hello:80/").body(()).unwrap();
        assert_eq!(
            parse_request(&get, Peer::default()).unwrap_err(),
            Refusal::BadRequest
        );
    }
}
