//! Parsing multi-document Kubernetes YAML into [`Object`]s.
//!
//! Each document is read twice from the same text: once as a generic value to learn
//! its `apiVersion`/`kind`/name, then straight into the typed struct, so serde's
//! error carries the field path and the line in the file. Kinds the mesh does not
//! model are kept as [`Object::Other`]: a real cluster holds many kinds. This module
//! does not check relations between objects (duplicates, references): the snapshot
//! does.

use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::meta::DEFAULT_NAMESPACE;
use super::names::{check_dns_label, check_dns_subdomain};
use super::{
    ClusterSettings, Deployment, EndpointSlice, Endpoints, Link, ObjectMeta, Pod, Service,
    ServiceMirror,
};

/// One object of any kind the mesh knows, or a placeholder for one it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// `v1/Service`.
    Service(Service),
    /// `v1/Endpoints`.
    Endpoints(Endpoints),
    /// `discovery.k8s.io/v1/EndpointSlice`.
    EndpointSlice(EndpointSlice),
    /// `apps/v1/Deployment`.
    Deployment(Deployment),
    /// `v1/Pod` (metadata only).
    Pod(Pod),
    /// `linkerd.io/v1alpha1/ServiceMirror`.
    ServiceMirror(ServiceMirror),
    /// `multicluster.isthmus.io/v1alpha1/Link`.
    Link(Link),
    /// `multicluster.isthmus.io/v1alpha1/ClusterSettings`.
    ClusterSettings(ClusterSettings),
    /// A kind the mesh does not model; kept so tools can list it.
    Other(OtherObject),
}

impl Object {
    /// `kind`.
    pub fn kind(&self) -> &str {
        match self {
            Self::Service(_) => Service::KIND,
            Self::Endpoints(_) => Endpoints::KIND,
            Self::EndpointSlice(_) => EndpointSlice::KIND,
            Self::Deployment(_) => Deployment::KIND,
            Self::Pod(_) => Pod::KIND,
            Self::ServiceMirror(_) => ServiceMirror::KIND,
            Self::Link(_) => Link::KIND,
            Self::ClusterSettings(_) => ClusterSettings::KIND,
            Self::Other(o) => &o.kind,
        }
    }

    /// `apiVersion`.
    pub fn api_version(&self) -> &str {
        match self {
            Self::Service(_) => Service::API_VERSION,
            Self::Endpoints(_) => Endpoints::API_VERSION,
            Self::EndpointSlice(_) => EndpointSlice::API_VERSION,
            Self::Deployment(_) => Deployment::API_VERSION,
            Self::Pod(_) => Pod::API_VERSION,
            Self::ServiceMirror(_) => ServiceMirror::API_VERSION,
            Self::Link(_) => Link::API_VERSION,
            Self::ClusterSettings(_) => ClusterSettings::API_VERSION,
            Self::Other(o) => &o.api_version,
        }
    }

    /// `namespace/name`, for messages and duplicate detection.
    pub fn key(&self) -> (String, String) {
        let meta = match self {
            Self::Service(o) => &o.metadata,
            Self::Endpoints(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::Deployment(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::ServiceMirror(o) => &o.metadata,
            Self::Link(o) => &o.metadata,
            Self::ClusterSettings(o) => &o.metadata,
            Self::Other(o) => return (o.namespace.clone(), o.name.clone()),
        };
        (meta.namespace().to_owned(), meta.name.clone())
    }
}

/// Writes the object as a manifest: `apiVersion`, `kind`, then its fields.
impl serde::Serialize for Object {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Typed<'a, T: serde::Serialize> {
            #[serde(rename = "apiVersion")]
            api_version: &'a str,
            kind: &'a str,
            #[serde(flatten)]
            inner: &'a T,
        }
        #[derive(serde::Serialize)]
        struct OtherMeta {
            metadata: ObjectMeta,
        }
        let (api_version, kind) = (self.api_version(), self.kind());
        macro_rules! typed {
            ($inner:expr) => {
                Typed {
                    api_version,
                    kind,
                    inner: $inner,
                }
                .serialize(s)
            };
        }
        match self {
            Self::Service(o) => typed!(o),
            Self::Endpoints(o) => typed!(o),
            Self::EndpointSlice(o) => typed!(o),
            Self::Deployment(o) => typed!(o),
            Self::Pod(o) => typed!(o),
            Self::ServiceMirror(o) => typed!(o),
            Self::Link(o) => typed!(o),
            Self::ClusterSettings(o) => typed!(o),
            Self::Other(o) => typed!(&OtherMeta {
                metadata: ObjectMeta::named(&o.namespace, &o.name),
            }),
        }
    }
}

