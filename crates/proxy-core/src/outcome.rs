//! How a connection or a tunnel stream ended: which side ended it and why.
//!
//! Every handler ends a connection with one [`Outcome`]. The close label
//! (`tcp_close_total{reason}`), the refusal count (`tunnel_refusals_total{reason}`),
//! whether the client is reset and the log line all derive from it, so they cannot
//! disagree. The label values are the ones the metrics have always exposed.
//!
//! A tunnel refusal stays a typed [`Refusal`] from the stream that received it to
//! the handler that counts it: the stream records it in a
//! [`RefusalCell`](crate::tunnel::client::RefusalCell) the handler holds, never only
//! inside an `io::Error`.

use std::fmt;

use isthmus_vocab::Refusal;

/// Which side of a proxied connection ended it; drives the reset, metric label and
/// log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client side: the application (or tunnel peer) that opened the connection.
    Downstream,
    /// The server side: the destination the proxy connected to.
    Upstream,
    /// The far end of a tunnel stream this proxy opened (a gateway or a pod's
    /// sidecar), answering for everything behind it.
    Peer,
    /// The proxy itself: its own resources (pipes, buffers) or its timers.
    Local,
    /// A decision of the proxy's configuration (routing, authorization).
    Policy,
}

impl Side {
    /// The label used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Peer => "peer",
            Side::Local => "local",
            Side::Policy => "policy",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Both directions ended cleanly.
    Eof,
    /// The side reset or aborted the connection (a TCP RST, an HTTP/2 `RST_STREAM`).
    Reset,
    /// Any other I/O error of the side.
    Error,
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// The upstream did not accept the connection within the connect timeout.
    ConnectTimeout,
    /// The upstream refused the connection or could not be reached.
    ConnectError,
    /// An HTTP/1 request head did not complete within the header read timeout.
    HeaderTimeout,
    /// The HTTP exchange failed (a protocol error, a connection cut mid-message).
    Http,
    /// The connection was not redirected: it has no original destination.
    NoOrigDst,
    /// A tunnel refusal, issued here or received from the tunnel peer.
    Refused(Refusal),
    /// Turned away before it was routed: only counted as a refusal.
    Rejected(Rejection),
}

/// Why a connection was turned away before any route was looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The listener's connection bound was reached.
    MaxConnections,
    /// A mesh connection reached a proxy that has no identity to answer it with.
    NoMeshIdentity,
    /// The mesh TLS handshake failed.
    TlsHandshake,
    /// The mesh TLS handshake did not finish within its timeout.
    TlsHandshakeTimeout,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::MaxConnections => "max_connections",
            Rejection::NoMeshIdentity => "no_mesh_identity",
            Rejection::TlsHandshake => "tls_handshake",
            Rejection::TlsHandshakeTimeout => "tls_handshake_timeout",
        }
    }
}

/// How one connection or stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Outcome {
    pub side: Side,
    pub reason: Reason,
}

impl Outcome {
    /// A clean end of both directions.
    pub const EOF: Outcome = Outcome {
        side: Side::Downstream,
        reason: Reason::Eof,
    };

    pub const fn new(side: Side, reason: Reason) -> Self {
        Self { side, reason }
    }

    /// A refusal this proxy decided.
    pub const fn refused_here(refusal: Refusal) -> Self {
        Self::new(Side::Policy, Reason::Refused(refusal))
    }

    /// A refusal the tunnel peer answered with.
    pub const fn refused_by_peer(refusal: Refusal) -> Self {
        Self::new(Side::Peer, Reason::Refused(refusal))
    }

    /// A connection turned away before routing.
    pub const fn rejected(rejection: Rejection) -> Self {
        Self::new(Side::Policy, Reason::Rejected(rejection))
    }

    /// The tunnel refusal, if this outcome is one.
    pub fn refusal(&self) -> Option<Refusal> {
        match self.reason {
            Reason::Refused(refusal) => Some(refusal),
            _ => None,
        }
    }

