//! The image and the workspace agree: every binary the Dockerfile builds is a binary
//! of the workspace and is copied into the image, and every binary the manifests of
//! `isthmus install` (`deploy/`) and `isthmus inject` run is one the image holds,
//! called with flags and `ISTHMUS_*` variables its `--help` lists (so this test
//! needs every binary built: `cargo build --bins`).
//!
//! The image cannot be built here; this keeps its recipe honest.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Binary targets of the workspace's packages, from `cargo metadata`.
fn workspace_bins() -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The Dockerfile with `\`-continued lines joined.
fn dockerfile() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    lines
}

/// `--bin NAME` of the `cargo build` line.
fn built(lines: &[String]) -> BTreeSet<String> {
    let build = lines
        .iter()
        .find(|l| l.contains("cargo build"))
        .expect("the Dockerfile runs cargo build");
    let words: Vec<&str> = build.split_whitespace().collect();
    assert!(words.contains(&"--locked"), "the image is built --locked");
    words
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1].to_owned())
        .collect()
}

/// Binaries copied from the build stage into `/usr/local/bin/`.
fn copied(lines: &[String]) -> BTreeSet<String> {
    lines
        .iter()
        .filter(|l| l.trim_start().starts_with("COPY --from=build"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let source = words[2];
            let dest = words[3];
            let name = source.rsplit('/').next().unwrap();
            assert!(
                source.starts_with("/src/target/release/"),
                "{l}: copies from the release directory"
            );
            assert!(
                dest == "/usr/local/bin/" || dest == format!("/usr/local/bin/{name}"),
                "{l}: lands in /usr/local/bin under its own name"
            );
            name.to_owned()
        })
        .collect()
}

/// `command[0]` of every container of every workload in `text`.
fn commands(text: &str, image: &str) -> BTreeSet<String> {
    fn walk(value: &Value, image: &str, out: &mut BTreeSet<String>) {
        match value {
            Value::Mapping(map) => {
                let is_ours = map
                    .get("image")
                    .and_then(Value::as_str)
                    .is_some_and(|i| i == image);
                if is_ours {
                    let command = map
                        .get("command")
                        .and_then(|c| c.get(0))
                        .and_then(Value::as_str)
                        .unwrap_or_else(|| panic!("a container of {image} without command"));
                    out.insert(command.to_owned());
                }
                for v in map.values() {
                    walk(v, image, out);
                }
            }
            Value::Sequence(items) => items.iter().for_each(|v| walk(v, image, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(de).unwrap();
        walk(&value, image, &mut out);
    }
    out
}

fn image() -> String {
    format!("ghcr.io/isthmus/isthmus:{}", env!("CARGO_PKG_VERSION"))
}

#[test]
fn the_image_builds_and_copies_workspace_binaries() {
    let lines = dockerfile();
    let bins = workspace_bins();
    let built = built(&lines);
    let copied = copied(&lines);
    for bin in &built {
        assert!(
            bins.contains(bin),
            "the Dockerfile builds --bin {bin}, which no workspace package declares (they declare {bins:?})"
        );
    }
    assert_eq!(
        built, copied,
        "every binary built is copied, and only those"
    );
    for needed in [
        "isthmus-proxy",
        "isthmus-init",
        "isthmus-controller",
        "isthmus",
    ] {
        assert!(copied.contains(needed), "the image lacks {needed}");
    }
    let user = lines.iter().rev().find(|l| l.starts_with("USER ")).unwrap();
    assert_eq!(
        user.trim(),
        "USER 2102",
        "the image runs as the proxy's UID"
    );
}

/// The seed's cluster-a manifests as `isthmus inject` prints them.
fn injected_seed() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .env_clear()
        .args(["inject", "--cluster", "cluster-a"])
        .arg(repo().join("examples/seed/cluster-a/cluster-a.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_binary_the_manifests_run_is_in_the_image() {
    let copied = copied(&dockerfile());
    let mut run = BTreeSet::new();

    let injected = commands(&injected_seed(), &image());
    assert_eq!(
        injected,
        BTreeSet::from(["isthmus-init".to_owned(), "isthmus-proxy".to_owned()])
    );
    run.extend(injected);

    for cluster in ["cluster-a", "cluster-b"] {
        let path = repo().join(format!("deploy/{cluster}.yaml"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let installed = commands(&text, &image());
        assert!(
            installed.contains("isthmus-controller") && installed.contains("isthmus-proxy"),
            "{}: {installed:?}",
            path.display()
        );
        run.extend(installed);
    }
    for bin in &run {
        assert!(
            copied.contains(bin),
            "the manifests run {bin}, which the image does not hold"
        );
    }
}

/// The `--flags` and `ISTHMUS_*` variables `bin [subcommand] --help` lists.
fn accepted(bin: &str, subcommand: Option<&str>) -> (BTreeSet<String>, BTreeSet<String>) {
    let path = Path::new(env!("CARGO_BIN_EXE_isthmus"))
        .parent()
        .unwrap()
        .join(bin);
    assert!(
        path.is_file(),
        "{bin} is not built next to isthmus: build every binary first (cargo build --bins)"
    );
    let out = Command::new(&path)
        .env_clear()
        .args(subcommand)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{bin} {subcommand:?} --help failed");
    let help = String::from_utf8(out.stdout).unwrap();
    let words = help.split(|c: char| c.is_whitespace() || c == '[' || c == ']' || c == ',');
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for word in words {
        if let Some(flag) = word.strip_prefix("--") {
            let flag = flag.split(['=', '<']).next().unwrap();
            flags.insert(format!("--{flag}"));
        }
        if let Some(env) = word.strip_suffix('=').filter(|w| w.starts_with("ISTHMUS_")) {
            envs.insert(env.to_owned());
        }
    }
    (flags, envs)
}

/// Every container of our image in `text`: its command, args and env names.
fn containers(text: &str) -> Vec<(String, Vec<String>, Vec<String>)> {
    fn walk(value: &Value, out: &mut Vec<(String, Vec<String>, Vec<String>)>) {
        match value {
            Value::Mapping(map) => {
                if map.get("image").and_then(Value::as_str) == Some(image().as_str()) {
                    let strings = |key: &str, field: Option<&str>| -> Vec<String> {
                        map.get(key)
                            .and_then(Value::as_sequence)
                            .into_iter()
                            .flatten()
                            .filter_map(|v| match field {
                                Some(f) => v.get(f).and_then(Value::as_str),
                                None => v.as_str(),
                            })
                            .map(str::to_owned)
                            .collect()
                    };
                    out.push((
                        strings("command", None).remove(0),
                        strings("args", None),
                        strings("env", Some("name")),
                    ));
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Sequence(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(de).unwrap();
        walk(&value, &mut out);
    }
    out
}

#[test]
fn every_flag_and_variable_the_manifests_pass_is_one_the_binary_accepts() {
    let mut texts = vec![injected_seed()];
    for cluster in ["cluster-a", "cluster-b"] {
        texts.push(std::fs::read_to_string(repo().join(format!("deploy/{cluster}.yaml"))).unwrap());
    }
    let mut seen = 0;
    for text in &texts {
        for (bin, args, env) in containers(text) {
            let subcommand = args
                .first()
                .filter(|a| !a.starts_with('-'))
                .map(String::as_str);
            let (flags, envs) = accepted(&bin, subcommand);
            for arg in args.iter().filter(|a| a.starts_with("--")) {
                let flag = arg.split('=').next().unwrap();
                assert!(
                    flags.contains(flag),
                    "{bin} {subcommand:?} has no {flag}: {flags:?}"
                );
            }
            for name in &env {
                assert!(
                    envs.contains(name),
                    "{bin} {subcommand:?} reads no {name}: {envs:?}"
                );
            }
            seen += 1;
        }
    }
    // The sidecar and init of the seed, then per cluster the controller and gateway.
    assert_eq!(seen, 6);
}

/// The value of `key = "..."` in a TOML file's text (the first such line).
fn toml_string(text: &str, key: &str) -> String {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no {key} = \"...\" line"))
}

#[test]
fn the_pinned_toolchain_is_the_workspace_s_and_the_image_s() {
    let pinned = toml_string(
        &std::fs::read_to_string(repo().join("rust-toolchain.toml")).unwrap(),
        "channel",
    );
    let declared = toml_string(
        &std::fs::read_to_string(repo().join("Cargo.toml")).unwrap(),
        "rust-version",
    );
    assert!(
        pinned == declared || pinned.starts_with(&format!("{declared}.")),
        "rust-toolchain.toml pins {pinned}, the workspace declares rust-version {declared}"
    );
    let from = dockerfile()
        .into_iter()
        .find(|l| l.starts_with("FROM rust:"))
        .unwrap();
    assert!(
        from.starts_with(&format!("FROM rust:{declared}-"))
            || from.starts_with(&format!("FROM rust:{pinned}-")),
        "the image builds with {from:?}, not Rust {pinned}"
    );
}

#[test]
fn the_readme_s_real_cluster_steps_run_the_pushed_image() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("## On real clusters")
        .nth(1)
        .and_then(|s| s.split("```sh").nth(1))
        .and_then(|s| s.split("```").next())
        .unwrap();
    let commands = section.replace("\\\n", " ");
    assert!(commands.contains("docker push"), "the steps push no image");
    let mut rendering = 0;
    for line in commands.lines().map(str::trim) {
        let renders = (line.starts_with("isthmus install") && !line.contains("--crds"))
            || line.starts_with("isthmus inject");
        if renders {
            rendering += 1;
            assert!(
                line.contains("--image"),
                "README: {line:?} renders the default image, not the one pushed"
            );
        }
    }
    assert!(
        rendering >= 4,
        "README: the install and inject steps went missing"
    );
}
