//! The copy loop: bytes move through one fixed user-space buffer per direction.
//!
//! Works for any `AsyncRead + AsyncWrite` pair. Each buffer is allocated once per
//! connection; the per-chunk path is a read, writes, and two atomic adds. It does not
//! reset streams on error: that is the caller's decision ([`super::forward_tcp`]
//! resets sockets, generic streams have their own ways).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    ByteCounters, DirError, Directions, ForwardConfig, ForwardError, ForwardStats, MIN_BUFFER_SIZE,
};

/// Forwards between `down` and `up` with the copy loop until both directions ended.
pub(super) async fn forward<D, U>(
    down: &mut D,
    up: &mut U,
    prefix: &[u8],
    cfg: &ForwardConfig,
    counters: &ByteCounters,
) -> Result<ForwardStats, ForwardError>
where
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let size = cfg.buffer_size.max(MIN_BUFFER_SIZE);
    let dirs = CopyDirections {
        down,
        up,
        to_up: CopyDir::new(size, prefix, &counters.to_upstream),
        to_down: CopyDir::new(size, &[], &counters.to_downstream),
    };
    super::drive(cfg.idle_timeout, dirs).await
}

struct CopyDirections<'a, D: ?Sized, U: ?Sized> {
    down: &'a mut D,
    up: &'a mut U,
    to_up: CopyDir<'a>,
    to_down: CopyDir<'a>,
}

impl<D, U> Directions for CopyDirections<'_, D, U>
where
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DirError>> {
        self.to_up
            .poll(cx, Pin::new(&mut *self.down), Pin::new(&mut *self.up))
    }

    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DirError>> {
        self.to_down
            .poll(cx, Pin::new(&mut *self.up), Pin::new(&mut *self.down))
    }

    fn stats(&self) -> ForwardStats {
        ForwardStats {
            to_upstream: self.to_up.total,
            to_downstream: self.to_down.total,
        }
    }
}

/// One direction's state: the buffer and what of it is still to be written.
struct CopyDir<'a> {
    /// Bytes read before forwarding began, written before anything is read.
    prefix: &'a [u8],
    buf: Box<[u8]>,
    /// `buf[pos..cap]` is read but not yet written.
    pos: usize,
    cap: usize,
    read_done: bool,
    /// Bytes were written since the last flush.
    need_flush: bool,
    total: u64,
    counter: &'a Counter,
}

impl<'a> CopyDir<'a> {
    fn new(size: usize, prefix: &'a [u8], counter: &'a Counter) -> Self {
        Self {
            prefix,
            buf: vec![0; size].into_boxed_slice(),
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            total: 0,
            counter,
        }
    }

    fn wrote(&mut self, n: usize) {
        self.total += n as u64;
        self.counter.inc_by(n as u64);
        self.need_flush = true;
    }

    /// Moves bytes from `src` to `dst` until both would block, or until EOF was read,
    /// everything written and `dst` shut down (then `Ready(Ok)`).
    ///
    /// Cancel-safe between calls: all progress lives in `self`.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut src: Pin<&mut R>,
        mut dst: Pin<&mut W>,
    ) -> Poll<Result<(), DirError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        while !self.prefix.is_empty() {
            let n = ready!(dst.as_mut().poll_write(cx, self.prefix)).map_err(DirError::dst)?;
            if n == 0 {
                return Poll::Ready(Err(DirError::dst(io::ErrorKind::WriteZero.into())));
            }
            self.prefix = &self.prefix[n..];
            self.wrote(n);
        }
        loop {
            if self.pos == self.cap && !self.read_done {
                let mut rb = ReadBuf::new(&mut self.buf);
                match src.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.pos = 0;
                            self.cap = n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(DirError::src(e))),
                    Poll::Pending => {
                        // Nothing more to read for now: push out what a buffering
                        // writer (TLS, HTTP/2) still holds before waiting.
                        if self.need_flush {
                            ready!(dst.as_mut().poll_flush(cx)).map_err(DirError::dst)?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(dst.as_mut().poll_write(cx, &self.buf[self.pos..self.cap]))
                    .map_err(DirError::dst)?;
                if n == 0 {
                    return Poll::Ready(Err(DirError::dst(io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.wrote(n);
            }
            if self.read_done {
                // Flushes, then passes the EOF on as a half-close.
                ready!(dst.as_mut().poll_shutdown(cx)).map_err(DirError::dst)?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}
