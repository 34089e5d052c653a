//! Where a mirrored Service's HTTP requests go: each on a tunnel stream of its own,
//! marked with the one-request header, so the far gateway picks an endpoint per
//! request and a keep-alive or HTTP/2 client is not pinned to one pod.
//!
//! An HTTP/1 request rides its stream as HTTP/1.1, an HTTP/2 request as an HTTP/2
//! connection that carries only it: the destination gets the protocol the client
//! spoke. The stream opened while detection ran carries the first request, so a
//! one-shot client pays no extra round trip. Here too live the Service's
//! [`ServicePolicy`]: its deadline (`504` and a reset stream), and retries of
//! requests that failed before any response came back (see [`super::retry`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use isthmus_vocab::{Authority, ClusterName, Refusal, ServicePolicy};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info};

use super::replay::{BoxError, DEFAULT_REPLAY_LIMIT, ReplayBody};
use super::retry::{RetryBudget, RetryReason, is_idempotent, is_retryable_refusal};
use crate::metrics::{ProxyMetrics, RetryLabels, TimeoutLabels};
use crate::outcome::Outcome;
use crate::pool::{Pool, PoolError};
use crate::tunnel::H2Settings;
use crate::tunnel::client::{Carries, TunnelStream};

/// Why a request got no response from upstream.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The upstream connection or stream failed (answered `502`).
    Http(hyper::Error),
    /// The tunnel refused the stream: the client is reset, never answered.
    Refused(Outcome),
    /// The Service's deadline passed before the response head (answered `504`).
    TimedOut(Duration),
}

impl From<hyper::Error> for Failure {
    fn from(e: hyper::Error) -> Self {
        Failure::Http(e)
    }
}

/// The HTTP/2 client settings of the transparent path, for the shared upstream
/// connection and for each one-request connection alike.
pub(crate) fn h2_client(h2: &H2Settings) -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_header_list_size(h2.max_header_list_size)
        .max_send_buf_size(h2.max_send_buf_size)
        .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams);
    builder
}

/// The route of a mirrored Service, as the outbound handler found it.
#[derive(Clone, Debug)]
pub struct MirroredTarget {
    pub cluster: ClusterName,
    pub authority: Authority,
    pub policy: Arc<ServicePolicy>,
}

/// One client connection's requests to a mirrored Service, each on a new stream.
pub struct PerRequest {
    pool: Pool,
    target: MirroredTarget,
    carries: Carries,
    h2: H2Settings,
    budget: Arc<RetryBudget>,
    metrics: ProxyMetrics,
    /// The stream opened during detection, for the first request.
    first: Mutex<Option<TunnelStream>>,
    /// The refusal that ended an HTTP/1 connection (whose client is then reset).
    refused: OnceLock<Outcome>,
}

impl std::fmt::Debug for PerRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerRequest")
            .field("target", &self.target)
            .field("carries", &self.carries)
            .finish_non_exhaustive()
    }
}

/// One attempt's failure, before it is told apart as retryable or final.
enum AttemptError {
    Open(PoolError),
    Refused(Refusal),
    Failed(hyper::Error),
}

impl PerRequest {
    /// `first` is the stream opened for the connection, marked as `carries` says.
    pub fn new(
        pool: Pool,
        target: MirroredTarget,
        carries: Carries,
        first: TunnelStream,
        h2: H2Settings,
        budget: Arc<RetryBudget>,
        metrics: ProxyMetrics,
    ) -> Self {
        Self {
            pool,
            target,
            carries,
            h2,
            budget,
            metrics,
            first: Mutex::new(Some(first)),
            refused: OnceLock::new(),
        }
    }

    /// The refusal that ended the connection, if one did.
    pub fn refused(&self) -> Option<Outcome> {
        self.refused.get().copied()
    }

