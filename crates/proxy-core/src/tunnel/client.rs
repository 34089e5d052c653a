//! The tunnel's client end: one HTTP/2 connection carries many CONNECT streams.
//!
//! A stream is opened optimistically: [`open`] returns as soon as the `CONNECT` is
//! queued, and the application's first bytes follow it in the same flight instead
//! of waiting a round trip for the answer. The answer is awaited by the first read
//! (or by [`TunnelStream::verdict`]); a refusal fails that read with a
//! [`StreamRefused`] error and is recorded, typed, in the stream's [`RefusalCell`],
//! which the handler keeps after handing the stream to a forwarder or an HTTP
//! client. Bytes sent to a stream that is then refused are discarded by the far
//! end, which never acted on them.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::SendStream;
use h2::client::ResponseFuture;
use http::{Method, Request};
use isthmus_vocab::{
    Authority, CLUSTER_HEADER, ClusterName, ONE_REQUEST_H2, ONE_REQUEST_HEADER, ONE_REQUEST_HTTP1,
    REFUSAL_HEADER, Refusal,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::stream::{ConnectionError, H2Io, Pinger, drive_with_pinger, h2_io_error};
use super::{H2Settings, Io};

/// The handle that opens streams on one tunnel connection; clones share it.
pub type TunnelSender = h2::client::SendRequest<Bytes>;

/// How long a stream that ended its own side cleanly waits for the peer's end of
/// stream before it is dropped anyway (then with a reset).
const LINGER: Duration = Duration::from_secs(2);

/// The error a read of a refused stream fails with. It only carries the refusal
/// into logs; the handler learns it from the stream's [`RefusalCell`].
#[derive(Debug, thiserror::Error)]
#[error("tunnel stream refused: {0}")]
pub struct StreamRefused(pub Refusal);

/// The refusal a tunnel stream was answered with, readable after the stream itself
/// went to a forwarder or an HTTP client (which only see I/O errors). Clones share it.
#[derive(Clone, Debug, Default)]
pub struct RefusalCell(Arc<OnceLock<Refusal>>);

impl RefusalCell {
    /// The refusal, once the far end (or the answer's deadline) refused the stream.
    pub fn get(&self) -> Option<Refusal> {
        self.0.get().copied()
    }

    fn set(&self, refusal: Refusal) {
        let _ = self.0.set(refusal);
    }
}

enum Answer {
    Pending(ResponseFuture),
    Open,
    Refused(Refusal),
    Failed,
}

/// An open tunnel stream: the application's bytes, both ways.
///
/// Dropping an HTTP/2 stream whose peer has not ended its side sends RST_STREAM,
/// which the far end reads as an abort. So a stream that finished cleanly from this
/// side (its write side shut down) but is dropped before the peer's end of stream
/// arrived drains the rest in the background for up to [`LINGER`]: the far end then
/// sees an orderly close. A stream dropped without a shutdown, as on errors, is
/// reset at once, which is what an abort should look like.
pub struct TunnelStream {
    io: Option<H2Io>,
    answer: Answer,
    /// The answer must come by then: a peer that went silent (black-holed) would
    /// otherwise hold the stream until the connection's PING keepalive gives up.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    refusal: RefusalCell,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let answer = match self.answer {
            Answer::Pending(_) => "pending",
            Answer::Open => "open",
            Answer::Refused(r) => r.as_str(),
            Answer::Failed => "failed",
        };
        f.debug_struct("TunnelStream")
            .field("answer", &answer)
            .finish_non_exhaustive()
    }
}

impl TunnelStream {
    fn new(send: SendStream<Bytes>, response: ResponseFuture, answer_within: Duration) -> Self {
        Self {
            io: Some(H2Io::new(send, None)),
            answer: Answer::Pending(response),
            deadline: Some(Box::pin(tokio::time::sleep(answer_within))),
            refusal: RefusalCell::default(),
        }
    }

