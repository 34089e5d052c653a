//! The three roles of `isthmus-proxy`, and what they share: identity, discovery,
//! metrics, the admin server, listeners and shutdown.

mod discovery_metrics;
pub mod gateway;
pub mod sidecar;
pub mod standalone;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use isthmus_vocab::{ClusterName, SpiffeId};
use prometheus_client::registry::Registry;
use proxy_core::addr::KernelOrigDst;
use proxy_core::detect::DetectConfig;
use proxy_core::forward::ForwardConfig;
use proxy_core::http::HttpProxy;
use proxy_core::inbound::{Inbound, InboundConfig, ListenerRole};
use proxy_core::listen::{Handler, ListenConfig};
use proxy_core::metrics::{Direction, ProxyMetrics};
use proxy_core::pool::{LinkState, Pool, PoolSettings};
use proxy_core::resolve::{GatewayHost, ResolveMetrics, ResolveSettings};
use proxy_core::tunnel::HandshakeObserver;
use proxy_core::tunnel::server::{Peer, TunnelHandler, TunnelServer};
use proxy_discovery::{DirSource, Discovery};
use proxy_identity::{CredentialStore, IdentityMetrics, PeerPolicy};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{self, Admin, ConfigView, ReadyCheck};
use crate::config::{Config, DiscoverySource};

/// What every role starts with.
pub struct Base {
    pub config: Config,
    /// `--cluster`, as identities name it: the cluster this proxy's leaf must come
    /// from, and the one its mesh peers are checked against.
    pub cluster: ClusterName,
    pub registry: Registry,
    pub metrics: ProxyMetrics,
    pub identity: Arc<CredentialStore>,
    pub identity_metrics: IdentityMetrics,
    /// How the lookups of gateways named by DNS go, by name.
    pub resolve_metrics: ResolveMetrics,
    pub discovery: Discovery,
    /// The root of the process's cancellation tree: listeners, pools and their
    /// connections hold children of it, and cancelling it drains them all.
    pub shutdown: CancellationToken,
    /// Every listener, pool and probe task the role starts, so `/config` can show
    /// how many are alive (a rebuilt link must not leave any behind).
    pub tasks: TaskTracker,
}

impl Base {
    /// Loads identity and discovery; fails with a message naming the directory and
    /// the problem if either has no good state to start from.
    ///
    /// Every role's own leaf must come from the issuer of its `--cluster` (checked on
    /// the verified path, at start and on every rotation): a sidecar or standalone
    /// proxy with a leaf of another cluster would be refused by its gateway's
    /// cluster checks anyway, and a gateway with one would claim to be what it is not.
    pub async fn start(config: Config) -> Result<Base> {
        let mut registry = Registry::default();
        let metrics = ProxyMetrics::default();
        metrics.register(&mut registry);
        let identity_metrics = IdentityMetrics::register(&mut registry);
        let resolve_metrics = ResolveMetrics::default();
        resolve_metrics.register(&mut registry);
        let own_cluster =
            ClusterName::parse(&config.cluster).map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
        let identity = CredentialStore::for_cluster(config.identity.clone(), own_cluster.clone())
            .with_context(|| {
                format!(
                    "loading the workload identity ({}, {}, {})",
                    config.identity.cert.display(),
                    config.identity.key.display(),
                    config.identity.anchors.display()
                )
            })?
            .with_metrics(identity_metrics.clone());
        let identity = Arc::new(identity);
        tokio::spawn(identity.clone().watch(config.reload_interval));

        let shutdown = CancellationToken::new();
        let cluster = own_cluster.clone();
        let stopped = shutdown.child_token().cancelled_owned();
        let discovery = match &config.discovery {
            DiscoverySource::Dir(dir) => {
                let (discovery, _task) = DirSource::new(dir)
                    .with_cluster(cluster)
                    .watch(config.reload_interval, stopped)
                    .await
                    .with_context(|| format!("loading service discovery from {}", dir.display()))?;
                discovery
            }
            DiscoverySource::Kube { namespace } => {
                kube_discovery(cluster, namespace.as_deref(), stopped).await?
            }
        };
        registry.register_collector(Box::new(discovery_metrics::DiscoveryCollector {
            discovery: discovery.clone(),
        }));
        info!(
            cluster = %config.cluster,
            identity = %identity.current().id(),
            discovery = ?config.discovery,
            "identity and discovery loaded"
        );
        Ok(Base {
            config,
            cluster: own_cluster,
            registry,
            metrics,
            identity,
            identity_metrics,
            resolve_metrics,
            discovery,
            shutdown,
            tasks: TaskTracker::new(),
        })
    }

