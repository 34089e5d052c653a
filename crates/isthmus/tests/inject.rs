//! `isthmus inject` end to end through the binary: every workload kind, several
//! documents, idempotence, what is left alone and what is refused, the seed's
//! manifests injected and read back as their k8s-openapi types (strictly: nothing
//! kubectl would drop or refuse), identities from csi-driver-spiffe only, the
//! meshed label, and inbound delivery on loopback only for pods that opt in.

#![allow(clippy::unwrap_used)]

mod binary;

use std::path::{Path, PathBuf};
use std::process::Output;

use binary::docs;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_yaml_ng::Value;

/// Runs `isthmus inject --cluster cluster-b ARGS` with `stdin`, in a clean
/// environment.
fn inject(args: &[&str], stdin: &str) -> Output {
    binary::run(
        &[&["inject", "--cluster", "cluster-b"][..], args].concat(),
        stdin,
    )
}

fn inject_ok(stdin: &str) -> (String, String) {
    let out = inject(&["-"], stdin);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "isthmus inject failed: {stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// The stderr of an injection of `stdin` that is refused as a whole: it fails and
/// writes nothing, so a pipe into kubectl applies nothing half-injected.
fn inject_refused(stdin: &str) -> String {
    let out = inject(&["-"], stdin);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "isthmus inject accepted it");
    assert!(out.stdout.is_empty(), "something was written: {stderr}");
    stderr
}

