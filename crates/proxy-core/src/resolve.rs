//! Peer gateways named by DNS: a name resolved to a set of addresses, kept fresh,
//! and watched by the pool that dials them.
//!
//! A Link, or a cluster's settings, names its gateway by an IP address or by a DNS
//! name (a cloud LoadBalancer's hostname, the gateway Service's name). Two rules
//! decide what such an address is worth, and `isthmus check` uses the same two, so
//! a name check passes is a name the proxies use, and an address they refuse,
//! check refuses with the same words:
//! - [`GatewayHost::parse`]: an IP literal, which must be an address a peer can
//!   be at (not unspecified, multicast or broadcast), or else a name;
//! - [`resolve`]: a name through the system resolver (`getaddrinfo`, so
//!   `/etc/hosts` counts), keeping the addresses a peer can be at, deduplicated
//!   and sorted; none at all is an error.
//!
//! [`AddrWatch`] keeps a name resolved for as long as its pool lives, behind two
//! seams so tests need no DNS: the [`Lookup`] itself, and the clock, which is
//! tokio's (tests pause it).
//!
//! # Why this policy
//! linkerd2-proxy re-resolves a name when its answer's TTL expires, but never
//! sooner than 5 s (its minimum TTL, so a zero TTL cannot spin it), and hands a
//! failed resolution to its caller to recover from; ztunnel resolves a hostname on
//! demand, per connection, through hickory's TTL cache. The system resolver tells
//! no TTL, so a name here is polled:
//! - every `interval`, 30 s by default: half the 60 s TTL that AWS gives its load
//!   balancers' names, so a moved address is seen within a TTL and a half, at a
//!   cost of one lookup per name per 30 s (which a caching resolver answers
//!   locally);
//! - at once after a connection failure, the usual first sign that an address
//!   went away, but never twice within `min_interval` (1 s): every connection of a
//!   pool that lost its peer fails together, and they must cost one lookup;
//! - after a failed lookup, again from `min_interval` doubling up to `interval`
//!   (connection failures do not hurry it: they cannot mend DNS).
//!
//! A failed lookup keeps the last good addresses serving: a resolver outage must
//! not take down a link whose gateways are still there. The failure is logged
//! (once per run of failures, and when its reason changes), counted in
//! `peer_dns_lookup_failures_total`, shown as `peer_dns_lookup_ok` 0, and kept
//! with its time in the [`Resolution`] that `/config` shows.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;

/// The default period between two lookups of a name that resolves (see the
/// module docs).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// The least time between two lookups of one name, whatever asks for them.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// A lookup that takes longer failed: `getaddrinfo` can wait on an unreachable
/// nameserver for far longer than a pool should wait on it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a peer gateway is, as a Link or a cluster's settings spell it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GatewayHost {
    Ip(IpAddr),
    /// A DNS name, as discovery validated it (lowercase, no trailing dot).
    Name(Arc<str>),
}

impl GatewayHost {
    /// An IP literal a peer can be at, or else a name; an IP literal no peer can
    /// be at is refused.
    pub fn parse(s: &str) -> Result<Self, ResolveError> {
        match s.parse::<IpAddr>() {
            Ok(ip) if usable(ip) => Ok(Self::Ip(ip)),
            Ok(ip) => Err(ResolveError::UnusableLiteral(ip)),
            Err(_) => Ok(Self::Name(Arc::from(s))),
        }
    }
}

impl fmt::Display for GatewayHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => ip.fmt(f),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// Why a gateway address gives nothing to dial. The words are what both the
/// proxies' logs and `isthmus check` say.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{0} is not an address a gateway can be at (unspecified, multicast or broadcast)")]
    UnusableLiteral(IpAddr),
    #[error("cannot resolve {name}: {reason}")]
    Lookup { name: Arc<str>, reason: String },
    #[error("resolving {name} took over {timeout:?}")]
    Timeout { name: Arc<str>, timeout: Duration },
    #[error("{name} resolves to no address")]
    Empty { name: Arc<str> },
    #[error(
        "{name} resolves only to addresses a gateway cannot be at (unspecified, multicast or broadcast): {addrs}"
    )]
    Unusable { name: Arc<str>, addrs: String },
}

/// Whether a peer can be at `ip`. Loopback can: a single-host lab's gateways
/// are there.
fn usable(ip: IpAddr) -> bool {
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    !(ip.is_unspecified() || ip.is_multicast() || broadcast)
}

/// The resolver seam: the system's in production, a script in tests.
pub trait Lookup: Send + Sync + 'static {
    /// Every address `name` resolves to, with `port`.
    fn lookup<'a>(&'a self, name: &'a str, port: u16)
    -> BoxFuture<'a, io::Result<Vec<SocketAddr>>>;
}

