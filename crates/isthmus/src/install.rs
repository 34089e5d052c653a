//! The names and paths the installed mesh and injected pods agree on.
//!
//! `isthmus install` (rendering these objects) lands here next; `isthmus inject`
//! already refers to the names the install uses.

/// The cert-manager ClusterIssuer of every mesh identity of this cluster.
pub const CLUSTER_ISSUER: &str = "isthmus-issuer";
/// The ConfigMap the controller publishes for sidecars and gateways (their
/// `--manifests` directory).
pub const DISCOVERY_CONFIGMAP: &str = "isthmus-discovery";
/// Where proxies find their identity files.
pub const IDENTITY_MOUNT: &str = "/var/run/isthmus/identity";
/// Where proxies find the discovery manifests.
pub const DISCOVERY_MOUNT: &str = "/var/run/isthmus/discovery";
/// Name of the tunnel port on containers and Services.
pub const TUNNEL_PORT_NAME: &str = "isthmus-tunnel";
/// Name of the admin (probe, metrics) port.
pub const ADMIN_PORT_NAME: &str = "isthmus-admin";
/// Kubernetes' default trust and DNS domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The image the manifests run, `ghcr.io/isthmus/isthmus:<this version>`.
pub fn default_image() -> String {
    format!("ghcr.io/isthmus/isthmus:{}", env!("CARGO_PKG_VERSION"))
}
