//! The in-memory object store: objects keyed by (group, resource, namespace,
//! name), one global resourceVersion counter, a bounded event history for
//! watches, and the write semantics of the real server (uid, generation,
//! no-op writes, `/status` scoping, CRD registration, server-side apply
//! through `apply`). Garbage collection and cascades live in `gc`; the public
//! seeding/asserting API ([`Store::put`], [`Store::get`], [`Store::list`],
//! [`Store::delete_value`] and their typed or JSON forms) in `direct`.
//!
//! Not here: HTTP, query parsing, streaming (see `server`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::allocate::ServiceRange;
use crate::apply::{self, Scope, Writer};
use crate::patch::{json_patch, merge_patch};
use crate::resource::{self, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;

/// Where an object lives.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjKey {
    group: String,
    plural: String,
    /// Empty for cluster-scoped objects.
    namespace: String,
    name: String,
}

/// What happened to an object, as a watch reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventKind {
    Added,
    Modified,
    Deleted,
}

impl EventKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// One retained event.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub kind: EventKind,
    group: String,
    plural: String,
    namespace: String,
    /// The object after the change (for a deletion: its last state).
    pub object: Value,
    /// The object before the change, so a selector watch can turn a MODIFIED
    /// that leaves or enters the selection into DELETED or ADDED.
    pub previous: Option<Value>,
}

/// How a patch body is to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Merge,
    /// Approximated by a merge patch (see the crate docs).
    StrategicMerge,
    Json,
    Apply,
}

/// Who writes, for managedFields.
pub(crate) struct WriteOpts<'a> {
    pub manager: &'a str,
    pub scope: Scope,
    /// Server-side apply only: take fields other managers own.
    pub force: bool,
    /// `dryRun=All`: answer as if written, change nothing.
    pub dry_run: bool,
}

/// `DeleteOptions` as far as the store honours them.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeleteOpts {
    /// `propagationPolicy: Orphan`: dependents are left in place.
    pub orphan: bool,
    /// `dryRun=All`.
    pub dry_run: bool,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
}

#[derive(Clone)]
struct State {
    types: Vec<ResourceType>,
    objects: BTreeMap<ObjKey, Value>,
    rv: u64,
    history: VecDeque<Event>,
    /// The newest resourceVersion dropped from `history`: a watch from before it
    /// cannot be served and gets 410 Gone.
    compacted: u64,
    history_limit: usize,
    /// For uids and generated names: unique per server, varied per process.
    counter: u64,
    seed: u64,
    /// Where Services get their ClusterIPs.
    service_range: ServiceRange,
}

/// The shared store. Cheap to clone; all clones see the same objects.
#[derive(Clone)]
pub struct Store {
    state: Arc<Mutex<State>>,
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("resource_version", &self.resource_version())
            .finish_non_exhaustive()
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// RFC 3339 UTC timestamp with second precision, as Kubernetes writes them.
pub(crate) fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"][field] = value;
}

fn remove_meta(obj: &mut Value, field: &str) {
    if let Some(Value::Object(meta)) = obj.get_mut("metadata") {
        meta.remove(field);
    }
}

fn has_finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

/// The object without what changes on every write, to detect no-op writes.
fn comparable(obj: &Value) -> Value {
    let mut o = obj.clone();
    remove_meta(&mut o, "resourceVersion");
    if let Some(Value::Array(entries)) = o.pointer_mut("/metadata/managedFields") {
        for e in entries {
            if let Value::Object(e) = e {
                e.remove("time");
            }
        }
    }
    o
}

/// A Secret's `stringData` is write-only: the server folds it into `data`
/// (base64), where it wins over a key of the same name.
fn fold_string_data(secret: &mut Value) {
    let Some(Value::Object(string_data)) =
        secret.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return;
    };
    if !secret.get("data").is_some_and(Value::is_object) {
        secret["data"] = json!({});
    }
    for (k, v) in string_data {
        let text = v
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string());
        let encoded =
            serde_json::to_value(k8s_openapi::ByteString(text.into_bytes())).unwrap_or(Value::Null);
        secret["data"][k] = encoded;
    }
}

/// Everything but metadata and status: a change here bumps the generation.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Value::Object(map) = &mut o {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            map.remove(k);
        }
    }
    o
}

