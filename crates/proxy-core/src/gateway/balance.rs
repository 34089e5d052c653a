//! Endpoint choice for the exported Services a gateway delivers to, as Linkerd and
//! Finagle choose: power of two choices over a peak-EWMA latency weighted by the
//! streams in flight, and failure accrual that ejects an endpoint for a while.
//!
//! - **Score.** Each endpoint keeps an exponentially weighted moving average of its
//!   latency samples with time constant [`BalanceSettings::decay`]. It is
//!   peak-sensitive: a sample above the average replaces it (once a second one in
//!   a row confirms it is no blip), one below pulls it down slowly, so two slow
//!   answers are enough to steer traffic away and a recovery earns it back over
//!   seconds. An idle endpoint's average decays
//!   towards zero, so one that was slow is tried again eventually. An endpoint with
//!   no sample yet counts as [`BalanceSettings::default_rtt`], fading ten times
//!   faster than a measured average, and its first sample replaces it. The cost compared is
//!   `max(ewma, floor) * (in_flight + 1)`: latencies under
//!   [`BalanceSettings::latency_floor`] count as equal, since on a busy host
//!   scheduling alone varies that much, and a peak-sensitive score would otherwise
//!   starve an endpoint for tens of seconds after one such blip.
//! - **Choice.** Two distinct endpoints drawn at random among those available; the
//!   cheaper wins. Unlike the least-loaded endpoint overall, it never sends every
//!   new stream to the same one while its score is stale.
//! - **Failure accrual.** [`BalanceSettings::failures_to_eject`] consecutive
//!   failures eject an endpoint for a backoff that doubles with each ejection (with
//!   jitter, [`BalanceSettings::eject_min`] up to [`BalanceSettings::eject_max`]).
//!   After it, the endpoint is on probation: one stream at a time goes to it; a
//!   success restores it, a failure ejects it again for longer. When no endpoint is
//!   available, the choice is among all of them (panic mode): an unhealthy endpoint
//!   is a better answer than a refusal.
//!
//! State is kept per exported Service and keyed by endpoint address, so it
//! survives discovery updates; endpoints and Services that leave are forgotten.
//!
//! This module neither connects nor reads: delivery reports each stream's latency
//! and verdict through the [`InFlight`] handed out with the endpoint.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_vocab::Authority;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Endpoint, lock};
use crate::backoff::Backoff;

/// Default [`BalanceSettings::decay`], Finagle's and Linkerd's.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// Default [`BalanceSettings::default_rtt`], Linkerd's.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Default [`BalanceSettings::latency_floor`].
pub const DEFAULT_LATENCY_FLOOR: Duration = Duration::from_millis(20);
/// Default [`BalanceSettings::failures_to_eject`], Linkerd's.
pub const DEFAULT_FAILURES_TO_EJECT: u32 = 5;

/// How endpoints are scored and ejected.
#[derive(Clone, Debug)]
pub struct BalanceSettings {
    /// Time constant of the latency average: how long a past sample keeps weight,
    /// and how fast an idle endpoint's score fades.
    pub decay: Duration,
    /// The latency assumed of an endpoint with no sample yet.
    pub default_rtt: Duration,
    /// Latencies below this are compared as equal (see the module docs).
    pub latency_floor: Duration,
    /// Consecutive failures that eject an endpoint.
    pub failures_to_eject: u32,
    /// The first ejection's backoff (jitter may add as much again).
    pub eject_min: Duration,
    /// The longest ejection.
    pub eject_max: Duration,
}

impl Default for BalanceSettings {
    fn default() -> Self {
        Self {
            decay: DEFAULT_DECAY,
            default_rtt: DEFAULT_RTT,
            latency_floor: DEFAULT_LATENCY_FLOOR,
            failures_to_eject: DEFAULT_FAILURES_TO_EJECT,
            eject_min: Duration::from_secs(1),
            eject_max: Duration::from_secs(60),
        }
    }
}

/// An endpoint's standing, as `/config` and metrics show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Chosen by score.
    Active,
    /// Not chosen until its backoff ends (unless every endpoint is out).
    Ejected,
    /// Its backoff ended: one stream at a time tries it.
    Probation,
}

