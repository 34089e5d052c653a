//! Warm pools of tunnel connections to one peer (a sidecar's gateway, or a linked
//! cluster's gateway).
//!
//! Each pool keeps `connections` authenticated HTTP/2 connections open and
//! reconnects them with backoff, so opening a stream costs neither a TCP nor a TLS
//! handshake, nor an extra round trip. The pool's [`LinkState`] is what `/config`
//! shows and what makes streams fail fast while the peer is down.
//!
//! A peer named by DNS is every address its name resolves to: the pool follows an
//! [`AddrWatch`], spreads its connections over the addresses (at least one each),
//! dials new ones as they appear, and retires the connections of addresses that
//! vanish: they take no new stream, and close once their streams are done.
//!
//! Streams go round-robin over the live connections, so over every address. A
//! connection whose peer said `GOAWAY` (a gateway draining) refuses new streams
//! at once, without a round trip: the stream is retried on the next connection,
//! and the draining one takes no new stream while another is live, until its
//! task replaces it.
//!
//! It does not choose peers or verify identities itself: the rustls client config it
//! is handed carries the peer-identity check.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use isthmus_vocab::{Authority, ClusterName, Refusal, error_chain};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::outcome::Outcome;
use crate::resolve::{AddrWatch, GatewayHost, ResolveSettings};
use crate::tunnel::client::{self, Carries, OpenError, TunnelSender, TunnelStream};
use crate::tunnel::{ConnectionError, H2Settings, HandshakeObserver, PingFailed, Pinger};

/// How to reach one peer.
#[derive(Clone)]
pub struct PeerConfig {
    /// For logs and `/config`, e.g. `gateway/cluster-a`.
    pub name: Arc<str>,
    /// The peer's address. A pool that follows a name ([`Pool::spawn_resolving`])
    /// dials the name's addresses instead, at this port.
    pub addr: SocketAddr,
    /// SNI sent to the peer; identity is checked by the TLS config, not by this name.
    pub server_name: ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
    pub connect_timeout: Duration,
    /// Connections kept open. Streams are spread over them round-robin.
    pub connections: usize,
    pub h2: H2Settings,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Counts and logs failed handshakes by reason (a wrong peer identity, say).
    pub handshake_failed: Option<HandshakeObserver>,
    /// Reads, from a finished handshake, when the connection must stop opening
    /// streams (the earlier of the two leaves' `notAfter`); `None`, or a `None`
    /// answer: no bound.
    pub deadline: Option<ConnectionDeadline>,
}

/// See [`PeerConfig::deadline`]. The caller knows X.509; this crate does not.
pub type ConnectionDeadline = Arc<dyn Fn(&rustls::CommonState) -> Option<SystemTime> + Send + Sync>;

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

/// The health of a pool, as probes and `/config` report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// No connection has been made yet and none has failed.
    Connecting,
    /// At least one connection is established.
    Up { connections: usize },
    /// Every connection attempt since the last success failed.
    Down { since: SystemTime, error: Arc<str> },
}

impl LinkState {
    pub fn is_up(&self) -> bool {
        matches!(self, LinkState::Up { .. })
    }
}

/// Why a pooled stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("peer {peer} refused the stream: {refusal}")]
    Refused { peer: Arc<str>, refusal: Refusal },
    #[error("link to {peer} is down: {error}")]
    LinkDown { peer: Arc<str>, error: Arc<str> },
    #[error("tunnel connection to {peer} failed while opening a stream")]
    Connection {
        peer: Arc<str>,
        #[source]
        source: h2::Error,
    },
}

impl PoolError {
    /// The refusal to report downstream (metric label, status, log reason).
    pub fn refusal(&self) -> Refusal {
        self.outcome().refusal().unwrap_or(Refusal::LinkDown)
    }

