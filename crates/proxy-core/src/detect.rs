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
//! # Which way a doubt goes
//!
//! An opaque connection is forwarded raw, so whatever an origin would read as an
//! HTTP/1 request must not be opaque: that would carry it past the proxy's parser, its
//! request counts and its smuggling defences. HTTP/1 is therefore recognised by the
//! union of what lenient origins accept (nginx, Apache, Node's llhttp, hyper), not by
//! RFC 9112's strict grammar: leading empty lines and whitespace, any printable
//! method, runs of SP, HTAB, VT, FF or a bare CR between the words, any bytes in the
//! target, any `HTTP/` version in any case, HTTP/0.9 lines, and a line that stalls
//! or outgrows the limit once it reads as the start of a request. The HTTP path then
//! parses strictly and answers what is malformed with `400` (`431`, `414` when too
//! large) itself. Opaque is left for what no HTTP/1 server reads as a request: a
//! first byte that cannot start a method (TLS, binary framings), a whole first line
//! that names no version and no path (`*1`, `SSH-2.0-...`, `get key`, `EHLO host`),
//! and words without a line end that do not start like a request (plain TCP
//! clients that write a few words and wait).

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

/// The request-line length detection reads up to by default
/// ([`DEFAULT_MAX_PREFIX`]): nginx's default `large_client_header_buffers` line
/// size. A request line still going at this length is HTTP/1 (the HTTP path
/// answers it `414` or `431` once past its own limits); it is never forwarded raw
/// for being long.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Default [`DetectConfig::timeout`]: one second. A client-speaks-first protocol sends
/// within a round trip of connecting, so a second is ample in a cluster; a
/// server-speaks-first client waits this long before its server is even dialled, so
/// it must stay short. A client that sent the start of a request line and then
/// went quiet is HTTP/1 (a trickled request line must not slip past as opaque; see
/// [`undecided`]); other clients that went quiet are opaque. (Linkerd waits 10 s, a
/// long stall for every MySQL or SMTP connection on a port not marked opaque.)
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Default [`DetectConfig::max_prefix`]: [`MAX_REQUEST_LINE`].
pub const DEFAULT_MAX_PREFIX: usize = MAX_REQUEST_LINE;

/// How many bytes one read may add; a request line nearly always fits.
const READ_CHUNK: usize = 4 * 1024;

/// The protocol a connection speaks, as far as the proxy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// What an HTTP/1 server would read as a request line (the HTTP path then parses
    /// it, or refuses it).
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
    /// the prefix is decided by [`undecided`].
    pub timeout: Duration,
    /// Most bytes read before deciding; a prefix still undecided at this length is
    /// decided by [`undecided`]. Values below the 24-byte HTTP/2 preface are raised
    /// to it.
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
    /// [`DetectConfig::timeout`] fired before [`classify`] decided; `protocol` is
    /// what [`undecided`] made of the prefix.
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

/// Reads from `io` until the protocol is known, the timeout fires, `max_prefix`
/// bytes arrived or the client ends its stream; a prefix still undecided then is
/// decided by [`undecided`].
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
            return done(undecided(&prefix, Stall::Limit), prefix, false);
        }
        let remaining = max - prefix.len();
        prefix.reserve(remaining.min(READ_CHUNK));
        let mut limited = (&mut *io).take(remaining as u64);
        let read = limited.read_buf(&mut prefix);
        let read = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
                Ok(read) => read,
                Err(_elapsed) => return done(undecided(&prefix, Stall::Timeout), prefix, true),
            },
            None => read.await,
        };
        match read {
            Ok(0) => return done(undecided(&prefix, Stall::Eof), prefix, false),
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

/// Why a prefix stopped growing before [`classify`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// The client sent nothing more within [`DetectConfig::timeout`].
    Timeout,
    /// [`DetectConfig::max_prefix`] bytes arrived.
    Limit,
    /// The client ended its stream.
    Eof,
}

/// The protocol of a prefix [`classify`] left undecided (`None`) that stopped
/// growing.
///
/// After EOF no request line can complete: opaque. After a timeout or at the
/// limit, the rest may still come, and an origin would read a request line
/// trickled past the timeout; but plain TCP clients also write a few words
/// without a line end and wait for an answer, and must keep working. So a stalled
/// prefix is HTTP/1 only when it already reads as the start of a request: empty
/// lines or whitespace with nothing after them, a first word that is a method
/// token (RFC 9110 `tchar`s, any case: Go's server takes `get` and `PROPFIND`)
/// still being typed or followed by nothing but a separator, a common method in
/// upper case before any target, or a second word that is a path, `*` or an
/// absolute URI. Anything else stalled is opaque, as a client that sent nothing:
/// a first word with a byte no method has, or a second word no origin takes as
/// a target (`hello there`).
pub fn undecided(prefix: &[u8], stall: Stall) -> Protocol {
    if stall == Stall::Eof || prefix.is_empty() {
        return Protocol::Opaque;
    }
    let Some(start) = prefix.iter().position(|&b| !is_separator(b) && b != b'\n') else {
        // Only empty lines so far: no protocol but HTTP/1 starts like that.
        return Protocol::Http1;
    };
    let rest = &prefix[start..];
    let method_end = rest.iter().position(|&b| is_separator(b));
    let method = &rest[..method_end.unwrap_or(rest.len())];
    let request_like = match method_end {
        None => is_method_token(method),
        Some(end) => {
            let target = rest[end..]
                .iter()
                .position(|&b| !is_separator(b))
                .map_or(&b""[..], |t| &rest[end + t..]);
            METHODS.contains(&method)
                || (target.is_empty() && is_method_token(method))
                || target.starts_with(b"*")
                || is_path_or_absolute(target)
        }
    };
    if request_like {
        Protocol::Http1
    } else {
        Protocol::Opaque
    }
}

