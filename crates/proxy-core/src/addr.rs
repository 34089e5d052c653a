//! Address newtypes shared across the proxy, and the original-destination lookup.
//!
//! A connection redirected by an iptables `REDIRECT` rule arrives at the proxy's
//! listener with its destination rewritten; the kernel's connection tracking still
//! knows where the client meant to go, and `SO_ORIGINAL_DST` (IPv4) or
//! `IP6T_SO_ORIGINAL_DST` (IPv6) reads it back.
//!
//! [`LocalAddrs`] knows the namespace's own addresses, so a destination can be
//! recognised as the proxy itself even when its listeners are bound to wildcards.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use nix::sys::socket::{getsockopt, sockopt};

/// The address of the peer that opened a connection to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The address a redirected client meant to reach, before iptables rewrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Reads the original destination of an accepted, redirected socket.
///
/// The socket's own local address decides the family: an IPv4 socket is asked
/// with `SO_ORIGINAL_DST`, an IPv6 one with `IP6T_SO_ORIGINAL_DST`. A socket that was
/// not redirected gets an error (`ENOENT` from the kernel): callers decide whether
/// that means "use the local address" or "refuse".
pub fn orig_dst<S: AsFd>(socket: &S, local: SocketAddr) -> io::Result<OrigDstAddr> {
    let addr = match local {
        SocketAddr::V4(_) => {
            let sin = getsockopt(socket, sockopt::OriginalDst)?;
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        SocketAddr::V6(_) => {
            let sin6 = getsockopt(socket, sockopt::Ip6tOriginalDst)?;
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            ))
        }
    };
    Ok(OrigDstAddr(addr))
}

/// Where the original destination of an accepted connection comes from: the kernel
/// in production, a fixed table in in-process tests (no iptables needed).
pub trait OrigDst: Send + Sync + 'static {
    fn orig_dst(
        &self,
        stream: &tokio::net::TcpStream,
        local: SocketAddr,
    ) -> io::Result<OrigDstAddr>;
}

/// Reads `SO_ORIGINAL_DST` from the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOrigDst;

impl OrigDst for KernelOrigDst {
    fn orig_dst(
        &self,
        stream: &tokio::net::TcpStream,
        local: SocketAddr,
    ) -> io::Result<OrigDstAddr> {
        orig_dst(stream, local)
    }
}

/// Always answers the same destination: for tests that run without iptables.
#[derive(Clone, Copy, Debug)]
pub struct FixedOrigDst(pub SocketAddr);

impl OrigDst for FixedOrigDst {
    fn orig_dst(
        &self,
        _stream: &tokio::net::TcpStream,
        _local: SocketAddr,
    ) -> io::Result<OrigDstAddr> {
        Ok(OrigDstAddr(self.0))
    }
}

/// Whether `ip` is an address of this network namespace: loopback, unspecified, or
/// held by one of its interfaces (see [`LocalAddrs`]). Used to recognise a
/// destination that is the proxy itself.
pub fn is_local_ip(ip: IpAddr) -> bool {
    LocalAddrs::shared().is_local(ip)
}

/// How old the list of interface addresses may be before a miss reads it again: an
/// address added to an interface counts as local within this long, and a stream of
/// misses (remote peers, the usual case) costs at most one read per interval.
const LOCAL_ADDRS_REFRESH: Duration = Duration::from_secs(1);

/// The addresses of this network namespace's interfaces, read with `getifaddrs(3)`
/// and read again on a miss once the list is older than a second.
///
/// It answers "is this endpoint me?" where a listener's own address cannot: a
/// listener bound to `0.0.0.0:4143` is reached at every address of the namespace
/// (its pod or host IPs, loopback), and comparing an endpoint with the wildcard
/// finds nothing. Callers test the port first, so a lookup is rare.
#[derive(Debug, Default)]
pub struct LocalAddrs {
    read: Mutex<Option<(Instant, HashSet<IpAddr>)>>,
}

