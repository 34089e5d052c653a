//! The mesh model: the Kubernetes objects the mesh reads, its own kinds, the
//! validated names they are made of, and the manifest parser that turns YAML into
//! them with errors that name file, document, object and field.
//!
//! The model is plain data. It does not decide anything (that is [`crate::reconcile`])
//! and does not know where objects come from (that is [`crate::source`]).

mod cluster;
mod core;
pub mod manifest;
mod mesh;
mod meta;
mod names;
pub mod policy;

pub use self::cluster::{ClusterView, EndpointMesh, ViewError};
pub use self::core::{
    ClusterIp, Container, ContainerPort, Deployment, DeploymentSpec, EndpointAddress, EndpointPort,
    EndpointSlice, EndpointSubset, Endpoints, EnvVar, MESHED_POD_LABEL, ObjectReference, Pod,
    PodSpec, PodTemplate, Service, ServicePort, ServiceSpec, SliceConditions, SliceEndpoint,
    TargetPort, TemplateMeta,
};
pub use self::manifest::{ManifestError, Object, Origin, OtherObject, Parsed, parse_manifests};
pub use self::mesh::{
    ClusterSettings, ClusterSettingsSpec, Condition, ConditionStatus, DEFAULT_DOMAIN,
    DEFAULT_GATEWAY_PORT, DEFAULT_PROBE_PATH, DEFAULT_PROBE_PERIOD, DEFAULT_PROBE_PORT,
    DEFAULT_SERVICE_CIDR, GatewayAddress, GatewaySpec, Link, LinkSpec, MirroredServiceSpec,
    ProbeSpec, ServiceMirror, ServiceMirrorApiStatus, ServiceMirrorSpec, ServiceMirrorStatus,
};
#[cfg(feature = "kube")]
pub use self::mesh::{
    ClusterSettingsResource, LinkResource, LinkResourceSpec, ServiceMirrorResource,
};
pub use self::meta::{DEFAULT_NAMESPACE, ObjectMeta, OwnerReference};
pub use self::names::{
    Cidr, GoDuration, InvalidName, ServiceRef, check_dns_label, check_dns_subdomain,
};

/// Service label that exports a Service to linked clusters (value `"true"`).
pub const EXPORTED_LABEL: &str = "mirror.isthmus.io/exported";
/// Label on every mirrored Service (value `"true"`).
pub const MIRRORED_SERVICE_LABEL: &str = "mirror.isthmus.io/mirrored-service";
/// Label on a mirrored Service naming the cluster it comes from.
pub const REMOTE_CLUSTER_LABEL: &str = "mirror.isthmus.io/remote-cluster";
/// Annotation on a mirrored Service: `<name>.<namespace>` of the remote Service.
pub const REMOTE_SERVICE_ANNOTATION: &str = "mirror.isthmus.io/remote-service";
/// Annotation on a mirrored Service: the remote cluster's DNS domain, so the remote
/// authority is `<name>.<namespace>.svc.<domain>:<port>`.
pub const REMOTE_DOMAIN_ANNOTATION: &str = "mirror.isthmus.io/remote-cluster-domain";
