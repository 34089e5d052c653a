//! `isthmus install --cluster NAME`: the control plane and gateway of one cluster as
//! plain manifests, printed for `kubectl apply -f -` (as `linkerd install` does).
//!
//! The output is multi-document YAML in a fixed order (a namespace before what lives
//! in it, CRDs before objects of their kinds), the same bytes for the same flags, so
//! the rendered examples in `deploy/` can be checked for drift:
//!
//! 1. the namespace `isthmus-system`;
//! 2. the CRDs and the controller's RBAC, as the `isthmus-controller` crate defines
//!    them;
//! 3. the gateway's ServiceAccount and read-only ClusterRole (what it routes by,
//!    and pod metadata: whether an endpoint is meshed);
//! 4. the link reader: a ServiceAccount `isthmus-link-reader` that may only get, list
//!    and watch Services and EndpointSlices and list ClusterSettings (which
//!    namespaces the cluster exports), and its token Secret, which `isthmus link`
//!    turns into the kubeconfig another cluster uses;
//! 5. identity through cert-manager and its csi-driver-spiffe ([`identity`]): the
//!    CA `ClusterIssuer` the driver requests every workload's and the gateway's
//!    certificate from, the right to request one for the gateway's own
//!    ServiceAccount, and with `--issuer DIR` the issuer's Secret and the trust
//!    anchors the driver writes into each volume as `ca.crt`;
//! 6. this cluster's `ClusterSettings`;
//! 7. the controller Deployment (two replicas, one leader by Lease);
//! 8. the gateway Deployment (its identity a csi-driver-spiffe volume, so only a
//!    pod running as its ServiceAccount holds it) and its LoadBalancer Service
//!    exposing the tunnel port 4143 only: probes and scrapers reach the admin port
//!    on the pod's own address;
//! 9. a PodDisruptionBudget for each Deployment, so a node drain never takes every
//!    gateway (or controller) replica at once.
//!
//! Not here: the objects' kinds and RBAC of the controller (the controller crate
//! owns them), installing cert-manager or csi-driver-spiffe (their charts do; the
//! output's header says how they must be configured), and applying anything: this
//! module only renders.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use isthmus_vocab::ports::{DEFAULT_ADMIN_PORT, DEFAULT_INBOUND_PORT, PROXY_UID};
use isthmus_vocab::{ClusterName, SpiffeId};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, EnvVar, HTTPGetAction, Namespace, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, Secret, Service,
    ServiceAccount, ServicePort, ServiceSpec, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proxy_discovery::kubectl_yaml;
use proxy_discovery::model::{
    ClusterSettings, ClusterSettingsSpec, GatewayAddress, GatewaySpec, Object,
};

mod identity;

/// The control plane's namespace.
pub const NAMESPACE: &str = "isthmus-system";
/// Name of the gateway's Deployment, Service, ServiceAccount and ClusterRole.
pub const GATEWAY: &str = "isthmus-gateway";
/// Name of the controller's Deployment.
pub const CONTROLLER: &str = "isthmus-controller";
/// The read-only ServiceAccount that linked clusters use.
pub const LINK_READER: &str = "isthmus-link-reader";
/// Its long-lived token Secret.
pub const LINK_READER_TOKEN: &str = "isthmus-link-reader-token";
pub use identity::{
    CERT_MANAGER_DEPLOYMENT, CLUSTER_ISSUER, CSI_DRIVER_APPROVER, DEFAULT_CERT_MANAGER_NAMESPACE,
    ISSUER_SECRET, SPIFFE_CSI_DRIVER, identity_volume,
};
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
/// Label every installed object carries.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "isthmus");

/// The image the manifests run, `ghcr.io/isthmus/isthmus:<this version>`.
pub fn default_image() -> String {
    format!("ghcr.io/isthmus/isthmus:{}", env!("CARGO_PKG_VERSION"))
}