    pub fn forward_config(&self) -> ForwardConfig {
        ForwardConfig {
            idle_timeout: self.config.limits.idle_timeout,
            ..ForwardConfig::default()
        }
    }

    pub fn detect_config(&self) -> DetectConfig {
        DetectConfig {
            timeout: self.config.limits.detect_timeout,
            ..DetectConfig::default()
        }
    }

    pub fn http_proxy(&self, direction: Direction) -> HttpProxy {
        HttpProxy {
            metrics: self.metrics.clone(),
            direction,
            settings: self.config.limits.http_settings(),
            forward: self.forward_config(),
        }
    }

    pub fn listen_config(&self) -> ListenConfig {
        ListenConfig {
            max_connections: self.config.limits.max_connections,
            grace: self.config.shutdown_grace,
        }
    }

    /// Counts and logs a failed mesh handshake under its reason, naming the peer.
    pub fn handshake_observer(&self) -> HandshakeObserver {
        let metrics = self.identity_metrics.clone();
        Arc::new(move |error, peer| {
            let _span = tracing::info_span!("tls", %peer).entered();
            metrics.handshake_error(error).as_str()
        })
    }

    /// The trust domain of this proxy's own identity: mesh peers must share it.
    pub fn own_trust_domain_policy(&self) -> PeerPolicy {
        PeerPolicy::TrustDomain(self.identity.current().id().trust_domain().clone())
    }

    /// Any identity of our trust domain, issued by our own cluster's issuer: what a
    /// peer inside this cluster (our gateway, a pod's sidecar) must prove.
    pub fn own_cluster_policy(&self) -> PeerPolicy {
        self.own_trust_domain_policy()
            .in_cluster(self.cluster.clone())
    }

    /// A warm pool to this cluster's gateway, as the cluster settings name it at
    /// start: an IP address, or a DNS name such as the gateway Service's, which the
    /// pool keeps resolved (a name that does not resolve yet leaves the pool down,
    /// retrying, rather than stopping the proxy); `None` (with a warning) when they
    /// name none, so mirrored services are refused rather than misrouted.
    pub async fn cluster_gateway(&self) -> Result<Option<Pool>> {
        let snapshot = self.discovery.snapshot();
        let Some(gateway) = snapshot.gateway() else {
            warn!(cluster = %self.config.cluster, "no gateway in the cluster settings: mirrored services will be refused");
            return Ok(None);
        };
        let identity = SpiffeId::parse(gateway.identity.as_str()).with_context(|| {
            format!(
                "the gateway identity in the settings of cluster {}",
                self.config.cluster
            )
        })?;
        let host = GatewayHost::parse(gateway.address.as_str()).with_context(|| {
            format!(
                "the gateway address in the settings of cluster {}",
                self.config.cluster
            )
        })?;
        info!(gateway = %host, port = gateway.port, %identity, "mirrored services go through the cluster gateway");
        // The gateway's ID alone would also match another cluster's gateway (they
        // may share one) or a leaf another cluster's issuer minted with it.
        let tls = proxy_identity::client_config(
            self.identity.clone(),
            PeerPolicy::Exact(identity).in_cluster(self.cluster.clone()),
        );
        let settings = self.pool_settings();
        Ok(Some(settings.spawn_to(
            format!("gateway/{}", self.config.cluster),
            &host,
            gateway.port,
            tls,
            settings.connections,
            self.shutdown.child_token(),
            &self.tasks,
        )))
    }

