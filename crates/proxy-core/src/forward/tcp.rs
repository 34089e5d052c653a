//! Forwarding between two plain TCP sockets: small chunks through a buffer shared
//! by every connection of a worker thread, bulk through `splice(2)`.
//!
//! Request/response traffic moves a few hundred bytes per chunk. For it the
//! cheapest path is one `read` and one `write`: a short read proves the socket
//! drained (tokio then clears its readiness, so no `EAGAIN` probe follows), and the
//! bytes are written out before the poll returns, so they need no buffer of the
//! connection's own. Only a write that would block copies the unwritten tail into a
//! per-direction buffer, freed once flushed: an idle connection holds no buffer.
//!
//! A read that fills the whole shared buffer marks a bulk flow: that direction then
//! creates its own pipe and moves on with `splice`, which keeps payload out of user
//! space. Small flows never pay for a pipe (two descriptors, a `splice` pair per
//! chunk plus an `EAGAIN` probe, since a short splice does not prove the socket
//! drained).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[cfg(any(target_os = "linux", target_os = "android"))]
use super::splice::{Pipe, SpliceDir};
use super::{ByteCounters, DirError, Directions, ForwardConfig, ForwardError, ForwardStats};

/// Size of each worker thread's read buffer, and the read size that marks a flow
/// as bulk: 64 KiB is the default pipe capacity, so a direction that switches to
/// `splice` moves chunks of the same size as before.
const SCRATCH_SIZE: usize = 64 * 1024;

thread_local! {
    // Borrowed only inside one synchronous poll step, never across an await.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// Forwards between `down` and `up` until both directions ended.
pub(super) async fn forward(
    down: &mut TcpStream,
    up: &mut TcpStream,
    prefix: &[u8],
    cfg: &ForwardConfig,
    counters: &ByteCounters,
) -> Result<ForwardStats, ForwardError> {
    let dirs = TcpDirections {
        down,
        up,
        to_up: TcpDir::new(prefix, &counters.to_upstream, cfg.splice),
        to_down: TcpDir::new(&[], &counters.to_downstream, cfg.splice),
    };
    super::drive(cfg.idle_timeout, dirs).await
}

struct TcpDirections<'a> {
    down: &'a mut TcpStream,
    up: &'a mut TcpStream,
    to_up: TcpDir<'a>,
    to_down: TcpDir<'a>,
}

impl Directions for TcpDirections<'_> {
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DirError>> {
        self.to_up.poll(cx, self.down, self.up)
    }

    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DirError>> {
        self.to_down.poll(cx, self.up, self.down)
    }

    fn stats(&self) -> ForwardStats {
        ForwardStats {
            to_upstream: self.to_up.total,
            to_downstream: self.to_down.total,
        }
    }
}

struct TcpDir<'a> {
    /// Bytes read before forwarding began, written before anything is read.
    prefix: &'a [u8],
    /// `pending[written..]` was read but not yet accepted by the destination.
    /// Unallocated unless a write would have blocked.
    pending: Vec<u8>,
    written: usize,
    /// Whether this direction may switch to `splice` once it looks bulk.
    may_splice: bool,
    #[cfg(any(target_os = "linux", target_os = "android"))]
    spliced: Option<SpliceDir>,
    read_done: bool,
    total: u64,
    counter: &'a Counter,
}

impl<'a> TcpDir<'a> {
    fn new(prefix: &'a [u8], counter: &'a Counter, may_splice: bool) -> Self {
        Self {
            prefix,
            pending: Vec::new(),
            written: 0,
            may_splice,
            #[cfg(any(target_os = "linux", target_os = "android"))]
            spliced: None,
            read_done: false,
            total: 0,
            counter,
        }
    }

    fn wrote(total: &mut u64, counter: &Counter, n: usize) {
        *total += n as u64;
        counter.inc_by(n as u64);
    }

