//! What the real server's admission and registry strategies (and the token
//! controller, at once) add to a write made through the API, hooked in before
//! the object is stored: a namespaced object needs its namespace (404
//! otherwise), Services get their ClusterIP (see `allocate`), and a legacy
//! ServiceAccount token Secret whose ServiceAccount exists is filled in
//! (`token`, `ca.crt`, `namespace`, and the ServiceAccount's uid).
//!
//! A token Secret written before its ServiceAccount stays empty: write the
//! ServiceAccount first, as `kubectl apply` of one file in order does.
//!
//! Writes through [`Store::put_value`](super::Store::put_value) and friends
//! bypass this, as their docs say.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde_json::{Value, json};

use super::{State, meta_str, set_meta};
use crate::allocate;
use crate::authz::{
    SERVICE_ACCOUNT_NAME_ANNOTATION, SERVICE_ACCOUNT_UID_ANNOTATION, TOKEN_SECRET_TYPE,
    random_token,
};
use crate::resource::ResourceType;
use crate::status::ApiError;

impl State {
    /// Admits `new` (an update of `old`, or a create) in namespace `ns`.
    pub(super) fn admit(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        old: Option<&Value>,
        new: &mut Value,
    ) -> Result<(), ApiError> {
        if rt.namespaced && old.is_none() {
            let key = State::key(&namespaces(), "", ns);
            if !self.objects.contains_key(&key) {
                let mut e = ApiError::not_found("", "namespaces", ns);
                e.details = Some(json!({"name": ns, "kind": "namespaces"}));
                return Err(e);
            }
        }
        if rt.group.is_empty() && rt.plural == "secrets" {
            self.fill_token_secret(ns, new);
        }
        if !(rt.group.is_empty() && rt.plural == "services") {
            return Ok(());
        }
        let name = meta_str(new, "name").unwrap_or_default().to_owned();
        let used: BTreeSet<IpAddr> = self
            .objects
            .iter()
            .filter(|(k, _)| k.group.is_empty() && k.plural == "services")
            .filter(|(k, _)| name.is_empty() || k.namespace != ns || k.name != name)
            .flat_map(|(_, o)| allocate::cluster_ips(o))
            .collect();
        let random = self.next_id();
        allocate::admit_service(&self.service_range, &used, old, new, random)
    }
}

fn namespaces() -> ResourceType {
    ResourceType::new("", "v1", "namespaces", "Namespace", false)
}

fn encoded(text: &str) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec())).unwrap_or(Value::Null)
}

impl State {
    /// What the token controller writes into a legacy token Secret.
    fn fill_token_secret(&mut self, ns: &str, secret: &mut Value) {
        if secret.get("type").and_then(Value::as_str) != Some(TOKEN_SECRET_TYPE) {
            return;
        }
        let Some(account) = secret
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(SERVICE_ACCOUNT_NAME_ANNOTATION))
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return;
        };
        let sa_type = ResourceType::new("", "v1", "serviceaccounts", "ServiceAccount", true);
        let Some(uid) = self
            .objects
            .get(&State::key(&sa_type, ns, &account))
            .and_then(|sa| meta_str(sa, "uid"))
            .map(str::to_owned)
        else {
            return;
        };
        let mut annotations = secret
            .pointer("/metadata/annotations")
            .cloned()
            .unwrap_or_else(|| json!({}));
        annotations[SERVICE_ACCOUNT_UID_ANNOTATION] = json!(uid);
        set_meta(secret, "annotations", annotations);
        if !secret.get("data").is_some_and(Value::is_object) {
            secret["data"] = json!({});
        }
        if secret.pointer("/data/token").is_none() {
            secret["data"]["token"] = encoded(&random_token());
        }
        secret["data"]["namespace"] = encoded(ns);
        // The server speaks plain HTTP: there is no CA to hand out.
        secret["data"]["ca.crt"] = encoded("");
    }
}
