//! The gateway's endpoint choice against three HTTP/1.1 origins on loopback, the
//! gateway's stream handler called directly (no TLS, no root): a slow origin gets
//! few requests; one that fails (resets every connection, or answers `503` with
//! `Retry-After`) is ejected, gets nothing while it is, and is tried again once its
//! backoff ran out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_vocab::{Authority, ClusterName, Refusal, SpiffeId};
use proxy_core::gateway::{
    Endpoint, Gateway, GatewayConfig, GatewayLookup, GatewayMetrics, GatewayTls, Health, LinkTarget,
};
use proxy_core::tunnel::server::{OneRequest, Peer, TunnelHandler, TunnelRequest, Upstream};
use support::{CLUSTER, GATEWAY_ID, HELLO, Identity, Pki, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How an origin answers, switchable while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Answer {
    Ok = 0,
    /// 100 ms late.
    Slow = 1,
    /// `503` with `Retry-After`: overloaded.
    Overloaded = 2,
    /// Reads the request, then resets the connection.
    Reset = 3,
}

/// An HTTP/1.1 origin that counts the requests it received.
struct Origin {
    addr: SocketAddr,
    answer: Arc<AtomicU8>,
    requests: Arc<AtomicUsize>,
}

impl Origin {
    async fn spawn(answer: Answer) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, requests) = (
            Arc::new(AtomicU8::new(answer as u8)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (mode_in, requests_in) = (mode.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (mode, requests) = (mode_in.clone(), requests_in.clone());
                tokio::spawn(async move {
                    let mut head = vec![0; 1024];
                    let Ok(n) = conn.read(&mut head).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let reply: &[u8] = match mode.load(Ordering::SeqCst) {
                        m if m == Answer::Slow as u8 => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        }
                        m if m == Answer::Overloaded as u8 => {
                            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 2\r\n\r\nno"
                        }
                        m if m == Answer::Reset as u8 => return support::abort(conn),
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                    };
                    let _ = conn.write_all(reply).await;
                });
            }
        });
        Origin {
            addr,
            answer: mode,
            requests,
        }
    }

    fn set(&self, answer: Answer) {
        self.answer.store(answer as u8, Ordering::SeqCst);
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// One exported Service, [`HELLO`], at the origins; and Links.
struct Exports(Vec<Endpoint>, BTreeMap<ClusterName, LinkTarget>);

impl GatewayLookup for Exports {
    fn exported(&self, authority: &Authority) -> Result<Vec<Endpoint>, Refusal> {
        match authority.as_str() {
            HELLO => Ok(self.0.clone()),
            _ => Err(Refusal::NoRoute),
        }
    }

    fn links(&self) -> BTreeMap<ClusterName, LinkTarget> {
        self.1.clone()
    }

    fn is_endpoint(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|e| e.addr.ip() == ip)
    }
}

/// Every endpoint is plain TCP; a Link's peer must be of our own cluster.
struct OwnClusterTls(Identity);

impl GatewayTls for OwnClusterTls {
    fn link(&self, _: &ClusterName, _: &SpiffeId) -> Arc<proxy_identity::rustls::ClientConfig> {
        self.0.client_config(self.0.own_cluster_policy())
    }

    fn pod(&self) -> Arc<proxy_identity::rustls::ClientConfig> {
        self.0.client_config(self.0.own_cluster_policy())
    }
}

fn gateway(origins: &[Origin]) -> Arc<Gateway> {
    gateway_linked(&Pki::new(), origins, BTreeMap::new())
}

fn gateway_linked(
    pki: &Pki,
    origins: &[Origin],
    links: BTreeMap<ClusterName, LinkTarget>,
) -> Arc<Gateway> {
    let timeouts = Duration::from_secs(1);
    Gateway::new(
        GatewayConfig {
            cluster: ClusterName::parse(CLUSTER).unwrap(),
            connect_timeout: timeouts,
            own_addrs: HashSet::new(),
            allow_local_endpoints: true,
            pod_port: 1,
            pools: support::gateway_pools(timeouts),
            balance: Default::default(),
        },
        Arc::new(Exports(
            origins
                .iter()
                .map(|o| Endpoint {
                    addr: o.addr,
                    meshed: false,
                })
                .collect(),
            links,
        )),
        Arc::new(OwnClusterTls(pki.identity(CLUSTER, GATEWAY_ID))),
        GatewayMetrics::default(),
        CancellationToken::new(),
        TaskTracker::new(),
    )
}

