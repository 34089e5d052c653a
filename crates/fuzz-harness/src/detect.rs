//! Protocol detection on a client's first bytes ([`proxy_core::detect`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use proxy_core::detect::{
    DEFAULT_MAX_PREFIX, DetectConfig, H2_PREFACE, Prefixed, Protocol, Stall, classify, detect,
    undecided,
};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Prefix lengths below this are all checked for a stable decision; beyond it every
/// [`STRIDE`]-th one, which keeps an 8 KiB input linear rather than quadratic.
const DENSE: usize = 256;
const STRIDE: usize = 61;

/// Classifies every prefix of `data`, then runs [`detect`] over `data` delivered in
/// chunks whose sizes come from the first byte.
///
/// Checks: once decided, the decision never changes as bytes arrive; HTTP/2 is
/// exactly the preface; every other decision (and indecision) matches a plain
/// reading of the first line ([`reference_http1`]), so nothing an origin would read
/// as a request is opaque; [`detect`] never claims more bytes than it was given,
/// agrees with [`classify`], and [`Prefixed`] replays exactly the bytes it consumed.
pub fn check(data: &[u8]) {
    let Some((&chunking, stream)) = data.split_first() else {
        return;
    };
    check_stable(stream);
    check_detect(stream, usize::from(chunking % 17) + 1);
}

fn check_stable(data: &[u8]) {
    let full = classify(data);
    let mut decided: Option<(usize, Protocol)> = None;
    let lengths = (0..=data.len()).filter(|&n| n < DENSE || n % STRIDE == 0 || n == data.len());
    for n in lengths {
        let got = classify(&data[..n]);
        match (decided, got) {
            (Some((at, p)), got) => assert_eq!(
                got,
                Some(p),
                "decided {p} at {at} bytes, then {got:?} at {n}"
            ),
            (None, Some(p)) => decided = Some((n, p)),
            (None, None) => {}
        }
    }
    match full {
        Some(Protocol::Http2) => assert!(data.starts_with(H2_PREFACE)),
        None if H2_PREFACE.starts_with(data) => {}
        _ => assert_eq!(
            full,
            reference_http1(data),
            "classify disagrees with the reference reading of {:?}",
            String::from_utf8_lossy(&data[..data.len().min(120)])
        ),
    }
}

/// The HTTP/1 rule of [`classify`] written the slow, obvious way (split the first
/// line into words), to check the byte-by-byte state machine against.
///
/// HTTP/1: after leading whitespace and empty lines, a printable method, and a
/// later word that starts with `HTTP/` in any case, or a whole first line of two
/// words whose second is a path or an absolute URI (HTTP/0.9). Opaque: a non-printable
/// byte in the method, or a whole first line that is neither. Undecided otherwise.
fn reference_http1(data: &[u8]) -> Option<Protocol> {
    let separator = |b: &u8| matches!(b, b' ' | b'\t' | 0x0b | 0x0c | b'\r');
    let start = data.iter().position(|b| !separator(b) && *b != b'\n')?;
    let rest = &data[start..];
    let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
        Some(end) => (&rest[..end], true),
        None => (rest, false),
    };
    let words: Vec<&[u8]> = line.split(separator).filter(|w| !w.is_empty()).collect();
    let method = words.first().copied().unwrap_or_default();
    if method.iter().any(|b| !b.is_ascii_graphic()) {
        return Some(Protocol::Opaque);
    }
    let version = |w: &&[u8]| w.len() >= 5 && w[..5].eq_ignore_ascii_case(b"HTTP/");
    if words.iter().skip(1).any(version) {
        return Some(Protocol::Http1);
    }
    if !complete {
        return None;
    }
    let http09 = words.len() == 2
        && (words[1].starts_with(b"/") || words[1].windows(3).any(|w| w == b"://"));
    Some(if http09 {
        Protocol::Http1
    } else {
        Protocol::Opaque
    })
}

fn check_detect(data: &[u8], chunk: usize) {
    let cfg = DetectConfig {
        // No deadline: the reader below is always ready, and no timer is needed to
        // poll `detect` without a runtime.
        timeout: Duration::MAX,
        max_prefix: DEFAULT_MAX_PREFIX,
    };
    let mut reader = Chunked { data, at: 0, chunk };
    let detected = poll_ready(detect(&mut reader, &cfg)).expect("reading a slice cannot fail");
    let n = detected.prefix.len();
    assert!(n <= data.len(), "detect claims {n} bytes of {}", data.len());
    assert!(
        n <= DEFAULT_MAX_PREFIX,
        "detect read {n} bytes past its limit"
    );
    assert_eq!(
        &detected.prefix[..],
        &data[..n],
        "prefix is not what was sent"
    );
    assert!(!detected.timed_out);
    match classify(&detected.prefix) {
        Some(p) => assert_eq!(detected.protocol, p, "detect disagrees with classify"),
        // Undecided at the limit: as `undecided` says; undecided at EOF: opaque
        // (no request line completes after EOF).
        None if n == DEFAULT_MAX_PREFIX => {
            assert_eq!(detected.protocol, undecided(&detected.prefix, Stall::Limit))
        }
        None => {
            assert_eq!(detected.protocol, Protocol::Opaque);
            assert_eq!(
                n,
                data.len(),
                "undecided after {n} bytes without EOF or limit"
            );
        }
    }
    if n < data.len() {
        assert!(
            classify(&detected.prefix).is_some() || n == DEFAULT_MAX_PREFIX,
            "stopped reading at {n} bytes undecided"
        );
    }
    // What detection read, replayed before the rest, is the whole stream.
    let rest = Chunked {
        data: &data[n..],
        at: 0,
        chunk,
    };
    let mut replay = Prefixed::new(Bytes::copy_from_slice(&detected.prefix), rest);
    let mut all = Vec::new();
    poll_ready(replay.read_to_end(&mut all)).expect("reading a slice cannot fail");
    assert_eq!(all, data, "Prefixed does not replay the stream");
}

/// Polls a future whose IO is always ready to completion, without a runtime.
fn poll_ready<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    // Every poll makes progress on an always-ready reader; the bound turns a
    // livelock into a failure instead of a hung fuzzer.
    for _ in 0..1_000_000 {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("future did not complete on always-ready IO");
}

/// A reader that hands out `data` at most `chunk` bytes per read, then EOF.
struct Chunked<'a> {
    data: &'a [u8],
    at: usize,
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self
            .chunk
            .min(buf.remaining())
            .min(self.data.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}
