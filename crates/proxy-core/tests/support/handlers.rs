//! The handlers under test, built as the proxy builds them, behind the production accept loop.

use super::*;

/// A handler behind the production accept loop ([`proxy_core::listen::serve`]).
pub struct Listening {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// How long a drained listener lets connections run on in these tests.
pub const GRACE: Duration = Duration::from_secs(5);

impl Listening {
    /// Serves `handler` on `bind` (port 0: any) until drained.
    pub async fn start<H: Handler>(
        handler: Arc<H>,
        bind: SocketAddr,
        direction: Direction,
        metrics: &ProxyMetrics,
    ) -> Listening {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let rx = shutdown.clone();
        let task = tokio::spawn(proxy_core::listen::serve(
            listener,
            handler,
            ListenConfig {
                max_connections: 1024,
                grace: GRACE,
            },
            metrics.clone(),
            direction,
            rx,
        ));
        Listening {
            addr,
            shutdown,
            task: Some(task),
        }
    }

    /// Starts the drain: the listener closes, connections in flight go on.
    pub fn drain(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the accept loop to finish its drain.
    pub async fn drained(&mut self) {
        let task = self.task.take().expect("drained once");
        tokio::time::timeout(STEP, task)
            .await
            .expect("the listener did not finish draining in time")
            .unwrap();
    }
}

/// Settings that keep tests quick: short detection and connect timeouts.
pub fn detect_config() -> DetectConfig {
    DetectConfig {
        timeout: Duration::from_millis(300),
        ..DetectConfig::default()
    }
}

pub fn http_proxy(metrics: &ProxyMetrics, direction: Direction) -> HttpProxy {
    HttpProxy {
        metrics: metrics.clone(),
        direction,
        settings: HttpSettings::default(),
        forward: ForwardConfig::default(),
    }
}

/// A sidecar's outbound handler as the proxy builds it, with a test's seams.
pub fn outbound(
    routes: FixedRoutes,
    orig_dst: Arc<FakeOrigDst>,
    gateway: Option<Pool>,
    proxy_ports: &[u16],
    metrics: &ProxyMetrics,
) -> Arc<Outbound<FixedRoutes>> {
    Arc::new(Outbound {
        lookup: routes,
        gateway,
        orig_dst,
        cfg: OutboundConfig {
            connect_timeout: Duration::from_secs(2),
            detect: detect_config(),
            opaque_ports: Default::default(),
            forward: ForwardConfig::default(),
            proxy_ports: proxy_ports.iter().copied().collect(),
        },
        http: http_proxy(metrics, Direction::Outbound),
        metrics: metrics.clone(),
        retry_budgets: Default::default(),
    })
}

/// A sidecar's inbound handler: mesh TLS as `identity`, delivery to the app at
/// the pod's address (`app`) or loopback. Not yet shared, so a test can change a
/// field (take its TLS away, say).
pub fn inbound(
    identity: &Identity,
    orig_dst: Arc<FakeOrigDst>,
    app: AppAddress,
    proxy_ports: &[u16],
    metrics: &ProxyMetrics,
) -> Inbound<LocalDelivery> {
    let proxy_ports: std::collections::HashSet<u16> = proxy_ports.iter().copied().collect();
    let delivery = Arc::new(LocalDelivery {
        app,
        connect_timeout: Duration::from_secs(2),
        proxy_ports: proxy_ports.clone(),
    });
    let tunnel = TunnelServer::new(
        delivery,
        H2Settings::default(),
        ForwardConfig::default(),
        metrics.clone(),
        Direction::Inbound,
    );
    Inbound {
        role: ListenerRole::Sidecar,
        tls: Some(identity.server_config(identity.own_cluster_policy())),
        identify: identity.identify(),
        handshake_failed: Arc::new(|_, _| "refused"),
        tunnel,
        orig_dst,
        cfg: InboundConfig {
            connect_timeout: Duration::from_secs(2),
            detect: detect_config(),
            opaque_ports: Default::default(),
            forward: ForwardConfig::default(),
            proxy_ports,
            tls_handshake_timeout: Duration::from_secs(2),
            app,
        },
        http: http_proxy(metrics, Direction::Inbound),
        metrics: metrics.clone(),
    }
}

/// The standalone role's explicit proxy.
pub fn explicit(
    routes: FixedRoutes,
    gateway: Option<Pool>,
    metrics: &ProxyMetrics,
) -> Arc<Explicit<FixedRoutes>> {
    Arc::new(Explicit {
        lookup: routes,
        gateway,
        connect_timeout: Duration::from_secs(2),
        http: HttpSettings::default(),
        forward: ForwardConfig::default(),
        metrics: metrics.clone(),
    })
}

/// The pools of a gateway under test: one connection per peer, no DNS.
pub fn gateway_pools(connect_timeout: Duration) -> proxy_core::pool::PoolSettings {
    proxy_core::pool::PoolSettings {
        connect_timeout,
        connections: 1,
        h2: H2Settings::default(),
        handshake_failed: None,
        deadline: None,
        resolve: Default::default(),
    }
}
