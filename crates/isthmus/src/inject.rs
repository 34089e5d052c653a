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
//! template) is passed through unchanged. An injected workload is injected again
//! from what it was before (`isthmus uninject`), so the image, the
//! cluster and the annotations' settings are today's, and injecting twice gives
//! the same bytes as injecting once. A `hostNetwork` pod is refused: its capture
//! would rewrite the node's iptables. A refused object is reported on stderr and
//! passed through unchanged with the others, and the command exits non-zero so a
//! pipeline notices
//! (linkerd reports and skips; the exit status is what a script can check).
//!
//! Workloads are read as kubectl reads them: YAML 1.1, where `defaultMode: 0644` is
//! octal and `tty: yes` a boolean.
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
use serde_yaml_ng::{Mapping, Value};

use crate::install;

mod containers;
mod uninject;
mod yaml11;

pub use containers::{init_container, proxy_container};
use containers::{pod_volumes, to_value};
pub(crate) use containers::{resources, restricted};

/// Annotation that opts a workload out of injection (value `disabled`).
pub const INJECT_ANNOTATION: &str = "isthmus.io/inject";
/// Pod annotation recording the version that injected it.
pub const INJECTED_ANNOTATION: &str = "isthmus.io/injected";
/// Pod annotation listing what the injection created (`metadata.labels`,
/// `spec.volumes`, ...; `:null` where it replaced a null), which uninject removes.
pub const CREATED_ANNOTATION: &str = "isthmus.io/injected-created";
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
    /// It had the mesh, which was replaced by what a fresh injection gives.
    Updated,
    /// It had the mesh exactly as a fresh injection gives it; left as it was.
    AlreadyInjected,
    /// The mesh was taken out (`isthmus uninject`).
    Uninjected,
    /// It had no mesh to take out; left as it was.
    NotInjected,
    /// Annotated `isthmus.io/inject: disabled`; left as it was.
    Disabled,
    /// Not a workload; left as it was.
    NotWorkload,
    /// Cannot be injected, for this reason; left as it was.
    Refused(String),
    /// Cannot be uninjected exactly, for this reason; left as it was.
    CannotUninject(String),
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
        let object = &self.object;
        match &self.outcome {
            Outcome::Injected => write!(f, "{object} injected"),
            Outcome::Updated => write!(f, "{object} injected again, with this image and cluster"),
            Outcome::AlreadyInjected => write!(f, "{object} already injected, left as is"),
            Outcome::Uninjected => write!(f, "{object} uninjected"),
            Outcome::NotInjected => write!(f, "{object} is not injected, left as is"),
            Outcome::Disabled => {
                write!(f, "{object} has {INJECT_ANNOTATION}: disabled, left as is")
            }
            Outcome::NotWorkload => write!(f, "{object} is not a workload, left as is"),
            Outcome::Refused(why) => write!(f, "{object} cannot be injected: {why}"),
            Outcome::CannotUninject(why) => write!(f, "{object} cannot be uninjected: {why}"),
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
            .any(|r| matches!(r.outcome, Outcome::Refused(_) | Outcome::CannotUninject(_)))
    }
}

/// `isthmus uninject`.
#[derive(Debug, Args)]
pub struct UninjectArgs {
    /// A manifest file (multi-document YAML), or `-` for stdin.
    #[arg(value_name = "FILE")]
    pub input: PathBuf,
    /// Rewrite FILE instead of printing to stdout.
    #[arg(long)]
    pub in_place: bool,
}

/// Runs `isthmus inject`; `Ok(false)` when some object was refused.
pub fn run(args: InjectArgs) -> Result<bool> {
    isthmus_vocab::ClusterName::parse(&args.cluster)
        .map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
    let options = Options {
        cluster: args.cluster,
        image: args.image,
    };
    rewrite_file(&args.input, args.in_place, "injecting", |input| {
        inject_text(input, &options)
    })
}

/// Runs `isthmus uninject`; `Ok(false)` when some object could not be uninjected.
pub fn run_uninject(args: UninjectArgs) -> Result<bool> {
    rewrite_file(&args.input, args.in_place, "uninjecting", uninject_text)
}

