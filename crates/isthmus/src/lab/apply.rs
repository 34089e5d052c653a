//! Manifests onto a lab cluster's API server, as `kubectl apply --server-side`
//! and `kubectl delete -f` would: every document of a multi-document YAML text,
//! in order, its kind resolved through the server's discovery (so CRDs applied
//! earlier serve their kinds later), namespaced objects without a namespace in
//! `default`.
//!
//! Not here: which manifests a lab applies, or when ([`super::run`]).

use std::time::Duration;

use anyhow::{Context, Result};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;

/// The field manager of the lab's applies, as kubectl's.
pub const FIELD_MANAGER: &str = "kubectl";
/// How long a kind may take to be served after its CRD was applied.
const KIND_WAIT: Duration = Duration::from_secs(10);

/// What to do with each object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Server-side apply, taking over fields other managers hold.
    Apply,
    /// Delete (an object already gone is no error).
    Delete,
}

/// The objects of `text` (from `origin`, named in errors), without empty
/// documents.
pub fn parse(origin: &str, text: &str) -> Result<Vec<DynamicObject>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = <serde_json::Value as serde::Deserialize>::deserialize(doc)
            .with_context(|| format!("{origin}: document {} is not YAML", i + 1))?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_json::from_value(value)
            .with_context(|| format!("{origin}: document {} is not a Kubernetes object", i + 1))?;
        out.push(object);
    }
    Ok(out)
}

/// Applies or deletes every object of `text` (from `origin`) on `client`'s
/// server as kubectl; returns `kind namespace/name` of each.
pub async fn run(
    client: &kube::Client,
    verb: Verb,
    origin: &str,
    text: &str,
) -> Result<Vec<String>> {
    run_as(client, FIELD_MANAGER, verb, origin, text).await
}

/// [`run`] with another field manager: what it applies leaves the fields
/// kubectl's applies own alone.
pub async fn run_as(
    client: &kube::Client,
    manager: &str,
    verb: Verb,
    origin: &str,
    text: &str,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for object in parse(origin, text)? {
        let types = object
            .types
            .clone()
            .with_context(|| format!("{origin}: an object without apiVersion and kind"))?;
        let gvk = GroupVersionKind::try_from(&types)
            .with_context(|| format!("{origin}: apiVersion {:?}", types.api_version))?;
        let name = object
            .metadata
            .name
            .clone()
            .with_context(|| format!("{origin}: a {} without metadata.name", gvk.kind))?;
        let (resource, caps) = resolve(client, &gvk)
            .await
            .with_context(|| format!("{origin}: {} {name}", gvk.kind))?;
        let (api, what): (Api<DynamicObject>, String) = match caps.scope {
            Scope::Namespaced => {
                let ns = object
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".to_owned());
                let what = format!("{} {ns}/{name}", gvk.kind);
                (Api::namespaced_with(client.clone(), &ns, &resource), what)
            }
            Scope::Cluster => (
                Api::all_with(client.clone(), &resource),
                format!("{} {name}", gvk.kind),
            ),
        };
        match verb {
            Verb::Apply => {
                let params = PatchParams::apply(manager).force();
                api.patch(&name, &params, &Patch::Apply(&object))
                    .await
                    .with_context(|| format!("{origin}: applying {what}"))?;
            }
            Verb::Delete => match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("{origin}: deleting {what}")),
            },
        }
        done.push(what);
    }
    Ok(done)
}

/// The resource serving `gvk`, waiting a little for a CRD just applied.
async fn resolve(
    client: &kube::Client,
    gvk: &GroupVersionKind,
) -> Result<(
    kube::discovery::ApiResource,
    kube::discovery::ApiCapabilities,
)> {
    let deadline = tokio::time::Instant::now() + KIND_WAIT;
    loop {
        match kube::discovery::pinned_kind(client, gvk).await {
            Ok(found) => return Ok(found),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e).with_context(|| {
                    format!(
                        "the API server does not serve {}/{} {} (after {}s)",
                        gvk.group,
                        gvk.version,
                        gvk.kind,
                        KIND_WAIT.as_secs()
                    )
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Creates each namespace the objects of `text` live in that `client`'s server
/// does not hold yet, as `kubectl create namespace` before an apply.
pub async fn ensure_namespaces(client: &kube::Client, origin: &str, text: &str) -> Result<()> {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let wanted: std::collections::BTreeSet<String> = parse(origin, text)?
        .into_iter()
        .filter_map(|o| o.metadata.namespace)
        .collect();
    for ns in wanted {
        if namespaces.get_opt(&ns).await?.is_none() {
            let object = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n");
            run(client, Verb::Apply, &format!("namespace {ns}"), &object).await?;
        }
    }
    Ok(())
}

/// `text` with `change` made to every document, as YAML again.
pub fn edit(
    origin: &str,
    text: &str,
    mut change: impl FnMut(&mut serde_json::Value),
) -> Result<String> {
    let mut out = String::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let mut value = <serde_json::Value as serde::Deserialize>::deserialize(doc)
            .with_context(|| format!("{origin}: document {} is not YAML", i + 1))?;
        if value.is_null() {
            continue;
        }
        change(&mut value);
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&value).context("writing YAML")?);
    }
    Ok(out)
}

/// Kinds a cluster serves before the mesh is installed, `(group, version,
/// kind, plural, namespaced)`: cert-manager's ClusterIssuer (the lab mints what
/// cert-manager and csi-driver-spiffe would issue), and built-in kinds an API
/// server stand-in may lack.
const PREREQUISITES: [(&str, &str, &str, &str, bool); 2] = [
    (
        "cert-manager.io",
        "v1",
        "ClusterIssuer",
        "clusterissuers",
        false,
    ),
    (
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
    ),
];

/// Makes `client`'s server serve [`PREREQUISITES`] (each kind it does not
/// serve yet becomes a CRD that keeps any content) and hold the `default`
/// namespace every cluster has.
pub async fn prerequisites(client: &kube::Client) -> Result<()> {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    if namespaces.get_opt("default").await?.is_none() {
        let default = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n";
        run(client, Verb::Apply, "the default namespace", default).await?;
    }
    for (group, version, kind, plural, namespaced) in PREREQUISITES {
        let gvk = GroupVersionKind::gvk(group, version, kind);
        if kube::discovery::pinned_kind(client, &gvk).await.is_ok() {
            continue;
        }
        let crd = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.{group}")},
            "spec": {
                "group": group,
                "names": {"kind": kind, "plural": plural},
                "scope": if namespaced { "Namespaced" } else { "Cluster" },
                "versions": [{
                    "name": version, "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {
                        "type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                }],
            },
        });
        let text = serde_json::to_string(&crd).context("rendering a CRD")?;
        run(client, Verb::Apply, &format!("the lab's {kind} CRD"), &text).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_read_in_order_and_empty_ones_skipped() {
        let text = "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\n---\n\
                    apiVersion: linkerd.io/v1alpha1\nkind: ServiceMirror\nmetadata:\n  name: m\n";
        let objects = parse("x.yaml", text).unwrap();
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o.types.as_ref().unwrap().kind.as_str())
            .collect();
        assert_eq!(kinds, ["Namespace", "ServiceMirror"]);
        let err = parse("x.yaml", "- a\n").unwrap_err();
        assert!(format!("{err:#}").contains("x.yaml: document 1"), "{err:#}");
    }
}
