//! Patch formats: JSON merge patch (RFC 7386), which also stands in for
//! strategic merge patch, and JSON patch (RFC 6902), both applied by the
//! `json-patch` crate; this module maps its errors to the API server's statuses.
//!
//! Strategic merge patch is approximated by a merge patch (`json-patch` has no
//! strategic merge): lists are replaced whole rather than merged by key, and
//! `$patch`/`$retainKeys` directives are not understood. Not here: server-side
//! apply (see `apply`).

use serde_json::Value;

use crate::status::ApiError;

/// RFC 7386: objects merge recursively, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// RFC 6902 applied in order. A body that is not a list of operations is a bad
/// request (400); an operation that does not apply (a missing path, a failed
/// `test`) makes the patch invalid (422) and leaves `doc` as it was.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("json patch: {e}")))?;
    json_patch::patch(doc, &ops).map_err(|e| ApiError::invalid(format!("json patch: {e}")))
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
        assert_eq!(
            doc,
            json!({"a": {"b": 5, "c": 2}, "l": [2, 9], "y": 2}),
            "a failed patch leaves the document alone"
        );
        let err = json_patch(&mut doc, &json!([{"op": "test", "path": "/y", "value": 3}]))
            .expect_err("test fails");
        assert_eq!(err.code, 422);
        for malformed in [
            json!({"op": "add"}),
            json!([{"op": "frobnicate", "path": "/a"}]),
            json!([{"op": "add", "path": "/a"}]),
        ] {
            let err = json_patch(&mut doc, &malformed).expect_err("malformed");
            assert_eq!(err.code, 400, "{malformed}");
        }
    }
}
