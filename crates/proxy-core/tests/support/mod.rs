//! What the in-process handler tests share: everything a handler needs from the
//! outside world, built on loopback and without privileges.
//!
//! - [`Pki`] mints one trust anchor, an issuer per cluster and leaves; an
//!   [`Identity`] turns a leaf into the TLS configs the proxy uses in production.
//! - [`FakeOrigDst`] stands in for `SO_ORIGINAL_DST`: a test registers which
//!   destination each client address "meant", and the handler reads it back.
//! - [`FixedRoutes`] is a [`RouteLookup`] with a table instead of discovery.
//! - [`Origin`] is an in-process upstream (echo, half-close, reset, HTTP) that
//!   reports every connection it served and how that connection ended.
//! - [`TunnelPeer`] is a mesh peer (what a gateway is to a sidecar): mTLS, the real
//!   tunnel server, and a scripted [`TunnelHandler`] that records each request
//!   and answers it as told ([`Answer`]).
//! - [`Listening`] runs a handler behind the real accept loop, and drains it.
//!
//! Handlers are built with the constructors here ([`outbound`], [`inbound`],
//! [`explicit`]) so a change of their fields touches this file only.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use isthmus_vocab::{Authority, ClusterName, Refusal, SpiffeId};
use proxy_core::addr::{OrigDst, OrigDstAddr};
use proxy_core::detect::DetectConfig;
use proxy_core::explicit::Explicit;
use proxy_core::forward::ForwardConfig;
use proxy_core::http::{HttpProxy, HttpSettings};
use proxy_core::inbound::{AppAddress, Inbound, InboundConfig, LocalDelivery, PeerIdentify};
use proxy_core::listen::{Handler, ListenConfig};
use proxy_core::metrics::{Direction, ProxyMetrics, RefusalLabels, TcpCloseLabels};
use proxy_core::outbound::{Outbound, OutboundConfig};
use proxy_core::pool::{PeerConfig, Pool};
use proxy_core::route::{Route, RouteLookup};
use proxy_core::tunnel::H2Settings;
use proxy_core::tunnel::server::{Peer, TunnelHandler, TunnelRequest, TunnelServer, Upstream};
use proxy_identity::mint::{self, KeyAlgorithm, Validity};
use proxy_identity::rustls::pki_types::ServerName;
use proxy_identity::{CredentialPaths, CredentialStore, Credentials, PeerPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bound on any one step that should take milliseconds.
pub const STEP: Duration = Duration::from_secs(10);

/// The cluster every fixture lives in unless a test says otherwise.
pub const CLUSTER: &str = "cluster-a";
/// The identity every cluster's gateway holds.
pub const GATEWAY_ID: &str = "spiffe://cluster.local/ns/isthmus-system/sa/isthmus-gateway";
/// A workload's identity (the app whose sidecar is under test).
pub const WORKLOAD_ID: &str = "spiffe://cluster.local/ns/default/sa/frontend";
/// A mirrored service's authority.
pub const HELLO: &str = "hello.default.svc.cluster.local:80";

// ---------------------------------------------------------------------------
// PKI

/// One trust anchor and an issuer per cluster, minted on demand.
pub struct Pki {
    anchor: mint::CertificateAuthority,
    issuers: Mutex<HashMap<String, mint::CertificateAuthority>>,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let anchor = mint::trust_anchor(
            &mint::default_anchor_name(),
            Validity::from_now(Duration::from_secs(3600)),
            KeyAlgorithm::default(),
        )
        .unwrap();
        Pki {
            anchor,
            issuers: Mutex::new(HashMap::new()),
        }
    }

    /// A leaf for `spiffe` from `cluster`'s issuer, ready to present.
    pub fn identity(&self, cluster: &str, spiffe: &str) -> Identity {
        let mut issuers = self.issuers.lock().unwrap();
        let issuer = issuers.entry(cluster.to_owned()).or_insert_with(|| {
            // Shorter than the anchor's: an issuer minted seconds later must not
            // outlive it, which the mint refuses.
            mint::issuer(
                &self.anchor,
                cluster,
                Validity::from_now(Duration::from_secs(3000)),
                KeyAlgorithm::default(),
            )
            .unwrap()
        });
        let id = SpiffeId::parse(spiffe).unwrap();
        let leaf = mint::leaf(
            issuer,
            &id,
            Validity::from_now(Duration::from_secs(1800)),
            KeyAlgorithm::default(),
        )
        .unwrap();
        // The paths only name files in errors: nothing is read or watched.
        let paths = CredentialPaths::in_dir("/nonexistent/in-memory");
        let creds = Credentials::from_pem(
            &paths,
            leaf.cert_chain_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
            leaf.anchors_pem.as_bytes(),
            SystemTime::now(),
        )
        .unwrap();
        Identity {
            id,
            cluster: cluster.to_owned(),
            store: Arc::new(CredentialStore::from_credentials(paths, creds)),
        }
    }
}

