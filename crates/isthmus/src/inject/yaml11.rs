//! Reading a workload's scalars as kubectl does. kubectl reads YAML 1.1, where a
//! plain `0644` is the octal integer 420 and `yes`, `on`, `y` are `true`; this
//! crate's parser reads YAML 1.2, where they are strings. In a Pod spec those
//! forms only stand where the type wants an integer or a boolean (`defaultMode`,
//! `tty`, `hostNetwork`, ...), so a YAML 1.2 read of them fails the type check:
//! each such failure is answered by converting the string the way YAML 1.1 does,
//! at the one place where the conversion makes the object read further, and the
//! object comes out with the integer or boolean kubectl would have seen.
//!
//! Not here: strings where the type wants a string (`value: yes` of an env var
//! stays the string a YAML 1.2 reader saw, and is written quoted).

use serde_yaml_ng::{Number, Value};

/// Bounds the rounds of conversion, one per converted scalar.
const MAX_CONVERSIONS: usize = 256;

/// Converts the YAML 1.1 integers and booleans of `value` that `check` (the
/// object's type check) refuses as strings; the error of `check` when what is
/// left is not such a form.
pub(super) fn read_as_kubectl<E: std::fmt::Display>(
    value: &mut Value,
    check: impl Fn(&Value) -> Result<(), E>,
) -> Result<(), E> {
    for _ in 0..MAX_CONVERSIONS {
        let Err(error) = check(value) else {
            return Ok(());
        };
        let message = error.to_string();
        let Some(converted) = refused_scalar(&message) else {
            return Err(error);
        };
        let mut fixed = false;
        for path in paths_of(value, &converted.text) {
            set(value, &path, converted.value.clone());
            let still = check(value).err().map(|e| e.to_string());
            // Right place: the check reads past it (to another error, or none).
            // Wrong place (a label, an env value): the check now refuses the
            // converted value, or is where it was.
            let wrong = still.as_deref().is_some_and(|m| {
                m == message
                    || m.contains("invalid type: boolean")
                    || m.contains("invalid type: integer")
            });
            if wrong {
                set(value, &path, Value::String(converted.text.clone()));
            } else {
                fixed = true;
                break;
            }
        }
        if !fixed {
            return Err(error);
        }
    }
    check(value)
}

/// A string the check refused, with its YAML 1.1 reading as the wanted type.
struct Converted {
    text: String,
    value: Value,
}

/// From serde's `invalid type: string "0644", expected i32`: the string and its
/// YAML 1.1 reading, when that reading is of the expected type.
fn refused_scalar(message: &str) -> Option<Converted> {
    let rest = message.split("invalid type: string \"").nth(1)?;
    let (text, expected) = rest.split_once("\", expected ")?;
    let value = if expected.contains("bool") {
        Value::Bool(yaml11_bool(text)?)
    } else if expected.starts_with('i') || expected.starts_with('u') || expected.contains("integer")
    {
        Value::Number(Number::from(yaml11_int(text)?))
    } else {
        return None;
    };
    Some(Converted {
        text: text.to_owned(),
        value,
    })
}

/// YAML 1.1's booleans, as kubectl's reader (go-yaml v2) resolves them.
pub(super) fn yaml11_bool(text: &str) -> Option<bool> {
    match text {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
            Some(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => {
            Some(false)
        }
        _ => None,
    }
}

/// YAML 1.1's integers as go-yaml v2 reads them: `_` ignored, a sign, and `0x`
/// (hex), `0o` or a bare leading `0` (octal), `0b` (binary), else decimal.
pub(super) fn yaml11_int(text: &str) -> Option<i64> {
    let digits: String = text.chars().filter(|c| *c != '_').collect();
    let (negative, digits) = match digits.strip_prefix('-') {
        Some(d) => (true, d.to_owned()),
        None => (
            false,
            digits.strip_prefix('+').unwrap_or(&digits).to_owned(),
        ),
    };
    let (radix, body) = if let Some(hex) = digits.strip_prefix("0x") {
        (16, hex)
    } else if let Some(octal) = digits.strip_prefix("0o") {
        (8, octal)
    } else if let Some(binary) = digits.strip_prefix("0b") {
        (2, binary)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits.as_str())
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = i64::from_str_radix(body, radix).ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// Every place in `value` holding the string `text`, in document order.
fn paths_of(value: &Value, text: &str) -> Vec<Vec<Value>> {
    fn walk(value: &Value, text: &str, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
        match value {
            Value::String(s) if s == text => out.push(path.clone()),
            Value::Mapping(m) => {
                for (k, v) in m {
                    path.push(k.clone());
                    walk(v, text, path, out);
                    path.pop();
                }
            }
            Value::Sequence(items) => {
                for (i, v) in items.iter().enumerate() {
                    path.push(Value::from(i));
                    walk(v, text, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, text, &mut Vec::new(), &mut out);
    out
}

fn set(value: &mut Value, path: &[Value], new: Value) {
    let slot = path.iter().try_fold(value, |v, key| match (v, key) {
        (Value::Mapping(m), k) => m.get_mut(k),
        (Value::Sequence(items), Value::Number(i)) => {
            items.get_mut(usize::try_from(i.as_u64()?).ok()?)
        }
        _ => None,
    });
    if let Some(slot) = slot {
        *slot = new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_booleans_read_as_yaml_1_1_does() {
        assert_eq!(yaml11_int("0644"), Some(420));
        assert_eq!(yaml11_int("0o644"), Some(420));
        assert_eq!(yaml11_int("0x1F"), Some(31));
        assert_eq!(yaml11_int("0b101"), Some(5));
        assert_eq!(yaml11_int("-1_000"), Some(-1000));
        assert_eq!(yaml11_int("0"), Some(0));
        assert_eq!(yaml11_int("09"), None);
        assert_eq!(yaml11_int("1e3"), None);
        assert_eq!(yaml11_bool("on"), Some(true));
        assert_eq!(yaml11_bool("N"), Some(false));
        assert_eq!(yaml11_bool("nope"), None);
    }
}