/// `getaddrinfo` (through tokio's `lookup_host`): `/etc/hosts`, then DNS, as the
/// host's `nsswitch.conf` says.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup<'a>(
        &'a self,
        name: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((name, port)).await?.collect()) })
    }
}

/// The addresses `host` stands for, with `port`: an IP literal as it is, a name
/// by one lookup within `timeout`, keeping the addresses a peer can be at
/// (sorted, deduplicated).
pub async fn resolve(
    lookup: &dyn Lookup,
    host: &GatewayHost,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, ResolveError> {
    let name = match host {
        GatewayHost::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, port)]),
        GatewayHost::Name(name) => name,
    };
    let found = tokio::time::timeout(timeout, lookup.lookup(name, port))
        .await
        .map_err(|_| ResolveError::Timeout {
            name: name.clone(),
            timeout,
        })?
        .map_err(|e| ResolveError::Lookup {
            name: name.clone(),
            reason: e.to_string(),
        })?;
    if found.is_empty() {
        return Err(ResolveError::Empty { name: name.clone() });
    }
    let mut addrs: Vec<SocketAddr> = found.iter().copied().filter(|a| usable(a.ip())).collect();
    if addrs.is_empty() {
        let listed: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
        return Err(ResolveError::Unusable {
            name: name.clone(),
            addrs: listed.join(", "),
        });
    }
    addrs.sort_unstable();
    addrs.dedup();
    Ok(addrs)
}

/// How names are kept resolved; one per proxy, shared by its pools.
#[derive(Clone)]
pub struct ResolveSettings {
    /// Between two lookups of a name that resolves.
    pub interval: Duration,
    /// The least time between two lookups of one name.
    pub min_interval: Duration,
    /// A lookup that takes longer failed.
    pub timeout: Duration,
    pub lookup: Arc<dyn Lookup>,
    pub metrics: ResolveMetrics,
}

impl Default for ResolveSettings {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            min_interval: MIN_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            lookup: Arc::new(SystemLookup),
            metrics: ResolveMetrics::default(),
        }
    }
}

impl fmt::Debug for ResolveSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolveSettings")
            .field("interval", &self.interval)
            .field("min_interval", &self.min_interval)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NameLabels {
    /// `name:port`.
    name: String,
}

/// What the watchers of names report, by `name:port`.
#[derive(Clone, Default)]
pub struct ResolveMetrics {
    addresses: Family<NameLabels, Gauge>,
    ok: Family<NameLabels, Gauge>,
    failures: Family<NameLabels, Counter>,
}

impl ResolveMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "peer_dns_addresses",
            "Addresses a peer gateway's DNS name resolves to and its pool dials (the last good answer)",
            self.addresses.clone(),
        );
        registry.register(
            "peer_dns_lookup_ok",
            "Whether the last lookup of a peer gateway's DNS name succeeded (else the last good addresses serve)",
            self.ok.clone(),
        );
        registry.register(
            "peer_dns_lookup_failures",
            "Failed lookups of a peer gateway's DNS name",
            self.failures.clone(),
        );
    }
}

/// A name's last good addresses and how its lookups went, for pools and
/// `/config`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// What the pool dials: the last good answer (sorted); empty until a lookup
    /// succeeded.
    pub addrs: Arc<[SocketAddr]>,
    /// When a lookup last succeeded; `None` for an IP literal or before the first.
    pub resolved_at: Option<SystemTime>,
    /// The failure of the lookups since the last success, if they fail.
    pub failing: Option<LookupFailure>,
}

/// A run of failed lookups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupFailure {
    /// When the run began.
    pub since: SystemTime,
    /// The last lookup's error.
    pub error: Arc<str>,
    pub consecutive: u32,
}

/// The addresses a pool dials, and how they change. Cheap to clone.
#[derive(Clone)]
pub struct AddrWatch {
    /// `host:port`, for logs and `/config`.
    target: Arc<str>,
    named: bool,
    rx: watch::Receiver<Resolution>,
    /// Asks the watcher for a lookup now; `None` for an IP literal.
    kick: Option<Arc<Notify>>,
}

impl fmt::Debug for AddrWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddrWatch")
            .field("target", &self.target)
            .field("resolution", &*self.rx.borrow())
            .finish()
    }
}

impl AddrWatch {
    /// One address that never changes.
    pub fn fixed(addr: SocketAddr) -> Self {
        let (_, rx) = watch::channel(Resolution {
            addrs: Arc::from([addr]),
            ..Resolution::default()
        });
        Self {
            target: Arc::from(addr.to_string()),
            named: false,
            rx,
            kick: None,
        }
    }

