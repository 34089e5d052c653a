//! `isthmus inject`: adds the mesh to workload manifests, the way `linkerd inject`
//! does, so `isthmus inject app.yaml | kubectl apply -f -` meshes an application.
//!
//! For every pod template of a Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
//! Job or CronJob (also inside a `kind: List`) it adds, in front of the pod's own
//! init containers:
//!
//! - `isthmus-init`, which installs the iptables capture (root, with NET_ADMIN and
//!   NET_RAW only; the inbound and outbound ports to leave alone come from the
//!   annotations `isthmus.io/skip-inbound-ports` and `isthmus.io/skip-outbound-ports`);
//! - `isthmus-proxy` in the `sidecar` role as a native sidecar (an init container with
//!   `restartPolicy: Always`, Kubernetes 1.29 and later): it is up and ready before the
//!   application's containers start, and it does not keep a Job from completing;
//!
//! and the volumes they read: the workload identity (`tls.crt`, `tls.key`, `ca.crt`)
//! from cert-manager's csi-driver-spiffe (driver `spiffe.csi.cert-manager.io`),
//! which issues each pod exactly its ServiceAccount's SPIFFE ID,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, through the
//! `ClusterIssuer` that `isthmus install` renders: the volume names no identity,
//! so a manifest cannot ask for another one; and the discovery ConfigMap the
//! controller publishes, mounted as the proxy's `--manifests` directory.
//!
//! The pod template is labelled `isthmus.io/meshed: "true"`: gateways learn from
//! it that the pod's endpoints are reached through its sidecar, and never send
//! them plaintext. A pod annotated `isthmus.io/inbound-loopback: "true"` has its
//! sidecar deliver inbound connections to `127.0.0.1` (for applications that
//! listen on loopback only) instead of the pod's own address.
//!
//! Objects of other kinds are passed through as parsed (comments are not kept). A
//! workload annotated `isthmus.io/inject: disabled` (on the object or its pod
//! template), or already injected, is passed through unchanged: injecting twice gives
//! the same bytes. A `hostNetwork` pod is refused: its capture would rewrite the
//! node's iptables. A refused object is reported on stderr and passed through
//! unchanged with the others, and the command exits non-zero so a pipeline notices
//! (linkerd reports and skips; the exit status is what a script can check).
//!
//! Not here: which names and paths the installed mesh uses ([`crate::install`] owns
//! them), and validating the application's own containers beyond what their
//! k8s-openapi types require.

use std::fmt;
use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use iptables_init::config::PortList;
use isthmus_vocab::ports::{
    DEFAULT_ADMIN_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, PROXY_UID,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Probe, ResourceRequirements,
    SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_yaml_ng::{Mapping, Value};

use crate::install;

/// Annotation that opts a workload out of injection (value `disabled`).
pub const INJECT_ANNOTATION: &str = "isthmus.io/inject";
/// Pod annotation recording the version that injected it.
pub const INJECTED_ANNOTATION: &str = "isthmus.io/injected";
/// Pod annotation: more inbound ports for `isthmus-init` to leave alone.
pub const SKIP_INBOUND_ANNOTATION: &str = "isthmus.io/skip-inbound-ports";
/// Pod annotation: outbound ports for `isthmus-init` to leave alone.
pub const SKIP_OUTBOUND_ANNOTATION: &str = "isthmus.io/skip-outbound-ports";
/// The init container's name.
pub const INIT_CONTAINER: &str = "isthmus-init";
/// The sidecar's name.
pub const PROXY_CONTAINER: &str = "isthmus-proxy";
/// The volume holding the workload identity.
pub const IDENTITY_VOLUME: &str = "isthmus-identity";
/// The volume holding the discovery manifests.
pub const DISCOVERY_VOLUME: &str = "isthmus-discovery";
/// A writable `/run` for `isthmus-init`: `iptables-legacy` takes its lock file
/// there, and the rest of the init container's file system is read-only.
pub const INIT_RUN_VOLUME: &str = "isthmus-init-run";

/// Pod label telling gateways that the pod's endpoints are meshed.
pub const MESHED_LABEL: &str = "isthmus.io/meshed";
/// Pod annotation opting in to inbound delivery on loopback (`"true"`); the
/// default is the pod's own address, so listeners bound to loopback only stay
/// out of the mesh's reach.
pub const INBOUND_LOOPBACK_ANNOTATION: &str = "isthmus.io/inbound-loopback";
/// The proxy's variable for that opt-in (its `--inbound-loopback`).
pub const INBOUND_LOOPBACK_ENV: &str = "ISTHMUS_INBOUND_LOOPBACK";

/// `isthmus inject`.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// A manifest file (multi-document YAML), or `-` for stdin.
    #[arg(value_name = "FILE")]
    pub input: PathBuf,
    /// Rewrite FILE instead of printing to stdout.
    #[arg(long)]
    pub in_place: bool,
    /// The cluster the workloads run in, as `isthmus install --cluster` named it.
    #[arg(long, env = "ISTHMUS_CLUSTER")]
    pub cluster: String,
    /// The image holding isthmus-init and isthmus-proxy.
    #[arg(long, default_value_t = install::default_image())]
    pub image: String,
}

