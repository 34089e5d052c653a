//! Zero-copy forwarding between two plain TCP sockets with `splice(2)` (Linux).
//!
//! Each direction owns a non-blocking kernel pipe: `splice` moves socket pages into
//! the pipe and from the pipe into the other socket, so payload bytes never enter
//! user space. Readiness comes from tokio's reactor (`poll_*_ready` + `try_io`, so an
//! `EAGAIN` clears the readiness it belongs to). It owns only the mechanics of moving
//! bytes; blame, idle timeout and resets are [`super`]'s.
//!
//! A direction fills its pipe only when the pipe is empty, then drains it completely.
//! That makes every `EAGAIN` unambiguous: from the socket-to-pipe splice it can only
//! mean "socket has no data" (an empty pipe has all its slots free), from the
//! pipe-to-socket splice only "socket send buffer full" (the pipe holds data). A
//! pipe-full `EAGAIN` mistaken for socket-empty would clear the socket's read
//! readiness while data waits, and hang the connection.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::task::{Context, Poll, ready};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{ByteCounters, DirError, Directions, ForwardConfig, ForwardError, ForwardStats};

/// Pipe capacity assumed when the kernel cannot tell (`F_GETPIPE_SZ` failing): the
/// Linux default of 16 pages.
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

// The pipe keeps the kernel's default capacity (64 KiB, four times the copy loop's
// buffer) rather than growing it with F_SETPIPE_SZ: pipe pages count against the
// per-user `fs.pipe-user-pages-soft` limit (64 MiB by default), past which the kernel
// hands out 2-page pipes to every new connection. Two default pipes per connection
// reach it at 512 connections for an unprivileged proxy; 256 KiB pipes would reach it
// at 128. On loopback, 256 KiB and 1 MiB pipes moved about 15-20% more bytes per
// second in the forward bench (close to its noise on a shared machine): not worth
// starving later connections of pipe capacity. Pooling pipes so that only
// connections with bytes in flight hold one would lift both limits.

/// The two pipes of one connection, one per direction.
pub(super) struct Pipes {
    to_up: Pipe,
    to_down: Pipe,
}

impl Pipes {
    /// Creates both pipes; fails with the OS error (`EMFILE`, `ENFILE`, ...) so the
    /// caller can fall back to the copy loop.
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self {
            to_up: Pipe::new()?,
            to_down: Pipe::new()?,
        })
    }
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes one socket-to-pipe splice may move into the empty pipe.
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = fcntl(&read, FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_PIPE_SIZE);
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

/// Forwards between two sockets with `splice` until both directions ended.
pub(super) async fn forward(
    down: &TcpStream,
    up: &TcpStream,
    pipes: Pipes,
    prefix: &[u8],
    cfg: &ForwardConfig,
    counters: &ByteCounters,
) -> Result<ForwardStats, ForwardError> {
    let dirs = SpliceDirections {
        down,
        up,
        to_up: SpliceDir::new(pipes.to_up, prefix, &counters.to_upstream),
        to_down: SpliceDir::new(pipes.to_down, &[], &counters.to_downstream),
    };
    super::drive(cfg.idle_timeout, dirs).await
}

struct SpliceDirections<'a> {
    down: &'a TcpStream,
    up: &'a TcpStream,
    to_up: SpliceDir<'a>,
    to_down: SpliceDir<'a>,
}

impl Directions for SpliceDirections<'_> {
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

struct SpliceDir<'a> {
    /// Bytes read before forwarding began, written before anything is spliced.
    prefix: &'a [u8],
    pipe: Pipe,
    /// Bytes in the pipe, spliced in but not yet out.
    in_pipe: usize,
    read_done: bool,
    total: u64,
    counter: &'a Counter,
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

impl<'a> SpliceDir<'a> {
    fn new(pipe: Pipe, prefix: &'a [u8], counter: &'a Counter) -> Self {
        Self {
            prefix,
            pipe,
            in_pipe: 0,
            read_done: false,
            total: 0,
            counter,
        }
    }