/// Asserts that the error `stderr` names every one of `parts`: the object, the
/// annotation and the bad value.
fn assert_names(stderr: &str, parts: &[&str]) {
    for part in parts {
        assert!(stderr.contains(part), "{part} is not named: {stderr}");
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const TEMPLATE: &str = "
    metadata:
      labels: {app: web}
    spec:
      initContainers:
      - name: migrate
        image: busybox
      containers:
      - name: web
        image: nginx
        ports:
        - containerPort: 8080";

fn every_kind() -> String {
    let indent = |n: usize| {
        TEMPLATE
            .lines()
            .map(|l| {
                if l.is_empty() {
                    String::new()
                } else {
                    format!("{}{l}", " ".repeat(n))
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let selector = "  selector:\n    matchLabels: {app: web}\n";
    let mut text = String::new();
    text.push_str(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: apps\nspec:\n  containers:\n  - name: web\n    image: nginx\n---\n",
    );
    for kind in ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"] {
        text.push_str(&format!(
            "apiVersion: apps/v1\nkind: {kind}\nmetadata:\n  name: {}\n  namespace: apps\nspec:\n{selector}  template:{}\n---\n",
            kind.to_lowercase(),
            indent(0)
        ));
    }
    text.push_str(&format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: job\nspec:\n  template:{}\n      restartPolicy: Never\n---\n",
        indent(0)
    ));
    text.push_str(&format!(
        "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: cron\nspec:\n  schedule: '*/5 * * * *'\n  jobTemplate:\n    spec:\n      template:{}\n          restartPolicy: Never\n---\n",
        indent(4)
    ));
    text.push_str(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: apps\n  annotations: {note: 'kept: as is'}\nspec:\n  ports:\n  - port: 80\n    targetPort: 8080\n  selector: {app: web}\n---\n",
    );
    text.push_str(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  a: '1'\n  b: |\n    two\n    lines\n",
    );
    text
}

/// Parses `value` as `T` the way kubectl would read it: the typed object written
/// back must be the same document, so no field is unknown to the type (k8s-openapi
/// skips unknown fields, and an API server would drop or refuse them), and the
/// YAML has no duplicate key.
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value, what: &str) -> T {
    let text = serde_yaml_ng::to_string(value).unwrap();
    let typed: T = serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("{what} does not parse as its type: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    let original: serde_json::Value = serde_yaml_ng::from_value(value.clone()).unwrap();
    assert_eq!(
        back, original,
        "{what}: a field is unknown to its type, or written differently"
    );
    typed
}

/// The pod spec of an injected workload, checked for everything the mesh adds.
fn check_pod(spec: &PodSpec, metadata: Option<&ObjectMeta>, what: &str) {
    let metadata = metadata.unwrap_or_else(|| panic!("{what}: no metadata"));
    assert_eq!(
        metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("isthmus.io/meshed"))
            .map(String::as_str),
        Some("true"),
        "{what}: not labelled meshed"
    );
    let annotations = metadata
        .annotations
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no annotations"));
    assert_eq!(
        annotations.get("isthmus.io/injected").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION")),
        "{what}"
    );
    let inits = spec.init_containers.as_ref().unwrap();
    let names: Vec<&str> = inits.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(&names[..2], ["isthmus-init", "isthmus-proxy"], "{what}");

    let init = &inits[0];
    let sc = init.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(0), "{what}");
    assert_eq!(sc.run_as_non_root, Some(false), "{what}");
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_owned(), "NET_RAW".to_owned()][..]),
        "{what}"
    );
    let args = init.args.as_ref().unwrap().join(" ");
    assert!(args.contains("--proxy-uid 2102"), "{what}: {args}");
    assert!(args.contains("--outbound-port 4140"), "{what}: {args}");
    assert!(args.contains("--inbound-port 4143"), "{what}: {args}");
    assert!(args.contains("--skip-inbound-ports 4191"), "{what}: {args}");
    assert_eq!(
        init.command.as_deref(),
        Some(&["isthmus-init".to_owned()][..])
    );

    let proxy = &inits[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"), "{what}");
    assert_eq!(proxy.args.as_deref(), Some(&["sidecar".to_owned()][..]));
    let sc = proxy.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(2102), "{what}");
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{what}");
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{what}");
    let env: std::collections::BTreeMap<&str, &str> = proxy
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.as_str(), e.value.as_deref().unwrap()))
        .collect();
    assert_eq!(env["ISTHMUS_CLUSTER"], "cluster-b");
    assert_eq!(env["ISTHMUS_IDENTITY_DIR"], "/var/run/isthmus/identity");
    assert_eq!(env["ISTHMUS_MANIFESTS"], "/var/run/isthmus/discovery");
    // Delivery to the pod's own address unless the pod opts in.
    assert!(
        !env.contains_key("ISTHMUS_INBOUND_LOOPBACK"),
        "{what}: loopback delivery without the annotation"
    );
    let ports: Vec<(Option<&str>, i32)> = proxy
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [
            (Some("isthmus-tunnel"), 4143),
            (Some("isthmus-admin"), 4191)
        ]
    );
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (get.path.clone().unwrap(), get.port.clone())
    };
    let admin = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(4191);
    assert_eq!(
        path(&proxy.readiness_probe),
        ("/ready".to_owned(), admin.clone())
    );
    assert_eq!(path(&proxy.liveness_probe), ("/live".to_owned(), admin));
    let requests = proxy.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));

    let volumes = spec.volumes.as_ref().unwrap();
    let identity = volumes
        .iter()
        .find(|v| v.name == "isthmus-identity")
        .unwrap();
    let csi = identity.csi.as_ref().unwrap();
    // csi-driver-spiffe derives the identity from the pod's ServiceAccount: the
    // volume names none, so a manifest cannot ask for someone else's.
    assert_eq!(csi.driver, "spiffe.csi.cert-manager.io", "{what}");
    assert_eq!(csi.read_only, Some(true), "{what}");
    assert_eq!(
        csi.volume_attributes.clone().unwrap_or_default(),
        [(
            "spiffe.csi.cert-manager.io/fs-group".to_owned(),
            "2102".to_owned()
        )]
        .into(),
        "{what}"
    );
    for volume in volumes {
        if let Some(csi) = &volume.csi {
            assert_eq!(
                csi.driver, "spiffe.csi.cert-manager.io",
                "{what}: volume {}",
                volume.name
            );
        }
    }
    let discovery = volumes
        .iter()
        .find(|v| v.name == "isthmus-discovery")
        .unwrap();
    assert_eq!(
        discovery.config_map.as_ref().unwrap().name,
        "isthmus-discovery"
    );
    let mounts: Vec<&str> = proxy
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(mounts, ["isthmus-identity", "isthmus-discovery"]);
}

fn template_of(t: &PodTemplateSpec, what: &str) {
    check_pod(t.spec.as_ref().unwrap(), t.metadata.as_ref(), what);
    // The app's own containers stay, after the mesh's.
    let spec = t.spec.as_ref().unwrap();
    assert_eq!(spec.containers[0].name, "web", "{what}");
    assert_eq!(
        spec.init_containers.as_ref().unwrap()[2].name,
        "migrate",
        "{what}"
    );
}

