//! The lists a real API server treats as maps in server-side apply
//! (`x-kubernetes-list-type: map`), as far as the mesh's objects use them:
//! a Service's `spec.ports` keyed by `port` and `protocol`, a pod spec's
//! `containers` and `initContainers` keyed by `name`, a container's `ports`
//! keyed by `containerPort` and `protocol`, and its `env` keyed by `name`.
//! Their elements are merged by key, and owned field by field, each element
//! named in a field path as FieldsV1 names it: `k:{"port":80,"protocol":"TCP"}`.
//!
//! Every other list stays atomic, and so does one of these lists when one of
//! its elements lacks a key field that has no default (`protocol` defaults to
//! `TCP`, as the API defaults it).

use serde_json::{Map, Value};

/// A key field and, if the API defaults it, its default.
type Key = (&'static str, Option<&'static str>);

const SERVICE_PORT: &[Key] = &[("port", None), ("protocol", Some("TCP"))];
const CONTAINER_PORT: &[Key] = &[("containerPort", None), ("protocol", Some("TCP"))];
const NAME: &[Key] = &[("name", None)];

/// The kinds whose objects hold a pod spec.
const POD_KINDS: [&str; 9] = [
    "Pod",
    "PodTemplate",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "CronJob",
];

/// Whether a field path segment names a list element.
pub(crate) fn is_element(segment: &str) -> bool {
    segment.starts_with("k:")
}

/// The key fields of the list at `path` in an object of `kind`, if it is a
/// list-map.
fn keys(kind: &str, path: &[String]) -> Option<&'static [Key]> {
    let names: Vec<&str> = path
        .iter()
        .map(String::as_str)
        .filter(|s| !is_element(s))
        .collect();
    let in_pod_spec = |at: usize| {
        POD_KINDS.contains(&kind)
            && at >= 1
            && names[at - 1] == "spec"
            && matches!(names[at], "containers" | "initContainers")
    };
    match names.as_slice() {
        ["spec", "ports"] if kind == "Service" => Some(SERVICE_PORT),
        [.., _] if in_pod_spec(names.len() - 1) => Some(NAME),
        [.., _, "ports"] if in_pod_spec(names.len() - 2) => Some(CONTAINER_PORT),
        [.., _, "env"] if in_pod_spec(names.len() - 2) => Some(NAME),
        _ => None,
    }
}

/// The value of key field `name` of `element`, its default if unset.
fn key_value(element: &Value, (name, default): Key) -> Option<Value> {
    element
        .get(name)
        .cloned()
        .or_else(|| default.map(|d| Value::String(d.to_owned())))
}

/// `k:{...}` for `element` of a list keyed by `keys`; `None` if it lacks a key.
fn segment(keys: &[Key], element: &Value) -> Option<String> {
    let mut parts = Vec::new();
    // `keys` are in name order, as FieldsV1 writes them.
    for key in keys {
        let value = key_value(element, *key)?;
        parts.push(format!("{}:{value}", Value::String(key.0.to_owned())));
    }
    Some(format!("k:{{{}}}", parts.join(",")))
}

/// The element segments of `items`, the list at `path` of an object of
/// `kind`, in order; `None` when the list is atomic.
pub(crate) fn segments(kind: &str, path: &[String], items: &[Value]) -> Option<Vec<String>> {
    let keys = keys(kind, path)?;
    if items.is_empty() {
        return None;
    }
    items.iter().map(|item| segment(keys, item)).collect()
}

