//! Field ownership for server-side apply: `metadata.managedFields` (FieldsV1),
//! conflicts between managers, and removal of fields a manager stops applying.
//!
//! A field is a path of map keys and, inside the lists a real server merges by
//! key ([`listmap`]: Service ports, containers, their ports and env), of
//! elements named as FieldsV1 names them (`k:{"port":80,"protocol":"TCP"}`):
//! managers own such elements field by field, two managers applying different
//! elements both keep theirs, and a manager that stops applying an element
//! removes it unless someone else owns a field of it. Approximations, on
//! purpose: every other list is atomic (owned and compared whole), and `v:`/`i:`
//! entries in managedFields written by someone else are read as ownership of
//! the whole list. Non-apply writes (create, update, patch) record an `Update`
//! entry for the fields they changed and take those fields from other
//! managers, as the real server does.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::listmap::{self, is_element};

/// A field: the map keys leading to it from the object's root.
pub(crate) type FieldPath = Vec<String>;

/// Which part of the object a write may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The main resource; `.status` is excluded when the type has a status subresource.
    Main { status_subresource: bool },
    /// The `/status` subresource: only `.status`.
    Status,
}

impl Scope {
    pub(crate) fn subresource(self) -> Option<&'static str> {
        match self {
            Scope::Main { .. } => None,
            Scope::Status => Some("status"),
        }
    }

    /// The part of `obj` this scope may write.
    pub(crate) fn filter(self, obj: &Value) -> Value {
        let mut out = Map::new();
        if let Value::Object(map) = obj {
            for (k, v) in map {
                let keep = match self {
                    Scope::Main { status_subresource } => !(status_subresource && k == "status"),
                    Scope::Status => k == "status",
                };
                if keep {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        Value::Object(out)
    }
}

/// One entry of `metadata.managedFields`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ManagedEntry {
    pub manager: String,
    pub operation: String,
    pub subresource: Option<String>,
    pub api_version: String,
    pub time: String,
    pub fields: BTreeSet<FieldPath>,
}

/// Metadata fields the server owns; they are never in anyone's field set.
const SERVER_METADATA: [&str; 10] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The leaf fields `obj` sets within `scope`: every non-map value, and every empty map.
pub(crate) fn leaves(obj: &Value, scope: Scope) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    let Value::Object(map) = scope.filter(obj) else {
        return out;
    };
    for (k, v) in &map {
        if k == "apiVersion" || k == "kind" {
            continue;
        }
        if k == "metadata" {
            if let Value::Object(meta) = v {
                for (mk, mv) in meta {
                    if !SERVER_METADATA.contains(&mk.as_str()) {
                        collect(kind(obj), mv, vec![k.clone(), mk.clone()], &mut out);
                    }
                }
            }
            continue;
        }
        collect(kind(obj), v, vec![k.clone()], &mut out);
    }
    out
}

fn kind(obj: &Value) -> &str {
    obj.get("kind").and_then(Value::as_str).unwrap_or_default()
}

fn collect(kind: &str, v: &Value, path: FieldPath, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                let mut p = path.clone();
                p.push(k.clone());
                collect(kind, child, p, out);
            }
        }
        Value::Array(items) => match listmap::segments(kind, &path, items) {
            Some(segments) => {
                for (item, segment) in items.iter().zip(segments) {
                    let mut p = path.clone();
                    p.push(segment);
                    collect(kind, item, p, out);
                }
            }
            None => {
                out.insert(path);
            }
        },
        _ => {
            out.insert(path);
        }
    }
}

pub(crate) fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut at = obj;
    for segment in path {
        at = match at {
            Value::Array(items) if is_element(segment) => &items[listmap::find(items, segment)?],
            _ => at.get(segment)?,
        };
    }
    Some(at)
}

/// Removes the field (or list element), then any map it leaves empty below
/// the top level.
fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = &mut *obj;
    for segment in parents {
        let index = match &*at {
            Value::Array(items) if is_element(segment) => Some(listmap::find(items, segment)),
            _ => None,
        };
        let next = match index {
            Some(i) => i.and_then(|i| at.get_mut(i)),
            None => at.get_mut(segment),
        };
        match next {
            Some(next) => at = next,
            None => return,
        }
    }
    match at {
        Value::Object(map) => {
            map.remove(last);
        }
        Value::Array(items) if is_element(last) => {
            if let Some(i) = listmap::find(items, last) {
                items.remove(i);
            }
        }
        _ => {}
    }
    if parents.len() >= 2
        && value_at(obj, parents).is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
    {
        remove_at(obj, parents);
    }
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Whether applying leaf `p` writes over `q`: an applied empty map merges into
/// what is there and so does not write over the fields below it.
fn touches(p: &[String], q: &[String], applied: &Value) -> bool {
    if p.starts_with(q) {
        return true;
    }
    q.starts_with(p)
        && !value_at(applied, p).is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
}

/// `.spec.ports[port=80,protocol="TCP"].targetPort`, as the real server names
/// fields in conflicts.
pub(crate) fn display(path: &[String]) -> String {
    path.iter()
        .map(|s| match is_element(s) {
            true => listmap::display(s),
            false => format!(".{s}"),
        })
        .collect()
}

