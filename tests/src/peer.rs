//! What a test client's pool to a mesh port (a gateway's or a sidecar's inbound
//! listener) is configured with: the test's own peer, never the product's wiring.
//!
//! One connection or a few, a short reconnect backoff so a test does not wait on
//! it, no observer and no connection deadline; the caller chooses the TLS config
//! (and so the identity it presents and expects) and the connect timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proxy_core::pool::{PeerConfig, Pool};
use proxy_core::tunnel::H2Settings;
use proxy_identity::rustls::ClientConfig;
use proxy_identity::rustls::pki_types::ServerName;

use crate::tcp::WAIT;

/// The reconnect backoff of test clients: short, so a recovery is seen promptly.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// A pool of `connections` to `addr`, named `name` in logs, presenting and
/// verifying as `tls` says, each connect bounded by `connect_timeout`.
pub fn test_peer(
    name: &str,
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    connections: usize,
    connect_timeout: Duration,
) -> PeerConfig {
    PeerConfig {
        name: Arc::from(name),
        addr,
        server_name: ServerName::IpAddress(addr.ip().into()),
        tls,
        connect_timeout,
        connections,
        h2: H2Settings::default(),
        backoff_min: BACKOFF_MIN,
        backoff_max: BACKOFF_MAX,
        handshake_failed: None,
        deadline: None,
    }
}

/// A [`test_peer`] pool of one connection, each connect bounded by [`WAIT`],
/// running until the runtime it was spawned on ends. Call it inside a runtime.
pub fn test_pool(name: &str, addr: SocketAddr, tls: Arc<ClientConfig>) -> Pool {
    Pool::spawn(
        test_peer(name, addr, tls, 1, WAIT),
        tokio_util::sync::CancellationToken::new(),
    )
}
