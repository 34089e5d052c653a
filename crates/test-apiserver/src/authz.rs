//! Who is asking, and may they: bearer tokens name a user (the admin, or a
//! ServiceAccount through a TokenRequest or a legacy token Secret), and with
//! RBAC on, the Roles, ClusterRoles and their bindings stored in the server
//! decide, as kube-apiserver's RBAC authorizer does.
//!
//! What is evaluated: verbs (`get`, `list`, `watch`, `create`, `update`,
//! `patch`, `delete`, `deletecollection`, `*`), API groups, resources and
//! subresources (`services/status`, `*/status`, `*`), `resourceNames` (also
//! for a list or watch narrowed to one name by `fieldSelector=metadata.name=`),
//! and subjects of kind User, Group and ServiceAccount, with the groups every
//! ServiceAccount belongs to (`system:serviceaccounts`,
//! `system:serviceaccounts:NS`, `system:authenticated`). The admin (group
//! `system:masters`) is always allowed; discovery (`/api`, `/apis`,
//! `/version`) is open to everyone, as the default `system:discovery` and
//! `system:public-info-viewer` bindings make it.
//!
//! Not here: aggregated ClusterRoles, non-resource URL rules beyond discovery,
//! impersonation, token expiry and audiences.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};
use serde_json::json;

use crate::status::ApiError;
use crate::store::Store;

/// The group whose members are always allowed (the admin's), as on a real
/// cluster, and the name the admin token authenticates as.
const MASTERS_GROUP: &str = "system:masters";
const ADMIN_USER: &str = "kubernetes-admin";

/// A legacy ServiceAccount token Secret: its type, and the annotations naming
/// its ServiceAccount and that account's uid.
pub(crate) const TOKEN_SECRET_TYPE: &str = "kubernetes.io/service-account-token";
pub(crate) const SERVICE_ACCOUNT_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
pub(crate) const SERVICE_ACCOUNT_UID_ANNOTATION: &str = "kubernetes.io/service-account.uid";

/// An authenticated (or anonymous) caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// `kubernetes-admin`, `system:serviceaccount:NS:NAME`, `system:anonymous`.
    pub name: String,
    /// Its groups.
    pub groups: Vec<String>,
}

impl User {
    fn admin() -> Self {
        Self {
            name: ADMIN_USER.to_owned(),
            groups: vec![MASTERS_GROUP.to_owned(), "system:authenticated".to_owned()],
        }
    }

    fn anonymous() -> Self {
        Self {
            name: "system:anonymous".to_owned(),
            groups: vec!["system:unauthenticated".to_owned()],
        }
    }

    /// The user a ServiceAccount's token authenticates as.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_owned(),
            ],
        }
    }

    fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == MASTERS_GROUP)
    }
}

/// A random token: unguessable enough for a test server, and never the same
/// twice in a process.
pub(crate) fn random_token() -> String {
    let mut out = String::new();
    for _ in 0..3 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(out.len());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// A token's ServiceAccount: namespace, name and uid (empty when unknown).
type TokenOwner = (String, String, String);

/// The tokens a server has issued, and whether it enforces RBAC.
#[derive(Clone, Debug)]
pub(crate) struct Authenticator {
    admin_token: String,
    /// TokenRequest tokens and whom they name.
    issued: Arc<Mutex<BTreeMap<String, TokenOwner>>>,
    rbac: bool,
}

impl Authenticator {
    pub(crate) fn new(rbac: bool) -> Self {
        Self {
            admin_token: random_token(),
            issued: Arc::default(),
            rbac,
        }
    }

    pub(crate) fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub(crate) fn enforces_rbac(&self) -> bool {
        self.rbac
    }

    /// Issues a token for ServiceAccount `namespace/name` (404 when it does not exist).
    pub(crate) fn issue(
        &self,
        store: &Store,
        namespace: &str,
        name: &str,
    ) -> Result<String, ApiError> {
        let sa: ServiceAccount = store
            .get(Some(namespace), name)
            .ok_or_else(|| ApiError::not_found("", "serviceaccounts", name))?;
        let token = random_token();
        self.issued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                token.clone(),
                (
                    namespace.to_owned(),
                    name.to_owned(),
                    sa.metadata.uid.unwrap_or_default(),
                ),
            );
        Ok(token)
    }

    /// The caller of a request with this `Authorization` header value; 401
    /// for a token this server does not know or whose ServiceAccount is gone.
    pub(crate) fn authenticate(
        &self,
        store: &Store,
        authorization: Option<&str>,
    ) -> Result<User, ApiError> {
        let Some(header) = authorization else {
            return Ok(User::anonymous());
        };
        let token = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        if token == self.admin_token {
            return Ok(User::admin());
        }
        let issued = self
            .issued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .cloned();
        let (namespace, name, uid) = match issued {
            Some(owner) => owner,
            None => secret_token_owner(store, token).ok_or_else(ApiError::unauthorized)?,
        };
        // A token outlives nothing it was issued for: a ServiceAccount deleted
        // (or deleted and re-created) invalidates it.
        let sa: Option<ServiceAccount> = store.get(Some(&namespace), &name);
        match sa {
            Some(sa) if uid.is_empty() || sa.metadata.uid.as_deref() == Some(uid.as_str()) => {
                Ok(User::service_account(&namespace, &name))
            }
            _ => Err(ApiError::unauthorized()),
        }
    }
}

