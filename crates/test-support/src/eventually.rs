//! Retrying a check until it holds, within a bound, instead of sleeping and hoping.
//!
//! The async forms wait on tokio's clock, so a test that pauses time still ends; the
//! blocking form is for tests that run on plain threads.

use std::future::Future;
use std::time::Duration;

/// How often a check is retried: often enough not to slow a test down, rarely
/// enough not to load the proxy it polls.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Some`, for at most `limit`; fails the test
/// naming `what` when it never does.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        // A check that hangs fails the test at the deadline, rather than hanging it.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Ok(Some(value)) = tokio::time::timeout(left, check()).await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually()`] for tests on plain threads: sleeps the thread between checks.
pub fn eventually_blocking<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Waits (in an async test) until a condition holds, retrying every
/// [`POLL`](crate::eventually::POLL); fails the test after [`STEP`](crate::STEP), or
/// after the limit given with `within`, with the message given (the condition's
/// text by default).
///
/// ```ignore
/// assert_eventually!(discovery.snapshot().services().len() == 2);
/// assert_eventually!(within LONG, link_up(), "gateway-b's link to come up");
/// assert_eventually!(counter() > 0, "the origin saw {} connections", counter());
/// ```
#[macro_export]
macro_rules! assert_eventually {
    (within $limit:expr, $cond:expr $(,)?) => {
        $crate::eventually::eventually(stringify!($cond), $limit, || {
            ::std::future::ready(($cond).then_some(()))
        })
        .await
    };
    (within $limit:expr, $cond:expr, $($what:tt)+) => {
        $crate::eventually::eventually(&format!($($what)+), $limit, || {
            ::std::future::ready(($cond).then_some(()))
        })
        .await
    };
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!(within $crate::STEP, $cond)
    };
    ($cond:expr, $($what:tt)+) => {
        $crate::assert_eventually!(within $crate::STEP, $cond, $($what)+)
    };
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_what_the_check_found_once_it_holds() {
        let calls = AtomicUsize::new(0);
        let found = eventually("the third call", Duration::from_secs(1), || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready((n == 2).then_some(n))
        })
        .await;
        assert_eq!(found, 2);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 1s waiting for nothing")]
    async fn fails_naming_what_never_held() {
        eventually::<(), _, _>("nothing", Duration::from_secs(1), || {
            std::future::ready(None)
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "waiting for 1 + 1 == 3")]
    async fn the_macro_names_its_condition() {
        assert_eventually!(within Duration::from_secs(1), 1 + 1 == 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_macro_passes_once_the_condition_holds() {
        let calls = AtomicUsize::new(0);
        assert_eventually!(calls.fetch_add(1, Ordering::SeqCst) == 3, "four calls");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "waiting for an answer")]
    async fn a_check_that_hangs_fails_at_the_deadline() {
        eventually::<(), _, _>("an answer", Duration::from_secs(1), std::future::pending).await;
    }

    #[test]
    #[should_panic(expected = "waiting for never")]
    fn blocking_fails_after_its_limit() {
        eventually_blocking::<()>("never", Duration::from_millis(50), || None);
    }
}
