//! The explicit proxy of the standalone role: a process on a laptop sets
//! `HTTPS_PROXY`/`HTTP_PROXY` to it and reaches mirrored services by name, with no
//! iptables. `CONNECT host:port` opens a byte stream; an absolute-form request
//! (`GET http://host:port/path`) is forwarded as one request.
//!
//! Names are routed with [`RouteLookup::route_authority`]: a mirrored service goes
//! through the gateway's tunnel, anything else is resolved with the system resolver
//! and connected to directly.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::forward::{ForwardConfig, forward_io};
use crate::http::{HeadClock, HttpSettings, InFlight, RequestInFlight, Tracked};
use crate::listen::{Accepted, ConnectionTasks, Handler};
use crate::metrics::{Direction, HttpLabels, HttpResponseLabels, ProxyMetrics};
use crate::outcome::{Outcome, Reason, Side};
use crate::pool::Pool;
use isthmus_vocab::{Authority, REFUSAL_HEADER, Refusal};

use crate::route::{Route, RouteLookup};
use crate::tunnel::BoxIo;

type Body = Either<Incoming, Empty<Bytes>>;
type RequestBody = InFlight<Incoming>;

/// The standalone role's [`Handler`].
pub struct Explicit<L> {
    pub lookup: L,
    pub gateway: Option<Pool>,
    pub connect_timeout: Duration,
    /// Request head limits and the header read timeout, as on the transparent path
    /// (its HTTP/2 settings do not apply: clients speak HTTP/1 to a proxy).
    pub http: HttpSettings,
    pub forward: ForwardConfig,
    pub metrics: ProxyMetrics,
}

