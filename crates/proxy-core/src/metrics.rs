//! The proxy's traffic metrics (prometheus-client), owned here because the hot path
//! updates them. The proxy crate registers them and serves `/metrics`.
//!
//! Label cardinality is bounded: authorities are recorded only up to
//! [`MAX_AUTHORITY_LABELS`] distinct values, the rest fall under `other`, so a client
//! that dials many names cannot grow the registry without limit.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::forward::ByteCounters;
use crate::outcome::Outcome;

/// Which listener a connection came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
    Gateway,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Gateway => "gateway",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpCloseLabels {
    pub direction: Direction,
    /// [`Outcome::close_label`]: `eof`, `idle_timeout`, `upstream_reset`, ... (a fixed set).
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ByteLabels {
    pub direction: Direction,
    /// `to_upstream` or `to_downstream`.
    pub flow: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpLabels {
    pub direction: Direction,
    pub authority: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpResponseLabels {
    pub direction: Direction,
    pub authority: Arc<str>,
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: Direction,
    /// [`Outcome::refusal_label`]: a [`isthmus_vocab::Refusal`] such as
    /// `not_exported`, or a rejection such as `max_connections`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RetryLabels {
    pub authority: Arc<str>,
    /// [`crate::http::RetryReason::as_str`]: `refused`, `failed`, `attempt_timeout`, `status`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub authority: Arc<str>,
}

/// Distinct authority label values kept before new ones become `other`.
pub const MAX_AUTHORITY_LABELS: usize = 256;

/// All traffic metrics of one proxy process. Cheap to clone (every field is an `Arc`).
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpCloseLabels, Counter>,
    pub tcp_open: Family<TcpLabels, Gauge>,
    pub tcp_bytes: Family<ByteLabels, Counter>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_responses: Family<HttpResponseLabels, Counter>,
    pub http_latency: Family<HttpLabels, Histogram>,
    pub refusals: Family<RefusalLabels, Counter>,
    /// Requests to mirrored Services sent again, by why.
    pub request_retries: Family<RetryLabels, Counter>,
    /// Requests to mirrored Services answered `504` at their deadline.
    pub request_timeouts: Family<TimeoutLabels, Counter>,
    authorities: Arc<Mutex<HashSet<Arc<str>>>>,
    /// Per-direction handles looked up once, so a new connection costs atomic adds
    /// rather than four trips through the families' locks.
    handles: Arc<[DirectionHandles; 3]>,
}

#[derive(Debug)]
struct DirectionHandles {
    opened: Counter,
    open: Gauge,
    bytes: ByteCounters,
}

const DIRECTIONS: [Direction; 3] = [Direction::Outbound, Direction::Inbound, Direction::Gateway];

fn index(direction: Direction) -> usize {
    match direction {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
        Direction::Gateway => 2,
    }
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~3.3 s in 16 doublings: covers a loopback hop and a slow remote cluster.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let tcp_opened: Family<TcpLabels, Counter> = Family::default();
        let tcp_open: Family<TcpLabels, Gauge> = Family::default();
        let tcp_bytes: Family<ByteLabels, Counter> = Family::default();
        let handles = DIRECTIONS.map(|direction| {
            // One statement per lookup: a `get_or_create` guard holds the family's
            // read lock to the end of its statement, and a second lookup that has to
            // insert would wait for the write lock forever.
            let opened = tcp_opened.get_or_create(&TcpLabels { direction }).clone();
            let open = tcp_open.get_or_create(&TcpLabels { direction }).clone();
            let to_upstream = tcp_bytes
                .get_or_create(&ByteLabels {
                    direction,
                    flow: "to_upstream",
                })
                .clone();
            let to_downstream = tcp_bytes
                .get_or_create(&ByteLabels {
                    direction,
                    flow: "to_downstream",
                })
                .clone();
            DirectionHandles {
                opened,
                open,
                bytes: ByteCounters {
                    to_upstream,
                    to_downstream,
                },
            }
        });
        Self {
            tcp_opened,
            tcp_closed: Family::default(),
            tcp_open,
            tcp_bytes,
            http_requests: Family::default(),
            http_responses: Family::default(),
            http_latency: Family::new_with_constructor(latency_histogram),
            refusals: Family::default(),
            request_retries: Family::default(),
            request_timeouts: Family::default(),
            authorities: Arc::default(),
            handles: Arc::new(handles),
        }
    }
}

impl ProxyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "request_retries",
            "HTTP requests to mirrored Services sent again, by reason",
            self.request_retries.clone(),
        );
        registry.register(
            "request_timeouts",
            "HTTP requests to mirrored Services answered 504 at their deadline",
            self.request_timeouts.clone(),
        );
        registry.register(
            "tcp_open",
            "TCP connections accepted",
            self.tcp_opened.clone(),
        );
        registry.register(
            "tcp_close",
            "TCP connections closed, by reason",
            self.tcp_closed.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "TCP connections currently open",
            self.tcp_open.clone(),
        );
        registry.register(
            "tcp_transfer_bytes",
            "Bytes forwarded, by flow",
            self.tcp_bytes.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests seen",
            self.http_requests.clone(),
        );
        registry.register(
            "http_responses",
            "HTTP responses seen, by status code",
            self.http_responses.clone(),
        );
        registry.register(
            "http_response_latency_seconds",
            "Time from request to response headers",
            self.http_latency.clone(),
        );
        registry.register(
            "tunnel_refusals",
            "Tunnel streams and connections refused, by reason",
            self.refusals.clone(),
        );
    }

    /// The byte counters of one direction.
    pub fn byte_counters(&self, direction: Direction) -> ByteCounters {
        self.handles[index(direction)].bytes.clone()
    }

    /// Marks a connection open; the returned guard marks it closed when dropped,
    /// with the outcome last set on it ([`Outcome::EOF`] unless told otherwise).
    pub fn open_connection(&self, direction: Direction) -> ConnectionGuard {
        let handles = &self.handles[index(direction)];
        handles.opened.inc();
        handles.open.inc();
        ConnectionGuard {
            metrics: self.clone(),
            direction,
            outcome: Outcome::EOF,
        }
    }

    /// Counts `outcome` in `tunnel_refusals_total` if it is a refusal or rejection.
    pub fn refused(&self, direction: Direction, outcome: Outcome) {
        if let Some(reason) = outcome.refusal_label() {
            self.refusals
                .get_or_create(&RefusalLabels { direction, reason })
                .inc();
        }
    }

    /// The label value for an authority, bounded by [`MAX_AUTHORITY_LABELS`].
    pub fn authority_label(&self, authority: &str) -> Arc<str> {
        let mut known = match self.authorities.lock() {
            Ok(known) => known,
            // A panic while holding this lock cannot leave the set inconsistent.
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(label) = known.get(authority) {
            return label.clone();
        }
        if known.len() >= MAX_AUTHORITY_LABELS {
            return Arc::from("other");
        }
        let label: Arc<str> = Arc::from(authority);
        known.insert(label.clone());
        label
    }
}

