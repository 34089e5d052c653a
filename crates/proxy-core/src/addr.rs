//! Address newtypes shared across the proxy, and the original-destination lookup.
//!
//! A connection redirected by an iptables `REDIRECT` rule arrives at the proxy's
//! listener with its destination rewritten; the kernel's connection tracking still
//! knows where the client meant to go, and `SO_ORIGINAL_DST` (IPv4) or
//! `IP6T_SO_ORIGINAL_DST` (IPv6) reads it back.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

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

/// Whether `addr` is an address of this network namespace (binding to it works).
/// Used to recognise a destination that is the proxy itself.
pub fn is_local_ip(ip: std::net::IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::TcpListener::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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
