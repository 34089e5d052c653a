//! `isthmus check`: the checks a user runs when something is wrong, in the order
//! things depend on each other, each printed as `✔` or `✘` with, on failure, what
//! to do (as `linkerd check` does). The exit status is non-zero when one fails.
//!
//! 1. the CRDs (ServiceMirror, Link, ClusterSettings) are installed;
//! 2. the cluster's ClusterSettings (one, with a gateway the sidecars can dial),
//!    the controller and the gateway Deployments have ready replicas, the
//!    controller has published the discovery ConfigMap, and the gateway Service has
//!    a LoadBalancer address;
//! 3. identity issuance ([`identity`]): csi-driver-spiffe's CSIDriver is installed
//!    and its approver is ready, cert-manager's default approver is off, and no
//!    approver-policy selects the mesh's issuer; then the ClusterIssuer's Secret
//!    (its certificate's validity, and the trust anchors), and identity
//!    directories given with `--identity-dir`;
//! 4. each Link: its credentials Secret is there, and its gateway answers on the
//!    tunnel port, the only one its LoadBalancer exposes ([`tunnel`]): a TLS 1.3
//!    handshake in which it presents the identity the Link expects under the
//!    mesh's trust anchors;
//! 5. each ServiceMirror's `Mirrored` condition.
//!
//! Checks only read. Not here: fixing anything, and checks of individual
//! workloads' sidecars (their `/ready` and `/config` say more than the API can).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Args;
use isthmus_vocab::{ClusterName, SpiffeId};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::ListParams;
use proxy_core::resolve::GatewayHost;
use proxy_discovery::model::{
    ClusterSettingsResource, ConditionStatus, Link, LinkResource, ServiceMirrorResource,
};
use proxy_identity::rustls::RootCertStore;
use proxy_identity::{CredentialPaths, Credentials};

use crate::install;
use crate::link::KubeArgs;

mod identity;
mod tunnel;

pub use tunnel::{HandshakeError, handshake};

/// `isthmus check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The control plane's namespace.
    #[arg(long, default_value = install::NAMESPACE)]
    pub namespace: String,
    /// cert-manager's namespace (where the ClusterIssuer's Secret, cert-manager and
    /// csi-driver-spiffe's approver are).
    #[arg(long, default_value = install::DEFAULT_CERT_MANAGER_NAMESPACE)]
    pub cert_manager_namespace: String,
    /// cert-manager's controller Deployment, whose arguments say whether its
    /// default approver runs.
    #[arg(long, default_value = install::CERT_MANAGER_DEPLOYMENT)]
    pub cert_manager_deployment: String,
    /// csi-driver-spiffe's approver Deployment.
    #[arg(long, default_value = install::CSI_DRIVER_APPROVER)]
    pub csi_driver_approver: String,
    /// Also check the identity files in this directory (tls.crt, tls.key, ca.crt);
    /// repeatable.
    #[arg(long, value_name = "DIR")]
    pub identity_dir: Vec<PathBuf>,
    /// A certificate with less validity left than this fails the check: cert-manager
    /// should have renewed it by then (e.g. 1h, 30m).
    #[arg(long, default_value = "1h", value_parser = crate::lab::parse_duration)]
    pub min_validity: Duration,
    /// How long each network step (API call, connect, handshake) may take.
    #[arg(long, default_value = "5s", value_parser = crate::lab::parse_duration)]
    pub timeout: Duration,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, e.g. `gateway Deployment ready`.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// On failure, what to do.
    pub hint: Option<String>,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            hint: None,
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }
}

/// Renders checks as the command prints them.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let mark = if c.ok { '✔' } else { '✘' };
        let _ = writeln!(out, "{mark} {}: {}", c.name, c.detail);
        if let Some(hint) = &c.hint {
            let _ = writeln!(out, "    hint: {hint}");
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        let _ = writeln!(out, "all {} checks passed", checks.len());
    } else {
        let _ = writeln!(out, "{failed} of {} checks failed", checks.len());
    }
    out
}

