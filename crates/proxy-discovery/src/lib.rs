//! Service discovery for the mesh: the model, the ServiceMirror reconcile, the
//! sources that feed them, and the route index the hot path reads.
//!
//! # Layout
//!
//! - [`model`]: the Kubernetes objects the mesh reads (`Service`, `Endpoints`,
//!   `EndpointSlice`, `Deployment`) and its own kinds (the seed's `ServiceMirror`,
//!   `Link`, `ClusterSettings`), validated names (`ClusterName`, `Authority`,
//!   `ServiceRef`, `SpiffeUri`), and the YAML manifest parser.
//! - [`reconcile`]: ServiceMirror + remote view -> mirrored local Service and status.
//!
//! # Not here
//!
//! Sockets, TLS and the data path (proxy-core, proxy-identity), and any other
//! `proxy-*` crate: the proxy binary adapts this crate's types to theirs.
pub mod index;
pub mod model;
pub mod reconcile;
pub mod snapshot;
pub mod source;

pub use index::{GatewayRef, Index, Route};
pub use model::{Authority, ClusterName, ServiceRef};
pub use snapshot::{Refusal, Snapshot};
pub use source::{DirSource, Discovery, DiscoveryError, ReloadStatus};
