//! The watcher's policy on tokio's paused clock, with a scripted lookup.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// Answers every lookup with what the test set last, and counts them.
#[derive(Default)]
struct Script {
    answer: Mutex<Option<io::Result<Vec<SocketAddr>>>>,
    calls: AtomicUsize,
}

impl Script {
    fn answer(&self, answer: io::Result<Vec<SocketAddr>>) {
        *self.answer.lock().unwrap() = Some(answer);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Lookup for Script {
    fn lookup<'a>(&'a self, _: &'a str, _: u16) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = match self.answer.lock().unwrap().as_ref() {
            Some(Ok(addrs)) => Ok(addrs.clone()),
            Some(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
            None => Ok(Vec::new()),
        };
        Box::pin(async move { answer })
    }
}

/// Never answers.
struct Silent;

impl Lookup for Silent {
    fn lookup<'a>(&'a self, _: &'a str, _: u16) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(std::future::pending())
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn name() -> GatewayHost {
    GatewayHost::parse("gateway.cluster-a.example").unwrap()
}

fn settings(lookup: Arc<dyn Lookup>) -> ResolveSettings {
    ResolveSettings {
        lookup,
        ..ResolveSettings::default()
    }
}

/// Lets the watcher task run what it can without the clock moving.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// A watcher on a script that answers `first`, after its first lookup.
async fn watching(first: &[&str]) -> (Arc<Script>, AddrWatch, CancellationToken) {
    let script = Arc::new(Script::default());
    script.answer(Ok(first.iter().map(|a| addr(a)).collect()));
    let stop = CancellationToken::new();
    let watch = AddrWatch::spawn(
        &name(),
        4143,
        &settings(script.clone()),
        stop.clone(),
        &TaskTracker::new(),
    );
    settle().await;
    assert_eq!(script.calls(), 1, "the name is looked up at once");
    (script, watch, stop)
}

fn addrs_of(watch: &AddrWatch) -> Vec<SocketAddr> {
    watch.current().addrs.to_vec()
}

#[tokio::test(start_paused = true)]
async fn a_name_is_looked_up_again_every_interval() {
    let (script, watch, _stop) = watching(&["198.18.0.2:4143"]).await;
    assert_eq!(addrs_of(&watch), [addr("198.18.0.2:4143")]);
    assert!(watch.current().resolved_at.is_some());

    script.answer(Ok(vec![addr("198.18.0.3:4143")]));
    tokio::time::advance(DEFAULT_INTERVAL - Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(script.calls(), 1, "looked up again before the interval");
    assert_eq!(addrs_of(&watch), [addr("198.18.0.2:4143")]);

    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(script.calls(), 2);
    assert_eq!(addrs_of(&watch), [addr("198.18.0.3:4143")]);
}

#[tokio::test(start_paused = true)]
async fn a_connection_failure_looks_up_at_once_and_many_cost_one_lookup() {
    let (script, watch, _stop) = watching(&["198.18.0.2:4143"]).await;
    tokio::time::advance(Duration::from_secs(5)).await;
    script.answer(Ok(vec![addr("198.18.0.3:4143")]));
    // Every connection of the pool fails together.
    for _ in 0..3 {
        watch.refresh();
    }
    settle().await;
    assert_eq!(script.calls(), 2, "one lookup for the failures, at once");
    assert_eq!(addrs_of(&watch), [addr("198.18.0.3:4143")]);

    // A failure right after a lookup waits for the floor.
    watch.refresh();
    settle().await;
    assert_eq!(script.calls(), 2, "two lookups within the floor");
    tokio::time::advance(MIN_INTERVAL).await;
    settle().await;
    assert_eq!(script.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_lookup_keeps_the_last_good_addresses_and_retries() {
    let (script, mut watch, _stop) = watching(&["198.18.0.2:4143"]).await;
    script.answer(Err(io::Error::other("no such host")));
    tokio::time::advance(DEFAULT_INTERVAL).await;
    settle().await;
    assert_eq!(script.calls(), 2);
    let now = watch.current();
    assert_eq!(*now.addrs, [addr("198.18.0.2:4143")], "last good kept");
    let failing = now.failing.expect("the failure is recorded");
    assert_eq!(failing.consecutive, 1);
    assert!(
        failing
            .error
            .contains("cannot resolve gateway.cluster-a.example: no such host"),
        "{}",
        failing.error
    );

    // Connection failures do not hurry a failing name.
    watch.refresh();
    settle().await;
    assert_eq!(script.calls(), 2);

    // Retried sooner than the interval, and still kept.
    tokio::time::advance(DEFAULT_INTERVAL - Duration::from_millis(1)).await;
    settle().await;
    assert!(script.calls() >= 3, "not retried within the interval");
    assert_eq!(addrs_of(&watch), [addr("198.18.0.2:4143")]);
    assert!(watch.current().failing.unwrap().consecutive >= 2);

    // It resolves again: the new answer, and no failure.
    script.answer(Ok(vec![addr("198.18.0.4:4143")]));
    tokio::time::timeout(DEFAULT_INTERVAL * 2, async {
        while addrs_of(&watch) != [addr("198.18.0.4:4143")] {
            assert!(watch.changed().await);
        }
    })
    .await
    .expect("the name did not resolve again");
    assert_eq!(watch.current().failing, None);
}

#[tokio::test(start_paused = true)]
async fn an_empty_answer_is_a_failure_and_keeps_the_last_good_addresses() {
    let (script, watch, _stop) = watching(&["198.18.0.2:4143", "198.18.0.3:4143"]).await;
    script.answer(Ok(Vec::new()));
    tokio::time::advance(DEFAULT_INTERVAL).await;
    settle().await;
    let now = watch.current();
    assert_eq!(now.addrs.len(), 2);
    assert_eq!(
        &*now.failing.unwrap().error,
        "gateway.cluster-a.example resolves to no address"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stopped_watcher_looks_up_no_more() {
    let (script, mut watch, stop) = watching(&["198.18.0.2:4143"]).await;
    stop.cancel();
    settle().await;
    tokio::time::advance(DEFAULT_INTERVAL * 3).await;
    settle().await;
    assert_eq!(script.calls(), 1);
    // The first answer may still be unseen; after it, the watch ends.
    let mut seen = 0;
    while watch.changed().await {
        seen += 1;
        assert!(seen < 2, "a stopped watcher still reports changes");
    }
}

#[tokio::test(start_paused = true)]
async fn resolve_keeps_addresses_a_gateway_can_be_at() {
    let script = Script::default();
    script.answer(Ok(vec![
        addr("198.18.0.3:4143"),
        addr("0.0.0.0:4143"),
        addr("224.0.0.1:4143"),
        addr("198.18.0.2:4143"),
        addr("198.18.0.3:4143"),
    ]));
    let t = DEFAULT_TIMEOUT;
    assert_eq!(
        resolve(&script, &name(), 4143, t).await.unwrap(),
        [addr("198.18.0.2:4143"), addr("198.18.0.3:4143")]
    );
    script.answer(Ok(vec![addr("0.0.0.0:4143"), addr("[ff02::1]:4143")]));
    assert_eq!(
        resolve(&script, &name(), 4143, t)
            .await
            .unwrap_err()
            .to_string(),
        "gateway.cluster-a.example resolves only to addresses a gateway cannot be at \
         (unspecified, multicast or broadcast): 0.0.0.0, ff02::1"
    );
    let timed_out = resolve(&Silent, &name(), 4143, t).await.unwrap_err();
    assert_eq!(
        timed_out.to_string(),
        "resolving gateway.cluster-a.example took over 5s"
    );
    // An IP literal is used as it is, without a lookup.
    let ip = GatewayHost::parse("198.18.0.9").unwrap();
    assert_eq!(
        resolve(&Silent, &ip, 4143, t).await.unwrap(),
        [addr("198.18.0.9:4143")]
    );
}

#[test]
fn literals_no_gateway_can_be_at_are_refused() {
    for bad in ["0.0.0.0", "::", "255.255.255.255", "224.0.0.1", "ff02::1"] {
        let err = GatewayHost::parse(bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{bad} is not an address a gateway can be at (unspecified, multicast or broadcast)"
            )
        );
    }
    assert_eq!(
        GatewayHost::parse("127.0.0.1").unwrap(),
        GatewayHost::Ip("127.0.0.1".parse().unwrap())
    );
    assert_eq!(
        GatewayHost::parse("gw.example").unwrap(),
        GatewayHost::Name(Arc::from("gw.example"))
    );
}