/// The ServiceAccount whose legacy token Secret holds `token`.
fn secret_token_owner(store: &Store, token: &str) -> Option<TokenOwner> {
    store.list::<Secret>(None).into_iter().find_map(|s| {
        if s.type_.as_deref() != Some(TOKEN_SECRET_TYPE) {
            return None;
        }
        let data = s.data.as_ref()?;
        if data.get("token").map(|t| t.0.as_slice()) != Some(token.as_bytes()) {
            return None;
        }
        let annotations = s.metadata.annotations.as_ref()?;
        Some((
            s.metadata.namespace.clone()?,
            annotations.get(SERVICE_ACCOUNT_NAME_ANNOTATION)?.clone(),
            annotations
                .get(SERVICE_ACCOUNT_UID_ANNOTATION)
                .cloned()
                .unwrap_or_default(),
        ))
    })
}

/// What a request asks to do, in RBAC's terms.
#[derive(Clone, Debug)]
pub(crate) struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    /// `None` at the cluster scope, or across all namespaces.
    pub namespace: Option<&'a str>,
    /// The object's name; for a list or watch, the one a field selector names.
    pub name: Option<&'a str>,
}

fn contains(list: &[String], want: &str) -> bool {
    list.iter().any(|v| v == "*" || v == want)
}

fn rule_allows(rule: &PolicyRule, a: &Attributes<'_>) -> bool {
    let resources = rule.resources.as_deref().unwrap_or_default();
    let resource_matches = resources.iter().any(|r| match a.subresource {
        None => r == "*" || r == a.resource,
        Some(sub) => r == "*" || *r == format!("{}/{sub}", a.resource) || *r == format!("*/{sub}"),
    });
    let names = rule.resource_names.as_deref().unwrap_or_default();
    contains(&rule.verbs, a.verb)
        && contains(rule.api_groups.as_deref().unwrap_or_default(), a.group)
        && resource_matches
        && (names.is_empty() || a.name.is_some_and(|n| names.iter().any(|v| v == n)))
}

fn subject_matches(subject: &Subject, binding_namespace: &str, user: &User) -> bool {
    match subject.kind.as_str() {
        "User" => subject.name == user.name,
        "Group" => user.groups.contains(&subject.name),
        "ServiceAccount" => {
            let ns = subject
                .namespace
                .as_deref()
                .filter(|ns| !ns.is_empty())
                .unwrap_or(binding_namespace);
            user.name == format!("system:serviceaccount:{ns}:{}", subject.name)
        }
        _ => false,
    }
}

fn cluster_role_rules(store: &Store, name: &str) -> Vec<PolicyRule> {
    store
        .get::<ClusterRole>(None, name)
        .and_then(|r| r.rules)
        .unwrap_or_default()
}

/// Whether RBAC grants `a` to `user`.
fn rbac_allows(store: &Store, user: &User, a: &Attributes<'_>) -> bool {
    let grants = |rules: Vec<PolicyRule>| rules.iter().any(|r| rule_allows(r, a));
    let cluster_wide = store.list::<ClusterRoleBinding>(None).into_iter().any(|b| {
        b.subjects
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|s| subject_matches(s, "", user))
            && b.role_ref.kind == "ClusterRole"
            && grants(cluster_role_rules(store, &b.role_ref.name))
    });
    if cluster_wide {
        return true;
    }
    let Some(ns) = a.namespace else {
        return false;
    };
    store.list::<RoleBinding>(Some(ns)).into_iter().any(|b| {
        if !b
            .subjects
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|s| subject_matches(s, ns, user))
        {
            return false;
        }
        let rules = match b.role_ref.kind.as_str() {
            "Role" => store
                .get::<Role>(Some(ns), &b.role_ref.name)
                .and_then(|r| r.rules)
                .unwrap_or_default(),
            "ClusterRole" => cluster_role_rules(store, &b.role_ref.name),
            _ => Vec::new(),
        };
        grants(rules)
    })
}

