//! The tunnel server's reading of a CONNECT stream: HTTP/2 frames, HPACK, the
//! `:authority` and the `isthmus-cluster` header, as [`proxy_core::tunnel::server`]
//! sees them from a peer.
//!
//! The server's request parser is private, so the check drives the real
//! [`TunnelServer`] over an in-memory stream with the bytes a peer would send, and
//! looks at what reaches the [`TunnelHandler`]. The handler refuses every stream
//! (`no_route`), so nothing is ever forwarded.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_vocab::{Authority, CLUSTER_HEADER, ClusterName, Refusal};
use proxy_core::forward::ForwardConfig;
use proxy_core::metrics::{Direction, ProxyMetrics};
use proxy_core::tunnel::H2Settings;
use proxy_core::tunnel::server::{Peer, TunnelHandler, TunnelRequest, TunnelServer, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Bound on one exchange; the in-memory server answers in microseconds, so reaching
/// it means the server hung on a peer's bytes.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest field taken from the input; keeps the header block inside one frame.
const MAX_FIELD: usize = 4096;

const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Input flags (first byte).
const RAW: u8 = 1;
const WITH_CLUSTER: u8 = 1 << 1;
const WITH_EXTRA: u8 = 1 << 2;
const END_STREAM: u8 = 1 << 3;
const WITH_SCHEME_PATH: u8 = 1 << 4;

thread_local! {
    // One runtime per thread, reused: building one per input would dominate the run.
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Sends `data` to a tunnel server as a peer would and checks what reached the handler.
///
/// Input: a flag byte, then either raw frames (flag bit 0; sent after the preface and
/// an empty SETTINGS) or NUL-separated fields `method`, `authority`, `cluster`,
/// `extra header name`, `extra header value` that are encoded into one HEADERS frame
/// on stream 1 (literal HPACK, so every byte reaches the server's decoder).
///
/// Checks: the server answers (or closes) within [`EXCHANGE_TIMEOUT`]; whatever
/// reaches the handler is a CONNECT whose authority is exactly the one sent, parsed
/// by [`Authority::parse`], and whose cluster is exactly the header sent; and a
/// well-formed CONNECT for a valid authority and cluster name does reach it.
pub fn check(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let request = if flags & RAW != 0 {
        None
    } else {
        Some(Fields::split(flags, rest))
    };
    let mut wire = Vec::with_capacity(H2_PREFACE.len() + 9 + rest.len() + 64);
    wire.extend_from_slice(H2_PREFACE);
    push_frame(&mut wire, FRAME_SETTINGS, 0, 0, &[]);
    match &request {
        None => wire.extend_from_slice(rest),
        Some(fields) => {
            let end = if flags & END_STREAM != 0 {
                FLAG_END_STREAM
            } else {
                0
            };
            push_frame(
                &mut wire,
                FRAME_HEADERS,
                FLAG_END_HEADERS | end,
                1,
                &fields.header_block(),
            );
        }
    }
    let seen = exchange(wire, request.is_some());
    assert!(
        seen.len() <= 1,
        "one HEADERS frame opened {} streams",
        seen.len()
    );
    for request in &seen {
        let text = request.authority.as_str();
        assert_eq!(Authority::parse(text).as_ref(), Ok(&request.authority));
        if let Some(cluster) = &request.cluster {
            let name = cluster.as_str();
            assert!(
                !name.is_empty()
                    && name.len() <= 63
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "cluster {name:?} reached the handler"
            );
        }
    }
    if let Some(fields) = request {
        fields.check(seen.first());
    }
}

/// The fields of a structured input.
struct Fields<'a> {
    flags: u8,
    method: &'a [u8],
    authority: &'a [u8],
    cluster: &'a [u8],
    extra_name: &'a [u8],
    extra_value: &'a [u8],
}

impl<'a> Fields<'a> {
    fn split(flags: u8, rest: &'a [u8]) -> Self {
        let mut parts = rest
            .split(|&b| b == 0)
            .map(|f| &f[..f.len().min(MAX_FIELD)]);
        let mut next = || parts.next().unwrap_or_default();
        Self {
            flags,
            method: next(),
            authority: next(),
            cluster: next(),
            extra_name: next(),
            extra_value: next(),
        }
    }

    fn header_block(&self) -> Vec<u8> {
        let mut block = Vec::new();
        push_header(&mut block, b":method", self.method);
        if self.flags & WITH_SCHEME_PATH != 0 {
            push_header(&mut block, b":scheme", b"https");
            push_header(&mut block, b":path", b"/");
        }
        push_header(&mut block, b":authority", self.authority);
        if self.flags & WITH_CLUSTER != 0 {
            push_header(&mut block, CLUSTER_HEADER.as_bytes(), self.cluster);
        }
        if self.flags & WITH_EXTRA != 0 {
            push_header(&mut block, self.extra_name, self.extra_value);
        }
        block
    }

    fn check(&self, seen: Option<&TunnelRequest>) {
        let authority = std::str::from_utf8(self.authority)
            .ok()
            .and_then(|a| Authority::parse(a).ok());
        let cluster = std::str::from_utf8(self.cluster).ok();
        if let Some(request) = seen {
            assert_eq!(self.method, b"CONNECT", "a non-CONNECT reached the handler");
            assert_eq!(
                authority.as_ref(),
                Some(&request.authority),
                "authority {:?} reached the handler as {}",
                String::from_utf8_lossy(self.authority),
                request.authority
            );
            if self.flags & WITH_CLUSTER == 0 {
                assert_eq!(request.cluster, None, "a cluster appeared from nowhere");
            } else {
                assert_eq!(
                    request.cluster.as_ref().map(|c| c.as_str()),
                    cluster,
                    "the cluster header was changed on its way"
                );
            }
        }
        // A plain, well-formed CONNECT: no extra header for the HTTP/2 layer to
        // object to, no END_STREAM, no :scheme/:path, a valid authority, and a cluster
        // name discovery would accept. It must reach the handler.
        let plain = self.method == b"CONNECT"
            && self.flags & (WITH_EXTRA | END_STREAM | WITH_SCHEME_PATH) == 0
            && authority.is_some()
            && (self.flags & WITH_CLUSTER == 0
                || cluster.is_some_and(|c| ClusterName::parse(c).is_ok()));
        if plain {
            assert!(
                seen.is_some(),
                "CONNECT {:?} (cluster {:?}) was refused before the handler",
                String::from_utf8_lossy(self.authority),
                (self.flags & WITH_CLUSTER != 0).then(|| String::from_utf8_lossy(self.cluster))
            );
        }
    }
}

/// Records what reaches it and refuses it.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<TunnelRequest>>,
}

