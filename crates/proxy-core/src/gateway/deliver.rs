//! Delivery to this cluster's exported Services: endpoint choice (by the
//! [`super::balance`]r, skipping what failed for this stream and anything on this
//! host), meshed pods over their sidecar's tunnel, unmeshed ones with plain TCP,
//! and the stream observed for the balancer ([`super::observe`]).

use std::net::{IpAddr, SocketAddr};

use isthmus_vocab::{Authority, Refusal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::observe::Observed;
use super::{Endpoint, Gateway, lock};
use crate::addr::LocalAddrs;
use crate::forward::connect_upstream;
use crate::pool::{Pool, PoolError};
use crate::tunnel::BoxIo;
use crate::tunnel::server::TunnelRequest;

/// The warm tunnel pool to one meshed pod's sidecar (its inbound port), closed
/// when the pod stops being an endpoint.
pub(super) struct PodTunnel {
    pool: Pool,
    stop: CancellationToken,
}

impl Gateway {
    pub(super) async fn deliver_local(&self, request: &TunnelRequest) -> Result<BoxIo, Refusal> {
        let endpoints = self.lookup.exported(&request.authority)?;
        if endpoints.is_empty() {
            return Err(Refusal::NoEndpoints);
        }
        let mut last = Refusal::NoEndpoints;
        let mut tried = Vec::new();
        // Each endpoint at most once per stream, so one dead pod does not fail the
        // stream while others are up.
        while let Some((endpoint, mut in_flight)) =
            self.balancer.pick(&request.authority, &endpoints, &tried)
        {
            tried.push(endpoint.addr);
            // Whatever its port, an endpoint on this host reaches the gateway's own
            // admin server (which trusts a loopback peer) or a neighbour on the
            // host, never a pod of the Service. Listeners are wildcards by default:
            // the tunnel's ports are refused even where local endpoints are allowed.
            // Not the endpoint's failure: its score is left alone.
            let local = LocalAddrs::shared();
            if (!self.cfg.allow_local_endpoints && local.is_this_host(endpoint.addr.ip()))
                || local.is_own(
                    endpoint.addr,
                    self.cfg.own_addrs.iter().map(SocketAddr::port),
                )
            {
                last = Refusal::Loop;
                continue;
            }
            let opened = Instant::now();
            match self.connect_endpoint(endpoint).await {
                Ok(stream) => {
                    return Ok(Box::new(Observed::new(
                        stream,
                        in_flight,
                        opened,
                        request.one_request,
                    )));
                }
                Err(refusal) => {
                    in_flight.failed();
                    warn!(authority = %request.authority, endpoint = %endpoint.addr, meshed = endpoint.meshed, reason = refusal.as_str(), "endpoint unreachable");
                    last = refusal;
                }
            }
        }
        Err(last)
    }

    /// One endpoint: a meshed pod (discovery says so) over its sidecar's tunnel
    /// and never otherwise, an unmeshed one with plain TCP.
    async fn connect_endpoint(&self, endpoint: Endpoint) -> Result<BoxIo, Refusal> {
        let addr = endpoint.addr;
        if endpoint.meshed {
            let authority = Authority::parse(&addr.to_string()).map_err(|_| Refusal::BadRequest)?;
            // The answer is awaited here, a round trip inside the cluster, so that
            // a pod whose sidecar or app is down is skipped for the next endpoint.
            // Whatever fails, nothing is sent to the pod in plaintext: a sidecar
            // that is down, or that cannot prove an identity of our trust domain,
            // is no reason to drop the encryption and authentication it stands for.
            return match self
                .pod_pool(addr.ip())
                .open_answered(&authority, None)
                .await
            {
                Ok(stream) => Ok(Box::new(stream)),
                Err(e) => {
                    debug!(endpoint = %addr, error = %e, "meshed endpoint unreachable over its sidecar's tunnel");
                    Err(match e {
                        // The sidecar's verdict on its app port stands.
                        PoolError::Refused {
                            refusal:
                                refusal @ (Refusal::UpstreamRefused
                                | Refusal::UpstreamTimeout
                                | Refusal::Loop),
                            ..
                        } => refusal,
                        // No sidecar answers, or something that is not one.
                        _ => Refusal::UpstreamRefused,
                    })
                }
            };
        }
        match connect_upstream(addr, self.cfg.connect_timeout).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(Box::new(stream))
            }
            Err(e) if e.is_connect_timeout() => Err(Refusal::UpstreamTimeout),
            Err(_) => Err(Refusal::UpstreamRefused),
        }
    }

    /// The warm tunnel pool to the sidecar of the meshed pod at `ip`, made on
    /// first use.
    fn pod_pool(&self, ip: IpAddr) -> Pool {
        let mut pods = lock(&self.pods);
        if let Some(tunnel) = pods.get(&ip) {
            return tunnel.pool.clone();
        }
        // Stopped when the pod is no longer an endpoint (`forget_departed_pods`).
        // Not a child of the shutdown: streams still draining may need the pod.
        let stop = CancellationToken::new();
        let pool = Pool::spawn_on(
            self.cfg.pools.peer(
                format!("pod/{ip}"),
                SocketAddr::new(ip, self.cfg.pod_port),
                self.tls.pod(),
                1,
            ),
            stop.clone(),
            &self.tasks,
        );
        pods.insert(
            ip,
            PodTunnel {
                pool: pool.clone(),
                stop,
            },
        );
        pool
    }

    /// Forgets pods that are no longer anyone's endpoint, closing their pools, so
    /// pod churn does not accumulate connections.
    pub(super) fn forget_departed_pods(&self) {
        lock(&self.pods).retain(|ip, tunnel| {
            let keep = self.lookup.is_endpoint(*ip);
            if !keep {
                tunnel.stop.cancel();
            }
            keep
        });
    }
}
