//! The sidecar's outbound handler: a connection the app opened, redirected to the
//! proxy, is routed by its original destination, detected, and forwarded either
//! straight to that destination or through the cluster gateway's tunnel.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use isthmus_vocab::Refusal;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::addr::{LocalAddrs, OrigDst, OrigDstAddr};
use crate::detect::{DetectConfig, Detected, Prefixed, Protocol, detect};
use crate::forward::{ForwardConfig, forward_io, forward_tcp};
use crate::http::{HttpProxy, HttpUpstream, MirroredTarget, PerRequest, RetryBudgets};
use crate::listen::{Accepted, Handler, reset};
use crate::loops::{self, ConnectError, LoopWarning, OwnSocket, OwnSockets};
use crate::metrics::{ConnectionGuard, Direction, ProxyMetrics};
use crate::outcome::{Outcome, Reason, Side};
use crate::pool::{LinkState, Pool};
use crate::route::{Route, RouteLookup};
use crate::tunnel::client::{Carries, RefusalCell, TunnelStream};

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
    /// Per mirrored Service, the retries its requests may still spend.
    pub retry_budgets: Arc<RetryBudgets>,
}

/// Why a connection got no upstream.
enum Unserved {
    /// The upstream was refused or failed: the client is reset.
    Refused(Outcome),
    /// The client failed while its protocol was being detected.
    Client(std::io::Error),
}

enum Upstream {
    /// A passthrough connection, recorded as the proxy's own socket.
    Tcp(TcpStream, OwnSocket),
    Tunnel(TunnelStream),
    /// HTTP to a mirrored Service: a stream per request, the first already open.
    PerRequest(Arc<PerRequest>),
}

impl Upstream {
    /// Resolves if the upstream fails (a reset) before the client has spoken; a
    /// tunnel stream reports its failures when used.
    async fn failed(&self) {
        match self {
            Upstream::Tcp(stream, _) => {
                if stream.ready(tokio::io::Interest::ERROR).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            Upstream::Tunnel(_) | Upstream::PerRequest(_) => std::future::pending().await,
        }
    }

    /// Why a failed upstream is refused: a loop when the connection came back into
    /// this proxy and was refused there.
    fn refusal(&self) -> Outcome {
        match self {
            Upstream::Tcp(_, own) if own.looped() => Outcome::refused_here(Refusal::Loop),
            _ => Outcome::refused_here(Refusal::UpstreamRefused),
        }
    }
}

impl<L: RouteLookup> Handler for Outbound<L> {
    async fn handle(self: Arc<Self>, conn: Accepted, drain: CancellationToken) {
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
                guard.set_outcome(Outcome::new(Side::Downstream, Reason::NoOrigDst));
                reset(stream);
                return;
            }
        };
        // Checked before anything else is spent on it: in a loop every connection
        // comes back here, and each must cost no more than this.
        if OwnSockets::shared().is_own_upstream(client.0, dst.0).await {
            OwnSockets::shared().mark_looped(client.0, dst.0);
            LoopWarning::shared().refused(client.0, Some(dst.0));
            guard.refuse(Outcome::refused_here(Refusal::Loop));
            reset(stream);
            return;
        }
        if LocalAddrs::shared().is_own(dst.0, self.cfg.proxy_ports.iter().copied()) {
            info!(%client, %dst, "connection to the proxy's own port refused (loop)");
            guard.refuse(Outcome::refused_here(Refusal::Loop));
            reset(stream);
            return;
        }
        let route = self.lookup.route_addr(dst);
        let served = match &route {
            Route::Mirrored {
                cluster,
                authority,
                policy,
            } if !self.cfg.opaque_ports.contains(&dst.0.port()) => {
                let target = MirroredTarget {
                    cluster: cluster.clone(),
                    authority: authority.clone(),
                    policy: policy.clone(),
                };
                self.detect_and_open(target, &mut stream).await
            }
            _ => self.connect_and_detect(&route, dst, &mut stream).await,
        };
        let (upstream, detected) = match served {
            Ok(both) => both,
            Err(Unserved::Refused(outcome)) => {
                info!(%client, %dst, route = ?route, reason = outcome.close_label(), "outbound connection {outcome}");
                guard.refuse(outcome);
                reset(stream);
                return;
            }
            Err(Unserved::Client(e)) => {
                debug!(%client, error = %e, "client failed during detection");
                guard.set_outcome(Outcome::new(Side::Downstream, Reason::Error));
                return;
            }
        };
        let label = match &route {
            Route::Mirrored { authority, .. } => authority.to_string(),
            Route::Passthrough => dst.to_string(),
        };
        // The recorded port is forgotten once forwarding is over and the upstream
        // socket closed.
        let (upstream, _own) = match upstream {
            Upstream::Tcp(stream, own) => (UpstreamIo::Tcp(stream), Some(own)),
            Upstream::Tunnel(s) => (UpstreamIo::tunnel(s), None),
            Upstream::PerRequest(p) => (UpstreamIo::PerRequest(p), None),
        };
        self.forward(stream, upstream, detected, &label, &mut guard, drain)
            .await;
    }
}

