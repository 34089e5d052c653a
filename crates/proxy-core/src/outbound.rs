//! The sidecar's outbound handler: a connection the app opened, redirected to the
//! proxy, is routed by its original destination, detected, and forwarded either
//! straight to that destination or through the cluster gateway's tunnel.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::addr::{OrigDst, OrigDstAddr, is_local_ip};
use crate::detect::{DetectConfig, Detected, Prefixed, Protocol, detect};
use crate::forward::{ForwardConfig, connect_upstream, forward_io, forward_tcp};
use crate::http::HttpProxy;
use crate::listen::{Accepted, Handler, reset};
use crate::metrics::{ConnectionGuard, Direction, ProxyMetrics};
use crate::pool::Pool;
use crate::route::{Route, RouteLookup};
use crate::tunnel::Refusal;
use crate::tunnel::client::TunnelStream;

/// Settings of the outbound side.
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    pub connect_timeout: Duration,
    pub detect: DetectConfig,
    /// Destination ports that skip detection (server-speaks-first protocols).
    pub opaque_ports: HashSet<u16>,
    pub forward: ForwardConfig,
    /// Ports of this proxy's own listeners: a destination on one of them at a local
    /// address would loop back into the proxy.
    pub proxy_ports: HashSet<u16>,
}

/// The outbound [`Handler`].
pub struct Outbound<L> {
    pub lookup: L,
    /// The cluster gateway's tunnel; without one, mirrored routes are refused.
    pub gateway: Option<Pool>,
    pub orig_dst: Arc<dyn OrigDst>,
    pub cfg: OutboundConfig,
    pub http: HttpProxy,
    pub metrics: ProxyMetrics,
}

enum Upstream {
    Tcp(TcpStream),
    Tunnel(TunnelStream),
}

impl<L: RouteLookup> Handler for Outbound<L> {
    async fn handle(self: Arc<Self>, conn: Accepted, drain: watch::Receiver<bool>) {
        let mut guard = self.metrics.open_connection(Direction::Outbound);
        let Accepted {
            mut stream,
            client,
            local,
        } = conn;
        let dst = match self.orig_dst.orig_dst(&stream, local) {
            Ok(dst) => dst,
            Err(e) => {
                info!(%client, error = %e, "no original destination (not redirected?), refusing");
                guard.set_reason("no_orig_dst");
                reset(stream);
                return;
            }
        };
        if self.cfg.proxy_ports.contains(&dst.0.port()) && is_local_ip(dst.0.ip()) {
            info!(%client, %dst, "connection to the proxy's own port refused (loop)");
            self.metrics
                .refused(Direction::Outbound, Refusal::Loop.as_str());
            guard.set_reason("loop");
            reset(stream);
            return;
        }
        let route = self.lookup.route_addr(dst);
        let skip_detection = self.cfg.opaque_ports.contains(&dst.0.port());
        // Connecting while detecting hides the connect latency behind the client's
        // first bytes, and a server-speaks-first peer is not kept waiting twice.
        let detection = async {
            if skip_detection {
                Ok(Detected::opaque())
            } else {
                detect(&mut stream, &self.cfg.detect).await
            }
        };
        let (upstream, detected) = match connect_while_detecting(
            self.connect(&route, dst),
            detection,
        )
        .await
        {
            Ok(both) => both,
            Err(refusal) => {
                info!(%client, %dst, route = ?route, reason = refusal.as_str(), "outbound connection refused");
                self.metrics.refused(Direction::Outbound, refusal.as_str());
                guard.set_reason(refusal.as_str());
                reset(stream);
                return;
            }
        };
        let detected = match detected {
            Ok(detected) => detected,
            Err(e) => {
                debug!(%client, error = %e, "client failed during detection");
                guard.set_reason("downstream_error");
                return;
            }
        };
        let label = match &route {
            Route::Mirrored { authority, .. } => authority.to_string(),
            Route::Passthrough => dst.to_string(),
        };
        self.forward(stream, upstream, detected, &label, &mut guard, drain)
            .await;
    }
}

impl<L: RouteLookup> Outbound<L> {
    async fn connect(&self, route: &Route, dst: OrigDstAddr) -> Result<Upstream, Refusal> {
        match route {
            Route::Passthrough => match connect_upstream(dst.0, self.cfg.connect_timeout).await {
                Ok(stream) => Ok(Upstream::Tcp(stream)),
                Err(e) if e.is_connect_timeout() => Err(Refusal::UpstreamTimeout),
                Err(_) => Err(Refusal::UpstreamRefused),
            },
            Route::Mirrored { cluster, authority } => {
                let pool = self.gateway.as_ref().ok_or(Refusal::LinkDown)?;
                match pool.open(authority, Some(cluster)).await {
                    Ok(stream) => Ok(Upstream::Tunnel(stream)),
                    Err(e) => {
                        info!(%authority, %cluster, error = %e, "mirrored service unreachable");
                        Err(e.refusal())
                    }
                }
            }
        }
    }

    async fn forward(
        &self,
        stream: TcpStream,
        upstream: Upstream,
        detected: Detected,
        label: &str,
        guard: &mut ConnectionGuard,
        drain: watch::Receiver<bool>,
    ) {
        serve_detected(
            stream,
            upstream_io(upstream),
            detected,
            label,
            &self.http,
            &self.cfg.forward,
            &self.metrics,
            Direction::Outbound,
            guard,
            drain,
        )
        .await
    }
}

