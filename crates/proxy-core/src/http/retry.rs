//! When a failed request may be sent again: which requests can be repeated
//! (idempotent methods, or a Service that says so), which failures are worth it
//! (nothing of a response came back), and the per-Service budget that keeps retries
//! from multiplying the load on a Service that is already failing.
//!
//! The budget is Linkerd's (after Finagle's `RetryBudget`): retries may add a share
//! of the requests of the last few seconds, plus a small floor per second so that a
//! quiet Service can still retry at all.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Method;
use isthmus_vocab::{Authority, Refusal};
use tokio::time::Instant;

/// Settings of the per-Service retry budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetSettings {
    /// Retries may add this share of the requests seen within `window`.
    pub ratio: f64,
    /// Retries allowed per second of `window` whatever the traffic.
    pub min_per_second: u32,
    /// How far back requests and retries are counted.
    pub window: Duration,
}

/// Linkerd's defaults: 20% of requests plus 10 per second, over 10 seconds.
impl Default for BudgetSettings {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Seconds are counted in buckets of this width; the window slides by them.
const BUCKET: Duration = Duration::from_secs(1);

/// One Service's retry budget. Cheap to share.
#[derive(Debug)]
pub struct RetryBudget {
    settings: BudgetSettings,
    counts: Mutex<Counts>,
}

#[derive(Debug)]
struct Counts {
    origin: Instant,
    /// (bucket index since `origin`, requests, retries), oldest first.
    buckets: VecDeque<(u64, u64, u64)>,
}

impl RetryBudget {
    pub fn new(settings: BudgetSettings) -> Self {
        Self {
            settings,
            counts: Mutex::new(Counts {
                origin: Instant::now(),
                buckets: VecDeque::new(),
            }),
        }
    }

    /// Counts a request (its first attempt).
    pub fn request(&self) {
        self.with_current(|bucket| bucket.1 += 1);
    }

    /// Takes one retry from the budget: `false` when it is spent.
    pub fn try_retry(&self) -> bool {
        let window_secs = self.settings.window.as_secs_f64();
        let floor = f64::from(self.settings.min_per_second) * window_secs;
        let mut allowed = false;
        self.with_current_and_totals(|bucket, requests, retries| {
            let limit = self.settings.ratio * requests as f64 + floor;
            if (retries as f64) < limit {
                bucket.2 += 1;
                allowed = true;
            }
        });
        allowed
    }

    fn with_current(&self, f: impl FnOnce(&mut (u64, u64, u64))) {
        self.with_current_and_totals(|bucket, _, _| f(bucket));
    }

    /// Runs `f` on the current bucket with the window's request and retry totals,
    /// after dropping the buckets that left the window.
    fn with_current_and_totals(&self, f: impl FnOnce(&mut (u64, u64, u64), u64, u64)) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let now = (counts.origin.elapsed().as_millis() / BUCKET.as_millis()) as u64;
        let span = (self.settings.window.as_millis() / BUCKET.as_millis()).max(1) as u64;
        while counts
            .buckets
            .front()
            .is_some_and(|(index, _, _)| index + span <= now)
        {
            counts.buckets.pop_front();
        }
        if counts
            .buckets
            .back()
            .is_none_or(|(index, _, _)| *index != now)
        {
            counts.buckets.push_back((now, 0, 0));
        }
        let (requests, retries) = counts
            .buckets
            .iter()
            .fold((0, 0), |(q, r), (_, bq, br)| (q + bq, r + br));
        if let Some(bucket) = counts.buckets.back_mut() {
            f(bucket, requests, retries);
        }
    }
}

/// Most Services whose budgets are kept; past it the idle ones are forgotten.
const MAX_BUDGETS: usize = 4096;

/// The retry budgets of every Service one proxy sends requests to, by authority.
#[derive(Debug, Default)]
pub struct RetryBudgets {
    settings: BudgetSettings,
    budgets: Mutex<HashMap<Authority, Arc<RetryBudget>>>,
}

impl RetryBudgets {
    pub fn new(settings: BudgetSettings) -> Self {
        Self {
            settings,
            budgets: Mutex::default(),
        }
    }