impl<L: RouteLookup> Outbound<L> {
    /// Connects while detection waits for the client's first bytes (hiding the
    /// connect latency behind them), and returns as soon as the connect fails: a
    /// refused or timed-out upstream resets the client at once, not after the
    /// detection window, and so does an upstream that fails while the client has
    /// not spoken yet (its own connection refused as a loop, say).
    async fn connect_and_detect(
        &self,
        route: &Route,
        dst: OrigDstAddr,
        stream: &mut TcpStream,
    ) -> Result<(Upstream, Detected), Unserved> {
        let skip_detection = self.cfg.opaque_ports.contains(&dst.0.port());
        let detection = async {
            if skip_detection {
                Ok(Detected::opaque())
            } else {
                detect(stream, &self.cfg.detect).await
            }
        };
        let mut detection = std::pin::pin!(detection);
        let mut connect = std::pin::pin!(self.connect(route, dst));
        let upstream = tokio::select! {
            upstream = &mut connect => upstream.map_err(Unserved::Refused)?,
            detected = &mut detection => {
                let upstream = connect.await.map_err(Unserved::Refused)?;
                return Ok((upstream, detected.map_err(Unserved::Client)?));
            }
        };
        tokio::select! {
            detected = &mut detection => Ok((upstream, detected.map_err(Unserved::Client)?)),
            () = upstream.failed() => Err(Unserved::Refused(upstream.refusal())),
        }
    }

    /// Detects first, then opens the mirrored Service's stream marked with what it
    /// carries: the mark travels in the `CONNECT` itself, and opening costs no round
    /// trip (the request's bytes follow the `CONNECT` at once), so nothing is lost by
    /// waiting for detection. HTTP then gets a stream per request, this one first.
    /// A link known to be down still refuses the client at once, not after detection.
    async fn detect_and_open(
        &self,
        target: MirroredTarget,
        stream: &mut TcpStream,
    ) -> Result<(Upstream, Detected), Unserved> {
        let pool = self
            .gateway
            .as_ref()
            .ok_or(Unserved::Refused(Outcome::refused_here(Refusal::LinkDown)))?;
        if let LinkState::Down { error, .. } = pool.state() {
            info!(authority = %target.authority, cluster = %target.cluster, %error, "mirrored service unreachable");
            return Err(Unserved::Refused(Outcome::refused_here(Refusal::LinkDown)));
        }
        let detected = detect(stream, &self.cfg.detect)
            .await
            .map_err(Unserved::Client)?;
        let carries = match detected.protocol {
            Protocol::Http1 => Carries::Http1Request,
            Protocol::Http2 => Carries::H2Request,
            Protocol::Opaque => Carries::Connection,
        };
        let opened = pool
            .open_carrying(&target.authority, Some(&target.cluster), carries)
            .await;
        let first = match opened {
            Ok(first) => first,
            Err(e) => {
                info!(authority = %target.authority, cluster = %target.cluster, error = %e, "mirrored service unreachable");
                return Err(Unserved::Refused(e.outcome()));
            }
        };
        if carries == Carries::Connection {
            return Ok((Upstream::Tunnel(first), detected));
        }
        let budget = self.retry_budgets.get(&target.authority);
        let per_request = PerRequest::new(
            pool.clone(),
            target,
            carries,
            first,
            self.http.settings.h2.clone(),
            budget,
            self.metrics.clone(),
        );
        Ok((Upstream::PerRequest(Arc::new(per_request)), detected))
    }

    async fn connect(&self, route: &Route, dst: OrigDstAddr) -> Result<Upstream, Outcome> {
        match route {
            Route::Passthrough => match loops::connect(dst.0, self.cfg.connect_timeout).await {
                Ok((stream, own)) => Ok(Upstream::Tcp(stream, own)),
                Err(ConnectError::Looped(_)) => Err(Outcome::refused_here(Refusal::Loop)),
                Err(ConnectError::Failed(e)) if e.is_connect_timeout() => {
                    Err(Outcome::refused_here(Refusal::UpstreamTimeout))
                }
                Err(ConnectError::Failed(_)) => {
                    Err(Outcome::refused_here(Refusal::UpstreamRefused))
                }
            },
            Route::Mirrored {
                cluster, authority, ..
            } => {
                let pool = self
                    .gateway
                    .as_ref()
                    .ok_or(Outcome::refused_here(Refusal::LinkDown))?;
                match pool.open(authority, Some(cluster)).await {
                    Ok(stream) => Ok(Upstream::Tunnel(stream)),
                    Err(e) => {
                        info!(%authority, %cluster, error = %e, "mirrored service unreachable");
                        Err(e.outcome())
                    }
                }
            }
        }
    }

