//! Recognising the proxy's own connections when they come back into it.
//!
//! A proxy whose UID the capture does not exempt (`isthmus-init --proxy-uid` names
//! another user) has its own upstream connections captured and redirected to its
//! outbound listener: every forwarded connection opens another, in a chain that only
//! the connection limit ends. The proxy cannot mark its sockets for the rules to
//! skip (`SO_MARK` needs `CAP_NET_ADMIN`, which it does not have), so it remembers
//! them instead: [`connect`] binds each upstream socket to an ephemeral port and
//! records the port before the SYN leaves, and the outbound listener refuses a
//! connection whose peer is a local address at a recorded port
//! ([`OwnPorts::is_own_peer`]). A record lives as long as its socket's [`OwnPort`].
//!
//! The table is one counter per port in a static array (128 KiB, no lock, no
//! allocation): recording and forgetting are an atomic add each, the check on accept
//! an atomic load, and an interface lookup only for a peer at a recorded port. It is
//! one per process, which is what a loop is: a socket of this process reaching a
//! listener of this process.
//!
//! Binding before connecting takes a port out of the ephemeral range for every
//! destination at once, where `connect` alone could reuse it towards different
//! destinations; the proxy's upstream sockets share one range (about 28,000 ports
//! by default, `net.ipv4.ip_local_port_range`), which bounds its concurrent upstream
//! connections per pod, not per destination.
//!
//! The first refused connection of a burst is logged with the likely cause, then
//! one line per [`WARN_EVERY`] at most, counting what it did not log.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tracing::warn;

use crate::addr::LocalAddrs;
use crate::forward::{ForwardError, Side, connect_socket};

/// Set in a port's counter when a connection from it was refused as a loop; the
/// low bits count the live sockets recorded at that port.
const LOOPED: u16 = 0x8000;
const COUNT: u16 = LOOPED - 1;

/// At most one loop warning per this long: a misconfigured pod refuses every
/// connection it forwards, and the cause needs saying once, not per connection.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// The local ports of this process's live upstream sockets.
pub struct OwnPorts {
    slots: [AtomicU16; 1 << 16],
}

static OWN_PORTS: OwnPorts = OwnPorts::new();

impl OwnPorts {
    /// An empty table. Production code uses the process's one, [`OwnPorts::shared`].
    pub const fn new() -> Self {
        Self {
            slots: [const { AtomicU16::new(0) }; 1 << 16],
        }
    }

    /// The process's table, which [`connect`] records into.
    pub fn shared() -> &'static OwnPorts {
        &OWN_PORTS
    }

    /// Records `port` as an upstream socket's until the returned guard drops.
    pub fn record(&'static self, port: u16) -> OwnPort {
        let slot = &self.slots[usize::from(port)];
        // Saturating: a count can only be that high if sockets share ports, and
        // then an undercount on release is harmless beside a wrapped counter.
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v & COUNT < COUNT).then_some(v + 1)
        });
        OwnPort { table: self, port }
    }

    /// Whether a live upstream socket of this process has local port `port`.
    pub fn contains(&self, port: u16) -> bool {
        self.slots[usize::from(port)].load(Ordering::Acquire) & COUNT != 0
    }

    /// Whether `peer`, the far end of an accepted connection, is one of this
    /// process's own upstream sockets: a recorded port at a local address. A peer
    /// elsewhere that happens to use the same port number is not.
    pub fn is_own_peer(&self, peer: SocketAddr) -> bool {
        self.contains(peer.port()) && LocalAddrs::shared().is_local(peer.ip())
    }

    /// Notes that a connection from `port` was refused as a loop, so the socket's
    /// owner can say why its upstream failed ([`OwnPort::looped`]).
    pub fn mark_looped(&self, port: u16) {
        let slot = &self.slots[usize::from(port)];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v & COUNT != 0).then_some(v | LOOPED)
        });
    }
}

impl Default for OwnPorts {
    fn default() -> Self {
        Self::new()
    }
}

/// A recorded upstream port; dropping it forgets the port.
#[derive(Debug)]
pub struct OwnPort {
    table: &'static OwnPorts,
    port: u16,
}

impl std::fmt::Debug for OwnPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnPorts")
    }
}

impl OwnPort {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether a connection from this socket came back into the proxy and was
    /// refused as a loop.
    pub fn looped(&self) -> bool {
        self.table.slots[usize::from(self.port)].load(Ordering::Acquire) & LOOPED != 0
    }
}

impl Drop for OwnPort {
    fn drop(&mut self) {
        let slot = &self.table.slots[usize::from(self.port)];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            // The last socket at this port takes the loop mark along.
            Some(if v & COUNT <= 1 { 0 } else { v - 1 })
        });
    }
}

