//! What kube-controller-manager does after a deletion, done at once:
//! finalizers hold an object (it is only marked), owner references take
//! dependents along (background propagation; `Orphan` leaves them), a deleted
//! namespace or CRD takes what is in it, and an object written with only dead
//! owners is collected.
//!
//! Not here: deciding whether a write is allowed (see the parent module).

use serde_json::{Value, json};

use super::{EventKind, ObjKey, State, has_finalizers, identity, meta_str, now_rfc3339, set_meta};

/// The uids of `obj`'s owners.
fn owner_uids(obj: &Value) -> Vec<&str> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

impl State {
    /// Starts deletion: removes the object, or marks it when finalizers hold it.
    pub(super) fn delete_key(&mut self, key: &ObjKey, orphan: bool) -> Option<Value> {
        let mut obj = self.objects.get(key)?.clone();
        if has_finalizers(&obj) {
            if obj.pointer("/metadata/deletionTimestamp").is_none() {
                set_meta(&mut obj, "deletionTimestamp", json!(now_rfc3339()));
                set_meta(&mut obj, "deletionGracePeriodSeconds", json!(0));
                return Some(self.commit(key, obj));
            }
            return Some(obj);
        }
        self.rv += 1;
        set_meta(&mut obj, "resourceVersion", json!(self.rv.to_string()));
        self.objects.remove(key);
        self.record(EventKind::Deleted, key, obj.clone(), None);
        if orphan {
            self.after_crd_or_namespace_removal(key);
        } else {
            self.after_removal(key, &obj);
        }
        Some(obj)
    }

    /// What kube-controller-manager would do after an object is gone.
    pub(super) fn after_removal(&mut self, key: &ObjKey, removed: &Value) {
        self.after_crd_or_namespace_removal(key);
        let Some(uid) = meta_str(removed, "uid") else {
            return;
        };
        // Background propagation: a dependent goes once none of its owners exists.
        let live_uids: std::collections::BTreeSet<String> = self
            .objects
            .values()
            .filter_map(|o| meta_str(o, "uid").map(str::to_owned))
            .collect();
        let orphans: Vec<ObjKey> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                let owners = owner_uids(o);
                owners.contains(&uid) && owners.iter().all(|u| !live_uids.contains(*u))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in orphans {
            self.delete_key(&k, false);
        }
    }

    /// What the garbage collector does with an object written through the API
    /// whose owners are all gone (say, re-created by a controller that had not
    /// yet seen its owner's deletion): it deletes it. The write itself succeeds.
    pub(super) fn collect_if_orphaned(&mut self, written: &Value) {
        let owners = owner_uids(written);
        if owners.is_empty() {
            return;
        }
        let live = self
            .objects
            .values()
            .filter_map(|o| meta_str(o, "uid"))
            .any(|uid| owners.contains(&uid));
        if live {
            return;
        }
        let Some(rt) = written
            .get("apiVersion")
            .and_then(Value::as_str)
            .zip(written.get("kind").and_then(Value::as_str))
            .and_then(|(api_version, kind)| {
                let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
                self.types
                    .iter()
                    .find(|t| t.group == group && t.version == version && t.kind == kind)
                    .cloned()
            })
        else {
            return;
        };
        let (ns, name) = identity(written);
        self.delete_key(&Self::key(&rt, &ns, &name), false);
    }

    pub(super) fn after_crd_or_namespace_removal(&mut self, key: &ObjKey) {
        let doomed: Vec<ObjKey> = if key.group.is_empty() && key.plural == "namespaces" {
            self.objects
                .keys()
                .filter(|k| k.namespace == key.name)
                .cloned()
                .collect()
        } else if key.group == "apiextensions.k8s.io" && key.plural == "customresourcedefinitions" {
            // A CRD is named `<plural>.<group>`.
            let Some((plural, group)) = key.name.split_once('.') else {
                return;
            };
            self.types.retain(|t| !t.same_resource(group, plural));
            self.objects
                .keys()
                .filter(|k| k.group == group && k.plural == plural)
                .cloned()
                .collect()
        } else {
            return;
        };
        for k in doomed {
            if let Some(mut obj) = self.objects.remove(&k) {
                self.rv += 1;
                set_meta(&mut obj, "resourceVersion", json!(self.rv.to_string()));
                self.record(EventKind::Deleted, &k, obj.clone(), None);
                self.after_removal(&k, &obj);
            }
        }
    }
}