/// Runs `isthmus check`; `Ok(false)` when a check failed.
pub fn run(args: CheckArgs) -> Result<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let checks = runtime.block_on(checks(&args))?;
    print!("{}", render(&checks));
    Ok(checks.iter().all(|c| c.ok))
}

/// Every check, in order. Errors only when the cluster cannot be reached at all.
pub async fn checks(args: &CheckArgs) -> Result<Vec<Check>> {
    let (client, url) = args.kube.client().await?;
    let ns = args.namespace.as_str();
    let mut out = Vec::new();
    let t = args.timeout;

    // The API server itself: without it nothing else can be told.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "servicemirrors.linkerd.io",
        "links.multicluster.isthmus.io",
        "clustersettings.multicluster.isthmus.io",
    ] {
        let what = format!("CRD {name}");
        out.push(match timed(t, crds.get_opt(name)).await {
            Ok(Some(_)) => Check::pass(what, "installed"),
            Ok(None) => Check::fail(
                what,
                "not installed",
                "install the mesh: isthmus install --cluster NAME | kubectl apply -f -",
            ),
            Err(e) if out.is_empty() => {
                return Err(e).with_context(|| format!("reaching the API server at {url}"));
            }
            Err(e) => Check::fail(
                what,
                format!("{e:#}"),
                "check the API server and your access to it",
            ),
        });
    }

    let settings: Api<ClusterSettingsResource> = Api::namespaced(client.clone(), ns);
    out.push(cluster_settings(&settings, ns, t).await);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for (name, what) in [
        (install::CONTROLLER, "controller"),
        (install::GATEWAY, "gateway"),
    ] {
        let hint = "install the mesh: isthmus install --cluster NAME | kubectl apply -f -";
        out.push(deployment_ready(&deployments, ns, name, what, hint, t).await);
    }
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    out.push(discovery_configmap(&configmaps, ns, t).await);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    out.push(gateway_address(&services, ns, t).await);

    let cm = args.cert_manager_namespace.as_str();
    out.push(identity::csi_driver(&client, t).await);
    let cm_deployments: Api<Deployment> = Api::namespaced(client.clone(), cm);
    out.push(
        deployment_ready(
            &cm_deployments,
            cm,
            &args.csi_driver_approver,
            "csi-driver-spiffe approver",
            "install cert-manager's csi-driver-spiffe (its approver signs only a pod's own \
             ServiceAccount's SPIFFE ID), or name its Deployment with --csi-driver-approver",
            t,
        )
        .await,
    );
    out.push(
        identity::default_approver_off(&cm_deployments, cm, &args.cert_manager_deployment, t).await,
    );
    out.push(identity::no_policy_selects_issuer(&client, t).await);
    let issuer_secrets: Api<Secret> = Api::namespaced(client.clone(), cm);
    let (issuer_check, anchors) = issuer(&issuer_secrets, cm, args.min_validity, t).await;
    out.push(issuer_check);
    for dir in &args.identity_dir {
        out.push(identity_dir(dir, args.min_validity));
    }

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let links: Api<LinkResource> = Api::namespaced(client.clone(), ns);
    match timed(t, links.list(&ListParams::default())).await {
        Ok(list) if list.items.is_empty() => out.push(Check::pass(
            "links",
            "none: this cluster imports no services (isthmus link prints one)",
        )),
        Ok(list) => {
            for link in &list.items {
                out.extend(check_link(link, &secrets, ns, anchors.clone(), t).await);
            }
        }
        Err(e) => out.push(Check::fail(
            "links",
            format!("cannot list Links in {ns}: {e:#}"),
            "install the CRDs (see above) and check your access to Links",
        )),
    }

    let mirrors: Api<ServiceMirrorResource> = Api::all(client);
    match timed(t, mirrors.list(&ListParams::default())).await {
        Ok(list) if list.items.is_empty() => {
            out.push(Check::pass("service mirrors", "none"));
        }
        Ok(list) => out.extend(list.items.iter().map(mirror_status)),
        Err(e) => out.push(Check::fail(
            "service mirrors",
            format!("cannot list ServiceMirrors: {e:#}"),
            "install the CRDs (see above) and check your access to ServiceMirrors",
        )),
    }
    Ok(out)
}

