//! The balancer on tokio's paused clock, its choices from a fixed seed.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use super::*;

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, last), 8080))
}

fn endpoints(lasts: &[u8]) -> Vec<Endpoint> {
    lasts
        .iter()
        .map(|&last| Endpoint {
            addr: addr(last),
            meshed: false,
        })
        .collect()
}

fn service() -> Authority {
    Authority::parse("hello.default.svc.cluster.local:80").unwrap()
}

fn balancer() -> (Balancer, Counter) {
    let ejections = Counter::default();
    let counted = ejections.clone();
    let mut balancer = Balancer::new(BalanceSettings::default(), move |_| counted.clone());
    balancer.seed = Some(17);
    (balancer, ejections)
}

fn pick(balancer: &Balancer, endpoints: &[Endpoint]) -> InFlight {
    balancer.pick(&service(), endpoints, &[]).unwrap().1
}

fn health(balancer: &Balancer, last: u8) -> Health {
    endpoint_view(balancer, last).health
}

fn endpoint_view(balancer: &Balancer, last: u8) -> EndpointView {
    balancer.view()[0]
        .endpoints
        .iter()
        .find(|e| e.addr == addr(last))
        .cloned()
        .unwrap()
}

/// `n` streams, one after the other, each answered after its endpoint's latency;
/// how many each endpoint got.
async fn run(
    balancer: &Balancer,
    eps: &[Endpoint],
    n: usize,
    latency: impl Fn(u8) -> u64,
) -> HashMap<u8, usize> {
    let mut picks = HashMap::new();
    for _ in 0..n {
        let mut stream = pick(balancer, eps);
        let last = match stream.addr().ip() {
            std::net::IpAddr::V4(v4) => v4.octets()[3],
            std::net::IpAddr::V6(_) => unreachable!(),
        };
        let took = Duration::from_millis(latency(last));
        tokio::time::advance(took).await;
        stream.sample(took);
        stream.succeeded();
        *picks.entry(last).or_default() += 1;
    }
    picks
}

#[tokio::test(start_paused = true)]
async fn a_slow_endpoint_gets_few_streams_once_it_was_sampled() {
    let (balancer, _) = balancer();
    let eps = endpoints(&[1, 2, 3]);
    // Warm-up: each endpoint answers at least once.
    run(&balancer, &eps, 30, |last| if last == 3 { 100 } else { 1 }).await;
    let picks = run(
        &balancer,
        &eps,
        1000,
        |last| if last == 3 { 100 } else { 1 },
    )
    .await;
    let slow = picks.get(&3).copied().unwrap_or(0);
    assert!(slow < 20, "the slow endpoint got {slow} of 1000: {picks:?}");
    assert!(picks[&1] > 300 && picks[&2] > 300, "{picks:?}");
}