/// The key fields and values a segment names.
fn parse(segment: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str(segment.strip_prefix("k:")?) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// The index of the element of `items` that `segment` names.
pub(crate) fn find(items: &[Value], segment: &str) -> Option<usize> {
    let wanted = parse(segment)?;
    items.iter().position(|item| {
        wanted.iter().all(|(name, value)| match item.get(name) {
            Some(v) => v == value,
            // The one key field the API defaults.
            None => name == "protocol" && value == "TCP",
        })
    })
}

/// Whether `field` (the segment after `element`) is one of its key fields:
/// such a field goes with its element, never alone.
pub(crate) fn is_key_field(element: &str, field: &str) -> bool {
    parse(element).is_some_and(|keys| keys.contains_key(field))
}

/// `[port=80,protocol="TCP"]`, as the real server names an element in a
/// conflict.
pub(crate) fn display(segment: &str) -> String {
    match parse(segment) {
        Some(keys) => {
            let parts: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("[{}]", parts.join(","))
        }
        None => format!(".{segment}"),
    }
}

/// Server-side apply's merge of `applied` into `target` (at `path` of an
/// object of `kind`): maps merge key by key (`null` removes), list-maps merge
/// element by key (an element not applied stays), anything else is replaced.
pub(crate) fn merge(kind: &str, target: &mut Value, applied: &Value, path: &mut Vec<String>) {
    match applied {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let Value::Object(map) = target else {
                return;
            };
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                    continue;
                }
                path.push(k.clone());
                merge(kind, map.entry(k.clone()).or_insert(Value::Null), v, path);
                path.pop();
            }
        }
        Value::Array(items) => {
            let (Some(theirs), Value::Array(mine)) = (segments(kind, path, items), &mut *target)
            else {
                *target = applied.clone();
                return;
            };
            if segments(kind, path, mine).is_none() && !mine.is_empty() {
                *target = applied.clone();
                return;
            }
            for (item, seg) in items.iter().zip(theirs) {
                match find(mine, &seg) {
                    Some(i) => {
                        path.push(seg);
                        merge(kind, &mut mine[i], item, path);
                        path.pop();
                    }
                    None => mine.push(item.clone()),
                }
            }
        }
        _ => *target = applied.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn path(p: &str) -> Vec<String> {
        p.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn keyed_lists_are_those_a_real_server_keys() {
        let ports = [json!({"port": 80}), json!({"port": 53, "protocol": "UDP"})];
        assert_eq!(
            segments("Service", &path("spec.ports"), &ports),
            Some(vec![
                r#"k:{"port":80,"protocol":"TCP"}"#.to_owned(),
                r#"k:{"port":53,"protocol":"UDP"}"#.to_owned(),
            ])
        );
        let container = [json!({"name": "app"})];
        for p in ["spec.containers", "spec.template.spec.initContainers"] {
            assert!(
                segments("Deployment", &path(p), &container).is_some(),
                "{p}"
            );
        }
        let nested = path(r#"spec.template.spec.containers.k:{"name":"app"}.env"#);
        assert_eq!(
            segments("Deployment", &nested, &[json!({"name": "A"})]),
            Some(vec![r#"k:{"name":"A"}"#.to_owned()])
        );
        // Not keyed: another kind, another list, or an element without its key.
        assert_eq!(segments("ConfigMap", &path("spec.ports"), &ports), None);
        assert_eq!(segments("Service", &path("spec.ipFamilies"), &ports), None);
        assert_eq!(
            segments("Service", &path("spec.ports"), &[json!({"name": "x"})]),
            None
        );
    }

    #[test]
    fn elements_merge_by_key_and_keep_the_rest() {
        let mut target =
            json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 90}]}});
        let applied = json!({"spec": {"ports": [{"port": 80, "protocol": "TCP", "name": "http"}, {"port": 70}]}});
        merge("Service", &mut target, &applied, &mut Vec::new());
        assert_eq!(
            target["spec"]["ports"],
            json!([
                {"port": 80, "targetPort": 8080, "protocol": "TCP", "name": "http"},
                {"port": 90},
                {"port": 70},
            ])
        );
        assert_eq!(
            find(
                target["spec"]["ports"].as_array().unwrap(),
                r#"k:{"port":90,"protocol":"TCP"}"#
            ),
            Some(1)
        );
        assert_eq!(
            display(r#"k:{"port":80,"protocol":"TCP"}"#),
            r#"[port=80,protocol="TCP"]"#
        );
    }
}