    fn io(&mut self) -> Pin<&mut H2Io> {
        Pin::new(
            self.io
                .as_mut()
                .expect("the stream is only taken out in drop or into_pending"),
        )
    }

    /// Where the stream's refusal will be, for whoever hands the stream on.
    pub fn refusal_cell(&self) -> RefusalCell {
        self.refusal.clone()
    }

    fn refused(&mut self, refusal: Refusal) -> Poll<Result<(), OpenError>> {
        self.answer = Answer::Refused(refusal);
        self.refusal.set(refusal);
        Poll::Ready(Err(OpenError::Refused(refusal)))
    }

    /// Waits for the far end's answer: `Ok` once it accepted the stream.
    pub async fn verdict(&mut self) -> Result<(), OpenError> {
        poll_fn(|cx| self.poll_answer(cx)).await
    }

    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), OpenError>> {
        let Answer::Pending(response) = &mut self.answer else {
            return Poll::Ready(match self.answer {
                Answer::Open => Ok(()),
                Answer::Refused(refusal) => Err(OpenError::Refused(refusal)),
                _ => Err(OpenError::Connection(h2::Error::from(h2::Reason::CANCEL))),
            });
        };
        let answered = match Pin::new(response).poll(cx) {
            Poll::Ready(answered) => answered,
            Poll::Pending => {
                if let Some(deadline) = &mut self.deadline {
                    ready!(deadline.as_mut().poll(cx));
                }
                // No answer in time: as a refusal for timing out, so the caller
                // resets its client and counts it; dropping the stream resets it.
                self.deadline = None;
                return self.refused(Refusal::UpstreamTimeout);
            }
        };
        self.deadline = None;
        match answered {
            Ok(response) if response.status().is_success() => {
                self.answer = Answer::Open;
                self.io().set_recv(response.into_body());
                Poll::Ready(Ok(()))
            }
            Ok(response) => {
                let header = response.headers().get(REFUSAL_HEADER).map(|v| v.as_bytes());
                let refusal = Refusal::from_response(response.status(), header);
                self.refused(refusal)
            }
            Err(e) => {
                self.answer = Answer::Failed;
                Poll::Ready(Err(OpenError::Connection(e)))
            }
        }
    }

    /// A write that failed because the far end refused the stream: the refusal
    /// ends the stream and a reset follows it, which a client that writes before
    /// reading meets first. The refusal is what happened, so it is reported.
    fn refused_instead(&mut self, cx: &mut Context<'_>, error: io::Error) -> io::Error {
        match self.poll_answer(cx) {
            Poll::Ready(Err(OpenError::Refused(refusal))) => refused_error(refusal),
            _ => error,
        }
    }

    /// The sending half and the pending answer, for a relay that passes the stream
    /// on frame by frame; `None` once the answer was read.
    pub(crate) fn into_pending(mut self) -> Option<(SendStream<Bytes>, ResponseFuture)> {
        let answer = std::mem::replace(&mut self.answer, Answer::Failed);
        let Answer::Pending(response) = answer else {
            return None;
        };
        let io = self.io.take()?;
        Some((io.into_send(), response))
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match ready!(self.poll_answer(cx)) {
            Ok(()) => self.io().poll_read(cx, buf),
            Err(OpenError::Refused(refusal)) => Poll::Ready(Err(refused_error(refusal))),
            Err(OpenError::Connection(e)) => Poll::Ready(Err(h2_io_error(e))),
        }
    }
}