    /// `authority`'s budget, made on first use.
    pub fn get(&self, authority: &Authority) -> Arc<RetryBudget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(budget) = budgets.get(authority) {
            return budget.clone();
        }
        if budgets.len() >= MAX_BUDGETS {
            // Held only by this map: no request of that Service is in flight.
            budgets.retain(|_, budget| Arc::strong_count(budget) > 1);
        }
        let budget = Arc::new(RetryBudget::new(self.settings));
        budgets.insert(authority.clone(), budget.clone());
        budget
    }
}

/// RFC 9110 §9.2.2: repeating these has the effect of sending them once (`CONNECT`
/// and `POST`, `PATCH` are not, nor are extension methods).
pub fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

/// Refusals a new stream may not meet: the far gateway picks again, or the link
/// comes back. A refusal about the request itself (not exported, no route, a loop)
/// would only be repeated.
pub fn is_retryable_refusal(refusal: Refusal) -> bool {
    matches!(
        refusal,
        Refusal::LinkDown
            | Refusal::NoEndpoints
            | Refusal::UpstreamRefused
            | Refusal::UpstreamTimeout
    )
}

/// Why a request was sent again, as the `reason` label of
/// `request_retries_total` (bounded: these values only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// The stream was refused with a retryable [`Refusal`].
    Refused,
    /// The tunnel connection failed, or the stream was reset before a response.
    Failed,
    /// The attempt's own deadline passed without a response head.
    AttemptTimeout,
    /// The response's status is one the Service retries.
    Status,
}

impl RetryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Refused => "refused",
            RetryReason::Failed => "failed",
            RetryReason::AttemptTimeout => "attempt_timeout",
            RetryReason::Status => "status",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_are_the_rfcs() {
        for method in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            assert!(is_idempotent(&method.parse().unwrap()), "{method}");
        }
        for method in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!is_idempotent(&method.parse().unwrap()), "{method}");
        }
    }

    #[test]
    fn only_refusals_a_new_stream_may_escape_are_retried() {
        let retried: Vec<_> = Refusal::ALL
            .into_iter()
            .filter(|r| is_retryable_refusal(*r))
            .collect();
        assert_eq!(
            retried,
            [
                Refusal::NoEndpoints,
                Refusal::LinkDown,
                Refusal::UpstreamRefused,
                Refusal::UpstreamTimeout
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_a_share_of_requests_plus_a_floor() {
        let budget = RetryBudget::new(BudgetSettings {
            ratio: 0.2,
            min_per_second: 1,
            window: Duration::from_secs(10),
        });
        // A floor of 1 per second over 10 seconds: 10 retries with no traffic.
        let floor = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(floor, 10);
        // 100 requests add 20.
        for _ in 0..100 {
            budget.request();
        }
        let share = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(share, 20);
        // Once the window has passed, the retries spent are forgotten, and so are
        // the requests that paid for them.
        tokio::time::advance(Duration::from_secs(11)).await;
        let again = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(again, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_gets_the_ratio_not_a_multiple() {
        let budget = RetryBudget::new(BudgetSettings {
            ratio: 0.2,
            min_per_second: 0,
            window: Duration::from_secs(10),
        });
        let mut retries = 0;
        // Every request fails and would retry twice: the budget lets a fifth through.
        for _ in 0..1000 {
            budget.request();
            retries += (0..2).filter(|_| budget.try_retry()).count();
            tokio::time::advance(Duration::from_millis(5)).await;
        }
        assert!((195..=201).contains(&retries), "{retries}");
    }

    #[test]
    fn budgets_are_per_service() {
        let budgets = RetryBudgets::new(BudgetSettings {
            ratio: 0.0,
            min_per_second: 1,
            window: Duration::from_secs(1),
        });
        let a = Authority::parse("a.test:80").unwrap();
        let b = Authority::parse("b.test:80").unwrap();
        assert!(budgets.get(&a).try_retry());
        assert!(!budgets.get(&a).try_retry());
        assert!(budgets.get(&b).try_retry());
    }
}