/// `isthmus install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// This cluster's name in the mesh (what ServiceMirrors' spec.cluster name).
    #[arg(long, env = "ISTHMUS_CLUSTER", required_unless_present = "crds")]
    pub cluster: Option<String>,
    /// Print only the CRDs. Apply them first and let them become established:
    /// the full output holds objects of their kinds, which `kubectl apply` refuses
    /// before the API server serves them.
    #[arg(long, conflicts_with_all = ["cluster", "issuer"])]
    pub crds: bool,
    /// The SPIFFE trust domain shared by the linked clusters.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The image of the controller, gateway and injected containers.
    #[arg(long, default_value_t = default_image())]
    pub image: String,
    /// Gateway replicas.
    #[arg(long, default_value_t = 2)]
    pub gateway_replicas: i32,
    /// Namespaces whose every Service is exported to linked clusters (repeatable);
    /// otherwise only Services labelled mirror.isthmus.io/exported=true are.
    #[arg(long = "export-namespace", value_name = "NAMESPACE")]
    pub export_namespaces: Vec<String>,
    /// Pin the gateway Service's ClusterIP (inside the cluster's Service range), so
    /// ClusterSettings can name the gateway by address; without it the gateway is
    /// named by its DNS name.
    #[arg(long, value_name = "IP")]
    pub gateway_cluster_ip: Option<IpAddr>,
    /// Also render the Secret of the ClusterIssuer from this directory, as
    /// `isthmus identity issuer --out` writes it (ca.crt, ca.key, anchors.crt).
    /// The output then holds a private key: apply it, do not commit it.
    #[arg(long, value_name = "DIR")]
    pub issuer: Option<PathBuf>,
    /// cert-manager's namespace (where a ClusterIssuer reads its Secret).
    #[arg(long, default_value = DEFAULT_CERT_MANAGER_NAMESPACE)]
    pub cert_manager_namespace: String,
}

/// The validated input of [`render`].
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// This cluster's name.
    pub cluster: ClusterName,
    /// The SPIFFE trust domain (validated).
    pub trust_domain: String,
    /// The image every container runs.
    pub image: String,
    /// Gateway replicas, at least 1.
    pub gateway_replicas: i32,
    /// Namespaces whose every Service is exported.
    pub export_namespaces: Vec<String>,
    /// The gateway Service's pinned ClusterIP, which ClusterSettings then names.
    pub gateway_cluster_ip: Option<IpAddr>,
    /// PEM of the issuer (`tls.crt`: issuer then anchors, `tls.key`, `ca.crt`).
    pub issuer: Option<IssuerPem>,
    /// Where the ClusterIssuer's Secret lives.
    pub cert_manager_namespace: String,
}

/// The issuer certificate, key and anchors a cert-manager CA issuer signs with.
#[derive(Clone)]
pub struct IssuerPem {
    /// The issuer's certificate, then its chain up to the anchor.
    pub cert_chain: String,
    /// The issuer's private key.
    pub key: String,
    /// The trust anchors.
    pub anchors: String,
}

impl std::fmt::Debug for IssuerPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerPem").finish_non_exhaustive()
    }
}

impl InstallOptions {
    fn from_args(args: InstallArgs) -> Result<Self> {
        let name = args.cluster.as_deref().unwrap_or_default();
        let cluster = ClusterName::parse(name).map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
        isthmus_vocab::TrustDomain::parse(&args.trust_domain)
            .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
        if args.gateway_replicas < 1 {
            anyhow::bail!("--gateway-replicas: must be at least 1");
        }
        for ns in &args.export_namespaces {
            proxy_discovery::model::check_dns_label("namespace", ns)
                .map_err(|e| anyhow::anyhow!("--export-namespace: {e}"))?;
        }
        let issuer = match &args.issuer {
            None => None,
            Some(dir) => {
                let authority = proxy_identity::mint::CertificateAuthority::read_dir(dir)
                    .with_context(|| format!("reading --issuer {}", dir.display()))?;
                if authority.is_anchor() {
                    anyhow::bail!(
                        "--issuer {}: this is a trust anchor; give the cluster's issuer \
                         (`isthmus identity issuer --anchor DIR --cluster {} --out DIR`)",
                        dir.display(),
                        cluster
                    );
                }
                Some(IssuerPem {
                    cert_chain: format!("{}{}", authority.ca.cert_pem, authority.chain_pem),
                    key: authority.ca.key_pem.clone(),
                    anchors: authority.anchors_pem.clone(),
                })
            }
        };
        Ok(Self {
            cluster,
            trust_domain: args.trust_domain,
            image: args.image,
            gateway_replicas: args.gateway_replicas,
            export_namespaces: args.export_namespaces,
            gateway_cluster_ip: args.gateway_cluster_ip,
            issuer,
            cert_manager_namespace: args.cert_manager_namespace,
        })
    }

    /// The SPIFFE ID of the gateway.
    pub fn gateway_identity(&self) -> String {
        format!("spiffe://{}/ns/{NAMESPACE}/sa/{GATEWAY}", self.trust_domain)
    }
}