/// A kube call under the check's timeout.
async fn timed<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {limit:?}"))?
        .map_err(|e| match e {
            // The API's own words, without the debug dump of the whole Status.
            kube::Error::Api(status) => anyhow::anyhow!(
                "the API server answered {} {}: {}",
                status.code,
                status.reason,
                status.message
            ),
            other => anyhow::Error::from(other),
        })
}

async fn deployment_ready(
    api: &Api<Deployment>,
    ns: &str,
    name: &str,
    what: &str,
    not_found: &str,
    t: Duration,
) -> Check {
    let check = format!("{what} Deployment {ns}/{name} ready");
    let logs =
        format!("kubectl -n {ns} describe deployment {name}; kubectl -n {ns} logs deploy/{name}");
    match timed(t, api.get_opt(name)).await {
        Ok(None) => Check::fail(check, "not found", not_found),
        Err(e) => Check::fail(check, format!("{e:#}"), "check your access to Deployments"),
        Ok(Some(d)) => {
            let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let ready = d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            let detail = format!("{ready}/{wanted} replicas ready");
            if ready >= 1 {
                Check::pass(check, detail)
            } else {
                Check::fail(
                    check,
                    detail,
                    format!("see why the pods do not start: {logs}"),
                )
            }
        }
    }
}

/// The one ClusterSettings of the control plane, with a gateway sidecars can dial.
async fn cluster_settings(api: &Api<ClusterSettingsResource>, ns: &str, t: Duration) -> Check {
    let check = format!("cluster settings in {ns}");
    let install_hint = "install the mesh: isthmus install --cluster NAME | kubectl apply -f -";
    let list = match timed(t, api.list(&ListParams::default())).await {
        Ok(list) => list.items,
        Err(e) => {
            return Check::fail(
                check,
                format!("cannot list ClusterSettings: {e:#}"),
                "install the CRDs (see above) and check your access to ClusterSettings",
            );
        }
    };
    let [settings] = list.as_slice() else {
        let names: Vec<&str> = list
            .iter()
            .filter_map(|s| s.metadata.name.as_deref())
            .collect();
        return match names.as_slice() {
            [] => Check::fail(check, "none", install_hint),
            _ => Check::fail(
                check,
                format!(
                    "{} objects ({}): the controller reads one",
                    names.len(),
                    names.join(", ")
                ),
                format!(
                    "keep the one named as the cluster: kubectl -n {ns} delete clustersettings NAME"
                ),
            ),
        };
    };
    let spec = &settings.spec;
    let Some(gateway) = &spec.gateway else {
        return Check::fail(
            check,
            format!("cluster {} has no gateway", spec.cluster_name),
            install_hint,
        );
    };
    let detail = format!(
        "cluster {}, trust domain {}, gateway {}:{}",
        spec.cluster_name, spec.trust_domain, gateway.address, gateway.port
    );
    // A DNS name (the gateway Service's) is kept resolved by each sidecar, from
    // inside the cluster: this command may not resolve it, so only an address no
    // sidecar would dial fails here, in the sidecars' words.
    if let Err(e) = GatewayHost::parse(gateway.address.as_str()) {
        return Check::fail(
            check,
            format!("{detail}: {e}"),
            "reinstall with a gateway the sidecars can dial: isthmus install --cluster NAME [--gateway-cluster-ip IP] | kubectl apply -f -",
        );
    }
    Check::pass(check, detail)
}

