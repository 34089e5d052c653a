//! The tunnel's client end: one HTTP/2 connection carries many CONNECT streams.

use std::future::Future;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{CLUSTER_HEADER, H2Settings, Io, REFUSAL_HEADER, Refusal};
use crate::route::{Authority, ClusterName};

/// The handle that opens streams on one tunnel connection; clones share it.
pub type TunnelSender = SendRequest<Empty<Bytes>>;

/// An open tunnel stream: the application's bytes, both ways.
pub type TunnelStream = TokioIo<Upgraded>;

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The far end answered and said no.
    #[error("tunnel stream refused: {0}")]
    Refused(Refusal),
    /// The connection carrying the stream failed or closed; the stream may be retried
    /// on another connection because the far end never acted on it.
    #[error("tunnel connection failed")]
    Connection(#[source] hyper::Error),
}

/// Runs the HTTP/2 handshake on an established (TLS) stream. The returned future
/// drives the connection and must be spawned; it ends when the connection closes,
/// including when keepalive PINGs go unanswered.
pub async fn handshake<I: Io>(
    io: I,
    settings: &H2Settings,
) -> Result<
    (
        TunnelSender,
        impl Future<Output = Result<(), hyper::Error>> + Send + use<I>,
    ),
    hyper::Error,
> {
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_header_list_size(settings.max_header_list_size)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .keep_alive_while_idle(true);
    builder.handshake(TokioIo::new(io)).await
}

/// Opens one stream to `authority` in `cluster` (no cluster: the peer's own pod).
pub async fn open(
    sender: &mut TunnelSender,
    authority: &Authority,
    cluster: Option<&ClusterName>,
) -> Result<TunnelStream, OpenError> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.as_str());
    if let Some(cluster) = cluster {
        request = request.header(CLUSTER_HEADER, cluster.as_str());
    }
    let request = request
        .body(Empty::new())
        .map_err(|_| OpenError::Refused(Refusal::BadRequest))?;
    sender.ready().await.map_err(OpenError::Connection)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(OpenError::Connection)?;
    if !response.status().is_success() {
        let header = response.headers().get(REFUSAL_HEADER).map(|v| v.as_bytes());
        return Err(OpenError::Refused(Refusal::from_response(
            response.status(),
            header,
        )));
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(OpenError::Connection)?;
    Ok(TokioIo::new(upgraded))
}
