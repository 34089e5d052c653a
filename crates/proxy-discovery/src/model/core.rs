//! The Kubernetes built-in kinds the mesh reads: `Service`, `Endpoints`,
//! `EndpointSlice`, `Pod` (its metadata: whether it is meshed) and (for the lab,
//! which builds pods from them) `Deployment`.
//!
//! Only the fields the mesh uses are modelled. Unknown fields are accepted and
//! dropped, as a real cluster's objects carry many (status, managedFields, ...);
//! what is modelled is checked strictly (types, ranges, addresses).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::meta::ObjectMeta;

/// `v1/Service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Name, namespace, labels, annotations, owners.
    pub metadata: ObjectMeta,
    /// The Service's spec.
    #[serde(default)]
    pub spec: ServiceSpec,
}

impl Service {
    /// `apiVersion` of this kind.
    pub const API_VERSION: &'static str = "v1";
    /// `kind` of this kind.
    pub const KIND: &'static str = "Service";

    /// The virtual IPs of the Service: `clusterIPs`, else `clusterIP`; empty for a
    /// headless Service or one not yet allocated.
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .spec
            .cluster_ips
            .iter()
            .filter_map(ClusterIp::addr)
            .collect();
        if let Some(ip) = self.spec.cluster_ip.as_ref().and_then(ClusterIp::addr)
            && !ips.contains(&ip)
        {
            ips.insert(0, ip);
        }
        ips
    }

    /// The port entry whose `port` is `port`.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.spec.ports.iter().find(|p| p.port == port)
    }
}

/// `Service.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP` (the default), `NodePort`, `LoadBalancer` or `ExternalName`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// The primary virtual IP, `None` (headless) or absent (to be allocated).
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<ClusterIp>,
    /// All virtual IPs (dual stack), primary first.
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<ClusterIp>,
    /// The ports the Service exposes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// Label selector of the backing pods; absent for a mirrored Service, whose
    /// backends live in another cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
}

/// A `clusterIP` value: an address, or `None` for a headless Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterIp {
    /// `clusterIP: None`.
    Headless,
    /// An allocated virtual IP.
    Addr(IpAddr),
}

impl ClusterIp {
    /// The address, unless headless.
    pub fn addr(&self) -> Option<IpAddr> {
        match self {
            Self::Headless => None,
            Self::Addr(ip) => Some(*ip),
        }
    }
}

impl Serialize for ClusterIp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Headless => s.serialize_str("None"),
            Self::Addr(ip) => s.collect_str(ip),
        }
    }
}

impl<'de> Deserialize<'de> for ClusterIp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::names::de_str(d, |s| {
            if s == "None" {
                return Ok(Self::Headless);
            }
            s.parse()
                .map(Self::Addr)
                .map_err(|_| format!("{s:?} is neither an IP address nor None"))
        })
    }
}

/// One entry of `Service.spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Required when a Service has more than one port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `TCP` (the default), `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The port clients connect to on the virtual IP.
    #[serde(deserialize_with = "super::names::de_port")]
    pub port: u16,
    /// The port on the pods: a number, or the name of a container port.
    /// Defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetPort>,
    /// Hint of the application protocol (`http`, `kubernetes.io/h2c`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// `TCP` unless another protocol is declared.
    pub fn is_tcp(&self) -> bool {
        self.protocol.as_deref().is_none_or(|p| p == "TCP")
    }
}

/// `targetPort`: Kubernetes' IntOrString.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetPort {
    /// A port number on the pod.
    Number(u16),
    /// The name of a container port.
    Name(String),
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Name(s) => f.write_str(s),
        }
    }
}

impl Serialize for TargetPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Number(n) => s.serialize_u16(*n),
            Self::Name(n) => s.serialize_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for TargetPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use super::names::{PortOrName, PortValue};
        Ok(match d.deserialize_any(PortOrName { allow_name: true })? {
            PortValue::Number(n) => Self::Number(n),
            PortValue::Name(s) => Self::Name(s),
        })
    }
}

/// `v1/Endpoints`: the ready addresses behind a Service, named as the Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// Same name and namespace as the Service it backs.
    pub metadata: ObjectMeta,
    /// Groups of addresses sharing a set of ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<EndpointSubset>,
}

impl Endpoints {
    /// `apiVersion` of this kind.
    pub const API_VERSION: &'static str = "v1";
    /// `kind` of this kind.
    pub const KIND: &'static str = "Endpoints";
}

/// `Endpoints.subsets[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSubset {
    /// Ready addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<EndpointAddress>,
    /// Addresses that are not ready; never routed to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ready_addresses: Vec<EndpointAddress>,
    /// The ports (already resolved to numbers) these addresses serve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
}

/// `Endpoints.subsets[].addresses[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointAddress {
    /// The pod's IP.
    pub ip: IpAddr,
    /// The pod's hostname, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The pod behind the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<ObjectReference>,
}