/// Keeps the open-connections gauge honest whatever path a connection ends on.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: ProxyMetrics,
    direction: Direction,
    outcome: Outcome,
}

impl ConnectionGuard {
    /// How the connection ended: its close label when the guard drops.
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    /// Ends the connection with `outcome` and counts it as a refusal if it is one.
    pub fn refuse(&mut self, outcome: Outcome) {
        self.metrics.refused(self.direction, outcome);
        self.outcome = outcome;
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let direction = self.direction;
        self.metrics.handles[index(direction)].open.dec();
        self.metrics
            .tcp_closed
            .get_or_create(&TcpCloseLabels {
                direction,
                reason: self.outcome.close_label(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_labels_are_bounded() {
        let metrics = ProxyMetrics::default();
        for i in 0..MAX_AUTHORITY_LABELS {
            assert_eq!(
                &*metrics.authority_label(&format!("h{i}:80")),
                format!("h{i}:80")
            );
        }
        assert_eq!(&*metrics.authority_label("new:80"), "other");
        assert_eq!(&*metrics.authority_label("h1:80"), "h1:80");
    }

    #[test]
    fn guard_counts_open_and_close() {
        let metrics = ProxyMetrics::default();
        let mut guard = metrics.open_connection(Direction::Outbound);
        let labels = TcpLabels {
            direction: Direction::Outbound,
        };
        assert_eq!(metrics.tcp_open.get_or_create(&labels).get(), 1);
        guard.set_outcome(Outcome::new(
            crate::outcome::Side::Local,
            crate::outcome::Reason::IdleTimeout,
        ));
        drop(guard);
        assert_eq!(metrics.tcp_open.get_or_create(&labels).get(), 0);
        let closed = TcpCloseLabels {
            direction: Direction::Outbound,
            reason: "idle_timeout",
        };
        assert_eq!(metrics.tcp_closed.get_or_create(&closed).get(), 1);
    }
}
