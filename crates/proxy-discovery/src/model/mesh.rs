//! The mesh's own kinds: the seed's `ServiceMirror` (accepted verbatim, as linkerd
//! writes it), the `Link` to a peer cluster and the cluster's `ClusterSettings`.
//!
//! Their `spec`s reject unknown fields: a typo in a mesh setting must be an error,
//! not a silently ignored line.
//!
//! With the `kube` feature the same spec structs also derive `CustomResource` and
//! `JsonSchema`, giving the API-server kinds [`ServiceMirrorResource`],
//! [`LinkResource`] and [`ClusterSettingsResource`] (k8s-openapi `ObjectMeta`,
//! status subresource) from the one definition the manifests use; the CRDs are
//! generated from them. Validated newtypes appear in the schema as strings.

use std::net::IpAddr;
use std::time::Duration;

use isthmus_vocab::{ClusterName, SpiffeId};
use serde::{Deserialize, Serialize};

use super::meta::ObjectMeta;
use super::names::{Cidr, GoDuration, de_port};

/// The tunnel / gateway port: the mesh's default inbound port.
pub const DEFAULT_GATEWAY_PORT: u16 = isthmus_vocab::ports::DEFAULT_INBOUND_PORT;
/// The admin port that serves `/ready`: the mesh's default admin port.
pub const DEFAULT_PROBE_PORT: u16 = isthmus_vocab::ports::DEFAULT_ADMIN_PORT;
/// The probe path on the admin port.
pub const DEFAULT_PROBE_PATH: &str = "/ready";
/// How often a link is probed when the Link does not say.
pub const DEFAULT_PROBE_PERIOD: Duration = Duration::from_secs(3);
/// Kubernetes' default trust and DNS domain.
pub const DEFAULT_DOMAIN: &str = "cluster.local";
/// The service range when ClusterSettings does not name one (kubeadm's default).
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";

/// `linkerd.io/v1alpha1/ServiceMirror`: "make `spec.service` of `spec.cluster`
/// appear in my namespace".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMirror {
    /// The mirror's name and namespace; the mirrored Service lands in this namespace.
    pub metadata: ObjectMeta,
    /// What to mirror.
    pub spec: ServiceMirrorSpec,
    /// Written by the reconcile; ignored on input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceMirrorStatus>,
}

impl ServiceMirror {
    /// `apiVersion` of this kind, as in the seed.
    pub const API_VERSION: &'static str = "linkerd.io/v1alpha1";
    /// `kind` of this kind.
    pub const KIND: &'static str = "ServiceMirror";

    /// The remote Service's namespace: `spec.service.namespace`, or the mirror's own.
    pub fn remote_namespace(&self) -> &str {
        self.spec
            .service
            .namespace
            .as_deref()
            .unwrap_or_else(|| self.metadata.namespace())
    }
}

/// `ServiceMirror.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "linkerd.io",
        version = "v1alpha1",
        kind = "ServiceMirror",
        root = "ServiceMirrorResource",
        namespaced,
        status = "ServiceMirrorApiStatus",
        derive = "PartialEq",
        printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster"}"#,
        printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service.name"}"#,
        printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Mirrored\")].reason"}"#
    )
)]
pub struct ServiceMirrorSpec {
    /// The cluster the Service lives in; a `Link` must name it.
    #[cfg_attr(feature = "kube", schemars(with = "String", length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN)))]
    pub cluster: ClusterName,
    /// The remote Service.
    pub service: MirroredServiceSpec,
}

/// `ServiceMirror.spec.service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct MirroredServiceSpec {
    /// The remote Service's name.
    pub name: String,
    /// The remote Service's namespace; absent means the ServiceMirror's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `ServiceMirror.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceMirrorStatus {
    /// Kubernetes-style conditions; see [`Condition`].
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The status a controller publishes on a `ServiceMirror` in the API server: the
/// reconcile's conditions plus what only a live controller knows (the generation
/// it acted on, the remote Service's resourceVersion, when the remote cluster was
/// last reached).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct ServiceMirrorApiStatus {
    /// Kubernetes-style conditions (type `Mirrored`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` of the ServiceMirror this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `metadata.resourceVersion` of the remote Service last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_resource_version: Option<String>,
    /// RFC 3339 time the remote cluster's API last answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_remote_contact: Option<String>,
}

