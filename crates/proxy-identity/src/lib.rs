//! Workload identities of the mesh: certificates for SPIFFE IDs and the rustls
//! configurations that authenticate peers by them. The IDs themselves, trust domains
//! and cluster names are the mesh's vocabulary (`isthmus_vocab`).
//!
//! # Layout
//!
//! - [`mint`]: trust anchors, issuers (one per cluster) and leaves with rcgen, in memory
//!   or written as PEM directories; for tooling, tests and the lab, never the data path.
//! - [`creds`]: loading the directory a pod gets mounted (`tls.crt`, `tls.key`,
//!   `ca.crt`) into validated [`Credentials`], and the [`CredentialStore`] that rotates
//!   them without dropping live connections and refuses bad updates.
//! - [`cluster`]: which cluster a leaf belongs to: the one its verified issuer names,
//!   never what the peer's chain order suggests.
//! - [`verify`]: [`PeerPolicy`] and the rustls certificate verifiers that check the chain
//!   against the store's current anchors and the peer's SPIFFE ID against the policy.
//! - [`tls`]: the rustls server and client configurations (TLS 1.3 only, ALPN `h2`).
//! - [`metrics`]: prometheus-client metrics of rotation and handshake failures.
//!
//! This crate owns no sockets and no flags: callers hand it paths and take configs.
//! It does not fetch certificates from a CA (no SPIFFE Workload API, no CSR flow):
//! whatever writes the mounted directory (cert-manager's CSI driver, a SPIFFE helper,
//! `isthmus identity leaf`) is the source of truth.

pub mod cluster;
pub mod creds;
pub mod metrics;
pub mod mint;
mod rfc3339;
pub mod tls;
pub mod verify;

pub use creds::{CredentialPaths, CredentialStore, Credentials, CredsError, IdentityStatus};
pub use metrics::IdentityMetrics;
/// Renders a time as RFC 3339 UTC (`2025-01-31T12:00:00Z`), as errors and `/config` do.
pub use rfc3339::format as format_rfc3339;
pub use tls::{
    anchors_client_config, client_config, connection_deadline, crypto_provider, mesh_server_config,
    not_after, peer_cluster, peer_identity, server_config, sni_name,
};
pub use verify::{HandshakeFailure, PeerPolicy, VerifyError};

/// The rustls this crate builds its configs with, so that callers name the very same
/// types (`ServerConfig`, `ServerName`, ...) without pinning a version of their own.
pub use rustls;