impl Health {
    pub const ALL: [Health; 3] = [Health::Active, Health::Ejected, Health::Probation];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Active => "active",
            Health::Ejected => "ejected",
            Health::Probation => "probation",
        }
    }
}

/// One endpoint of an exported Service, for `/config` and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointView {
    pub addr: SocketAddr,
    pub health: Health,
    /// The latency average now, in milliseconds (before the in-flight weighting).
    pub ewma_ms: f64,
    pub in_flight: usize,
    pub consecutive_failures: u32,
    /// Times this endpoint was ejected since it was first seen.
    pub ejections: u64,
}

/// An exported Service's endpoints as the balancer knows them.
#[derive(Clone, Debug)]
pub struct ServiceView {
    pub service: Authority,
    pub endpoints: Vec<EndpointView>,
}

/// Where an endpoint stands between choices.
#[derive(Debug)]
enum Standing {
    Active,
    Ejected {
        until: Instant,
    },
    /// `probing`: the one stream allowed is out.
    Probation {
        probing: bool,
    },
}

#[derive(Debug)]
struct Scored {
    /// Latency average in nanoseconds as of `stamp`.
    ewma_ns: f64,
    stamp: Instant,
    /// Whether `ewma_ns` is still the default.
    sampled: bool,
    /// Whether the last sample was above the average, unconfirmed.
    above: bool,
    in_flight: usize,
    failures: u32,
    standing: Standing,
    ejection_backoff: Backoff,
    ejections: u64,
}

impl Scored {
    fn new(settings: &BalanceSettings, now: Instant) -> Self {
        Self {
            ewma_ns: nanos(settings.default_rtt),
            stamp: now,
            sampled: false,
            above: false,
            in_flight: 0,
            failures: 0,
            standing: Standing::Active,
            ejection_backoff: Backoff::new(settings.eject_min, settings.eject_max),
            ejections: 0,
        }
    }

    /// The average now: it fades towards zero while no sample comes.
    fn ewma(&self, decay: Duration, now: Instant) -> f64 {
        self.ewma_ns * self.weight_kept(decay, now)
    }

    fn weight_kept(&self, decay: Duration, now: Instant) -> f64 {
        let elapsed = nanos(now.saturating_duration_since(self.stamp));
        // The default is a penalty for an endpoint nobody measured yet (a pod that
        // may still be warming up), not a measurement: it fades ten times faster,
        // so an endpoint that joins a fast Service gets its first stream within a
        // second or two instead of tens of seconds.
        let decay = if self.sampled { decay } else { decay / 10 };
        (-elapsed / nanos(decay).max(1.0)).exp()
    }

    fn cost(&self, settings: &BalanceSettings, now: Instant) -> f64 {
        let latency = self
            .ewma(settings.decay, now)
            .max(nanos(settings.latency_floor));
        latency * (self.in_flight as f64 + 1.0)
    }

    fn sample(&mut self, latency: Duration, settings: &BalanceSettings, now: Instant) {
        let sample = nanos(latency);
        let kept = self.weight_kept(settings.decay, now);
        let current = self.ewma_ns * kept;
        if !self.sampled {
            // The default is a guess, not a history to average with.
            self.ewma_ns = sample;
        } else if sample > current && sample > nanos(settings.latency_floor) {
            // One slow sample may be this host's scheduling blip, and a peak
            // would starve the endpoint for many seconds: the second in a row
            // confirms it.
            if !std::mem::replace(&mut self.above, true) {
                return;
            }
            self.ewma_ns = sample;
        } else {
            self.above = false;
            self.ewma_ns = current + sample * (1.0 - kept);
        }
        self.stamp = now;
        self.sampled = true;
    }

    /// Whether a stream may go to it now; an ejection that ran out becomes
    /// probation here.
    fn available(&mut self, now: Instant) -> bool {
        if let Standing::Ejected { until } = self.standing
            && now >= until
        {
            self.standing = Standing::Probation { probing: false };
        }
        match self.standing {
            Standing::Active => true,
            Standing::Probation { probing } => !probing,
            Standing::Ejected { .. } => false,
        }
    }

    fn health(&self) -> Health {
        match self.standing {
            Standing::Active => Health::Active,
            Standing::Ejected { .. } => Health::Ejected,
            Standing::Probation { .. } => Health::Probation,
        }
    }
}

fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

