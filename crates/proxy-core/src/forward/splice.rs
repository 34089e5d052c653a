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
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::DirError;

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

/// A kernel pipe for one direction.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes one socket-to-pipe splice may move into the empty pipe.
    capacity: usize,
}

impl Pipe {
    /// Creates the pipe; fails with the OS error (`EMFILE`, `ENFILE`, ...) so the
    /// caller can keep copying instead.
    pub(super) fn new() -> io::Result<Self> {
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

/// One direction moved by `splice` through its own pipe.
pub(super) struct SpliceDir {
    pipe: Pipe,
    /// Bytes in the pipe, spliced in but not yet out.
    in_pipe: usize,
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

impl SpliceDir {
    pub(super) fn new(pipe: Pipe) -> Self {
        Self { pipe, in_pipe: 0 }
    }

    /// Moves bytes from `src` to `dst` until both would block (`Pending`), or until
    /// `src` reached EOF and the pipe is drained (`Ready(Ok)`; passing the EOF on is
    /// the caller's). `wrote` is told of every chunk written to `dst`.
    ///
    /// Every step starts with `poll_*_ready`, which also spends tokio's cooperative
    /// budget, so a connection that is always ready still yields to its neighbours.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        wrote: &mut dyn FnMut(usize),
    ) -> Poll<Result<(), DirError>> {
        loop {
            if self.in_pipe == 0 {
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
                    Ok(0) => return Poll::Ready(Ok(())),
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
                        wrote(n);
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