/// What [`inject_text`] needs to know about the installed mesh.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cluster's name (`--cluster` of the sidecar).
    pub cluster: String,
    /// The image of both added containers.
    pub image: String,
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The mesh was added.
    Injected,
    /// It already had the mesh; left as it was.
    AlreadyInjected,
    /// Annotated `isthmus.io/inject: disabled`; left as it was.
    Disabled,
    /// Not a workload; left as it was.
    NotWorkload,
    /// Cannot be injected, for this reason; left as it was.
    Refused(String),
}

/// One object's outcome, named `Kind namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `Deployment default/hello` (without namespace when the manifest has none).
    pub object: String,
    /// What happened to it.
    pub outcome: Outcome,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Injected => write!(f, "{} injected", self.object),
            Outcome::AlreadyInjected => write!(f, "{} already injected, left as is", self.object),
            Outcome::Disabled => write!(
                f,
                "{} has {INJECT_ANNOTATION}: disabled, left as is",
                self.object
            ),
            Outcome::NotWorkload => write!(f, "{} is not a workload, left as is", self.object),
            Outcome::Refused(why) => write!(f, "{} cannot be injected: {why}", self.object),
        }
    }
}

/// A manifest that cannot be read or rewritten; nothing is written then.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A document is not YAML.
    #[error("document {document} is not valid YAML")]
    Yaml {
        /// 1-based index of the document in the input.
        document: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A workload does not parse as its Kubernetes type.
    #[error("{object} (document {document}) is not a valid {kind}")]
    Invalid {
        object: String,
        document: usize,
        kind: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// An annotation's value cannot be used.
    #[error("{object} (document {document}): annotation {annotation}")]
    Annotation {
        object: String,
        document: usize,
        annotation: &'static str,
        #[source]
        source: iptables_init::config::ParseError,
    },
    /// An annotation's value is neither `"true"` nor `"false"`.
    #[error(
        "{object} (document {document}): annotation {annotation} is {value:?}, not \"true\" or \"false\""
    )]
    NotBoolean {
        object: String,
        document: usize,
        annotation: &'static str,
        value: String,
    },
    /// The result could not be written as YAML.
    #[error("writing document {document} as YAML")]
    Write {
        document: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
}

/// The injected documents and what happened to each object.
#[derive(Debug)]
pub struct Injected {
    /// The output: every input document, in order, separated by `---`.
    pub text: String,
    /// One entry per object (items of a `List` each get one).
    pub reports: Vec<Report>,
}

impl Injected {
    /// Whether some object was refused.
    pub fn refused(&self) -> bool {
        self.reports
            .iter()
            .any(|r| matches!(r.outcome, Outcome::Refused(_)))
    }
}

/// Runs `isthmus inject`; `Ok(false)` when some object was refused.
pub fn run(args: InjectArgs) -> Result<bool> {
    isthmus_vocab::ClusterName::parse(&args.cluster)
        .map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
    let from_stdin = args.input.as_os_str() == "-";
    if from_stdin && args.in_place {
        anyhow::bail!("--in-place needs a file, not `-` (stdin)");
    }
    let input = if from_stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading manifests from stdin")?;
        text
    } else {
        std::fs::read_to_string(&args.input)
            .with_context(|| format!("reading {}", args.input.display()))?
    };
    let source = if from_stdin {
        "stdin".to_owned()
    } else {
        args.input.display().to_string()
    };
    let options = Options {
        cluster: args.cluster,
        image: args.image,
    };
    let injected = inject_text(&input, &options).with_context(|| format!("injecting {source}"))?;
    for report in &injected.reports {
        eprintln!("{report}");
    }
    if args.in_place {
        std::fs::write(&args.input, &injected.text)
            .with_context(|| format!("writing {}", args.input.display()))?;
    } else {
        print!("{}", injected.text);
    }
    if injected.refused() {
        eprintln!(
            "some objects of {source} were not injected (see above); they are in the output unchanged"
        );
    }
    Ok(!injected.refused())
}