/// `targetRef` of an endpoint: the object (a Pod) behind an address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectReference {
    /// `Pod` for the endpoints of a Service with a selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The object's namespace; the endpoint's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The object's name.
    #[serde(default)]
    pub name: String,
    /// The object's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl ObjectReference {
    /// A reference to Pod `namespace/name`.
    pub fn pod(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind: Some(Pod::KIND.to_owned()),
            namespace: Some(namespace.into()),
            name: name.into(),
            uid: None,
        }
    }

    /// The Pod this names, as `(namespace, name)`, for an endpoint in namespace
    /// `own_namespace`; `None` when it names another kind.
    pub fn pod_key<'a>(&'a self, own_namespace: &'a str) -> Option<(&'a str, &'a str)> {
        (self.kind.as_deref() == Some(Pod::KIND) && !self.name.is_empty()).then(|| {
            (
                self.namespace.as_deref().unwrap_or(own_namespace),
                self.name.as_str(),
            )
        })
    }
}

/// `Endpoints.subsets[].ports[]` and `EndpointSlice.ports[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPort {
    /// The Service port's name this entry serves (empty/absent for a single port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port number on the pods.
    #[serde(deserialize_with = "super::names::de_port")]
    pub port: u16,
    /// `TCP` unless stated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `discovery.k8s.io/v1/EndpointSlice`. Its Service is named by the
/// `kubernetes.io/service-name` label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// Carries the `kubernetes.io/service-name` label.
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    pub address_type: String,
    /// The endpoints (pods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<SliceEndpoint>,
    /// The ports all endpoints of the slice serve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
}

impl EndpointSlice {
    /// `apiVersion` of this kind.
    pub const API_VERSION: &'static str = "discovery.k8s.io/v1";
    /// `kind` of this kind.
    pub const KIND: &'static str = "EndpointSlice";
    /// The label naming the Service a slice belongs to.
    pub const SERVICE_NAME_LABEL: &'static str = "kubernetes.io/service-name";

    /// The Service this slice backs, from its label.
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(Self::SERVICE_NAME_LABEL)
            .map(String::as_str)
    }
}

/// `EndpointSlice.endpoints[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    /// The pod's addresses (one for IPv4/IPv6 slices).
    pub addresses: Vec<String>,
    /// Readiness; absent means ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<SliceConditions>,
    /// The pod behind the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<ObjectReference>,
}

/// `EndpointSlice.endpoints[].conditions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceConditions {
    /// Whether the endpoint is ready; absent means ready (Kubernetes' rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
}

/// `v1/Pod`, reduced to its metadata: the mesh asks of a pod only whether it is
/// meshed ([`MESHED_POD_LABEL`]). The spec and status are accepted and dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// Name, namespace, labels.
    pub metadata: ObjectMeta,
}

/// The label on a pod that runs a sidecar (value `"true"`, set by `isthmus
/// inject`): its endpoints are reached over the sidecar's mTLS tunnel only.
pub const MESHED_POD_LABEL: &str = "isthmus.io/meshed";

impl Pod {
    /// `apiVersion` of this kind.
    pub const API_VERSION: &'static str = "v1";
    /// `kind` of this kind.
    pub const KIND: &'static str = "Pod";

    /// Whether the pod carries `isthmus.io/meshed: "true"`.
    pub fn is_meshed(&self) -> bool {
        self.metadata.has_label(MESHED_POD_LABEL, "true")
    }
}

/// `apps/v1/Deployment`, as far as the lab needs it to start pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The Deployment's spec.
    pub spec: DeploymentSpec,
}

impl Deployment {
    /// `apiVersion` of this kind.
    pub const API_VERSION: &'static str = "apps/v1";
    /// `kind` of this kind.
    pub const KIND: &'static str = "Deployment";
}

/// `Deployment.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    /// How many pods; Kubernetes' default is 1.
    #[serde(default = "one")]
    pub replicas: u32,
    /// The pod template.
    pub template: PodTemplate,
}

fn one() -> u32 {
    1
}

/// `Deployment.spec.template`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodTemplate {
    /// The pods' labels (matched by Service selectors).
    #[serde(default)]
    pub metadata: TemplateMeta,
    /// The pods' spec.
    pub spec: PodSpec,
}

/// `Deployment.spec.template.metadata`: labels and annotations, no name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    /// Pod labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// `PodSpec`, reduced to its containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// The application containers.
    pub containers: Vec<Container>,
}

/// A container of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// Unique within the pod.
    pub name: String,
    /// The image reference.
    pub image: String,
    /// Declared ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// Entrypoint override.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables (literal values only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

/// `containers[].ports[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// The port the container listens on.
    #[serde(deserialize_with = "super::names::de_port")]
    pub container_port: u16,
    /// Name a Service's `targetPort` may refer to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `TCP` unless stated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `containers[].env[]`. `valueFrom` is not modelled: the lab has no Secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// Variable name.
    pub name: String,
    /// Literal value; absent means empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}
