//! The mesh tunnel: each forwarded TCP connection is one HTTP/2 `CONNECT` stream
//! (RFC 9113 section 8.5) over a TLS 1.3 connection with client certificates.
//!
//! # Wire format
//! - `:method CONNECT`, `:authority` = the target service (`hello.default.svc.cluster.local:80`).
//! - [`CLUSTER_HEADER`](isthmus_vocab::CLUSTER_HEADER) names the cluster the target lives in.
//! - The answer is `200` and then the stream carries the connection's bytes both ways,
//!   or a refusal: a status that says why, with [`REFUSAL_HEADER`](isthmus_vocab::REFUSAL_HEADER)
//!   naming the exact [`Refusal`](isthmus_vocab::Refusal) so the far side can log and count it precisely.
//!
//! The header names and the refusals are the mesh's vocabulary ([`isthmus_vocab::tunnel`]);
//! this module speaks them.
//!
//! TLS is set up by the caller (configs come from proxy-identity); this module sees
//! only byte streams.

pub mod client;
pub mod server;
mod stream;

pub use stream::ConnectionError;
#[cfg(test)]
pub(crate) use stream::h2_io_error;
pub(crate) use stream::{PingFailed, Pinger};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// Told of every failed TLS handshake on a mesh connection, with the peer address;
/// returns the reason label it counted. proxy-core cannot classify certificate
/// errors itself: the identity layer that verifies peers can.
pub type HandshakeObserver =
    std::sync::Arc<dyn Fn(&std::io::Error, std::net::SocketAddr) -> &'static str + Send + Sync>;

/// Any bidirectional byte stream the tunnel can carry.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// An upstream of unknown concrete type: a TCP socket, a TLS stream, another tunnel stream.
pub type BoxIo = Box<dyn Io>;

/// HTTP/2 settings of tunnel connections, both ends, and of the transparent HTTP/2
/// path (proxy-core's one place for h2 knobs). Every field bounds what one peer can
/// make this proxy hold; [`Default`] holds the defaults the command line documents.
#[derive(Clone, Debug)]
pub struct H2Settings {
    /// Streams a peer may open at once on one connection; more wait at the client.
    pub max_concurrent_streams: u32,
    /// Per-stream flow-control window: bounds what one idle reader can make us buffer.
    pub stream_window: u32,
    /// Per-connection window, shared by all streams.
    pub connection_window: u32,
    /// Largest header block accepted, decoded size (RFC 9113 `SETTINGS_MAX_HEADER_LIST_SIZE`).
    /// A server answers a larger request head with `431` and resets the stream.
    pub max_header_list_size: u32,
    /// Streams a peer opened and reset before they were accepted, tolerated at once;
    /// past it the connection is closed with `GOAWAY` (the "rapid reset" attack,
    /// CVE-2023-44487).
    pub max_pending_accept_reset_streams: usize,
    /// Bytes buffered for sending per stream before the writer is made to wait:
    /// bounds what a peer that never opens its window can make us hold.
    pub max_send_buf_size: usize,
    /// PING interval; a peer that stops answering is noticed within interval + timeout.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// Default [`H2Settings::max_concurrent_streams`].
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Default [`H2Settings::max_header_list_size`]: 64 KiB, the same bound as an
/// HTTP/1 request head ([`crate::http::DEFAULT_HTTP1_MAX_HEAD_BYTES`]), so a request
/// does not change fate with the protocol version.
pub const DEFAULT_H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Default [`H2Settings::max_pending_accept_reset_streams`]: h2's own default.
pub const DEFAULT_H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Default [`H2Settings::max_send_buf_size`]: h2's own default (400 KiB).
pub const DEFAULT_H2_MAX_SEND_BUF_SIZE: usize = 400 * 1024;

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            // 256 KiB per stream fills a 1 Gbit/s link at 2 ms RTT, and 1,000 streams
            // would still bound buffering at 256 MiB only if every reader stalls.
            stream_window: 256 * 1024,
            connection_window: 4 * 1024 * 1024,
            max_header_list_size: DEFAULT_H2_MAX_HEADER_LIST_SIZE,
            max_pending_accept_reset_streams: DEFAULT_H2_MAX_PENDING_ACCEPT_RESET_STREAMS,
            max_send_buf_size: DEFAULT_H2_MAX_SEND_BUF_SIZE,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        }
    }
}
