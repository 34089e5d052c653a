//! YAML that every Kubernetes client reads back as written: the manifests the
//! mesh prints for `kubectl apply`.
//!
//! kubectl, client-go and most tooling around them read YAML 1.1, where the plain
//! scalars `on`, `yes`, `NO`, `y`, `~`, `0777` (octal), `1:20` (base 60),
//! `2001-12-14` (a timestamp), `=` and `<<` are not strings. serde_yaml_ng writes
//! YAML 1.2 and quotes only what a 1.2 reader would misread, so a label value
//! `on` came out plain and `kubectl apply` refused the object as a boolean.
//!
//! [`to_string`] writes the same block layout as `serde_yaml_ng::to_string` (keys
//! in the same order, the same indentation, multi-line strings as literal blocks)
//! but decides quoting by an allow-list instead of a list of known words: a
//! string is plain only when it starts with a letter, `/`, `.` plus a letter, or
//! `-`/`--` plus a letter, or starts with a digit but holds a character no number
//! or timestamp has (`256Mi`, `10.96.0.0/12`); is not one of the words either
//! version resolves (`yes`, `off`, `null`, `.inf` ... in any case); and holds
//! nothing the block syntax would read differently (`: `, ` #`, line breaks,
//! control characters, surrounding spaces). No YAML 1.1 or 1.2 type other than
//! string looks like that, so every other string is quoted: single quotes when
//! printable, double quotes with escapes otherwise. Numbers always carry a `.` and a signed
//! exponent when they are floats, which both versions read as floats.

use std::fmt::Write as _;

use serde::Serialize;
use serde_yaml_ng::Value;

/// Words YAML 1.1 or 1.2 resolves to a boolean, null or special float when
/// plain; compared case-insensitively, so spellings no resolver knows are
/// quoted too, which costs nothing.
const RESERVED: &[&str] = &[
    "y", "n", "yes", "no", "on", "off", "true", "false", "null", ".inf", ".nan",
];

/// Characters no number, timestamp or base-60 value of YAML 1.1 or 1.2 (nor Go's
/// number parsing behind kubectl's reader) contains: not the digits, hex digits,
/// `x o b` prefixes, `e p` exponents, `inf nan`, the timestamps' `t z`, signs,
/// `.`, `_` or `:`. A string starting with a digit is plain when it holds one, so
/// quantities and durations (`256Mi`, `50m`, `3s`) and CIDRs stay as people write
/// them.
const NEVER_NUMERIC: &[u8] = b"ghjklmqrsuvwyGHJKLMQRSUVWY/";

/// libyaml (and so serde_yaml_ng) writes keys longer than this in the explicit
/// `? key` form; readers refuse implicit keys past 1024 characters.
const MAX_SIMPLE_KEY: usize = 128;

/// `value` as one YAML document in block style, safe for YAML 1.1 and 1.2 readers
/// (no leading `---`). Fails only where `serde_yaml_ng::to_value` fails.
pub fn to_string<T: ?Sized + Serialize>(value: &T) -> Result<String, serde_yaml_ng::Error> {
    let value = serde_yaml_ng::to_value(value)?;
    let mut out = String::new();
    write_node(&mut out, &value, 0, Context::Root);
    Ok(out)
}

/// Where a node starts, which decides how its first line is laid out.
#[derive(Clone, Copy, PartialEq)]
enum Context {
    /// A document's root, at column 0.
    Root,
    /// After `key:`, with the key at column `indent`.
    MappingValue,
    /// After `- `, `? ` or `: `, whose indicator is at column `indent`.
    Item,
}

