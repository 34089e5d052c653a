//! Recognising the proxy's own connections when they come back into it.
//!
//! A proxy whose UID the capture does not exempt (`isthmus-init --proxy-uid` names
//! another user) has its own upstream connections captured and redirected to its
//! outbound listener: every forwarded connection opens another, in a chain that only
//! the connection limit ends. The proxy cannot mark its sockets for the rules to
//! skip (`SO_MARK` needs `CAP_NET_ADMIN`, which it does not have), so it remembers
//! them instead: [`connect`] records each upstream socket's local address and its
//! destination, and the outbound listener refuses a connection whose peer and
//! original destination are those of a recorded socket
//! ([`OwnSockets::is_own_upstream`]). A record lives as long as its socket's
//! [`OwnSocket`].
//!
//! The pair is exact where a port alone is not: the kernel gives the same local
//! port to connections towards different destinations, so an application's
//! connection can share a port with one of the proxy's; it cannot share address,
//! port and destination (that is one TCP connection). The port is the one the kernel
//! picks inside the non-blocking `connect(2)`, read right after it returns. Binding
//! to port 0 first would make it known before the SYN leaves, but takes the port
//! from the ephemeral range for every destination, and with the proxy closing first
//! (its upstream sockets then sit in `TIME_WAIT`) `bind` ran out of ports after
//! about 28,000 connections in a minute where `connect` goes on. The SYN can come
//! back and be accepted before the record is made, so [`connect`] counts itself as
//! in flight from just before the system call until the record is made, and a check
//! that finds no record while a connect is in flight waits for it (microseconds,
//! bounded by [`IN_FLIGHT_WAIT`]).
//!
//! The check on accept is two atomic loads when no live upstream socket has the
//! peer's port (a counter per port in a static array, 128 KiB): an application's
//! connection pays nothing more unless the ports collide, and then one look into a
//! small locked shard. It is one table per process, which is what a loop is: a
//! socket of this process reaching a listener of this process.
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

use crate::forward::{ForwardError, Side, connect_within};

/// At most one loop warning per this long: a misconfigured pod refuses every
/// connection it forwards, and the cause needs saying once, not per connection.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Longest a check waits for connects in flight to record their sockets. A connect
/// records microseconds after its system call returns; this only bounds a thread
/// preempted in between.
pub const IN_FLIGHT_WAIT: Duration = Duration::from_millis(50);

/// Shards of the exact records, by local port: small enough that a scan of one
/// is short at ten thousand live sockets (about 40 each).
const SHARDS: usize = 256;

/// One live upstream socket: its local address and its destination, both in
/// canonical form (IPv4-mapped IPv6 as IPv4), and whether a connection from it came
/// back and was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    local: SocketAddr,
    remote: SocketAddr,
    looped: bool,
}

/// The live upstream sockets of this process.
pub struct OwnSockets {
    /// Live sockets per local port: the check's fast "no".
    ports: [AtomicU16; 1 << 16],
    records: [Mutex<Vec<Record>>; SHARDS],
    /// Connects between their system call and their record.
    in_flight: AtomicUsize,
}