/// Reads `input` (a file or `-`), rewrites it with `rewrite`, reports each object
/// on stderr and prints the result (or writes it back with `in_place`).
fn rewrite_file(
    input: &std::path::Path,
    in_place: bool,
    doing: &str,
    rewrite: impl FnOnce(&str) -> Result<Injected, InjectError>,
) -> Result<bool> {
    let from_stdin = input.as_os_str() == "-";
    if from_stdin && in_place {
        anyhow::bail!("--in-place needs a file, not `-` (stdin)");
    }
    let (text, source) = if from_stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading manifests from stdin")?;
        (text, "stdin".to_owned())
    } else {
        let text = std::fs::read_to_string(input)
            .with_context(|| format!("reading {}", input.display()))?;
        (text, input.display().to_string())
    };
    let rewritten = rewrite(&text).with_context(|| format!("{doing} {source}"))?;
    for report in &rewritten.reports {
        eprintln!("{report}");
    }
    if in_place {
        std::fs::write(input, &rewritten.text)
            .with_context(|| format!("writing {}", input.display()))?;
    } else {
        print!("{}", rewritten.text);
    }
    if rewritten.refused() {
        eprintln!(
            "some objects of {source} were left as they were (see above); they are in the output unchanged"
        );
    }
    Ok(!rewritten.refused())
}

/// Injects every workload of `input` (multi-document YAML). Deterministic: the same
/// input and options always give the same text. A workload injected before is
/// uninjected first, so injecting the output again gives it back byte for byte,
/// and a new image or cluster replaces the old one.
pub fn inject_text(input: &str, options: &Options) -> Result<Injected, InjectError> {
    rewrite_text(input, &mut |value, kind, object, document| {
        inject_workload(value, kind, object, options, document)
    })
}

/// Takes the mesh out of every injected workload of `input`: each comes out as it
/// was before `isthmus inject`, as objects (the YAML's layout may differ).
pub fn uninject_text(input: &str) -> Result<Injected, InjectError> {
    rewrite_text(input, &mut |value, kind, object, document| {
        let Some(template) = workload_template(value, kind, object, document)? else {
            return Ok(Outcome::NotWorkload);
        };
        if !uninject::is_injected(template) {
            return Ok(Outcome::NotInjected);
        }
        let mut bare = template.clone();
        Ok(match uninject::remove(&mut bare) {
            Ok(()) => {
                *template = bare;
                Outcome::Uninjected
            }
            Err(why) => Outcome::CannotUninject(why),
        })
    })
}

/// What one workload gets: its value, kind, `Kind ns/name` and document number.
type Rewrite<'a> = dyn FnMut(&mut Value, &str, &str, usize) -> Result<Outcome, InjectError> + 'a;

/// Applies `rewrite` to every object of every document (and each item of a
/// `List`), and writes the documents back for a YAML 1.1 reader.
fn rewrite_text(input: &str, rewrite: &mut Rewrite<'_>) -> Result<Injected, InjectError> {
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
        rewrite_object(&mut value, rewrite, document, &mut reports)?;
        docs.push(
            proxy_discovery::kubectl_yaml::to_string(&value)
                .map_err(|source| InjectError::Write { document, source })?,
        );
    }
    Ok(Injected {
        text: docs.join("---\n"),
        reports,
    })
}

fn rewrite_object(
    value: &mut Value,
    rewrite: &mut Rewrite<'_>,
    document: usize,
    reports: &mut Vec<Report>,
) -> Result<(), InjectError> {
    let kind = str_at(value, &["kind"]).unwrap_or_default().to_owned();
    if kind == "List" {
        if let Some(Value::Sequence(items)) = value.get_mut("items") {
            for item in items {
                rewrite_object(item, rewrite, document, reports)?;
            }
        }
        return Ok(());
    }
    let object = describe(value);
    let outcome = rewrite(value, &kind, &object, document)?;
    reports.push(Report { object, outcome });
    Ok(())
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

/// The pod template of a workload of a kind inject supports (`None` for any other
/// object), its YAML 1.1 scalars read as kubectl reads them, and the whole object
/// checked against its k8s-openapi type.
fn workload_template<'v>(
    value: &'v mut Value,
    kind: &str,
    object: &str,
    document: usize,
) -> Result<Option<&'v mut Value>, InjectError> {
    let api_version = str_at(value, &["apiVersion"]).unwrap_or_default();
    let Some(path) = template_path(kind).filter(|_| {
        matches!(
            (kind, api_version),
            ("Pod", "v1") | ("CronJob" | "Job", "batch/v1") | (_, "apps/v1")
        )
    }) else {
        return Ok(None);
    };
    yaml11::read_as_kubectl(value, |v| validate(v, kind)).map_err(|source| {
        InjectError::Invalid {
            object: object.to_owned(),
            document,
            kind: kind.to_owned(),
            source,
        }
    })?;
    match path.iter().try_fold(value, |v, key| v.get_mut(*key)) {
        Some(template) => Ok(Some(template)),
        None => Err(invalid_shape(object, document, kind, path)),
    }
}