impl TunnelHandler for Recorder {
    async fn open(&self, request: &TunnelRequest) -> Result<Upstream, Refusal> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(request.clone());
        Err(Refusal::NoRoute)
    }
}

/// Runs one connection: writes `wire`, waits for the answer on stream 1 (when a
/// request was sent) or for the server to finish reading, closes, and returns what
/// reached the handler.
fn exchange(wire: Vec<u8>, await_stream: bool) -> Vec<TunnelRequest> {
    RUNTIME.with(|cell| {
        let mut slot = cell.borrow_mut();
        let runtime = slot.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds")
        });
        runtime.block_on(async move {
            let recorder = Arc::new(Recorder::default());
            let server = TunnelServer::new(
                recorder.clone(),
                H2Settings::default(),
                ForwardConfig::default(),
                ProxyMetrics::default(),
                Direction::Gateway,
            );
            let (client, server_io) = tokio::io::duplex(1 << 20);
            let drain_rx = tokio_util::sync::CancellationToken::new();
            let serve = tokio::spawn(async move {
                // A peer's garbage is a connection error, which is not what is checked.
                let _ = server
                    .serve_connection(server_io, Peer::default(), drain_rx)
                    .await;
            });
            let talk = async move {
                talk(client, &wire, await_stream).await;
                serve.await.expect("the tunnel server task panicked");
            };
            if tokio::time::timeout(EXCHANGE_TIMEOUT, talk).await.is_err() {
                panic!("tunnel server neither answered nor closed within {EXCHANGE_TIMEOUT:?}");
            }
            std::mem::take(
                &mut *recorder
                    .seen
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            )
        })
    })
}

async fn talk(mut client: DuplexStream, wire: &[u8], await_stream: bool) {
    if client.write_all(wire).await.is_err() {
        return;
    }
    if await_stream {
        // Wait for the server's verdict on stream 1 before closing, so closing does
        // not race the request.
        while let Some((kind, stream)) = read_frame(&mut client).await {
            if kind == FRAME_GOAWAY
                || (stream == 1 && (kind == FRAME_HEADERS || kind == FRAME_RST_STREAM))
            {
                break;
            }
        }
    }
    let _ = client.shutdown().await;
    while read_frame(&mut client).await.is_some() {}
}

/// Reads one frame; `None` at EOF or error. Returns its type and stream.
async fn read_frame(io: &mut DuplexStream) -> Option<(u8, u32)> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.ok()?;
    Some((head[3], stream))
}

fn push_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("header blocks are bounded by MAX_FIELD");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2).
fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    push_string(out, name);
    push_string(out, value);
}

fn push_string(out: &mut Vec<u8>, s: &[u8]) {
    // 7-bit prefix integer (RFC 7541 §5.1), H bit clear.
    let mut len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}