    async fn forward(
        &self,
        stream: TcpStream,
        upstream: UpstreamIo,
        detected: Detected,
        label: &str,
        guard: &mut ConnectionGuard,
        drain: CancellationToken,
    ) {
        serve_detected(
            stream,
            upstream,
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
    /// Any other stream; a tunnel stream comes with the cell its refusal lands in.
    Other(crate::tunnel::BoxIo, Option<RefusalCell>),
    /// A mirrored Service's HTTP: a tunnel stream per request.
    PerRequest(Arc<PerRequest>),
}

impl UpstreamIo {
    pub fn tunnel(stream: TunnelStream) -> Self {
        let refusal = stream.refusal_cell();
        UpstreamIo::Other(Box::new(stream), Some(refusal))
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
    drain: CancellationToken,
) {
    let counters = metrics.byte_counters(direction);
    let outcome = match (detected.protocol, upstream) {
        (Protocol::Opaque, UpstreamIo::Tcp(up)) => {
            // forward_tcp resets both sockets itself on an error.
            match forward_tcp(downstream, up, &detected.prefix, forward, &counters).await {
                Ok(_) => return,
                Err(e) => {
                    debug!(%label, error = %e, "connection ended with an error");
                    e.outcome()
                }
            }
        }
        (Protocol::Opaque, UpstreamIo::Other(up, refusal)) => {
            // Kept so the client can be reset if the tunnel side fails: the forwarder
            // drops generic streams as they are.
            let abort = AbortHandle::new(&downstream);
            let Err(e) = forward_io(downstream, up, &detected.prefix, forward, &counters).await
            else {
                return;
            };
            let outcome = peer_refusal(refusal.as_ref()).unwrap_or_else(|| e.outcome());
            if outcome.refusal().is_none() {
                debug!(%label, error = %e, "tunnelled connection ended with an error");
            }
            if outcome.resets() {
                abort.reset();
            }
            outcome
        }
        (Protocol::Opaque, UpstreamIo::PerRequest(_)) => {
            // Never built for a connection that is not HTTP.
            debug!(%label, "opaque connection without a connection stream");
            Outcome::new(Side::Local, Reason::Error)
        }
        (protocol, upstream) => {
            let downstream = Prefixed::new(detected.prefix.freeze(), downstream);
            let result = match upstream {
                UpstreamIo::PerRequest(per_request) => {
                    let abort = AbortHandle::new(downstream.get_ref());
                    let upstream = HttpUpstream::<TcpStream>::PerRequest(per_request.clone());
                    let result = http
                        .serve_upstream(downstream, upstream, protocol, label, drain, None)
                        .await;
                    if result.is_err()
                        && let Some(outcome) = per_request.refused()
                    {
                        abort.reset();
                        refused(metrics, direction, guard, label, outcome);
                        return;
                    }
                    result
                }
                UpstreamIo::Tcp(up) => {
                    let _ = up.set_nodelay(true);
                    http.serve(downstream, up, protocol, label, drain).await
                }
                UpstreamIo::Other(up, refusal) => {
                    let abort = AbortHandle::new(downstream.get_ref());
                    let result = http
                        .serve_refusable(downstream, up, protocol, label, drain, refusal.clone())
                        .await;
                    if result.is_err()
                        && let Some(outcome) = peer_refusal(refusal.as_ref())
                    {
                        // A refused stream must look like a failed connect to the
                        // client, not like an answer: reset, never a made-up response.
                        abort.reset();
                        refused(metrics, direction, guard, label, outcome);
                        return;
                    }
                    result
                }
            };
            match result {
                Ok(()) => return,
                Err(e) => {
                    debug!(%label, error = %e, "HTTP connection ended with an error");
                    e.outcome()
                }
            }
        }
    };
    match outcome.refusal() {
        Some(_) => refused(metrics, direction, guard, label, outcome),
        None => guard.set_outcome(outcome),
    }
}

/// The tunnel peer's refusal of the stream, if it refused it.
fn peer_refusal(cell: Option<&RefusalCell>) -> Option<Outcome> {
    cell?.get().map(Outcome::refused_by_peer)
}

/// Logs and counts a tunnel refusal that reached a connection already forwarding.
fn refused(
    metrics: &ProxyMetrics,
    direction: Direction,
    guard: &mut ConnectionGuard,
    label: &str,
    outcome: Outcome,
) {
    info!(%label, reason = outcome.close_label(), "tunnelled connection {outcome}");
    metrics.refused(direction, outcome);
    guard.set_outcome(outcome);
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