fn decode(map: &Map<String, Value>, prefix: &FieldPath, out: &mut BTreeSet<FieldPath>) {
    if map.is_empty() && !prefix.is_empty() {
        out.insert(prefix.clone());
    }
    for (k, v) in map {
        if let Some(field) = k.strip_prefix("f:") {
            let mut p = prefix.clone();
            p.push(field.to_owned());
            match v {
                Value::Object(child) => decode(child, &p, out),
                _ => {
                    out.insert(p);
                }
            }
        } else if is_element(k) && !prefix.is_empty() {
            let mut p = prefix.clone();
            p.push(k.clone());
            match v {
                // An element with fields of its own owned: those fields.
                Value::Object(child) if child.keys().any(|f| f != ".") => decode(child, &p, out),
                _ => {
                    out.insert(p);
                }
            }
        } else if k != "." && !prefix.is_empty() {
            // v:/i: keys address elements of lists kept atomic here.
            out.insert(prefix.clone());
        }
    }
}

fn encode(fields: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut at = &mut root;
        for segment in path {
            let key = match is_element(segment) {
                true => segment.clone(),
                false => format!("f:{segment}"),
            };
            let entry = at.entry(key).or_insert_with(|| Value::Object(Map::new()));
            if let (true, Value::Object(element)) = (is_element(segment), &mut *entry) {
                element.insert(".".to_owned(), Value::Object(Map::new()));
            }
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            match entry {
                Value::Object(next) => at = next,
                _ => break,
            }
        }
    }
    Value::Object(root)
}

/// The entries of `obj`'s `metadata.managedFields` (FieldsV1 only).
pub(crate) fn read_managed(obj: &Value) -> Vec<ManagedEntry> {
    let Some(entries) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    let text = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned);
    entries
        .iter()
        .filter_map(|e| {
            let mut fields = BTreeSet::new();
            if let Some(Value::Object(map)) = e.get("fieldsV1") {
                decode(map, &Vec::new(), &mut fields);
            }
            Some(ManagedEntry {
                manager: text(e, "manager")?,
                operation: text(e, "operation").unwrap_or_else(|| "Update".to_owned()),
                subresource: text(e, "subresource"),
                api_version: text(e, "apiVersion").unwrap_or_default(),
                time: text(e, "time").unwrap_or_default(),
                fields,
            })
        })
        .collect()
}

/// Writes `entries` as `metadata.managedFields` (removed when empty).
pub(crate) fn write_managed(obj: &mut Value, entries: &[ManagedEntry]) {
    let rendered: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": encode(&e.fields),
            });
            if let Some(sub) = &e.subresource {
                v["subresource"] = json!(sub);
            }
            v
        })
        .collect();
    if let Some(Value::Object(meta)) = obj.get_mut("metadata") {
        if rendered.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".to_owned(), Value::Array(rendered));
        }
    }
}

/// Drops owned paths that no longer exist in `obj`, then entries left empty.
pub(crate) fn prune(entries: &mut Vec<ManagedEntry>, obj: &Value) {
    for e in entries.iter_mut() {
        e.fields.retain(|p| value_at(obj, p).is_some());
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// Who is writing, and when.
pub(crate) struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: String,
    pub time: String,
    pub scope: Scope,
}

fn entry_mut<'e>(
    entries: &'e mut Vec<ManagedEntry>,
    writer: &Writer<'_>,
    operation: &str,
) -> &'e mut ManagedEntry {
    let subresource = writer.scope.subresource().map(str::to_owned);
    let position = entries.iter().position(|e| {
        e.manager == writer.manager && e.operation == operation && e.subresource == subresource
    });
    let index = match position {
        Some(i) => i,
        None => {
            entries.push(ManagedEntry {
                manager: writer.manager.to_owned(),
                operation: operation.to_owned(),
                subresource,
                api_version: writer.api_version.clone(),
                time: writer.time.clone(),
                fields: BTreeSet::new(),
            });
            entries.len() - 1
        }
    };
    let entry = &mut entries[index];
    entry.api_version.clone_from(&writer.api_version);
    entry.time.clone_from(&writer.time);
    entry
}

/// Records a non-apply write from `old` to `new`: the writer takes every field it changed.
pub(crate) fn record_update(
    entries: &mut Vec<ManagedEntry>,
    writer: &Writer<'_>,
    old: Option<&Value>,
    new: &Value,
) {
    let changed: BTreeSet<FieldPath> = leaves(new, writer.scope)
        .into_iter()
        .filter(|p| old.and_then(|o| value_at(o, p)) != value_at(new, p))
        .collect();
    if !changed.is_empty() {
        for e in entries.iter_mut() {
            e.fields.retain(|q| !changed.iter().any(|p| overlaps(p, q)));
        }
        entry_mut(entries, writer, "Update").fields.extend(changed);
    }
    prune(entries, new);
}

