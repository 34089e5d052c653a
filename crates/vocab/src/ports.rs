//! The mesh's default ports and the proxy's UID, shared by the proxy's flags, the
//! capture rules and the manifests that `isthmus` renders. Each stays overridable
//! where it is used; these are only the defaults every part must agree on.

/// The sidecar's outbound listener: where the capture redirects the pod's outgoing
/// connections.
pub const DEFAULT_OUTBOUND_PORT: u16 = 4140;

/// The inbound listener of a sidecar and the tunnel listener of a gateway: mTLS
/// HTTP/2 from other proxies, and the pod's captured incoming connections.
pub const DEFAULT_INBOUND_PORT: u16 = 4143;

/// The admin server (`/metrics`, `/ready`, `/live`, `/config`); the capture leaves
/// it alone so that probes and scrapers reach it directly.
pub const DEFAULT_ADMIN_PORT: u16 = 4191;

/// The UID the sidecar runs as: the capture exempts its own connections by this
/// owner, or every connection it opens would be captured again.
pub const PROXY_UID: u32 = 2102;