#[tokio::test(start_paused = true)]
async fn equal_endpoints_share_streams_evenly() {
    let (balancer, _) = balancer();
    let eps = endpoints(&[1, 2, 3]);
    let picks = run(&balancer, &eps, 3000, |_| 5).await;
    for last in [1, 2, 3] {
        let got = picks[&last];
        assert!(
            (750..=1250).contains(&got),
            "endpoint {last} got {got}: {picks:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn latencies_under_the_floor_count_as_equal() {
    let (balancer, _) = balancer();
    let eps = endpoints(&[1, 2]);
    // Measured at 1 ms and 15 ms: both under the floor, so a blip of a few
    // milliseconds does not starve endpoint 2.
    for (last, ms) in [(1, 1), (2, 15)] {
        let stream = balancer
            .pick(&service(), &eps, &[addr(3 - last)])
            .unwrap()
            .1;
        stream.sample(Duration::from_millis(ms));
    }
    let on_2 = (0..100)
        .filter(|_| pick(&balancer, &eps).addr() == addr(2))
        .count();
    assert!((30..=70).contains(&on_2), "endpoint 2 got {on_2} of 100");
}

#[tokio::test(start_paused = true)]
async fn streams_in_flight_weigh_on_the_choice() {
    let (balancer, _) = balancer();
    let eps = endpoints(&[1, 2]);
    // Ten streams held open on endpoint 1 (endpoint 2 ruled out for them).
    let held: Vec<InFlight> = (0..10)
        .map(|_| balancer.pick(&service(), &eps, &[addr(2)]).unwrap().1)
        .collect();
    assert_eq!(endpoint_view(&balancer, 1).in_flight, 10);
    // At equal latency, the idle endpoint wins every choice.
    for _ in 0..20 {
        assert_eq!(pick(&balancer, &eps).addr(), addr(2));
    }
    drop(held);
    assert_eq!(endpoint_view(&balancer, 1).in_flight, 0);
    assert_eq!(endpoint_view(&balancer, 2).in_flight, 0);
}

/// Fails streams to endpoint `last` until it is ejected; how many it took.
fn fail_until_ejected(balancer: &Balancer, eps: &[Endpoint], last: u8) -> usize {
    let mut failures = 0;
    for _ in 0..1000 {
        let mut stream = pick(balancer, eps);
        if stream.addr() == addr(last) {
            stream.failed();
            failures += 1;
        } else {
            stream.succeeded();
        }
        if health(balancer, last) == Health::Ejected {
            return failures;
        }
    }
    panic!("endpoint {last} was never ejected");
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_eject_then_probation_restores_or_ejects_for_longer() {
    let (balancer, ejections) = balancer();
    let eps = endpoints(&[1, 2, 3]);
    assert_eq!(fail_until_ejected(&balancer, &eps, 3), 5);
    assert_eq!(ejections.get(), 1);
    // Ejected: no stream goes to it while others are there.
    for _ in 0..100 {
        assert_ne!(pick(&balancer, &eps).addr(), addr(3));
    }
    // The first backoff is 1 s, and jitter adds at most as much again.
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(health(&balancer, 3), Health::Ejected);
    tokio::time::advance(Duration::from_millis(1001)).await;
    assert_eq!(health(&balancer, 3), Health::Probation);
    // On probation one stream at a time goes to it.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(pick(&balancer, &eps));
    }
    let mut probes: Vec<InFlight> = held.into_iter().filter(|s| s.addr() == addr(3)).collect();
    assert_eq!(probes.len(), 1, "probation lets one stream through");
    // The probe fails: ejected again, for at least twice as long.
    probes[0].failed();
    drop(probes);
    assert_eq!(health(&balancer, 3), Health::Ejected);
    assert_eq!(ejections.get(), 2);
    tokio::time::advance(Duration::from_millis(1999)).await;
    assert_eq!(health(&balancer, 3), Health::Ejected);
    tokio::time::advance(Duration::from_millis(2001)).await;
    assert_eq!(health(&balancer, 3), Health::Probation);
    // This probe succeeds: the endpoint is back for good.
    let mut probe = (0..100)
        .map(|_| pick(&balancer, &eps))
        .find(|s| s.addr() == addr(3))
        .expect("a stream probes the endpoint");
    probe.succeeded();
    assert_eq!(health(&balancer, 3), Health::Active);
    assert_eq!(endpoint_view(&balancer, 3).consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn a_success_between_failures_starts_the_count_again() {
    let (balancer, _) = balancer();
    let eps = endpoints(&[1]);
    for _ in 0..3 {
        for _ in 0..4 {
            pick(&balancer, &eps).failed();
        }
        pick(&balancer, &eps).succeeded();
    }
    assert_eq!(health(&balancer, 1), Health::Active);
}

#[tokio::test(start_paused = true)]
async fn with_every_endpoint_ejected_one_is_still_chosen() {
    let (balancer, _) = balancer();
    let eps = endpoints(&[1, 2]);
    fail_until_ejected(&balancer, &eps, 1);
    fail_until_ejected(&balancer, &eps, 2);
    let stream = balancer.pick(&service(), &eps, &[]);
    assert!(
        stream.is_some(),
        "panic mode chooses among ejected endpoints"
    );
    // Those a stream already tried are not chosen again for it.
    assert!(
        balancer
            .pick(&service(), &eps, &[addr(1), addr(2)])
            .is_none()
    );
    assert_eq!(
        balancer.pick(&service(), &eps, &[addr(1)]).unwrap().0.addr,
        addr(2)
    );
}

#[tokio::test(start_paused = true)]
async fn scores_survive_discovery_updates_and_departed_endpoints_are_forgotten() {
    let (balancer, _) = balancer();
    run(&balancer, &endpoints(&[1, 2]), 50, |last| {
        if last == 2 { 100 } else { 1 }
    })
    .await;
    let before = endpoint_view(&balancer, 2).ewma_ms;
    assert!(before > 50.0, "{before}");
    // A new endpoint joins, listed first: endpoint 2 keeps its score.
    let grown = endpoints(&[3, 1, 2]);
    drop(pick(&balancer, &grown));
    assert!(endpoint_view(&balancer, 2).ewma_ms > 50.0);
    assert_eq!(balancer.view()[0].endpoints.len(), 3);
    // Endpoint 2 leaves: forgotten on the next choice.
    drop(pick(&balancer, &endpoints(&[3, 1])));
    assert_eq!(balancer.view()[0].endpoints.len(), 2);
    // The Service stops being exported: forgotten by the next sweep.
    balancer.retain(|_| Some(endpoints(&[1])));
    assert_eq!(balancer.view()[0].endpoints.len(), 1);
    balancer.retain(|_| None);
    assert!(balancer.view().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_idle_slow_endpoints_score_fades_so_it_is_tried_again() {
    let (balancer, _) = balancer();
    let eps = endpoints(&[1]);
    let stream = pick(&balancer, &eps);
    stream.sample(Duration::from_millis(200));
    drop(stream);
    let fresh = endpoint_view(&balancer, 1).ewma_ms;
    tokio::time::advance(DEFAULT_DECAY).await;
    let faded = endpoint_view(&balancer, 1).ewma_ms;
    assert!((fresh - 200.0).abs() < 1.0, "{fresh}");
    assert!((faded - 200.0 / std::f64::consts::E).abs() < 1.0, "{faded}");
    // A sample above the average replaces it once a second confirms it; one
    // below pulls it down by the weight of the time since the last.
    let stream = pick(&balancer, &eps);
    stream.sample(Duration::from_millis(300));
    assert!(
        (endpoint_view(&balancer, 1).ewma_ms - faded).abs() < 1.0,
        "a lone blip"
    );
    stream.sample(Duration::from_millis(300));
    assert!((endpoint_view(&balancer, 1).ewma_ms - 300.0).abs() < 1.0);
    tokio::time::advance(Duration::from_secs(1)).await;
    stream.sample(Duration::from_millis(100));
    let kept = (-0.1f64).exp();
    let expected = 300.0 * kept + 100.0 * (1.0 - kept);
    assert!((endpoint_view(&balancer, 1).ewma_ms - expected).abs() < 1.0);
}