    fn wrote(&mut self, n: usize) {
        self.total += n as u64;
        self.counter.inc_by(n as u64);
    }

    /// Moves bytes from `src` to `dst` until both would block, or until EOF was read,
    /// the pipe drained and `dst` shut down for writing (then `Ready(Ok)`).
    ///
    /// Every step starts with `poll_*_ready`, which also spends tokio's cooperative
    /// budget, so a connection that is always ready still yields to its neighbours.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
    ) -> Poll<Result<(), DirError>> {
        while !self.prefix.is_empty() {
            ready!(dst.poll_write_ready(cx)).map_err(DirError::dst)?;
            match dst.try_write(self.prefix) {
                Ok(0) => return Poll::Ready(Err(DirError::dst(io::ErrorKind::WriteZero.into()))),
                Ok(n) => {
                    self.prefix = &self.prefix[n..];
                    self.wrote(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(DirError::dst(e))),
            }
        }
        loop {
            if self.in_pipe == 0 {
                if self.read_done {
                    // The pipe is drained: pass the EOF on as a half-close.
                    return Poll::Ready(
                        socket2::SockRef::from(dst)
                            .shutdown(std::net::Shutdown::Write)
                            .map_err(DirError::dst),
                    );
                }
                ready!(src.poll_read_ready(cx)).map_err(DirError::src)?;
                let spliced = src.try_io(Interest::READABLE, || {
                    splice(
                        src.as_fd(),
                        None,
                        self.pipe.write.as_fd(),
                        None,
                        self.pipe.capacity,
                        FLAGS,
                    )
                    .map_err(io::Error::from)
                });
                match spliced {
                    Ok(0) => self.read_done = true,
                    Ok(n) => self.in_pipe = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(blame(e, DirError::src))),
                }
            }
            while self.in_pipe > 0 {
                ready!(dst.poll_write_ready(cx)).map_err(DirError::dst)?;
                let spliced = dst.try_io(Interest::WRITABLE, || {
                    splice(
                        self.pipe.read.as_fd(),
                        None,
                        dst.as_fd(),
                        None,
                        self.in_pipe,
                        FLAGS,
                    )
                    .map_err(io::Error::from)
                });
                match spliced {
                    // The pipe holds data, so a zero-byte move means the socket
                    // accepts nothing more: treat it like a failed write.
                    Ok(0) => {
                        return Poll::Ready(Err(DirError::dst(io::ErrorKind::WriteZero.into())));
                    }
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.wrote(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(blame(e, DirError::dst))),
                }
            }
        }
    }
}

/// Attributes a failed splice: errors about the pipe or the call itself are the
/// proxy's own; everything else comes from the socket.
fn blame(e: io::Error, socket: fn(io::Error) -> DirError) -> DirError {
    let local = matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ENOMEM | Errno::EINVAL | Errno::EBADF | Errno::ESPIPE)
    );
    if local { DirError::local(e) } else { socket(e) }
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

    /// Drives the splice path itself, not `forward_tcp`, which could silently fall
    /// back to the copy loop and hide a broken splice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splices_both_ways_with_prefix_and_half_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, down) = pair(&listener).await;
        let (up, mut server) = pair(&listener).await;
        let pipes = Pipes::new().unwrap();
        assert!(pipes.to_up.capacity >= 4096);
        let counters = ByteCounters::default();
        let shared = counters.clone();
        let task = tokio::spawn(async move {
            let cfg = ForwardConfig::default();
            forward(&down, &up, pipes, b"prefix:", &cfg, &shared).await
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
        assert!(got[7..] == expected[..], "payload corrupted through splice");
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        let reply = tokio::time::timeout(timeout, writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, b"done");
        let stats = tokio::time::timeout(timeout, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let sent = 7 + expected.len() as u64;
        assert_eq!((stats.to_upstream, stats.to_downstream), (sent, 4));
        assert_eq!(counters.to_upstream.get(), sent);
    }
}
