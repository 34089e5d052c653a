//! A sidecar's HTTP to a mirrored Service, request by request: each request on a
//! tunnel stream of its own, retried when it failed before any response, and cut
//! at the Service's deadline. The gateway stand-in answers each stream as its
//! script says, on loopback and without privileges.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_vocab::{Refusal, ServicePolicy};
use proxy_core::http::{BudgetSettings, RetryBudgets};
use proxy_core::metrics::{Direction, ProxyMetrics, RetryLabels, TimeoutLabels};
use proxy_core::tunnel::server::{OneRequest, TunnelHandler, TunnelRequest, Upstream};
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// A mirrored service's ClusterIP, as the app dials it; nothing listens there.
const HELLO_IP: &str = "127.0.0.1:9";

fn hello_ip() -> SocketAddr {
    HELLO_IP.parse().unwrap()
}

/// A gateway stand-in that answers the Nth stream with the Nth scripted answer,
/// and every stream past the script with `then`.
struct Scripted {
    script: Mutex<VecDeque<Answer>>,
    then: Answer,
    streams: Arc<AtomicUsize>,
    /// What each stream said it carries, in order.
    marks: Arc<Mutex<Vec<Option<OneRequest>>>>,
}

impl TunnelHandler for Scripted {
    async fn open(&self, request: &TunnelRequest) -> Result<Upstream, Refusal> {
        self.marks.lock().unwrap().push(request.one_request);
        self.streams.fetch_add(1, Ordering::SeqCst);
        let answer = self.script.lock().unwrap().pop_front();
        match answer.unwrap_or_else(|| self.then.clone()) {
            Answer::Deliver(addr) => match TcpStream::connect(addr).await {
                Ok(stream) => Ok(Upstream::Connected(Box::new(stream))),
                Err(_) => Err(Refusal::UpstreamRefused),
            },
            Answer::Refuse(refusal) => Err(refusal),
            Answer::Silent => std::future::pending().await,
        }
    }
}

/// A sidecar whose mirrored `hello` has `policy`, behind a scripted gateway.
struct Fixture {
    proxy: Listening,
    orig_dst: Arc<FakeOrigDst>,
    metrics: ProxyMetrics,
    streams: Arc<AtomicUsize>,
    marks: Arc<Mutex<Vec<Option<OneRequest>>>>,
    _gateway: MeshListener,
}

impl Fixture {
    async fn start(script: Vec<Answer>, then: Answer, policy: ServicePolicy) -> Fixture {
        Self::start_with_budget(script, then, policy, BudgetSettings::default()).await
    }

    async fn start_with_budget(
        script: Vec<Answer>,
        then: Answer,
        policy: ServicePolicy,
        budget: BudgetSettings,
    ) -> Fixture {
        let pki = Pki::new();
        let gateway_id = pki.identity(CLUSTER, GATEWAY_ID);
        let streams = Arc::new(AtomicUsize::new(0));
        let marks = Arc::default();
        let handler = Scripted {
            script: Mutex::new(script.into()),
            then,
            streams: streams.clone(),
            marks: Arc::clone(&marks),
        };
        let gateway_metrics = ProxyMetrics::default();
        let gateway = MeshListener::spawn(
            &gateway_id,
            gateway_id.own_cluster_policy(),
            Arc::new(handler),
            &gateway_metrics,
        )
        .await;
        let app = pki.identity(CLUSTER, WORKLOAD_ID);
        let pool = app.pool_to(&gateway_id, gateway.addr);
        let routes = FixedRoutes::default().mirror_addr_with(hello_ip(), CLUSTER, HELLO, policy);
        let orig_dst = FakeOrigDst::new();
        let metrics = ProxyMetrics::default();
        let mut handler = Arc::into_inner(outbound(
            routes,
            orig_dst.clone(),
            Some(pool),
            &[],
            &metrics,
        ))
        .unwrap();
        handler.retry_budgets = Arc::new(RetryBudgets::new(budget));
        let proxy = Listening::start(
            Arc::new(handler),
            "127.0.0.1:0".parse().unwrap(),
            Direction::Outbound,
            &metrics,
        )
        .await;
        Fixture {
            proxy,
            orig_dst,
            metrics,
            streams,
            marks,
            _gateway: gateway,
        }
    }

    /// An HTTP/1.1 client connection of the app to `hello`.
    async fn http1(&self) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
        let stream = self.orig_dst.connect(self.proxy.addr, hello_ip()).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// An HTTP/2 client connection of the app to `hello`.
    async fn http2(&self) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
        let stream = self.orig_dst.connect(self.proxy.addr, hello_ip()).await;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    fn marks(&self) -> Vec<Option<OneRequest>> {
        self.marks.lock().unwrap().clone()
    }

    fn retries(&self, reason: &'static str) -> u64 {
        self.metrics
            .request_retries
            .get_or_create(&RetryLabels {
                authority: Arc::from(HELLO),
                reason,
            })
            .get()
    }

    fn timeouts(&self) -> u64 {
        self.metrics
            .request_timeouts
            .get_or_create(&TimeoutLabels {
                authority: Arc::from(HELLO),
            })
            .get()
    }
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "hello")
        .body(Empty::new())
        .unwrap()
}

async fn body_text(response: http::Response<hyper::body::Incoming>) -> String {
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    String::from_utf8(body.to_bytes().to_vec()).unwrap()
}

async fn http_origin() -> Origin {
    Origin::spawn(Behaviour::Http {
        delay: Duration::ZERO,
    })
    .await
}

/// An HTTP/2 origin on loopback answering `200` with `h2 <path>`.
async fn h2_origin() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let body = format!("h2 {}", req.uri().path());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        body,
                    ))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// Three requests on one keep-alive HTTP/1.1 connection ride three streams, so