/// Methods that make a stalled prefix HTTP/1 whatever target follows them
/// ([`undecided`]): RFC 9110's, `PATCH`, and `PRI`. Upper case only: nginx and
/// llhttp accept no other spelling, and lower-case words are common in text
/// protocols (`get key`).
const METHODS: [&[u8]; 10] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH", b"PRI",
];

/// The longest method token a stalled prefix may start with and still count as
/// HTTP/1: far past every registered method, short of a line of text.
const MAX_METHOD_TOKEN: usize = 32;

/// A method as RFC 9110 spells it, a `token` (1 to [`MAX_METHOD_TOKEN`] `tchar`s),
/// or the start of one.
fn is_method_token(word: &[u8]) -> bool {
    !word.is_empty()
        && word.len() <= MAX_METHOD_TOKEN
        && word
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Classifies a connection from its first bytes: `Some` once decided, `None` while
/// more bytes are needed.
///
/// HTTP/2 needs the whole 24-byte preface. HTTP/1 is decided, after leading
/// empty lines and whitespace, a printable method and a separator, at the first
/// later word that starts with `HTTP/` (any case), or at the end of a first line
/// whose second word is a path or an absolute URI (HTTP/0.9, which nginx still
/// serves). Opaque is decided at a first byte that cannot start a method (after
/// leading whitespace), or at the end of a first line that is neither: it is
/// never decided halfway through a line that could still become a request.
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

/// Bytes that separate the words of a request line at some origin: SP (RFC 9112),
/// runs of it (nginx), HTAB, VT, FF and a bare CR (Apache's `isspace` outside
/// strict mode; nginx and llhttp end the line at a CR). A CR before the LF is one
/// of these too, which is harmless: the LF ends the line.
fn is_separator(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0b | 0x0c | b'\r')
}

/// The HTTP/1 request-line check; `None` means "may still become a request line".
fn classify_http1(p: &[u8]) -> Option<Protocol> {
    const OPAQUE: Option<Protocol> = Some(Protocol::Opaque);
    const HTTP1: Option<Protocol> = Some(Protocol::Http1);
    // Empty lines before the request line: RFC 9112 §2.2 asks servers to skip at
    // least one; httparse and nginx skip any number, so do we (any whitespace,
    // for the origins that trim a line before splitting it).
    let mut i = p.iter().position(|&b| !is_separator(b) && b != b'\n')?;
    // The method: printable ASCII. hyper wants a token and nginx upper case, but
    // an origin that answers an odd method with 400 or 501 has still read the
    // head, so the proxy must read it too (and answer 400 itself).
    while !is_separator(*p.get(i)?) {
        let b = p[i];
        if b == b'\n' {
            // A lone word on its line: no origin reads that as a request.
            return OPAQUE;
        }
        if !b.is_ascii_graphic() {
            return OPAQUE;
        }
        i += 1;
    }
    // The words after the method: the target (any bytes: origins disagree on
    // which are allowed, the proxy's parser refuses what it does not take), more
    // target for nginx (which allows spaces in it), and the version.
    let mut target_is_path = None;
    let mut words_after_method = 0usize;
    loop {
        while is_separator(*p.get(i)?) {
            i += 1;
        }
        if p[i] == b'\n' {
            // The line ended without a version: HTTP/0.9 if a path or absolute
            // URI, and nothing else, follows the method, which nginx serves;
            // otherwise no request (`OPTIONS rtsp://h/x RTSP/1.0` is RTSP).
            return if words_after_method == 1 && target_is_path == Some(true) {
                HTTP1
            } else {
                OPAQUE
            };
        }
        let start = i;
        loop {
            let Some(&b) = p.get(i) else {
                // The word goes on past what arrived; `HTTP/` decides as soon as
                // it is complete, so the prefix can stay undecided without losing
                // the early decision.
                return None;
            };
            if is_separator(b) || b == b'\n' {
                break;
            }
            i += 1;
            if i - start == VERSION_PREFIX.len() && p[start..i].eq_ignore_ascii_case(VERSION_PREFIX)
            {
                return HTTP1;
            }
        }
        words_after_method += 1;
        if target_is_path.is_none() {
            target_is_path = Some(is_path_or_absolute(&p[start..i]));
        }
    }
}

/// What starts the version of a request line, in any case (origins that compare it
/// case-insensitively exist; hyper answers anything but `HTTP/1.0` and `HTTP/1.1`
/// with `400`).
const VERSION_PREFIX: &[u8] = b"HTTP/";

/// An origin-form path or an absolute URI: the targets nginx accepts on an
/// HTTP/0.9 line.
fn is_path_or_absolute(target: &[u8]) -> bool {
    target.starts_with(b"/") || target.windows(3).any(|w| w == b"://")
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
    fn every_prefix_of_a_request_line_waits_until_its_version() {
        let line = b"GET /index.html HTTP/1.1\r\n";
        let decided_at = b"GET /index.html HTTP/".len();
        for n in 0..line.len() {
            let want = (n >= decided_at).then_some(Protocol::Http1);
            assert_eq!(
                classify(&line[..n]),
                want,
                "{:?}",
                String::from_utf8_lossy(&line[..n])
            );
        }
    }

    #[test]
    fn every_prefix_of_the_preface_waits() {
        for n in 0..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..n]), None);
        }
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
    }
}