#[test]
fn every_workload_kind_is_injected_and_other_objects_are_left_alone() {
    let input = every_kind();
    let (out, stderr) = inject_ok(&input);
    let before = docs(&input);
    let after = docs(&out);
    assert_eq!(before.len(), after.len());

    let pod: Pod = strict(&after[0], "Pod");
    check_pod(pod.spec.as_ref().unwrap(), Some(&pod.metadata), "Pod");
    let d: Deployment = strict(&after[1], "Deployment");
    template_of(&d.spec.unwrap().template, "Deployment");
    let s: StatefulSet = strict(&after[2], "StatefulSet");
    template_of(&s.spec.unwrap().template, "StatefulSet");
    let ds: DaemonSet = strict(&after[3], "DaemonSet");
    template_of(&ds.spec.unwrap().template, "DaemonSet");
    let rs: ReplicaSet = strict(&after[4], "ReplicaSet");
    template_of(&rs.spec.unwrap().template.unwrap(), "ReplicaSet");
    let job: Job = strict(&after[5], "Job");
    template_of(&job.spec.unwrap().template, "Job");
    let cron: CronJob = strict(&after[6], "CronJob");
    template_of(
        &cron.spec.unwrap().job_template.spec.unwrap().template,
        "CronJob",
    );
    // No generic cert-manager CSI volume, whose attributes name any SPIFFE ID.
    assert!(
        !out.replace("spiffe.csi.cert-manager.io", "")
            .contains("csi.cert-manager.io"),
        "{out}"
    );
    // Non-workloads round-trip to the same values.
    assert_eq!(before[7], after[7]);
    assert_eq!(before[8], after[8]);
    assert!(
        stderr.contains("Deployment apps/deployment injected"),
        "{stderr}"
    );
    assert!(stderr.contains("CronJob cron injected"), "{stderr}");
    assert!(
        stderr.contains("Service apps/web is not a workload"),
        "{stderr}"
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    let (once, _) = inject_ok(&every_kind());
    let (twice, stderr) = inject_ok(&once);
    assert_eq!(once, twice, "a second injection changed the output");
    assert!(
        stderr.contains("Deployment apps/deployment already injected"),
        "{stderr}"
    );
    assert!(!stderr.contains(" injected\n"), "{stderr}");
}

/// The sidecar's environment in the first document of injected `text`.
fn proxy_env(text: &str) -> std::collections::BTreeMap<String, String> {
    let value = &docs(text)[0];
    let spec = match value["kind"].as_str().unwrap() {
        "Pod" => strict::<Pod>(value, "Pod").spec.unwrap(),
        _ => strict::<Deployment>(value, "Deployment")
            .spec
            .unwrap()
            .template
            .spec
            .unwrap(),
    };
    let inits = spec.init_containers.unwrap();
    assert!(
        inits[0].env.is_none(),
        "isthmus-init gets no proxy environment"
    );
    inits[1]
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap()))
        .collect()
}

#[test]
fn inbound_loopback_is_set_only_for_pods_that_opt_in() {
    let pod = |annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: debug\n  namespace: apps\n  annotations: {{{annotations}}}\nspec:\n  containers:\n  - name: a\n    image: a\n"
        )
    };
    let deployment = |annotations: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n  annotations: {{isthmus.io/inbound-loopback: 'true'}}\nspec:\n  selector:\n    matchLabels: {{a: b}}\n  template:\n    metadata:\n      labels: {{a: b}}\n      annotations: {{{annotations}}}\n    spec:\n      containers:\n      - name: a\n        image: a\n"
        )
    };
    for (input, expected) in [
        (pod(""), None),
        (pod("other: 'true'"), None),
        (pod("isthmus.io/inbound-loopback: 'false'"), None),
        (pod("isthmus.io/inbound-loopback: 'true'"), Some("true")),
        (
            deployment("isthmus.io/inbound-loopback: 'true'"),
            Some("true"),
        ),
        // The pod's annotations count, not the Deployment's own.
        (deployment(""), None),
    ] {
        let (out, _) = inject_ok(&input);
        let env = proxy_env(&out);
        assert_eq!(
            env.get("ISTHMUS_INBOUND_LOOPBACK").map(String::as_str),
            expected,
            "{input}"
        );
        assert_eq!(env["ISTHMUS_CLUSTER"], "cluster-b");
        // The opt-in survives a second injection unchanged.
        assert_eq!(inject_ok(&out).0, out, "{input}");
    }
    let stderr = inject_refused(&pod("isthmus.io/inbound-loopback: 'yes'"));
    assert_names(
        &stderr,
        &["Pod apps/debug", "isthmus.io/inbound-loopback", "\"yes\""],
    );
}

#[test]
fn host_network_is_refused_by_name_and_the_rest_still_comes_out() {
    let input = "\
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: node-agent
  namespace: kube-system
spec:
  selector:
    matchLabels: {app: agent}
  template:
    metadata:
      labels: {app: agent}
    spec:
      hostNetwork: true
      containers:
      - name: agent
        image: agent
---
apiVersion: v1
kind: Pod
metadata:
  name: fine
spec:
  containers:
  - name: app
    image: app
";
    let out = inject(&["-"], input);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "hostNetwork was not refused");
    assert!(
        stderr.contains("DaemonSet kube-system/node-agent cannot be injected")
            && stderr.contains("hostNetwork"),
        "{stderr}"
    );
    let out = docs(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0],
        docs(input)[0],
        "the refused object must pass unchanged"
    );
    let pod: Pod = serde_yaml_ng::from_value(out[1].clone()).unwrap();
    check_pod(pod.spec.as_ref().unwrap(), Some(&pod.metadata), "Pod");
}

