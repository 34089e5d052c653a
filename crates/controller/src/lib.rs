//! The ServiceMirror controller: watches `ServiceMirror` objects in its own
//! cluster and, through each Link's credentials, the remote Services they name;
//! applies the mirrored Services that `proxy_discovery::reconcile` computes (the
//! same function the lab and the sidecars run) by server-side apply, owned by
//! their ServiceMirror; publishes a status that tells the truth (including how
//! stale a remote is); and publishes what sidecars need in a ConfigMap they
//! mount, so they never watch the API server.
//!
//! # Layout
//!
//! - [`kinds`]: the CRD kinds (derived in proxy-discovery from the model's spec
//!   structs) and conversions between API objects and the model.
//! - [`mirror`]: the reconcile of one ServiceMirror and its status.
//! - [`remote`]: remote API clients from Link Secrets, one watch per needed
//!   remote Service, torn down when unused.
//! - [`publish`]: the sidecars' discovery ConfigMap.
//! - [`lease`]: Lease-based leader election.
//! - [`events`]: Kubernetes Events on ServiceMirrors when their state changes.
//! - [`metrics`]: counters, the staleness gauge and the HTTP endpoint.
//! - [`config`], [`run`]: the command line and the wiring.
//!
//! # Not here
//!
//! The decision of what a mirror yields (proxy-discovery), installing the CRDs
//! and the controller (`isthmus install` renders `proxy_discovery::manifests`,
//! which the `crds` and `rbac` commands print), and the data
//! path.

pub mod config;
pub mod events;
pub mod kinds;
pub mod lease;
pub mod metrics;
pub mod mirror;
pub mod publish;
pub mod remote;
pub mod run;

pub use run::{Config, Running, start};