    /// The `tcp_close_total{reason}` value. A tunnel peer counts as the upstream
    /// of the stream this proxy opened to it.
    pub fn close_label(&self) -> &'static str {
        match (self.reason, self.side) {
            (Reason::Eof, _) => "eof",
            (Reason::Refused(refusal), _) => refusal.as_str(),
            (Reason::Rejected(rejection), _) => rejection.as_str(),
            (Reason::IdleTimeout, _) => "idle_timeout",
            (Reason::ConnectTimeout, _) => "connect_timeout",
            (Reason::ConnectError, _) => "connect_error",
            (Reason::HeaderTimeout, _) => "header_timeout",
            (Reason::Http, _) => "http_error",
            (Reason::NoOrigDst, _) => "no_orig_dst",
            (Reason::Reset | Reason::Error, Side::Policy) => "policy",
            (Reason::Reset | Reason::Error, Side::Local) => "local_error",
            (Reason::Reset, Side::Upstream | Side::Peer) => "upstream_reset",
            (Reason::Reset, Side::Downstream) => "downstream_reset",
            (Reason::Error, Side::Upstream | Side::Peer) => "upstream_error",
            (Reason::Error, Side::Downstream) => "downstream_error",
        }
    }

    /// The `tunnel_refusals_total{reason}` value, for outcomes counted as refusals.
    pub fn refusal_label(&self) -> Option<&'static str> {
        match self.reason {
            Reason::Refused(refusal) => Some(refusal.as_str()),
            Reason::Rejected(rejection) => Some(rejection.as_str()),
            _ => None,
        }
    }

    /// Whether the client is told with a reset rather than a clean close: anything
    /// but a clean end, so a cut or refused stream cannot pass for a complete one.
    /// HTTP outcomes close cleanly: hyper ended the exchange at a message boundary
    /// (or answered it) before the connection went.
    pub fn resets(&self) -> bool {
        !matches!(
            self.reason,
            Reason::Eof | Reason::Http | Reason::HeaderTimeout
        )
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Reason::Eof => f.write_str("closed cleanly"),
            Reason::Refused(refusal) => match self.side {
                Side::Peer => write!(f, "refused by the tunnel peer: {refusal}"),
                _ => write!(f, "refused: {refusal}"),
            },
            Reason::Rejected(rejection) => write!(f, "rejected: {}", rejection.as_str()),
            Reason::Reset => write!(f, "{} reset the connection", self.side),
            Reason::Error => write!(f, "{} I/O error", self.side),
            Reason::IdleTimeout => f.write_str("idle timeout"),
            Reason::ConnectTimeout => f.write_str("upstream connect timed out"),
            Reason::ConnectError => f.write_str("cannot connect to upstream"),
            Reason::HeaderTimeout => f.write_str("request head not complete in time"),
            Reason::Http => write!(f, "HTTP exchange failed ({})", self.side),
            Reason::NoOrigDst => f.write_str("no original destination"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_keep_the_exposed_values() {
        let cases = [
            (Outcome::EOF, "eof"),
            (
                Outcome::new(Side::Upstream, Reason::Reset),
                "upstream_reset",
            ),
            (Outcome::new(Side::Peer, Reason::Reset), "upstream_reset"),
            (
                Outcome::new(Side::Downstream, Reason::Reset),
                "downstream_reset",
            ),
            (
                Outcome::new(Side::Upstream, Reason::Error),
                "upstream_error",
            ),
            (
                Outcome::new(Side::Downstream, Reason::Error),
                "downstream_error",
            ),
            (Outcome::new(Side::Local, Reason::Error), "local_error"),
            (Outcome::new(Side::Policy, Reason::Error), "policy"),
            (
                Outcome::new(Side::Local, Reason::IdleTimeout),
                "idle_timeout",
            ),
            (
                Outcome::new(Side::Upstream, Reason::ConnectTimeout),
                "connect_timeout",
            ),
            (
                Outcome::new(Side::Upstream, Reason::ConnectError),
                "connect_error",
            ),
            (
                Outcome::new(Side::Downstream, Reason::HeaderTimeout),
                "header_timeout",
            ),
            (Outcome::new(Side::Downstream, Reason::Http), "http_error"),
            (
                Outcome::new(Side::Downstream, Reason::NoOrigDst),
                "no_orig_dst",
            ),
        ];
        for (outcome, label) in cases {
            assert_eq!(outcome.close_label(), label, "{outcome:?}");
            assert_eq!(outcome.refusal_label(), None, "{outcome:?}");
        }
        for refusal in Refusal::ALL {
            for outcome in [
                Outcome::refused_here(refusal),
                Outcome::refused_by_peer(refusal),
            ] {
                assert_eq!(outcome.close_label(), refusal.as_str());
                assert_eq!(outcome.refusal_label(), Some(refusal.as_str()));
                assert!(outcome.resets());
            }
        }
        assert_eq!(
            Outcome::rejected(Rejection::TlsHandshakeTimeout).refusal_label(),
            Some("tls_handshake_timeout")
        );
    }

    #[test]
    fn a_refusal_from_the_peer_is_never_blamed_on_the_client() {
        let outcome = Outcome::refused_by_peer(Refusal::LinkDown);
        assert_eq!(outcome.side, Side::Peer);
        assert!(!outcome.close_label().starts_with("downstream"));
        assert_eq!(outcome.to_string(), "refused by the tunnel peer: link_down");
    }
}
