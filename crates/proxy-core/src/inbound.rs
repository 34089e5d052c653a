//! The sidecar's inbound handler. Two kinds of connection arrive at the inbound port:
//! - mesh peers (a gateway, another sidecar) dialling the inbound port itself with
//!   mTLS and the HTTP/2 tunnel: terminated here, each stream delivered to the app
//!   port it names;
//! - plain TCP from unmeshed clients to an app port, redirected by iptables: passed
//!   to the app at its original destination, detected and counted like outbound.
//!
//! Both reach the app at the pod's own address (the one the connection arrived
//! on), dialled from `127.0.0.6` (`::6`), as Istio does since 1.10: a listener the
//! app bound to loopback only (a debug or admin server) stays private to the pod.
//! The capture lets that source through to the app instead of sending it back to
//! the inbound port. [`AppAddress::Loopback`] is the per-pod opt-in for apps that
//! listen on loopback only.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use isthmus_vocab::{Refusal, error_chain};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::addr::{OrigDst, is_local_ip};
use crate::detect::{DetectConfig, Detected, detect};
use crate::forward::ForwardConfig;
use crate::http::HttpProxy;
use crate::listen::{Accepted, Handler, reset};
use crate::metrics::{Direction, ProxyMetrics};
use crate::outbound::{UpstreamIo, connect_while_detecting, serve_detected};
use crate::outcome::{Outcome, Reason, Rejection, Side};
use crate::tunnel::HandshakeObserver;
use crate::tunnel::server::{Peer, TunnelHandler, TunnelRequest, TunnelServer, Upstream};

/// Reads a peer's identity from a finished TLS handshake (the caller knows SPIFFE
/// and which issuer is its own).
pub type PeerIdentify = Arc<dyn Fn(&rustls::CommonState) -> Peer + Send + Sync>;

#[derive(Clone, Debug)]
pub struct InboundConfig {
    pub connect_timeout: Duration,
    pub detect: DetectConfig,
    pub opaque_ports: HashSet<u16>,
    pub forward: ForwardConfig,
    pub proxy_ports: HashSet<u16>,
    /// A peer must finish its TLS handshake within this time.
    pub tls_handshake_timeout: Duration,
    /// Where redirected plain TCP reaches the app.
    pub app: AppAddress,
}

/// What a mesh-facing listener serves, as the wiring says: never inferred from
/// whether a connection has an original destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerRole {
    /// A sidecar's inbound port: the mesh tunnel from peers dialling the port
    /// itself, and plain TCP that iptables redirected from an app port.
    Sidecar,
    /// A gateway's tunnel port: nothing is redirected to it, every connection is
    /// the mesh tunnel.
    Gateway,
}

/// The inbound [`Handler`]; `H` decides where tunnel streams go.
pub struct Inbound<H> {
    pub role: ListenerRole,
    /// Mesh TLS; without it tunnel connections are refused.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub identify: PeerIdentify,
    /// Counts and logs failed handshakes by reason.
    pub handshake_failed: HandshakeObserver,
    pub tunnel: Arc<TunnelServer<H>>,
    pub orig_dst: Arc<dyn OrigDst>,
    pub cfg: InboundConfig,
    pub http: HttpProxy,
    pub metrics: ProxyMetrics,
}