fn refused_error(refusal: Refusal) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionRefused, StreamRefused(refusal))
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match ready!(self.io().poll_write(cx, buf)) {
            Err(e) => Poll::Ready(Err(self.refused_instead(cx, e))),
            written => Poll::Ready(written),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let Some(mut io) = self.io.take() else {
            return;
        };
        if !io.write_shut() || io.read_eof() {
            return;
        }
        let answer = match std::mem::replace(&mut self.answer, Answer::Failed) {
            Answer::Pending(response) => Some(response),
            Answer::Open => None,
            Answer::Refused(_) | Answer::Failed => return,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let linger = async {
                if let Some(response) = answer {
                    match response.await {
                        Ok(response) if response.status().is_success() => {
                            io.set_recv(response.into_body());
                        }
                        _ => return,
                    }
                }
                io.drain().await;
            };
            let _ = tokio::time::timeout(LINGER, linger).await;
        });
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The far end answered and said no.
    #[error("tunnel stream refused: {0}")]
    Refused(Refusal),
    /// The connection carrying the stream failed or closed; a stream that failed
    /// before it was sent may be retried on another connection.
    #[error("tunnel connection failed")]
    Connection(#[source] h2::Error),
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
        impl Future<Output = Result<(), ConnectionError>> + Send + use<I>,
    ),
    h2::Error,
> {
    let (sender, _pinger, driver) = handshake_with_pinger(io, settings).await?;
    Ok((sender, driver))
}

/// [`handshake`], also returning the connection's [`Pinger`] (absent if h2 gave
/// none), for a pool that answers liveness probes with a PING round trip.
pub(crate) async fn handshake_with_pinger<I: Io>(
    io: I,
    settings: &H2Settings,
) -> Result<
    (
        TunnelSender,
        Option<Pinger>,
        impl Future<Output = Result<(), ConnectionError>> + Send + use<I>,
    ),
    h2::Error,
> {
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_header_list_size(settings.max_header_list_size)
        .max_send_buffer_size(settings.max_send_buf_size)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let pinger = connection.ping_pong().map(Pinger::new);
    let driver = drive_with_pinger(
        connection,
        pinger.clone(),
        settings.keepalive_interval,
        settings.keepalive_timeout,
    );
    Ok((sender, pinger, driver))
}

/// What a stream carries, as the far end learns it from the `CONNECT`'s
/// [`ONE_REQUEST_HEADER`]: the hop that picks an endpoint may score it by the
/// response of a stream that carries one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carries {
    /// A whole connection's bytes, whatever they are (no header).
    Connection,
    /// One HTTP/1.1 request and its response.
    Http1Request,
    /// An HTTP/2 connection that carries one request.
    H2Request,
}

impl Carries {
    fn header(self) -> Option<&'static str> {
        match self {
            Carries::Connection => None,
            Carries::Http1Request => Some(ONE_REQUEST_HTTP1),
            Carries::H2Request => Some(ONE_REQUEST_H2),
        }
    }
}

/// Opens one stream to `authority` in `cluster` (no cluster: the peer's own pod).
/// Returns once the `CONNECT` is queued, before the far end answered; an answer
/// that has not come within `answer_within` counts as `upstream_timeout`.
pub async fn open(
    sender: &mut TunnelSender,
    authority: &Authority,
    cluster: Option<&ClusterName>,
    answer_within: Duration,
) -> Result<TunnelStream, OpenError> {
    open_carrying(
        sender,
        authority,
        cluster,
        Carries::Connection,
        answer_within,
    )
    .await
}

/// [`open`] for a stream that carries what `carries` says.
pub async fn open_carrying(
    sender: &mut TunnelSender,
    authority: &Authority,
    cluster: Option<&ClusterName>,
    carries: Carries,
    answer_within: Duration,
) -> Result<TunnelStream, OpenError> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.as_str());
    if let Some(cluster) = cluster {
        request = request.header(CLUSTER_HEADER, cluster.as_str());
    }
    if let Some(protocol) = carries.header() {
        request = request.header(ONE_REQUEST_HEADER, protocol);
    }
    let request = request
        .body(())
        .map_err(|_| OpenError::Refused(Refusal::BadRequest))?;
    poll_fn(|cx| sender.poll_ready(cx))
        .await
        .map_err(OpenError::Connection)?;
    let (response, send) = sender
        .send_request(request, false)
        .map_err(OpenError::Connection)?;
    Ok(TunnelStream::new(send, response, answer_within))
}