static OWN_SOCKETS: OwnSockets = OwnSockets::new();

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl OwnSockets {
    /// An empty table. Production code uses the process's one, [`OwnSockets::shared`].
    pub const fn new() -> Self {
        Self {
            ports: [const { AtomicU16::new(0) }; 1 << 16],
            records: [const { Mutex::new(Vec::new()) }; SHARDS],
            in_flight: AtomicUsize::new(0),
        }
    }

    /// The process's table, which [`connect`] records into.
    pub fn shared() -> &'static OwnSockets {
        &OWN_SOCKETS
    }

    fn shard(&self, port: u16) -> std::sync::MutexGuard<'_, Vec<Record>> {
        // A push, a swap-remove or a flag cannot be torn by a panic.
        self.records[usize::from(port) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records the socket from `local` to `remote` until the returned guard drops.
    pub fn record(&'static self, local: SocketAddr, remote: SocketAddr) -> OwnSocket {
        let record = Record {
            local: canonical(local),
            remote: canonical(remote),
            looped: false,
        };
        self.shard(local.port()).push(record);
        // Saturating: 32,767 live sockets at one local port would take as many
        // destinations; an undercount then is harmless beside a wrapped counter.
        let _ = self.ports[usize::from(local.port())].fetch_update(
            Ordering::SeqCst,
            Ordering::SeqCst,
            |v| (v < u16::MAX).then_some(v + 1),
        );
        OwnSocket {
            table: self,
            local: record.local,
            remote: record.remote,
        }
    }

    fn port_in_use(&self, port: u16) -> bool {
        self.ports[usize::from(port)].load(Ordering::SeqCst) != 0
    }

    /// Whether an accepted connection from `peer` to the original destination
    /// `dst` is one of this process's own upstream sockets come back. While a
    /// connect is in flight and no socket has `peer`'s port yet, waits for it (at
    /// most [`IN_FLIGHT_WAIT`]): its SYN may be the one that came back.
    pub async fn is_own_upstream(&self, peer: SocketAddr, dst: SocketAddr) -> bool {
        let deadline = Instant::now() + IN_FLIGHT_WAIT;
        let mut spins = 0u32;
        while !self.port_in_use(peer.port()) {
            if self.in_flight.load(Ordering::SeqCst) == 0 || Instant::now() >= deadline {
                // A record made just before the last connect left is visible now.
                if !self.port_in_use(peer.port()) {
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
        let (peer, dst) = (canonical(peer), canonical(dst));
        self.shard(peer.port())
            .iter()
            .any(|r| r.local == peer && r.remote == dst)
    }

    /// Notes that the connection from `peer` to `dst` was refused as a loop, so the
    /// socket's owner can say why its upstream failed ([`OwnSocket::looped`]).
    pub fn mark_looped(&self, peer: SocketAddr, dst: SocketAddr) {
        let (peer, dst) = (canonical(peer), canonical(dst));
        for r in self.shard(peer.port()).iter_mut() {
            if r.local == peer && r.remote == dst {
                r.looped = true;
            }
        }
    }
}

impl Default for OwnSockets {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for OwnSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnSockets")
    }
}

/// A recorded upstream socket; dropping it forgets the record.
#[derive(Debug)]
pub struct OwnSocket {
    table: &'static OwnSockets,
    local: SocketAddr,
    remote: SocketAddr,
}

impl OwnSocket {
    /// The socket's local address.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// Whether a connection from this socket came back into the proxy and was
    /// refused as a loop.
    pub fn looped(&self) -> bool {
        self.table
            .shard(self.local.port())
            .iter()
            .any(|r| r.local == self.local && r.remote == self.remote && r.looped)
    }
}

impl Drop for OwnSocket {
    fn drop(&mut self) {
        let mut shard = self.table.shard(self.local.port());
        if let Some(at) = shard
            .iter()
            .position(|r| r.local == self.local && r.remote == self.remote)
        {
            shard.swap_remove(at);
        }
        drop(shard);
        let _ = self.table.ports[usize::from(self.local.port())].fetch_update(
            Ordering::SeqCst,
            Ordering::SeqCst,
            |v| Some(v.saturating_sub(1)),
        );
    }
}

/// Connects to `addr` within `timeout` like [`crate::forward::connect_upstream`],
/// recording the socket in [`OwnSockets::shared`] as soon as the kernel has picked
/// its local port. Keep the [`OwnSocket`] as long as the stream.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, OwnSocket), ConnectError> {
    let local_failure = |e| ForwardError::connect_failed(Side::Local, addr, e);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(local_failure)?;
    socket.set_nonblocking(true).map_err(local_failure)?;
    let own = start_connect(OwnSockets::shared(), &socket, addr)?;
    let socket = std::net::TcpStream::from(socket);
    let stream = TcpStream::from_std(socket).map_err(local_failure)?;
    complete(stream, own, addr, timeout).await
}

/// An upstream connect that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The far end was this proxy's own listener, which refused the connection as
    /// a loop.
    #[error("the upstream is this proxy's own listener, which refused the connection as a loop")]
    Looped(#[source] ForwardError),
    /// Any other failure.
    #[error(transparent)]
    Failed(#[from] ForwardError),
}

/// Waits for a started connect. The loop's reset can reach the socket before a
/// busy task sees the connect complete, so a failure is checked against the record
/// the listener marked: otherwise the loop would be told as a refusing upstream.
async fn complete(
    stream: TcpStream,
    own: OwnSocket,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, OwnSocket), ConnectError> {
    match connect_within(finish_connect(stream), addr, timeout).await {
        Ok(stream) => Ok((stream, own)),
        Err(e) if own.looped() => Err(ConnectError::Looped(e)),
        Err(e) => Err(e.into()),
    }
}

/// Starts a non-blocking connect and records the socket once the kernel picked its
/// local address, counted as in flight in between.
fn start_connect(
    table: &'static OwnSockets,
    socket: &Socket,
    addr: SocketAddr,
) -> Result<OwnSocket, ForwardError> {
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
        Ok(table.record(local, addr))
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

    fn table() -> &'static OwnSockets {
        Box::leak(Box::default())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_socket_is_recognised_exactly_while_its_guard_lives() {
        let t = table();
        let (local, remote) = (addr("198.18.0.2:40000"), addr("198.18.0.1:80"));
        assert!(!t.is_own_upstream(local, remote).await);
        let a = t.record(local, remote);
        let b = t.record(local, addr("198.18.0.1:443"));
        assert!(t.is_own_upstream(local, remote).await);
        // The same port towards another destination is someone else's connection
        // unless recorded; an application's socket may share the port.
        assert!(!t.is_own_upstream(local, addr("198.18.0.9:80")).await);
        assert!(!t.is_own_upstream(addr("198.18.0.3:40000"), remote).await);
        assert!(!t.is_own_upstream(addr("198.18.0.2:40001"), remote).await);
        // IPv4-mapped spellings are the same addresses.
        assert!(
            t.is_own_upstream(addr("[::ffff:198.18.0.2]:40000"), remote)
                .await
        );
        drop(a);
        assert!(!t.is_own_upstream(local, remote).await);
        assert!(t.is_own_upstream(local, addr("198.18.0.1:443")).await);
        drop(b);
        assert!(!t.is_own_upstream(local, addr("198.18.0.1:443")).await);
        assert!(!t.port_in_use(40000));
    }

    #[test]
    fn the_loop_mark_is_the_socket_s_own() {
        let t = table();
        let (local, remote) = (addr("198.18.0.2:40002"), addr("198.18.0.1:80"));
        let own = t.record(local, remote);
        let other = t.record(local, addr("198.18.0.1:443"));
        assert!(!own.looped());
        t.mark_looped(local, remote);
        assert!(own.looped() && !other.looped());
        drop(own);
        let again = t.record(local, remote);
        assert!(!again.looped(), "a new socket starts clean");
    }

    #[tokio::test]
    async fn connect_records_the_socket_the_peer_accepts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let (stream, own) = connect(dst, Duration::from_secs(5)).await.unwrap();
        let (_server, peer) = listener.accept().await.unwrap();
        assert_eq!(stream.local_addr().unwrap(), own.local());
        assert_eq!(peer, own.local());
        assert!(OwnSockets::shared().is_own_upstream(peer, dst).await);
        drop(own);
        assert!(!OwnSockets::shared().is_own_upstream(peer, dst).await);
    }

    /// A connection accepted while a connect is between its system call and its
    /// record is checked once the record is made, not before.
    #[tokio::test(start_paused = true)]
    async fn a_check_waits_for_a_connect_in_flight() {
        let t = table();
        let (peer, dst) = (addr("127.0.0.1:40006"), addr("127.0.0.1:80"));
        t.in_flight.fetch_add(1, Ordering::SeqCst);
        let check = tokio::spawn(async move { t.is_own_upstream(peer, dst).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            !check.is_finished(),
            "the check must wait for the connect in flight"
        );
        let _own = t.record(peer, dst);
        t.in_flight.fetch_sub(1, Ordering::SeqCst);
        assert!(check.await.unwrap());

        // Nothing in flight, nothing recorded: answered at once.
        let started = Instant::now();
        let other = addr("127.0.0.1:40008");
        assert!(!t.is_own_upstream(other, dst).await);
        assert_eq!(started.elapsed(), Duration::ZERO);

        // A connect stuck in flight delays a check by the bound at most.
        t.in_flight.fetch_add(1, Ordering::SeqCst);
        assert!(!t.is_own_upstream(other, dst).await);
        assert!(started.elapsed() <= IN_FLIGHT_WAIT + Duration::from_millis(2));
        t.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// The reset of a connection refused as a loop may land before the connector
    /// polled its connect: the failure is still the loop.
    #[tokio::test]
    async fn a_loop_reset_before_the_connect_completes_is_told_as_the_loop() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = listener.local_addr().unwrap();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.set_nonblocking(true).unwrap();
        let own = start_connect(OwnSockets::shared(), &socket, dst).unwrap();
        // What the outbound listener does with the connection that came back.
        let (accepted, peer) = listener.accept().unwrap();
        assert!(OwnSockets::shared().is_own_upstream(peer, dst).await);
        OwnSockets::shared().mark_looped(peer, dst);
        accepted.set_nonblocking(true).unwrap();
        crate::listen::reset(TcpStream::from_std(accepted).unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        while socket.peer_addr().is_ok() {
            assert!(Instant::now() < deadline, "the reset never arrived");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let stream = TcpStream::from_std(socket.into()).unwrap();
        let got = complete(stream, own, dst, Duration::from_secs(5)).await;
        assert!(matches!(got, Err(ConnectError::Looped(_))), "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_warning_is_rate_limited() {
        let w = LoopWarning::default();
        let client = addr("198.18.0.2:40000");
        assert!(w.refused(client, None));
        for _ in 0..100 {
            assert!(!w.refused(client, None));
        }
        tokio::time::advance(WARN_EVERY).await;
        assert!(w.refused(client, None));
        assert_eq!(w.unlogged.load(Ordering::Relaxed), 0);
    }
}