impl<H: TunnelHandler> Handler for Inbound<H> {
    async fn handle(self: Arc<Self>, conn: Accepted, drain: CancellationToken) {
        let Accepted {
            mut stream,
            client,
            local,
        } = conn;
        if self.role == ListenerRole::Gateway {
            return self.serve_tunnel(stream, client.0, drain).await;
        }
        // A connection that was not redirected, or was redirected from the inbound
        // port itself, was meant for the proxy: it must be the mesh tunnel.
        let dst = self.orig_dst.orig_dst(&stream, local).ok();
        let app_dst = dst.filter(|d| d.0.port() != local.port());
        let Some(dst) = app_dst else {
            return self.serve_tunnel(stream, client.0, drain).await;
        };
        let mut guard = self.metrics.open_connection(Direction::Inbound);
        if self.cfg.proxy_ports.contains(&dst.0.port()) && is_local_ip(dst.0.ip()) {
            guard.refuse(Outcome::refused_here(Refusal::Loop));
            reset(stream);
            return;
        }
        let skip_detection = self.cfg.opaque_ports.contains(&dst.0.port());
        let detection = async {
            if skip_detection {
                Ok(Detected::opaque())
            } else {
                detect(&mut stream, &self.cfg.detect).await
            }
        };
        // The original destination is the pod's address the client dialled.
        let app = self.cfg.app.target(dst.0.ip(), dst.0.port());
        let connect = connect_app(app, self.cfg.connect_timeout);
        let (upstream, detected) = match connect_while_detecting(connect, detection).await {
            Ok(both) => both,
            Err(e) => {
                e.log(Some(client.0));
                guard.set_outcome(e.outcome());
                reset(stream);
                return;
            }
        };
        let Ok(detected) = detected else {
            guard.set_outcome(Outcome::new(Side::Downstream, Reason::Error));
            return;
        };
        serve_detected(
            stream,
            UpstreamIo::Tcp(upstream),
            detected,
            &dst.to_string(),
            &self.http,
            &self.cfg.forward,
            &self.metrics,
            Direction::Inbound,
            &mut guard,
            drain,
        )
        .await;
    }
}

impl<H: TunnelHandler> Inbound<H> {
    async fn serve_tunnel(
        &self,
        stream: tokio::net::TcpStream,
        client: SocketAddr,
        drain: CancellationToken,
    ) {
        let Some(tls) = &self.tls else {
            self.metrics.refused(
                Direction::Inbound,
                Outcome::rejected(Rejection::NoMeshIdentity),
            );
            reset(stream);
            return;
        };
        let handshake = TlsAcceptor::from(tls.clone()).accept(stream);
        let tls_stream = match tokio::time::timeout(self.cfg.tls_handshake_timeout, handshake).await
        {
            Ok(Ok(tls_stream)) => tls_stream,
            Ok(Err(e)) => {
                let reason = (self.handshake_failed)(&e, client);
                debug!(%client, reason, "mesh TLS handshake refused");
                self.metrics.refused(
                    Direction::Inbound,
                    Outcome::rejected(Rejection::TlsHandshake),
                );
                return;
            }
            Err(_) => {
                info!(%client, "mesh TLS handshake timed out");
                self.metrics.refused(
                    Direction::Inbound,
                    Outcome::rejected(Rejection::TlsHandshakeTimeout),
                );
                return;
            }
        };
        let peer = (self.identify)(tls_stream.get_ref().1);
        let local = tls_stream.get_ref().0.local_addr().ok();
        if let Err(e) = self
            .tunnel
            .serve_connection_on(tls_stream, peer, local, drain)
            .await
        {
            debug!(%client, error = %e, "tunnel connection ended with an error");
        }
    }
}

/// The source the proxy binds to deliver to the app at a non-loopback address
/// (IPv4); the capture's first `OUTPUT` rule lets it through.
pub const INBOUND_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// [`INBOUND_SOURCE_V4`] for IPv6. Unlike IPv4's 127.0.0.0/8, `::6` is not on `lo`
/// by itself: `isthmus-init --ipv6` assigns it.
pub const INBOUND_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Where a sidecar reaches its app.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AppAddress {
    /// The pod's own address, the one the connection arrived on: listeners bound
    /// to loopback only are not reachable from outside the pod.
    #[default]
    Pod,
    /// Loopback (`--inbound-loopback`): for apps that listen on loopback only,
    /// which the pod thereby opens to the mesh.
    Loopback,
}

impl AppAddress {
    /// The app's address for a connection that arrived on `arrived_on` and asks
    /// for `port`.
    pub fn target(self, arrived_on: IpAddr, port: u16) -> SocketAddr {
        let ip = arrived_on.to_canonical();
        match self {
            Self::Pod => SocketAddr::new(ip, port),
            Self::Loopback => SocketAddr::new(loopback_like(ip), port),
        }
    }

    /// `"pod"` or `"loopback"`, for `/config`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Loopback => "loopback",
        }
    }
}