/// Runs `isthmus install`: prints the manifests.
pub fn run(args: InstallArgs) -> Result<()> {
    if args.crds {
        print!("{}", render_crds()?);
        return Ok(());
    }
    let options = InstallOptions::from_args(args)?;
    print!("{}", render(&options)?);
    Ok(())
}

/// The CRDs alone (`isthmus install --crds`).
pub fn render_crds() -> Result<String> {
    let mut out = format!(
        "# isthmus install --crds (isthmus {}): apply, then wait for them to be established:\n\
         # kubectl wait --for condition=established crd -l {}={}\n",
        env!("CARGO_PKG_VERSION"),
        PART_OF.0,
        PART_OF.1
    );
    let crds: Vec<serde_json::Value> = crds().iter().map(to_json).collect();
    out.push_str(&documents(&crds).context("writing the CRDs as YAML")?);
    Ok(out)
}

/// The controller's CRDs, labelled as part of the install (for `kubectl wait -l`).
fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    let mut crds = proxy_discovery::manifests::crds();
    for crd in &mut crds {
        crd.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(PART_OF.0.to_owned(), PART_OF.1.to_owned());
    }
    crds
}

/// The manifests of `options`, multi-document YAML in install order.
pub fn render(options: &InstallOptions) -> Result<String> {
    let mut out = format!(
        "# isthmus install --cluster {} (isthmus {}): apply with kubectl apply -f -\n{}",
        options.cluster,
        env!("CARGO_PKG_VERSION"),
        identity::prerequisites(options),
    );
    out.push_str(&documents(&objects(options)?).context("writing the manifests as YAML")?);
    Ok(out)
}

/// `objects` as multi-document YAML for a YAML 1.1 reader.
pub(crate) fn documents(objects: &[serde_json::Value]) -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for (i, object) in objects.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&kubectl_yaml::to_string(object)?);
    }
    Ok(out)
}

/// Every object of the install in apply order, each labelled [`PART_OF`] (so
/// `kubectl get -l` finds them all, and uninstall names the same set).
fn objects(options: &InstallOptions) -> Result<Vec<serde_json::Value>> {
    let mut docs: Vec<serde_json::Value> = Vec::new();
    let mut push = |v: serde_json::Value| docs.push(v);
    push(to_json(&namespace()));
    for crd in crds() {
        push(to_json(&crd));
    }
    let rbac = proxy_discovery::manifests::rbac(NAMESPACE);
    push(to_json(&rbac.service_account));
    push(to_json(&rbac.cluster_role));
    push(to_json(&rbac.cluster_role_binding));
    push(to_json(&rbac.role));
    push(to_json(&rbac.role_binding));
    for object in gateway_rbac() {
        push(object);
    }
    for object in link_reader() {
        push(object);
    }
    for object in identity::objects(options) {
        push(object);
    }
    let mut settings = serde_json::to_value(Object::ClusterSettings(cluster_settings(options)?))
        .context("rendering ClusterSettings")?;
    // The cluster's service range is the API server's, which allocates every
    // ClusterIP; install cannot know it and the controller does not read it.
    if let Some(spec) = settings.get_mut("spec").and_then(|s| s.as_object_mut()) {
        spec.remove("serviceCIDR");
    }
    push(settings);
    push(to_json(&controller_deployment(options)));
    push(to_json(&gateway_deployment(options)));
    push(to_json(&gateway_service(options)));
    push(to_json(&disruption_budget(CONTROLLER)));
    push(to_json(&disruption_budget(GATEWAY)));
    for doc in &mut docs {
        part_of(doc);
    }
    Ok(docs)
}

/// Labels `object` as part of the mesh.
pub(crate) fn part_of(object: &mut serde_json::Value) {
    let labels = &mut object["metadata"]["labels"];
    if !labels.is_object() {
        *labels = serde_json::json!({});
    }
    labels[PART_OF.0] = serde_json::Value::from(PART_OF.1);
}

/// What `kubectl delete -f -` needs of each object: its kind, name and namespace.
pub(crate) fn deletion_stubs<'a>(
    objects: impl IntoIterator<Item = &'a serde_json::Value>,
) -> Vec<serde_json::Value> {
    objects
        .into_iter()
        .map(|o| {
            let mut metadata = serde_json::json!({ "name": o["metadata"]["name"] });
            if let Some(ns) = o["metadata"].get("namespace") {
                metadata["namespace"] = ns.clone();
            }
            serde_json::json!({
                "apiVersion": o["apiVersion"],
                "kind": o["kind"],
                "metadata": metadata,
            })
        })
        .collect()
}

