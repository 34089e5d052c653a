//! Validated names and small value types used at the crate boundary.
//!
//! Each type checks its syntax once, when it is built (or deserialized), so code
//! further in never re-validates. The names the mesh shares with the wire (cluster
//! names, authorities, SPIFFE IDs) are the vocabulary crate's; these are the ones
//! only the model speaks.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;
use isthmus_vocab::cluster::is_dns_label;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a name or value was rejected. The caller adds where (file, field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is invalid: {why}")]
pub struct InvalidName {
    what: &'static str,
    value: String,
    why: &'static str,
}

impl InvalidName {
    fn new(what: &'static str, value: &str, why: &'static str) -> Self {
        Self {
            what,
            value: value.to_owned(),
            why,
        }
    }
}

/// Checks a DNS-1123 label: 1..=63 of `[a-z0-9-]`, alphanumeric at both ends.
/// Kubernetes namespaces and most object names follow it, as cluster names do:
/// the rule is the vocabulary's, this adds which part of it `s` breaks.
pub fn check_dns_label(what: &'static str, s: &str) -> Result<(), InvalidName> {
    if is_dns_label(s) {
        return Ok(());
    }
    let why = if s.is_empty() || s.len() > 63 {
        "must be 1 to 63 characters"
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        "only lowercase letters, digits and '-' are allowed"
    } else {
        "must start and end with a letter or digit"
    };
    Err(InvalidName::new(what, s, why))
}

/// Checks a DNS-1123 subdomain: dot-separated DNS-1123 labels, at most 253 bytes.
pub fn check_dns_subdomain(what: &'static str, s: &str) -> Result<(), InvalidName> {
    if s.is_empty() || s.len() > 253 {
        return Err(InvalidName::new(what, s, "must be 1 to 253 characters"));
    }
    for label in s.split('.') {
        check_dns_label(what, label).map_err(|_| {
            InvalidName::new(
                what,
                s,
                "must be dot-separated labels of lowercase letters, digits and '-'",
            )
        })?;
    }
    Ok(())
}

/// A namespaced reference to a Service (`namespace/name`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceRef {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
}

impl ServiceRef {
    /// A reference to `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An IP prefix such as `10.96.0.0/12` or `fd00:10:96::/108`, with host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(IpNet);

impl Cidr {
    /// Parses `addr/prefix`. Host bits must be zero, and the prefix must leave room
    /// for at least two usable addresses (network and broadcast are never handed out).
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        const WHAT: &str = "CIDR";
        let net: IpNet = s.parse().map_err(|_| {
            InvalidName::new(
                WHAT,
                s,
                "must be an IP address and a prefix length, address/prefix",
            )
        })?;
        let max = match net {
            IpNet::V4(_) => 30,
            IpNet::V6(_) => 126,
        };
        if net.prefix_len() > max {
            return Err(InvalidName::new(
                WHAT,
                s,
                "prefix too long: the range needs at least two usable addresses",
            ));
        }
        if net.trunc() != net {
            return Err(InvalidName::new(WHAT, s, "host bits must be zero"));
        }
        Ok(Self(net))
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.0.network()
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.0.prefix_len()
    }

    fn bits_of(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    /// How many addresses can be handed out: all but the network and the last
    /// (broadcast) address.
    pub fn usable(&self) -> u128 {
        Self::bits_of(self.0.hostmask()) - 1
    }

    /// The `n`th usable address (0-based), or `None` past the end.
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        if n >= self.usable() {
            return None;
        }
        let bits = Self::bits_of(self.network()) + 1 + n;
        Some(match self.0 {
            // `bits` stays below 2^32 because the network is IPv4 and n < usable.
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(bits).ok()?)),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
        })
    }

    /// Whether `ip` is one of the usable addresses.
    pub fn contains_usable(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip) && ip != self.0.network() && ip != self.0.broadcast()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, Self::parse)
    }
}

/// A duration, written in the one grammar every duration the mesh reads uses
/// (flags, manifests): jiff's friendly format, so `3s`, `500ms` and `1m30s` as
/// Kubernetes and Go write them, and also `1.5h`, `28d` or `2 hours 30 minutes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    /// Parses jiff's friendly format. Days are 24 hours and weeks 7 days; years
    /// and months, whose length depends on a date, and negative durations are
    /// refused.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        const WHAT: &str = "duration";
        static PARSER: jiff::fmt::friendly::SpanParser = jiff::fmt::friendly::SpanParser::new();
        let span = PARSER.parse_span(s).map_err(|_| {
            InvalidName::new(
                WHAT,
                s,
                "must be numbers with units, like 3s, 500ms, 1m30s or 28d",
            )
        })?;
        if span.is_negative() {
            return Err(InvalidName::new(WHAT, s, "must not be negative"));
        }
        let exact = span
            .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
            .map_err(|_| {
                InvalidName::new(
                    WHAT,
                    s,
                    "years and months are units of no fixed length: use days",
                )
            })?;
        Duration::try_from(exact)
            .map(Self)
            .map_err(|_| InvalidName::new(WHAT, s, "must not be negative"))
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}ns", d.as_nanos())
        }
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, Self::parse)
    }
}