/// Why the app could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The delivery source is not an address of the pod (IPv6: `::6` not on `lo`).
    #[error("cannot bind the delivery source {source_ip} to reach the app at {app}")]
    Bind {
        source_ip: IpAddr,
        app: SocketAddr,
        #[source]
        error: io::Error,
    },
    /// The app refused (nothing listens on the pod's address at that port) or is
    /// unreachable.
    #[error("cannot connect to the app at {app}")]
    Connect {
        app: SocketAddr,
        #[source]
        error: io::Error,
    },
    /// The app did not accept in time.
    #[error("the app at {app} did not accept within {timeout:?}")]
    Timeout { app: SocketAddr, timeout: Duration },
}

impl DeliveryError {
    /// The tunnel's answer for this failure.
    pub fn refusal(&self) -> Refusal {
        match self {
            Self::Timeout { .. } => Refusal::UpstreamTimeout,
            Self::Bind { .. } | Self::Connect { .. } => Refusal::UpstreamRefused,
        }
    }

    /// How the connection ended: the proxy's own socket, or the app's.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Bind { .. } => Outcome::new(Side::Local, Reason::Error),
            Self::Connect { .. } => Outcome::new(Side::Upstream, Reason::ConnectError),
            Self::Timeout { .. } => Outcome::new(Side::Upstream, Reason::ConnectTimeout),
        }
    }

    /// The `tcp_close_total` reason.
    pub fn close_reason(&self) -> &'static str {
        self.outcome().close_label()
    }

    fn log(&self, client: Option<SocketAddr>) {
        match self {
            // A set-up fault of the pod, not of one connection.
            Self::Bind { .. } => {
                warn!(?client, error = %error_chain(self), "inbound delivery impossible: the delivery source is not assigned in this pod")
            }
            _ => info!(?client, error = %error_chain(self), "inbound connection to the app failed"),
        }
    }
}

/// Connects to the app at `app` within `timeout`. A non-loopback address is
/// dialled from the inbound source: from the pod's own address the capture would
/// send the connection back to the inbound port.
pub async fn connect_app(app: SocketAddr, timeout: Duration) -> Result<TcpStream, DeliveryError> {
    let connect = async {
        let socket = match app {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|error| DeliveryError::Connect { app, error })?;
        if !app.ip().is_loopback() {
            let source_ip = match app {
                SocketAddr::V4(_) => IpAddr::V4(INBOUND_SOURCE_V4),
                SocketAddr::V6(_) => IpAddr::V6(INBOUND_SOURCE_V6),
            };
            socket
                .bind(SocketAddr::new(source_ip, 0))
                .map_err(|error| DeliveryError::Bind {
                    source_ip,
                    app,
                    error,
                })?;
        }
        let stream = socket
            .connect(app)
            .await
            .map_err(|error| DeliveryError::Connect { app, error })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    };
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or(Err(DeliveryError::Timeout { app, timeout }))
}

/// The loopback address of the same family as `ip`.
pub fn loopback_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    }
}

/// Delivers tunnel streams to the pod's own app ports, as a sidecar's inbound does.
#[derive(Clone, Debug)]
pub struct LocalDelivery {
    /// Where the app is reached.
    pub app: AppAddress,
    pub connect_timeout: Duration,
    /// Refused as targets: they are the proxy, not the app.
    pub proxy_ports: HashSet<u16>,
}

impl TunnelHandler for LocalDelivery {
    async fn open(&self, request: &TunnelRequest) -> Result<Upstream, Refusal> {
        let port = request.authority.port();
        if self.proxy_ports.contains(&port) {
            return Err(Refusal::Loop);
        }
        // A stream of a connection without a socket address has no pod address
        // to go to; loopback would be the one place it must not fall back to.
        let Some(arrived_on) = request.local else {
            debug!(authority = %request.authority, "tunnel connection without a local address; nowhere to deliver");
            return Err(Refusal::UpstreamRefused);
        };
        let app = self.app.target(arrived_on.ip(), port);
        match connect_app(app, self.connect_timeout).await {
            Ok(stream) => Ok(Upstream::Connected(Box::new(stream))),
            Err(e) => {
                e.log(None);
                Err(e.refusal())
            }
        }
    }
}