    /// A refusal the peer answered is the peer's; a link that cannot carry the
    /// stream is this proxy's `link_down`.
    pub fn outcome(&self) -> Outcome {
        match self {
            PoolError::Refused { refusal, .. } => Outcome::refused_by_peer(*refusal),
            PoolError::LinkDown { .. } | PoolError::Connection { .. } => {
                Outcome::refused_here(Refusal::LinkDown)
            }
        }
    }
}

/// Why a liveness PING ([`Pool::ping`]) got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error("link to {peer} is down: {error}")]
    LinkDown { peer: Arc<str>, error: Arc<str> },
    #[error("no PING answer from {peer} within {timeout:?}")]
    Timeout { peer: Arc<str>, timeout: Duration },
    #[error("tunnel connection to {peer} closed before it answered a PING")]
    Closed { peer: Arc<str> },
}

/// Why one connection attempt failed (kept as text in [`LinkState::Down`]).
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("TCP connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("TCP connect to {addr} failed")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake with {addr} failed")]
    H2 {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
}

/// One established connection of the pool.
#[derive(Clone)]
struct Slot {
    sender: TunnelSender,
    pinger: Option<Pinger>,
    /// Set once the connection refused a new stream (its peer said `GOAWAY`, or
    /// it failed): it is picked only when no other connection is live.
    draining: Arc<AtomicBool>,
}

struct Shared {
    cfg: PeerConfig,
    /// Where the connections go: one fixed address, or a name's.
    addrs: AddrWatch,
    /// Indexed by connection task; `None` while that task has no connection. An
    /// index is reused only after its task ended ([`Shared::release`]).
    slots: Mutex<Vec<Option<Slot>>>,
    free: Mutex<Vec<usize>>,
    next: AtomicUsize,
    state: watch::Sender<LinkState>,
    last_error: Mutex<Option<(SystemTime, Arc<str>)>>,
}

/// A pool of tunnel connections to one peer. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("peer", &self.shared.cfg.name)
            .field("state", &*self.shared.state.borrow())
            .finish()
    }
}

impl Pool {
    /// Starts the pool's connection tasks; they stop when `stop` is cancelled.
    pub fn spawn(cfg: PeerConfig, stop: CancellationToken) -> Pool {
        Pool::spawn_on(cfg, stop, &TaskTracker::new())
    }

    /// [`Pool::spawn`], its tasks counted in `tasks` (the connections' own tasks
    /// too), so whoever stops pools can tell that their tasks ended.
    pub fn spawn_on(cfg: PeerConfig, stop: CancellationToken, tasks: &TaskTracker) -> Pool {
        let addrs = AddrWatch::fixed(cfg.addr);
        Pool::spawn_resolving(cfg, addrs, stop, tasks)
    }