/// An object of a kind the mesh does not model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherObject {
    /// Its `apiVersion`.
    pub api_version: String,
    /// Its `kind`.
    pub kind: String,
    /// Its namespace (`default` when absent).
    pub namespace: String,
    /// Its name (empty when absent).
    pub name: String,
}

/// Where an object was read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The file, as the caller named it.
    pub file: String,
    /// 1-based index of the YAML document within the file.
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)
    }
}

/// An object and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Where it was read.
    pub origin: Origin,
    /// The object.
    pub object: Object,
}

/// A manifest that cannot be used: what is wrong, in which file, document, object
/// and field, and at which line when the YAML parser knows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(Box<Detail>);

/// The parts of a [`ManifestError`]; boxed so `Result`s stay small.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Detail {
    file: String,
    document: Option<usize>,
    object: Option<String>,
    field: Option<String>,
    message: String,
    line: Option<usize>,
}

impl ManifestError {
    /// The file, as the caller named it.
    pub fn file(&self) -> &str {
        &self.0.file
    }
    /// 1-based document index, when the error is inside one document.
    pub fn document(&self) -> Option<usize> {
        self.0.document
    }
    /// `Kind namespace/name` of the object, when known.
    pub fn object(&self) -> Option<&str> {
        self.0.object.as_deref()
    }
    /// Dotted path of the offending field (`spec.ports[0].port`), when known.
    pub fn field(&self) -> Option<&str> {
        self.0.field.as_deref()
    }
    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.0.message
    }
    /// 1-based line in the file, when known.
    pub fn line(&self) -> Option<usize> {
        self.0.line
    }
}

impl From<Detail> for ManifestError {
    fn from(d: Detail) -> Self {
        Self(Box::new(d))
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(doc) = self.document {
            write!(f, ": document {doc}")?;
        }
        if let Some(obj) = &self.object {
            write!(f, " ({obj})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        Ok(())
    }
}

/// Parses every document of `text` (the contents of `file`).
///
/// Empty documents are skipped. The first invalid document fails the whole file:
/// a half-read file would be a state nobody wrote.
pub fn parse_manifests(file: &str, text: &str) -> Result<Vec<Parsed>, ManifestError> {
    let mut heads = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| yaml_error(file, Some(i + 1), None, &e))?;
        heads.push(value);
    }
    let mut out = Vec::new();
    // The second pass sees exactly the documents of the first (same text, same
    // parser), so `heads[i]` describes document `i`.
    for ((i, doc), head) in serde_yaml_ng::Deserializer::from_str(text)
        .enumerate()
        .zip(heads)
    {
        let document = i + 1;
        if head.is_null() {
            continue;
        }
        let origin = Origin {
            file: file.to_owned(),
            document,
        };
        let head = Head::read(&origin, &head)?;
        let obj_label = Some(head.label());
        let err = |e: serde_yaml_ng::Error| yaml_error(file, Some(document), obj_label.clone(), &e);
        let object = match head.known_kind(&origin)? {
            Some(Known::Service) => Object::Service(typed(doc).map_err(err)?),
            Some(Known::Endpoints) => Object::Endpoints(typed(doc).map_err(err)?),
            Some(Known::EndpointSlice) => Object::EndpointSlice(typed(doc).map_err(err)?),
            Some(Known::Deployment) => Object::Deployment(typed(doc).map_err(err)?),
            Some(Known::Pod) => Object::Pod(typed(doc).map_err(err)?),
            Some(Known::ServiceMirror) => Object::ServiceMirror(typed(doc).map_err(err)?),
            Some(Known::Link) => Object::Link(typed(doc).map_err(err)?),
            Some(Known::ClusterSettings) => Object::ClusterSettings(typed(doc).map_err(err)?),
            None => {
                tracing::debug!(%origin, kind = %head.kind, api_version = %head.api_version,
                    "ignoring a kind the mesh does not model");
                Object::Other(OtherObject {
                    api_version: head.api_version,
                    kind: head.kind,
                    namespace: head
                        .namespace
                        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
                    name: head.name.unwrap_or_default(),
                })
            }
        };
        let mut object = object;
        validate(&mut object).map_err(|(field, message)| {
            ManifestError::from(Detail {
                file: file.to_owned(),
                document: Some(document),
                object: obj_label.clone(),
                field: Some(field),
                message,
                line: None,
            })
        })?;
        out.push(Parsed { origin, object });
    }
    Ok(out)
}