/// A Kubernetes status condition (`metav1.Condition`). `lastTransitionTime` is left
/// to whoever publishes the status: the reconcile is a pure function of its inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct Condition {
    /// The aspect this condition reports, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// CamelCase machine-readable cause.
    pub reason: String,
    /// Human-readable detail that says what and where.
    pub message: String,
    /// RFC 3339 time the status last changed, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// `Condition.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

/// `multicluster.isthmus.io/v1alpha1/Link`: a peer cluster and how to reach its
/// gateway, after linkerd's `Link` (`targetClusterName`, `gatewayAddress`,
/// `gatewayPort`, `gatewayIdentity`, `probeSpec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The Link's name and namespace (conventionally the target cluster's name).
    pub metadata: ObjectMeta,
    /// The peer cluster.
    pub spec: LinkSpec,
}

impl Link {
    /// `apiVersion` of this kind.
    pub const API_VERSION: &'static str = "multicluster.isthmus.io/v1alpha1";
    /// `kind` of this kind.
    pub const KIND: &'static str = "Link";
    /// The key of the credentials Secret that holds the peer's kubeconfig.
    pub const CREDENTIALS_KEY: &'static str = "kubeconfig";
}

/// `Link.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct LinkSpec {
    /// The peer cluster's name, as ServiceMirrors' `spec.cluster` refer to it.
    #[cfg_attr(feature = "kube", schemars(with = "String", length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN)))]
    pub target_cluster_name: ClusterName,
    /// The peer gateway's IP address or DNS name.
    #[cfg_attr(feature = "kube", schemars(with = "String"))]
    pub gateway_address: GatewayAddress,
    /// The peer gateway's tunnel port (a number or numeric string).
    #[serde(default = "default_gateway_port", deserialize_with = "de_port")]
    pub gateway_port: u16,
    /// The SPIFFE ID the peer gateway must present.
    #[cfg_attr(feature = "kube", schemars(with = "String"))]
    pub gateway_identity: SpiffeId,
    /// How to tell whether the peer gateway is up.
    #[serde(default)]
    pub probe_spec: ProbeSpec,
}

/// `Link.spec` as the API server holds it: the [`LinkSpec`] every reader shares,
/// plus the credentials only a controller reads. Manifests for sidecars and the
/// lab carry no credentials and keep using [`LinkSpec`], which rejects them.
#[cfg(feature = "kube")]
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, kube::CustomResource, schemars::JsonSchema,
)]
#[kube(
    group = "multicluster.isthmus.io",
    version = "v1alpha1",
    kind = "Link",
    root = "LinkResource",
    namespaced,
    derive = "PartialEq",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetClusterName"}"#,
    printcolumn = r#"{"name":"Gateway","type":"string","jsonPath":".spec.gatewayAddress"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LinkResourceSpec {
    /// The peer cluster and its gateway.
    #[serde(flatten)]
    pub link: LinkSpec,
    /// The Secret, in the Link's namespace, whose key [`Link::CREDENTIALS_KEY`]
    /// holds a kubeconfig for the peer cluster's API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// `Link.spec.probeSpec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct ProbeSpec {
    /// HTTP path of the readiness probe.
    #[serde(default = "default_probe_path")]
    pub path: String,
    /// Port of the readiness probe.
    #[serde(default = "default_probe_port", deserialize_with = "de_port")]
    pub port: u16,
    /// How often to probe.
    #[serde(default = "default_probe_period")]
    #[cfg_attr(feature = "kube", schemars(with = "String"))]
    pub period: GoDuration,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            path: default_probe_path(),
            port: DEFAULT_PROBE_PORT,
            period: default_probe_period(),
        }
    }
}

/// A gateway's address: an IP address or a DNS name (validated as one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub struct GatewayAddress(String);

impl<'de> Deserialize<'de> for GatewayAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::names::de_str(d, Self::parse)
    }
}

impl GatewayAddress {
    /// Validates an IP address or a DNS name (case folded).
    pub fn parse(s: &str) -> Result<Self, super::names::InvalidName> {
        if s.parse::<IpAddr>().is_ok() {
            return Ok(Self(s.to_owned()));
        }
        let host = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        super::names::check_dns_subdomain("gateway address (IP or DNS name)", &host)?;
        Ok(Self(host))
    }