/// A minted leaf in a credential store, and the configs production builds from it.
#[derive(Clone)]
pub struct Identity {
    pub id: SpiffeId,
    pub cluster: String,
    pub store: Arc<CredentialStore>,
}

impl Identity {
    /// What a peer dialling this identity requires: exactly this ID, from this
    /// cluster's issuer (as a sidecar checks its gateway).
    pub fn as_peer(&self) -> PeerPolicy {
        PeerPolicy::Exact(self.id.clone())
            .in_cluster(isthmus_vocab::ClusterName::parse(&self.cluster).unwrap())
    }

    /// What this identity accepts from clients: its trust domain, own cluster.
    pub fn own_cluster_policy(&self) -> PeerPolicy {
        PeerPolicy::TrustDomain(self.id.trust_domain().clone())
            .in_cluster(isthmus_vocab::ClusterName::parse(&self.cluster).unwrap())
    }

    /// The mesh listener's server config, accepting clients `policy` allows.
    pub fn server_config(&self, policy: PeerPolicy) -> Arc<proxy_identity::rustls::ServerConfig> {
        proxy_identity::mesh_server_config(self.store.clone(), policy)
    }

    /// A client config presenting this leaf to a server `policy` allows.
    pub fn client_config(&self, policy: PeerPolicy) -> Arc<proxy_identity::rustls::ClientConfig> {
        proxy_identity::client_config(self.store.clone(), policy)
    }

    /// Reads a client's [`Peer`] from a finished handshake, as the proxy does.
    pub fn identify(&self) -> PeerIdentify {
        let store = self.store.clone();
        Arc::new(move |conn| Peer {
            id: proxy_identity::peer_identity(conn).map(|id| Arc::from(id.to_string())),
            cluster: proxy_identity::peer_cluster(conn, &store),
            expires: proxy_identity::connection_deadline(conn, &store),
        })
    }

    /// A warm pool of tunnel connections from this identity to `server` at `addr`.
    pub fn pool_to(&self, server: &Identity, addr: SocketAddr) -> Pool {
        let sni = proxy_identity::sni_name(&server.id).unwrap();
        let cfg = PeerConfig {
            name: Arc::from(format!("gateway/{}", server.cluster)),
            addr,
            server_name: ServerName::try_from(sni).unwrap(),
            tls: self.client_config(server.as_peer()),
            connect_timeout: Duration::from_secs(2),
            connections: 1,
            h2: H2Settings::default(),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            handshake_failed: None,
            deadline: None,
        };
        Pool::spawn(cfg, never_drained())
    }
}

/// A drain signal nobody sends: a token nothing else holds is never cancelled.
pub fn never_drained() -> CancellationToken {
    CancellationToken::new()
}

// ---------------------------------------------------------------------------
// Original destinations

/// `SO_ORIGINAL_DST` without iptables: the destination each client address meant,
/// registered by the test before it connects ([`FakeOrigDst::connect`]).
///
/// A client nobody registered gets `unmapped` when set (every redirected connection
/// "meant" that address, as the proxy's own captured sockets do in a loop), else
/// the error the kernel gives a socket that was not redirected.
#[derive(Default)]
pub struct FakeOrigDst {
    table: Mutex<HashMap<SocketAddr, SocketAddr>>,
    unmapped: Mutex<Option<SocketAddr>>,
}

impl FakeOrigDst {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// From now on, clients nobody registered meant `dst`.
    pub fn set_unmapped(&self, dst: SocketAddr) {
        *self.unmapped.lock().unwrap() = Some(dst);
    }

    pub fn map(&self, client: SocketAddr, dst: SocketAddr) {
        self.table.lock().unwrap().insert(client, dst);
    }

    /// Connects to `listener` from loopback as a client that meant `dst`.
    pub async fn connect(&self, listener: SocketAddr, dst: SocketAddr) -> TcpStream {
        self.try_connect(listener, dst).await.unwrap()
    }

    /// [`FakeOrigDst::connect`] for a connection the proxy may reset at once: a
    /// reset that lands before the connect is reported completes it with an error.
    pub async fn try_connect(
        &self,
        listener: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        self.connect_from(IpAddr::V4(Ipv4Addr::LOCALHOST), listener, dst)
            .await
    }

