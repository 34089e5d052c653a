//! What `isthmus inject`, `install` and `link` print reads back under YAML 1.1,
//! kubectl's YAML, exactly as under YAML 1.2: every string stays that string,
//! however much it looks like a boolean (`on`, `yes`, `NO`, `y`), a null (`~`,
//! empty), a number (`0777`, `1e3`, `0x1F`, `1:20`, `.inf`), a timestamp
//! (`2001-12-14`), `=`, `<<` or YAML syntax (` leading space`, `a: b`, `#x`), in
//! label and annotation keys and values, names, env values, arguments and
//! ConfigMap data, the user's own strings included.
//!
//! The YAML 1.1 reader is PyYAML's safe loader (`python3-yaml`, which `make test`
//! installs) with the spec's `y`/`n` booleans added; a missing reader fails the
//! test when `CI=true`.

#![allow(clippy::unwrap_used)]

mod binary;
mod installed;

use std::process::{Command, Stdio};
use std::time::Duration;

use installed::{fill_reader_token, put_installed};
use serde_json::{Value, json};
use test_apiserver::TestApiServer;

/// Strings a YAML 1.1 reader takes for something else when they are written plain.
const TRICKY: &[&str] = &[
    "on",
    "yes",
    "no",
    "NO",
    "y",
    "~",
    "0777",
    "1e3",
    "true",
    "null",
    "1:20",
    "2001-12-14",
    "0x1F",
    ".inf",
    "=",
    "<<",
    "",
    " leading space",
    "a: b",
    "#x",
];

/// The same, where a Kubernetes name is required (DNS labels: lowercase letters,
/// digits and `-`).
const TRICKY_NAMES: &[&str] = &[
    "on", "yes", "no", "y", "0777", "1e3", "true", "null", "0x1f", "off",
];

/// The YAML 1.1 reading of `text` (PyYAML's safe loader plus the y/n booleans), every document, as JSON; what JSON cannot say is
/// spelled out (`!date ...`, `!key bool True`), so it compares unequal.
const YAML11_READER: &str = r#"
import json, re, sys, yaml
class Loader(yaml.SafeLoader):
    # The YAML 1.1 boolean type also has y, Y, n, N (Go's yaml.v2 under kubectl
    # resolves them); PyYAML leaves them out.
    bool_values = dict(yaml.SafeLoader.bool_values, y=True, n=False)
Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))
def plain(v):
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else "!float " + repr(v)
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {(k if isinstance(k, str) else "!key %s %r" % (type(k).__name__, k)): plain(x)
                for k, x in v.items()}
    return "!%s %r" % (type(v).__name__, v)
docs = [plain(d) for d in yaml.load_all(sys.stdin.read(), Loader=Loader) if d is not None]
json.dump(docs, sys.stdout)
"#;

/// Whether python3 with PyYAML is here; fails when `CI=true` and it is not.
fn reader_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the YAML 1.1 reader is missing: install python3 and python3-yaml (make test does)"
        );
        eprintln!("skipped: python3 with PyYAML (python3-yaml) is not installed");
    }
    ok
}

fn yaml11(text: &str) -> Result<Vec<Value>, String> {
    let mut python = Command::new("python3");
    python.args(["-c", YAML11_READER]);
    let out = binary::pipe(python, text);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

fn yaml12(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|de| serde::Deserialize::deserialize(de).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Every difference between the two readings, by path.
fn differences(path: &str, v11: &Value, v12: &Value, out: &mut Vec<String>) {
    match (v11, v12) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, x) in b {
                match a.get(k) {
                    Some(y) => differences(&format!("{path}.{k}"), y, x, out),
                    None => out.push(format!("{path}: key {k:?} is not a string key in YAML 1.1")),
                }
            }
            for k in a.keys().filter(|k| !b.contains_key(*k)) {
                out.push(format!("{path}: YAML 1.1 reads key {k:?}"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (y, x)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), y, x, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {b} reads as {a} in YAML 1.1")),
    }
}

/// `text` reads the same under YAML 1.1 as under YAML 1.2.
fn assert_same(what: &str, text: &str) {
    let v12 = yaml12(text);
    let v11 = yaml11(text)
        .unwrap_or_else(|e| panic!("{what}: YAML 1.1 cannot read the output: {e}\n{text}"));
    let mut diffs = Vec::new();
    differences("", &Value::Array(v11), &Value::Array(v12), &mut diffs);
    assert!(
        diffs.is_empty(),
        "{what}: {} values read differently under YAML 1.1:\n{}\n--- output:\n{text}",
        diffs.len(),
        diffs.join("\n")
    );
}

fn isthmus(args: &[&str], stdin: &str) -> String {
    binary::ok(args, stdin)
}

/// A map of every tricky string to itself (and, as keys, prefixed so each is a
/// valid label key where the bare string is not).
fn tricky_map(prefix: &str) -> Value {
    TRICKY
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("{prefix}{i}-{}", s.trim()), json!(s)))
        .chain(TRICKY_NAMES.iter().map(|s| ((*s).to_owned(), json!(s))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// A Deployment and a ConfigMap as a user writes them for kubectl: the tricky
/// strings quoted, as YAML 1.1 needs them, in every place a string goes.
fn user_manifests(name: &str) -> String {
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": name,
            "labels": tricky_map("a/"),
            "annotations": tricky_map("example.com/"),
        },
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {
                    "labels": {"app": name, "on": "on", "yes": "no"},
                    "annotations": tricky_map("b/"),
                },
                "spec": {
                    "serviceAccountName": name,
                    "containers": [{
                        "name": name,
                        "image": "0777",
                        "args": TRICKY,
                        "env": TRICKY.iter().enumerate()
                            .map(|(i, s)| json!({"name": format!("V{i}"), "value": s}))
                            .collect::<Vec<_>>(),
                    }],
                },
            },
        },
    });
    let config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": tricky_map("k"),
    });
    // Every string quoted, as a user must write them for kubectl.
    let text = quoted_yaml(&[deployment, config_map]);
    assert_same("the test's own input", &text);
    text
}