    /// What every tunnel pool of this proxy shares.
    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            connect_timeout: self.config.limits.connect_timeout,
            connections: self.config.tunnel_connections,
            h2: self.config.limits.h2_settings(),
            handshake_failed: Some(self.handshake_observer()),
            deadline: Some({
                let store = self.identity.clone();
                Arc::new(move |conn| proxy_identity::connection_deadline(conn, &store))
            }),
            resolve: ResolveSettings {
                interval: self.config.dns_refresh_interval,
                metrics: self.resolve_metrics.clone(),
                ..ResolveSettings::default()
            },
        }
    }

    /// Serves `handler` on every address until shutdown, then drains.
    pub fn serve<H: Handler>(
        &self,
        listeners: Vec<TcpListener>,
        handler: Arc<H>,
        direction: Direction,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        listeners
            .into_iter()
            .map(|listener| {
                self.tasks.spawn(proxy_core::listen::serve(
                    listener,
                    handler.clone(),
                    self.listen_config(),
                    self.metrics.clone(),
                    direction,
                    self.shutdown.child_token(),
                ))
            })
            .collect()
    }

    /// The mesh-facing listener's handler: mTLS from peers of this trust domain (a
    /// gateway's, from any cluster; a sidecar's, from its own cluster only: only its
    /// gateway dials it), each tunnel stream handed to `handler` with the peer's
    /// verified cluster; plain redirected TCP passes to the app.
    pub fn inbound<H: TunnelHandler>(
        &self,
        handler: Arc<H>,
        role: ListenerRole,
    ) -> Arc<Inbound<H>> {
        let direction = match role {
            ListenerRole::Sidecar => Direction::Inbound,
            ListenerRole::Gateway => Direction::Gateway,
        };
        let tunnel = TunnelServer::new(
            handler,
            self.config.limits.h2_settings(),
            self.forward_config(),
            self.metrics.clone(),
            direction,
        )
        .with_expiry_grace(self.config.shutdown_grace);
        Arc::new(Inbound {
            role,
            tls: Some(proxy_identity::mesh_server_config(
                self.identity.clone(),
                match direction {
                    Direction::Gateway => self.own_trust_domain_policy(),
                    Direction::Inbound | Direction::Outbound => self.own_cluster_policy(),
                },
            )),
            identify: {
                let store = self.identity.clone();
                Arc::new(move |conn| Peer {
                    id: proxy_identity::peer_identity(conn).map(|id| Arc::from(id.to_string())),
                    cluster: proxy_identity::peer_cluster(conn, &store),
                    expires: proxy_identity::connection_deadline(conn, &store),
                })
            },
            handshake_failed: self.handshake_observer(),
            tunnel,
            orig_dst: Arc::new(KernelOrigDst),
            cfg: InboundConfig {
                connect_timeout: self.config.limits.connect_timeout,
                detect: self.detect_config(),
                opaque_ports: self.config.opaque_ports.clone(),
                forward: self.forward_config(),
                proxy_ports: self.config.proxy_ports(),
                tls_handshake_timeout: self.config.limits.tls_handshake_timeout,
                app: self.config.app_address(),
            },
            http: self.http_proxy(direction),
            metrics: self.metrics.clone(),
        })
    }

    /// The `/config` document: what every role shows, plus `extra` of the role.
    pub fn config_view(
        &self,
        role: &'static str,
        extra: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> ConfigView {
        let identity = self.identity.clone();
        let discovery = self.discovery.clone();
        let cluster = self.config.cluster.clone();
        let limits = self.config.limits.to_json();
        let tasks = self.tasks.clone();
        Arc::new(move || {
            let mut view = serde_json::json!({
                "role": role,
                "cluster": cluster,
                "limits": limits,
                // Listener, pool and probe tasks alive: flat while links are rebuilt.
                "tasks": tasks.len(),
                "identity": identity.status(),
                "discovery": {
                    "status": discovery.status(),
                    "snapshot": discovery.snapshot().to_json(),
                },
            });
            if let (Some(view), serde_json::Value::Object(extra)) = (view.as_object_mut(), extra())
            {
                view.extend(extra);
            }
            view
        })
    }

    /// Starts the admin server on its own thread, waits for SIGTERM or SIGINT, then
    /// drains `tasks`. The admin server answers until the drain is over (`/ready`
    /// false meanwhile), so probes see a draining proxy rather than a dead one.
    pub async fn run(
        self,
        admin_listener: TcpListener,
        config: ConfigView,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    ) -> Result<()> {
        let draining = Arc::new(AtomicBool::new(false));
        let ready: ReadyCheck = {
            let draining = draining.clone();
            let identity = self.identity.clone();
            Arc::new(move || {
                if draining.load(Ordering::Acquire) {
                    return Err("shutting down".to_owned());
                }
                // Checked at each probe, not from a flag a task keeps: readiness
                // turns false the moment the leaf stops being presented.
                match identity.validity() {
                    validity if validity.is_valid() => Ok(()),
                    validity => Err(format!("identity leaf {validity}")),
                }
            })
        };
        let admin = Arc::new(Admin {
            registry: Arc::new(self.registry),
            ready,
            config,
        });
        let stop_admin = CancellationToken::new();
        let admin_listener = admin_listener
            .into_std()
            .context("moving the admin listener to its thread")?;
        let admin_thread = admin::spawn(
            admin,
            admin_listener,
            self.config.limits.admin(),
            stop_admin.clone(),
        )?;
        wait_for_signal().await?;
        info!(grace = ?self.config.shutdown_grace, "shutting down: no new connections, draining open ones");
        draining.store(true, Ordering::Release);
        self.shutdown.cancel();
        for task in tasks {
            let _ = task.await;
        }
        stop_admin.cancel();
        // The admin thread stops at once when told; it is not worth a hung exit.
        let joined = tokio::task::spawn_blocking(move || admin_thread.join());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), joined).await;
        info!("shutdown complete");
        Ok(())
    }
}

