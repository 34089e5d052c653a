//! The clocks of an HTTP connection: when bytes last moved (the idle timeout) and
//! when the current request head began (the header read timeout), and the I/O and
//! body wrappers that keep them.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
/// When bytes last moved through a connection, for its idle timeout.
#[derive(Debug)]
pub(crate) struct IdleClock {
    origin: Instant,
    /// Milliseconds after `origin`.
    last: AtomicU64,
}

impl IdleClock {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte moved for `timeout`; never when `timeout` is zero.
    pub(crate) async fn idle(&self, timeout: Duration) {
        if timeout.is_zero() {
            return std::future::pending().await;
        }
        loop {
            let last = self.origin + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The header read timeout of one HTTP/1 connection: started by the first byte
/// read while no request is in flight, stopped when hyper hands over the parsed
/// head, and re-armed once that request's body and response are both done.
///
/// hyper's own `header_read_timeout` cannot do this: it runs whenever hyper waits
/// for a head, idle keep-alive time included.
#[derive(Debug)]
pub(crate) struct HeadClock {
    origin: Instant,
    /// [`WAITING`], [`BUSY`], or one plus the milliseconds after `origin` at which
    /// the current head's first byte arrived.
    state: AtomicU64,
    started: tokio::sync::Notify,
}

/// No request in flight and no byte of the next head seen.
const WAITING: u64 = 0;
/// A request is in flight: bytes read are its body, not a head.
const BUSY: u64 = u64::MAX;

impl HeadClock {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            state: AtomicU64::new(WAITING),
            started: tokio::sync::Notify::new(),
        }
    }

    /// Bytes were read from the client.
    fn on_read(&self) {
        if self.state.load(Ordering::Relaxed) != WAITING {
            return;
        }
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(BUSY - 2);
        if self
            .state
            .compare_exchange(WAITING, ms + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.started.notify_one();
        }
    }

    /// Resolves once a head has been coming in for `timeout` without completing.
    pub(crate) async fn expired(&self, timeout: Duration) {
        loop {
            let started = self.started.notified();
            tokio::pin!(started);
            // Registered before the state is read, so a start in between still wakes us.
            started.as_mut().enable();
            let state = self.state.load(Ordering::Acquire);
            if state == WAITING || state == BUSY {
                started.await;
                continue;
            }
            let deadline = self.origin + Duration::from_millis(state - 1) + timeout;
            tokio::time::sleep_until(deadline).await;
            if self.state.load(Ordering::Acquire) == state {
                return;
            }
        }
    }
}

/// One request from its parsed head until both its body and its response are done
/// (the last clone dropped), when the [`HeadClock`] waits for the next head again.
#[derive(Debug)]
pub(crate) struct RequestInFlight(Option<Arc<HeadClock>>);

impl RequestInFlight {
    pub(crate) fn start(clock: Option<Arc<HeadClock>>) -> Arc<Self> {
        if let Some(clock) = &clock {
            clock.state.store(BUSY, Ordering::Release);
        }
        Arc::new(Self(clock))
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        if let Some(clock) = &self.0 {
            let _ =
                clock
                    .state
                    .compare_exchange(BUSY, WAITING, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

/// A body that keeps its request "in flight" until hyper drops it, which it does
/// once the body is fully sent (or abandoned).
#[derive(Debug)]
pub(crate) struct InFlight<B> {
    inner: B,
    _request: Arc<RequestInFlight>,
}

impl<B> InFlight<B> {
    pub(crate) fn new(inner: B, request: Arc<RequestInFlight>) -> Self {
        Self {
            inner,
            _request: request,
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for InFlight<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// An [`Io`] that marks its [`IdleClock`] whenever bytes move through it, and its
/// [`HeadClock`] (if any) whenever bytes arrive.
pub(crate) struct Tracked<T> {
    inner: T,
    clock: Arc<IdleClock>,
    head: Option<Arc<HeadClock>>,
}

impl<T> Tracked<T> {
    pub(crate) fn new(inner: T, clock: Arc<IdleClock>, head: Option<Arc<HeadClock>>) -> Self {
        Self { inner, clock, head }
    }

    /// Tracks only request heads, for a connection with no idle timeout of its own.
    pub(crate) fn head_only(inner: T, head: Option<Arc<HeadClock>>) -> Self {
        Self {
            inner,
            clock: Arc::new(IdleClock::new()),
            head,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.touch();
            if let Some(head) = &this.head {
                head.on_read();
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_fires_only_after_a_quiet_timeout() {
        let clock = Arc::new(IdleClock::new());
        let (a, mut b) = tokio::io::duplex(64);
        let mut tracked = Tracked {
            inner: a,
            clock: clock.clone(),
            head: None,
        };
        let timeout = Duration::from_secs(2);
        let start = Instant::now();
        let idle = clock.idle(timeout);
        tokio::pin!(idle);
        // Bytes each way at 1.5s and 3s keep it alive; quiet from 3s, it fires at 5s.
        tokio::select! {
            () = &mut idle => panic!("idle fired while bytes were moving"),
            () = async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                b.write_all(b"in").await.unwrap();
                let mut buf = [0u8; 2];
                tracked.read_exact(&mut buf).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                tracked.write_all(b"out").await.unwrap();
            } => {}
        }
        idle.await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_timeout_never_fires() {
        let clock = IdleClock::new();
        let waited = tokio::time::timeout(Duration::from_secs(3600), clock.idle(Duration::ZERO));
        assert!(waited.await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_timer_starts_at_a_heads_first_byte_not_while_idle() {
        let head = Arc::new(HeadClock::new());
        let timeout = Duration::from_secs(2);
        let expired = head.expired(timeout);
        tokio::pin!(expired);
        // A connection idle for an hour between requests is not the head timer's.
        let idle = tokio::time::timeout(Duration::from_secs(3600), expired.as_mut());
        assert!(idle.await.is_err());
        // The first byte starts it; the head completing (a request in flight)
        // stops it, however long the request takes.
        let start = Instant::now();
        head.on_read();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let request = RequestInFlight::start(Some(head.clone()));
        head.on_read();
        let busy = tokio::time::timeout(Duration::from_secs(3600), expired.as_mut());
        assert!(busy.await.is_err());
        // Done: the next head's first byte starts it again, and a head that does not
        // complete is cut `timeout` after that byte.
        drop(request);
        let next = Instant::now();
        head.on_read();
        expired.await;
        assert_eq!(next.elapsed(), timeout);
        assert!(start.elapsed() > timeout);
    }
}
