//! Who may make a request: RBAC's attributes of a routed request (verb,
//! resource, subresource, namespace, name), checked through `authz`, and the
//! TokenRequest endpoint that hands out ServiceAccount tokens.

use std::sync::Arc;

use http::{Method, Response};
use serde_json::{Value, json};

use super::{Body, Ctx, Parsed, Target, json_response, truthy};
use crate::authz::{self, Attributes, User};
use crate::status::ApiError;
use crate::store::Store;

/// RBAC's view of the request `target` and `p` make, checked for `user`.
pub(super) fn authorize(
    store: &Store,
    user: &User,
    target: &Target,
    p: &Parsed,
) -> Result<(), ApiError> {
    let field_name = p
        .query
        .get("fieldSelector")
        .and_then(|f| f.split(',').find_map(|t| t.strip_prefix("metadata.name=")));
    let (rt, verb, ns, name, subresource) = match target {
        Target::Collection { rt, ns } => {
            let verb = match p.method {
                Method::GET if truthy(&p.query, "watch") => "watch",
                Method::GET => "list",
                Method::POST => "create",
                Method::DELETE => "deletecollection",
                _ => return Ok(()),
            };
            (rt, verb, ns.as_deref(), field_name, None)
        }
        Target::Object {
            rt,
            ns,
            name,
            status,
        } => {
            let verb = match p.method {
                Method::GET => "get",
                Method::PUT => "update",
                Method::PATCH => "patch",
                Method::DELETE => "delete",
                _ => return Ok(()),
            };
            let sub = status.then_some("status");
            (rt, verb, Some(ns.as_str()), Some(name.as_str()), sub)
        }
        Target::Token { ns, name } => {
            let attrs = Attributes {
                verb: "create",
                group: "",
                resource: "serviceaccounts",
                subresource: Some("token"),
                namespace: Some(ns),
                name: Some(name),
            };
            return authz::authorize(store, user, &attrs);
        }
        // Discovery is open to everyone.
        _ => return Ok(()),
    };
    let mut attrs = Attributes {
        verb,
        group: &rt.group,
        resource: &rt.plural,
        subresource,
        namespace: ns.filter(|ns| rt.namespaced && !ns.is_empty()),
        name,
    };
    authz::authorize(store, user, &attrs)?;
    // A server-side apply that creates the object needs `create` too, as a
    // real server checks once it finds nothing to patch.
    if verb == "patch"
        && p.content_type.starts_with("application/apply-patch")
        && let Some(name) = name
        && store.get_obj(rt, ns.unwrap_or_default(), name).is_err()
    {
        attrs.verb = "create";
        authz::authorize(store, user, &attrs)?;
    }
    Ok(())
}

/// `POST .../serviceaccounts/NAME/token`: a token that authenticates as it.
pub(super) fn token_request(
    ctx: &Arc<Ctx>,
    ns: &str,
    name: &str,
    p: &Parsed,
) -> Result<Response<Body>, ApiError> {
    if p.method != Method::POST {
        return Err(ApiError::method_not_allowed(format!(
            "{} on serviceaccounts/token {name:?}",
            p.method
        )));
    }
    let token = ctx.auth.issue(&ctx.store, ns, name)?;
    let request: Value = serde_json::from_slice(&p.body).unwrap_or(Value::Null);
    let seconds = request
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(3600);
    let expires = k8s_openapi::jiff::Timestamp::now()
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(seconds))
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
    Ok(json_response(
        201,
        &json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "audiences": request.pointer("/spec/audiences").cloned().unwrap_or(json!([])),
                "expirationSeconds": seconds,
                "boundObjectRef": request.pointer("/spec/boundObjectRef").cloned().unwrap_or(Value::Null),
            },
            "status": {
                "token": token,
                "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            },
        }),
    ))
}