/// `isthmus uninstall`.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The cluster's name, as `isthmus install --cluster` named it.
    #[arg(long, env = "ISTHMUS_CLUSTER")]
    pub cluster: String,
    /// cert-manager's namespace, as `isthmus install` was given it.
    #[arg(long, default_value = DEFAULT_CERT_MANAGER_NAMESPACE)]
    pub cert_manager_namespace: String,
}

/// Runs `isthmus uninstall`: prints every object `isthmus install` creates (with
/// or without `--issuer`), in the reverse order, for `kubectl delete -f -`.
pub fn run_uninstall(args: UninstallArgs) -> Result<()> {
    let cluster =
        ClusterName::parse(&args.cluster).map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
    let options = InstallOptions {
        cluster,
        trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
        image: default_image(),
        gateway_replicas: 1,
        export_namespaces: Vec::new(),
        gateway_cluster_ip: None,
        // Only the names of its Secret and ConfigMap are printed.
        issuer: Some(IssuerPem {
            cert_chain: String::new(),
            key: String::new(),
            anchors: String::new(),
        }),
        cert_manager_namespace: args.cert_manager_namespace,
    };
    let objects = objects(&options)?;
    print!(
        "# isthmus uninstall --cluster {} (isthmus {}): delete with\n\
         # kubectl delete --ignore-not-found -f -\n\
         # Deleting the CRDs deletes every ServiceMirror and Link, and the mirrored\n\
         # Services with them.\n{}",
        options.cluster,
        env!("CARGO_PKG_VERSION"),
        documents(&deletion_stubs(objects.iter().rev())).context("writing the objects as YAML")?
    );
    Ok(())
}

fn to_json<T: serde::Serialize>(object: &T) -> serde_json::Value {
    serde_json::to_value(object).expect("k8s-openapi objects serialize to JSON")
}

/// `metadata` with a name, an optional namespace and the part-of label.
fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels(&[PART_OF])),
        ..ObjectMeta::default()
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn namespace() -> Namespace {
    let mut metadata = meta(NAMESPACE, None);
    // Never inject the control plane: the gateway is a proxy itself.
    metadata.annotations = Some(labels(&[(crate::inject::INJECT_ANNOTATION, "disabled")]));
    Namespace {
        metadata,
        ..Namespace::default()
    }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |items: &[&str]| Some(items.iter().map(|s| (*s).to_owned()).collect());
    PolicyRule {
        api_groups: strings(groups),
        resources: strings(resources),
        verbs: verbs.iter().map(|s| (*s).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

const READ: &[&str] = &["get", "list", "watch"];

fn cluster_role_with_binding(name: &str, rules: Vec<PolicyRule>) -> Vec<serde_json::Value> {
    let role = ClusterRole {
        metadata: meta(name, None),
        rules: Some(rules),
        ..ClusterRole::default()
    };
    let binding = ClusterRoleBinding {
        metadata: meta(name, None),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: name.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: name.to_owned(),
            namespace: Some(NAMESPACE.to_owned()),
            ..Subject::default()
        }]),
    };
    let account = ServiceAccount {
        metadata: meta(name, Some(NAMESPACE)),
        ..ServiceAccount::default()
    };
    vec![to_json(&account), to_json(&role), to_json(&binding)]
}

/// The rules of the gateway: what it routes by, and nothing more.
pub fn gateway_rules() -> Vec<PolicyRule> {
    vec![
        rule(&[""], &["services"], READ),
        rule(&["discovery.k8s.io"], &["endpointslices"], READ),
        // Whether an endpoint is meshed comes from its pod's metadata (the label
        // inject sets), never from a probe: a meshed pod is never sent plaintext.
        rule(&[""], &["pods"], READ),
        rule(
            &["multicluster.isthmus.io"],
            &["links", "clustersettings"],
            READ,
        ),
    ]
}

/// The gateway reads what it routes by: Services and EndpointSlices (delivery to
/// exported Services), pods' metadata (which endpoints are meshed), and the mesh's
/// Links and ClusterSettings.
fn gateway_rbac() -> Vec<serde_json::Value> {
    cluster_role_with_binding(GATEWAY, gateway_rules())
}