    /// [`FakeOrigDst::try_connect`] from the address `source`.
    pub async fn connect_from(
        &self,
        source: IpAddr,
        listener: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        // Registered before the SYN: the handler may ask as soon as it accepts.
        self.map(socket.local_addr()?, dst);
        tokio::time::timeout(STEP, socket.connect(listener))
            .await
            .expect("connect to the proxy timed out")
    }
}

impl OrigDst for FakeOrigDst {
    fn orig_dst(&self, stream: &TcpStream, _local: SocketAddr) -> io::Result<OrigDstAddr> {
        let client = stream.peer_addr()?;
        let dst = self.table.lock().unwrap().get(&client).copied();
        dst.or(*self.unmapped.lock().unwrap())
            .map(OrigDstAddr)
            .ok_or_else(|| io::Error::from_raw_os_error(libc_enoent()))
    }
}

/// `ENOENT`, what the kernel answers for a socket without a NAT mapping.
fn libc_enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}

// ---------------------------------------------------------------------------
// Routes

/// A [`RouteLookup`] from a table; anything not in it passes through.
#[derive(Default)]
pub struct FixedRoutes {
    by_addr: HashMap<SocketAddr, Route>,
    by_authority: HashMap<String, Route>,
}

impl FixedRoutes {
    /// Connections to `dst` (a mirrored service's ClusterIP) go to `cluster`'s
    /// `authority`.
    pub fn mirror_addr(mut self, dst: SocketAddr, cluster: &str, authority: &str) -> Self {
        self.by_addr.insert(dst, mirrored(cluster, authority));
        self
    }

    /// An explicit proxy's `CONNECT name` goes to `cluster`'s `authority`.
    pub fn mirror_name(mut self, name: &str, cluster: &str, authority: &str) -> Self {
        self.by_authority
            .insert(name.to_owned(), mirrored(cluster, authority));
        self
    }
}

fn mirrored(cluster: &str, authority: &str) -> Route {
    Route::Mirrored {
        cluster: ClusterName::parse(cluster).unwrap(),
        authority: Authority::parse(authority).unwrap(),
    }
}

impl RouteLookup for FixedRoutes {
    fn route_addr(&self, dst: OrigDstAddr) -> Route {
        self.by_addr
            .get(&dst.0)
            .cloned()
            .unwrap_or(Route::Passthrough)
    }

    fn route_authority(&self, authority: &Authority) -> Route {
        self.by_authority
            .get(authority.as_str())
            .cloned()
            .unwrap_or(Route::Passthrough)
    }
}

// ---------------------------------------------------------------------------
// Origins

/// What an [`Origin`] does with each connection.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Echoes every byte; at the client's end of stream, ends its own side.
    Echo,
    /// Sends these bytes and ends its side at once, then reads to the client's end.
    GreetAndHalfClose(&'static [u8]),
    /// Reads to the client's end of stream, then answers `got <n> bytes` and ends.
    ReplyAfterEof,
    /// Reads this many bytes, then resets the connection (RST).
    ResetAfter(usize),
    /// Serves HTTP/1.1: `200` with body `<method> <path> host=<Host>`, after waiting
    /// `delay` (to hold a request in flight).
    Http { delay: Duration },
}

/// How an origin saw one connection end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client ended its side in order.
    Eof,
    /// The client reset the connection.
    Reset,
    /// The origin closed it (after its own reset or an HTTP exchange).
    ByOrigin,
}

/// One connection an origin served.
#[derive(Clone, Debug)]
pub struct Served {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub received: Vec<u8>,
    pub ended: Ended,
}

/// An in-process upstream on loopback.
pub struct Origin {
    pub addr: SocketAddr,
    /// HTTP requests that reached the origin's handler so far (answered or not).
    pub requests_started: Arc<std::sync::atomic::AtomicUsize>,
    served: mpsc::UnboundedReceiver<Served>,
    task: JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// An origin on `127.0.0.1` with a port of its own.
    pub async fn spawn(behaviour: Behaviour) -> Origin {
        Self::spawn_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), behaviour).await
    }

    /// An origin bound to `addr` (another loopback address, a chosen port).
    pub async fn spawn_on(addr: SocketAddr, behaviour: Behaviour) -> Origin {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, served) = mpsc::unbounded_channel();
        let requests_started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = requests_started.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                let behaviour = behaviour.clone();
                let started = started.clone();
                tokio::spawn(async move {
                    let local = stream.local_addr().unwrap();
                    let (received, ended) = serve_origin(stream, behaviour, started).await;
                    let _ = tx.send(Served {
                        peer,
                        local,
                        received,
                        ended,
                    });
                });
            }
        });
        Origin {
            addr,
            requests_started,
            served,
            task,
        }
    }

    /// The next connection this origin finished serving.
    pub async fn next_served(&mut self) -> Served {
        tokio::time::timeout(STEP, self.served.recv())
            .await
            .expect("the origin finished no connection in time")
            .unwrap()
    }

    /// A connection finished so far, if any (to prove none came).
    pub fn try_served(&mut self) -> Option<Served> {
        self.served.try_recv().ok()
    }
}

