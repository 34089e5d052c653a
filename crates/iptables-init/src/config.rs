//! The typed, validated configuration of one `isthmus-init` run, and the parsers for
//! the values users type: port lists with ranges (`25,3306,8000-8100`) and CIDRs.
//!
//! Parsing happens before anything touches the kernel: a [`Config`] that exists is
//! one the rule renderer can turn into rules without further checks. This module
//! does not know about flags or environment variables (the binary maps those), nor
//! about iptables syntax (that is [`crate::rules`]).
//!
//! A CIDR with host bits set (`10.0.0.1/8`) is refused rather than silently
//! normalised: it is usually a typo for a host address or for a different prefix, and
//! guessing which would capture (or leak) traffic the user did not mean to. A bare
//! address (`10.0.0.1`) is accepted as the host route `/32` (`/128` for IPv6).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use isthmus_vocab::ports::{
    DEFAULT_ADMIN_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, PROXY_UID,
};

/// Inbound ports left alone by default, as typed on the command line: the proxy's
/// admin port ([`DEFAULT_ADMIN_PORT`]), so that probes and scrapes reach it directly.
pub const DEFAULT_SKIP_INBOUND_PORTS: &str = "4191";

/// A value a user typed that does not parse. `Display` names the value and what is
/// wrong with it; the caller adds which flag it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("port {value:?} is not a number between 1 and 65535")]
    Port { value: String },
    #[error(
        "port range {value:?} is malformed: expected FIRST-LAST with FIRST <= LAST, each 1-65535"
    )]
    PortRange { value: String },
    #[error("port list {value:?} has an empty entry")]
    EmptyEntry { value: String },
    #[error("{value:?} is not an IPv4 or IPv6 address or CIDR")]
    Address { value: String },
    #[error("prefix length in {value:?} must be a number from 0 to {max}")]
    Prefix { value: String, max: u8 },
    #[error("{value:?} has host bits set; the network is {network}")]
    HostBits { value: String, network: Cidr },
}

/// A combination of valid values that cannot work together. `Display` names the flags.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--outbound-port and --inbound-port are both {port}: they must differ")]
    SamePorts { port: u16 },
    #[error("--{flag} has the IPv6 subnet {cidr} but --ipv6 is not set")]
    Ipv6WithoutFlag { flag: &'static str, cidr: Cidr },
}

/// An inclusive range of TCP ports; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// A range of the ports `first..=last`; `None` if `first` is 0 or above `last`.
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first != 0 && first <= last).then_some(Self { first, last })
    }

    /// The one-port range `port..=port`; `None` for port 0.
    pub fn single(port: u16) -> Option<Self> {
        Self::new(port, port)
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A list of ports and port ranges such as `25,3306,8000-8100`. The empty string is
/// the empty list, so a default list can be switched off with `--flag ''`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortList(Vec<PortRange>);

impl PortList {
    pub fn new(ranges: Vec<PortRange>) -> Self {
        Self(ranges)
    }

    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }
}

impl FromStr for PortList {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let mut ranges = Vec::new();
        for item in s.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(ParseError::EmptyEntry {
                    value: s.to_owned(),
                });
            }
            let range = match item.split_once('-') {
                None => PortRange::single(parse_port(item)?),
                Some((first, last)) => {
                    let bad = || ParseError::PortRange {
                        value: item.to_owned(),
                    };
                    let first = parse_port(first.trim()).map_err(|_| bad())?;
                    let last = parse_port(last.trim()).map_err(|_| bad())?;
                    Some(PortRange::new(first, last).ok_or_else(bad)?)
                }
            };
            ranges.push(range.ok_or_else(|| ParseError::Port {
                value: item.to_owned(),
            })?);
        }
        Ok(Self(ranges))
    }
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{range}")?;
        }
        Ok(())
    }
}

/// Parses a TCP port, 1 to 65535 (0 is not a port a connection can target).
pub fn parse_port(s: &str) -> Result<u16, ParseError> {
    match s.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(ParseError::Port {
            value: s.to_owned(),
        }),
    }
}