fn write_node(out: &mut String, value: &Value, indent: usize, context: Context) {
    match value {
        Value::Mapping(map) if !map.is_empty() => {
            let entries_at = match context {
                Context::Root => 0,
                Context::MappingValue => {
                    out.push('\n');
                    indent + 2
                }
                Context::Item => indent + 2,
            };
            for (i, (key, value)) in map.iter().enumerate() {
                // After `- ` the first entry shares the item's line.
                if i > 0 || context != Context::Item {
                    push_indent(out, entries_at);
                }
                write_entry(out, key, value, entries_at);
            }
        }
        Value::Sequence(items) if !items.is_empty() => {
            // A sequence under a key is not indented further, as libyaml writes it.
            let items_at = match context {
                Context::Root => 0,
                Context::MappingValue => {
                    out.push('\n');
                    indent
                }
                Context::Item => indent + 2,
            };
            for (i, item) in items.iter().enumerate() {
                if i > 0 || context != Context::Item {
                    push_indent(out, items_at);
                }
                out.push_str("- ");
                write_node(out, item, items_at, Context::Item);
            }
        }
        Value::Tagged(tagged) => {
            if context == Context::MappingValue {
                out.push(' ');
            }
            out.push_str(&tagged.tag.to_string());
            match &tagged.value {
                Value::Mapping(m) if !m.is_empty() => {
                    write_node(out, &tagged.value, indent, Context::MappingValue);
                }
                Value::Sequence(s) if !s.is_empty() => {
                    // Under a tag a sequence needs its own indentation level.
                    out.push('\n');
                    let at = indent + 2;
                    for item in s {
                        push_indent(out, at);
                        out.push_str("- ");
                        write_node(out, item, at, Context::Item);
                    }
                }
                inner => {
                    write_node(out, inner, indent, Context::MappingValue);
                }
            }
        }
        scalar => {
            if context == Context::MappingValue {
                out.push(' ');
            }
            write_scalar(out, scalar, indent, context);
        }
    }
}

fn write_entry(out: &mut String, key: &Value, value: &Value, indent: usize) {
    let simple = match key {
        Value::String(s) => s.chars().count() <= MAX_SIMPLE_KEY,
        Value::Null | Value::Bool(_) | Value::Number(_) => true,
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => false,
    };
    if simple {
        write_key(out, key);
        out.push(':');
        write_node(out, value, indent, Context::MappingValue);
    } else {
        out.push_str("? ");
        write_node(out, key, indent, Context::Item);
        push_indent(out, indent);
        out.push(':');
        match value {
            Value::Mapping(m) if !m.is_empty() => {
                out.push(' ');
                write_node(out, value, indent, Context::Item);
            }
            Value::Sequence(s) if !s.is_empty() => {
                out.push(' ');
                write_node(out, value, indent, Context::Item);
            }
            _ => write_node(out, value, indent, Context::MappingValue),
        }
    }
}

/// A simple key: never a block scalar, so a multi-line key is double-quoted.
fn write_key(out: &mut String, key: &Value) {
    match key {
        Value::String(s) if plain_safe(s) => out.push_str(s),
        Value::String(s) if single_quotable(s) => push_single_quoted(out, s),
        Value::String(s) => push_double_quoted(out, s),
        other => push_scalar_text(out, other),
    }
}

fn write_scalar(out: &mut String, value: &Value, indent: usize, context: Context) {
    match value {
        Value::String(s) if plain_safe(s) => out.push_str(s),
        Value::String(s) if s.contains('\n') && literal_allowed(s) => {
            let content_at = match context {
                Context::Root => 2,
                Context::MappingValue | Context::Item => indent + 2,
            };
            push_literal(out, s, content_at);
            // The block ends with its own line break.
            return;
        }
        Value::String(s) if single_quotable(s) => push_single_quoted(out, s),
        Value::String(s) => push_double_quoted(out, s),
        Value::Mapping(_) => out.push_str("{}"),
        Value::Sequence(_) => out.push_str("[]"),
        other => push_scalar_text(out, other),
    }
    out.push('\n');
}

fn push_scalar_text(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => push_number(out, n),
        // Only reached for keys that are not strings.
        _ => out.push_str("null"),
    }
}

/// Integers as digits; floats as serde_yaml_ng writes them (`.inf`, `-.inf`,
/// `.nan`, ryu's shortest form), with `1e30` made `1.0e+30`: YAML 1.1 wants the
/// `.` and the exponent's sign, or reads a string.
fn push_number(out: &mut String, n: &serde_yaml_ng::Number) {
    let text = n.to_string();
    if !n.is_f64() || text.starts_with('.') || text.starts_with("-.") {
        out.push_str(&text);
        return;
    }
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (text.as_str(), None),
    };
    out.push_str(mantissa);
    if !mantissa.contains('.') {
        out.push_str(".0");
    }
    if let Some(e) = exponent {
        out.push('e');
        if !e.starts_with(['-', '+']) {
            out.push('+');
        }
        out.push_str(e);
    }
}