impl<L: RouteLookup> Handler for Explicit<L> {
    async fn handle(self: Arc<Self>, conn: Accepted, drain: CancellationToken) {
        let mut guard = self.metrics.open_connection(Direction::Outbound);
        let tasks = Arc::new(ConnectionTasks::default());
        let proxy = self.clone();
        let service_tasks = tasks.clone();
        let head = self
            .http
            .header_read_timeout
            .map(|_| Arc::new(HeadClock::new()));
        let service_head = head.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let tasks = service_tasks.clone();
            let request = RequestInFlight::start(service_head.clone());
            let req = req.map(|body| InFlight::new(body, request.clone()));
            async move {
                let response = proxy.request(req, &tasks).await;
                Ok::<_, std::convert::Infallible>(response.map(|body| InFlight::new(body, request)))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            // Serve a request whose client already shut down its write side, as the
            // transparent path does.
            .half_close(true)
            .timer(TokioTimer::new())
            // Our own header timer (`head`) starts at a head's first byte; hyper's
            // would also cut keep-alive connections idle between requests.
            .header_read_timeout(None)
            .max_headers(self.http.max_headers)
            .max_buf_size(self.http.max_buf_size)
            .serve_connection(
                TokioIo::new(Tracked::head_only(conn.stream, head.clone())),
                service,
            )
            .with_upgrades();
        tokio::pin!(conn);
        let header_timeout = self.http.header_read_timeout.unwrap_or_default();
        let head_expired = async {
            match &head {
                Some(head) => head.expired(header_timeout).await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            res = conn.as_mut() => res,
            () = head_expired => {
                guard.set_outcome(Outcome::new(Side::Downstream, Reason::HeaderTimeout));
                debug!(timeout = ?header_timeout, "request head not complete in time, closing");
                tasks.join().await;
                return;
            }
            () = drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            guard.set_outcome(Outcome::new(Side::Downstream, Reason::Http));
            debug!(error = %e, "explicit proxy connection failed");
        }
        tasks.join().await;
    }
}

impl<L: RouteLookup> Explicit<L> {
    async fn request(
        &self,
        mut req: Request<RequestBody>,
        tasks: &ConnectionTasks,
    ) -> Response<Body> {
        let Some(authority) = target_authority(req.uri()) else {
            return refuse(Refusal::BadRequest);
        };
        let label = self.metrics.authority_label(authority.as_str());
        let labels = HttpLabels {
            direction: Direction::Outbound,
            authority: label.clone(),
        };
        self.metrics.http_requests.get_or_create(&labels).inc();
        let start = tokio::time::Instant::now();
        let response = match self.open(&authority).await {
            Err(refusal) => {
                info!(%authority, reason = refusal.as_str(), "explicit proxy request refused");
                self.metrics
                    .refused(Direction::Outbound, Outcome::refused_here(refusal));
                refuse(refusal)
            }
            Ok(upstream) if req.method() == Method::CONNECT => {
                let on_upgrade = hyper::upgrade::on(&mut req);
                let forward = self.forward.clone();
                let counters = self.metrics.byte_counters(Direction::Outbound);
                tasks.spawn(async move {
                    match on_upgrade.await {
                        Ok(client) => {
                            if let Err(e) =
                                forward_io(TokioIo::new(client), upstream, &[], &forward, &counters)
                                    .await
                            {
                                debug!(error = %e, "CONNECT stream ended with an error");
                            }
                        }
                        Err(e) => debug!(error = %e, "CONNECT upgrade failed"),
                    }
                });
                Response::new(Either::Right(Empty::new()))
            }
            Ok(upstream) => forward_one(req, upstream).await,
        };
        self.metrics
            .http_responses
            .get_or_create(&HttpResponseLabels {
                direction: Direction::Outbound,
                authority: label,
                status: response.status().as_u16(),
            })
            .inc();
        self.metrics
            .http_latency
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        response
    }

    async fn open(&self, authority: &Authority) -> Result<BoxIo, Refusal> {
        match self.lookup.route_authority(authority) {
            Route::Mirrored {
                cluster, authority, ..
            } => {
                let pool = self.gateway.as_ref().ok_or(Refusal::LinkDown)?;
                // The client is answered with the far end's verdict, so wait for it.
                pool.open_answered(&authority, Some(&cluster))
                    .await
                    .map(|s| Box::new(s) as BoxIo)
                    .map_err(|e| e.refusal())
            }
            Route::Passthrough => {
                let connect = TcpStream::connect((authority.host(), authority.port()));
                match tokio::time::timeout(self.connect_timeout, connect).await {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        Ok(Box::new(stream))
                    }
                    Ok(Err(_)) => Err(Refusal::UpstreamRefused),
                    Err(_) => Err(Refusal::UpstreamTimeout),
                }
            }
        }
    }
}

/// `host:port` of a CONNECT target or an absolute-form URI (port 80 by default).
fn target_authority(uri: &Uri) -> Option<Authority> {
    let authority = uri.authority()?;
    let port = authority.port_u16().unwrap_or(80);
    Authority::parse(&format!("{}:{port}", authority.host())).ok()
}

/// Sends one absolute-form request upstream in origin form.
async fn forward_one(req: Request<RequestBody>, upstream: BoxIo) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    parts.uri = match parts.uri.path_and_query() {
        Some(path) => Uri::from(path.clone()),
        None => Uri::from_static("/"),
    };
    let request = Request::from_parts(parts, body);
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(pair) => pair,
            Err(_) => return refuse(Refusal::UpstreamRefused),
        };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "upstream connection of an explicit request ended");
        }
    });
    match sender.send_request(request).await {
        Ok(response) => response.map(Either::Left),
        Err(_) => refuse(Refusal::UpstreamRefused),
    }
}

fn refuse(refusal: Refusal) -> Response<Body> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = refusal.status();
    let headers = response.headers_mut();
    headers.insert(
        REFUSAL_HEADER,
        http::HeaderValue::from_static(refusal.as_str()),
    );
    // A refused client is told to go away now rather than left on an idle connection.
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_come_from_connect_and_absolute_form() {
        let connect: Uri = "hello.default.svc.cluster.local:80".parse().unwrap();
        assert_eq!(
            target_authority(&connect).unwrap().as_str(),
            "hello.default.svc.cluster.local:80"
        );
        let absolute: Uri = "http://Hello.default/x?y".parse().unwrap();
        assert_eq!(
            target_authority(&absolute).unwrap().as_str(),
            "hello.default:80"
        );
        let origin: Uri = "/only/a/path".parse().unwrap();
        assert!(target_authority(&origin).is_none());
    }
}
