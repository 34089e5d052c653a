//! The admin server: `/metrics` (OpenMetrics text), `/live`, `/ready` and `/config`
//! (the routing table, identity and link state in effect, as JSON).
//!
//! It is for probes and scraping only: nothing here changes the proxy's state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

/// Produces the `/config` document on demand.
pub type ConfigView = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

pub struct Admin {
    pub registry: Arc<Registry>,
    /// Turns true once the proxy can serve (identity loaded, listeners bound).
    pub ready: Arc<AtomicBool>,
    pub config: ConfigView,
}

impl Admin {
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        debug!(error = %e, "admin accept failed");
                        continue;
                    }
                },
                _ = proxy_core::listen::drained(&mut shutdown) => return,
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, std::convert::Infallible>(admin.respond(&req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    debug!(error = %e, "admin connection failed");
                }
            });
        }
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" if self.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
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
                        "metrics encoding failed\n",
                    ),
                }
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
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /ready, /live, /config\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// Binds the admin listener, naming the address on failure.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin listener on {addr}"))
}