    /// Sends one request, retrying and timing it out as the Service's policy says.
    pub(crate) async fn send<B>(&self, req: Request<B>) -> Result<Response<UpstreamBody>, Failure>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let policy = self.target.policy.clone();
        let start = Instant::now();
        // The whole response's deadline bounds its head too.
        let deadline = [policy.request_timeout, policy.response_timeout]
            .into_iter()
            .flatten()
            .min()
            .map(|t| (start + t, t));
        self.budget.request();
        let retryable = policy.retry_limit > 0
            && (policy.retry_any_method || is_idempotent(req.method()))
            && req.method() != http::Method::CONNECT
            && req.body().size_hint().lower() <= DEFAULT_REPLAY_LIMIT as u64;
        let limit = if retryable { DEFAULT_REPLAY_LIMIT } else { 0 };
        let (parts, body) = req.into_parts();
        let head = Head::from(parts);
        let body = ReplayBody::new(body, limit);
        let mut retries = 0;
        loop {
            let attempt_body = body.next_attempt();
            let attempt_deadline = policy
                .retry_timeout
                .filter(|_| retryable)
                .map(|t| Instant::now() + t);
            let until = [deadline.map(|(d, _)| d), attempt_deadline]
                .into_iter()
                .flatten()
                .min();
            let attempt = self.attempt(head.request(attempt_body));
            let result = match until {
                Some(until) => tokio::time::timeout_at(until, attempt).await.ok(),
                None => Some(attempt.await),
            };
            let reason = match result {
                Some(Ok((response, task))) => {
                    let status = response.status().as_u16();
                    if !(retryable && policy.retries_status(status)) {
                        return Ok(self.respond(response, task, start));
                    }
                    if !self.may_retry(retries, &body, deadline) {
                        return Ok(self.respond(response, task, start));
                    }
                    RetryReason::Status
                }
                Some(Err(e)) => {
                    let (reason, failure) = self.classify(e);
                    if reason.is_none() || !retryable || !self.may_retry(retries, &body, deadline) {
                        if let Failure::Refused(outcome) = &failure {
                            let _ = self.refused.set(*outcome);
                        }
                        return Err(failure);
                    }
                    reason.unwrap_or(RetryReason::Failed)
                }
                None => match deadline {
                    Some((d, timeout)) if Instant::now() >= d => {
                        return Err(self.timed_out(timeout));
                    }
                    _ if self.may_retry(retries, &body, deadline) => RetryReason::AttemptTimeout,
                    Some((_, timeout)) => return Err(self.timed_out(timeout)),
                    None => {
                        let timeout = policy.retry_timeout.unwrap_or_default();
                        return Err(self.timed_out(timeout));
                    }
                },
            };
            retries += 1;
            debug!(authority = %self.target.authority, reason = reason.as_str(), retry = retries, "retrying request");
            self.metrics
                .request_retries
                .get_or_create(&RetryLabels {
                    authority: self.metrics.authority_label(self.target.authority.as_str()),
                    reason: reason.as_str(),
                })
                .inc();
        }
    }

    /// Whether one more attempt is allowed: under the limit, with the body still
    /// replayable, before the deadline, and within the Service's budget (asked last,
    /// as asking spends a retry).
    fn may_retry<B: Body<Data = Bytes>>(
        &self,
        retries: u32,
        body: &ReplayBody<B>,
        deadline: Option<(Instant, Duration)>,
    ) -> bool {
        retries < self.target.policy.retry_limit
            && body.is_replayable()
            && deadline.is_none_or(|(d, _)| Instant::now() < d)
            && self.budget.try_retry()
    }

    fn classify(&self, error: AttemptError) -> (Option<RetryReason>, Failure) {
        match error {
            AttemptError::Open(e) => {
                let outcome = e.outcome();
                let reason = match e {
                    PoolError::Refused { refusal, .. } if !is_retryable_refusal(refusal) => None,
                    PoolError::Refused { .. } => Some(RetryReason::Refused),
                    PoolError::LinkDown { .. } | PoolError::Connection { .. } => {
                        Some(RetryReason::Failed)
                    }
                };
                (reason, Failure::Refused(outcome))
            }
            AttemptError::Refused(refusal) => (
                is_retryable_refusal(refusal).then_some(RetryReason::Refused),
                Failure::Refused(Outcome::refused_by_peer(refusal)),
            ),
            AttemptError::Failed(e) => {
                // Nothing of a response came: the stream was reset or its connection
                // lost. A request whose own body broke is the client's, not retried.
                let reason = (!e.is_user()).then_some(RetryReason::Failed);
                (reason, Failure::Http(e))
            }
        }
    }

    fn timed_out(&self, timeout: Duration) -> Failure {
        info!(authority = %self.target.authority, ?timeout, "request timed out, answering 504");
        self.metrics
            .request_timeouts
            .get_or_create(&TimeoutLabels {
                authority: self.metrics.authority_label(self.target.authority.as_str()),
            })
            .inc();
        Failure::TimedOut(timeout)
    }

    /// The response on its way to the client, still bound by the whole response's
    /// deadline, its connection reset if the client leaves before its end.
    fn respond(
        &self,
        response: Response<Incoming>,
        task: AbortOnDrop,
        start: Instant,
    ) -> Response<UpstreamBody> {
        let deadline = self.target.policy.response_timeout.map(|t| start + t);
        response.map(|body| UpstreamBody::guarded(body, task, deadline))
    }

    /// One attempt on one stream: the first request takes the stream opened
    /// during detection, any other a new one.
    async fn attempt<B>(
        &self,
        req: Request<B>,
    ) -> Result<(Response<Incoming>, AbortOnDrop), AttemptError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let first = self
            .first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let stream = match first {
            Some(stream) => stream,
            None => {
                let target = &self.target;
                self.pool
                    .open_carrying(&target.authority, Some(&target.cluster), self.carries)
                    .await
                    .map_err(AttemptError::Open)?
            }
        };
        let refusal = stream.refusal_cell();
        let io = TokioIo::new(stream);
        let sent = match self.carries {
            Carries::H2Request => {
                let (mut sender, conn) = h2_client(&self.h2)
                    .handshake(io)
                    .await
                    .map_err(AttemptError::Failed)?;
                let task = AbortOnDrop::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "one-request HTTP/2 connection ended");
                    }
                });
                (sender.send_request(req).await, task)
            }
            _ => {
                let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(AttemptError::Failed)?;
                let task = AbortOnDrop::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(error = %e, "one-request HTTP/1 connection ended");
                    }
                });
                (sender.send_request(req).await, task)
            }
        };
        match sent {
            (Ok(response), task) => Ok((response, task)),
            (Err(e), _) => Err(match refusal.get() {
                Some(refusal) => AttemptError::Refused(refusal),
                None => AttemptError::Failed(e),
            }),
        }
    }
}

