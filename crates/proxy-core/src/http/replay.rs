//! A request body that can be sent again: buffered while it is sent, up to a small
//! limit, so a retry replays what the failed attempt read and then goes on with the
//! rest of the client's body. Nothing waits for the whole body before sending, so a
//! streaming request (gRPC) flows as before; past the limit the buffer is let go and
//! the request can no longer be retried.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

/// Default most bytes of a body kept for a retry: requests that can be retried are
/// small (an idempotent request seldom has a body at all).
pub const DEFAULT_REPLAY_LIMIT: usize = 64 * 1024;

/// One attempt's view of a replayable body; [`ReplayBody::next_attempt`] makes the
/// next attempt's. Only the newest attempt reads on from the client.
#[derive(Debug)]
pub struct ReplayBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Which attempt this is: an older one stops, so two never read the client.
    attempt: u32,
    /// Frames of the buffer this attempt has yielded.
    replayed: usize,
}

#[derive(Debug)]
struct Shared<B> {
    inner: B,
    /// What was read from the client so far, while it fits `limit`.
    frames: VecDeque<Buffered>,
    size: usize,
    limit: usize,
    /// The buffer was let go: a retry would miss bytes.
    overflowed: bool,
    /// The client's body has ended (a later attempt replays only the buffer).
    ended: bool,
    newest: u32,
}

#[derive(Clone, Debug)]
enum Buffered {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Buffered {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Buffered::Data(data) => Frame::data(data.clone()),
            Buffered::Trailers(trailers) => Frame::trailers(trailers.clone()),
        }
    }
}

/// A boxed error, as hyper's client takes from a request body.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a [`ReplayBody`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Inner(BoxError),
    /// An attempt abandoned for a newer one polled its body again.
    #[error("request body taken over by a newer attempt")]
    Superseded,
}

impl<B: Body<Data = Bytes>> ReplayBody<B> {
    /// The first attempt's body, keeping at most `limit` bytes for retries.
    pub fn new(inner: B, limit: usize) -> Self {
        let ended = inner.is_end_stream();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                inner,
                frames: VecDeque::new(),
                size: 0,
                limit,
                overflowed: false,
                ended,
                newest: 0,
            })),
            attempt: 0,
            replayed: 0,
        }
    }

    /// The next attempt's body, replaying from the start. For a retry, ask
    /// [`is_replayable`](Self::is_replayable) first: past the limit, the buffer
    /// no longer holds the start.
    pub fn next_attempt(&self) -> Self {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.newest += 1;
        Self {
            shared: self.shared.clone(),
            attempt: shared.newest,
            replayed: 0,
        }
    }

    /// Whether a retry could still replay the whole body read so far.
    pub fn is_replayable(&self) -> bool {
        !self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .overflowed
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ReplayError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if shared.newest != this.attempt {
            return Poll::Ready(Some(Err(ReplayError::Superseded)));
        }
        if let Some(buffered) = shared.frames.get(this.replayed) {
            this.replayed += 1;
            return Poll::Ready(Some(Ok(buffered.frame())));
        }
        if shared.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut shared.inner).poll_frame(cx);
        let frame = match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                return Poll::Ready(Some(Err(ReplayError::Inner(e.into()))));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if shared.inner.is_end_stream() {
            shared.ended = true;
        }
        if !shared.overflowed {
            let buffered = match frame.data_ref() {
                Some(data) => Some((Buffered::Data(data.clone()), data.len())),
                None => frame
                    .trailers_ref()
                    .map(|t| (Buffered::Trailers(t.clone()), 0)),
            };
            if let Some((buffered, len)) = buffered {
                shared.size += len;
                if shared.size > shared.limit {
                    shared.overflowed = true;
                    shared.frames.clear();
                } else {
                    shared.frames.push_back(buffered);
                    this.replayed += 1;
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.ended && self.replayed >= shared.frames.len()
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        // The first attempt's length is the client's; a replay's is the buffer's
        // plus what the client has yet to send, which only the client's hint knows.
        let mut hint = shared.inner.size_hint();
        if self.replayed == 0 && !shared.overflowed {
            let buffered = shared.size as u64;
            hint.set_lower(hint.lower() + buffered);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + buffered);
            }
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    type Chunks = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    fn chunks(parts: &[&'static str]) -> Chunks {
        let frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn read_all<B: Body<Data = Bytes> + Unpin>(body: B) -> Vec<u8>
    where
        B::Error: std::fmt::Debug,
    {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_retry_replays_what_was_read_then_reads_on() {
        let mut first = ReplayBody::new(chunks(&["ab", "cd", "ef"]), 64);
        // The first attempt reads one frame and fails.
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        let second = first.next_attempt();
        assert_eq!(read_all(second).await, b"abcdef");
        // The abandoned attempt may not read on.
        assert!(matches!(
            first.frame().await,
            Some(Err(ReplayError::Superseded))
        ));
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_not_replayable() {
        let first = ReplayBody::new(chunks(&["1234", "5678", "9"]), 8);
        assert!(first.is_replayable());
        let retry = first.next_attempt();
        assert_eq!(read_all(retry).await, b"123456789");
        assert!(!first.is_replayable());
        // At the limit exactly, it still is.
        let exact = ReplayBody::new(chunks(&["1234", "5678"]), 8);
        let copy = exact.next_attempt();
        assert_eq!(read_all(copy).await, b"12345678");
        assert!(exact.is_replayable());
        assert_eq!(read_all(exact.next_attempt()).await, b"12345678");
    }

    #[tokio::test]
    async fn an_empty_body_ends_at_once_on_every_attempt() {
        let first = ReplayBody::new(Full::new(Bytes::new()), 8);
        assert!(first.is_end_stream());
        let second = first.next_attempt();
        assert!(second.is_end_stream());
        assert_eq!(read_all(second).await, b"");
    }
}
