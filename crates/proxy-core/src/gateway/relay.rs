//! The relay policy, per stream: a stream for this cluster is delivered to an
//! exported Service; one for another cluster is relayed over that cluster's link,
//! but only for this cluster's own workloads.

use isthmus_vocab::Refusal;
use tracing::info;

use super::Gateway;
use crate::tunnel::server::{TunnelHandler, TunnelRequest, Upstream};

impl TunnelHandler for Gateway {
    async fn open(&self, request: &TunnelRequest) -> Result<Upstream, Refusal> {
        let own = self.cfg.cluster.as_str();
        let target = request.cluster.as_ref().map_or(own, |c| c.as_str());
        if target == own {
            return self.deliver_local(request).await.map(Upstream::Connected);
        }
        // Another cluster: only this cluster's own workloads may go there, those whose
        // leaf verified through our cluster's issuer (the peer's cluster is read from
        // that verified path, never from the chain as sent). Relaying for anyone else,
        // a peer gateway or a workload of a linked cluster, would make this gateway
        // an open relay.
        let from_own_cluster = request
            .peer
            .cluster
            .as_ref()
            .is_some_and(|peer_cluster| peer_cluster.as_str() == own);
        if !from_own_cluster {
            return Err(Refusal::Forbidden);
        }
        let Some(pool) = self.pool_for(target) else {
            return Err(Refusal::UnknownCluster);
        };
        // Relayed as soon as the stream is open: the client's bytes cross the link
        // behind the CONNECT, and the peer gateway's answer is passed back as it is.
        // The far gateway, which picks the endpoint, learns what the stream carries.
        pool.open_carrying(
            &request.authority,
            request.cluster.as_ref(),
            request.carries(),
        )
        .await
            .map(Upstream::Relayed)
            .map_err(|e| {
                info!(cluster = target, authority = %request.authority, error = %e, "relay to peer gateway failed");
                e.refusal()
            })
    }
}
