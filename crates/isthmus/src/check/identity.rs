//! The checks of how identities are issued: csi-driver-spiffe is installed (its
//! CSIDriver and its approver), and nothing but that approver approves requests
//! for the mesh's issuer. cert-manager's default approver approves every
//! CertificateRequest; left on, anyone allowed to create one (every pod's
//! ServiceAccount may, for csi-driver-spiffe) could get any SPIFFE ID signed, the
//! gateway's included. An approver-policy `CertificateRequestPolicy` selecting the
//! issuer would be a second way around the driver's approver.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams};

use super::{Check, timed};
use crate::install;

/// The CSIDriver object the driver's chart installs.
pub(super) async fn csi_driver(client: &kube::Client, t: Duration) -> Check {
    let name = install::SPIFFE_CSI_DRIVER;
    let check = format!("CSIDriver {name}");
    let api: Api<CSIDriver> = Api::all(client.clone());
    match timed(t, api.get_opt(name)).await {
        Ok(Some(_)) => Check::pass(check, "installed"),
        Ok(None) => Check::fail(
            check,
            "not installed: pods cannot mount their identity and do not start",
            format!(
                "install cert-manager's csi-driver-spiffe for this issuer (helm --set \
                 app.issuer.name={}; the header of isthmus install's output lists every \
                 setting)",
                install::CLUSTER_ISSUER
            ),
        ),
        Err(e) => Check::fail(check, format!("{e:#}"), "check your access to CSIDrivers"),
    }
}

/// The cert-manager controller's `--controllers` list, from every container's
/// arguments (`--controllers=a,b` or `--controllers a,b`; repeated flags add up).
fn controllers(deployment: &Deployment) -> Vec<String> {
    let containers = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let mut out = Vec::new();
    for c in containers {
        let words: Vec<&String> = c.command.iter().chain(c.args.iter()).flatten().collect();
        for (i, word) in words.iter().enumerate() {
            let value = match word.strip_prefix("--controllers") {
                Some(rest) if rest.starts_with('=') => Some(&rest[1..]),
                Some("") => words.get(i + 1).map(|v| v.as_str()),
                _ => None,
            };
            out.extend(
                value
                    .into_iter()
                    .flat_map(|v| v.split(','))
                    .map(|s| s.trim().to_owned()),
            );
        }
    }
    out
}

/// cert-manager's default approver is off, read from its Deployment's arguments.
pub(super) async fn default_approver_off(
    api: &Api<Deployment>,
    ns: &str,
    name: &str,
    t: Duration,
) -> Check {
    let check = format!("cert-manager {ns}/{name} leaves approval to csi-driver-spiffe");
    let how = format!(
        "run cert-manager with --controllers=*,-certificaterequests-approver (helm: --set \
         disableAutoApproval=true), so only csi-driver-spiffe's approver signs for \
         clusterissuers.cert-manager.io/{}",
        install::CLUSTER_ISSUER
    );
    match timed(t, api.get_opt(name)).await {
        Ok(None) => Check::fail(
            check,
            "Deployment not found",
            format!(
                "install cert-manager, or name its Deployment with --cert-manager-deployment; {how}"
            ),
        ),
        Err(e) => Check::fail(check, format!("{e:#}"), "check your access to Deployments"),
        Ok(Some(d)) => {
            let list = controllers(&d);
            let off = list.iter().any(|c| c == "-certificaterequests-approver");
            let on = list.iter().any(|c| c == "certificaterequests-approver");
            if off && !on {
                Check::pass(
                    check,
                    "default approver off (--controllers has -certificaterequests-approver)",
                )
            } else {
                Check::fail(
                    check,
                    "cert-manager's default approver is on: it approves every \
                     CertificateRequest, so any ServiceAccount could be issued any SPIFFE ID, \
                     the gateway's included",
                    how,
                )
            }
        }
    }
}

/// `*` in an approver-policy selector field matches any run of characters; an
/// empty or absent field matches anything.
fn wildcard(pattern: Option<&str>, value: &str) -> bool {
    let Some(pattern) = pattern.filter(|p| !p.is_empty()) else {
        return true;
    };
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == value;
    };
    let Some(mut rest) = value.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Whether an approver-policy `CertificateRequestPolicy` (as JSON) selects the