/// Injects every workload of `input` (multi-document YAML). Deterministic: the same
/// input and options always give the same text, and injecting that text again
/// gives it back unchanged.
pub fn inject_text(input: &str, options: &Options) -> Result<Injected, InjectError> {
    let mut docs = Vec::new();
    let mut reports = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let document = i + 1;
        let mut value = serde::Deserialize::deserialize(de)
            .map_err(|source| InjectError::Yaml { document, source })?;
        if matches!(value, Value::Null) {
            // An empty document (a leading or trailing `---`) carries nothing.
            continue;
        }
        inject_object(&mut value, options, document, &mut reports)?;
        docs.push(
            serde_yaml_ng::to_string(&value)
                .map_err(|source| InjectError::Write { document, source })?,
        );
    }
    Ok(Injected {
        text: docs.join("---\n"),
        reports,
    })
}

/// Where a kind keeps its pod template, from the object's root.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |v, key| v.get(*key))
        .and_then(Value::as_str)
}

fn describe(value: &Value) -> String {
    let kind = str_at(value, &["kind"]).unwrap_or("object");
    let name = str_at(value, &["metadata", "name"])
        .or_else(|| str_at(value, &["metadata", "generateName"]))
        .unwrap_or("<unnamed>");
    match str_at(value, &["metadata", "namespace"]) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn inject_object(
    value: &mut Value,
    options: &Options,
    document: usize,
    reports: &mut Vec<Report>,
) -> Result<(), InjectError> {
    let kind = str_at(value, &["kind"]).unwrap_or_default().to_owned();
    if kind == "List" {
        if let Some(Value::Sequence(items)) = value.get_mut("items") {
            for item in items {
                inject_object(item, options, document, reports)?;
            }
        }
        return Ok(());
    }
    let object = describe(value);
    let outcome = inject_workload(value, &kind, &object, options, document)?;
    reports.push(Report { object, outcome });
    Ok(())
}

fn inject_workload(
    value: &mut Value,
    kind: &str,
    object: &str,
    options: &Options,
    document: usize,
) -> Result<Outcome, InjectError> {
    let api_version = str_at(value, &["apiVersion"]).unwrap_or_default();
    let Some(path) = template_path(kind).filter(|_| {
        matches!(
            (kind, api_version),
            ("Pod", "v1") | ("CronJob" | "Job", "batch/v1") | (_, "apps/v1")
        )
    }) else {
        return Ok(Outcome::NotWorkload);
    };
    validate(value, kind, object, document)?;
    if annotation(value, &["metadata"], INJECT_ANNOTATION) == Some("disabled") {
        return Ok(Outcome::Disabled);
    }
    let Some(template) = path.iter().try_fold(&mut *value, |v, key| v.get_mut(*key)) else {
        return Err(invalid_shape(object, document, kind, path));
    };
    if annotation(template, &["metadata"], INJECT_ANNOTATION) == Some("disabled") {
        return Ok(Outcome::Disabled);
    }
    let already = annotation(template, &["metadata"], INJECTED_ANNOTATION).is_some()
        || ["initContainers", "containers"].iter().any(|list| {
            template
                .get("spec")
                .and_then(|s| s.get(*list))
                .and_then(Value::as_sequence)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| str_at(c, &["name"]) == Some(PROXY_CONTAINER))
                })
        });
    if already {
        return Ok(Outcome::AlreadyInjected);
    }
    if template
        .get("spec")
        .and_then(|s| s.get("hostNetwork"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        return Ok(Outcome::Refused(
            "it sets hostNetwork: true, so the pod shares the node's network namespace and \
             isthmus-init would capture the traffic of the whole node; run it without \
             hostNetwork, or annotate it isthmus.io/inject: disabled"
                .to_owned(),
        ));
    }
    let ports = |annotation_name: &'static str| -> Result<PortList, InjectError> {
        annotation(template, &["metadata"], annotation_name)
            .unwrap_or_default()
            .parse::<PortList>()
            .map_err(|source| InjectError::Annotation {
                object: object.to_owned(),
                document,
                annotation: annotation_name,
                source,
            })
    };
    let skip_inbound = ports(SKIP_INBOUND_ANNOTATION)?;
    let skip_outbound = ports(SKIP_OUTBOUND_ANNOTATION)?;
    let inbound_loopback = match annotation(template, &["metadata"], INBOUND_LOOPBACK_ANNOTATION) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(InjectError::NotBoolean {
                object: object.to_owned(),
                document,
                annotation: INBOUND_LOOPBACK_ANNOTATION,
                value: other.to_owned(),
            });
        }
    };
    let init = init_container(options, &skip_inbound, &skip_outbound);
    let proxy = proxy_container(options, inbound_loopback);
    let Some(template_map) = template.as_mapping_mut() else {
        return Err(invalid_shape(object, document, kind, path));
    };
    let metadata = child_mapping(template_map, "metadata");
    child_mapping(metadata, "labels").insert(Value::from(MESHED_LABEL), Value::from("true"));
    let annotations = child_mapping(metadata, "annotations");
    annotations.insert(
        Value::from(INJECTED_ANNOTATION),
        Value::from(env!("CARGO_PKG_VERSION")),
    );
    let spec = child_mapping(template_map, "spec");
    let inits = child_sequence(spec, "initContainers");
    inits.insert(0, to_value(&proxy));
    inits.insert(0, to_value(&init));
    let volumes = child_sequence(spec, "volumes");
    volumes.extend(pod_volumes());
    Ok(Outcome::Injected)
}