/// An address family, for the rules of `iptables` (V4) or `ip6tables` (V6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An IPv4 or IPv6 network: an address with no host bits set, and a prefix length
/// valid for its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network `addr/prefix`; `None` if the prefix is too long for the family or
    /// `addr` has host bits set.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let cidr = Self { addr, prefix };
        (prefix <= max_prefix(addr) && cidr.network_of(addr) == addr).then_some(cidr)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Whether `ip` lies inside this network (false for the other family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                self.network_of(ip) == self.addr
            }
            _ => false,
        }
    }

    fn network_of(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl FromStr for Cidr {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad_addr = || ParseError::Address {
            value: s.to_owned(),
        };
        let (addr, prefix) = match s.split_once('/') {
            None => {
                let addr: IpAddr = s.parse().map_err(|_| bad_addr())?;
                (addr, max_prefix(addr))
            }
            Some((addr, prefix)) => {
                let addr: IpAddr = addr.parse().map_err(|_| bad_addr())?;
                let max = max_prefix(addr);
                let prefix = prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max && !prefix.starts_with('+'))
                    .ok_or_else(|| ParseError::Prefix {
                        value: s.to_owned(),
                        max,
                    })?;
                (addr, prefix)
            }
        };
        Cidr::new(addr, prefix).ok_or_else(|| {
            let network = Cidr { addr, prefix };
            ParseError::HostBits {
                value: s.to_owned(),
                network: Cidr {
                    addr: network.network_of(addr),
                    prefix,
                },
            }
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses a comma-separated list of CIDRs; the empty string is the empty list.
pub fn parse_cidr_list(s: &str) -> Result<Vec<Cidr>, ParseError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(str::trim)
        .map(|item| {
            if item.is_empty() {
                Err(ParseError::EmptyEntry {
                    value: s.to_owned(),
                })
            } else {
                item.parse()
            }
        })
        .collect()
}

/// Which iptables implementation to program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    /// The one that already holds rules on this host (nft if neither does).
    #[default]
    Auto,
    /// `iptables-nft` (the nf_tables kernel API).
    Nft,
    /// `iptables-legacy` (the x_tables kernel API).
    Legacy,
}

/// Everything one run needs to render and apply the capture rules.
///
/// Build it with [`Config::default`] and struct update syntax, then call
/// [`Config::validate`]; the binary does the same from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Connections opened by this UID (the proxy's own) are not captured.
    pub proxy_uid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Destination ports of arriving TCP that reach the pod directly.
    pub skip_inbound_ports: PortList,
    /// Destination ports of outgoing TCP that are not captured.
    pub skip_outbound_ports: PortList,
    /// Destination networks of outgoing TCP that are not captured; wins over
    /// `include_outbound_subnets`.
    pub skip_outbound_subnets: Vec<Cidr>,
    /// If not empty, only outgoing TCP to these networks is captured, per family: a
    /// family with no network in the list has no outbound capture.
    pub include_outbound_subnets: Vec<Cidr>,
    /// Also program `ip6tables`.
    pub ipv6: bool,
    pub backend: BackendChoice,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proxy_uid: PROXY_UID,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            skip_inbound_ports: PortList(vec![
                PortRange::single(DEFAULT_ADMIN_PORT).expect("the admin port is not 0"),
            ]),
            skip_outbound_ports: PortList::default(),
            skip_outbound_subnets: Vec::new(),
            include_outbound_subnets: Vec::new(),
            ipv6: false,
            backend: BackendChoice::Auto,
        }
    }
}

impl Config {
    /// Checks what single values cannot: that the values fit together.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.outbound_port == self.inbound_port {
            return Err(ConfigError::SamePorts {
                port: self.outbound_port,
            });
        }
        if !self.ipv6 {
            for (flag, list) in [
                ("skip-outbound-subnets", &self.skip_outbound_subnets),
                ("include-outbound-subnets", &self.include_outbound_subnets),
            ] {
                if let Some(cidr) = list.iter().find(|c| c.family() == Family::V6) {
                    return Err(ConfigError::Ipv6WithoutFlag { flag, cidr: *cidr });
                }
            }
        }
        Ok(self)
    }

    /// The families this run programs, IPv4 first.
    pub fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }
}

#[cfg(test)]
mod tests;