/// mesh's ClusterIssuer: approver-policy matches a policy without
/// `selector.issuerRef` against every issuer.
fn selects_mesh_issuer(policy: &serde_json::Value) -> bool {
    let issuer = &policy["spec"]["selector"]["issuerRef"];
    if issuer.is_null() {
        return true;
    }
    wildcard(issuer["name"].as_str(), install::CLUSTER_ISSUER)
        && wildcard(issuer["kind"].as_str(), "ClusterIssuer")
        && wildcard(issuer["group"].as_str(), "cert-manager.io")
}

/// No approver-policy `CertificateRequestPolicy` selects the mesh's issuer (passes
/// when approver-policy is not installed).
pub(super) async fn no_policy_selects_issuer(client: &kube::Client, t: Duration) -> Check {
    let check = format!(
        "no approver-policy selects ClusterIssuer {}",
        install::CLUSTER_ISSUER
    );
    let resource = ApiResource {
        group: "policy.cert-manager.io".to_owned(),
        version: "v1alpha1".to_owned(),
        api_version: "policy.cert-manager.io/v1alpha1".to_owned(),
        kind: "CertificateRequestPolicy".to_owned(),
        plural: "certificaterequestpolicies".to_owned(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let list = match tokio::time::timeout(t, api.list(&ListParams::default())).await {
        Err(_) => {
            return Check::fail(
                check,
                format!("no answer within {t:?}"),
                "check the API server",
            );
        }
        Ok(Err(kube::Error::Api(status))) if status.code == 404 => {
            return Check::pass(check, "approver-policy is not installed");
        }
        Ok(Err(e)) => {
            return Check::fail(
                check,
                format!("cannot list CertificateRequestPolicies: {e}"),
                "check your access to CertificateRequestPolicies",
            );
        }
        Ok(Ok(list)) => list.items,
    };
    let selecting: Vec<String> = list
        .iter()
        .filter(|p| serde_json::to_value(p).is_ok_and(|v| selects_mesh_issuer(&v)))
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    if selecting.is_empty() {
        return Check::pass(check, format!("{} policies, none selects it", list.len()));
    }
    Check::fail(
        check,
        format!(
            "CertificateRequestPolicy {} selects it: approver-policy may approve a request \
             csi-driver-spiffe's approver denies, such as another ServiceAccount's SPIFFE ID",
            selecting.join(", ")
        ),
        format!(
            "narrow spec.selector.issuerRef of {} so it does not match ClusterIssuer {}: \
             only csi-driver-spiffe's approver may approve for it",
            selecting.join(", "),
            install::CLUSTER_ISSUER
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_as_approver_policy_does() {
        for (pattern, value, matches) in [
            (None, "isthmus-issuer", true),
            (Some(""), "isthmus-issuer", true),
            (Some("*"), "isthmus-issuer", true),
            (Some("isthmus-*"), "isthmus-issuer", true),
            (Some("*-issuer"), "isthmus-issuer", true),
            (Some("is*er"), "isthmus-issuer", true),
            (Some("isthmus-issuer"), "isthmus-issuer", true),
            (Some("other"), "isthmus-issuer", false),
            (Some("*other*"), "isthmus-issuer", false),
            (Some("isthmus-issuer-2"), "isthmus-issuer", false),
            (Some("a*a"), "a", false),
        ] {
            assert_eq!(wildcard(pattern, value), matches, "{pattern:?} {value}");
        }
    }

    #[test]
    fn the_controllers_flag_is_read_in_both_spellings() {
        let deployment = |args: &[&str]| -> Deployment {
            serde_json::from_value(serde_json::json!({
                "spec": {"selector": {}, "template": {"spec": {"containers": [
                    {"name": "cert-manager", "args": args}
                ]}}}
            }))
            .unwrap_or_default()
        };
        assert_eq!(
            controllers(&deployment(&[
                "--v=2",
                "--controllers=*,-certificaterequests-approver"
            ])),
            ["*", "-certificaterequests-approver"]
        );
        assert_eq!(
            controllers(&deployment(&[
                "--controllers",
                "-certificaterequests-approver"
            ])),
            ["-certificaterequests-approver"]
        );
        assert!(controllers(&deployment(&["--controllers-other=x"])).is_empty());
    }
}
