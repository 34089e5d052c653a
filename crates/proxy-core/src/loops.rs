//! Recognising the proxy's own connections when they come back into it.
//!
//! A proxy whose UID the capture does not exempt (`isthmus-init --proxy-uid` names
//! another user) has its own upstream connections captured and redirected to its
//! outbound listener: every forwarded connection opens another, in a chain that only
//! the connection limit ends. The proxy cannot mark its sockets for the rules to
//! skip (`SO_MARK` needs `CAP_NET_ADMIN`, which it does not have), so it remembers
//! them instead: [`connect`] records the local port of each upstream socket, and the
//! outbound listener refuses a connection whose peer is a local address at a
//! recorded port ([`OwnPorts::is_own_peer`]). A record lives as long as its
//! socket's [`OwnPort`].
//!
//! The port is the one the kernel picks inside the non-blocking `connect(2)`, read
//! right after it returns: binding to port 0 first would make the port known before
//! the SYN leaves, but takes it out of the ephemeral range for every destination
//! and not just for this one, and with the proxy closing first (its upstream sockets
//! then sit in `TIME_WAIT`) `bind` runs out of ports after about 28,000 connections
//! in a minute where `connect` keeps going. The SYN can come back and be accepted
//! before the port is recorded, so [`connect`] counts itself as in flight from just
//! before the system call until the port is recorded, and a check that finds no
//! record while a connect is in flight waits (a few microseconds, bounded by
//! [`IN_FLIGHT_WAIT`]) until it ends.
//!
//! The table is one counter per port in a static array (128 KiB, no lock, no
//! allocation): recording and forgetting are an atomic update each, and the check
//! on accept two atomic loads when nothing matches; the interface addresses are only
//! looked up for a peer at a recorded port. It is one per process, which is what a
//! loop is: a socket of this process reaching a listener of this process.
//!
//! The first refused connection of a burst is logged with the likely cause, then
//! one line per [`WARN_EVERY`] at most, counting what it did not log.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::warn;

use crate::addr::LocalAddrs;
use crate::forward::{ForwardError, Side, connect_within};

/// Set in a port's counter when a connection from it was refused as a loop; the
/// low bits count the live sockets recorded at that port.
const LOOPED: u16 = 0x8000;
const COUNT: u16 = LOOPED - 1;

/// At most one loop warning per this long: a misconfigured pod refuses every
/// connection it forwards, and the cause needs saying once, not per connection.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Longest a check waits for connects in flight to record their ports. A connect
/// records its port microseconds after its system call returns; this only bounds
/// a thread preempted in between.
pub const IN_FLIGHT_WAIT: Duration = Duration::from_millis(50);

/// The local ports of this process's live upstream sockets.
pub struct OwnPorts {
    slots: [AtomicU16; 1 << 16],
    /// Connects between their system call and the record of their port.
    in_flight: AtomicUsize,
}

static OWN_PORTS: OwnPorts = OwnPorts::new();

