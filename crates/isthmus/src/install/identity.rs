//! The identity part of `isthmus install`: how every mesh certificate of a cluster
//! is issued on a real cluster, through cert-manager and its csi-driver-spiffe.
//!
//! The chain of trust: a pod's ServiceAccount token, which the kubelet hands to
//! the driver for that pod only, is the proof of who asks. The driver turns it into
//! a CertificateRequest for exactly `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`,
//! created as that ServiceAccount; the driver's approver approves a request only
//! when its one URI is the SPIFFE ID of the ServiceAccount that created it; the CA
//! `ClusterIssuer` rendered here signs approved requests with the cluster's issuer
//! key. The gateway gets its identity the same way, so the gateway's SPIFFE ID is
//! held only by pods running as the gateway's ServiceAccount: there is no
//! `Certificate` (and no Secret holding the gateway's key) that anyone able to
//! create Certificates, or to read Secrets, could copy.
//!
//! That holds only while nothing else approves requests for this issuer:
//! cert-manager runs with its default approver off
//! (`--controllers=*,-certificaterequests-approver`), and no approver-policy
//! `CertificateRequestPolicy` selects it. `isthmus check` verifies both.
//!
//! Rendered here: the `ClusterIssuer`; the `ClusterRole` that lets a
//! ServiceAccount create CertificateRequests (the driver creates them with the
//! pod's own token), bound for the gateway's ServiceAccount; with `--issuer` the
//! issuer's Secret and the trust anchors as a ConfigMap the driver mounts (its
//! `ca.crt`). Not here: cert-manager and csi-driver-spiffe themselves, whose charts
//! install them and their approver's RBAC ([`prerequisites`] says how).

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{CSIVolumeSource, ConfigMap, Secret, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding, RoleRef, Subject};
use serde_json::json;

use super::{GATEWAY, InstallOptions, NAMESPACE, meta, rule, to_json};

/// The CSI driver of cert-manager's csi-driver-spiffe: a volume of it holds the
/// pod's own SPIFFE certificate (`tls.crt`), key (`tls.key`) and trust anchors
/// (`ca.crt`, when the driver is given a CA bundle).
pub const SPIFFE_CSI_DRIVER: &str = "spiffe.csi.cert-manager.io";
/// The driver's volume attribute naming the group its files belong to.
pub const SPIFFE_FS_GROUP_ATTRIBUTE: &str = "spiffe.csi.cert-manager.io/fs-group";
/// The driver's approver Deployment (in cert-manager's namespace), as its chart
/// names it.
pub const CSI_DRIVER_APPROVER: &str = "cert-manager-csi-driver-spiffe-approver";
/// cert-manager's controller Deployment, as its chart names it.
pub const CERT_MANAGER_DEPLOYMENT: &str = "cert-manager";
/// The cert-manager ClusterIssuer of every mesh identity of this cluster; the
/// driver is installed with `app.issuer.name` set to it.
pub const CLUSTER_ISSUER: &str = "isthmus-issuer";
/// The Secret (in cert-manager's namespace) holding the issuer certificate and key.
pub const ISSUER_SECRET: &str = "isthmus-issuer";
/// The ConfigMap (in cert-manager's namespace) holding the trust anchors, which the
/// driver mounts and writes into each volume as `ca.crt`. Not the issuer's Secret:
/// the driver runs on every node, and the issuer's key must not.
pub const TRUST_ANCHORS_CONFIGMAP: &str = "isthmus-trust-anchors";
/// Its key.
pub const TRUST_ANCHORS_KEY: &str = "ca.crt";
/// The ClusterRole allowing a ServiceAccount to create CertificateRequests in the
/// namespace it is bound in.
pub const IDENTITY_REQUESTER: &str = "isthmus-identity-requester";
/// cert-manager's own namespace, where a ClusterIssuer finds its Secret.
pub const DEFAULT_CERT_MANAGER_NAMESPACE: &str = "cert-manager";
/// Where the driver finds the trust anchors ConfigMap, mounted into its pods.
const DRIVER_ANCHORS_DIR: &str = "/var/run/isthmus/trust-anchors";

