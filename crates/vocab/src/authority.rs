//! [`Authority`]: a service's `host:port`, as a client names it and as the tunnel's
//! `:authority` carries it.
//!
//! One grammar for every crate, strict because the text arrives from the network:
//!
//! - the host is a DNS name of DNS-1123 labels (1 to 63 of `a-z`, `0-9` and `-`, not
//!   starting or ending with `-`; at most 253 bytes), an IPv4 address in dotted
//!   decimal, or an IPv6 address in brackets;
//! - a DNS name whose last label is all digits must be an IPv4 address: `127.1`,
//!   `010.0.0.1` or `999.1.1.1` are spellings resolvers disagree on, not names;
//! - the port is canonical decimal, 1 to 65535: no sign, no leading zero;
//! - letters are folded to lower case and one trailing dot of a DNS name is
//!   dropped, and an IPv6 address is kept in its canonical text, so one authority
//!   has one spelling and equal authorities compare equal.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

/// DNS names are at most 253 bytes; with a trailing dot, `:65535` and some slack.
/// Checked first, so that an attacker's megabyte is refused without being scanned.
pub const MAX_AUTHORITY_LEN: usize = 262;

/// The longest DNS name, in bytes, without trailing dot.
const MAX_DNS_NAME_LEN: usize = 253;

/// The longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// A service authority `host:port`, such as `hello.default.svc.cluster.local:80`,
/// in canonical form (see the module docs). Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Authority {
    /// `host:port`, canonical.
    text: Arc<str>,
    /// Byte offset of the `:` before the port.
    colon: u16,
    port: u16,
}

/// Why a string is not an authority. Each variant names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// No `:port` at the end.
    #[error("authority {0:?} has no port (expected host:port)")]
    MissingPort(String),
    /// The port is not canonical decimal from 1 to 65535.
    #[error("authority {0:?} has an invalid port (expected 1 to 65535, no sign or leading zero)")]
    BadPort(String),
    /// The host is not a DNS name or an IP literal.
    #[error("authority {input:?} has an invalid host: {why}")]
    BadHost {
        /// The rejected input.
        input: String,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// Longer than [`MAX_AUTHORITY_LEN`]; not quoted, it may be huge.
    #[error("authority is longer than {MAX_AUTHORITY_LEN} bytes ({0} bytes)")]
    TooLong(usize),
}

impl Authority {
    /// Parses `host:port` strictly and brings it to canonical form.
    pub fn parse(text: &str) -> Result<Self, AuthorityError> {
        if text.len() > MAX_AUTHORITY_LEN {
            return Err(AuthorityError::TooLong(text.len()));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| AuthorityError::MissingPort(text.to_owned()))?;
        let port = parse_port(port).ok_or_else(|| AuthorityError::BadPort(text.to_owned()))?;
        Self::from_host(host, port).map_err(|why| AuthorityError::BadHost {
            input: text.to_owned(),
            why,
        })
    }

    /// `host:port` from a host (a DNS name, an IPv4 address or an IPv6 address with
    /// or without brackets) and a port, checked as [`Authority::parse`] checks them.
    pub fn from_parts(host: &str, port: u16) -> Result<Self, AuthorityError> {
        let invalid = |why| AuthorityError::BadHost {
            input: format!("{host}:{port}"),
            why,
        };
        if port == 0 {
            return Err(AuthorityError::BadPort(format!("{host}:{port}")));
        }
        if host.len() > MAX_AUTHORITY_LEN {
            return Err(AuthorityError::TooLong(host.len()));
        }
        match host.parse::<Ipv6Addr>() {
            Ok(ip) => Ok(Self::build(&format!("[{ip}]"), port)),
            Err(_) => Self::from_host(host, port).map_err(invalid),
        }
    }

    fn from_host(host: &str, port: u16) -> Result<Self, &'static str> {
        if let Some(inner) = host.strip_prefix('[') {
            let ip: Ipv6Addr = inner
                .strip_suffix(']')
                .and_then(|inner| inner.parse().ok())
                .ok_or("a bracketed host must be an IPv6 address")?;
            return Ok(Self::build(&format!("[{ip}]"), port));
        }
        let name = host.strip_suffix('.').unwrap_or(host);
        check_dns_name(name)?;
        let last = name.rsplit('.').next().unwrap_or(name);
        if last.bytes().all(|b| b.is_ascii_digit()) {
            let ip: Ipv4Addr = name
                .parse()
                .map_err(|_| "a numeric host must be an IPv4 address in dotted decimal")?;
            return Ok(Self::build(&ip.to_string(), port));
        }
        Ok(Self::build(&name.to_ascii_lowercase(), port))
    }

    /// `host` is canonical and at most `MAX_AUTHORITY_LEN` bytes.
    fn build(host: &str, port: u16) -> Self {
        Self {
            text: format!("{host}:{port}").into(),
            colon: u16::try_from(host.len()).unwrap_or(u16::MAX),
            port,
        }
    }

    /// `host:port`, canonical: what the tunnel sends as `:authority`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host as a resolver or a socket takes it: a DNS name (lower case, without
    /// trailing dot) or an IP address, without brackets.
    pub fn host(&self) -> &str {
        let host = &self.text[..usize::from(self.colon)];
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }
}

/// Canonical decimal only: `u16::from_str` also takes `+80` and `080`, spellings
/// that would make two texts name one authority.
fn parse_port(port: &str) -> Option<u16> {
    let canonical =
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !port.starts_with('0');
    port.parse().ok().filter(|p| canonical && *p != 0)
}

/// A DNS name of DNS-1123 labels, either case, without trailing dot.
fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the host is empty");
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return Err("a DNS name is at most 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            return Err("every label of a DNS name is 1 to 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("a DNS name holds only letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a DNS label starts and ends with a letter or digit");
        }
    }
    Ok(())
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Authority {
    type Err = AuthorityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests;
