//! Protocol detection on the first bytes a client sends: HTTP/1.x, HTTP/2 with prior
//! knowledge, or opaque TCP.
//!
//! [`classify`] is a pure function over a prefix (fuzzable, benchmarkable); [`detect`]
//! reads from a connection until `classify` decides, the client goes quiet for
//! [`DetectConfig::timeout`] (server-speaks-first protocols such as SMTP or MySQL),
//! the client ends its stream, or [`DetectConfig::max_prefix`] bytes arrived.
//! [`Prefixed`] hands the bytes it read back to whoever serves the connection next.
//!
//! It deliberately does not parse HTTP beyond the request line (hyper does that), nor
//! look inside TLS (a ClientHello is opaque here), nor know which ports skip detection:
//! the caller does not call [`detect`] for ports configured as opaque.
//!
//! Misclassification is always safe in one direction: anything not recognised is
//! forwarded as opaque TCP, which works for every protocol, HTTP included.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The HTTP/2 connection preface a prior-knowledge client sends first (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest HTTP/1 request line recognised, line ending included: nginx's default
/// `large_client_header_buffers` line size, beyond which common servers answer 414
/// anyway. Longer lines are classified opaque (and still forwarded).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Longest method recognised. The longest registered method, `UPDATEREDIRECTREF`, has
/// 17 bytes; a longer run of token bytes is far likelier a binary or text protocol
/// that merely starts with letters.
const MAX_METHOD: usize = 32;

/// Default [`DetectConfig::timeout`]: one second. A client-speaks-first protocol sends
/// within a round trip of connecting, so a second is ample in a cluster; a
/// server-speaks-first client waits this long before its server is even dialled, so
/// it must stay short. Too short degrades gracefully: a slow HTTP client is forwarded
/// as opaque TCP, which still works. (Linkerd waits 10 s, a long stall for every
/// MySQL or SMTP connection on a port not marked opaque.)
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Default [`DetectConfig::max_prefix`]: enough for the longest request line
/// recognised ([`MAX_REQUEST_LINE`]).
pub const DEFAULT_MAX_PREFIX: usize = MAX_REQUEST_LINE;

/// Length of `" HTTP/1.1\r\n"`, what follows the request target.
const VERSION_AND_CRLF: usize = 11;

/// How many bytes one read may add; a request line nearly always fits.
const READ_CHUNK: usize = 4 * 1024;

/// The protocol a connection speaks, as far as the proxy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// Anything else, including TLS, and clients that sent nothing in time.
    Opaque,
}

impl Protocol {
    /// The label used in metrics and logs: `http1`, `http2` or `opaque`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "opaque",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits of one detection.
#[derive(Clone, Debug)]
pub struct DetectConfig {
    /// How long to wait, in total, for the client's first bytes to decide. On expiry
    /// the connection is opaque with whatever arrived.
    pub timeout: Duration,
    /// Most bytes read before giving up and calling the connection opaque. Values below
    /// the 24-byte HTTP/2 preface are raised to it.
    pub max_prefix: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_DETECT_TIMEOUT,
            max_prefix: DEFAULT_MAX_PREFIX,
        }
    }
}

/// The outcome of [`detect`].
#[derive(Debug)]
pub struct Detected {
    /// The protocol decided.
    pub protocol: Protocol,
    /// Every byte read from the client; replay them (see [`Prefixed`], or the
    /// forwarder's `prefix`) before anything else read from the connection.
    pub prefix: BytesMut,
    /// The client sent too little before [`DetectConfig::timeout`]; `protocol` is
    /// then [`Protocol::Opaque`].
    pub timed_out: bool,
}

impl Detected {
    /// Opaque with nothing read: the outcome for ports configured as opaque, which
    /// skip detection.
    pub fn opaque() -> Self {
        Self {
            protocol: Protocol::Opaque,
            prefix: BytesMut::new(),
            timed_out: false,
        }
    }
}