fn inject_workload(
    value: &mut Value,
    kind: &str,
    object: &str,
    options: &Options,
    document: usize,
) -> Result<Outcome, InjectError> {
    let disabled_object = annotation(value, &["metadata"], INJECT_ANNOTATION) == Some("disabled");
    let Some(slot) = workload_template(value, kind, object, document)? else {
        return Ok(Outcome::NotWorkload);
    };
    if disabled_object || annotation(slot, &["metadata"], INJECT_ANNOTATION) == Some("disabled") {
        return Ok(Outcome::Disabled);
    }
    // Work on a copy: a refusal leaves the object exactly as it came.
    let before = slot.clone();
    let mut template = before.clone();
    let already = uninject::is_injected(&template);
    if already && let Err(why) = uninject::remove(&mut template) {
        return Ok(Outcome::Refused(format!(
            "it holds a mesh that cannot be replaced exactly: {why}"
        )));
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
        annotation(&template, &["metadata"], annotation_name)
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
    let inbound_loopback = match annotation(&template, &["metadata"], INBOUND_LOOPBACK_ANNOTATION) {
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
    // What the injection creates, so that uninject takes out exactly that.
    let created = uninject::created_slots(&template);
    let Some(template_map) = template.as_mapping_mut() else {
        let path = template_path(kind).unwrap_or_default();
        return Err(invalid_shape(object, document, kind, path));
    };
    let metadata = child_mapping(template_map, "metadata");
    child_mapping(metadata, "labels").insert(Value::from(MESHED_LABEL), Value::from("true"));
    let annotations = child_mapping(metadata, "annotations");
    annotations.insert(
        Value::from(INJECTED_ANNOTATION),
        Value::from(env!("CARGO_PKG_VERSION")),
    );
    if !created.is_empty() {
        annotations.insert(Value::from(CREATED_ANNOTATION), Value::from(created));
    }
    let spec = child_mapping(template_map, "spec");
    let inits = child_sequence(spec, "initContainers");
    inits.insert(0, to_value(&proxy));
    inits.insert(0, to_value(&init));
    child_sequence(spec, "volumes").extend(pod_volumes());
    let outcome = match (already, template == before) {
        (false, _) => Outcome::Injected,
        (true, true) => Outcome::AlreadyInjected,
        (true, false) => Outcome::Updated,
    };
    *slot = template;
    Ok(outcome)
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
fn validate(value: &Value, kind: &str) -> Result<(), serde_yaml_ng::Error> {
    use k8s_openapi::api::{apps::v1 as apps, batch::v1 as batch, core::v1 as core};
    fn check<T: serde::de::DeserializeOwned>(value: &Value) -> Result<(), serde_yaml_ng::Error> {
        serde_yaml_ng::from_value::<T>(value.clone()).map(drop)
    }
    match kind {
        "Pod" => check::<core::Pod>(value),
        "Deployment" => check::<apps::Deployment>(value),
        "StatefulSet" => check::<apps::StatefulSet>(value),
        "DaemonSet" => check::<apps::DaemonSet>(value),
        "ReplicaSet" => check::<apps::ReplicaSet>(value),
        "Job" => check::<batch::Job>(value),
        "CronJob" => check::<batch::CronJob>(value),
        _ => Ok(()),
    }
}

fn annotation<'a>(value: &'a Value, metadata: &[&str], key: &str) -> Option<&'a str> {
    metadata
        .iter()
        .try_fold(value, |v, k| v.get(*k))?
        .get("annotations")?
        .get(key)?
        .as_str()
}

/// The value of `key` in `parent`, made `empty` when missing or not `is_kind`
/// (`metadata: null` or `annotations: null`, as some generators write them).
fn child<'a>(
    parent: &'a mut Mapping,
    key: &str,
    is_kind: fn(&Value) -> bool,
    empty: Value,
) -> &'a mut Value {
    let slot = parent.entry(Value::from(key)).or_insert(Value::Null);
    if !is_kind(slot) {
        *slot = empty;
    }
    slot
}

fn child_mapping<'a>(parent: &'a mut Mapping, key: &str) -> &'a mut Mapping {
    child(
        parent,
        key,
        Value::is_mapping,
        Value::Mapping(Mapping::new()),
    )
    .as_mapping_mut()
    .expect("the slot was just made a mapping")
}

fn child_sequence<'a>(parent: &'a mut Mapping, key: &str) -> &'a mut Vec<Value> {
    child(parent, key, Value::is_sequence, Value::Sequence(Vec::new()))
        .as_sequence_mut()
        .expect("the slot was just made a sequence")
}