pub(crate) use isthmus_vocab::de_str;

/// Deserializes a port given as a number or as a numeric string (linkerd's `Link`
/// writes `gatewayPort: "4143"`), rejecting 0.
///
/// A visitor rather than an untagged enum: untagged buffering would lose the field
/// path in error messages.
pub(crate) fn de_port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    d.deserialize_any(PortOrName { allow_name: false })
        .and_then(|p| match p {
            PortValue::Number(n) => Ok(n),
            PortValue::Name(_) => Err(serde::de::Error::custom(PORT_EXPECTED)),
        })
}

const PORT_EXPECTED: &str = "port must be a number from 1 to 65535";

/// A port number, or (when allowed) a port name.
pub(crate) enum PortValue {
    Number(u16),
    Name(String),
}

/// Visits an integer, a numeric string or (if `allow_name`) a DNS-label port name.
pub(crate) struct PortOrName {
    pub(crate) allow_name: bool,
}

impl PortOrName {
    fn expected(&self) -> &'static str {
        if self.allow_name {
            "a port number from 1 to 65535 or a port name"
        } else {
            PORT_EXPECTED
        }
    }
}

impl serde::de::Visitor<'_> for PortOrName {
    type Value = PortValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expected())
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<PortValue, E> {
        u16::try_from(n)
            .ok()
            .filter(|n| *n != 0)
            .map(PortValue::Number)
            .ok_or_else(|| E::custom(self.expected()))
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<PortValue, E> {
        u64::try_from(n)
            .map_err(|_| E::custom(self.expected()))
            .and_then(|n| self.visit_u64(n))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PortValue, E> {
        if let Ok(n) = s.trim().parse::<u64>() {
            return self.visit_u64(n);
        }
        if self.allow_name && check_dns_label("port name", s).is_ok() && s.len() <= 15 {
            return Ok(PortValue::Name(s.to_owned()));
        }
        Err(E::custom(self.expected()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.96.0.0/12").unwrap();
        assert_eq!(c.usable(), (1 << 20) - 2);
        assert_eq!(c.nth(0), Some("10.96.0.1".parse().unwrap()));
        assert_eq!(
            c.nth(c.usable() - 1),
            Some("10.111.255.254".parse().unwrap())
        );
        assert_eq!(c.nth(c.usable()), None);
        assert!(c.contains_usable("10.100.1.1".parse().unwrap()));
        assert!(!c.contains_usable("10.96.0.0".parse().unwrap()));
        assert!(!c.contains_usable("10.111.255.255".parse().unwrap()));
        assert!(!c.contains_usable("10.112.0.1".parse().unwrap()));
        assert!(!c.contains_usable("::1".parse().unwrap()));
        let v6 = Cidr::parse("2001:2::/112").unwrap();
        assert_eq!(v6.nth(0), Some("2001:2::1".parse().unwrap()));
        assert!(Cidr::parse("::/0").unwrap().usable() > 0);
        for bad in [
            "10.96.0.1/12",
            "10.0.0.0/31",
            "10.0.0.0",
            "x/8",
            "10.0.0.0/x",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(GoDuration::parse("3s").unwrap().0, Duration::from_secs(3));
        assert_eq!(
            GoDuration::parse("1m30s").unwrap().0,
            Duration::from_secs(90)
        );
        assert_eq!(
            GoDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(GoDuration::parse("250ms").unwrap().to_string(), "250ms");
        // The spellings jiff's friendly format adds to Go's.
        for (text, secs) in [
            ("1h0m0s", 3600),
            ("28d", 28 * 86_400),
            ("1w", 7 * 86_400),
            ("2 hours 30 minutes", 9000),
            ("1.5h", 5400),
        ] {
            assert_eq!(GoDuration::parse(text).unwrap().0.as_secs(), secs, "{text}");
        }
        assert_eq!(
            GoDuration::parse("1.5s").unwrap().0,
            Duration::from_millis(1500)
        );
        for bad in [
            "", "3", "s", "3x", "3s5", "-1s", "1s ago", "1mo", "1y", "PT1S",
        ] {
            assert!(GoDuration::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