async fn serve_origin(
    mut stream: TcpStream,
    behaviour: Behaviour,
    started: Arc<std::sync::atomic::AtomicUsize>,
) -> (Vec<u8>, Ended) {
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    match behaviour {
        Behaviour::Echo => loop {
            match stream.read(&mut buf).await {
                Ok(0) => {
                    let _ = stream.shutdown().await;
                    return (received, Ended::Eof);
                }
                Ok(n) => {
                    received.extend_from_slice(&buf[..n]);
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return (received, Ended::Reset);
                    }
                }
                Err(_) => return (received, Ended::Reset),
            }
        },
        Behaviour::GreetAndHalfClose(greeting) => {
            let _ = stream.write_all(greeting).await;
            let _ = stream.shutdown().await;
            match stream.read_to_end(&mut received).await {
                Ok(_) => (received, Ended::Eof),
                Err(_) => (received, Ended::Reset),
            }
        }
        Behaviour::ReplyAfterEof => {
            let ended = match stream.read_to_end(&mut received).await {
                Ok(_) => Ended::Eof,
                Err(_) => return (received, Ended::Reset),
            };
            let reply = format!("got {} bytes", received.len());
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
            (received, ended)
        }
        Behaviour::ResetAfter(n) => {
            received.resize(n, 0);
            let ended = match stream.read_exact(&mut received).await {
                Ok(_) => Ended::ByOrigin,
                Err(_) => Ended::Reset,
            };
            proxy_core::listen::reset(stream);
            (received, ended)
        }
        Behaviour::Http { delay } => {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    tokio::time::sleep(delay).await;
                    let host = req
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body = format!("{} {} host={host}", req.method(), req.uri());
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        body,
                    ))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            (received, Ended::ByOrigin)
        }
    }
}

// ---------------------------------------------------------------------------
// The tunnel peer

/// How a [`TunnelPeer`] answers a stream.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Accepts it and connects it to this address.
    Deliver(SocketAddr),
    /// Refuses it with this reason.
    Refuse(Refusal),
    /// Never answers (a black-holed peer).
    Silent,
}

/// A CONNECT stream as the tunnel peer received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    /// `:authority`.
    pub authority: String,
    /// The `isthmus-cluster` header.
    pub cluster: Option<String>,
    /// The client's verified SPIFFE ID and cluster.
    pub peer_id: Option<String>,
    pub peer_cluster: Option<String>,
}

/// Answers streams by authority from a table; records every request.
pub struct ScriptedTunnel {
    answers: HashMap<String, Answer>,
    default: Answer,
    seen: mpsc::UnboundedSender<SeenRequest>,
}

impl TunnelHandler for ScriptedTunnel {
    async fn open(&self, request: &TunnelRequest) -> Result<Upstream, Refusal> {
        let _ = self.seen.send(SeenRequest {
            authority: request.authority.to_string(),
            cluster: request.cluster.as_ref().map(|c| c.to_string()),
            peer_id: request.peer.id.as_deref().map(str::to_owned),
            peer_cluster: request.peer.cluster.as_ref().map(|c| c.to_string()),
        });
        let answer = self
            .answers
            .get(request.authority.as_str())
            .unwrap_or(&self.default);
        match answer {
            Answer::Deliver(addr) => match TcpStream::connect(addr).await {
                Ok(stream) => Ok(Upstream::Connected(Box::new(stream))),
                Err(_) => Err(Refusal::UpstreamRefused),
            },
            Answer::Refuse(refusal) => Err(*refusal),
            Answer::Silent => std::future::pending().await,
        }
    }
}

