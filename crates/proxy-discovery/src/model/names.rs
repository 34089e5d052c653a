//! Validated names and small value types used at the crate boundary.
//!
//! Each type checks its syntax once, when it is built (or deserialized), so code
//! further in never re-validates. The names the mesh shares with the wire (cluster
//! names, authorities, SPIFFE IDs) are the vocabulary crate's; these are the ones
//! only the model speaks.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

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
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix`. Host bits must be zero, and the prefix must leave room
    /// for at least two usable addresses (network and broadcast are never handed out).
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        const WHAT: &str = "CIDR";
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| InvalidName::new(WHAT, s, "must be address/prefix"))?;
        let network: IpAddr = addr
            .parse()
            .map_err(|_| InvalidName::new(WHAT, s, "address is not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| InvalidName::new(WHAT, s, "prefix is not a number"))?;
        let max = if network.is_ipv4() { 30 } else { 126 };
        if prefix > max {
            return Err(InvalidName::new(
                WHAT,
                s,
                "prefix too long: the range needs at least two usable addresses",
            ));
        }
        let cidr = Self { network, prefix };
        if cidr.bits_of(network) & cidr.host_mask() != 0 {
            return Err(InvalidName::new(WHAT, s, "host bits must be zero"));
        }
        Ok(cidr)
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn host_mask(&self) -> u128 {
        match self.network {
            IpAddr::V4(_) => u128::from(u32::MAX >> self.prefix),
            // A prefix of 0 would make this 2^128 - 1, which still fits.
            IpAddr::V6(_) => u128::MAX >> self.prefix,
        }
    }

    fn bits_of(&self, ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    /// How many addresses can be handed out: all but the network and the last
    /// (broadcast) address.
    pub fn usable(&self) -> u128 {
        self.host_mask() - 1
    }

    /// The `n`th usable address (0-based), or `None` past the end.
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        if n >= self.usable() {
            return None;
        }
        let bits = self.bits_of(self.network) + 1 + n;
        Some(match self.network {
            // `bits` stays below 2^32 because the network is IPv4 and n < usable.
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(bits).ok()?)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
        })
    }

    /// Whether `ip` is one of the usable addresses.
    pub fn contains_usable(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.network.is_ipv4() {
            return false;
        }
        let net = self.bits_of(self.network);
        let bits = self.bits_of(ip);
        bits & !self.host_mask() == net && bits != net && bits != net | self.host_mask()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
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

/// A duration written as Kubernetes and Go write them: `3s`, `500ms`, `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    /// Parses a sequence of `<integer><unit>` with units `h`, `m`, `s`, `ms`, `us`, `ns`.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        const WHAT: &str = "duration";
        let bad = || InvalidName::new(WHAT, s, "must look like 3s, 500ms or 1m30s");
        if s.is_empty() {
            return Err(bad());
        }
        let mut total = Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let part = match &rest[..unit_len] {
                "h" => n.checked_mul(3600).map(Duration::from_secs),
                "m" => n.checked_mul(60).map(Duration::from_secs),
                "s" => Some(Duration::from_secs(n)),
                "ms" => Some(Duration::from_millis(n)),
                "us" => Some(Duration::from_micros(n)),
                "ns" => Some(Duration::from_nanos(n)),
                _ => None,
            }
            .ok_or_else(bad)?;
            total = total.checked_add(part).ok_or_else(bad)?;
            rest = &rest[unit_len..];
        }
        Ok(Self(total))
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

/// Deserializes a string through `parse`, failing inside the deserializer so the
/// error carries the field path (an error made after `String::deserialize`
/// returns would be reported at the enclosing mapping).
pub(crate) fn de_str<'de, D, T, E>(d: D, parse: fn(&str) -> Result<T, E>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    E: fmt::Display,
{
    struct Parse<T, E>(fn(&str) -> Result<T, E>);
    impl<T, E: fmt::Display> serde::de::Visitor<'_> for Parse<T, E> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<Er: serde::de::Error>(self, s: &str) -> Result<T, Er> {
            (self.0)(s).map_err(Er::custom)
        }
    }
    d.deserialize_str(Parse(parse))
}

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
        for bad in ["", "3", "s", "3x", "3s5"] {
            assert!(GoDuration::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