/// Connects while protocol detection waits for the client's first bytes, and
/// returns as soon as the connect fails: a refused or timed-out upstream must reset
/// the client at once, not after the detection window (a client that waits for
/// the server to speak first would otherwise hang for all of it).
pub(crate) async fn connect_while_detecting<U, E, D>(
    connect: impl Future<Output = Result<U, E>>,
    detection: impl Future<Output = D>,
) -> Result<(U, D), E> {
    let mut connect = std::pin::pin!(connect);
    let mut detection = std::pin::pin!(detection);
    tokio::select! {
        upstream = &mut connect => Ok((upstream?, detection.await)),
        detected = &mut detection => Ok((connect.await?, detected)),
    }
}

/// The upstream side of a connection once it is established.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Other(crate::tunnel::BoxIo),
}

fn upstream_io(upstream: Upstream) -> UpstreamIo {
    match upstream {
        Upstream::Tcp(s) => UpstreamIo::Tcp(s),
        Upstream::Tunnel(s) => UpstreamIo::Other(Box::new(s)),
    }
}

/// Forwards a detected downstream connection to its upstream: HTTP through the
/// HTTP proxy, anything else as bytes (spliced when both ends are plain sockets).
/// Shared by the outbound and the plain inbound path.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_detected(
    downstream: TcpStream,
    upstream: UpstreamIo,
    detected: Detected,
    label: &str,
    http: &HttpProxy,
    forward: &ForwardConfig,
    metrics: &ProxyMetrics,
    direction: Direction,
    guard: &mut ConnectionGuard,
    drain: watch::Receiver<bool>,
) {
    let counters = metrics.byte_counters(direction);
    match (detected.protocol, upstream) {
        (Protocol::Opaque, UpstreamIo::Tcp(up)) => {
            if let Err(e) = forward_tcp(downstream, up, &detected.prefix, forward, &counters).await
            {
                guard.set_reason(e.close_reason());
                debug!(%label, error = %e, "connection ended with an error");
            }
        }
        (Protocol::Opaque, UpstreamIo::Other(up)) => {
            // Kept so the client can be reset if the tunnel side fails: the forwarder
            // drops generic streams as they are.
            let abort = AbortHandle::new(&downstream);
            if let Err(e) = forward_io(downstream, up, &detected.prefix, forward, &counters).await {
                match e.refusal() {
                    Some(refusal) => refused(metrics, direction, guard, label, refusal),
                    None => {
                        guard.set_reason(e.close_reason());
                        debug!(%label, error = %e, "tunnelled connection ended with an error");
                    }
                }
                abort.reset();
            }
        }
        (protocol, upstream) => {
            let downstream = Prefixed::new(detected.prefix.freeze(), downstream);
            let result = match upstream {
                UpstreamIo::Tcp(up) => {
                    let _ = up.set_nodelay(true);
                    http.serve(downstream, up, protocol, label, drain).await
                }
                UpstreamIo::Other(up) => {
                    let abort = AbortHandle::new(downstream.get_ref());
                    let result = http.serve(downstream, up, protocol, label, drain).await;
                    if let Err(e) = &result
                        && let Some(refusal) = e.refusal()
                    {
                        refused(metrics, direction, guard, label, refusal);
                        abort.reset();
                        return;
                    }
                    result
                }
            };
            if let Err(e) = result {
                guard.set_reason(e.close_reason());
                debug!(%label, error = %e, "HTTP connection ended with an error");
            }
        }
    }
}

/// Logs and counts a tunnel refusal that reached a connection already forwarding.
fn refused(
    metrics: &ProxyMetrics,
    direction: Direction,
    guard: &mut ConnectionGuard,
    label: &str,
    refusal: Refusal,
) {
    info!(%label, reason = refusal.as_str(), "tunnelled connection refused by the far end");
    metrics.refused(direction, refusal.as_str());
    guard.set_reason(refusal.as_str());
}

/// A second handle on a client socket, to turn its close into a reset after the
/// socket itself was handed to a forwarder that drops streams as they are.
struct AbortHandle(Option<std::os::fd::OwnedFd>);

impl AbortHandle {
    fn new(stream: &TcpStream) -> Self {
        Self(stream.as_fd().try_clone_to_owned().ok())
    }

    /// `SO_LINGER` 0: the close that follows (the forwarder's drop of the socket)
    /// sends an RST, so the client cannot take a cut stream for a complete one.
    fn reset(self) {
        if let Some(fd) = self.0 {
            let socket = socket2::Socket::from(fd);
            let _ = socket.set_linger(Some(Duration::ZERO));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failed_connect_does_not_wait_for_detection() {
        let connect = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err::<(), _>("refused")
        };
        // A client that never sends: detection would only end at its timeout.
        let detection = std::future::pending::<()>();
        let started = tokio::time::Instant::now();
        assert_eq!(
            connect_while_detecting(connect, detection).await,
            Err("refused")
        );
        assert_eq!(started.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn both_results_are_kept_whichever_ends_first() {
        let slow = |ms, value| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            value
        };
        let connect = async { Ok::<_, ()>(slow(5, "upstream").await) };
        assert_eq!(
            connect_while_detecting(connect, slow(20, "detected")).await,
            Ok(("upstream", "detected"))
        );
        let connect = async { Ok::<_, ()>(slow(20, "upstream").await) };
        assert_eq!(
            connect_while_detecting(connect, slow(5, "detected")).await,
            Ok(("upstream", "detected"))
        );
        let connect = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err::<(), _>("timed out")
        };
        assert_eq!(
            connect_while_detecting(connect, slow(5, "detected")).await,
            Err("timed out")
        );
    }
}
