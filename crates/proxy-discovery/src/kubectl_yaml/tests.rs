//! The writer against serde_yaml_ng: the same text wherever serde_yaml_ng's output
//! is already safe, every string read back as itself, and the quoting rule.

#![allow(clippy::unwrap_used)]

use serde_yaml_ng::{Mapping, Value};

use super::{plain_safe, to_string};

/// Strings a YAML 1.1 or 1.2 reader would take for something else when plain, or
/// that the block syntax would cut or fold.
const TRICKY: &[&str] = &[
    "on",
    "On",
    "ON",
    "off",
    "yes",
    "Yes",
    "YES",
    "no",
    "No",
    "NO",
    "y",
    "Y",
    "n",
    "N",
    "true",
    "True",
    "FALSE",
    "null",
    "Null",
    "NULL",
    "~",
    "",
    "0777",
    "0o17",
    "0x1F",
    "0b101",
    "1_000",
    "1:20",
    "-1:20",
    "1e3",
    "1E3",
    "+1",
    "-1",
    ".5",
    "1.",
    ".inf",
    "-.inf",
    ".NaN",
    "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "=",
    "<<",
    " leading space",
    "trailing space ",
    "a: b",
    "a:",
    "#x",
    "a #x",
    "- x",
    "-",
    "--",
    "---",
    "...",
    "? x",
    "&anchor",
    "*alias",
    "!tag",
    "%TAG",
    "@at",
    "`tick",
    "|",
    ">",
    "'quoted'",
    "\"dq\"",
    "{a: 1}",
    "[a]",
    "tab\there",
    "cr\rhere",
    "nul\0here",
    "del\u{7f}",
    "nel\u{85}x",
    "ls\u{2028}x",
    "\u{feff}bom",
    "nbsp\u{a0}",
    "127.0.0.1",
    "0.1.0",
    "8080",
    "0.0.0.0:4191",
    "1_000e3",
    "0x1p3",
    "1e+3",
    "12:30:45",
    "2001-12-14 21:59:43.10 -5",
    "1Z",
    "190:20:30.15",
    "0o777",
    "-0b1",
    "a\nb",
    "a\n",
    "a\n\n",
    "\n",
    "\nlead",
    " x\ny",
    "trail \nx",
    "x\ny ",
    "a\n  b\n",
    "multi\n\nblank\n",
    "é",
];

/// Plain-safe strings that look close to the tricky ones.
const PLAIN: &[&str] = &["--flag=on", "-c", "value ünïcödé", "a:b", "a#b", "on-call"];

#[test]
fn tricky_strings_read_back_as_themselves_as_keys_and_values() {
    let mut map = Mapping::new();
    for s in TRICKY.iter().chain(PLAIN) {
        map.insert(Value::from(*s), Value::from(*s));
    }
    let doc = Value::Mapping(
        [
            ("flat".into(), Value::Mapping(map.clone())),
            (
                "list".into(),
                Value::Sequence(TRICKY.iter().map(|s| Value::from(*s)).collect()),
            ),
            (
                "nested".into(),
                Value::Sequence(vec![
                    Value::Mapping(map.clone()),
                    Value::Sequence(TRICKY.iter().map(|s| Value::from(*s)).collect()),
                ]),
            ),
        ]
        .into_iter()
        .collect(),
    );
    let text = to_string(&doc).unwrap();
    let back: Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(back, doc, "{text}");
}

#[test]
fn a_scalar_document_reads_back() {
    for s in TRICKY {
        let text = to_string(s).unwrap();
        let back: String = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(&back, s, "{text:?}");
    }
}

#[test]
fn only_strings_that_cannot_be_misread_are_plain() {
    for s in TRICKY {
        assert!(!plain_safe(s), "{s:?} would be written plain");
    }
    for s in PLAIN.iter().copied().chain([
        "isthmus",
        "app.kubernetes.io/part-of",
        "ghcr.io/isthmus/isthmus:0.1.0",
        "--discovery=kube",
        "-v",
        "/var/run/isthmus",
        ".spec.cluster",
        "The remote Service's name.",
        "http://127.0.0.1:8080/ready",
        "onward",
        "yesterday",
        "nullable",
        "256Mi",
        "50m",
        "3s",
        "10.96.0.0/12",
    ]) {
        assert!(plain_safe(s), "{s:?} is quoted needlessly");
    }
}

/// Layouts serde_yaml_ng writes, whose strings are safe as they are: the output is
/// byte for byte serde_yaml_ng's.
#[test]
fn same_text_as_serde_yaml_ng_where_that_is_safe() {
    let source = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web, app.kubernetes.io/part-of: isthmus}
  annotations: {}
spec:
  replicas: 2
  ratio: 0.5
  flag: true
  nothing: null
  empty: []
  selector:
    matchLabels: {app: web}
  template:
    spec:
      containers:
      - name: web
        image: ghcr.io/x/web:1.2
        args: [--port=8080, -v]
        command:
        - sh
        - -c
        - |-
          echo one
          echo two
        env:
        - name: A
          value: '8080'
        - name: B
          value: 'true'
        - name: C
          value: |
            line

            after blank
        ports:
        - {containerPort: 8080, name: http}
      nested:
      - - a
        - b
      - []
      - {}
"#;
    let value: Value = serde_yaml_ng::from_str(source).unwrap();
    assert_eq!(
        to_string(&value).unwrap(),
        serde_yaml_ng::to_string(&value).unwrap()
    );
}

#[test]
fn floats_keep_a_dot_and_a_signed_exponent() {
    for (f, text) in [
        (1e30, "1.0e+30\n"),
        (1.5e-7, "1.5e-7\n"),
        (100.0, "100.0\n"),
        (f64::INFINITY, ".inf\n"),
        (f64::NEG_INFINITY, "-.inf\n"),
    ] {
        assert_eq!(to_string(&f).unwrap(), text);
        assert_eq!(serde_yaml_ng::from_str::<f64>(text).unwrap(), f);
    }
}

#[test]
fn long_and_structured_keys_use_the_explicit_form() {
    let long = "k".repeat(200);
    let mut map = Mapping::new();
    map.insert(Value::from(long.as_str()), Value::from("v"));
    map.insert(
        Value::Sequence(vec![Value::from("a"), Value::from("b")]),
        Value::Mapping([(Value::from("x"), Value::from(1))].into_iter().collect()),
    );
    let doc = Value::Mapping(map);
    let text = to_string(&doc).unwrap();
    assert!(text.starts_with(&format!("? {long}\n: v\n")), "{text}");
    assert_eq!(
        serde_yaml_ng::from_str::<Value>(&text).unwrap(),
        doc,
        "{text}"
    );
}