/// The ConfigMap the controller publishes for the proxies.
async fn discovery_configmap(api: &Api<ConfigMap>, ns: &str, t: Duration) -> Check {
    let name = install::DISCOVERY_CONFIGMAP;
    let check = format!("discovery ConfigMap {ns}/{name}");
    let hint = format!(
        "the controller publishes it once it leads: kubectl -n {ns} logs deploy/{}",
        install::CONTROLLER
    );
    match timed(t, api.get_opt(name)).await {
        Ok(None) => Check::fail(check, "not published", hint),
        Err(e) => Check::fail(check, format!("{e:#}"), "check your access to ConfigMaps"),
        Ok(Some(cm)) => {
            let keys: Vec<String> = cm.data.unwrap_or_default().into_keys().collect();
            if keys.is_empty() {
                Check::fail(check, "empty", hint)
            } else {
                Check::pass(check, format!("published ({})", keys.join(", ")))
            }
        }
    }
}

async fn gateway_address(api: &Api<Service>, ns: &str, t: Duration) -> Check {
    let check = format!("gateway Service {ns}/{} address", install::GATEWAY);
    match timed(t, api.get_opt(install::GATEWAY)).await {
        Ok(None) => Check::fail(check, "not found", "install the mesh (isthmus install)"),
        Err(e) => Check::fail(check, format!("{e:#}"), "check your access to Services"),
        Ok(Some(svc)) => match crate::link::load_balancer_address(&svc) {
            Some(address) => Check::pass(check, format!("LoadBalancer {address}")),
            None => Check::fail(
                check,
                "no LoadBalancer address",
                format!(
                    "the cluster has not given the Service an external address: check its \
                     LoadBalancer controller (kubectl -n {ns} describe svc {}), or give \
                     linked clusters a reachable address with isthmus link --gateway-address",
                    install::GATEWAY
                ),
            ),
        },
    }
}

/// How long `not_after` is from now, as text, or `Err` with the detail when it is
/// not valid for at least `min`.
fn validity(
    not_before: SystemTime,
    not_after: SystemTime,
    min: Duration,
) -> Result<String, String> {
    let now = SystemTime::now();
    let until = proxy_identity::format_rfc3339(not_after);
    if now < not_before {
        return Err(format!(
            "not valid before {}",
            proxy_identity::format_rfc3339(not_before)
        ));
    }
    match not_after.duration_since(now) {
        Err(_) => Err(format!("expired at {until}")),
        Ok(left) if left < min => Err(format!(
            "expires in {} at {until}, less than --min-validity",
            human(left)
        )),
        Ok(left) => Ok(format!("expires in {} ({until})", human(left))),
    }
}

fn human(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 3600 => format!("{} hours", s / 3600),
        s => format!("{} minutes", s / 60),
    }
}

/// PEM of `key` in a Secret's data.
fn secret_pem<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| b.0.as_slice())
        .filter(|b| !b.is_empty())
}

/// The ClusterIssuer's CA certificate: the first certificate of its Secret.
/// The ClusterIssuer's CA certificate (the first certificate of its Secret), and
/// the trust anchors (its `ca.crt`) the link handshakes verify gateways with.
async fn issuer(
    api: &Api<Secret>,
    ns: &str,
    min: Duration,
    t: Duration,
) -> (Check, Result<Arc<RootCertStore>, String>) {
    let name = install::ISSUER_SECRET;
    let check = format!("issuer Secret {ns}/{name}");
    let create = String::from(
        "create it from the cluster's issuer (isthmus identity issuer --anchor DIR --cluster NAME --out DIR): \
         isthmus install --cluster NAME --issuer DIR | kubectl apply -f -",
    );
    let no_anchors = |why: &str| Err(format!("the trust anchors are unknown: {why}"));
    let secret = match timed(t, api.get_opt(name)).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return (
                Check::fail(check, "not found", create),
                no_anchors(&format!("no Secret {ns}/{name}")),
            );
        }
        Err(e) => {
            return (
                Check::fail(check, format!("{e:#}"), "check your access to Secrets"),
                no_anchors(&format!("Secret {ns}/{name} cannot be read")),
            );
        }
    };
    let anchors = match secret_pem(&secret, "ca.crt") {
        None => no_anchors(&format!("Secret {ns}/{name} has no ca.crt")),
        Some(pem) => tunnel::anchors(pem)
            .map(Arc::new)
            .map_err(|e| format!("ca.crt of Secret {ns}/{name} {e}")),
    };
    let Some(pem) = secret_pem(&secret, "tls.crt") else {
        return (Check::fail(check, "has no tls.crt", create), anchors);
    };
    let check = match first_certificate(pem) {
        Err(detail) => Check::fail(check, detail, create),
        Ok((subject, not_before, not_after)) => match validity(not_before, not_after, min) {
            Ok(detail) => Check::pass(check, format!("{subject}, {detail}")),
            Err(detail) => Check::fail(
                check,
                format!("{subject}, {detail}"),
                format!(
                    "mint a new issuer under the same trust anchor and replace the Secret: {create}"
                ),
            ),
        },
    };
    (check, anchors)
}