/// A mesh peer on loopback: mTLS with its own minted identity, the production
/// tunnel server, a [`ScriptedTunnel`] behind it.
pub struct TunnelPeer {
    pub addr: SocketAddr,
    pub identity: Identity,
    pub metrics: ProxyMetrics,
    seen: mpsc::UnboundedReceiver<SeenRequest>,
    drain: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for TunnelPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TunnelPeer {
    /// A gateway of [`CLUSTER`] answering `answers` by authority and `default`
    /// otherwise, accepting clients of its own cluster.
    pub async fn spawn(pki: &Pki, answers: &[(&str, Answer)], default: Answer) -> TunnelPeer {
        let identity = pki.identity(CLUSTER, GATEWAY_ID);
        let (tx, seen) = mpsc::unbounded_channel();
        let handler = ScriptedTunnel {
            answers: answers
                .iter()
                .map(|(a, answer)| ((*a).to_owned(), answer.clone()))
                .collect(),
            default,
            seen: tx,
        };
        let metrics = ProxyMetrics::default();
        let server = TunnelServer::new(
            Arc::new(handler),
            H2Settings::default(),
            ForwardConfig::default(),
            metrics.clone(),
            Direction::Gateway,
        );
        let tls =
            tokio_rustls::TlsAcceptor::from(identity.server_config(identity.own_cluster_policy()));
        let identify = identity.identify();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = CancellationToken::new();
        let drain_rx = drain.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (server, tls, identify, drain) = (
                    server.clone(),
                    tls.clone(),
                    identify.clone(),
                    drain_rx.clone(),
                );
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let peer = identify(stream.get_ref().1);
                    let _ = server.serve_connection(stream, peer, drain).await;
                });
            }
        });
        TunnelPeer {
            addr,
            identity,
            metrics,
            seen,
            drain,
            task,
        }
    }

    /// The next stream request the peer received.
    pub async fn next_request(&mut self) -> SeenRequest {
        tokio::time::timeout(STEP, self.seen.recv())
            .await
            .expect("the tunnel peer received no request in time")
            .unwrap()
    }

    /// A request received so far, if any (to prove none came).
    pub fn try_request(&mut self) -> Option<SeenRequest> {
        self.seen.try_recv().ok()
    }

    /// GOAWAY on every connection: streams in flight finish, no new ones.
    pub fn drain(&self) {
        self.drain.cancel();
    }
}

// ---------------------------------------------------------------------------
// Handlers and listeners

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
        role: proxy_core::inbound::ListenerRole::Sidecar,
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

// ---------------------------------------------------------------------------
// Observing

/// `isthmus_refusals_total{direction, reason}`.
pub fn refusals(metrics: &ProxyMetrics, direction: Direction, reason: &'static str) -> u64 {
    metrics
        .refusals
        .get_or_create(&RefusalLabels { direction, reason })
        .get()
}

/// `tcp_close_total{direction, reason}`.
pub fn closes(metrics: &ProxyMetrics, direction: Direction, reason: &'static str) -> u64 {
    metrics
        .tcp_closed
        .get_or_create(&TcpCloseLabels { direction, reason })
        .get()
}

/// Waits until `check` holds, polling, for at most [`STEP`].
pub async fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_or(what, check, String::new).await
}

/// [`eventually`], adding `context()` (metrics, say) to the failure message.
pub async fn eventually_or(
    what: &str,
    mut check: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {STEP:?}: {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads until the connection ends and returns how: its bytes and whether the end
/// was a reset (`Err`) or an orderly end of stream (`Ok`).
pub async fn read_to_end<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(STEP, stream.read(&mut buf))
            .await
            .expect("the connection neither ended nor sent in time")
        {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Asserts the connection ends with a reset (not an orderly end of stream).
pub async fn assert_reset(stream: &mut TcpStream, what: &str) {
    let (got, end) = read_to_end(stream).await;
    match end {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected a reset, got {other:?} after {got:?}"),
    }
}

/// Asserts a connection the proxy resets before it could be used ends with a
/// reset, at the connect or at the first read.
pub async fn assert_reset_early(connected: io::Result<TcpStream>, what: &str) {
    match connected {
        Ok(mut stream) => assert_reset(&mut stream, what).await,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected a reset, connect failed with {e}"),
    }
}

/// The metrics as Prometheus text, for failure messages.
pub fn metrics_text(metrics: &ProxyMetrics) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// Connects to `addr` until the connect is refused (a listener that closed), for
/// at most [`STEP`]; a connection that still got through is dropped at once.
pub async fn assert_refuses_connections(addr: SocketAddr, what: &str) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return,
            // Accepted before the listener closed, and reset by its handler.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{what}: connect failed with {e}, not refused"),
            Ok(stream) => drop(stream),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still accepting connections after {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Resets `stream` (RST), as an app that aborts does.
pub fn abort(stream: TcpStream) {
    proxy_core::listen::reset(stream);
}
