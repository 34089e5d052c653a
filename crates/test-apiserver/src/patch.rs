//! Patch formats: JSON merge patch (RFC 7386), which also stands in for
//! strategic merge patch, and JSON patch (RFC 6902: add, remove, replace, test,
//! move, copy).
//!
//! Strategic merge patch is approximated by a merge patch: lists are replaced
//! whole rather than merged by key, and `$patch`/`$retainKeys` directives are
//! not understood. Not here: server-side apply (see `apply`).

use serde_json::Value;

use crate::status::ApiError;

/// RFC 7386: objects merge recursively, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn tokens(pointer: &str) -> Result<Vec<String>, ApiError> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer.strip_prefix('/').ok_or_else(|| {
        ApiError::bad_request(format!(
            "json patch: path {pointer:?} does not start with /"
        ))
    })?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_mut<'a>(
    doc: &'a mut Value,
    tokens: &[String],
    pointer: &str,
) -> Result<&'a mut Value, ApiError> {
    let mut at = doc;
    for t in tokens {
        at = match at {
            Value::Object(map) => map.get_mut(t),
            Value::Array(items) => t.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "json patch: path {pointer:?}: {t:?} does not exist"
            ))
        })?;
    }
    Ok(at)
}

fn add(doc: &mut Value, pointer: &str, value: Value) -> Result<(), ApiError> {
    let tokens = tokens(pointer)?;
    let Some((last, parents)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parents, pointer)? {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) => {
            let index = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= items.len())
                    .ok_or_else(|| {
                        ApiError::invalid(format!("json patch: path {pointer:?}: bad index"))
                    })?
            };
            items.insert(index, value);
            Ok(())
        }
        _ => Err(ApiError::invalid(format!(
            "json patch: path {pointer:?}: parent is not an object or array"
        ))),
    }
}

fn remove(doc: &mut Value, pointer: &str) -> Result<Value, ApiError> {
    let tokens = tokens(pointer)?;
    let Some((last, parents)) = tokens.split_last() else {
        return Err(ApiError::invalid(
            "json patch: cannot remove the whole document",
        ));
    };
    let missing = || ApiError::invalid(format!("json patch: path {pointer:?} does not exist"));
    match parent_mut(doc, parents, pointer)? {
        Value::Object(map) => map.remove(last).ok_or_else(missing),
        Value::Array(items) => {
            let i = last
                .parse::<usize>()
                .ok()
                .filter(|i| *i < items.len())
                .ok_or_else(missing)?;
            Ok(items.remove(i))
        }
        _ => Err(missing()),
    }
}

fn get(doc: &Value, pointer: &str) -> Result<Value, ApiError> {
    doc.pointer(pointer)
        .cloned()
        .ok_or_else(|| ApiError::invalid(format!("json patch: path {pointer:?} does not exist")))
}

/// RFC 6902 applied in order; a failing operation leaves `doc` unspecified (the
/// caller works on a copy).
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| ApiError::bad_request("json patch: the body is not a JSON array"))?;
    for (i, op) in ops.iter().enumerate() {
        let field = |name: &str| {
            op.get(name).ok_or_else(|| {
                ApiError::bad_request(format!("json patch: operation {i} lacks {name:?}"))
            })
        };
        let str_field = |name: &str| {
            field(name)?.as_str().map(str::to_owned).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "json patch: operation {i}: {name:?} is not a string"
                ))
            })
        };
        let path = str_field("path")?;
        match str_field("op")?.as_str() {
            "add" => add(doc, &path, field("value")?.clone())?,
            "remove" => {
                remove(doc, &path)?;
            }
            "replace" => {
                remove(doc, &path)?;
                add(doc, &path, field("value")?.clone())?;
            }
            "test" => {
                if get(doc, &path)? != *field("value")? {
                    return Err(ApiError::invalid(format!(
                        "json patch: operation {i}: test of {path:?} failed"
                    )));
                }
            }
            "move" => {
                let value = remove(doc, &str_field("from")?)?;
                add(doc, &path, value)?;
            }
            "copy" => {
                let value = get(doc, &str_field("from")?)?;
                add(doc, &path, value)?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "json patch: operation {i}: unknown op {other:?}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_removes_and_replaces() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut doc = json!({"a": {"b": 1}, "l": [1, 2]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/a/c", "value": 2},
                {"op": "replace", "path": "/a/b", "value": 5},
                {"op": "remove", "path": "/l/0"},
                {"op": "add", "path": "/l/-", "value": 9},
                {"op": "test", "path": "/a/c", "value": 2},
                {"op": "copy", "from": "/a/c", "path": "/x"},
                {"op": "move", "from": "/x", "path": "/y"},
            ]),
        )
        .expect("applies");
        assert_eq!(doc, json!({"a": {"b": 5, "c": 2}, "l": [2, 9], "y": 2}));
        let err = json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}]))
            .expect_err("missing path");
        assert_eq!(err.code, 422);
    }
}