struct ServiceState {
    endpoints: HashMap<SocketAddr, Scored>,
    rng: fastrand::Rng,
}

/// One exported Service's endpoints.
struct Service {
    name: Authority,
    settings: Arc<BalanceSettings>,
    state: Mutex<ServiceState>,
    ejections: Counter,
}

impl Service {
    /// Adds endpoints discovery now lists and forgets those it no longer does.
    fn sync(state: &mut ServiceState, endpoints: &[Endpoint], settings: &BalanceSettings) {
        let now = Instant::now();
        for endpoint in endpoints {
            state
                .endpoints
                .entry(endpoint.addr)
                .or_insert_with(|| Scored::new(settings, now));
        }
        if state.endpoints.len() > endpoints.len() {
            let listed: HashSet<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
            state.endpoints.retain(|addr, _| listed.contains(addr));
        }
    }
}

/// The balancer of every exported Service this gateway delivered to.
pub(crate) struct Balancer {
    settings: Arc<BalanceSettings>,
    services: Mutex<HashMap<Authority, Arc<Service>>>,
    /// Counts ejections, by Service.
    ejections: Box<dyn Fn(&Authority) -> Counter + Send + Sync>,
    /// Seeds each Service's choices; fixed in tests.
    seed: Option<u64>,
}

impl Balancer {
    pub(crate) fn new(
        settings: BalanceSettings,
        ejections: impl Fn(&Authority) -> Counter + Send + Sync + 'static,
    ) -> Self {
        Self {
            settings: Arc::new(settings),
            services: Mutex::new(HashMap::new()),
            ejections: Box::new(ejections),
            seed: None,
        }
    }

    /// Chooses among `endpoints` of `service` less those already `tried` for this
    /// stream; `None` when every one was tried.
    pub(crate) fn pick(
        &self,
        service: &Authority,
        endpoints: &[Endpoint],
        tried: &[SocketAddr],
    ) -> Option<(Endpoint, InFlight)> {
        let service = self.service(service);
        let now = Instant::now();
        let mut state = lock(&service.state);
        Service::sync(&mut state, endpoints, &service.settings);
        let state = &mut *state;
        let untried = endpoints.iter().filter(|e| !tried.contains(&e.addr));
        let mut candidates: Vec<&Endpoint> = untried
            .clone()
            .filter(|e| {
                state
                    .endpoints
                    .get_mut(&e.addr)
                    .is_some_and(|s| s.available(now))
            })
            .collect();
        if candidates.is_empty() {
            // Panic mode: every endpoint left is ejected or being probed.
            candidates = untried.collect();
        }
        let chosen = match candidates.len() {
            0 => return None,
            1 => *candidates[0],
            n => {
                let first = state.rng.usize(..n);
                let mut second = state.rng.usize(..n - 1);
                if second >= first {
                    second += 1;
                }
                let cost = |e: &Endpoint| {
                    state
                        .endpoints
                        .get(&e.addr)
                        .map_or(0.0, |s| s.cost(&service.settings, now))
                };
                let (a, b) = (*candidates[first], *candidates[second]);
                if cost(&b) < cost(&a) { b } else { a }
            }
        };
        if let Some(scored) = state.endpoints.get_mut(&chosen.addr) {
            scored.in_flight += 1;
            if let Standing::Probation { probing } = &mut scored.standing {
                *probing = true;
            }
        }
        Some((
            chosen,
            InFlight {
                service: service.clone(),
                addr: chosen.addr,
                verdict: false,
            },
        ))
    }

    fn service(&self, name: &Authority) -> Arc<Service> {
        let mut services = lock(&self.services);
        if let Some(service) = services.get(name) {
            return service.clone();
        }
        let rng = match self.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        let service = Arc::new(Service {
            name: name.clone(),
            settings: self.settings.clone(),
            state: Mutex::new(ServiceState {
                endpoints: HashMap::new(),
                rng,
            }),
            ejections: (self.ejections)(name),
        });
        services.insert(name.clone(), service.clone());
        service
    }

    /// Keeps each Service `endpoints_of` still lists endpoints for, with those
    /// endpoints only; forgets the rest.
    pub(crate) fn retain(&self, endpoints_of: impl Fn(&Authority) -> Option<Vec<Endpoint>>) {
        lock(&self.services).retain(|name, service| match endpoints_of(name) {
            Some(endpoints) if !endpoints.is_empty() => {
                Service::sync(&mut lock(&service.state), &endpoints, &service.settings);
                true
            }
            _ => false,
        });
    }