/// Allows `a` for `user`, or answers 403 in the real server's words.
pub(crate) fn authorize(store: &Store, user: &User, a: &Attributes<'_>) -> Result<(), ApiError> {
    if user.is_admin() || rbac_allows(store, user, a) {
        return Ok(());
    }
    let resource = match a.subresource {
        Some(sub) => format!("{}/{sub}", a.resource),
        None => a.resource.to_owned(),
    };
    let scope = match a.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    let qualified = if a.group.is_empty() {
        a.resource.to_owned()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    let object = match a
        .name
        .filter(|_| !matches!(a.verb, "list" | "watch" | "create"))
    {
        Some(name) => format!("{qualified} \"{name}\""),
        None => qualified,
    };
    let mut e = ApiError::forbidden(format!(
        "{object} is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
        user.name, a.verb, a.group
    ));
    e.details = Some(json!({
        "name": a.name.unwrap_or_default(), "group": a.group, "kind": a.resource,
    }));
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(verbs: &[&str], groups: &[&str], resources: &[&str], names: &[&str]) -> PolicyRule {
        let v = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        PolicyRule {
            verbs: v(verbs),
            api_groups: Some(v(groups)),
            resources: Some(v(resources)),
            resource_names: (!names.is_empty()).then(|| v(names)),
            non_resource_urls: None,
        }
    }

    fn attrs<'a>(verb: &'a str, resource: &'a str, sub: Option<&'a str>) -> Attributes<'a> {
        Attributes {
            verb,
            group: "",
            resource,
            subresource: sub,
            namespace: Some("ns"),
            name: Some("hello"),
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_and_names() {
        let r = rule(&["get", "watch"], &[""], &["services"], &[]);
        assert!(rule_allows(&r, &attrs("get", "services", None)));
        assert!(!rule_allows(&r, &attrs("list", "services", None)));
        assert!(!rule_allows(&r, &attrs("get", "services", Some("status"))));
        assert!(!rule_allows(&r, &attrs("get", "secrets", None)));
        let mut other_group = attrs("get", "services", None);
        other_group.group = "apps";
        assert!(!rule_allows(&r, &other_group));

        let status = rule(&["patch"], &[""], &["services/status"], &[]);
        assert!(rule_allows(
            &status,
            &attrs("patch", "services", Some("status"))
        ));
        assert!(!rule_allows(&status, &attrs("patch", "services", None)));
        let any_status = rule(&["*"], &["*"], &["*/status"], &[]);
        assert!(rule_allows(
            &any_status,
            &attrs("update", "pods", Some("status"))
        ));

        let named = rule(&["get"], &[""], &["secrets"], &["only"]);
        assert!(!rule_allows(&named, &attrs("get", "secrets", None)));
        let mut only = attrs("get", "secrets", None);
        only.name = Some("only");
        assert!(rule_allows(&named, &only));
        only.name = None;
        assert!(!rule_allows(&named, &only), "a list of all is not one name");
    }

    #[test]
    fn service_account_subjects_and_groups() {
        let sa = User::service_account("ns", "gw");
        let subject = |kind: &str, name: &str, ns: Option<&str>| Subject {
            kind: kind.to_owned(),
            name: name.to_owned(),
            namespace: ns.map(str::to_owned),
            api_group: None,
        };
        // (kind, name, subject namespace, binding namespace, matches)
        let cases = [
            ("ServiceAccount", "gw", Some("ns"), "", true),
            ("ServiceAccount", "gw", None, "ns", true),
            ("ServiceAccount", "gw", Some("other"), "", false),
            ("Group", "system:serviceaccounts:ns", None, "", true),
            ("Group", "system:authenticated", None, "", true),
            ("Group", "system:serviceaccounts:x", None, "", false),
            ("User", "system:serviceaccount:ns:gw", None, "", true),
        ];
        for (kind, name, ns, binding_ns, matches) in cases {
            assert_eq!(
                subject_matches(&subject(kind, name, ns), binding_ns, &sa),
                matches,
                "{kind} {name} {ns:?} in {binding_ns:?}"
            );
        }
    }
}
