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
//! - [`MeshListener`] serves any [`TunnelHandler`] behind mTLS, for a far end
//!   that is not scripted.
//!
//! Handlers are built with the constructors in `handlers.rs` ([`outbound`],
//! [`inbound`], [`explicit`]) so a change of their fields touches that file only.
//!
//! Each test binary compiles this module and uses a part of it.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

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
use proxy_core::inbound::{
    AppAddress, Inbound, InboundConfig, ListenerRole, LocalDelivery, PeerIdentify,
};
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

mod handlers;
mod observe;
mod orig_dst;
mod origin;
mod peer;
mod pki;
mod routes;

pub use handlers::*;
pub use observe::*;
pub use orig_dst::*;
pub use origin::*;
pub use peer::*;
pub use pki::*;
pub use routes::*;