/// `obj` as served through `rt` (its apiVersion and kind).
pub(crate) fn present(rt: &ResourceType, obj: &Value) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(rt.api_version());
    o["kind"] = json!(rt.kind);
    o
}

impl State {
    fn key(rt: &ResourceType, namespace: &str, name: &str) -> ObjKey {
        ObjKey {
            group: rt.group.clone(),
            plural: rt.plural.clone(),
            namespace: if rt.namespaced {
                namespace.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        }
    }

    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        splitmix(self.seed ^ self.counter)
    }

    fn uid(&mut self) -> String {
        let a = self.next_id();
        let b = self.next_id();
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }

    fn generated_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut x = self.next_id();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
                x /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    fn record(&mut self, kind: EventKind, key: &ObjKey, object: Value, previous: Option<Value>) {
        self.history.push_back(Event {
            rv: self.rv,
            kind,
            group: key.group.clone(),
            plural: key.plural.clone(),
            namespace: key.namespace.clone(),
            object,
            previous,
        });
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
    }

    /// Stores `new` under `key` as the next resourceVersion, or removes it when
    /// it is being deleted and no finalizer holds it. A write that changes
    /// nothing is a no-op: no new resourceVersion, no event.
    fn commit(&mut self, key: &ObjKey, mut new: Value) -> Value {
        if key.group.is_empty() && key.plural == "secrets" {
            fold_string_data(&mut new);
        }
        let old = self.objects.get(key).cloned();
        if let Some(old) = &old {
            if comparable(old) == comparable(&new) {
                return old.clone();
            }
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let bumped = if spec_part(old) != spec_part(&new) {
                generation + 1
            } else {
                generation
            };
            set_meta(&mut new, "generation", json!(bumped));
        }
        self.rv += 1;
        set_meta(&mut new, "resourceVersion", json!(self.rv.to_string()));
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
        if deleting && !has_finalizers(&new) {
            self.objects.remove(key);
            self.record(EventKind::Deleted, key, new.clone(), old);
            self.after_removal(key, &new);
            return new;
        }
        self.objects.insert(key.clone(), new.clone());
        let kind = if old.is_some() {
            EventKind::Modified
        } else {
            EventKind::Added
        };
        self.record(kind, key, new.clone(), old);
        if key.group == "apiextensions.k8s.io" && key.plural == "customresourcedefinitions" {
            self.register_crd(&new);
        }
        new
    }

    fn register_crd(&mut self, crd: &Value) {
        for t in resource::from_crd(crd).unwrap_or_default() {
            self.types
                .retain(|e| !(e.same_resource(&t.group, &t.plural) && e.version == t.version));
            self.types.push(t);
        }
    }

    /// Fills what the server sets on create and stores the object.
    fn create(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(format!(
                "{}: the body is not a JSON object",
                rt.plural
            )));
        }
        let mut name = meta_str(&obj, "name").unwrap_or_default().to_owned();
        if name.is_empty() {
            let Some(prefix) = meta_str(&obj, "generateName").map(str::to_owned) else {
                return Err(ApiError::invalid(format!(
                    "{}: metadata.name or metadata.generateName is required",
                    rt.plural
                )));
            };
            loop {
                name = format!("{prefix}{}", self.generated_suffix());
                if !self.objects.contains_key(&Self::key(rt, namespace, &name)) {
                    break;
                }
            }
            set_meta(&mut obj, "name", json!(name));
        }
        let key = Self::key(rt, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(&rt.group, &rt.plural, &name));
        }
        if rt.namespaced {
            set_meta(&mut obj, "namespace", json!(namespace));
        } else {
            remove_meta(&mut obj, "namespace");
        }
        let uid = self.uid();
        set_meta(&mut obj, "uid", json!(uid));
        set_meta(&mut obj, "creationTimestamp", json!(now_rfc3339()));
        set_meta(&mut obj, "generation", json!(1));
        remove_meta(&mut obj, "deletionTimestamp");
        remove_meta(&mut obj, "resourceVersion");
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        if rt.group.is_empty() && rt.plural == "namespaces" {
            obj["status"] = json!({"phase": "Active"});
        }
        if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
            let names = obj.pointer("/spec/names").cloned().unwrap_or(json!({}));
            let now = now_rfc3339();
            obj["status"] = json!({
                "acceptedNames": names,
                "storedVersions": obj.pointer("/spec/versions").and_then(Value::as_array)
                    .map(|vs| vs.iter().filter_map(|v| v.get("name").cloned()).collect::<Vec<_>>())
                    .unwrap_or_default(),
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": now},
                ],
            });
        }
        Ok(self.commit(&key, obj))
    }
}