    /// Moves bytes from `src` to `dst` until both would block, or until EOF was read,
    /// everything written and `dst` shut down for writing (then `Ready(Ok)`).
    ///
    /// Cancel-safe between calls: all progress lives in `self`.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
    ) -> Poll<Result<(), DirError>> {
        while !self.prefix.is_empty() {
            let n =
                ready!(Pin::new(&mut *dst).poll_write(cx, self.prefix)).map_err(DirError::dst)?;
            if n == 0 {
                return Poll::Ready(Err(DirError::dst(io::ErrorKind::WriteZero.into())));
            }
            self.prefix = &self.prefix[n..];
            Self::wrote(&mut self.total, self.counter, n);
        }
        loop {
            while self.written < self.pending.len() {
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.pending[self.written..]))
                    .map_err(DirError::dst)?;
                if n == 0 {
                    return Poll::Ready(Err(DirError::dst(io::ErrorKind::WriteZero.into())));
                }
                self.written += n;
                Self::wrote(&mut self.total, self.counter, n);
            }
            if self.pending.capacity() > 0 {
                // Flushed: an idle connection keeps no buffer.
                self.pending = Vec::new();
                self.written = 0;
            }
            #[cfg(any(target_os = "linux", target_os = "android"))]
            if let Some(spliced) = &mut self.spliced {
                let (total, counter) = (&mut self.total, self.counter);
                ready!(spliced.poll(cx, src, dst, &mut |n| Self::wrote(total, counter, n)))?;
                self.read_done = true;
            }
            if self.read_done {
                // Passes the EOF on as a half-close.
                return Poll::Ready(
                    socket2::SockRef::from(&*dst)
                        .shutdown(std::net::Shutdown::Write)
                        .map_err(DirError::dst),
                );
            }
            ready!(SCRATCH.with_borrow_mut(|scratch| self.copy_chunk(cx, src, dst, scratch)))?;
        }
    }

    /// Reads one chunk into the thread's buffer and writes it straight on; what the
    /// destination does not take now is kept in `pending`.
    fn copy_chunk(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        scratch: &mut [u8],
    ) -> Poll<Result<(), DirError>> {
        let mut rb = ReadBuf::new(scratch);
        ready!(Pin::new(&mut *src).poll_read(cx, &mut rb)).map_err(DirError::src)?;
        let n = rb.filled().len();
        if n == 0 {
            self.read_done = true;
            return Poll::Ready(Ok(()));
        }
        let mut written = 0;
        while written < n {
            match Pin::new(&mut *dst).poll_write(cx, &scratch[written..n]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(DirError::dst(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(w)) => {
                    written += w;
                    Self::wrote(&mut self.total, self.counter, w);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(DirError::dst(e))),
                Poll::Pending => {
                    self.pending.extend_from_slice(&scratch[written..n]);
                    break;
                }
            }
        }
        if n == scratch.len() && self.may_splice {
            self.start_splicing();
        }
        Poll::Ready(Ok(()))
    }

    fn start_splicing(&mut self) {
        self.may_splice = false;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        match Pipe::new() {
            Ok(pipe) => self.spliced = Some(SpliceDir::new(pipe)),
            Err(e) => {
                tracing::debug!(error = %e, "cannot create a splice pipe, copying this flow instead");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A bulk upload switches its direction to `splice`; the small reply keeps
    /// copying; both arrive intact, with the prefix first and the half-close passed on.
    async fn bulk_one_way_small_reply(may_splice: bool) -> (bool, bool) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, mut down) = pair(&listener).await;
        let (mut up, mut server) = pair(&listener).await;
        let counters = ByteCounters::default();
        let shared = counters.clone();
        let task = tokio::spawn(async move {
            let mut dirs = TcpDirections {
                down: &mut down,
                up: &mut up,
                to_up: TcpDir::new(b"prefix:", &shared.to_upstream, may_splice),
                to_down: TcpDir::new(&[], &shared.to_downstream, may_splice),
            };
            let mut done = (false, false);
            std::future::poll_fn(|cx| {
                if !done.0
                    && let Poll::Ready(r) = dirs.poll_up(cx)
                {
                    r.unwrap();
                    done.0 = true;
                }
                if !done.1
                    && let Poll::Ready(r) = dirs.poll_down(cx)
                {
                    r.unwrap();
                    done.1 = true;
                }
                if done == (true, true) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
            #[cfg(any(target_os = "linux", target_os = "android"))]
            return (dirs.to_up.spliced.is_some(), dirs.to_down.spliced.is_some());
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            return (false, false);
        });
        let payload: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let timeout = std::time::Duration::from_secs(30);
        let writer = tokio::spawn(async move {
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::new();
        tokio::time::timeout(timeout, server.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..7], b"prefix:");
        assert!(got[7..] == expected[..], "payload corrupted on the way");
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        let reply = tokio::time::timeout(timeout, writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, b"done");
        let spliced = tokio::time::timeout(timeout, task).await.unwrap().unwrap();
        let sent = 7 + expected.len() as u64;
        assert_eq!(counters.to_upstream.get(), sent);
        assert_eq!(counters.to_downstream.get(), 4);
        spliced
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bulk_direction_switches_to_splice_and_a_small_one_does_not() {
        let (up, down) = bulk_one_way_small_reply(true).await;
        assert_eq!(
            (up, down),
            (cfg!(any(target_os = "linux", target_os = "android")), false)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_splice_everything_is_copied() {
        assert_eq!(bulk_one_way_small_reply(false).await, (false, false));
    }
}
