//! One CONNECT stream as a byte stream, and the pieces both tunnel ends share: the
//! PING keepalive and the zero-copy relay of a stream onto another stream.
//!
//! The tunnel speaks HTTP/2 through the `h2` crate directly rather than through
//! hyper's CONNECT upgrade, which hands out the stream's bytes only after the `200`:
//! here a client sends its first bytes right behind its `CONNECT`, and a relaying
//! gateway passes them on before the far end has answered, so a new connection
//! crosses the link in one round trip.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::outcome::{self, Outcome, Side};

/// The bytes of one open stream, both ways.
///
/// Received data is handed back to the peer's flow-control window as soon as it is
/// taken off the stream, so the window bounds what is buffered here: one DATA frame.
pub(crate) struct H2Io {
    send: SendStream<Bytes>,
    /// Absent until the answer to a client's CONNECT arrived with its body.
    recv: Option<RecvStream>,
    unread: Bytes,
    read_eof: bool,
    write_shut: bool,
}

impl H2Io {
    pub(crate) fn new(send: SendStream<Bytes>, recv: Option<RecvStream>) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            read_eof: false,
            write_shut: false,
        }
    }

    /// Gives the stream its receiving half, once the answer brought it.
    pub(crate) fn set_recv(&mut self, recv: RecvStream) {
        self.recv = Some(recv);
    }

    /// The sending half, for a relay that takes the stream over frame by frame.
    pub(crate) fn into_send(self) -> SendStream<Bytes> {
        self.send
    }

    /// Whether the peer ended its side (a clean end of stream was read).
    pub(crate) fn read_eof(&self) -> bool {
        self.read_eof
    }

    /// Whether this side was ended cleanly (`poll_shutdown` succeeded).
    pub(crate) fn write_shut(&self) -> bool {
        self.write_shut
    }

    /// Reads and discards until the peer ends its side, for a stream that is done
    /// from this side but whose peer has not finished: dropping it earlier would
    /// reset it.
    pub(crate) async fn drain(&mut self) {
        let Some(recv) = &mut self.recv else {
            return;
        };
        while let Some(Ok(data)) = recv.data().await {
            let _ = recv.flow_control().release_capacity(data.len());
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // A zero-length DATA frame must not read as an end of stream.
        while self.unread.is_empty() && !self.read_eof {
            let Some(recv) = &mut self.recv else {
                return Poll::Ready(Err(io::Error::other(
                    "tunnel stream read before its answer",
                )));
            };
            match ready!(recv.poll_data(cx)) {
                None => self.read_eof = true,
                Some(Ok(data)) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    self.unread = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        let mut polled = ready!(self.send.poll_capacity(cx));
        // Nothing granted yet: a zero-byte write would read as a closed writer.
        while let Some(Ok(0)) = polled {
            polled = ready!(self.send.poll_capacity(cx));
        }
        match polled {
            Some(Ok(granted)) => {
                let n = granted.min(buf.len());
                match self
                    .send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(e) => self.poll_reset_error(cx, e),
                }
            }
            Some(Err(e)) => self.poll_reset_error(cx, e),
            None => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sent data is queued on the connection, whose task writes it out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_shut {
            self.send
                .send_data(Bytes::new(), true)
                .map_err(h2_io_error)?;
            self.write_shut = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl H2Io {
    /// A failed send usually means the peer reset the stream: report its reason.
    fn poll_reset_error(&mut self, cx: &mut Context<'_>, e: h2::Error) -> Poll<io::Result<usize>> {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => Poll::Ready(Err(h2_io_error(h2::Error::from(reason)))),
            _ => Poll::Ready(Err(h2_io_error(e))),
        }
    }
}

/// An h2 error as an I/O error the forwarder can classify by its kind: an I/O
/// failure of the connection stays one, a reset or GOAWAY is `ConnectionReset`, and
/// the h2 error is wrapped whole so its reason stays readable in logs.
pub(crate) fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else if e.reason().is_some() {
        // A stream ended by RST_STREAM or GOAWAY: the stream's equivalent of a TCP
        // reset, and classified as one by its kind alone.
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    } else {
        io::Error::other(e)
    }
}

/// Sends HTTP/2 PINGs on one connection for whoever asks: its keepalive, and a
/// liveness probe that wants a round trip on demand. Clones share the connection's
/// one PING slot (h2 allows one user PING in flight), taken in turn.
#[derive(Clone)]
pub(crate) struct Pinger(std::sync::Arc<tokio::sync::Mutex<PingSlot>>);

struct PingSlot {
    ping_pong: PingPong,
    /// A PING was sent and its waiter gave up (timed out, dropped) before the PONG:
    /// h2 refuses a new PING until that PONG is taken.
    outstanding: bool,
}

/// Why a PING round trip did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PingFailed {
    /// No PONG within the time given (waiting for the slot included).
    Timeout,
    /// The connection is gone.
    Closed,
}

impl Pinger {
    pub(crate) fn new(ping_pong: PingPong) -> Self {
        Self(std::sync::Arc::new(tokio::sync::Mutex::new(PingSlot {
            ping_pong,
            outstanding: false,
        })))
    }

    /// One PING and its PONG within `timeout`; returns the round-trip time.
    /// Cancel-safe: a PING whose waiter is dropped is remembered, and its PONG is
    /// taken before the next PING is sent.
    pub(crate) async fn ping(&self, timeout: Duration) -> Result<Duration, PingFailed> {
        let round_trip = async {
            let mut slot = self.0.lock().await;
            if slot.outstanding {
                poll_fn(|cx| slot.ping_pong.poll_pong(cx))
                    .await
                    .map_err(|_| PingFailed::Closed)?;
                slot.outstanding = false;
            }
            let start = tokio::time::Instant::now();
            slot.ping_pong
                .send_ping(Ping::opaque())
                .map_err(|_| PingFailed::Closed)?;
            slot.outstanding = true;
            poll_fn(|cx| slot.ping_pong.poll_pong(cx))
                .await
                .map_err(|_| PingFailed::Closed)?;
            slot.outstanding = false;
            Ok(start.elapsed())
        };
        tokio::time::timeout(timeout, round_trip)
            .await
            .unwrap_or(Err(PingFailed::Timeout))
    }
}

/// Sends a PING every `interval` and returns once one is not answered within
/// `timeout`; pends forever once the connection is gone (the connection's own
/// future reports that).
pub(crate) async fn keepalive(pinger: Pinger, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match pinger.ping(timeout).await {
            Ok(_round_trip) => {}
            Err(PingFailed::Closed) => std::future::pending::<()>().await,
            Err(PingFailed::Timeout) => return,
        }
    }
}

/// Why a tunnel connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("HTTP/2 connection failed")]
    H2(#[source] h2::Error),
    #[error("no answer to a keepalive PING within {0:?}")]
    KeepaliveTimeout(Duration),
    #[error("no HTTP/2 connection preface within {0:?}")]
    PrefaceTimeout(Duration),
}

/// Drives a connection and its keepalive: ends with the connection, or with an
/// error once a PING goes unanswered.
pub(crate) async fn drive_with_keepalive<C>(
    connection: C,
    ping_pong: Option<PingPong>,
    interval: Duration,
    timeout: Duration,
) -> Result<(), ConnectionError>
where
    C: std::future::Future<Output = Result<(), h2::Error>>,
{
    drive_with_pinger(connection, ping_pong.map(Pinger::new), interval, timeout).await
}

/// [`drive_with_keepalive`] with a [`Pinger`] the caller shares (for probes).
pub(crate) async fn drive_with_pinger<C>(
    connection: C,
    pinger: Option<Pinger>,
    interval: Duration,
    timeout: Duration,
) -> Result<(), ConnectionError>
where
    C: std::future::Future<Output = Result<(), h2::Error>>,
{
    let keepalive = async {
        match pinger {
            Some(pinger) => keepalive(pinger, interval, timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = connection => result.map_err(ConnectionError::H2),
        () = keepalive => Err(ConnectionError::KeepaliveTimeout(timeout)),
    }
}

/// Why a relayed stream ended abnormally.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    #[error("reading the stream failed")]
    Read(#[source] h2::Error),
    #[error("writing the stream failed")]
    Write(#[source] h2::Error),
    #[error("no data moved either way for {0:?} (idle timeout)")]
    Idle(Duration),
}

impl RelayError {
    /// How the relayed stream ended, given the side its failed pump reads from: a
    /// read fails on that side, a write on the other. Either is a reset of a stream.
    pub(crate) fn outcome(&self, read_side: Side) -> Outcome {
        let side = match (self, read_side) {
            (RelayError::Idle(_), _) => {
                return Outcome::new(Side::Local, outcome::Reason::IdleTimeout);
            }
            (RelayError::Read(_), Side::Downstream) | (RelayError::Write(_), Side::Upstream) => {
                Side::Downstream
            }
            _ => Side::Upstream,
        };
        Outcome::new(side, outcome::Reason::Reset)
    }
}

/// Moves one direction of a relayed stream, frame by frame, without copying:
/// received chunks are sent on as they are, and their window is released only once
/// the next hop took them, so back-pressure crosses the relay.
///
/// Cancel-safe: a chunk waiting for send capacity is kept in `self`, so a `run`
/// dropped at an await point (the relay stops pumping while it sends its answer)
/// loses nothing.
pub(crate) struct Pump {
    recv: RecvStream,
    send: SendStream<Bytes>,
    carry: Bytes,
    /// Length of the frame `carry` came from, released once it is all sent.
    carry_frame: usize,
    done: bool,
}

impl Pump {
    pub(crate) fn new(recv: RecvStream, send: SendStream<Bytes>) -> Self {
        Self {
            recv,
            send,
            carry: Bytes::new(),
            carry_frame: 0,
            done: false,
        }
    }

    /// Whether the end of stream was passed on.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Runs until the end of stream was passed on, or either side failed (then the
    /// other side is reset with the same reason when it had one).
    pub(crate) async fn run(
        &mut self,
        counter: &Counter,
        activity: &AtomicU64,
    ) -> Result<(), RelayError> {
        while !self.done {
            if self.carry.is_empty() {
                match self.recv.data().await {
                    None => {
                        self.send
                            .send_data(Bytes::new(), true)
                            .map_err(RelayError::Write)?;
                        self.done = true;
                        return Ok(());
                    }
                    Some(Ok(data)) => {
                        self.carry_frame = data.len();
                        self.carry = data;
                    }
                    Some(Err(e)) => {
                        self.send.send_reset(e.reason().unwrap_or(Reason::CANCEL));
                        return Err(RelayError::Read(e));
                    }
                }
            }
            while !self.carry.is_empty() {
                self.send.reserve_capacity(self.carry.len());
                let granted = match poll_fn(|cx| self.send.poll_capacity(cx)).await {
                    Some(Ok(0)) => continue,
                    Some(Ok(granted)) => granted,
                    Some(Err(e)) => return Err(RelayError::Write(e)),
                    None => return Err(RelayError::Write(h2::Error::from(Reason::STREAM_CLOSED))),
                };
                let chunk = self.carry.split_to(granted.min(self.carry.len()));
                let len = chunk.len() as u64;
                self.send
                    .send_data(chunk, false)
                    .map_err(RelayError::Write)?;
                counter.inc_by(len);
                activity.fetch_add(1, Ordering::Relaxed);
            }
            let _ = self.recv.flow_control().release_capacity(self.carry_frame);
            self.carry_frame = 0;
        }
        Ok(())
    }
}

/// Returns once no chunk moved for a whole `timeout` (never for a zero timeout).
///
/// Chunks only bump a counter, checked once per `timeout`: the timeout fires
/// between one and two timeouts after the last chunk, which is precise enough for
/// reclaiming abandoned streams and costs the data path one relaxed atomic add.
pub(crate) async fn idle(activity: &AtomicU64, timeout: Duration) {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    loop {
        let before = activity.load(Ordering::Relaxed);
        tokio::time::sleep(timeout).await;
        if activity.load(Ordering::Relaxed) == before {
            return;
        }
    }
}
