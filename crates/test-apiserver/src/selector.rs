//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and field
//! selectors (`path=value`, `path==value`, `path!=value`) as list and watch
//! take them in the query string.
//!
//! Field selectors accept any dotted path into the object (`metadata.name`,
//! `metadata.namespace`, `spec.nodeName`, ...): more lenient than the real
//! server, which allows a fixed set per type. Not here: set-based selectors in
//! `matchExpressions` form (clients render those into the string form).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::status::ApiError;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    /// Parses the string form, naming the requirement that does not parse.
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(part).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "labelSelector: unable to parse requirement {part:?}"
                ))
            })?);
        }
        Ok(Self(requirements))
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v),
            Requirement::NotEquals(k, v) => label(k) != Some(v),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.contains(l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        })
    }
}

/// Splits at commas outside parentheses (`a in (x,y),b` is two requirements).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_requirement(part: &str) -> Option<Requirement> {
    if let Some(open) = part.find('(') {
        let close = part.rfind(')')?;
        if close != part.len() - 1 || close < open {
            return None;
        }
        let mut head = part[..open].split_whitespace();
        let key = head.next()?.to_owned();
        let op = head.next()?;
        if head.next().is_some() || !valid_key(&key) {
            return None;
        }
        let values: BTreeSet<String> = part[open + 1..close]
            .split(',')
            .map(|v| v.trim().to_owned())
            .collect();
        return match op {
            "in" => Some(Requirement::In(key, values)),
            "notin" => Some(Requirement::NotIn(key, values)),
            _ => None,
        };
    }
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        return valid_key(key).then(|| Requirement::NotExists(key.to_owned()));
    }
    if let Some((k, v)) = part.split_once("!=") {
        let k = k.trim();
        return valid_key(k).then(|| Requirement::NotEquals(k.to_owned(), v.trim().to_owned()));
    }
    let (k, v) = match part.split_once("==") {
        Some(kv) => kv,
        None => match part.split_once('=') {
            Some(kv) => kv,
            None => {
                return valid_key(part).then(|| Requirement::Exists(part.to_owned()));
            }
        },
    };
    let k = k.trim();
    valid_key(k).then(|| Requirement::Equals(k.to_owned(), v.trim().to_owned()))
}

/// A parsed `fieldSelector`; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(Vec<String>, bool, String)>);

impl FieldSelector {
    /// Parses the string form, naming the term that does not parse.
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = part.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = part.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = part.split_once('=') {
                (p, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "fieldSelector: invalid selector {part:?}: expected field=value or field!=value"
                )));
            };
            let path: Vec<String> = path.trim().split('.').map(str::to_owned).collect();
            if path.iter().any(String::is_empty) {
                return Err(ApiError::bad_request(format!(
                    "fieldSelector: invalid field path in {part:?}"
                )));
            }
            terms.push((path, equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    /// Whether the object is selected; a missing field reads as "".
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, value)| {
            let mut at = Some(object);
            for segment in path {
                at = at.and_then(|v| v.get(segment));
            }
            let actual = match at {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_operators() {
        let o = obj(json!({"app": "hello", "tier": "web"}));
        let ok = |s: &str| LabelSelector::parse(s).expect("parses").matches(&o);
        assert!(ok(""));
        assert!(ok("app=hello"));
        assert!(ok("app==hello,tier"));
        assert!(!ok("app!=hello"));
        assert!(ok("missing!=x"));
        assert!(ok("app in (hello, other)"));
        assert!(!ok("app notin (hello)"));
        assert!(ok("missing notin (x)"));
        assert!(ok("!missing"));
        assert!(!ok("!app"));
        assert!(!ok("app in (x,y),tier"));
        assert!(LabelSelector::parse("app in x").is_err());
        assert!(LabelSelector::parse("=x").is_err());
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        let ok = |s: &str| FieldSelector::parse(s).expect("parses").matches(&o);
        assert!(ok("metadata.name=a"));
        assert!(ok("metadata.name==a,metadata.namespace=ns"));
        assert!(!ok("metadata.namespace!=ns"));
        assert!(ok("spec.nodeName="));
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