    /// Every Service and endpoint with its score and standing now, sorted.
    pub(crate) fn view(&self) -> Vec<ServiceView> {
        let now = Instant::now();
        let services: Vec<Arc<Service>> = lock(&self.services).values().cloned().collect();
        let mut views: Vec<ServiceView> = services
            .iter()
            .map(|service| {
                let mut state = lock(&service.state);
                let mut endpoints: Vec<EndpointView> = state
                    .endpoints
                    .iter_mut()
                    .map(|(addr, scored)| {
                        // Shows an ejection that ran out as the probation it is.
                        scored.available(now);
                        EndpointView {
                            addr: *addr,
                            health: scored.health(),
                            ewma_ms: scored.ewma(service.settings.decay, now) / 1e6,
                            in_flight: scored.in_flight,
                            consecutive_failures: scored.failures,
                            ejections: scored.ejections,
                        }
                    })
                    .collect();
                endpoints.sort_by_key(|e| e.addr);
                ServiceView {
                    service: service.name.clone(),
                    endpoints,
                }
            })
            .collect();
        views.sort_by(|a, b| a.service.cmp(&b.service));
        views
    }
}

/// A stream out to an endpoint: counted in flight until dropped. Delivery reports
/// on it what the endpoint did: a latency sample, and a verdict (the first one
/// counts).
pub(crate) struct InFlight {
    service: Arc<Service>,
    addr: SocketAddr,
    verdict: bool,
}

impl InFlight {
    #[cfg(test)]
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A latency sample: connect time for a connection, time to the first byte of
    /// the response for one request.
    pub(crate) fn sample(&self, latency: Duration) {
        let now = Instant::now();
        if let Some(scored) = lock(&self.service.state).endpoints.get_mut(&self.addr) {
            scored.sample(latency, &self.service.settings, now);
        }
    }

    /// The endpoint answered: its failures are forgiven and an ejected or probed
    /// endpoint is restored.
    pub(crate) fn succeeded(&mut self) {
        if std::mem::replace(&mut self.verdict, true) {
            return;
        }
        let mut state = lock(&self.service.state);
        let Some(scored) = state.endpoints.get_mut(&self.addr) else {
            return;
        };
        scored.failures = 0;
        if !matches!(scored.standing, Standing::Active) {
            info!(service = %self.service.name, endpoint = %self.addr, "endpoint answered again: restored");
            scored.standing = Standing::Active;
            scored.ejection_backoff = Backoff::new(
                self.service.settings.eject_min,
                self.service.settings.eject_max,
            );
        }
    }

    /// The endpoint failed this stream (refused, timed out, reset before any byte
    /// of its answer, or said it is overloaded).
    pub(crate) fn failed(&mut self) {
        if std::mem::replace(&mut self.verdict, true) {
            return;
        }
        let settings = &self.service.settings;
        let mut state = lock(&self.service.state);
        let Some(scored) = state.endpoints.get_mut(&self.addr) else {
            return;
        };
        scored.failures = scored.failures.saturating_add(1);
        let eject = match scored.standing {
            Standing::Active => scored.failures >= settings.failures_to_eject,
            Standing::Probation { .. } => true,
            // Chosen in panic mode: it stays out, for no longer than it was.
            Standing::Ejected { .. } => false,
        };
        if eject {
            let backoff = scored.ejection_backoff.next_delay();
            scored.standing = Standing::Ejected {
                until: Instant::now() + backoff,
            };
            scored.ejections += 1;
            self.service.ejections.inc();
            warn!(service = %self.service.name, endpoint = %self.addr, failures = scored.failures, ?backoff, "endpoint ejected");
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = lock(&self.service.state);
        let Some(scored) = state.endpoints.get_mut(&self.addr) else {
            return;
        };
        scored.in_flight = scored.in_flight.saturating_sub(1);
        // A probe that ended without a verdict (the client left) proves nothing:
        // the next stream probes instead.
        if let Standing::Probation { probing } = &mut scored.standing
            && !self.verdict
        {
            *probing = false;
        }
    }
}

#[cfg(test)]
mod tests;
