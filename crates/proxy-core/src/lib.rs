//! The hot path of Isthmus.
//!
//! # Layout
//! - [`addr`]: address newtypes and the original-destination lookup (`SO_ORIGINAL_DST`).
//! - [`route`]: the [`route::RouteLookup`] seam that discovery plugs into.
//! - [`listen`]: accept loops with a connection bound and a graceful drain.
//! - [`loops`]: recognising the proxy's own upstream sockets when they come back.
//! - [`detect`]: protocol detection on a connection's first bytes.
//! - [`forward`]: the bidirectional byte forwarder (copy loop, and `splice` between sockets).
//! - [`http`]: per-request HTTP proxying for connections detected as HTTP.
//! - [`tunnel`]: the HTTP/2 `CONNECT` tunnel, client and server.
//! - [`pool`]: warm pools of tunnel connections to one peer.
//! - [`resolve`]: peers named by DNS, kept resolved for their pools.
//! - [`outbound`], [`inbound`]: the sidecar's two connection handlers.
//! - [`gateway`]: the gateway's tunnel handler: relay policy, delivery to pods,
//!   link pools.
//! - [`explicit`]: the standalone role's explicit proxy (CONNECT, absolute-form).
//! - [`outcome`]: how a connection ended (side and reason), from which its metric
//!   labels, reset and log line derive.
//! - [`metrics`]: the traffic metrics the hot path updates.
//!
//! proxy-core knows nothing of Kubernetes, files or certificates: it is handed a
//! route lookup and ready-made TLS configurations by its caller.

pub mod addr;
pub mod backoff;
pub mod detect;
pub mod explicit;
pub mod forward;
pub mod gateway;
pub mod http;
pub mod inbound;
pub mod listen;
pub mod loops;
pub mod metrics;
pub mod outbound;
pub mod outcome;
pub mod pool;
pub mod resolve;
pub mod route;
pub mod tunnel;
