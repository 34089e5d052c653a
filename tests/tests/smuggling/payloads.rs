//! The request-smuggling payloads: classic CL.TE and TE.CL desyncs, TE.TE
//! obfuscations, Content-Length tricks, head syntax an origin may read differently,
//! broken chunked bodies, and request lines that old detection forwarded raw.

/// What the proxy must do with a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Answered `400`/`414`/`431` by the proxy, the connection closed; nothing the
    /// origin completes.
    Refused,
    /// Forwarded as exactly one well-framed request.
    Forwarded,
}

/// How the client writes a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// In one write, the innocent request right behind it.
    AtOnce,
    /// One byte per write for its first 40 bytes, 5 ms apart.
    Trickle,
    /// Its first `split` bytes, then a pause longer than the detect timeout.
    Stall { split: usize },
}

pub struct Payload {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub pace: Pace,
    pub expect: Expect,
}

/// The innocent request pipelined behind every payload.
pub const INNOCENT: &[u8] = b"GET /innocent HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n";

fn p(name: &'static str, bytes: &[u8], expect: Expect) -> Payload {
    Payload {
        name,
        bytes: bytes.to_vec(),
        pace: Pace::AtOnce,
        expect,
    }
}

pub fn all() -> Vec<Payload> {
    use Expect::{Forwarded, Refused};
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: o\r\n\r\n", "a".repeat(9000));
    let ext_abuse = format!(
        "POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n",
        "x".repeat(20_000)
    );
    let inner = "GET /smuggled HTTP/1.1\r\nHost: o\r\n\r\n";
    let hidden = format!(
        "POST / HTTP/1.1\r\nHost: o\r\nContent-Length: {}\r\n\r\n{inner}",
        inner.len()
    );
    vec![
        // CL.TE and TE.CL: a second request hidden where only one side looks.
        p(
            "CL.TE",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
            Forwarded,
        ),
        p(
            "TE.CL",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
            Forwarded,
        ),
        // TE.TE: obfuscated Transfer-Encoding beside a Content-Length.
        p(
            "TE: xchunked",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding: xchunked\r\n\r\n5c\r\n",
            Refused,
        ),
        p(
            "TE: ' chunked'",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding:  chunked\r\n\r\n0\r\n\r\n",
            Forwarded,
        ),
        p(
            "TE: chunked, identity",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "TE:\\tchunked",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
            Forwarded,
        ),
        p(
            "TE: chunked + TE: identity",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "TE: chunked twice",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "TE: gzip, chunked",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "TE: \"chunked\"",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "TE: CHUNKED",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Forwarded,
        ),
        // Content-Length tricks.
        p(
            "CL: +5",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: +5\r\n\r\nhello",
            Refused,
        ),
        p(
            "CL: -1",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: -1\r\n\r\n",
            Refused,
        ),
        p(
            "CL: 005 (leading zeros)",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 005\r\n\r\nhello",
            Forwarded,
        ),
        p(
            "CL: 5, 5 (list)",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 5, 5\r\n\r\nhello",
            Refused,
        ),
        p(
            "CL: 1 0 (inner space)",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 1 0\r\n\r\nhellohello",
            Refused,
        ),
        p(
            "CL 5 + CL 6",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            Refused,
        ),
        p(
            "CL 5 + CL 5",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            Forwarded,
        ),
        // Head syntax.
        p(
            "space before colon",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "obs-fold TE",
            b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding: identity\r\n chunked\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "bare CR in a header",
            b"POST / HTTP/1.1\r\nHost: o\rTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "bare LF line endings",
            b"POST / HTTP/1.1\nHost: o\nContent-Length: 5\n\nhello",
            Forwarded,
        ),
        p(
            "NUL in a header",
            b"GET / HTTP/1.1\r\nHost: o\r\nX-A: a\0b\r\n\r\n",
            Refused,
        ),
        // Broken chunked bodies.
        p(
            "chunk size overflow",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "chunk size not hex",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "chunk without its CRLF",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            Refused,
        ),
        p(
            "chunk extension",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n0\r\n\r\n",
            Forwarded,
        ),
        p("chunk extension of 20 KB", ext_abuse.as_bytes(), Refused),
        p(
            "trailer Content-Length",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n",
            Refused,
        ),
        p(
            "trailer Transfer-Encoding",
            b"POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
            Refused,
        ),
        // Request lines that detection once forwarded raw.
        p(
            "leading CRLF, CL.TE",
            b"\r\nPOST / HTTP/1.1\r\nHost: o\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
            Forwarded,
        ),
        p(
            "leading LF LF",
            b"\n\nGET / HTTP/1.1\r\nHost: o\r\n\r\n",
            Forwarded,
        ),
        p(
            "leading SP",
            b" GET / HTTP/1.1\r\nHost: o\r\n\r\n",
            Refused,
        ),
        p(
            "CR in the target",
            b"GET /a\rb HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "tab separators",
            b"GET\t/\tHTTP/1.1\r\nHost: o\r\n\r\n",
            Refused,
        ),
        p(
            "HTTP/1.2",
            b"POST / HTTP/1.2\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "lower-case version",
            b"GET / http/1.1\r\nHost: o\r\n\r\n",
            Refused,
        ),
        p("HTTP/0.9 line", b"GET /nine\r\n", Refused),
        p(
            "odd method",
            b"G(T / HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "lower-case method",
            b"post / HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\n\r\nhello",
            Forwarded,
        ),
        p("target over 8 KiB", long_target.as_bytes(), Forwarded),
        p(
            "absolute-form",
            b"GET http://o/abs HTTP/1.1\r\nHost: o\r\n\r\n",
            Forwarded,
        ),
        p(
            "HTTP/1.0 keep-alive + TE",
            b"POST / HTTP/1.0\r\nHost: o\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Refused,
        ),
        p(
            "HTTP/1.0 keep-alive + CL",
            b"POST / HTTP/1.0\r\nHost: o\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello",
            Forwarded,
        ),
        p(
            "Expect: 100-continue + body",
            b"POST / HTTP/1.1\r\nHost: o\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
            Forwarded,
        ),
        p("request hidden in a body", hidden.as_bytes(), Forwarded),
        Payload {
            name: "leading CRLF, one byte per segment",
            bytes: b"\r\n\r\nPOST / HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            pace: Pace::Trickle,
            expect: Forwarded,
        },
        Payload {
            name: "request line stalled past detection",
            bytes: b"POST /slow HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            pace: Pace::Stall { split: 9 },
            expect: Forwarded,
        },
        Payload {
            name: "method split by a stall",
            bytes: b"POST /split HTTP/1.1\r\nHost: o\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            pace: Pace::Stall { split: 1 },
            expect: Forwarded,
        },
        Payload {
            name: "empty line, then a stall",
            bytes: b"\r\nGET /late HTTP/1.1\r\nHost: o\r\n\r\n".to_vec(),
            pace: Pace::Stall { split: 2 },
            expect: Forwarded,
        },
    ]
}