impl LocalAddrs {
    /// The process's one instance: a process lives in one network namespace.
    pub fn shared() -> &'static LocalAddrs {
        static SHARED: OnceLock<LocalAddrs> = OnceLock::new();
        SHARED.get_or_init(LocalAddrs::default)
    }

    /// Whether `addr` reaches one of this namespace's listeners on `ports`: its port
    /// is one of them and its IP is local ([`LocalAddrs::is_local`]).
    ///
    /// A gateway or sidecar whose listeners are bound to wildcards passes their
    /// ports; an endpoint or original destination for which this holds would come
    /// back into the proxy.
    pub fn is_own(&self, addr: SocketAddr, ports: impl IntoIterator<Item = u16>) -> bool {
        ports.into_iter().any(|p| p == addr.port()) && self.is_local(addr.ip())
    }

    /// Whether a connection to `ip` would stay on this host, whatever the port:
    /// [`LocalAddrs::is_local`], or link-local (169.254.0.0/16, fe80::/10), where
    /// node-local agents and metadata services answer.
    ///
    /// A gateway refuses such an endpoint outright: it would reach the gateway's own
    /// admin server or a neighbour on its host, never a pod of an exported Service.
    pub fn is_this_host(&self, ip: IpAddr) -> bool {
        let link_local = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        link_local || self.is_local(ip)
    }

    /// Whether `ip` is loopback, unspecified (which connects to this host), or an
    /// address of one of this namespace's interfaces. An IPv4-mapped IPv6 address
    /// counts as its IPv4 address.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
        let mut read = self.read.lock().unwrap_or_else(|p| p.into_inner());
        match &*read {
            Some((_, addrs)) if addrs.contains(&ip) => return true,
            Some((at, _)) if at.elapsed() < LOCAL_ADDRS_REFRESH => return false,
            _ => {}
        }
        // Unreadable interfaces leave the list empty: the check then only knows
        // loopback, as it did before it read any list.
        let addrs = interface_addrs().unwrap_or_default();
        let found = addrs.contains(&ip);
        *read = Some((Instant::now(), addrs));
        found
    }
}

fn interface_addrs() -> nix::Result<HashSet<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port_of(listeners: &[&str]) -> Vec<u16> {
        listeners
            .iter()
            .map(|l| l.parse::<SocketAddr>().unwrap().port())
            .collect()
    }

    /// The gateway's default listeners are wildcards: an endpoint at any of the
    /// host's addresses and a listener port is the gateway itself.
    #[test]
    fn wildcard_listeners_are_reached_at_every_local_address() {
        let local = LocalAddrs::default();
        let ports = port_of(&["0.0.0.0:4143", "[::]:4191"]);
        let own_ips: Vec<IpAddr> = interface_addrs().unwrap().into_iter().collect();
        assert!(
            own_ips.iter().any(|ip| !ip.is_loopback()),
            "this test needs an interface address other than loopback: {own_ips:?}"
        );
        for ip in own_ips.iter().copied().chain([
            "127.0.0.1".parse().unwrap(),
            "127.0.0.53".parse().unwrap(),
            "::1".parse().unwrap(),
            "0.0.0.0".parse().unwrap(),
            "::ffff:127.0.0.1".parse().unwrap(),
        ]) {
            for port in [4143, 4191] {
                let addr = SocketAddr::new(ip, port);
                assert!(
                    local.is_own(addr, ports.iter().copied()),
                    "{addr} is the gateway"
                );
            }
            let other = SocketAddr::new(ip, 8080);
            assert!(
                !local.is_own(other, ports.iter().copied()),
                "{other} is not a listener port"
            );
        }
        // An address of this namespace in its IPv4-mapped spelling is still ours.
        if let Some(IpAddr::V4(v4)) = own_ips.iter().find(|ip| ip.is_ipv4()) {
            let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), 4143);
            assert!(local.is_own(mapped, ports.iter().copied()), "{mapped}");
        }
        // Addresses no interface here holds (TEST-NET-3, documentation prefix).
        for remote in [
            "203.0.113.7:4143",
            "[2001:db8::7]:4143",
            "[::ffff:203.0.113.7]:4143",
        ] {
            let addr: SocketAddr = remote.parse().unwrap();
            assert!(
                !local.is_own(addr, ports.iter().copied()),
                "{addr} is remote"
            );
        }
    }

    #[tokio::test]
    async fn unredirected_socket_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Without a REDIRECT rule conntrack holds no NAT mapping, which the kernel
        // reports as an error rather than echoing the local address.
        let got = orig_dst(&server, server.local_addr().unwrap());
        assert!(got.is_err(), "expected an error, got {got:?}");
    }
}