/// A request head kept to build each attempt's request. Extensions are not kept:
/// the client's upgrade handle was taken off before the request was sent.
struct Head {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl From<http::request::Parts> for Head {
    fn from(parts: http::request::Parts) -> Self {
        Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
        }
    }
}

impl Head {
    fn request<B>(&self, body: B) -> Request<B> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// A task aborted when this handle is dropped, unless it was let go.
pub(crate) struct AbortOnDrop(Option<JoinHandle<()>>);

impl AbortOnDrop {
    fn spawn(task: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(Some(tokio::spawn(task)))
    }

    fn none() -> Self {
        Self(None)
    }

    /// The task runs on by itself (it ends when its connection does).
    fn let_go(&mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Why an upstream response body ended early.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    #[error("the response did not end within the Service's response timeout")]
    Deadline,
}

impl From<Infallible> for UpstreamBodyError {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

/// A response body from upstream. One from a one-request connection owns that
/// connection's task: a body dropped before its end (the client left, or the
/// response deadline passed) aborts it, which resets the stream so the far side
/// sees the request end; a body read to its end lets the connection close cleanly.
pub struct UpstreamBody {
    inner: Incoming,
    task: AbortOnDrop,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl UpstreamBody {
    pub(crate) fn shared(inner: Incoming) -> Self {
        Self {
            inner,
            task: AbortOnDrop::none(),
            deadline: None,
        }
    }

    fn guarded(inner: Incoming, task: AbortOnDrop, deadline: Option<Instant>) -> Self {
        let mut body = Self {
            inner,
            task,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        };
        if body.inner.is_end_stream() {
            body.task.let_go();
        }
        body
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            return Poll::Ready(Some(Err(UpstreamBodyError::Deadline)));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.task.let_go(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.task.let_go(),
            _ => {}
        }
        polled.map(|frame| frame.map(|f| f.map_err(UpstreamBodyError::Upstream)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
