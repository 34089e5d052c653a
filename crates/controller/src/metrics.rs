//! The controller's metrics and its small HTTP endpoint: `/metrics` (OpenMetrics
//! text), `/live`, `/ready` (the body says whether this replica leads).
//!
//! `/ready` answers 200 once this replica has synced with the API server: as the
//! leader, after its first full sync (the ServiceMirror, Service and Link caches
//! hold the first full list, and the discovery ConfigMap was written from them);
//! as a standby, once the API server has answered a Lease round, so a rolling
//! update can replace a standby while the leader keeps the Lease. It stays 200
//! after that, also while the API server is away: no Service routes to the
//! controller, so readiness only gates rollouts, and a replica that lost its
//! watches resyncs by itself when the API server is back; that it is cut off
//! shows in the leader gauge, the staleness gauge and the log, and a standby
//! blocked from taking over would only stall a rollout that cannot help.
//!
//! `isthmus_controller_remote_staleness_seconds{cluster}` is computed at scrape
//! time from the remote watches, so it is never older than the scrape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tokio::net::TcpListener;

use crate::lease::Leadership;
use crate::remote::Remotes;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabel {
    cluster: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    error: String,
}

/// The controller's metrics. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Family<ReasonLabel, Counter>,
    errors: Family<ErrorLabel, Counter>,
    staleness: Family<ClusterLabel, Gauge<f64, AtomicU64>>,
    leader: Gauge,
    publishes: Counter,
    watches: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under `isthmus_controller_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("isthmus_controller");
        let reconciles = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "reconciles",
            "ServiceMirror reconciles that completed, by the reason of the Mirrored condition",
            reconciles.clone(),
        );
        let errors = Family::<ErrorLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "ServiceMirror reconciles that failed and are retried, by kind of error",
            errors.clone(),
        );
        let staleness = Family::<ClusterLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "remote_staleness_seconds",
            "Seconds since the remote cluster's API server last answered (the oldest among its watches)",
            staleness.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the Lease and writes",
            leader.clone(),
        );
        let publishes = Counter::default();
        registry.register(
            "configmap_publishes",
            "Writes of the sidecars' discovery ConfigMap",
            publishes.clone(),
        );
        let watches = Gauge::default();
        registry.register(
            "remote_watches",
            "Remote Service watches running (one per link and needed Service)",
            watches.clone(),
        );
        Self {
            registry: Arc::new(registry),
            watches,
            reconciles,
            errors,
            staleness,
            leader,
            publishes,
        }
    }

    /// Counts a completed reconcile.
    pub fn reconciled(&self, reason: &str) {
        self.reconciles
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a failed reconcile.
    pub fn failed(&self, error: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                error: error.to_owned(),
            })
            .inc();
    }

    /// Counts a ConfigMap write.
    pub fn published(&self) {
        self.publishes.inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The OpenMetrics text, with staleness taken from `remotes` now.
    pub fn encode(&self, remotes: Option<&Remotes>) -> String {
        self.watches
            .set(remotes.map_or(0, |r| i64::try_from(r.watch_count()).unwrap_or(i64::MAX)));
        if let Some(remotes) = remotes {
            self.staleness.clear();
            for (cluster, age) in remotes.staleness() {
                self.staleness
                    .get_or_create(&ClusterLabel {
                        cluster: cluster.to_string(),
                    })
                    .set(age.as_secs_f64());
            }
        }
        let mut body = String::new();
        if prometheus_client::encoding::text::encode(&mut body, &self.registry).is_err() {
            body.clear();
        }
        body
    }
}

/// What the endpoint reports.
#[derive(Clone)]
pub struct Endpoint {
    /// The metrics.
    pub metrics: Metrics,
    /// The remote watches, for staleness (absent while following).
    pub remotes: Arc<std::sync::Mutex<Option<Remotes>>>,
    /// Leadership, for `/ready`'s body.
    pub leadership: Leadership,
    /// Set by the leader's first full sync.
    pub ready: Arc<AtomicBool>,
}

impl Endpoint {
    /// Serves on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics accept failed");
                        continue;
                    }
                },
            };
            let endpoint = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let endpoint = endpoint.clone();
                    async move { Ok::<_, std::convert::Infallible>(endpoint.respond(&req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "metrics connection failed");
                }
            });
        }
    }

    /// See the module's documentation.
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            || (self.leadership.has_answered() && !self.leadership.is_leading())
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned());
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n".to_owned()),
            "/ready" if self.is_ready() => {
                let role = if self.leadership.is_leading() {
                    "leader"
                } else {
                    "standby"
                };
                text(StatusCode::OK, format!("ready ({role})\n"))
            }
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned()),
            "/metrics" => {
                let remotes = self
                    .remotes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let mut response = text(StatusCode::OK, self.metrics.encode(remotes.as_ref()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /ready, /live\n".to_owned(),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Binds the endpoint's address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
