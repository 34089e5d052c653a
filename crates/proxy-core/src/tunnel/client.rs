//! The tunnel's client end: one HTTP/2 connection carries many CONNECT streams.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::{CLUSTER_HEADER, H2Settings, Io, REFUSAL_HEADER, Refusal};
use crate::route::{Authority, ClusterName};

/// The handle that opens streams on one tunnel connection; clones share it.
pub type TunnelSender = SendRequest<Empty<Bytes>>;

/// How long a stream that ended its own side cleanly waits for the peer's end of
/// stream before it is dropped anyway (then with a reset).
const LINGER: Duration = Duration::from_secs(2);

/// An open tunnel stream: the application's bytes, both ways.
///
/// Dropping an HTTP/2 stream whose peer has not ended its side sends RST_STREAM,
/// which the far end reads as an abort. So a stream that finished cleanly from this
/// side (its write side shut down) but is dropped before the peer's end of stream
/// arrived drains the rest in the background for up to [`LINGER`]: the far end then
/// sees an orderly close. A stream dropped without a shutdown, as on errors, is
/// reset at once, which is what an abort should look like.
pub struct TunnelStream {
    io: Option<TokioIo<Upgraded>>,
    write_shut: bool,
    read_eof: bool,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("write_shut", &self.write_shut)
            .field("read_eof", &self.read_eof)
            .finish_non_exhaustive()
    }
}

impl TunnelStream {
    fn new(io: TokioIo<Upgraded>) -> Self {
        Self {
            io: Some(io),
            write_shut: false,
            read_eof: false,
        }
    }

    fn io(&mut self) -> Pin<&mut TokioIo<Upgraded>> {
        Pin::new(
            self.io
                .as_mut()
                .expect("the stream is only taken out in drop"),
        )
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.io().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            self.read_eof = true;
        }
        polled
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = self.io().poll_shutdown(cx);
        if let Poll::Ready(Ok(())) = polled {
            self.write_shut = true;
        }
        polled
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let Some(mut io) = self.io.take() else {
            return;
        };
        if !self.write_shut || self.read_eof {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let mut sink = [0u8; 4096];
            let drain = async { while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
}

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
    Ok(TunnelStream::new(TokioIo::new(upgraded)))
}
