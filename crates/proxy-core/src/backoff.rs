//! Delays between retries of something that failed: doubling from a floor to a
//! ceiling, with jitter, so that the proxies and connection slots that lost the
//! same peer at once do not retry in step.
//!
//! The sequence is backon's exponential backoff. Its jitter adds up to the delay
//! again, so the doubling stops at half the ceiling and every delay stays within
//! `min..=max`: the bounds the callers were tuned with.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Retry delays within `min..=max`; [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    delays: ExponentialBackoff,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Delays from `min` up to `max` (`max` below `min` counts as `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            delays: Self::delays(min, max),
            min,
            max,
        }
    }

    fn delays(min: Duration, max: Duration) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The delay before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.delays
            .next()
            .unwrap_or(self.max)
            .clamp(self.min, self.max)
    }

    /// Starts again from `min`, after a success.
    pub fn reset(&mut self) {
        self.delays = Self::delays(self.min, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_jittered_within_the_bounds_and_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut backoff = Backoff::new(min, max);
        let first: Vec<Duration> = (0..40).map(|_| backoff.next_delay()).collect();
        assert!(first.iter().all(|d| (min..=max).contains(d)), "{first:?}");
        assert!(
            first[0] < min * 2,
            "the first try waits about min: {first:?}"
        );
        // Doubling reaches the ceiling's half, and jitter spreads the delays there.
        let tail = &first[20..];
        assert!(tail.iter().all(|d| *d >= max / 2), "{tail:?}");
        assert!(tail.iter().any(|d| d != &tail[0]), "no jitter: {tail:?}");
        backoff.reset();
        assert!(backoff.next_delay() < min * 2);
        // A ceiling under the floor is the floor.
        let mut flat = Backoff::new(min, Duration::ZERO);
        assert_eq!(flat.next_delay(), min);
        assert_eq!(flat.next_delay(), min);
    }
}
