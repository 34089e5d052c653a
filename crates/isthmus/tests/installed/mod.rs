//! The in-memory API server holding what `isthmus install` rendered, and what a
//! cluster's own controllers write after it: the load balancer's address, the link
//! reader's token, ready pods. Objects are named as `apiVersion Kind
//! namespace/name`, or `apiVersion Kind name` for a cluster-scoped kind.

// Each test binary uses a subset of these.
#![allow(dead_code)]

use serde_json::{Value, json};
use test_apiserver::TestApiServer;

/// The gateway's Service as `isthmus install` renders it.
pub const GATEWAY_SERVICE: &str = "v1 Service isthmus-system/isthmus-gateway";
/// The link reader's token Secret, which the token controller fills.
pub const LINK_READER_TOKEN: &str = "v1 Secret isthmus-system/isthmus-link-reader-token";

/// `bytes` as a Secret's `data` holds them.
pub fn b64(bytes: &[u8]) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())).unwrap()
}

/// The store's address of `object` (see the module docs).
fn address(object: &str) -> (&str, &str, Option<&str>, &str) {
    let mut parts = object.split(' ');
    let (Some(api), Some(kind), Some(place), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        panic!("{object:?} is not `apiVersion Kind [namespace/]name`")
    };
    match place.split_once('/') {
        Some((ns, name)) => (api, kind, Some(ns), name),
        None => (api, kind, None, place),
    }
}

pub fn put(server: &TestApiServer, obj: Value) {
    server
        .store()
        .put_value(obj.clone())
        .unwrap_or_else(|e| panic!("putting {} {}: {e:?}", obj["kind"], obj["metadata"]["name"]));
}

pub fn get(server: &TestApiServer, object: &str) -> Value {
    let (api, kind, ns, name) = address(object);
    server.store().get_value(api, kind, ns, name).unwrap()
}

/// Deletes `object` and answers it, for the test to put back.
pub fn delete(server: &TestApiServer, object: &str) -> Value {
    let (api, kind, ns, name) = address(object);
    server.store().delete_value(api, kind, ns, name).unwrap()
}

/// Sets `field` of `object` to `value`, as the controller that owns it would.
pub fn set(server: &TestApiServer, object: &str, field: &str, value: Value) {
    let mut obj = get(server, object);
    obj[field] = value;
    put(server, obj);
}

/// The documents of `text` as JSON values, empty ones left out.
pub fn docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|de| serde::Deserialize::deserialize(de).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Puts every object of `isthmus install`'s output `text` that the test API server
/// serves: cert-manager's kinds and policy/v1 are not served there.
pub fn put_installed(server: &TestApiServer, text: &str) {
    for doc in docs(text) {
        if !["cert-manager.io/v1", "policy/v1"].contains(&doc["apiVersion"].as_str().unwrap()) {
            put(server, doc);
        }
    }
}

/// What the cluster does with the mesh's Deployments once installed: both replicas
/// of the controller and of the gateway become ready.
pub fn mesh_pods_ready(server: &TestApiServer) {
    for name in ["isthmus-controller", "isthmus-gateway"] {
        let deployment = format!("apps/v1 Deployment isthmus-system/{name}");
        set(
            server,
            &deployment,
            "status",
            json!({"replicas": 2, "readyReplicas": 2}),
        );
    }
}

/// The cloud's load balancer gives the gateway Service the address `ip`.
pub fn gateway_load_balancer(server: &TestApiServer, ip: &str) {
    let status = json!({"loadBalancer": {"ingress": [{"ip": ip}]}});
    set(server, GATEWAY_SERVICE, "status", status);
}

/// The token controller fills the link reader's Secret with `data` (base64'd).
pub fn fill_reader_token(server: &TestApiServer, data: &[(&str, &str)]) {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| ((*k).to_owned(), b64(v.as_bytes())))
        .collect();
    set(server, LINK_READER_TOKEN, "data", Value::Object(data));
}