fn typed<'de, T: DeserializeOwned>(
    doc: serde_yaml_ng::Deserializer<'de>,
) -> Result<T, serde_yaml_ng::Error> {
    T::deserialize(doc)
}

/// The kinds the model parses into typed structs.
enum Known {
    Service,
    Endpoints,
    EndpointSlice,
    Deployment,
    Pod,
    ServiceMirror,
    Link,
    ClusterSettings,
}

const KNOWN: [(&str, &str, Known); 8] = [
    (Service::API_VERSION, Service::KIND, Known::Service),
    (Endpoints::API_VERSION, Endpoints::KIND, Known::Endpoints),
    (
        EndpointSlice::API_VERSION,
        EndpointSlice::KIND,
        Known::EndpointSlice,
    ),
    (Deployment::API_VERSION, Deployment::KIND, Known::Deployment),
    (Pod::API_VERSION, Pod::KIND, Known::Pod),
    (
        ServiceMirror::API_VERSION,
        ServiceMirror::KIND,
        Known::ServiceMirror,
    ),
    (Link::API_VERSION, Link::KIND, Known::Link),
    (
        ClusterSettings::API_VERSION,
        ClusterSettings::KIND,
        Known::ClusterSettings,
    ),
];

/// `apiVersion`, `kind` and name of a document, read leniently.
struct Head {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    name: Option<String>,
}

impl Head {
    fn read(origin: &Origin, v: &Value) -> Result<Self, ManifestError> {
        let fail = |field: &str, message: &str| Detail {
            file: origin.file.clone(),
            document: Some(origin.document),
            object: None,
            field: (!field.is_empty()).then(|| field.to_owned()),
            message: message.to_owned(),
            line: None,
        };
        if !v.is_mapping() {
            return Err(fail("", "a Kubernetes object must be a mapping").into());
        }
        let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let meta = |key: &str| {
            v.get("metadata")
                .and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let head = Self {
            api_version: text("apiVersion").unwrap_or_default(),
            kind: text("kind").unwrap_or_default(),
            namespace: meta("namespace"),
            name: meta("name"),
        };
        let with_obj = |mut e: Detail| {
            e.object = (!head.kind.is_empty()).then(|| head.label());
            ManifestError::from(e)
        };
        if head.api_version.is_empty() {
            return Err(with_obj(fail("apiVersion", "missing or not a string")));
        }
        if head.kind.is_empty() {
            return Err(with_obj(fail("kind", "missing or not a string")));
        }
        Ok(head)
    }

    fn label(&self) -> String {
        format!(
            "{} {}/{}",
            self.kind,
            self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
            self.name.as_deref().unwrap_or("<unnamed>")
        )
    }

    /// The typed kind; an error when the kind is ours but the version is not one we
    /// read (a typo there would otherwise silently drop the object).
    fn known_kind(&self, origin: &Origin) -> Result<Option<Known>, ManifestError> {
        let group = |av: &str| {
            av.rsplit_once('/')
                .map(|(g, _)| g.to_owned())
                .unwrap_or_default()
        };
        for (api_version, kind, known) in KNOWN {
            if self.kind != kind {
                continue;
            }
            if self.api_version == api_version {
                return Ok(Some(known));
            }
            if group(&self.api_version) == group(api_version) {
                return Err(Detail {
                    file: origin.file.clone(),
                    document: Some(origin.document),
                    object: Some(self.label()),
                    field: Some("apiVersion".to_owned()),
                    message: format!(
                        "unsupported version {:?} of {kind}; expected {api_version:?}",
                        self.api_version
                    ),
                    line: None,
                }
                .into());
            }
        }
        Ok(None)
    }
}

/// Turns serde_yaml_ng's "path: message at line L column C" into field + message +
/// line, and "missing field `x`" at `spec` into field `spec.x`.
fn yaml_error(
    file: &str,
    document: Option<usize>,
    object: Option<String>,
    e: &serde_yaml_ng::Error,
) -> ManifestError {
    let line = e.location().map(|l| l.line());
    let mut text = e.to_string();
    if let Some(loc) = e.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = text.strip_suffix(&suffix) {
            text = stripped.to_owned();
        }
    }
    // A path never contains a space; a message before its first ':' usually does.
    let (mut field, mut message) = match text.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') && !path.is_empty() => {
            (Some(path.to_owned()), rest.to_owned())
        }
        _ => (None, text),
    };
    for (prefix, label) in [
        ("missing field `", "missing field"),
        ("unknown field `", "unknown field"),
    ] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((name, tail)) = rest.split_once('`')
        {
            field = Some(match field {
                Some(path) => format!("{path}.{name}"),
                None => name.to_owned(),
            });
            message = format!("{label}{tail}");
            break;
        }
    }
    Detail {
        file: file.to_owned(),
        document,
        object,
        field,
        message,
        line,
    }
    .into()
}

