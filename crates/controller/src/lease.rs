//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas can run
//! and only one writes.
//!
//! The algorithm is client-go's: a candidate takes the Lease when it is free or
//! when its record (holder, renew time, resourceVersion) has not changed for
//! `leaseDurationSeconds` of the candidate's own clock (never comparing clocks
//! across machines); the holder renews every third of the duration; every write
//! carries the resourceVersion it read, so two candidates cannot both win. A leader
//! holds a deadline of `renew_deadline` (shorter than the lease duration) after the
//! start of its last successful renewal: past it, [`Leadership::is_leading`] turns
//! false at once, even while a renewal request hangs, so it has stopped writing
//! before anyone else may take over.
//!
//! This module elects; it does not run the controller (see [`crate::run`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

/// How the election runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The Lease's namespace (the control plane's).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (`holderIdentity`): unique per replica, e.g. the
    /// pod name.
    pub identity: String,
    /// `leaseDurationSeconds`: how long others wait for a silent holder.
    pub lease_duration: Duration,
}

impl LeaseConfig {
    /// How long a leader keeps writing after the start of its last successful
    /// renewal: two thirds of the lease duration, leaving a third as margin
    /// before a candidate may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// How often the holder renews and candidates look.
    pub fn retry_period(&self) -> Duration {
        (self.lease_duration / 6).max(Duration::from_millis(50))
    }
}

/// Errors talking to the API server about the Lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API call failed.
    #[error("Lease {namespace}/{name}: {action}")]
    Api {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// What was attempted.
        action: &'static str,
        /// Why it failed.
        #[source]
        source: kube::Error,
    },
    /// The API call did not answer in time.
    #[error("Lease {namespace}/{name}: {action} timed out")]
    Timeout {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// What was attempted.
        action: &'static str,
    },
}

/// A cheap, cloneable view of whether this replica leads.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// `Some(deadline)` while leading.
    rx: watch::Receiver<Option<Instant>>,
    /// Set once the API server has answered a Lease round (this replica knows
    /// who leads): a standby is then ready to take over.
    answered: Arc<AtomicBool>,
}

impl Leadership {
    /// A leadership that always leads (a single replica without election, and
    /// tests of other parts).
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(Some(
            Instant::now() + Duration::from_secs(100 * 365 * 86400),
        ));
        // The sender is dropped: the value stays.
        drop(tx);
        Self {
            rx,
            answered: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Whether the API server has answered one of this replica's Lease rounds.
    pub fn has_answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    /// Whether this replica leads now: it has renewed within the deadline.
    pub fn is_leading(&self) -> bool {
        matches!(*self.rx.borrow(), Some(deadline) if Instant::now() < deadline)
    }

    /// Waits until this replica leads.
    pub async fn leading(&mut self) {
        loop {
            let deadline = *self.rx.borrow_and_update();
            if deadline.is_some_and(|d| Instant::now() < d) {
                return;
            }
            if self.rx.changed().await.is_err() {
                // The elector is gone: leadership can never come.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until this replica no longer leads: the elector says so, or the
    /// deadline passes without a renewal.
    pub async fn lost(&mut self) {
        loop {
            let Some(deadline) = *self.rx.borrow_and_update() else {
                return;
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        // No more renewals can come: wait out the deadline.
                        tokio::time::sleep_until(deadline).await;
                        return;
                    }
                }
            }
        }
    }
}

/// Runs the election for one replica.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    tx: watch::Sender<Option<Instant>>,
    answered: Arc<AtomicBool>,
    /// The last record seen held by someone else, and when (our clock) it changed.
    observed: Option<(Option<String>, Option<String>, Instant)>,
}

/// What one attempt found.
enum Attempt {
    Leading(Instant),
    Following,
}

impl Elector {
    /// An elector writing through `client`, and the leadership view it drives.
    pub fn new(client: kube::Client, config: LeaseConfig) -> (Self, Leadership) {
        let (tx, rx) = watch::channel(None);
        let api = Api::namespaced(client, &config.namespace);
        let answered = Arc::new(AtomicBool::new(false));
        (
            Self {
                api,
                config,
                tx,
                answered: answered.clone(),
                observed: None,
            },
            Leadership { rx, answered },
        )
    }