/// The rules of the link reader: what a linked cluster's controller reads here,
/// and nothing more.
pub fn link_reader_rules() -> Vec<PolicyRule> {
    vec![
        // A linked cluster's controller mirrors Services; endpoints stay behind
        // this cluster's gateway and are never read from outside.
        rule(&[""], &["services"], READ),
        // The exported namespaces: without them a Service exported by namespace
        // looks unexported to the other cluster's controller.
        rule(
            &["multicluster.isthmus.io"],
            &["clustersettings"],
            &["list"],
        ),
    ]
}

fn link_reader() -> Vec<serde_json::Value> {
    let mut objects = cluster_role_with_binding(LINK_READER, link_reader_rules());
    let mut metadata = meta(LINK_READER_TOKEN, Some(NAMESPACE));
    metadata.annotations = Some(labels(&[(
        "kubernetes.io/service-account.name",
        LINK_READER,
    )]));
    // A long-lived token: Kubernetes fills in token, ca.crt and namespace.
    objects.push(to_json(&Secret {
        metadata,
        type_: Some("kubernetes.io/service-account-token".to_owned()),
        ..Secret::default()
    }));
    objects
}

/// This cluster's settings: its name, trust domain, exports and gateway.
pub fn cluster_settings(options: &InstallOptions) -> Result<ClusterSettings> {
    let mut settings = ClusterSettings::defaults(options.cluster.clone());
    settings.metadata =
        proxy_discovery::model::ObjectMeta::named(NAMESPACE, options.cluster.as_str());
    let address = match options.gateway_cluster_ip {
        Some(ip) => ip.to_string(),
        None => format!("{GATEWAY}.{NAMESPACE}.svc.{}", settings.spec.cluster_domain),
    };
    settings.spec = ClusterSettingsSpec {
        trust_domain: options.trust_domain.clone(),
        exported_namespaces: options.export_namespaces.clone(),
        gateway: Some(GatewaySpec {
            address: GatewayAddress::parse(&address)
                .with_context(|| format!("the gateway address {address}"))?,
            port: DEFAULT_INBOUND_PORT,
            identity: SpiffeId::parse(&options.gateway_identity())
                .context("--trust-domain gives no valid gateway SPIFFE ID")?,
        }),
        ..settings.spec
    };
    Ok(settings)
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

fn probe(path: &str, port: IntOrString, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port,
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(1),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// Spreads replicas over nodes when the scheduler can.
fn spread(app: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(labels(&[("app.kubernetes.io/name", app)])),
                            ..LabelSelector::default()
                        }),
                        topology_key: "kubernetes.io/hostname".to_owned(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

fn deployment(name: &str, replicas: i32, spec: PodSpec) -> Deployment {
    let selector = labels(&[("app.kubernetes.io/name", name)]);
    let mut pod_labels = selector.clone();
    pod_labels.insert(PART_OF.0.to_owned(), PART_OF.1.to_owned());
    Deployment {
        metadata: meta(name, Some(NAMESPACE)),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                ..DeploymentStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(labels(&[(crate::inject::INJECT_ANNOTATION, "disabled")])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    affinity: Some(spread(name)),
                    security_context: Some(PodSecurityContext {
                        fs_group: Some(i64::from(PROXY_UID)),
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(k8s_openapi::api::core::v1::SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..Default::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    ..spec
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The controller: `isthmus-controller run`, two replicas, one of which leads.
fn controller_deployment(options: &InstallOptions) -> Deployment {
    let container = Container {
        name: CONTROLLER.to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["isthmus-controller".to_owned()]),
        args: Some(controller_args(options)),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".to_owned()),
            container_port: CONTROLLER_METRICS_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe(
            CONTROLLER_READY_PATH,
            IntOrString::String("metrics".to_owned()),
            10,
        )),
        liveness_probe: Some(probe(
            CONTROLLER_LIVE_PATH,
            IntOrString::String("metrics".to_owned()),
            10,
        )),
        resources: Some(crate::inject::resources(("50m", "64Mi"), "256Mi")),
        security_context: Some(crate::inject::restricted()),
        ..Container::default()
    };
    deployment(
        CONTROLLER,
        2,
        PodSpec {
            service_account_name: Some(CONTROLLER.to_owned()),
            containers: vec![container],
            ..PodSpec::default()
        },
    )
}

fn identity_volume_mounts() -> Vec<VolumeMount> {
    vec![VolumeMount {
        name: crate::inject::IDENTITY_VOLUME.to_owned(),
        mount_path: IDENTITY_MOUNT.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }]
}

/// The gateway: `isthmus-proxy gateway` with the identity csi-driver-spiffe writes. It
/// discovers through the API server (`--discovery kube`): delivering to exported
/// Services needs their EndpointSlices, which the sidecars' ConfigMap does not hold.
fn gateway_deployment(options: &InstallOptions) -> Deployment {
    let container = Container {
        name: "isthmus-proxy".to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["isthmus-proxy".to_owned()]),
        args: Some(vec!["gateway".to_owned()]),
        env: Some(vec![
            env("ISTHMUS_CLUSTER", options.cluster.as_str()),
            env("ISTHMUS_IDENTITY_DIR", IDENTITY_MOUNT),
            env("ISTHMUS_DISCOVERY", "kube"),
            env(
                "ISTHMUS_ADMIN_ADDR",
                &format!("0.0.0.0:{DEFAULT_ADMIN_PORT}"),
            ),
            env("ISTHMUS_LOG_FORMAT", "json"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some(TUNNEL_PORT_NAME.to_owned()),
                container_port: i32::from(DEFAULT_INBOUND_PORT),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(ADMIN_PORT_NAME.to_owned()),
                container_port: i32::from(DEFAULT_ADMIN_PORT),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(probe(
            "/ready",
            IntOrString::Int(i32::from(DEFAULT_ADMIN_PORT)),
            5,
        )),
        liveness_probe: Some(probe(
            "/live",
            IntOrString::Int(i32::from(DEFAULT_ADMIN_PORT)),
            10,
        )),
        resources: Some(crate::inject::resources(("200m", "64Mi"), "512Mi")),
        security_context: Some(crate::inject::restricted()),
        volume_mounts: Some(identity_volume_mounts()),
        ..Container::default()
    };
    deployment(
        GATEWAY,
        options.gateway_replicas,
        PodSpec {
            service_account_name: Some(GATEWAY.to_owned()),
            containers: vec![container],
            // The gateway's SPIFFE ID follows from its ServiceAccount: only a pod
            // running as it is issued the gateway's identity.
            volumes: Some(vec![identity_volume(
                crate::inject::IDENTITY_VOLUME,
                PROXY_UID,
            )]),
            ..PodSpec::default()
        },
    )
}

/// The gateway's Service: a LoadBalancer so linked clusters reach the tunnel port,
/// and nothing else. The admin port (`/metrics`, `/ready`, `/live`) is reached by
/// probes and scrapers on the pod's own address; a peer gateway learns that this
/// one is alive over the tunnel itself.
fn gateway_service(options: &InstallOptions) -> Service {
    let mut metadata = meta(GATEWAY, Some(NAMESPACE));
    metadata.annotations = Some(labels(&[(
        "isthmus.io/gateway-identity",
        &options.gateway_identity(),
    )]));
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".to_owned()),
            cluster_ip: options.gateway_cluster_ip.map(|ip| ip.to_string()),
            selector: Some(labels(&[("app.kubernetes.io/name", GATEWAY)])),
            ports: Some(vec![ServicePort {
                name: Some(TUNNEL_PORT_NAME.to_owned()),
                port: i32::from(DEFAULT_INBOUND_PORT),
                target_port: Some(IntOrString::String(TUNNEL_PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// At most one replica of `app` evicted at a time (a budget of `minAvailable`
/// would block drains of a one-replica gateway).
fn disruption_budget(app: &str) -> k8s_openapi::api::policy::v1::PodDisruptionBudget {
    use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
    PodDisruptionBudget {
        metadata: meta(app, Some(NAMESPACE)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(labels(&[("app.kubernetes.io/name", app)])),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The controller's metrics and health port (`/metrics`, `/ready`, `/live`).
pub const CONTROLLER_METRICS_PORT: i32 = 4191;
const CONTROLLER_READY_PATH: &str = "/ready";
const CONTROLLER_LIVE_PATH: &str = "/live";

/// `isthmus-controller run`, reading this cluster's ClusterSettings (named as the
/// cluster) and publishing the sidecars' ConfigMap, both in the control plane's
/// namespace; its Lease identity is the pod's name (the host name).
fn controller_args(options: &InstallOptions) -> Vec<String> {
    vec![
        "run".to_owned(),
        "--namespace".to_owned(),
        NAMESPACE.to_owned(),
        "--settings".to_owned(),
        options.cluster.to_string(),
        "--configmap".to_owned(),
        DISCOVERY_CONFIGMAP.to_owned(),
        "--metrics-addr".to_owned(),
        format!("0.0.0.0:{CONTROLLER_METRICS_PORT}"),
    ]
}
