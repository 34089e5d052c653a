//! What delivery learns of an endpoint from the bytes it sends back, for the
//! balancer: the latency of its answer, and whether it answered, failed or said it
//! is overloaded.
//!
//! The stream to the endpoint is wrapped, and its first chunk of answer is looked
//! at as it passes (nothing is copied or held back):
//! - a stream carrying one HTTP/1.1 request is sampled from the moment the
//!   endpoint was dialled to its first answer byte, and that chunk's status line
//!   is read: `429`, and `503` with `Retry-After`, are failures (the forwarder
//!   reads at least 512 bytes at a time, so the chunk holds the head of all but
//!   a few answers; a `503` whose `Retry-After` comes later counts as a plain
//!   one);
//! - any other stream (a whole connection's bytes, or one request over an inner
//!   HTTP/2 connection, whose statuses sit in HPACK-coded frames) was sampled by
//!   its connect latency, and its first answer byte is a success;
//! - a reset or error before any answer byte is a failure; so is an end of stream
//!   without an answer for one HTTP/1.1 request, which always gets one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::balance::InFlight;
use crate::tunnel::BoxIo;
use crate::tunnel::server::OneRequest;

/// Headers of an answer's first chunk looked at for `Retry-After`; an answer with
/// more before it counts as a plain `503`.
const HEADERS_READ: usize = 32;

/// A stream to an endpoint, reporting to the balancer (see the module docs).
pub(super) struct Observed {
    io: BoxIo,
    in_flight: InFlight,
    /// When the endpoint was dialled.
    opened: Instant,
    one_request: Option<OneRequest>,
    answered: bool,
}

impl Observed {
    pub(super) fn new(
        io: BoxIo,
        in_flight: InFlight,
        opened: Instant,
        one_request: Option<OneRequest>,
    ) -> Self {
        if one_request != Some(OneRequest::Http1) {
            in_flight.sample(opened.elapsed());
        }
        Self {
            io,
            in_flight,
            opened,
            one_request,
            answered: false,
        }
    }

    fn first_answer(&mut self, chunk: &[u8]) {
        if self.one_request != Some(OneRequest::Http1) {
            self.in_flight.succeeded();
            return;
        }
        if overloaded(chunk) {
            self.in_flight.failed();
        } else {
            self.in_flight.sample(self.opened.elapsed());
            self.in_flight.succeeded();
        }
    }
}

/// Whether an HTTP/1.1 answer's first chunk says the endpoint is overloaded.
fn overloaded(chunk: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_READ];
    let mut response = httparse::Response::new(&mut headers);
    // A partial head still has its status line, and the headers read so far.
    let _ = response.parse(chunk);
    match response.code {
        Some(429) => true,
        Some(503) => response
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("retry-after")),
        _ => false,
    }
}

impl AsyncRead for Observed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = ready!(Pin::new(&mut self.io).poll_read(cx, buf));
        if !self.answered {
            let this = &mut *self;
            match &read {
                Ok(()) if buf.filled().len() > before => {
                    this.answered = true;
                    this.first_answer(&buf.filled()[before..]);
                }
                Ok(()) => {
                    this.answered = true;
                    if this.one_request == Some(OneRequest::Http1) {
                        this.in_flight.failed();
                    }
                }
                Err(_) => {
                    this.answered = true;
                    this.in_flight.failed();
                }
            }
        }
        Poll::Ready(read)
    }
}

// Writes pass straight through; only the answer is looked at.
impl AsyncWrite for Observed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::overloaded;

    #[test]
    fn overload_is_429_or_503_with_retry_after() {
        assert!(overloaded(b"HTTP/1.1 429 Too Many Requests\r\n\r\n"));
        assert!(overloaded(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nretry-after: 2\r\n\r\n"
        ));
        // A head cut short by the chunk still tells its status.
        assert!(overloaded(b"HTTP/1.1 429 Too"));
        assert!(!overloaded(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!overloaded(b"HTTP/1.1 200 OK\r\nRetry-After: 2\r\n\r\n"));
        assert!(!overloaded(b"HTTP/1.1 500 Internal Server Error\r\n\r\n"));
        assert!(!overloaded(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00"));
    }
}