/// Connects to `addr` within `timeout` like [`crate::forward::connect_upstream`],
/// from a socket bound to an ephemeral port that [`OwnPorts::shared`] records
/// before the connection attempt starts. Keep the [`OwnPort`] as long as the stream.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, OwnPort), ForwardError> {
    let local_failure = |e| ForwardError::connect_failed(Side::Local, addr, e);
    let (socket, any) = match addr {
        SocketAddr::V4(_) => (TcpSocket::new_v4(), IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        SocketAddr::V6(_) => (TcpSocket::new_v6(), IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    };
    let socket = socket.map_err(local_failure)?;
    socket
        .bind(SocketAddr::new(any, 0))
        .map_err(local_failure)?;
    let port = socket.local_addr().map_err(local_failure)?.port();
    let own = OwnPorts::shared().record(port);
    let stream = connect_socket(socket, addr, timeout).await?;
    Ok((stream, own))
}

/// Logs a refused loop with its likely cause, at most once per [`WARN_EVERY`].
#[derive(Debug, Default)]
pub struct LoopWarning {
    last: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
}

impl LoopWarning {
    /// The process's one warning, shared by every listener.
    pub fn shared() -> &'static LoopWarning {
        static SHARED: LoopWarning = LoopWarning {
            last: Mutex::new(None),
            unlogged: AtomicU64::new(0),
        };
        &SHARED
    }

    /// Called for every connection from the proxy's own upstream socket that was
    /// refused; logs the first of a burst and then one per [`WARN_EVERY`].
    /// Returns whether it logged.
    pub fn refused(&self, client: SocketAddr, dst: Option<SocketAddr>) -> bool {
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            match *last {
                Some(at) if at.elapsed() < WARN_EVERY => {
                    self.unlogged.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                _ => *last = Some(Instant::now()),
            }
        }
        let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
        let uid = nix::unistd::geteuid().as_raw();
        warn!(
            %client,
            dst = ?dst,
            unlogged_since_last_warning = unlogged,
            "refused a connection from this proxy's own upstream socket (loop): \
             the capture does not exempt this proxy's UID {uid} (isthmus-init --proxy-uid)"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> &'static OwnPorts {
        Box::leak(Box::default())
    }

    #[test]
    fn a_port_is_recorded_while_its_guard_lives() {
        let t = table();
        assert!(!t.contains(40000));
        let a = t.record(40000);
        let b = t.record(40000);
        assert!(t.contains(40000) && !t.contains(40001));
        drop(a);
        assert!(t.contains(40000), "a second socket still holds it");
        drop(b);
        assert!(!t.contains(40000));
    }

    #[test]
    fn the_loop_mark_is_seen_by_the_owner_and_goes_with_the_last_socket() {
        let t = table();
        t.mark_looped(40002);
        assert!(
            !t.contains(40002),
            "marking an unrecorded port records nothing"
        );
        let own = t.record(40002);
        assert!(!own.looped());
        t.mark_looped(40002);
        assert!(own.looped() && t.contains(40002));
        drop(own);
        let again = t.record(40002);
        assert!(!again.looped(), "a new socket at the port starts clean");
    }

    #[tokio::test]
    async fn connect_records_the_port_before_the_peer_accepts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stream, own) = connect(addr, Duration::from_secs(5)).await.unwrap();
        let (_server, peer) = listener.accept().await.unwrap();
        assert_eq!(stream.local_addr().unwrap().port(), own.port());
        assert_eq!(peer.port(), own.port());
        assert!(OwnPorts::shared().is_own_peer(peer));
        let port = own.port();
        drop(own);
        assert!(!OwnPorts::shared().is_own_peer(SocketAddr::new(peer.ip(), port)));
    }

    #[test]
    fn a_remote_peer_at_a_recorded_port_is_not_ours() {
        let t = table();
        let _own = t.record(40004);
        assert!(t.is_own_peer("127.0.0.1:40004".parse().unwrap()));
        assert!(!t.is_own_peer("203.0.113.9:40004".parse().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_warning_is_rate_limited() {
        let w = LoopWarning::default();
        let client: SocketAddr = "198.18.0.2:40000".parse().unwrap();
        assert!(w.refused(client, None));
        for _ in 0..100 {
            assert!(!w.refused(client, None));
        }
        tokio::time::advance(WARN_EVERY).await;
        assert!(w.refused(client, None));
        assert_eq!(w.unlogged.load(Ordering::Relaxed), 0);
    }
}
