//! The mesh tunnel: each forwarded TCP connection is one HTTP/2 `CONNECT` stream
//! (RFC 9113 section 8.5) over a TLS 1.3 connection with client certificates.
//!
//! # Wire format
//! - `:method CONNECT`, `:authority` = the target service (`hello.default.svc.cluster.local:80`).
//! - [`CLUSTER_HEADER`] names the cluster the target lives in.
//! - The answer is `200` and then the stream carries the connection's bytes both ways,
//!   or a refusal: a status that says why, with [`REFUSAL_HEADER`] naming the exact
//!   [`Refusal`] so the far side can log and count it precisely.
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

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite};

/// Request header naming the cluster of the target service.
pub const CLUSTER_HEADER: &str = "isthmus-cluster";
/// Response header naming the reason of a refusal (`not_exported`, `link_down`, ...).
pub const REFUSAL_HEADER: &str = "isthmus-refusal";

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

/// Why a tunnel stream (or the connection that would carry it) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The request was not a well-formed CONNECT for a service authority.
    BadRequest,
    /// The peer's identity is not allowed to use this route.
    Forbidden,
    /// The target service exists but its cluster does not export it.
    NotExported,
    /// No service of that name and port is known.
    NoRoute,
    /// The target names a cluster this gateway has no link to.
    UnknownCluster,
    /// The service exists but has no ready endpoints.
    NoEndpoints,
    /// The link to the target's cluster is down.
    LinkDown,
    /// The final upstream refused or reset the connection attempt.
    UpstreamRefused,
    /// The final upstream did not answer within the connect timeout.
    UpstreamTimeout,
    /// The target points back at a proxy listener.
    Loop,
}

impl Refusal {
    pub const ALL: [Refusal; 10] = [
        Refusal::BadRequest,
        Refusal::Forbidden,
        Refusal::NotExported,
        Refusal::NoRoute,
        Refusal::UnknownCluster,
        Refusal::NoEndpoints,
        Refusal::LinkDown,
        Refusal::UpstreamRefused,
        Refusal::UpstreamTimeout,
        Refusal::Loop,
    ];

    /// The status that carries this refusal on the tunnel.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::Forbidden | Refusal::NotExported => StatusCode::FORBIDDEN,
            Refusal::NoRoute | Refusal::UnknownCluster => StatusCode::NOT_FOUND,
            Refusal::NoEndpoints | Refusal::LinkDown => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamRefused => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::Loop => StatusCode::LOOP_DETECTED,
        }
    }

    /// The reason as a metric label and [`REFUSAL_HEADER`] value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Forbidden => "forbidden",
            Refusal::NotExported => "not_exported",
            Refusal::NoRoute => "no_route",
            Refusal::UnknownCluster => "unknown_cluster",
            Refusal::NoEndpoints => "no_endpoints",
            Refusal::LinkDown => "link_down",
            Refusal::UpstreamRefused => "upstream_refused",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::Loop => "loop",
        }
    }

    /// Reads a refusal back from a response: the header when it names a known reason,
    /// else the best match for the status (a peer of another version, or a middlebox).
    pub fn from_response(status: StatusCode, header: Option<&[u8]>) -> Refusal {
        if let Some(found) = header.and_then(|h| {
            Refusal::ALL
                .into_iter()
                .find(|r| r.as_str().as_bytes() == h)
        }) {
            return found;
        }
        match status {
            StatusCode::BAD_REQUEST => Refusal::BadRequest,
            StatusCode::FORBIDDEN => Refusal::Forbidden,
            StatusCode::NOT_FOUND => Refusal::NoRoute,
            StatusCode::SERVICE_UNAVAILABLE => Refusal::LinkDown,
            StatusCode::GATEWAY_TIMEOUT => Refusal::UpstreamTimeout,
            StatusCode::LOOP_DETECTED => Refusal::Loop,
            _ => Refusal::UpstreamRefused,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_round_trip_through_the_wire() {
        for refusal in Refusal::ALL {
            let back = Refusal::from_response(refusal.status(), Some(refusal.as_str().as_bytes()));
            assert_eq!(back, refusal);
        }
        assert_eq!(
            Refusal::from_response(StatusCode::SERVICE_UNAVAILABLE, Some(b"nonsense")),
            Refusal::LinkDown
        );
    }
}