/// the far gateway may send each to another pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_http1_requests_each_ride_a_stream_of_their_own() {
    let mut origin = http_origin().await;
    let fixture = Fixture::start(
        vec![],
        Answer::Deliver(origin.addr),
        ServicePolicy::default(),
    )
    .await;
    let mut client = fixture.http1().await;
    for path in ["/one", "/two", "/three"] {
        client.ready().await.unwrap();
        let response = client.send_request(get(path)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_text(response).await, format!("GET {path} host=hello"));
    }
    assert_eq!(fixture.marks(), [Some(OneRequest::Http1); 3]);
    // Each stream reached the origin as a connection of its own.
    for _ in 0..3 {
        assert_eq!(origin.next_served().await.ended, Ended::ByOrigin);
    }
    assert_eq!(origin.requests_started.load(Ordering::SeqCst), 3);
}

/// Three requests of one HTTP/2 connection ride three streams, each an HTTP/2
/// connection of its own that the origin serves as HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_each_ride_a_stream_of_their_own() {
    let (origin, _task) = h2_origin().await;
    let fixture = Fixture::start(vec![], Answer::Deliver(origin), ServicePolicy::default()).await;
    let client = fixture.http2().await;
    let requests = ["/a", "/b", "/c"].map(|path| {
        let mut client = client.clone();
        async move {
            let request = Request::get(format!("http://hello{path}"))
                .body(Empty::new())
                .unwrap();
            let response = client.send_request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body_text(response).await, format!("h2 {path}"));
        }
    });
    futures_util::future::join_all(requests).await;
    assert_eq!(fixture.marks(), [Some(OneRequest::H2); 3]);
}

/// A GET whose stream the far side refused with a retryable reason is sent again
/// on a new stream, and the client sees only the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_get_is_retried_on_a_new_stream() {
    let origin = http_origin().await;
    let fixture = Fixture::start(
        vec![
            Answer::Refuse(Refusal::NoEndpoints),
            Answer::Refuse(Refusal::UpstreamRefused),
        ],
        Answer::Deliver(origin.addr),
        ServicePolicy::default(),
    )
    .await;
    let mut client = fixture.http1().await;
    let response = client.send_request(get("/retried")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_text(response).await, "GET /retried host=hello");
    assert_eq!(fixture.streams(), 3);
    assert_eq!(fixture.retries("refused"), 2);
}

/// A POST may have had its effect: refused, it is not sent again, and its client
/// is reset as for any refused stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_post_is_not_retried() {
    let origin = http_origin().await;
    let fixture = Fixture::start(
        vec![Answer::Refuse(Refusal::NoEndpoints)],
        Answer::Deliver(origin.addr),
        ServicePolicy::default(),
    )
    .await;
    let mut client = fixture.http1().await;
    let post = Request::post("/once")
        .header("host", "hello")
        .body(Empty::new())
        .unwrap();
    let sent = tokio::time::timeout(STEP, client.send_request(post)).await;
    assert!(sent.unwrap().is_err(), "a refused POST was answered");
    assert_eq!(fixture.streams(), 1);
    assert_eq!(fixture.retries("refused"), 0);
}

/// With every stream refused, retries stop at the budget's share of the requests
/// instead of multiplying them by the retry limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_stops_a_retry_storm() {
    let budget = BudgetSettings {
        ratio: 0.2,
        min_per_second: 0,
        window: Duration::from_secs(60),
    };
    let fixture = Fixture::start_with_budget(
        vec![],
        Answer::Refuse(Refusal::NoEndpoints),
        ServicePolicy::default(),
        budget,
    )
    .await;
    let requests = 20;
    for i in 0..requests {
        let mut client = fixture.http1().await;
        let sent = tokio::time::timeout(STEP, client.send_request(get(&format!("/{i}")))).await;
        assert!(sent.unwrap().is_err(), "a refused request was answered");
    }
    // Without a budget: 20 requests x 3 attempts. With it: 20 + 20% of 20.
    assert_eq!(fixture.retries("refused"), 4);
    assert_eq!(fixture.streams(), requests + 4);
}

/// A request whose answer does not come by the Service's deadline gets `504` at
/// the deadline, and the stream is reset so the far side sees it end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_gets_504_and_its_stream_ends() {
    let mut origin = Origin::spawn(Behaviour::Http {
        delay: Duration::from_secs(3600),
    })
    .await;
    let timeout = Duration::from_millis(200);
    let policy = ServicePolicy {
        request_timeout: Some(timeout),
        ..ServicePolicy::default()
    };
    let fixture = Fixture::start(vec![], Answer::Deliver(origin.addr), policy).await;
    let mut client = fixture.http1().await;
    let started = tokio::time::Instant::now();
    let response = tokio::time::timeout(STEP, client.send_request(get("/slow")))
        .await
        .unwrap()
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    println!("504 after {elapsed:?} for a {timeout:?} timeout");
    assert!(
        elapsed >= timeout,
        "answered before the deadline: {elapsed:?}"
    );
    // Generous slack for a loaded machine; the figure itself is printed above.
    assert!(elapsed < timeout * 5, "504 only after {elapsed:?}");
    assert_eq!(fixture.timeouts(), 1);
    // The origin's connection ends: nothing is left waiting on the far side.
    let served = origin.next_served().await;
    assert_ne!(served.ended, Ended::Eof, "{served:?}");
    // The client's connection goes on serving: the next request gets its own stream.
    client.ready().await.unwrap();
    let started = tokio::time::Instant::now();
    let response = client.send_request(get("/again")).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() >= timeout);
    assert_eq!(fixture.streams(), 2);
}