impl State {
    /// A non-apply update of the stored `old` to `new`, written through
    /// `writer`'s scope: admission, managedFields, commit and collection.
    fn update(
        &mut self,
        rt: &ResourceType,
        old: &Value,
        new: Value,
        writer: &Writer<'_>,
    ) -> Result<Value, ApiError> {
        let (ns, name) = identity(old);
        let key = &State::key(rt, &ns, &name);
        let mut new = Store::scoped_result(rt, writer.scope, old, new);
        Store::check_finalizers(rt, &name, old, &new)?;
        self.admit(rt, &ns, Some(old), &mut new)?;
        let mut entries = apply::read_managed(old);
        apply::record_update(&mut entries, writer, Some(old), &new);
        apply::write_managed(&mut new, &entries);
        let written = self.commit(key, new);
        self.collect_if_orphaned(&written);
        Ok(present(rt, &written))
    }
}

/// The object `rt` type names in messages and the store key of `obj`.
fn identity(obj: &Value) -> (String, String) {
    (
        meta_str(obj, "namespace").unwrap_or_default().to_owned(),
        meta_str(obj, "name").unwrap_or_default().to_owned(),
    )
}

impl Store {
    pub(crate) fn new(
        extra: Vec<ResourceType>,
        history_limit: usize,
        service_range: ServiceRange,
    ) -> Self {
        let mut types = resource::builtin();
        for t in extra {
            types.retain(|e| !(e.same_resource(&t.group, &t.plural) && e.version == t.version));
            types.push(t);
        }
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id());
        let (changes, _) = watch::channel(0);
        Self {
            state: Arc::new(Mutex::new(State {
                types,
                objects: BTreeMap::new(),
                rv: 0,
                history: VecDeque::new(),
                compacted: 0,
                history_limit: history_limit.max(1),
                counter: 0,
                seed,
                service_range,
            })),
            changes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every write leaves the state consistent before it can panic, so a
        // poisoned lock still guards usable data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a write and wakes watchers.
    fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.lock();
        let out = f(&mut state);
        let rv = state.rv;
        drop(state);
        self.changes.send_if_modified(|current| {
            let changed = *current != rv;
            *current = rv;
            changed
        });
        out
    }

    /// Runs a write, or with `dry_run` runs it on a copy that is then dropped.
    fn write_or_try<T>(&self, dry_run: bool, f: impl FnOnce(&mut State) -> T) -> T {
        if dry_run {
            let mut copy = self.lock().clone();
            return f(&mut copy);
        }
        self.write(f)
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Makes a type servable (replacing one with the same group, plural and version).
    pub fn register(&self, rt: ResourceType) {
        let mut state = self.lock();
        state
            .types
            .retain(|e| !(e.same_resource(&rt.group, &rt.plural) && e.version == rt.version));
        state.types.push(rt);
    }

    /// Every servable type.
    pub fn types(&self) -> Vec<ResourceType> {
        self.lock().types.clone()
    }

    pub(crate) fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock()
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    fn resolve_kind(&self, api_version: &str, kind: &str) -> Result<ResourceType, ApiError> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.lock()
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.kind == kind)
            .cloned()
            .ok_or_else(|| {
                ApiError::no_route(&format!(
                    "no resource serves apiVersion {api_version:?} kind {kind:?}"
                ))
            })
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    // ---- REST verbs (used by the server) ----