/// A tunnel pool as `/config` shows it; a peer named by DNS also with the
/// addresses its name resolves to, when it last resolved, and the failure of the
/// lookups since, if they fail (the last good addresses serve meanwhile).
pub fn pool_json(pool: &Pool) -> serde_json::Value {
    let state = pool.state();
    let addresses = pool.addresses();
    let mut view = serde_json::json!({
        "peer": pool.peer().name.as_ref(),
        "addr": addresses.target().as_ref(),
        "up": state.is_up(),
        "state": match &state {
            LinkState::Connecting => "connecting".to_owned(),
            LinkState::Up { connections } => format!("up ({connections} connections)"),
            LinkState::Down { error, .. } => format!("down: {error}"),
        },
    });
    if addresses.is_name() {
        let resolution = addresses.current();
        view["dns"] = serde_json::json!({
            "addresses": resolution.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "resolved_at": resolution.resolved_at.map(proxy_identity::format_rfc3339),
            "failing": resolution.failing.map(|f| serde_json::json!({
                "since": proxy_identity::format_rfc3339(f.since),
                "error": f.error.as_ref(),
                "consecutive": f.consecutive,
            })),
        });
    }
    view
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Binds every address. An IPv6 default on a host without IPv6 is skipped with a
/// warning; any other failure names the address and stops the start.
pub fn bind_all(flag: &str, addrs: &[SocketAddr]) -> Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for addr in addrs {
        match bind(*addr) {
            Ok(listener) => listeners.push(listener),
            Err(e)
                if addr.is_ipv6()
                    && addrs.iter().any(SocketAddr::is_ipv4)
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::Unsupported
                    )
                    || e.raw_os_error() == Some(97) =>
            {
                warn!(%addr, error = %e, "no IPv6 here, listening on IPv4 only");
            }
            Err(e) => return Err(e).with_context(|| format!("--{flag}: binding {addr}")),
        }
    }
    Ok(listeners)
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        let socket = TcpSocket::new_v6()?;
        // Separate v4 and v6 listeners on one port: the v6 one must not claim v4.
        socket2::SockRef::from(&socket).set_only_v6(true)?;
        socket
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Binds the admin listener.
pub async fn bind_admin(addr: SocketAddr) -> Result<TcpListener> {
    admin::bind(addr).await
}

/// Discovery through the cluster's API server: Services, EndpointSlices, Links and
/// ClusterSettings watched with kube-runtime reflectors.
#[cfg(feature = "kube")]
async fn kube_discovery(
    cluster: ClusterName,
    namespace: Option<&str>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Discovery> {
    let kube_config = kube::Config::infer().await.context(
        "--discovery kube: no API server credentials (in-cluster service account or kubeconfig)",
    )?;
    let url = kube_config.cluster_url.to_string();
    let mut source = proxy_discovery::source::kube::KubeSource::from_config(kube_config, cluster)
        .with_context(|| format!("--discovery kube: a client for {url}"))?
        .with_mesh_kinds();
    if let Some(namespace) = namespace {
        source = source.namespace(namespace);
    }
    let (discovery, _task) = source
        .watch(stopped)
        .await
        .with_context(|| format!("loading service discovery from the API server at {url}"))?;
    Ok(discovery)
}

/// A build without the `kube` feature has no client: the configuration refuses
/// `--discovery kube` before any role starts, so this is never reached.
#[cfg(not(feature = "kube"))]
async fn kube_discovery(
    _cluster: ClusterName,
    _namespace: Option<&str>,
    _stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Discovery> {
    anyhow::bail!("--discovery: {}", crate::config::WITHOUT_KUBE)
}