#[test]
fn disabled_workloads_are_untouched() {
    for (place, input) in [
        (
            "object",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    isthmus.io/inject: disabled\nspec:\n  containers:\n  - name: a\n    image: a\n",
        ),
        (
            "template",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  selector:\n    matchLabels: {a: b}\n  template:\n    metadata:\n      labels: {a: b}\n      annotations: {isthmus.io/inject: disabled}\n    spec:\n      containers:\n      - name: a\n        image: a\n",
        ),
    ] {
        let (out, stderr) = inject_ok(input);
        assert_eq!(docs(&out), docs(input), "{place}");
        assert!(
            stderr.contains("isthmus.io/inject: disabled"),
            "{place}: {stderr}"
        );
    }
}

#[test]
fn skip_port_annotations_reach_isthmus_init_and_bad_ones_are_named() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: db-client\n  namespace: apps\n  annotations:\n    isthmus.io/skip-outbound-ports: '5432,6000-6010'\n    isthmus.io/skip-inbound-ports: '22'\nspec:\n  containers:\n  - name: a\n    image: a\n";
    let (out, _) = inject_ok(input);
    let pod: Pod = serde_yaml_ng::from_value(docs(&out)[0].clone()).unwrap();
    let args = pod.spec.unwrap().init_containers.unwrap()[0]
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(args.contains("--skip-inbound-ports 4191,22"), "{args}");
    assert!(
        args.contains("--skip-outbound-ports 5432,6000-6010"),
        "{args}"
    );

    let bad = input.replace("'22'", "'ssh'");
    let stderr = inject_refused(&bad);
    assert_names(
        &stderr,
        &[
            "Pod apps/db-client",
            "isthmus.io/skip-inbound-ports",
            "\"ssh\"",
        ],
    );
}

#[test]
fn invalid_workloads_and_yaml_are_reported_by_place() {
    let stderr = inject_refused(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: broken}\nspec:\n  replicas: many\n",
    );
    assert!(
        stderr.contains("Deployment broken (document 2) is not a valid Deployment"),
        "{stderr}"
    );
    let stderr = inject_refused("a: [\n");
    assert!(stderr.contains("document 1 is not valid YAML"), "{stderr}");
}

#[test]
fn lists_and_in_place_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("list.yaml");
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a}\n  spec:\n    containers:\n    - {name: a, image: a}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec:\n    ports: [{port: 80}]\n";
    std::fs::write(&file, list).unwrap();
    let out = inject(&["--in-place", file.to_str().unwrap()], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let written = std::fs::read_to_string(&file).unwrap();
    let value = &docs(&written)[0];
    let pod: Pod = serde_yaml_ng::from_value(value["items"][0].clone()).unwrap();
    check_pod(
        pod.spec.as_ref().unwrap(),
        Some(&pod.metadata),
        "Pod in a List",
    );
    assert_eq!(value["items"][1], docs(list)[0]["items"][1]);

    let out = inject(&["--in-place", "-"], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("--in-place needs a file")
    );
}

#[test]
fn the_seed_is_injected_and_parses_back() {
    for file in [
        "examples/seed/cluster-a/cluster-a.yaml",
        "examples/seed/cluster-b/cluster-b.yaml",
        "examples/seed/cluster-b/cluster-b-servicemirror.yaml",
    ] {
        let path = repo().join(file);
        let out = inject(&[path.to_str().unwrap()], "");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{file}: {stderr}");
        let text = String::from_utf8(out.stdout).unwrap();
        let input = std::fs::read_to_string(&path).unwrap();
        for (before, after) in docs(&input).into_iter().zip(docs(&text)) {
            match after["kind"].as_str().unwrap() {
                "Deployment" => {
                    let d: Deployment = strict(&after, file);
                    let template = d.spec.unwrap().template;
                    check_pod(
                        template.spec.as_ref().unwrap(),
                        template.metadata.as_ref(),
                        file,
                    );
                }
                "Service" => {
                    let _: k8s_openapi::api::core::v1::Service =
                        serde_yaml_ng::from_value(after.clone()).unwrap();
                    assert_eq!(before, after, "{file}");
                }
                // The ServiceMirror passes through as it was written.
                _ => assert_eq!(before, after, "{file}"),
            }
        }
    }
}