    /// Campaigns and renews until `shutdown`, then releases the Lease if held, so
    /// a successor need not wait out the duration.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let started = Instant::now();
            let attempt = tokio::select! {
                () = &mut shutdown => break,
                a = self.attempt(started) => a,
            };
            let leading_before = self.tx.borrow().is_some();
            // A leader renews every third of the duration; retries and candidates
            // look more often, so a renewal has several tries before its deadline.
            let mut period = self.config.retry_period();
            if attempt.is_ok() {
                self.answered.store(true, Ordering::Release);
            }
            match attempt {
                Ok(Attempt::Leading(deadline)) => {
                    if !leading_before {
                        tracing::info!(lease = %self.config.name, identity = %self.config.identity,
                            "became the leader");
                    }
                    self.tx.send_replace(Some(deadline));
                    period = self.config.lease_duration / 3;
                }
                Ok(Attempt::Following) => {
                    if leading_before {
                        tracing::warn!(lease = %self.config.name, identity = %self.config.identity,
                            "lost the Lease to another replica; stopped writing");
                    }
                    self.tx.send_replace(None);
                }
                Err(e) => {
                    let deadline = *self.tx.borrow();
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        tracing::error!(lease = %self.config.name, error = %isthmus_vocab::error_chain(&e),
                            "could not renew the Lease before the deadline; stopped writing");
                        self.tx.send_replace(None);
                    } else {
                        tracing::warn!(lease = %self.config.name, error = %isthmus_vocab::error_chain(&e),
                            "Lease attempt failed; retrying");
                    }
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(period) => {}
            }
        }
        self.release().await;
    }

    async fn call<T>(
        &self,
        action: &'static str,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, LeaseError> {
        match tokio::time::timeout(self.config.retry_period() * 2, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(LeaseError::Api {
                namespace: self.config.namespace.clone(),
                name: self.config.name.clone(),
                action,
                source,
            }),
            Err(_) => Err(LeaseError::Timeout {
                namespace: self.config.namespace.clone(),
                name: self.config.name.clone(),
                action,
            }),
        }
    }

    async fn attempt(&mut self, started: Instant) -> Result<Attempt, LeaseError> {
        let now = MicroTime(Timestamp::now());
        let duration_secs =
            i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let deadline = started + self.config.renew_deadline();
        let name = self.config.name.clone();
        let current = self.call("get", self.api.get_opt(&name)).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            // A conflict: another replica created it first.
            let params = PostParams::default();
            let create = self.api.create(&params, &lease);
            return self.claim("create", create, deadline).await;
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(self.config.identity.as_str()) {
            spec.renew_time = Some(now);
            spec.lease_duration_seconds = Some(duration_secs);
            lease.spec = Some(spec);
            return self.write(lease, deadline, "renew").await;
        }
        // Someone else's record (or none): has it changed lately, by our clock?
        let record = (holder.clone(), lease.metadata.resource_version.clone());
        let observed_at = match &self.observed {
            Some((h, rv, at)) if (h, rv) == (&record.0, &record.1) => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record.0, record.1, at));
                at
            }
        };
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.config.lease_duration);
        if holder.is_some() && observed_at.elapsed() < their_duration {
            return Ok(Attempt::Following);
        }
        spec.holder_identity = Some(self.config.identity.clone());
        spec.lease_duration_seconds = Some(duration_secs);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        // As client-go counts: every change of holder, a released Lease included.
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        lease.spec = Some(spec);
        self.write(lease, deadline, "take over").await
    }

    /// Makes the write of the Lease `write`: done, this replica leads until
    /// `deadline`; refused with a conflict (409), another replica wrote first.
    async fn claim(
        &self,
        action: &'static str,
        write: impl Future<Output = Result<Lease, kube::Error>>,
        deadline: Instant,
    ) -> Result<Attempt, LeaseError> {
        match self.call(action, write).await {
            Ok(_) => Ok(Attempt::Leading(deadline)),
            Err(LeaseError::Api {
                source: kube::Error::Api(s),
                ..
            }) if s.code == 409 => Ok(Attempt::Following),
            Err(e) => Err(e),
        }
    }

    /// Replaces the Lease with the resourceVersion it was read at: a conflict
    /// means someone else wrote first.
    async fn write(
        &self,
        lease: Lease,
        deadline: Instant,
        action: &'static str,
    ) -> Result<Attempt, LeaseError> {
        let params = PostParams::default();
        let replace = self.api.replace(&self.config.name, &params, &lease);
        self.claim(action, replace, deadline).await
    }

    async fn release(self) {
        if self.tx.borrow().is_none() {
            return;
        }
        // Stop writing before giving the Lease away.
        self.tx.send_replace(None);
        let result = async {
            let Some(mut lease) = self
                .call("get", self.api.get_opt(&self.config.name))
                .await?
            else {
                return Ok(());
            };
            let mut spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            lease.spec = Some(spec);
            self.call(
                "release",
                self.api
                    .replace(&self.config.name, &PostParams::default(), &lease),
            )
            .await
            .map(drop)
        }
        .await;
        match result {
            Ok(()) => tracing::info!(lease = %self.config.name, "released the Lease"),
            Err(e) => {
                tracing::warn!(lease = %self.config.name, error = %isthmus_vocab::error_chain(&e),
                "could not release the Lease; a successor waits out its duration")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leadership_ends_at_the_deadline_without_a_word_from_the_elector() {
        let (tx, rx) = watch::channel(None);
        let mut leadership = Leadership {
            rx,
            answered: Arc::default(),
        };
        assert!(!leadership.is_leading());
        let deadline = Instant::now() + Duration::from_secs(10);
        tx.send_replace(Some(deadline));
        tokio::time::timeout(Duration::from_secs(1), leadership.leading())
            .await
            .expect("leading as soon as a deadline ahead is published");
        assert!(leadership.is_leading());
        // The elector hangs (no renewal, no news): leadership still ends on time.
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(60), leadership.lost())
            .await
            .expect("lost at the deadline");
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert!(!leadership.is_leading());
        drop(tx);
    }

    #[test]
    fn the_renew_deadline_leaves_a_margin_before_others_may_take_over() {
        let c = LeaseConfig {
            namespace: "isthmus".to_owned(),
            name: "isthmus-controller".to_owned(),
            identity: "a".to_owned(),
            lease_duration: Duration::from_secs(15),
        };
        assert_eq!(c.renew_deadline(), Duration::from_secs(10));
        assert!(c.retry_period() * 3 < c.renew_deadline());
    }
}