/// Reads from `io` until the protocol is known, the timeout fires (→ opaque with
/// whatever arrived), EOF (→ opaque), or `max_prefix` bytes arrived (→ opaque).
///
/// Only read errors are errors; every byte read is in [`Detected::prefix`].
/// Cancel-safe only in that dropping it drops the bytes read so far.
pub async fn detect<I: AsyncRead + Unpin>(io: &mut I, cfg: &DetectConfig) -> io::Result<Detected> {
    let max = cfg.max_prefix.max(H2_PREFACE.len());
    let deadline = Instant::now().checked_add(cfg.timeout);
    let mut prefix = BytesMut::new();
    let done = |protocol, prefix, timed_out| {
        Ok(Detected {
            protocol,
            prefix,
            timed_out,
        })
    };
    loop {
        if prefix.len() >= max {
            return done(Protocol::Opaque, prefix, false);
        }
        let remaining = max - prefix.len();
        prefix.reserve(remaining.min(READ_CHUNK));
        let mut limited = (&mut *io).take(remaining as u64);
        let read = limited.read_buf(&mut prefix);
        let read = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
                Ok(read) => read,
                Err(_elapsed) => return done(Protocol::Opaque, prefix, true),
            },
            None => read.await,
        };
        match read {
            Ok(0) => return done(Protocol::Opaque, prefix, false),
            Ok(_) => {
                if let Some(protocol) = classify(&prefix) {
                    return done(protocol, prefix, false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Classifies a connection from its first bytes: `Some` once decided, `None` while
/// more bytes are needed.
///
/// HTTP/2 needs the whole 24-byte preface; HTTP/1 needs a whole request line
/// (`METHOD SP target SP HTTP/1.0|1.1 CRLF`, a bare LF accepted as RFC 9112 allows).
/// Opaque is decided at the first byte that rules both out, without waiting for more.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    if prefix.is_empty() {
        return None;
    }
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    classify_http1(prefix)
}

/// The HTTP/1 request-line check; `None` means "a request line so far".
fn classify_http1(p: &[u8]) -> Option<Protocol> {
    const OPAQUE: Option<Protocol> = Some(Protocol::Opaque);
    // Method: one or more token characters, then SP.
    let mut i = 0;
    loop {
        let &b = p.get(i)?;
        if b == b' ' {
            break;
        }
        if !is_tchar(b) || i == MAX_METHOD {
            return OPAQUE;
        }
        i += 1;
    }
    if i == 0 {
        return OPAQUE;
    }
    i += 1;
    // Target: one or more visible bytes (obs-text tolerated, as httparse does), then SP.
    let target = i;
    loop {
        // What must still follow the target, " HTTP/1.x\r\n", has to fit the limit.
        if i + VERSION_AND_CRLF > MAX_REQUEST_LINE {
            return OPAQUE;
        }
        let &b = p.get(i)?;
        if b == b' ' {
            break;
        }
        if !(b.is_ascii_graphic() || b >= 0x80) {
            return OPAQUE;
        }
        i += 1;
    }
    if i == target {
        return OPAQUE;
    }
    i += 1;
    // Version, byte by byte so a divergence decides at once.
    for &want in b"HTTP/1." {
        if *p.get(i)? != want {
            return OPAQUE;
        }
        i += 1;
    }
    if !matches!(*p.get(i)?, b'0' | b'1') {
        return OPAQUE;
    }
    i += 1;
    match *p.get(i)? {
        b'\n' => Some(Protocol::Http1),
        b'\r' => match *p.get(i + 1)? {
            b'\n' => Some(Protocol::Http1),
            _ => OPAQUE,
        },
        _ => OPAQUE,
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// An IO that replays `prefix` before reading from the inner stream, so hyper and the
/// forwarder see the bytes detection consumed. Writes pass straight through.
#[derive(Debug)]
pub struct Prefixed<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Prefixed<I> {
    /// Wraps `io`; reads yield `prefix` first.
    pub fn new(prefix: Bytes, io: I) -> Self {
        Self { prefix, io }
    }

    /// The part of the prefix not read yet, and the inner stream.
    pub fn into_parts(self) -> (Bytes, I) {
        (self.prefix, self.io)
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The inner stream; reading from it directly skips the unread prefix.
    pub fn get_mut(&mut self) -> &mut I {
        &mut self.io
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_prefix_of_a_request_line_waits() {
        let line = b"GET /index.html HTTP/1.1\r\n";
        for n in 0..line.len() {
            assert_eq!(
                classify(&line[..n]),
                None,
                "{:?}",
                String::from_utf8_lossy(&line[..n])
            );
        }
        assert_eq!(classify(line), Some(Protocol::Http1));
    }

    #[test]
    fn every_prefix_of_the_preface_waits() {
        for n in 0..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..n]), None);
        }
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
    }
}