    /// The address as written (DNS names lowercased).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The address, if it is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.0.parse().ok()
    }
}

impl From<GatewayAddress> for String {
    fn from(a: GatewayAddress) -> String {
        a.0
    }
}

impl std::fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `multicluster.isthmus.io/v1alpha1/ClusterSettings`: one per cluster, naming it
/// and saying what it exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// The object's name (any; there is one per cluster).
    pub metadata: ObjectMeta,
    /// The settings.
    pub spec: ClusterSettingsSpec,
}

impl ClusterSettings {
    /// `apiVersion` of this kind.
    pub const API_VERSION: &'static str = "multicluster.isthmus.io/v1alpha1";
    /// `kind` of this kind.
    pub const KIND: &'static str = "ClusterSettings";

    /// The settings a cluster has when its manifests hold no ClusterSettings.
    pub fn defaults(cluster: ClusterName) -> Self {
        Self {
            metadata: ObjectMeta::named("isthmus", "cluster"),
            spec: ClusterSettingsSpec {
                cluster_name: cluster,
                trust_domain: default_domain(),
                cluster_domain: default_domain(),
                service_cidr: default_service_cidr(),
                exported_namespaces: Vec::new(),
                gateway: None,
            },
        }
    }
}

/// `ClusterSettings.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "multicluster.isthmus.io",
        version = "v1alpha1",
        kind = "ClusterSettings",
        root = "ClusterSettingsResource",
        plural = "clustersettings",
        namespaced,
        derive = "PartialEq",
        printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.clusterName"}"#
    )
)]
pub struct ClusterSettingsSpec {
    /// This cluster's name in the mesh.
    #[cfg_attr(feature = "kube", schemars(with = "String", length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN)))]
    pub cluster_name: ClusterName,
    /// The SPIFFE trust domain of this cluster's workloads.
    #[serde(default = "default_domain")]
    pub trust_domain: String,
    /// The DNS suffix of Services (`svc.<clusterDomain>`).
    #[serde(default = "default_domain")]
    pub cluster_domain: String,
    /// Ignored where an API server runs: it allocates every ClusterIP, mirrored
    /// Services' too, from its own range. Only a directory of manifests without
    /// an API server allocates mirrored Services' addresses from this one.
    #[serde(default = "default_service_cidr", rename = "serviceCIDR")]
    #[cfg_attr(feature = "kube", schemars(with = "String"))]
    pub service_cidr: Cidr,
    /// Namespaces whose every Service is exported to linked clusters.
    #[serde(default)]
    pub exported_namespaces: Vec<String>,
    /// This cluster's own gateway, which sidecars send remote traffic through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,
}

/// `ClusterSettings.spec.gateway`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct GatewaySpec {
    /// The gateway's IP address or DNS name.
    #[cfg_attr(feature = "kube", schemars(with = "String"))]
    pub address: GatewayAddress,
    /// The gateway's tunnel port.
    #[serde(default = "default_gateway_port", deserialize_with = "de_port")]
    pub port: u16,
    /// The SPIFFE ID the gateway presents.
    #[cfg_attr(feature = "kube", schemars(with = "String"))]
    pub identity: SpiffeId,
}

/// A DNS-1123 label (with its 63-byte bound beside it in the schema), as
/// [`ClusterName`] accepts: the CRD schema rejects what the model would, so the
/// API server refuses such an object at admission.
#[cfg(feature = "kube")]
const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

fn default_gateway_port() -> u16 {
    DEFAULT_GATEWAY_PORT
}
fn default_probe_port() -> u16 {
    DEFAULT_PROBE_PORT
}
fn default_probe_path() -> String {
    DEFAULT_PROBE_PATH.to_owned()
}
fn default_probe_period() -> GoDuration {
    GoDuration(DEFAULT_PROBE_PERIOD)
}
fn default_domain() -> String {
    DEFAULT_DOMAIN.to_owned()
}
fn default_service_cidr() -> Cidr {
    Cidr::parse(DEFAULT_SERVICE_CIDR).expect("the default service CIDR is a valid constant")
}