/// `docs` in block style with every scalar single-quoted (PyYAML's writer); all
/// of them are strings.
fn quoted_yaml(docs: &[Value]) -> String {
    let mut python = Command::new("python3");
    python.args([
        "-c",
        "import json, sys, yaml; sys.stdout.write(yaml.safe_dump_all(json.load(sys.stdin), sort_keys=False, default_style=\"'\"))",
    ]);
    let out = binary::pipe(python, &serde_json::to_string(docs).unwrap());
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn inject_output_reads_the_same_in_yaml_1_1() {
    if !reader_available() {
        return;
    }
    for name in TRICKY_NAMES {
        let input = user_manifests(name);
        let out = isthmus(&["inject", "--cluster", name, "--image", "on", "-"], &input);
        assert_same(&format!("isthmus inject --cluster {name}"), &out);
        // The user's strings are still there, as strings.
        let docs = yaml11(&out).unwrap();
        assert_eq!(docs[0]["metadata"]["labels"]["on"], json!("on"));
        assert_eq!(docs[1]["data"]["k0-on"], json!("on"));
        let pod = &docs[0]["spec"]["template"]["spec"];
        let app = pod["containers"].as_array().unwrap().last().unwrap();
        assert_eq!(app["args"], json!(TRICKY));
        assert_eq!(app["env"][6]["value"], json!("0777"));
    }
}

#[test]
fn install_output_reads_the_same_in_yaml_1_1() {
    if !reader_available() {
        return;
    }
    for name in TRICKY_NAMES {
        let out = isthmus(
            &[
                "install",
                "--cluster",
                name,
                "--image",
                "on",
                "--export-namespace",
                name,
                "--cert-manager-namespace",
                name,
            ],
            "",
        );
        assert_same(&format!("isthmus install --cluster {name}"), &out);
    }
    assert_same(
        "isthmus install --crds",
        &isthmus(&["install", "--crds"], ""),
    );
}

#[test]
fn undoing_output_reads_the_same_in_yaml_1_1() {
    if !reader_available() {
        return;
    }
    for name in TRICKY_NAMES {
        let input = user_manifests(name);
        let injected = isthmus(&["inject", "--cluster", name, "-"], &input);
        let out = isthmus(&["uninject", "-"], &injected);
        assert_same(&format!("isthmus uninject (of --cluster {name})"), &out);
        assert_eq!(yaml11(&out).unwrap(), yaml11(&input).unwrap());
        for command in ["uninstall", "unlink"] {
            let out = isthmus(&[command, "--cluster", name], "");
            assert_same(&format!("isthmus {command} --cluster {name}"), &out);
            assert!(out.contains(&format!("name: '{name}'")), "{out}");
        }
    }
}

/// `isthmus link` against an API server holding what `install` rendered for a
/// cluster named like a boolean, with a token that looks like one; the kubeconfig
/// inside the Secret is checked too (client-go reads it as YAML 1.1).
#[tokio::test]
async fn link_output_reads_the_same_in_yaml_1_1() {
    if !reader_available() {
        return;
    }
    for name in ["on", "0777", "null"] {
        let server = TestApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = server.write_kubeconfig(dir.path()).unwrap();
        put_installed(&server, &isthmus(&["install", "--cluster", name], ""));
        fill_reader_token(
            &server,
            &[("token", "yes"), ("namespace", "isthmus-system")],
        );

        let args: Vec<String> = [
            "link",
            "--cluster",
            name,
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--gateway-address",
            "198.18.7.1",
        ]
        .map(str::to_owned)
        .into();
        // The API server runs on this runtime: the binary runs off it.
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::task::spawn_blocking(move || {
                isthmus(&args.iter().map(String::as_str).collect::<Vec<_>>(), "")
            }),
        )
        .await
        .unwrap()
        .unwrap();
        assert_same(&format!("isthmus link --cluster {name}"), &out);
        let docs = yaml11(&out).unwrap();
        assert_eq!(docs[1]["metadata"]["name"], json!(name));
        let data = docs[0]["data"]["kubeconfig"].as_str().unwrap();
        let bytes: k8s_openapi::ByteString = serde_json::from_value(json!(data)).unwrap();
        let text = String::from_utf8(bytes.0).unwrap();
        assert_same("the Secret's kubeconfig", &text);
        assert_eq!(
            yaml11(&text).unwrap()[0]["users"][0]["user"]["token"],
            json!("yes")
        );
    }
}
