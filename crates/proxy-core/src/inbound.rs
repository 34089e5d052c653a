//! The sidecar's inbound handler. Two kinds of connection arrive at the inbound port:
//! - mesh peers (a gateway, another sidecar) dialling the inbound port itself with
//!   mTLS and the HTTP/2 tunnel: terminated here, each stream delivered to the app
//!   port it names;
//! - plain TCP from unmeshed clients to an app port, redirected by iptables: passed
//!   to the app at its original destination, detected and counted like outbound.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use crate::addr::{OrigDst, is_local_ip};
use crate::detect::{DetectConfig, Detected, detect};
use crate::forward::{ForwardConfig, connect_upstream};
use crate::http::HttpProxy;
use crate::listen::{Accepted, Handler, reset};
use crate::metrics::{Direction, ProxyMetrics};
use crate::outbound::{UpstreamIo, connect_while_detecting, serve_detected};
use crate::tunnel::server::{Peer, TunnelHandler, TunnelRequest, TunnelServer, Upstream};
use crate::tunnel::{HandshakeObserver, Refusal};

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
}

/// The inbound [`Handler`]; `H` decides where tunnel streams go.
pub struct Inbound<H> {
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
    async fn handle(self: Arc<Self>, conn: Accepted, drain: watch::Receiver<bool>) {
        let Accepted {
            mut stream,
            client,
            local,
        } = conn;
        // A connection that was not redirected, or was redirected from the inbound
        // port itself, was meant for the proxy: it must be the mesh tunnel.
        let dst = self.orig_dst.orig_dst(&stream, local).ok();
        let app_dst = dst.filter(|d| d.0.port() != local.port());
        let Some(dst) = app_dst else {
            return self.serve_tunnel(stream, client.0, drain).await;
        };
        let mut guard = self.metrics.open_connection(Direction::Inbound);
        if self.cfg.proxy_ports.contains(&dst.0.port()) && is_local_ip(dst.0.ip()) {
            self.metrics
                .refused(Direction::Inbound, Refusal::Loop.as_str());
            guard.set_reason("loop");
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
        // The app is reached on loopback at the port the client asked for: a
        // connection of the proxy to its own pod address would be captured again.
        let app = SocketAddr::new(loopback_like(dst.0.ip()), dst.0.port());
        let connect = connect_upstream(app, self.cfg.connect_timeout);
        let (upstream, detected) = match connect_while_detecting(connect, detection).await {
            Ok(both) => both,
            Err(e) => {
                info!(client = %client, %dst, error = %e, "inbound connection to the app failed");
                guard.set_reason(e.close_reason());
                reset(stream);
                return;
            }
        };
        let Ok(detected) = detected else {
            guard.set_reason("downstream_error");
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
        drain: watch::Receiver<bool>,
    ) {
        let Some(tls) = &self.tls else {
            self.metrics.refused(Direction::Inbound, "no_mesh_identity");
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
                self.metrics.refused(Direction::Inbound, "tls_handshake");
                return;
            }
            Err(_) => {
                info!(%client, "mesh TLS handshake timed out");
                self.metrics
                    .refused(Direction::Inbound, "tls_handshake_timeout");
                return;
            }
        };
        let peer = (self.identify)(tls_stream.get_ref().1);
        if let Err(e) = self.tunnel.serve_connection(tls_stream, peer, drain).await {
            debug!(%client, error = %e, "tunnel connection ended with an error");
        }
    }
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
    /// Where the app is reached: loopback, so the proxy's own connection is not
    /// captured again by the pod's inbound rules.
    pub app_ip: IpAddr,
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
        let target = SocketAddr::new(self.app_ip, port);
        match connect_upstream(target, self.connect_timeout).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(Upstream::Connected(Box::new(stream)))
            }
            Err(e) if e.is_connect_timeout() => Err(Refusal::UpstreamTimeout),
            Err(_) => Err(Refusal::UpstreamRefused),
        }
    }
}