/// Subject and validity of the first certificate of a PEM bundle.
fn first_certificate(pem: &[u8]) -> Result<(String, SystemTime, SystemTime), String> {
    use proxy_identity::rustls::pki_types::CertificateDer;
    use proxy_identity::rustls::pki_types::pem::PemObject as _;
    let der = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or("holds no certificate")?
        .map_err(|e| format!("is not valid PEM: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("is not parsable X.509: {e}"))?;
    let at = |t: i64| {
        u64::try_from(t)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    Ok((
        cert.subject().to_string(),
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

fn identity_dir(dir: &std::path::Path, min: Duration) -> Check {
    let check = format!("identity {}", dir.display());
    let paths = CredentialPaths::in_dir(dir);
    match Credentials::load(&paths, SystemTime::now()) {
        Err(e) => Check::fail(
            check,
            isthmus_vocab::error_chain(&e),
            "mint it again: isthmus identity leaf --issuer DIR --id spiffe://... --out DIR",
        ),
        Ok(creds) => match validity(creds.not_before(), creds.not_after(), min) {
            Ok(detail) => Check::pass(check, format!("{}, {detail}", creds.id())),
            Err(detail) => Check::fail(
                check,
                format!("{}, {detail}", creds.id()),
                "mint it again: isthmus identity leaf --issuer DIR --id spiffe://... --out DIR",
            ),
        },
    }
}

/// A Link's credentials and its gateway: reachable on the tunnel port, and
/// presenting the expected identity.
async fn check_link(
    link: &LinkResource,
    secrets: &Api<Secret>,
    ns: &str,
    anchors: Result<Arc<RootCertStore>, String>,
    t: Duration,
) -> Vec<Check> {
    let spec = &link.spec.link;
    let cluster = spec.target_cluster_name.as_str();
    let relink = format!(
        "run isthmus link --cluster {cluster} against cluster {cluster} and apply its output here"
    );
    let mut out = Vec::new();
    let check = format!("link {cluster} credentials");
    out.push(match &link.spec.credentials_secret {
        None => Check::fail(check, "the Link names no credentialsSecret", relink.clone()),
        Some(name) => match timed(t, secrets.get_opt(name)).await {
            Ok(Some(s)) if secret_pem(&s, Link::CREDENTIALS_KEY).is_some() => {
                Check::pass(check, format!("Secret {ns}/{name}"))
            }
            Ok(Some(_)) => Check::fail(
                check,
                format!("Secret {ns}/{name} has no key {}", Link::CREDENTIALS_KEY),
                relink.clone(),
            ),
            Ok(None) => Check::fail(
                check,
                format!("Secret {ns}/{name} not found"),
                relink.clone(),
            ),
            Err(e) => Check::fail(check, format!("{e:#}"), "check your access to Secrets"),
        },
    });

    let target = format!("{}:{}", spec.gateway_address, spec.gateway_port);
    let check = format!("link {cluster} gateway {target}");
    let host = spec.gateway_address.as_str();
    let roots = match anchors {
        Ok(roots) => roots,
        Err(why) => {
            out.push(Check::fail(
                check,
                format!("not checked: {why}"),
                "fix the issuer Secret (see above): its ca.crt holds the mesh's trust anchors",
            ));
            return out;
        }
    };
    let expected = match SpiffeId::parse(spec.gateway_identity.as_str()) {
        Ok(id) => id,
        Err(e) => {
            out.push(Check::fail(check, format!("gatewayIdentity: {e}"), relink));
            return out;
        }
    };
    let cluster_name = match ClusterName::parse(cluster) {
        Ok(name) => name,
        Err(e) => {
            out.push(Check::fail(
                check,
                format!("targetClusterName: {e}"),
                relink,
            ));
            return out;
        }
    };
    let reached = handshake(
        host,
        spec.gateway_port,
        roots,
        expected.clone(),
        cluster_name,
        t,
    )
    .await;
    out.push(match reached {
        Ok(addrs) => Check::pass(
            check,
            format!(
                "reached {}, presents {expected} of cluster {cluster}",
                addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Err(HandshakeError::Connect(detail)) => Check::fail(
            check,
            detail,
            format!(
                "check the Link's gatewayAddress against the gateway Service in cluster \
                 {cluster} (kubectl -n {ns} get svc {}), and that firewalls let this \
                 cluster reach port {}",
                install::GATEWAY,
                spec.gateway_port
            ),
        ),
        Err(HandshakeError::Tls(detail)) => Check::fail(
            check,
            detail,
            format!(
                "the gateway must present {expected}, issued by cluster {cluster}'s issuer, \
                 under the trust anchor this cluster trusts: check that the Link's \
                 gatewayAddress is cluster {cluster}'s gateway, that both clusters' issuers \
                 come from the same anchor, and that the Link is current ({relink})"
            ),
        ),
    });
    out
}

/// A ServiceMirror's `Mirrored` condition, with what to do for each reason.
fn mirror_status(mirror: &ServiceMirrorResource) -> Check {
    let ns = mirror.metadata.namespace.as_deref().unwrap_or("default");
    let name = mirror.metadata.name.as_deref().unwrap_or_default();
    let spec = &mirror.spec;
    let cluster = spec.cluster.as_str();
    let remote = format!(
        "{}.{}",
        spec.service.name,
        spec.service.namespace.as_deref().unwrap_or(ns)
    );
    let check = format!("service mirror {ns}/{name} ({remote} of {cluster})");
    let condition = mirror
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Mirrored"));
    let Some(c) = condition else {
        return Check::fail(
            check,
            "no status yet",
            "the controller has not reconciled it: check the controller Deployment above \
             and its logs",
        );
    };
    if c.status == ConditionStatus::True {
        return Check::pass(check, format!("mirrored: {}", c.message));
    }
    let hint = match c.reason.as_str() {
        "UnknownCluster" => format!(
            "no Link names cluster {cluster}: run isthmus link --cluster {cluster} against it \
             and apply the output in this cluster"
        ),
        "RemoteServiceNotFound" => format!(
            "cluster {cluster} has no Service {remote}: fix spec.service, or create the Service there"
        ),
        "NotExported" => format!(
            "cluster {cluster} does not export {remote}: label it there \
             (kubectl -n {} label svc {} {}=true) or install that cluster with \
             --export-namespace {}",
            spec.service.namespace.as_deref().unwrap_or(ns),
            spec.service.name,
            proxy_discovery::model::EXPORTED_LABEL,
            spec.service.namespace.as_deref().unwrap_or(ns),
        ),
        "NameConflict" => format!(
            "a Service {ns}/{} exists that this mirror does not own: rename or delete it, or \
             put the mirror in another namespace",
            spec.service.name
        ),
        "RemoteUnreachable" | "InvalidCredentials" => format!(
            "the API server of cluster {cluster} cannot be read with the Link's credentials: \
             check that it is reachable from this cluster and re-run isthmus link --cluster \
             {cluster} (the mirror keeps its last known state meanwhile)"
        ),
        "NoAddressLeft" => "the cluster's service range is full (the API server's \
             --service-cluster-ip-range): delete unused Services or widen the range"
            .to_owned(),
        other => format!("reason {other}: see the controller's logs"),
    };
    Check::fail(check, format!("{}: {}", c.reason, c.message), hint)
}
