//! The seam between the hot path and discovery: a [`RouteLookup`] answers, for one
//! connection, whether it passes through or goes to another cluster.
//!
//! proxy-core does not know where routes come from; the proxy crate adapts the
//! discovery index to this trait, and tests hand in a fixed table.

use std::fmt;
use std::sync::Arc;

use crate::addr::OrigDstAddr;

/// A cluster's name, as ServiceMirrors and links spell it (`cluster-a`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterName(Arc<str>);

impl ClusterName {
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A service authority `host:port`, such as `hello.default.svc.cluster.local:80`.
///
/// Parsing is strict because the authority arrives from the network in the tunnel's
/// `:authority`: a host of DNS label characters (or an IP literal) and a port 1-65535.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Authority {
    text: Arc<str>,
    port: u16,
}

/// Why a string is not an authority.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("authority {0:?} has no port (expected host:port)")]
    MissingPort(String),
    #[error("authority {0:?} has an invalid port")]
    BadPort(String),
    #[error("authority {0:?} has an empty or invalid host")]
    BadHost(String),
    #[error("authority is longer than {MAX_AUTHORITY_LEN} bytes")]
    TooLong,
}

/// DNS names are at most 253 bytes; with `:65535` and brackets that leaves some slack.
const MAX_AUTHORITY_LEN: usize = 262;

impl Authority {
    pub fn parse(text: &str) -> Result<Self, AuthorityError> {
        if text.len() > MAX_AUTHORITY_LEN {
            return Err(AuthorityError::TooLong);
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| AuthorityError::MissingPort(text.to_owned()))?;
        // Digits only, without leading zeros: `u16::from_str` also takes `+80` and
        // `080`, spellings that would make two texts name one authority and throw off
        // `host()`, which finds the host by the canonical port's length.
        let canonical =
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !port.starts_with('0');
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| canonical && *p != 0)
            .ok_or_else(|| AuthorityError::BadPort(text.to_owned()))?;
        let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'))
        {
            inner.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        if !host_ok {
            return Err(AuthorityError::BadHost(text.to_owned()));
        }
        Ok(Self {
            text: text.to_ascii_lowercase().into(),
            port,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host part, without brackets for IPv6 literals.
    pub fn host(&self) -> &str {
        let host = &self.text[..self.text.len() - port_len(self.port) - 1];
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }
}

fn port_len(port: u16) -> usize {
    match port {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        1000..=9999 => 4,
        _ => 5,
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// What to do with one outbound connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Not a mirrored service: connect to the original destination as the app asked.
    Passthrough,
    /// A mirrored service: open a tunnel stream through the cluster's gateway.
    Mirrored {
        cluster: ClusterName,
        authority: Authority,
    },
}

/// Answers routes for the hot path. Implementations must not block: they are called
/// once per accepted connection on the runtime's worker threads.
pub trait RouteLookup: Send + Sync + 'static {
    /// The route for a transparently redirected connection.
    fn route_addr(&self, dst: OrigDstAddr) -> Route;
    /// The route for a name, as an explicit proxy (`CONNECT host:port`) sees it.
    fn route_authority(&self, authority: &Authority) -> Route;
}

/// A lookup that passes everything through: a sidecar with no discovery yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassthroughOnly;

impl RouteLookup for PassthroughOnly {
    fn route_addr(&self, _dst: OrigDstAddr) -> Route {
        Route::Passthrough
    }

    fn route_authority(&self, _authority: &Authority) -> Route {
        Route::Passthrough
    }
}

impl<T: RouteLookup + ?Sized> RouteLookup for Arc<T> {
    fn route_addr(&self, dst: OrigDstAddr) -> Route {
        (**self).route_addr(dst)
    }

    fn route_authority(&self, authority: &Authority) -> Route {
        (**self).route_authority(authority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_parse_strictly() {
        let a = Authority::parse("Hello.default.svc.cluster.local:80").unwrap();
        assert_eq!(a.as_str(), "hello.default.svc.cluster.local:80");
        assert_eq!(a.host(), "hello.default.svc.cluster.local");
        assert_eq!(a.port(), 80);
        let v6 = Authority::parse("[2001:2::1]:8080").unwrap();
        assert_eq!(v6.host(), "2001:2::1");
        for bad in [
            "hello",
            "hello:0",
            "hello:65536",
            ":80",
            "a..b:80",
            "a b:80",
            "[zz]:80",
            "héllo:80",
            "hello:080",
            "hello:+80",
            "hello:00080",
        ] {
            assert!(Authority::parse(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(
            Authority::parse(&"a".repeat(300)),
            Err(AuthorityError::TooLong)
        );
    }
}