impl OwnPorts {
    /// An empty table. Production code uses the process's one, [`OwnPorts::shared`].
    pub const fn new() -> Self {
        Self {
            slots: [const { AtomicU16::new(0) }; 1 << 16],
            in_flight: AtomicUsize::new(0),
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
        let _ = slot.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
            (v & COUNT < COUNT).then_some(v + 1)
        });
        OwnPort { table: self, port }
    }

    /// Whether a live upstream socket of this process has local port `port`.
    pub fn contains(&self, port: u16) -> bool {
        self.slots[usize::from(port)].load(Ordering::SeqCst) & COUNT != 0
    }

    /// Whether `peer`, the far end of an accepted connection, is one of this
    /// process's own upstream sockets: a recorded port at a local address. A peer
    /// elsewhere that happens to use the same port number is not. While a connect
    /// is in flight whose port is not recorded yet, waits for it (at most
    /// [`IN_FLIGHT_WAIT`]): its SYN may be the one that came back.
    pub async fn is_own_peer(&self, peer: SocketAddr) -> bool {
        let deadline = Instant::now() + IN_FLIGHT_WAIT;
        let mut spins = 0u32;
        while !self.contains(peer.port()) {
            if self.in_flight.load(Ordering::SeqCst) == 0 || Instant::now() >= deadline {
                // A record made just before the last connect left is visible now.
                if !self.contains(peer.port()) {
                    return false;
                }
                break;
            }
            // The other connect is on another thread, between two system calls.
            if spins < 64 {
                spins += 1;
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        LocalAddrs::shared().is_local(peer.ip())
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
/// recording the socket's local port in [`OwnPorts::shared`] as soon as the kernel
/// has picked it. Keep the [`OwnPort`] as long as the stream.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, OwnPort), ForwardError> {
    let local_failure = |e| ForwardError::connect_failed(Side::Local, addr, e);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(local_failure)?;
    socket.set_nonblocking(true).map_err(local_failure)?;
    let own = start_connect(OwnPorts::shared(), &socket, addr)?;
    let socket = std::net::TcpStream::from(socket);
    let stream = TcpStream::from_std(socket).map_err(local_failure)?;
    let stream = connect_within(finish_connect(stream), addr, timeout).await?;
    Ok((stream, own))
}

/// Starts a non-blocking connect and records the port the kernel picked for it,
/// counted as in flight in between.
fn start_connect(
    table: &'static OwnPorts,
    socket: &Socket,
    addr: SocketAddr,
) -> Result<OwnPort, ForwardError> {
    table.in_flight.fetch_add(1, Ordering::SeqCst);
    let started = match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => Ok(()),
        Err(e) => Err(ForwardError::connect_failed(Side::Upstream, addr, e)),
    };
    let recorded = started.and_then(|()| {
        let local = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| io::Error::other("no local address after connect"))
            .map_err(|e| ForwardError::connect_failed(Side::Local, addr, e))?;
        Ok(table.record(local.port()))
    });
    table.in_flight.fetch_sub(1, Ordering::SeqCst);
    recorded
}

/// Waits for a non-blocking connect to finish, as `TcpStream::connect` does.
async fn finish_connect(stream: TcpStream) -> io::Result<TcpStream> {
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    // Writable without an error can still mean "not connected" on some kernels.
    stream.peer_addr()?;
    Ok(stream)
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
        assert!(OwnPorts::shared().is_own_peer(peer).await);
        let port = own.port();
        drop(own);
        assert!(
            !OwnPorts::shared()
                .is_own_peer(SocketAddr::new(peer.ip(), port))
                .await
        );
    }

    #[tokio::test]
    async fn a_remote_peer_at_a_recorded_port_is_not_ours() {
        let t = table();
        let _own = t.record(40004);
        assert!(t.is_own_peer("127.0.0.1:40004".parse().unwrap()).await);
        assert!(!t.is_own_peer("203.0.113.9:40004".parse().unwrap()).await);
    }

    /// A connection accepted while a connect is between its system call and its
    /// record is checked once the record is made, not before.
    #[tokio::test(start_paused = true)]
    async fn a_check_waits_for_a_connect_in_flight() {
        let t = table();
        let peer: SocketAddr = "127.0.0.1:40006".parse().unwrap();
        t.in_flight.fetch_add(1, Ordering::SeqCst);
        let check = tokio::spawn(async move { t.is_own_peer(peer).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            !check.is_finished(),
            "the check must wait for the connect in flight"
        );
        let _own = t.record(40006);
        t.in_flight.fetch_sub(1, Ordering::SeqCst);
        assert!(check.await.unwrap());

        // Nothing in flight, nothing recorded: answered at once.
        let started = Instant::now();
        assert!(!t.is_own_peer("127.0.0.1:40008".parse().unwrap()).await);
        assert_eq!(started.elapsed(), Duration::ZERO);

        // A connect stuck in flight delays a check by the bound at most.
        t.in_flight.fetch_add(1, Ordering::SeqCst);
        assert!(!t.is_own_peer("127.0.0.1:40008".parse().unwrap()).await);
        assert!(started.elapsed() <= IN_FLIGHT_WAIT + Duration::from_millis(2));
        t.in_flight.fetch_sub(1, Ordering::SeqCst);
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