    /// [`Pool::spawn_on`] to every address `addrs` gives, following its changes
    /// (see the module docs); `cfg.addr` is unused but for its port.
    pub fn spawn_resolving(
        cfg: PeerConfig,
        addrs: AddrWatch,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Pool {
        let (state, _) = watch::channel(LinkState::Connecting);
        let shared = Arc::new(Shared {
            cfg,
            addrs: addrs.clone(),
            slots: Mutex::new(Vec::new()),
            free: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            state,
            last_error: Mutex::new(None),
        });
        let mut dialing = Dialing::default();
        dialing.plan(&shared, &stop, tasks);
        if addrs.is_name() {
            tasks.spawn(follow_addresses(
                shared.clone(),
                dialing,
                addrs,
                stop,
                tasks.clone(),
            ));
        }
        Pool { shared }
    }

    pub fn peer(&self) -> &PeerConfig {
        &self.shared.cfg
    }

    /// Where the pool's connections go: its address, or its name's addresses and
    /// how their lookups went.
    pub fn addresses(&self) -> &AddrWatch {
        &self.shared.addrs
    }

    pub fn state(&self) -> LinkState {
        self.shared.state.borrow().clone()
    }

    /// Opens a stream, returning once its `CONNECT` is queued: the caller's first
    /// bytes follow without waiting for the answer, which the stream's first read
    /// (or [`TunnelStream::verdict`]) awaits. While the link is down it fails at
    /// once; while the very first connection is being made it waits up to the
    /// connect timeout.
    pub async fn open(
        &self,
        authority: &Authority,
        cluster: Option<&ClusterName>,
    ) -> Result<TunnelStream, PoolError> {
        self.open_carrying(authority, cluster, Carries::Connection)
            .await
    }

    /// [`Pool::open`] for a stream that carries what `carries` says.
    pub async fn open_carrying(
        &self,
        authority: &Authority,
        cluster: Option<&ClusterName>,
        carries: Carries,
    ) -> Result<TunnelStream, PoolError> {
        let peer = &self.shared.cfg.name;
        // A connection that died or drains between pick and use never saw the
        // stream: it is retried on another, each connection tried at most once.
        let attempts = lock(&self.shared.slots).len().max(1) + 1;
        for attempt in 1..=attempts {
            let slot = match self.pick() {
                Some(slot) => slot,
                None => self.wait_for_connection().await?,
            };
            let mut sender = slot.sender;
            // The far end connects within its own connect timeout; the same bound
            // on its answer catches a peer that went silent.
            let answer_within = self.shared.cfg.connect_timeout;
            match client::open_carrying(&mut sender, authority, cluster, carries, answer_within)
                .await
            {
                Ok(stream) => return Ok(stream),
                Err(OpenError::Refused(refusal)) => {
                    return Err(PoolError::Refused {
                        peer: peer.clone(),
                        refusal,
                    });
                }
                Err(OpenError::Connection(source)) => {
                    slot.draining.store(true, Ordering::Relaxed);
                    if attempt == attempts {
                        return Err(PoolError::Connection {
                            peer: peer.clone(),
                            source,
                        });
                    }
                    debug!(peer = %peer, error = %source, "connection takes no new stream: retrying on another");
                }
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// Opens a stream and waits for the far end's answer, for callers that decide
    /// something on a refusal (a fallback) before they send anything.
    pub async fn open_answered(
        &self,
        authority: &Authority,
        cluster: Option<&ClusterName>,
    ) -> Result<TunnelStream, PoolError> {
        let mut stream = self.open(authority, cluster).await?;
        let peer = &self.shared.cfg.name;
        match stream.verdict().await {
            Ok(()) => Ok(stream),
            Err(OpenError::Refused(refusal)) => Err(PoolError::Refused {
                peer: peer.clone(),
                refusal,
            }),
            Err(OpenError::Connection(source)) => Err(PoolError::Connection {
                peer: peer.clone(),
                source,
            }),
        }
    }

    /// One HTTP/2 PING round trip on a pooled connection (round-robin), answered by
    /// the peer's HTTP/2 stack: proof that the mTLS connection is up and the peer
    /// alive, without opening a stream or asking it to reach anything. Fails at once
    /// while the link is down; while the first connection is being made it waits
    /// for it within `timeout`. Returns the round-trip time.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, PingError> {
        let peer = &self.shared.cfg.name;
        let start = tokio::time::Instant::now();
        let slot = match self.pick() {
            Some(slot) => slot,
            None => match tokio::time::timeout(timeout, self.wait_for_connection()).await {
                Ok(Ok(slot)) => slot,
                Ok(Err(e)) => {
                    let error = match e {
                        PoolError::LinkDown { error, .. } => error,
                        other => Arc::from(other.to_string()),
                    };
                    return Err(PingError::LinkDown {
                        peer: peer.clone(),
                        error,
                    });
                }
                Err(_) => {
                    return Err(PingError::Timeout {
                        peer: peer.clone(),
                        timeout,
                    });
                }
            },
        };
        let Some(pinger) = slot.pinger else {
            return Err(PingError::Closed { peer: peer.clone() });
        };
        match pinger.ping(timeout.saturating_sub(start.elapsed())).await {
            Ok(round_trip) => Ok(round_trip),
            Err(PingFailed::Timeout) => Err(PingError::Timeout {
                peer: peer.clone(),
                timeout,
            }),
            Err(PingFailed::Closed) => Err(PingError::Closed { peer: peer.clone() }),
        }
    }

    /// The next live connection round-robin, one that drains only if no other is
    /// live.
    fn pick(&self) -> Option<Slot> {
        let slots = lock(&self.shared.slots);
        let start = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let live = (0..slots.len()).filter_map(|i| slots[(start + i) % slots.len()].as_ref());
        live.clone()
            .find(|slot| !slot.draining.load(Ordering::Relaxed))
            .or_else(|| live.clone().next())
            .cloned()
    }

    async fn wait_for_connection(&self) -> Result<Slot, PoolError> {
        let mut state = self.shared.state.subscribe();
        let wait = async {
            loop {
                if let Some(sender) = self.pick() {
                    return Ok(sender);
                }
                if let LinkState::Down { error, .. } = &*state.borrow_and_update() {
                    return Err(error.clone());
                }
                if state.changed().await.is_err() {
                    return Err(Arc::from("pool stopped"));
                }
            }
        };
        match tokio::time::timeout(self.shared.cfg.connect_timeout, wait).await {
            Ok(Ok(sender)) => Ok(sender),
            Ok(Err(error)) => Err(PoolError::LinkDown {
                peer: self.shared.cfg.name.clone(),
                error,
            }),
            Err(_) => Err(PoolError::LinkDown {
                peer: self.shared.cfg.name.clone(),
                error: Arc::from("no connection established within the connect timeout"),
            }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a plain assignment; a panic cannot tear it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A tunnel connection that ends sooner than this after it was made counts as a
/// failed attempt. With TLS 1.3 a server refuses a client certificate only after the
/// client's side of the handshake is done, so "connected" does not prove the peer
/// accepted us; without this, a refused client would reconnect in a tight loop.
const HEALTHY_AFTER: Duration = Duration::from_secs(1);

/// The connection tasks of a pool, one per address and connection index, each
/// with its own stop: an address that vanishes stops only its own.
#[derive(Default)]
struct Dialing {
    running: HashMap<(SocketAddr, usize), CancellationToken>,
}

impl Dialing {
    /// Starts and stops connection tasks so that every current address has its
    /// share of the pool's connections (at least one).
    fn plan(&mut self, shared: &Arc<Shared>, stop: &CancellationToken, tasks: &TaskTracker) {
        let resolution = shared.addrs.current();
        let per_addr = shared
            .cfg
            .connections
            .max(1)
            .div_ceil(resolution.addrs.len().max(1));
        let wanted: HashSet<(SocketAddr, usize)> = resolution
            .addrs
            .iter()
            .flat_map(|addr| (0..per_addr).map(move |i| (*addr, i)))
            .collect();
        self.running.retain(|(addr, i), task| {
            let keep = wanted.contains(&(*addr, *i));
            if !keep {
                // The connection takes no new stream; those in flight finish on it.
                info!(peer = %shared.cfg.name, %addr, connection = i, "address no longer wanted: retiring its connection");
                task.cancel();
            }
            keep
        });
        for key in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let task = stop.child_token();
            let slot = shared.claim();
            let (shared, dial, tracker) = (shared.clone(), task.clone(), tasks.clone());
            tasks.spawn(async move {
                maintain(&shared, slot, key.0, dial, tracker).await;
                shared.release(slot);
            });
            self.running.insert(key, task);
        }
        if resolution.addrs.is_empty()
            && let Some(failing) = &resolution.failing
        {
            *lock(&shared.last_error) = Some((failing.since, failing.error.clone()));
            publish(shared);
        }
    }
}

/// Re-plans the pool's connections whenever its name resolves differently.
async fn follow_addresses(
    shared: Arc<Shared>,
    mut dialing: Dialing,
    mut addrs: AddrWatch,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        tokio::select! {
            more = addrs.changed() => if !more { return },
            () = stop.cancelled() => return,
        }
        dialing.plan(&shared, &stop, &tasks);
    }
}

impl Shared {
    /// A slot index for a new connection task.
    fn claim(&self) -> usize {
        if let Some(slot) = lock(&self.free).pop() {
            return slot;
        }
        let mut slots = lock(&self.slots);
        slots.push(None);
        slots.len() - 1
    }

    /// Frees the slot of a connection task that ended.
    fn release(&self, slot: usize) {
        lock(&self.slots)[slot] = None;
        lock(&self.free).push(slot);
        publish(self);
    }
}

async fn maintain(
    shared: &Shared,
    slot: usize,
    addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let cfg = &shared.cfg;
    let mut backoff = crate::backoff::Backoff::new(cfg.backoff_min, cfg.backoff_max);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let attempt = tokio::select! {
            res = connect(cfg, addr) => res,
            () = shutdown.cancelled() => return,
        };
        match attempt {
            Ok((slot_conn, conn, expires)) => {
                let established = tokio::time::Instant::now();
                let retire_at = expires.map(|at| {
                    established
                        + at.duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO)
                });
                // A task of its own: when the pool stops, streams in flight (a relay
                // draining on SIGTERM) keep their connection, which closes once they
                // are done and the pool dropped its handle.
                let mut conn = tasks.spawn(conn);
                lock(&shared.slots)[slot] = Some(slot_conn);
                *lock(&shared.last_error) = None;
                publish(shared);
                info!(peer = %cfg.name, %addr, slot, "tunnel connection established");
                let lost: Option<Arc<str>> = tokio::select! {
                    res = &mut conn => match res {
                        Ok(Err(e)) => {
                            let error = error_chain(&e);
                            warn!(peer = %cfg.name, slot, %error, "tunnel connection lost");
                            Some(Arc::from(format!("tunnel connection lost: {error}")))
                        }
                        Ok(Ok(())) => {
                            info!(peer = %cfg.name, slot, "tunnel connection closed by peer");
                            Some(Arc::from("tunnel connection closed by peer"))
                        }
                        Err(e) => {
                            warn!(peer = %cfg.name, slot, error = %e, "tunnel connection task failed");
                            Some(Arc::from(format!("tunnel connection task failed: {e}")))
                        }
                    },
                    // A leaf the handshake relied on expires: the connection takes
                    // no new stream (streams in flight finish on it, and it closes
                    // once they are done and its handle is gone) and a fresh
                    // handshake replaces it, which fails closed without a valid leaf.
                    () = sleep_until_some(retire_at) => {
                        info!(peer = %cfg.name, slot, "a leaf of this tunnel connection expired: retiring it");
                        None
                    }
                    () = shutdown.cancelled() => {
                        lock(&shared.slots)[slot] = None;
                        return;
                    }
                };
                lock(&shared.slots)[slot] = None;
                if let Some(lost) = lost {
                    *lock(&shared.last_error) = Some((SystemTime::now(), lost));
                    // The address may be gone: the name's answer tells.
                    shared.addrs.refresh();
                }
                publish(shared);
                if established.elapsed() >= HEALTHY_AFTER {
                    backoff.reset();
                    continue;
                }
                // Died at once: a failed attempt, so back off like one.
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    () = shutdown.cancelled() => return,
                }
            }
            Err(e) => {
                let error: Arc<str> = Arc::from(error_chain(&e));
                let retry_in = backoff.next_delay();
                warn!(peer = %cfg.name, slot, error = %error, ?retry_in, "tunnel connect failed");
                {
                    let mut last = lock(&shared.last_error);
                    let since = last.as_ref().map_or_else(SystemTime::now, |(t, _)| *t);
                    *last = Some((since, error));
                }
                publish(shared);
                shared.addrs.refresh();
                tokio::select! {
                    _ = tokio::time::sleep(retry_in) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }
}

fn publish(shared: &Shared) {
    let connections = lock(&shared.slots).iter().filter(|s| s.is_some()).count();
    let state = if connections > 0 {
        LinkState::Up { connections }
    } else if let Some((since, error)) = lock(&shared.last_error).clone() {
        LinkState::Down { since, error }
    } else {
        LinkState::Connecting
    };
    shared.state.send_if_modified(|current| {
        if *current == state {
            false
        } else {
            *current = state;
            true
        }
    });
}

async fn connect(
    cfg: &PeerConfig,
    addr: SocketAddr,
) -> Result<
    (
        Slot,
        impl std::future::Future<Output = Result<(), ConnectionError>> + Send + use<>,
        Option<SystemTime>,
    ),
    ConnectError,
> {
    let tcp = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(addr))?
        .map_err(|source| ConnectError::Tcp { addr, source })?;
    // Small writes (stream headers, window updates) must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(
        cfg.connect_timeout,
        TlsConnector::from(cfg.tls.clone()).connect(cfg.server_name.clone(), tcp),
    )
    .await
    .map_err(|_| ConnectError::Timeout(addr))?
    .map_err(|source| {
        if let Some(observe) = &cfg.handshake_failed {
            observe(&source, addr);
        }
        ConnectError::Tls { addr, source }
    })?;
    let expires = cfg
        .deadline
        .as_ref()
        .and_then(|deadline| deadline(tls.get_ref().1));
    let (sender, pinger, driver) = client::handshake_with_pinger(tls, &cfg.h2)
        .await
        .map_err(|source| ConnectError::H2 { addr, source })?;
    let slot = Slot {
        sender,
        pinger,
        draining: Arc::default(),
    };
    Ok((slot, driver, expires))
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What every pool of one proxy shares: a [`PeerConfig`] less the peer.
#[derive(Clone)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// Connections a pool to a gateway keeps open.
    pub connections: usize,
    pub h2: H2Settings,
    pub handshake_failed: Option<HandshakeObserver>,
    pub deadline: Option<ConnectionDeadline>,
    /// How a peer named by DNS is kept resolved.
    pub resolve: ResolveSettings,
}

impl std::fmt::Debug for PoolSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSettings")
            .field("connect_timeout", &self.connect_timeout)
            .field("connections", &self.connections)
            .field("resolve", &self.resolve)
            .finish_non_exhaustive()
    }
}

impl PoolSettings {
    /// A pool of `connections` to the peer at `host` and `port`, as a Link or a
    /// cluster's settings name it: an IP address, or a DNS name kept resolved
    /// (see [`crate::resolve`]) until `stop`. Its tasks are counted in `tasks`.
    #[expect(clippy::too_many_arguments, reason = "each is one fact about the peer")]
    pub fn spawn_to(
        &self,
        name: String,
        host: &GatewayHost,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        connections: usize,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Pool {
        let addrs = AddrWatch::spawn(host, port, &self.resolve, stop.clone(), tasks);
        // No SNI either way (an IP server name sends none): the mesh's listeners
        // refuse any name but their identity's, and the TLS config checks that.
        let ip = match host {
            GatewayHost::Ip(ip) => *ip,
            GatewayHost::Name(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        };
        let cfg = self.peer(name, SocketAddr::new(ip, port), tls, connections);
        Pool::spawn_resolving(cfg, addrs, stop, tasks)
    }

    /// The config of a pool of `connections` to `addr` (named `name` in logs and
    /// `/config`), whose identity `tls` checks; reconnects back off from 100 ms
    /// to 5 s.
    pub fn peer(
        &self,
        name: String,
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        connections: usize,
    ) -> PeerConfig {
        PeerConfig {
            name: Arc::from(name),
            addr,
            server_name: ServerName::IpAddress(addr.ip().into()),
            tls,
            connect_timeout: self.connect_timeout,
            connections,
            h2: self.h2.clone(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            handshake_failed: self.handshake_failed.clone(),
            deadline: self.deadline.clone(),
        }
    }
}