    pub(crate) fn get_obj(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let state = self.lock();
        state
            .objects
            .get(&State::key(rt, ns, name))
            .map(|o| present(rt, o))
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))
    }

    /// Matching objects in key order, and the resourceVersion they are consistent with.
    pub(crate) fn list_objs(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Value>, u64) {
        let state = self.lock();
        let items = state
            .objects
            .iter()
            .filter(|(k, _)| k.group == rt.group && k.plural == rt.plural)
            .filter(|(k, _)| ns.is_none_or(|ns| k.namespace == ns))
            .filter(|(_, o)| labels.matches(o) && fields.matches(o))
            .map(|(_, o)| present(rt, o))
            .collect();
        (items, state.rv)
    }

    /// Events of `rt` (in `ns`, if given) after `rv`, or 410 when some were dropped.
    pub(crate) fn events_after(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        rv: u64,
    ) -> Result<(Vec<Event>, u64), ApiError> {
        let state = self.lock();
        if rv < state.compacted {
            return Err(ApiError::gone(rv, state.compacted + 1));
        }
        let events = state
            .history
            .iter()
            .filter(|e| e.rv > rv)
            .filter(|e| e.group == rt.group && e.plural == rt.plural)
            .filter(|e| ns.is_none_or(|ns| e.namespace == ns))
            .cloned()
            .collect();
        Ok((events, state.rv))
    }

    pub(crate) fn create(
        &self,
        rt: &ResourceType,
        ns: &str,
        body: Value,
        opts: &WriteOpts<'_>,
    ) -> Result<Value, ApiError> {
        let (body_ns, _) = identity(&body);
        if rt.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(format!(
                "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
            )));
        }
        let mut obj = if rt.status_subresource {
            Scope::Main {
                status_subresource: true,
            }
            .filter(&body)
        } else {
            body
        };
        let mut entries = Vec::new();
        apply::record_update(&mut entries, &writer(rt, opts), None, &obj);
        apply::write_managed(&mut obj, &entries);
        self.write_or_try(opts.dry_run, |state| {
            state.admit(rt, ns, None, &mut obj)?;
            let created = state.create(rt, ns, obj)?;
            state.collect_if_orphaned(&created);
            Ok(created)
        })
        .map(|o| present(rt, &o))
    }

    /// The object after a write through `scope`: the parts outside it come from `old`.
    fn scoped_result(rt: &ResourceType, scope: Scope, old: &Value, mut new: Value) -> Value {
        match scope {
            Scope::Main { .. } if rt.status_subresource => match old.get("status") {
                Some(status) => new["status"] = status.clone(),
                None => {
                    if let Value::Object(map) = &mut new {
                        map.remove("status");
                    }
                }
            },
            Scope::Main { .. } => {}
            Scope::Status => {
                let status = new.get("status").cloned();
                new = old.clone();
                match status {
                    Some(status) => new["status"] = status,
                    None => {
                        if let Value::Object(map) = &mut new {
                            map.remove("status");
                        }
                    }
                }
            }
        }
        // What the server owns never comes from the client.
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
            "name",
            "namespace",
        ] {
            match old.pointer(&format!("/metadata/{field}")) {
                Some(v) => set_meta(&mut new, field, v.clone()),
                None => remove_meta(&mut new, field),
            }
        }
        new
    }

    /// Once deletion started, finalizers may only be removed, not added (the
    /// real server's metadata validation).
    fn check_finalizers(
        rt: &ResourceType,
        name: &str,
        old: &Value,
        new: &Value,
    ) -> Result<(), ApiError> {
        if old.pointer("/metadata/deletionTimestamp").is_none() {
            return Ok(());
        }
        let list = |o: &Value| -> Vec<Value> {
            o.pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let before = list(old);
        match list(new).into_iter().find(|f| !before.contains(f)) {
            Some(added) => Err(ApiError::invalid(format!(
                "{} {name:?}: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizer {added}",
                rt.plural
            ))),
            None => Ok(()),
        }
    }

    pub(crate) fn replace(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: Value,
        opts: &WriteOpts<'_>,
    ) -> Result<Value, ApiError> {
        let (_, body_name) = identity(&body);
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        self.write_or_try(opts.dry_run, |state| {
            let key = State::key(rt, ns, name);
            let old = state
                .objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
            if let Some(rv) = meta_str(&body, "resourceVersion").filter(|rv| !rv.is_empty())
                && Some(rv) != meta_str(&old, "resourceVersion")
            {
                return Err(ApiError::stale(&rt.group, &rt.plural, name));
            }
            let mut new = body;
            new["apiVersion"] = json!(rt.api_version());
            new["kind"] = json!(rt.kind);
            state.update(rt, &old, new, &writer(rt, opts))
        })
    }

    pub(crate) fn patch(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: Value,
        opts: &WriteOpts<'_>,
    ) -> Result<Value, ApiError> {
        self.write_or_try(opts.dry_run, |state| {
            let key = State::key(rt, ns, name);
            let old = state.objects.get(&key).cloned();
            let writer = writer(rt, opts);
            if kind == PatchKind::Apply {
                let api_version = body.get("apiVersion").and_then(Value::as_str);
                let body_kind = body.get("kind").and_then(Value::as_str);
                if api_version != Some(rt.api_version().as_str()) || body_kind != Some(rt.kind.as_str()) {
                    return Err(ApiError::bad_request(format!(
                        "apply to {} {name:?}: apiVersion and kind must be {:?} and {:?}, not {:?} and {:?}",
                        rt.plural,
                        rt.api_version(),
                        rt.kind,
                        api_version.unwrap_or_default(),
                        body_kind.unwrap_or_default()
                    )));
                }
                let (body_ns, body_name) = identity(&body);
                if !body_name.is_empty() && body_name != name {
                    return Err(ApiError::bad_request(format!(
                        "apply: metadata.name ({body_name}) does not match the name on the URL ({name})"
                    )));
                }
                if rt.namespaced && !body_ns.is_empty() && body_ns != ns {
                    return Err(ApiError::bad_request(format!(
                        "apply: metadata.namespace ({body_ns}) does not match the namespace on the URL ({ns})"
                    )));
                }
                let applied = opts.scope.filter(&body);
                let base = match &old {
                    Some(o) => o.clone(),
                    None if opts.scope == Scope::Status => {
                        return Err(ApiError::not_found(&rt.group, &rt.plural, name));
                    }
                    None => json!({"metadata": {"name": name}}),
                };
                let mut entries = apply::read_managed(&base);
                let merged = apply::apply(&base, &applied, &mut entries, &writer, opts.force)
                    .map_err(|c| ApiError::apply_conflict(&rt.group, &rt.plural, name, &c))?;
                let written = match old {
                    Some(old) => {
                        // managedFields go on after scoping: a /status write
                        // starts from the old object, metadata included.
                        let mut new = Self::scoped_result(rt, opts.scope, &old, merged);
                        Self::check_finalizers(rt, name, &old, &new)?;
                        state.admit(rt, ns, Some(&old), &mut new)?;
                        apply::write_managed(&mut new, &entries);
                        state.commit(&key, new)
                    }
                    None => {
                        let mut new = merged;
                        apply::write_managed(&mut new, &entries);
                        state.admit(rt, ns, None, &mut new)?;
                        state.create(rt, ns, new)?
                    }
                };
                state.collect_if_orphaned(&written);
                return Ok(present(rt, &written));
            }
            let old = old.ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
            let mut patched = old.clone();
            match kind {
                PatchKind::Json => json_patch(&mut patched, &body)?,
                _ => {
                    if !body.is_object() {
                        return Err(ApiError::bad_request(format!(
                            "merge patch of {} {name:?}: the body is not a JSON object",
                            rt.plural
                        )));
                    }
                    merge_patch(&mut patched, &body)
                }
            }
            // A resourceVersion in the patch is a precondition.
            if meta_str(&patched, "resourceVersion") != meta_str(&old, "resourceVersion") {
                return Err(ApiError::stale(&rt.group, &rt.plural, name));
            }
            state.update(rt, &old, patched, &writer)
        })
    }

    pub(crate) fn delete(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Value, ApiError> {
        self.write_or_try(opts.dry_run, |state| {
            let key = State::key(rt, ns, name);
            let current = state
                .objects
                .get(&key)
                .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
            for (field, expected) in [
                ("uid", &opts.uid),
                ("resourceVersion", &opts.resource_version),
            ] {
                if let Some(expected) = expected
                    && meta_str(current, field) != Some(expected.as_str())
                {
                    return Err(ApiError::precondition(
                        &rt.group,
                        &rt.plural,
                        name,
                        field,
                        expected,
                        meta_str(current, field).unwrap_or_default(),
                    ));
                }
            }
            state
                .delete_key(&key, opts.orphan)
                .map(|o| present(rt, &o))
                .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))
        })
    }
}

fn writer<'a>(rt: &ResourceType, opts: &WriteOpts<'a>) -> Writer<'a> {
    Writer {
        manager: opts.manager,
        api_version: rt.api_version(),
        time: now_rfc3339(),
        scope: opts.scope,
    }
}

mod admission;
mod direct;
mod gc;

#[cfg(test)]
mod tests;
