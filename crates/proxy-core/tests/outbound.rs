//! The sidecar's outbound handler in process: a fake original destination, a fixed
//! route table, a minted gateway identity and in-process origins, on loopback and
//! without privileges.
#![allow(clippy::unwrap_used)]

mod support;

use proxy_core::metrics::{Direction, ProxyMetrics};
use support::*;
use tokio::io::AsyncWriteExt;

/// A mirrored service's ClusterIP, as the app dials it; nothing listens there.
const HELLO_IP: &str = "127.0.0.1:9";

/// A connection to a mirrored service's address goes through the gateway's tunnel,
/// naming the service's authority and cluster; its bytes arrive at the far end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_destination_goes_through_the_tunnel_with_its_authority_and_cluster() {
    let pki = Pki::new();
    let mut origin = Origin::spawn(Behaviour::Echo).await;
    let mut peer = TunnelPeer::spawn(
        &pki,
        &[(HELLO, Answer::Deliver(origin.addr))],
        Answer::Refuse(proxy_core::tunnel::Refusal::NotExported),
    )
    .await;
    let app = pki.identity(CLUSTER, WORKLOAD_ID);
    let metrics = ProxyMetrics::default();
    let orig_dst = FakeOrigDst::new();
    let hello_ip = HELLO_IP.parse().unwrap();
    let proxy = Listening::start(
        outbound(
            FixedRoutes::default().mirror_addr(hello_ip, CLUSTER, HELLO),
            orig_dst.clone(),
            Some(app.pool_to(&peer.identity, peer.addr)),
            &[],
            &metrics,
        ),
        "127.0.0.1:0".parse().unwrap(),
        Direction::Outbound,
        &metrics,
    )
    .await;

    let mut client = orig_dst.connect(proxy.addr, hello_ip).await;
    client.write_all(b"ping through the tunnel").await.unwrap();
    client.shutdown().await.unwrap();
    let (echoed, end) = read_to_end(&mut client).await;
    end.unwrap();
    assert_eq!(echoed, b"ping through the tunnel");

    let seen = peer.next_request().await;
    assert_eq!(
        seen,
        SeenRequest {
            authority: HELLO.to_owned(),
            cluster: Some(CLUSTER.to_owned()),
            peer_id: Some(WORKLOAD_ID.to_owned()),
            peer_cluster: Some(CLUSTER.to_owned()),
        }
    );
    assert_eq!(origin.next_served().await.ended, Ended::Eof);
    eventually("the outbound connection is counted closed in order", || {
        closes(&metrics, Direction::Outbound, "eof") == 1
    })
    .await;
}
