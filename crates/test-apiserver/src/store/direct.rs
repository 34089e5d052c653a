//! Direct access to the store for tests: seed and assert without HTTP.
//! Writes here bypass admission (`.status` is kept, no managedFields are
//! recorded) but produce resourceVersions and watch events like any write;
//! deletes follow the API's rules (finalizers, garbage collection).

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{DeleteOpts, State, Store, identity, present, set_meta};
use crate::resource::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;

impl Store {
    fn put_typed(&self, rt: &ResourceType, mut obj: Value) -> Result<Value, ApiError> {
        let (ns, name) = identity(&obj);
        if name.is_empty() {
            return Err(ApiError::invalid(format!(
                "{}: metadata.name is required",
                rt.plural
            )));
        }
        if rt.namespaced && ns.is_empty() {
            return Err(ApiError::invalid(format!(
                "{} {name:?}: metadata.namespace is required for a namespaced resource",
                rt.plural
            )));
        }
        self.write(|state| {
            let key = State::key(rt, &ns, &name);
            match state.objects.get(&key).cloned() {
                None => state.create(rt, &ns, obj),
                Some(old) => {
                    for field in ["uid", "creationTimestamp"] {
                        if let Some(v) = old.pointer(&format!("/metadata/{field}")) {
                            set_meta(&mut obj, field, v.clone());
                        }
                    }
                    obj["apiVersion"] = json!(rt.api_version());
                    obj["kind"] = json!(rt.kind);
                    Ok(state.commit(&key, obj))
                }
            }
        })
        .map(|o| present(rt, &o))
    }

    /// Creates or overwrites `obj` (found by its apiVersion and kind), as a write
    /// that bypasses admission: `.status` is kept and no field manager recorded.
    pub fn put_value(&self, obj: Value) -> Result<Value, ApiError> {
        let api_version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        let rt = self.resolve_kind(api_version, kind)?;
        self.put_typed(&rt, obj)
    }

    /// Creates or overwrites a typed object; see [`Store::put_value`].
    pub fn put<K>(&self, obj: &K) -> Result<K, ApiError>
    where
        K: kube::Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let rt = self.resolve_kind(&K::api_version(&()), &K::kind(&()))?;
        let value = serde_json::to_value(obj)
            .map_err(|e| ApiError::bad_request(format!("{}: cannot serialize: {e}", rt.kind)))?;
        let stored = self.put_typed(&rt, value)?;
        decode(&rt, stored)
    }

    /// The object, if present.
    pub fn get_value(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let rt = self.resolve_kind(api_version, kind).ok()?;
        self.get_obj(&rt, namespace.unwrap_or_default(), name).ok()
    }

    /// The typed object, if present.
    pub fn get<K>(&self, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let rt = self
            .resolve_kind(&K::api_version(&()), &K::kind(&()))
            .ok()?;
        let value = self
            .get_obj(&rt, namespace.unwrap_or_default(), name)
            .ok()?;
        decode(&rt, value).ok()
    }

    /// All objects of a kind, in one namespace or (with `None`) all of them.
    pub fn list_value(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        match self.resolve_kind(api_version, kind) {
            Ok(rt) => {
                self.list_objs(
                    &rt,
                    namespace,
                    &LabelSelector::default(),
                    &FieldSelector::default(),
                )
                .0
            }
            Err(_) => Vec::new(),
        }
    }

    /// All typed objects of a kind; see [`Store::list_value`].
    pub fn list<K>(&self, namespace: Option<&str>) -> Vec<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let Ok(rt) = self.resolve_kind(&K::api_version(&()), &K::kind(&())) else {
            return Vec::new();
        };
        self.list_objs(
            &rt,
            namespace,
            &LabelSelector::default(),
            &FieldSelector::default(),
        )
        .0
        .into_iter()
        .filter_map(|v| decode(&rt, v).ok())
        .collect()
    }

    /// Deletes as the API would (finalizers and garbage collection included).
    pub fn delete_value(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let rt = self.resolve_kind(api_version, kind)?;
        self.delete(
            &rt,
            namespace.unwrap_or_default(),
            name,
            &DeleteOpts::default(),
        )
    }

    /// Deletes a typed object; see [`Store::delete_value`].
    pub fn delete_typed<K>(&self, namespace: Option<&str>, name: &str) -> Result<(), ApiError>
    where
        K: kube::Resource<DynamicType = ()>,
    {
        self.delete_value(&K::api_version(&()), &K::kind(&()), namespace, name)
            .map(drop)
    }
}

fn decode<K: DeserializeOwned>(rt: &ResourceType, value: Value) -> Result<K, ApiError> {
    serde_json::from_value(value).map_err(|e| {
        ApiError::bad_request(format!("{}: stored object does not decode: {e}", rt.kind))
    })
}