type FieldError = (String, String);

fn field_err(field: impl Into<String>, e: impl fmt::Display) -> FieldError {
    (field.into(), e.to_string())
}

/// Fills defaults (namespace) and checks what serde cannot: names, uniqueness,
/// combinations.
fn validate(object: &mut Object) -> Result<(), FieldError> {
    let meta: &mut ObjectMeta = match object {
        Object::Service(o) => &mut o.metadata,
        Object::Endpoints(o) => &mut o.metadata,
        Object::EndpointSlice(o) => &mut o.metadata,
        Object::Deployment(o) => &mut o.metadata,
        Object::Pod(o) => &mut o.metadata,
        Object::ServiceMirror(o) => &mut o.metadata,
        Object::Link(o) => &mut o.metadata,
        Object::ClusterSettings(o) => &mut o.metadata,
        Object::Other(_) => return Ok(()),
    };
    check_dns_subdomain("name", &meta.name).map_err(|e| field_err("metadata.name", e))?;
    let ns = meta
        .namespace
        .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
    check_dns_label("namespace", ns).map_err(|e| field_err("metadata.namespace", e))?;
    match object {
        Object::Service(svc) => validate_service(svc),
        Object::ServiceMirror(m) => {
            check_dns_label("service name", &m.spec.service.name)
                .map_err(|e| field_err("spec.service.name", e))?;
            if let Some(ns) = &m.spec.service.namespace {
                check_dns_label("namespace", ns)
                    .map_err(|e| field_err("spec.service.namespace", e))?;
            }
            Ok(())
        }
        Object::ClusterSettings(s) => {
            check_dns_subdomain("trust domain", &s.spec.trust_domain)
                .map_err(|e| field_err("spec.trustDomain", e))?;
            check_dns_subdomain("cluster domain", &s.spec.cluster_domain)
                .map_err(|e| field_err("spec.clusterDomain", e))?;
            for (i, ns) in s.spec.exported_namespaces.iter().enumerate() {
                check_dns_label("namespace", ns)
                    .map_err(|e| field_err(format!("spec.exportedNamespaces[{i}]"), e))?;
            }
            Ok(())
        }
        Object::Link(l) => {
            if !l.spec.probe_spec.path.starts_with('/') {
                return Err(field_err("spec.probeSpec.path", "must start with '/'"));
            }
            if l.spec.probe_spec.period.0.is_zero() {
                return Err(field_err("spec.probeSpec.period", "must be more than zero"));
            }
            Ok(())
        }
        Object::EndpointSlice(s) => {
            let ip = match s.address_type.as_str() {
                "IPv4" | "IPv6" => true,
                "FQDN" => false,
                other => {
                    return Err(field_err(
                        "addressType",
                        format!("{other:?} is not IPv4, IPv6 or FQDN"),
                    ));
                }
            };
            for (i, ep) in s.endpoints.iter().enumerate() {
                for (j, a) in ep.addresses.iter().enumerate() {
                    if ip && a.parse::<IpAddr>().is_err() {
                        return Err(field_err(
                            format!("endpoints[{i}].addresses[{j}]"),
                            format!("{a:?} is not an IP address"),
                        ));
                    }
                }
            }
            Ok(())
        }
        Object::Endpoints(_) | Object::Deployment(_) | Object::Pod(_) | Object::Other(_) => Ok(()),
    }
}

fn validate_service(svc: &Service) -> Result<(), FieldError> {
    // Service names become DNS labels (`name.ns.svc...`).
    check_dns_label("Service name", &svc.metadata.name)
        .map_err(|e| field_err("metadata.name", e))?;
    let ports = &svc.spec.ports;
    for (i, p) in ports.iter().enumerate() {
        if ports.len() > 1 && p.name.as_deref().is_none_or(str::is_empty) {
            return Err(field_err(
                format!("spec.ports[{i}].name"),
                "required when a Service has more than one port",
            ));
        }
        if ports[..i]
            .iter()
            .any(|q| q.port == p.port && q.protocol == p.protocol)
        {
            return Err(field_err(
                format!("spec.ports[{i}].port"),
                format!("port {} is listed twice", p.port),
            ));
        }
        if let Some(name) = &p.name
            && ports[..i].iter().any(|q| q.name.as_ref() == Some(name))
        {
            return Err(field_err(
                format!("spec.ports[{i}].name"),
                format!("name {name:?} is used twice"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