fn invalid_shape(object: &str, document: usize, kind: &str, path: &[&str]) -> InjectError {
    InjectError::Invalid {
        object: object.to_owned(),
        document,
        kind: kind.to_owned(),
        source: serde::de::Error::custom(format!(
            "it has no pod template at {}",
            if path.is_empty() {
                "the top level".to_owned()
            } else {
                path.join(".")
            }
        )),
    }
}

/// Checks that a workload parses as its k8s-openapi type, so a typo is reported by
/// field before anything is added to it.
fn validate(value: &Value, kind: &str, object: &str, document: usize) -> Result<(), InjectError> {
    use k8s_openapi::api::{apps::v1 as apps, batch::v1 as batch, core::v1 as core};
    fn check<T: serde::de::DeserializeOwned>(value: &Value) -> Result<(), serde_yaml_ng::Error> {
        serde_yaml_ng::from_value::<T>(value.clone()).map(drop)
    }
    let result = match kind {
        "Pod" => check::<core::Pod>(value),
        "Deployment" => check::<apps::Deployment>(value),
        "StatefulSet" => check::<apps::StatefulSet>(value),
        "DaemonSet" => check::<apps::DaemonSet>(value),
        "ReplicaSet" => check::<apps::ReplicaSet>(value),
        "Job" => check::<batch::Job>(value),
        "CronJob" => check::<batch::CronJob>(value),
        _ => Ok(()),
    };
    result.map_err(|source| InjectError::Invalid {
        object: object.to_owned(),
        document,
        kind: kind.to_owned(),
        source,
    })
}

fn annotation<'a>(value: &'a Value, metadata: &[&str], key: &str) -> Option<&'a str> {
    metadata
        .iter()
        .try_fold(value, |v, k| v.get(*k))?
        .get("annotations")?
        .get(key)?
        .as_str()
}

fn child_mapping<'a>(parent: &'a mut Mapping, key: &str) -> &'a mut Mapping {
    let slot = parent
        .entry(Value::from(key))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if !slot.is_mapping() {
        // `metadata: null` or `annotations: null` as some generators write them.
        *slot = Value::Mapping(Mapping::new());
    }
    slot.as_mapping_mut()
        .expect("the slot was just made a mapping")
}

fn child_sequence<'a>(parent: &'a mut Mapping, key: &str) -> &'a mut Vec<Value> {
    let slot = parent
        .entry(Value::from(key))
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if !slot.is_sequence() {
        *slot = Value::Sequence(Vec::new());
    }
    slot.as_sequence_mut()
        .expect("the slot was just made a sequence")
}

fn to_value<T: serde::Serialize>(object: &T) -> Value {
    serde_yaml_ng::to_value(object).expect("k8s-openapi types serialize to YAML values")
}