    /// `host` at `port`: an IP literal as [`AddrWatch::fixed`], a name looked up
    /// now and kept fresh as the module docs say, until `stop` (its task counted in
    /// `tasks`).
    pub fn spawn(
        host: &GatewayHost,
        port: u16,
        settings: &ResolveSettings,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let name = match host {
            GatewayHost::Ip(ip) => return Self::fixed(SocketAddr::new(*ip, port)),
            GatewayHost::Name(name) => name.clone(),
        };
        let target: Arc<str> = Arc::from(format!("{name}:{port}"));
        let (tx, rx) = watch::channel(Resolution::default());
        let kick = Arc::new(Notify::new());
        tasks.spawn(follow(
            Watched {
                host: host.clone(),
                port,
                target: target.clone(),
            },
            settings.clone(),
            tx,
            kick.clone(),
            stop,
        ));
        Self {
            target,
            named: true,
            rx,
            kick: Some(kick),
        }
    }

    /// `host:port` as configured.
    pub fn target(&self) -> &Arc<str> {
        &self.target
    }

    /// Whether the target is a name (else a fixed IP address).
    pub fn is_name(&self) -> bool {
        self.named
    }

    pub fn current(&self) -> Resolution {
        self.rx.borrow().clone()
    }

    /// Asks for a lookup as soon as the policy allows: a connection to one of the
    /// addresses failed. Does nothing for an IP literal.
    pub fn refresh(&self) {
        if let Some(kick) = &self.kick {
            kick.notify_one();
        }
    }

    /// Waits until the resolution changes; `false` once it never will again (an
    /// IP literal, or a stopped watcher).
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// What a watcher task keeps resolved.
struct Watched {
    host: GatewayHost,
    port: u16,
    target: Arc<str>,
}

/// Keeps `watched` resolved into `tx` until `stop` (see the module docs).
async fn follow(
    watched: Watched,
    settings: ResolveSettings,
    tx: watch::Sender<Resolution>,
    kick: Arc<Notify>,
    stop: CancellationToken,
) {
    let labels = NameLabels {
        name: watched.target.to_string(),
    };
    let metrics = &settings.metrics;
    let addresses = metrics.addresses.get_or_create(&labels).clone();
    let ok = metrics.ok.get_or_create(&labels).clone();
    let failures = metrics.failures.get_or_create(&labels).clone();
    let target = &watched.target;
    let floor = settings.min_interval.min(settings.interval);
    let mut backoff = Backoff::new(floor, settings.interval);
    loop {
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            outcome = resolve(&*settings.lookup, &watched.host, watched.port, settings.timeout) => outcome,
            () = stop.cancelled() => return,
        };
        let retry_in = match outcome {
            Ok(addrs) => {
                backoff.reset();
                ok.set(1);
                addresses.set(i64::try_from(addrs.len()).unwrap_or(i64::MAX));
                tx.send_if_modified(|r| {
                    if r.failing.take().is_some() {
                        info!(gateway = %target, ?addrs, "gateway name resolves again");
                    }
                    r.resolved_at = Some(SystemTime::now());
                    if *r.addrs == *addrs {
                        debug!(gateway = %target, ?addrs, "gateway name resolved, unchanged");
                        return false;
                    }
                    info!(gateway = %target, ?addrs, before = ?r.addrs, "gateway name resolves to new addresses");
                    r.addrs = Arc::from(addrs);
                    true
                });
                None
            }
            Err(error) => {
                ok.set(0);
                failures.inc();
                let retry_in = backoff.next_delay();
                tx.send_modify(|r| note_failure(r, target, &error, retry_in));
                Some(retry_in)
            }
        };
        match retry_in {
            // Failing: connection failures cannot mend DNS, so only time hurries it.
            Some(delay) => tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            },
            None => tokio::select! {
                () = tokio::time::sleep(settings.interval) => {}
                () = async {
                    kick.notified().await;
                    tokio::time::sleep_until(started + floor).await;
                } => debug!(gateway = %target, "a connection failed: resolving the gateway name again"),
                () = stop.cancelled() => return,
            },
        }
    }
}

/// Records a failed lookup, keeping the last good addresses; logs the first of a
/// run, and a change of reason.
fn note_failure(r: &mut Resolution, target: &str, error: &ResolveError, retry_in: Duration) {
    let error_text: Arc<str> = Arc::from(error.to_string());
    let kept = r.addrs.len();
    match &mut r.failing {
        Some(failing) => {
            if failing.error != error_text {
                warn!(gateway = %target, %error, kept, ?retry_in, "gateway name lookup fails differently; keeping the last good addresses");
            }
            failing.error = error_text;
            failing.consecutive += 1;
        }
        None => {
            warn!(gateway = %target, %error, kept, ?retry_in, "gateway name lookup failed; keeping the last good addresses");
            r.failing = Some(LookupFailure {
                since: SystemTime::now(),
                error: error_text,
                consecutive: 1,
            });
        }
    }
}

#[cfg(test)]
mod tests;