fn push_indent(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// Whether `s` can be written plain and read back as this string by YAML 1.1 and
/// 1.2 readers alike. See the module documentation for the rule.
pub fn plain_safe(s: &str) -> bool {
    let bytes = s.as_bytes();
    let letter = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_alphabetic);
    let start_ok = match bytes.first() {
        Some(b) if b.is_ascii_alphabetic() || *b == b'/' => true,
        Some(b'.') => letter(1),
        Some(b'-') => letter(1) || (bytes.get(1) == Some(&b'-') && letter(2)),
        Some(b) if b.is_ascii_digit() => bytes.iter().any(|b| NEVER_NUMERIC.contains(b)),
        _ => false,
    };
    start_ok
        && !RESERVED.iter().any(|w| s.eq_ignore_ascii_case(w))
        && s.chars().all(plain_char)
        && !s.ends_with([' ', ':'])
        && !s.contains(": ")
        && !s.contains(" #")
}

fn plain_char(c: char) -> bool {
    match c {
        'a'..='z' | 'A'..='Z' | '0'..='9' | ' ' => true,
        '-' | '_' | '.' | '/' | ':' | '@' | '+' | '=' | '%' | '~' | ',' | '(' | ')' | '\''
        | '"' | '?' | '!' | '*' | '&' | '|' | '<' | '>' | '$' | '^' | ';' | '#' | '[' | ']'
        | '{' | '}' | '`' | '\\' => true,
        c => printable_non_ascii(c) && !c.is_whitespace(),
    }
}

/// Non-ASCII characters a YAML reader takes as themselves: not C1 controls, not
/// the line and paragraph separators YAML 1.1 treats as breaks, not a BOM.
fn printable_non_ascii(c: char) -> bool {
    let c = u32::from(c);
    c >= 0xA0 && c != 0x2028 && c != 0x2029 && c != 0xFEFF && !(0xFFFE..=0xFFFF).contains(&c)
}

fn printable(c: char) -> bool {
    matches!(c, ' '..='~') || printable_non_ascii(c)
}

fn single_quotable(s: &str) -> bool {
    s.chars().all(printable)
}

/// libyaml's rule for a literal block: printable lines, no space before a line
/// break or at the end (a reader would keep or fold it differently).
fn literal_allowed(s: &str) -> bool {
    s.chars().all(|c| c == '\n' || printable(c)) && !s.contains(" \n") && !s.ends_with(' ')
}

fn push_single_quoted(out: &mut String, s: &str) {
    out.push('\'');
    out.push_str(&s.replace('\'', "''"));
    out.push('\'');
}

fn push_double_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{1b}' => out.push_str("\\e"),
            c if printable(c) => out.push(c),
            c if u32::from(c) <= 0xFF => {
                let _ = write!(out, "\\x{:02X}", u32::from(c));
            }
            c if u32::from(c) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08X}", u32::from(c));
            }
        }
    }
    out.push('"');
}

/// `|`, `|-` or `|+` as the trailing line breaks require, with an indentation
/// indicator when the first line starts with a space or is empty (a reader would
/// otherwise take its indentation from the wrong line).
fn push_literal(out: &mut String, s: &str, content_at: usize) {
    out.push('|');
    if s.starts_with([' ', '\n']) {
        out.push('2');
    }
    if !s.ends_with('\n') {
        out.push('-');
    } else if s == "\n" || s.ends_with("\n\n") {
        out.push('+');
    }
    out.push('\n');
    let lines: Vec<&str> = s.split('\n').collect();
    let last = lines.len() - 1;
    for (i, line) in lines.iter().enumerate() {
        if !line.is_empty() {
            push_indent(out, content_at);
            out.push_str(line);
            out.push('\n');
        } else if i < last {
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests;
