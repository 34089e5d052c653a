//! Service discovery for the mesh: the model, the ServiceMirror reconcile, the
//! sources that feed them, and the route index the hot path reads.
//!
//! # Layout
//!
//! - [`model`]: the Kubernetes objects the mesh reads (`Service`, `Endpoints`,
//!   `EndpointSlice`, `Pod` metadata, `Deployment`) and its own kinds (the seed's `ServiceMirror`,
//!   accepted verbatim; `Link`; `ClusterSettings`), validated names of its own
//!   (`ServiceRef`, `Cidr`; cluster names, authorities and SPIFFE IDs are the
//!   `isthmus_vocab` types the tunnel speaks), the YAML manifest parser whose
//!   errors name file, document, object and field, and [`model::ClusterView`] (one
//!   cluster's objects, grouped and checked for duplicates).
//! - [`reconcile`]: a ServiceMirror plus the remote view gives the mirrored local
//!   Service and the mirror's `Ready` condition; a pure function, plus
//!   [`reconcile::reconcile_all`] which also deletes what removed mirrors made.
//! - [`index`]: original destination `IP:port` or authority -> [`Route`].
//! - [`snapshot`]: one immutable, consistent state (reconciled objects, remote views,
//!   index) and the questions roles ask of it: [`Snapshot::lookup_addr`],
//!   [`Snapshot::lookup_authority`], [`Snapshot::link`], [`Snapshot::settings`],
//!   [`Snapshot::exported_target`], [`Snapshot::exported_endpoints`] (which
//!   endpoints are meshed pods: a `targetRef` joined to a Pod labelled
//!   `isthmus.io/meshed: "true"`).
//! - [`source`]: the [`Discovery`] handle (an `ArcSwap<Snapshot>` plus reload
//!   status) and [`source::dir`], the hot-reloaded manifest directory. A Kubernetes
//!   API source (`source::kube`) will publish through the same handle.
//!
//! # Differences from the first design notes
//!
//! - [`Snapshot`] lives in its own module, `snapshot`, as both sources build it.
//! - [`Route::Remote`] also names the local mirrored `service` (for logs and
//!   metrics), and its `gateway` is an `Option`: a cluster whose ClusterSettings
//!   names no gateway cannot tunnel, and the proxy must refuse such a route.
//! - A cluster is "known" to a ServiceMirror when a `Link` names it; what is known
//!   of it comes from `clusters/<name>/` in the directory source.
//!
//! # Not here
//!
//! Sockets, TLS, probing links and the data path (proxy-core, proxy-identity, the
//! proxy binary), and any other `proxy-*` crate: the proxy adapts these types to
//! its own. Local Services without a ClusterIP get none allocated: only mirrored
//! Services get addresses, since nothing here implements kube-proxy.

pub mod index;
pub mod model;
pub mod reconcile;
pub mod snapshot;
pub mod source;

pub use index::{GatewayRef, Index, Route};
pub use model::ServiceRef;
pub use snapshot::{ExportRefusal, ExportedEndpoint, Snapshot};
pub use source::{DirSource, Discovery, DiscoveryError, ReloadStatus};