/// One request through the gateway, as a stream that carries it alone or as a
/// connection's stream; whether a `200` came back.
async fn request(gateway: &Gateway, one_request: Option<OneRequest>) -> bool {
    let stream = TunnelRequest {
        authority: Authority::parse(HELLO).unwrap(),
        cluster: None,
        peer: Peer::default(),
        local: None,
        one_request,
    };
    let Ok(Upstream::Connected(mut io)) = gateway.open(&stream).await else {
        return false;
    };
    let exchange = async {
        io.write_all(b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n")
            .await
            .ok()?;
        // Read as the forwarder reads, in chunks that hold an answer's head.
        let (mut answer, mut chunk) = (Vec::new(), [0; 1024]);
        loop {
            match io.read(&mut chunk).await.ok()? {
                0 => return Some(answer),
                n => answer.extend_from_slice(&chunk[..n]),
            }
        }
    };
    // The origins close after one answer, so the whole answer is read to its end.
    match timeout(STEP, exchange).await.expect("no answer in time") {
        Some(answer) => answer.starts_with(b"HTTP/1.1 200"),
        None => false,
    }
}

fn health(gateway: &Gateway, origin: &Origin) -> Health {
    gateway.endpoints()[0]
        .endpoints
        .iter()
        .find(|e| e.addr == origin.addr)
        .expect("the endpoint is known")
        .health
}

#[tokio::test]
async fn a_slow_origin_gets_few_requests() {
    let origins = [
        Origin::spawn(Answer::Ok).await,
        Origin::spawn(Answer::Ok).await,
        Origin::spawn(Answer::Slow).await,
    ];
    let gateway = gateway(&origins);
    for _ in 0..200 {
        assert!(request(&gateway, Some(OneRequest::Http1)).await);
    }
    let counts: Vec<usize> = origins.iter().map(Origin::requests).collect();
    // Without scores a third would go to it; once sampled it loses every choice
    // until its score fades, which takes far longer than this test.
    assert!(counts[2] < 20, "the slow origin got {counts:?}");
    assert!(counts[0] > 50 && counts[1] > 50, "{counts:?}");
}

#[tokio::test]
async fn a_failing_origin_is_ejected_then_tried_again() {
    for (failing, one_request) in [
        (Answer::Reset, None),
        (Answer::Reset, Some(OneRequest::Http1)),
        (Answer::Overloaded, Some(OneRequest::Http1)),
    ] {
        let origins = [
            Origin::spawn(Answer::Ok).await,
            Origin::spawn(Answer::Ok).await,
            Origin::spawn(failing).await,
        ];
        let gateway = gateway(&origins);
        let bad = &origins[2];
        let mut sent = 0;
        loop {
            request(&gateway, one_request).await;
            sent += 1;
            if health(&gateway, bad) == Health::Ejected {
                break;
            }
            // Paced: a new endpoint's default latency fades within a second or
            // so, and only then does it get its share.
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(
                sent < 1000,
                "{failing:?} ({one_request:?}): not ejected after {sent} requests, it got {}",
                bad.requests()
            );
        }
        assert_eq!(bad.requests(), 5, "{failing:?} ({one_request:?})");
        // Ejected: the others answer everything.
        for _ in 0..20 {
            assert!(request(&gateway, one_request).await);
        }
        assert_eq!(bad.requests(), 5, "{failing:?} ({one_request:?})");
        // It heals; once its backoff (1 to 2 s) ran out a request probes it and
        // it is back.
        bad.set(Answer::Ok);
        timeout(Duration::from_secs(10), async {
            while bad.requests() == 5 {
                assert!(request(&gateway, one_request).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the ejected origin was never tried again");
        assert_eq!(health(&gateway, bad), Health::Active);
    }
}

/// The far gateway as a relay sees it: records what each stream says it carries
/// and refuses it.
struct Marks(Mutex<Vec<Option<OneRequest>>>);

impl TunnelHandler for Marks {
    async fn open(&self, request: &TunnelRequest) -> Result<Upstream, Refusal> {
        self.0.lock().unwrap().push(request.one_request);
        Err(Refusal::NoEndpoints)
    }
}

#[tokio::test]
async fn a_relayed_stream_says_what_it_carries_to_the_gateway_that_chooses() {
    let pki = Pki::new();
    let far = pki.identity(CLUSTER, GATEWAY_ID);
    let marks = Arc::new(Marks(Mutex::new(Vec::new())));
    let metrics = proxy_core::metrics::ProxyMetrics::default();
    let listener =
        support::MeshListener::spawn(&far, far.own_cluster_policy(), marks.clone(), &metrics).await;
    let far_cluster = ClusterName::parse("cluster-b").unwrap();
    let link = LinkTarget {
        address: listener.addr.ip().to_string(),
        port: listener.addr.port(),
        identity: far.id.clone(),
        probe_period: Duration::from_secs(60),
        probe_port: 4191,
        probe_path: "/ready".to_owned(),
    };
    let gateway = gateway_linked(&pki, &[], BTreeMap::from([(far_cluster.clone(), link)]));
    let (_changes, changed) = tokio::sync::watch::channel(());
    tokio::spawn(gateway.clone().follow(changed));
    for one_request in [None, Some(OneRequest::Http1), Some(OneRequest::H2)] {
        let stream = TunnelRequest {
            authority: Authority::parse(HELLO).unwrap(),
            cluster: Some(far_cluster.clone()),
            peer: Peer {
                cluster: Some(ClusterName::parse(CLUSTER).unwrap()),
                ..Peer::default()
            },
            local: None,
            one_request,
        };
        // The link's pool is up once the gateway followed its Links.
        let relayed = timeout(STEP, async {
            loop {
                match gateway.open(&stream).await {
                    Ok(Upstream::Relayed(relayed)) => break relayed,
                    Ok(Upstream::Connected(_)) => panic!("delivered instead of relayed"),
                    Err(refusal) => {
                        assert_eq!(refusal, Refusal::UnknownCluster, "the link is known");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        let mut relayed = relayed.await.expect("the link never became known");
        let verdict = timeout(STEP, relayed.verdict()).await.expect("no answer");
        assert!(verdict.is_err(), "the far gateway refuses every stream");
    }
    assert_eq!(
        *marks.0.lock().unwrap(),
        [None, Some(OneRequest::Http1), Some(OneRequest::H2)]
    );
}