/// Server-side apply of `applied` (already limited to the writer's scope) over
/// `current`. On success the merged object is returned and `entries` updated;
/// on conflict, the (manager, field) pairs are returned and nothing changes.
pub(crate) fn apply(
    current: &Value,
    applied: &Value,
    entries: &mut Vec<ManagedEntry>,
    writer: &Writer<'_>,
    force: bool,
) -> Result<Value, Vec<(String, String)>> {
    let applied_fields = leaves(applied, writer.scope);
    let mut conflicts = Vec::new();
    let mut taken: Vec<(usize, FieldPath)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.manager == writer.manager {
            continue;
        }
        for q in &e.fields {
            for p in applied_fields.iter().filter(|p| touches(p, q, applied)) {
                let longer = if p.len() >= q.len() { p } else { q };
                if value_at(current, longer) != value_at(applied, longer) {
                    let conflict = (e.manager.clone(), display(p));
                    if !conflicts.contains(&conflict) {
                        conflicts.push(conflict);
                    }
                    taken.push((i, q.clone()));
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for (i, q) in taken {
        entries[i].fields.remove(&q);
    }

    let mut merged = current.clone();
    listmap::merge(kind(applied), &mut merged, applied, &mut Vec::new());
    let subresource = writer.scope.subresource().map(str::to_owned);
    let is_mine = |e: &ManagedEntry| {
        e.manager == writer.manager && e.operation == "Apply" && e.subresource == subresource
    };
    let previously: BTreeSet<FieldPath> = entries
        .iter()
        .filter(|e| is_mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others: Vec<&FieldPath> = (entries.iter().filter(|e| !is_mine(e)))
        .flat_map(|e| &e.fields)
        .collect();
    // Nobody keeps `p`: neither this manager (below it) nor anyone else
    // (anywhere along it).
    let unowned = |p: &[String]| {
        !applied_fields.iter().any(|a| a.starts_with(p)) && !others.iter().any(|q| overlaps(q, p))
    };
    for dropped in previously.difference(&applied_fields) {
        // The outermost list element nobody owns a field of any more goes whole.
        let element = (1..=dropped.len())
            .filter(|n| is_element(&dropped[n - 1]))
            .map(|n| &dropped[..n])
            .find(|p| unowned(p));
        if let Some(element) = element {
            remove_at(&mut merged, element);
            continue;
        }
        let is_key = match dropped.as_slice() {
            [.., element, field] => is_element(element) && listmap::is_key_field(element, field),
            _ => false,
        };
        if unowned(dropped) && !is_key {
            remove_at(&mut merged, dropped);
        }
    }
    entry_mut(entries, writer, "Apply").fields = applied_fields;
    prune(entries, &merged);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: Scope = Scope::Main {
        status_subresource: true,
    };

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "v1".to_owned(),
            time: "2026-01-01T00:00:00Z".to_owned(),
            scope: MAIN,
        }
    }

    fn path(p: &str) -> FieldPath {
        p.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn leaves_skip_server_fields_and_status() {
        let obj = json!({
            "apiVersion": "v1", "kind": "X",
            "metadata": {"name": "a", "uid": "u", "labels": {"app": "x"}},
            "spec": {"a": 1, "l": [1], "e": {}},
            "status": {"s": 1},
        });
        let got = leaves(&obj, MAIN);
        let want: BTreeSet<FieldPath> = ["metadata.labels.app", "spec.a", "spec.l", "spec.e"]
            .iter()
            .map(|p| path(p))
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            leaves(&obj, Scope::Status),
            BTreeSet::from([path("status.s")])
        );
    }

    #[test]
    fn fields_v1_round_trip() {
        let fields = BTreeSet::from([path("spec.a"), path("spec.b.c"), path("metadata.labels.x")]);
        let mut decoded = BTreeSet::new();
        let Value::Object(map) = encode(&fields) else {
            panic!("encode gives a map")
        };
        decode(&map, &Vec::new(), &mut decoded);
        assert_eq!(decoded, fields);
    }

    #[test]
    fn apply_conflicts_forces_and_removes() {
        let mut entries = Vec::new();
        let base = json!({"metadata": {"name": "a"}});
        let first = json!({"spec": {"a": 1, "b": 2}});
        let obj = apply(&base, &first, &mut entries, &writer("one"), false).expect("no owner yet");
        assert_eq!(obj["spec"], json!({"a": 1, "b": 2}));

        // Same value: shared ownership, no conflict.
        let same = json!({"spec": {"a": 1}});
        let obj = apply(&obj, &same, &mut entries, &writer("two"), false).expect("same value");

        let other = json!({"spec": {"a": 5}});
        let err = apply(&obj, &other, &mut entries, &writer("two"), false).expect_err("conflict");
        assert_eq!(err, vec![("one".to_owned(), ".spec.a".to_owned())]);
        let obj = apply(&obj, &other, &mut entries, &writer("two"), true).expect("forced");
        assert_eq!(obj["spec"]["a"], 5);

        // "one" stops applying b: nobody else owns it, so it goes.
        let obj = apply(
            &obj,
            &json!({"spec": {}}),
            &mut entries,
            &writer("one"),
            false,
        )
        .expect("drop fields");
        assert_eq!(obj["spec"], json!({"a": 5}));
    }
}