/// The `isthmus-init` container: the capture for the proxy's UID and ports, leaving
/// the admin port and the annotated ports alone.
pub fn init_container(
    options: &Options,
    skip_inbound: &PortList,
    skip_outbound: &PortList,
) -> Container {
    let mut inbound = format!("{DEFAULT_ADMIN_PORT}");
    if !skip_inbound.is_empty() {
        inbound = format!("{inbound},{skip_inbound}");
    }
    let mut args = vec![
        "--proxy-uid".to_owned(),
        PROXY_UID.to_string(),
        "--outbound-port".to_owned(),
        DEFAULT_OUTBOUND_PORT.to_string(),
        "--inbound-port".to_owned(),
        DEFAULT_INBOUND_PORT.to_string(),
        "--skip-inbound-ports".to_owned(),
        inbound,
    ];
    if !skip_outbound.is_empty() {
        args.extend([
            "--skip-outbound-ports".to_owned(),
            skip_outbound.to_string(),
        ]);
    }
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["isthmus-init".to_owned()]),
        args: Some(args),
        resources: Some(resources(("10m", "10Mi"), "50Mi")),
        security_context: Some(SecurityContext {
            // iptables needs root and these two capabilities in the pod's network
            // namespace, and nothing else.
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: INIT_RUN_VOLUME.to_owned(),
            mount_path: "/run".to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// The proxy's UID and group (the group the CSI driver gives the identity files,
/// its fs-group), no privilege, no capability, a read-only root.
pub(crate) fn restricted() -> SecurityContext {
    SecurityContext {
        run_as_user: Some(i64::from(PROXY_UID)),
        run_as_group: Some(i64::from(PROXY_UID)),
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// Requests of CPU and memory, and a memory limit. No CPU limit: throttling a
/// proxy stalls every connection of its pod, while the request already reserves
/// its share.
pub(crate) fn resources((cpu, memory): (&str, &str), memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_owned(), Quantity(cpu.to_owned())),
                ("memory".to_owned(), Quantity(memory.to_owned())),
            ]
            .into_iter()
            .collect(),
        ),
        limits: Some(
            [("memory".to_owned(), Quantity(memory_limit.to_owned()))]
                .into_iter()
                .collect(),
        ),
        ..ResourceRequirements::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(DEFAULT_ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

/// The sidecar: `isthmus-proxy sidecar` as a native sidecar, configured through the
/// `ISTHMUS_*` environment of `isthmus-proxy`; with `inbound_loopback` it delivers
/// inbound connections to loopback rather than the pod's own address.
pub fn proxy_container(options: &Options, inbound_loopback: bool) -> Container {
    let mut env_vars = vec![
        env("ISTHMUS_CLUSTER", &options.cluster),
        env("ISTHMUS_IDENTITY_DIR", install::IDENTITY_MOUNT),
        env("ISTHMUS_MANIFESTS", install::DISCOVERY_MOUNT),
        env(
            "ISTHMUS_ADMIN_ADDR",
            &format!("0.0.0.0:{DEFAULT_ADMIN_PORT}"),
        ),
        env("ISTHMUS_LOG_FORMAT", "json"),
    ];
    if inbound_loopback {
        env_vars.push(env(INBOUND_LOOPBACK_ENV, "true"));
    }
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["isthmus-proxy".to_owned()]),
        args: Some(vec!["sidecar".to_owned()]),
        // A native sidecar: started before the app and kept running beside it.
        restart_policy: Some("Always".to_owned()),
        env: Some(env_vars),
        ports: Some(vec![
            ContainerPort {
                name: Some(install::TUNNEL_PORT_NAME.to_owned()),
                container_port: i32::from(DEFAULT_INBOUND_PORT),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(install::ADMIN_PORT_NAME.to_owned()),
                container_port: i32::from(DEFAULT_ADMIN_PORT),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
        ]),
        // The app's containers start only once this answers: their first
        // connections already find the proxy listening.
        startup_probe: Some(http_probe("/ready", 1, 120)),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        resources: Some(resources(("100m", "20Mi"), "250Mi")),
        security_context: Some(restricted()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: IDENTITY_VOLUME.to_owned(),
                mount_path: install::IDENTITY_MOUNT.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: DISCOVERY_VOLUME.to_owned(),
                mount_path: install::DISCOVERY_MOUNT.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

/// The volumes the two containers mount.
fn pod_volumes() -> Vec<Value> {
    use k8s_openapi::api::core::v1::{ConfigMapVolumeSource, EmptyDirVolumeSource, Volume};
    let volumes = [
        Volume {
            name: INIT_RUN_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        // Readable by the proxy's group only.
        install::identity_volume(IDENTITY_VOLUME, PROXY_UID),
        Volume {
            name: DISCOVERY_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: install::DISCOVERY_CONFIGMAP.to_owned(),
                // The proxy starts with an empty directory until the controller
                // has published; it reloads when the ConfigMap appears.
                optional: Some(true),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    volumes.iter().map(to_value).collect()
}
