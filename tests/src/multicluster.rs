//! The multi-cluster manifests the gateway tests write into a proxy's manifests
//! directory: a cluster's settings naming its gateway, a Link to a peer cluster's
//! gateway, and a Service with its Endpoints, exported or not.
//!
//! Gateways here are identified as `gateway-<cluster>` service accounts in
//! [`NAMESPACE`] under the `cluster.local` trust domain. This module writes text
//! only; it does not start proxies nor mint certificates (see
//! [`crate::identity::Pki`]).

use std::net::SocketAddr;

use isthmus_vocab::SpiffeId;

/// The namespace of the gateways and of the multi-cluster resources.
pub const NAMESPACE: &str = "isthmus-multicluster";

/// The seed's ServiceMirror: hello of cluster-a, mirrored where it is applied.
pub const MIRROR: &str = include_str!("../../examples/seed/cluster-b/cluster-b-servicemirror.yaml");

/// The SPIFFE ID of `cluster`'s gateway.
///
/// # Panics
///
/// When `cluster` cannot be part of a SPIFFE ID path (a test's own mistake).
pub fn gateway_id(cluster: &str) -> SpiffeId {
    let id = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/gateway-{cluster}");
    SpiffeId::parse(&id)
        .unwrap_or_else(|e| panic!("cluster {cluster:?} gives no SPIFFE ID {id}: {e}"))
}

/// `ClusterSettings` for `cluster`, whose gateway listens at `gateway`.
pub fn cluster_settings(cluster: &str, gateway: SocketAddr) -> String {
    settings_in(
        NAMESPACE,
        cluster,
        gateway,
        &gateway_id(cluster).to_string(),
    )
}

/// `ClusterSettings` for `cluster` in `namespace`, whose gateway listens at
/// `gateway` and holds the SPIFFE ID `identity`.
pub fn settings_in(namespace: &str, cluster: &str, gateway: SocketAddr, identity: &str) -> String {
    let ip = gateway.ip().to_string();
    settings_at(namespace, cluster, &ip, gateway.port(), identity)
}

/// [`settings_in`] with the gateway's address as written: an IP or a DNS name.
pub fn settings_at(
    namespace: &str,
    cluster: &str,
    host: &str,
    port: u16,
    identity: &str,
) -> String {
    format!(
        "apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata:
  name: {cluster}
  namespace: {namespace}
spec:
  clusterName: {cluster}
  trustDomain: cluster.local
  gateway:
    address: '{host}'
    port: {port}
    identity: {identity}
"
    )
}

/// A Link to `target`'s gateway at `gateway`, probed every second on `/ready` of
/// its admin server at `admin`.
pub fn link(target: &str, gateway: SocketAddr, admin: SocketAddr) -> String {
    link_in(
        NAMESPACE,
        target,
        gateway,
        &gateway_id(target).to_string(),
        admin,
    )
}

/// [`link`] in `namespace`, to a gateway holding the SPIFFE ID `identity`.
pub fn link_in(
    namespace: &str,
    target: &str,
    gateway: SocketAddr,
    identity: &str,
    admin: SocketAddr,
) -> String {
    let ip = gateway.ip().to_string();
    link_at(
        namespace,
        target,
        &ip,
        gateway.port(),
        identity,
        admin.port(),
    )
}

/// [`link_in`] with the gateway's address as written (an IP or a DNS name) and
/// the port its admin server answers probes on.
pub fn link_at(
    namespace: &str,
    target: &str,
    host: &str,
    port: u16,
    identity: &str,
    probe: u16,
) -> String {
    format!(
        "apiVersion: multicluster.isthmus.io/v1alpha1
kind: Link
metadata:
  name: {target}
  namespace: {namespace}
spec:
  targetClusterName: {target}
  gatewayAddress: '{host}'
  gatewayPort: {port}
  gatewayIdentity: {identity}
  probeSpec:
    path: /ready
    port: {probe}
    period: 1s
"
    )
}

/// A Service `name` in `default` on port 80 with its Endpoints at `backend`;
/// labelled `mirror.isthmus.io/exported: "true"` when `exported`.
pub fn service(name: &str, backend: SocketAddr, exported: bool) -> String {
    service_with(name, backend, exported, "")
}

/// [`service`] whose one endpoint is a meshed pod, `<name>-0`: the endpoint names it
/// by `targetRef` and the Pod carries the `isthmus.io/meshed` label, as discovery
/// requires before a gateway reaches an endpoint through its sidecar.
pub fn meshed_service(name: &str, backend: SocketAddr, exported: bool) -> String {
    let target_ref = format!("\n    targetRef: {{kind: Pod, namespace: default, name: {name}-0}}");
    format!(
        "{}---
apiVersion: v1
kind: Pod
metadata:
  name: {name}-0
  namespace: default
  labels:
    isthmus.io/meshed: \"true\"
",
        service_with(name, backend, exported, &target_ref)
    )
}

fn service_with(name: &str, backend: SocketAddr, exported: bool, target_ref: &str) -> String {
    let labels = if exported {
        "\n  labels:\n    mirror.isthmus.io/exported: \"true\""
    } else {
        ""
    };
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default{labels}
spec:
  ports:
  - port: 80
    protocol: TCP
    targetPort: {port}
---
apiVersion: v1
kind: Endpoints
metadata:
  name: {name}
  namespace: default
subsets:
- addresses:
  - ip: '{ip}'{target_ref}
  ports:
  - port: {port}
    protocol: TCP
",
        ip = backend.ip(),
        port = backend.port(),
    )
}