/// The identity volume of a mesh pod (sidecar or gateway): the pod's own
/// ServiceAccount's SPIFFE certificate from csi-driver-spiffe, its files in
/// `fs_group` (the proxy's group) and readable by that group only.
pub fn identity_volume(name: &str, fs_group: u32) -> Volume {
    Volume {
        name: name.to_owned(),
        csi: Some(CSIVolumeSource {
            driver: SPIFFE_CSI_DRIVER.to_owned(),
            read_only: Some(true),
            volume_attributes: Some(
                [(SPIFFE_FS_GROUP_ATTRIBUTE.to_owned(), fs_group.to_string())]
                    .into_iter()
                    .collect(),
            ),
            ..CSIVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The comment block heading the output: how cert-manager and csi-driver-spiffe
/// must be installed for the identities below to be issued, and only to their
/// holders.
pub fn prerequisites(options: &InstallOptions) -> String {
    let ns = &options.cert_manager_namespace;
    format!(
        "# Identity needs, in namespace {ns}:\n\
         # - cert-manager with its default approver off, so only csi-driver-spiffe's\n\
         #   approver signs for {CLUSTER_ISSUER}: helm --set disableAutoApproval=true, or\n\
         #   --set 'extraArgs={{--controllers=*\\,-certificaterequests-approver}}'\n\
         # - csi-driver-spiffe with --set app.trustDomain={td} \\\n\
         #   --set app.issuer.name={CLUSTER_ISSUER} --set app.issuer.kind=ClusterIssuer \\\n\
         #   --set app.issuer.group=cert-manager.io \\\n\
         #   --set app.approver.signerName=clusterissuers.cert-manager.io/{CLUSTER_ISSUER} \\\n\
         #   --set app.driver.sourceCABundle={DRIVER_ANCHORS_DIR}/{TRUST_ANCHORS_KEY} \\\n\
         #   --set 'app.driver.volumes[0].name=anchors' \\\n\
         #   --set 'app.driver.volumes[0].configMap.name={TRUST_ANCHORS_CONFIGMAP}' \\\n\
         #   --set 'app.driver.volumeMounts[0].name=anchors' \\\n\
         #   --set 'app.driver.volumeMounts[0].mountPath={DRIVER_ANCHORS_DIR}'\n\
         # isthmus check verifies the approvers.\n",
        td = options.trust_domain,
    )
}

/// The cert-manager objects and the requester RBAC, in apply order.
pub fn objects(options: &InstallOptions) -> Vec<serde_json::Value> {
    let mut objects = Vec::new();
    if let Some(issuer) = &options.issuer {
        let data = [
            ("tls.crt", &issuer.cert_chain),
            ("tls.key", &issuer.key),
            ("ca.crt", &issuer.anchors),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect();
        objects.push(to_json(&Secret {
            metadata: meta(ISSUER_SECRET, Some(&options.cert_manager_namespace)),
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(data),
            ..Secret::default()
        }));
        objects.push(to_json(&ConfigMap {
            metadata: meta(
                TRUST_ANCHORS_CONFIGMAP,
                Some(&options.cert_manager_namespace),
            ),
            data: Some(
                [(TRUST_ANCHORS_KEY.to_owned(), issuer.anchors.clone())]
                    .into_iter()
                    .collect(),
            ),
            ..ConfigMap::default()
        }));
    }
    objects.push(json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "ClusterIssuer",
        "metadata": meta(CLUSTER_ISSUER, None),
        "spec": { "ca": { "secretName": ISSUER_SECRET } },
    }));
    objects.push(to_json(&ClusterRole {
        metadata: meta(IDENTITY_REQUESTER, None),
        rules: Some(vec![rule(
            &["cert-manager.io"],
            &["certificaterequests"],
            &["create"],
        )]),
        ..ClusterRole::default()
    }));
    objects.push(to_json(&requester_binding(GATEWAY, NAMESPACE)));
    objects
}

/// Lets `service_account` of `namespace` create CertificateRequests there, which
/// csi-driver-spiffe does with the pod's own token.
pub fn requester_binding(service_account: &str, namespace: &str) -> RoleBinding {
    RoleBinding {
        metadata: meta(IDENTITY_REQUESTER, Some(namespace)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: IDENTITY_REQUESTER.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: service_account.to_owned(),
            namespace: Some(namespace.to_owned()),
            ..Subject::default()
        }]),
    }
}
