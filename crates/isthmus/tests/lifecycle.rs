//! The lifecycle of what the CLI renders: injecting an injected workload gives
//! exactly a fresh injection (twice is once, byte for byte), uninject gives back
//! the workload as it was for every kind inject supports and refuses what it cannot
//! undo, workloads are read as kubectl reads YAML 1.1, and uninstall and unlink
//! name exactly what install and link create, each labelled part of the mesh.

#![allow(clippy::unwrap_used)]

mod binary;

use binary::{docs, ok, run};
use serde_yaml_ng::Value;

/// Every workload kind inject supports, bare: no init containers, volumes,
/// annotations or template labels beyond what the kind needs, so that inject
/// creates every map and list it fills; with `own`, each pod already has an init
/// container and a volume of its own.
fn workloads(own: bool) -> String {
    let pod_spec = |indent: &str| {
        let mut spec = format!("{indent}spec:\n");
        if own {
            spec.push_str(&format!(
                "{indent}  initContainers:\n{indent}  - {{name: migrate, image: busybox}}\n\
                 {indent}  volumes:\n{indent}  - {{name: data, emptyDir: {{}}}}\n"
            ));
        }
        spec.push_str(&format!(
            "{indent}  containers:\n{indent}  - name: web\n{indent}    image: nginx\n"
        ));
        spec
    };
    let mut text = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n{}",
        pod_spec("")
    );
    for kind in ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"] {
        text.push_str(&format!(
            "---\napiVersion: apps/v1\nkind: {kind}\nmetadata:\n  name: w\nspec:\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n{}",
            pod_spec("    ")
        ));
    }
    text.push_str(&format!(
        "---\napiVersion: batch/v1\nkind: Job\nmetadata:\n  name: j\nspec:\n  template:\n{}      restartPolicy: Never\n",
        pod_spec("    ")
    ));
    text.push_str(&format!(
        "---\napiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: c\nspec:\n  schedule: '@daily'\n  jobTemplate:\n    spec:\n      template:\n        metadata:\n          labels: null\n          annotations: {{keep: me}}\n{}          restartPolicy: Never\n",
        pod_spec("        ")
    ));
    text
}

/// `text` with the Pod (its first document) annotated to skip outbound port 5432.
fn skipping_5432(text: &str) -> String {
    let mut all = docs(text);
    let metadata = all[0]["metadata"].as_mapping_mut().unwrap();
    let annotations = metadata
        .entry("annotations".into())
        .or_insert_with(|| Value::Mapping(Default::default()));
    annotations
        .as_mapping_mut()
        .unwrap()
        .insert("isthmus.io/skip-outbound-ports".into(), "5432".into());
    all.iter()
        .map(|d| serde_yaml_ng::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

fn inject(args: &[&str], input: &str) -> String {
    let mut all = vec!["inject", "--cluster", "cluster-b"];
    all.extend(args);
    all.push("-");
    ok(&all, input)
}

#[test]
fn injecting_an_injected_workload_gives_exactly_a_fresh_injection() {
    for input in [workloads(false), workloads(true)] {
        let once = inject(&[], &input);
        assert_eq!(inject(&[], &once), once, "inject twice is not inject once");
        // A new image and cluster replace the old ones, and nothing else remains.
        let args = [
            "--image",
            "registry.example/isthmus:2",
            "--cluster",
            "cluster-c",
        ];
        let fresh = ok(&[&["inject"][..], &args, &["-"]].concat(), &input);
        let again = ok(&[&["inject"][..], &args, &["-"]].concat(), &once);
        assert_eq!(again, fresh, "re-injection differs from a fresh injection");
        assert!(!again.contains("ghcr.io/isthmus") && !again.contains("cluster-b"));
        // Settings come from the annotations as they are now.
        let updated = inject(&[], &skipping_5432(&once));
        assert!(updated.contains("5432"));
        assert_eq!(
            updated,
            inject(&[], &skipping_5432(&input)),
            "re-injection ignores the workload's annotations"
        );
    }
}

#[test]
fn uninject_gives_back_every_workload_as_it_was() {
    for input in [workloads(false), workloads(true)] {
        let injected = inject(&[], &input);
        assert_ne!(docs(&injected), docs(&input));
        let out = run(&["uninject", "-"], &injected);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(stderr.matches(" uninjected").count(), 7, "{stderr}");
        let back = String::from_utf8(out.stdout).unwrap();
        assert!(
            docs(&back) == docs(&input),
            "uninject(inject(x)) is not x:\n{back}"
        );
        // Uninjecting what is not injected changes nothing.
        assert!(docs(&ok(&["uninject", "-"], &back)) == docs(&input));
    }
}

/// Uninjects `input`, which must be refused with `why` for its first object, and
/// that object left as it was.
fn refused_uninject(input: &str, why: &str) {
    let out = run(&["uninject", "-"], input);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "uninject accepted it: {stderr}");
    assert!(
        stderr.contains("Pod p cannot be uninjected") && stderr.contains(why),
        "{stderr}"
    );
    assert!(docs(&String::from_utf8(out.stdout).unwrap())[0] == docs(input)[0]);
}

#[test]
fn uninject_refuses_what_it_cannot_undo_and_leaves_it_as_it_was() {
    // A sidecar added by hand: uninject cannot know what else came with it.
    let by_hand = workloads(false).replacen(
        "  - name: web\n    image: nginx\n",
        "  - name: web\n    image: nginx\n  - name: isthmus-proxy\n    image: mine\n",
        1,
    );
    refused_uninject(&by_hand, "no isthmus.io/injected annotation");
    // A record of created fields naming one inject never creates.
    let injected = inject(&[], &workloads(false));
    let tampered = injected.replacen(
        "isthmus.io/injected-created: metadata.labels",
        "isthmus.io/injected-created: spec.containers metadata.labels",
        1,
    );
    assert_ne!(tampered, injected);
    refused_uninject(&tampered, "\"spec.containers\", which inject never creates");
    // What the user added to a list inject created stays when the mesh goes.
    let grown = injected.replacen(
        "  volumes:\n",
        "  volumes:\n  - name: added-later\n    emptyDir: {}\n",
        1,
    );
    let back = ok(&["uninject", "-"], &grown);
    assert!(docs(&back)[0]["spec"]["volumes"][0]["name"] == "added-later");
}

#[test]
fn workloads_are_read_as_kubectl_reads_yaml_1_1() {
    let input = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: w\n  labels: {a: 'yes'}\nspec:\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web, on: 'on'}\n    spec:\n      hostNetwork: no\n      containers:\n      - name: web\n        image: nginx\n        tty: yes\n        env: [{name: A, value: 'yes'}]\n        securityContext: {runAsUser: 0x3E8}\n      volumes:\n      - name: conf\n        configMap: {name: conf, defaultMode: 0644, items: [{key: a, path: a, mode: 0o755}]}\n";
    let out = docs(&inject(&[], input));
    let spec = &out[0]["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], Value::Bool(false));
    let web = spec["containers"][0].clone();
    assert_eq!(web["tty"], Value::Bool(true));
    assert_eq!(web["securityContext"]["runAsUser"], Value::from(1000));
    // Strings stay strings where the type wants a string.
    assert_eq!(web["env"][0]["value"], Value::from("yes"));
    assert_eq!(out[0]["metadata"]["labels"]["a"], Value::from("yes"));
    assert_eq!(
        out[0]["spec"]["template"]["metadata"]["labels"]["on"],
        Value::from("on")
    );
    let conf = &spec["volumes"][0]["configMap"];
    assert_eq!(conf["defaultMode"], Value::from(0o644));
    assert_eq!(conf["items"][0]["mode"], Value::from(0o755));
    // What YAML 1.1 cannot make an integer of is still refused, by name.
    let bad = input.replace("0644", "0648");
    let out = run(&["inject", "--cluster", "c", "-"], &bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Deployment w") && stderr.contains("\"0648\""),
        "{stderr}"
    );
}

/// `(apiVersion, kind, namespace, name)` of every document.
fn names(text: &str) -> Vec<(String, String, String, String)> {
    docs(text)
        .iter()
        .map(|d| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (
                s(&d["apiVersion"]),
                s(&d["kind"]),
                s(&d["metadata"]["namespace"]),
                s(&d["metadata"]["name"]),
            )
        })
        .collect()
}

#[test]
fn every_installed_object_is_labelled_and_uninstall_names_each_in_reverse() {
    let installed = ok(&["install", "--cluster", "cluster-a"], "");
    for doc in docs(&installed) {
        assert_eq!(
            doc["metadata"]["labels"]["app.kubernetes.io/part-of"],
            Value::from("isthmus"),
            "{} {:?} lacks the part-of label",
            doc["kind"].as_str().unwrap(),
            doc["metadata"]["name"]
        );
    }
    let uninstall = ok(&["uninstall", "--cluster", "cluster-a"], "");
    assert!(uninstall.contains("kubectl delete"));
    let mut expected = names(&installed);
    // With --issuer, install also renders these two; uninstall always names them.
    expected.push((
        "v1".into(),
        "Secret".into(),
        "cert-manager".into(),
        "isthmus-issuer".into(),
    ));
    expected.push((
        "v1".into(),
        "ConfigMap".into(),
        "cert-manager".into(),
        "isthmus-trust-anchors".into(),
    ));
    let mut named = names(&uninstall);
    let (a, b) = (named.clone(), expected.clone());
    named.sort();
    expected.sort();
    assert_eq!(named, expected, "uninstall and install disagree");
    // Reverse order: the Deployments go before their namespace and the CRDs.
    let position = |kind: &str| a.iter().position(|n| n.1 == kind).unwrap();
    assert!(position("Deployment") < position("Namespace"));
    assert!(position("Deployment") < position("CustomResourceDefinition"));
    assert!(b.iter().position(|n| n.1 == "Namespace").unwrap() == 0);
    for doc in docs(&uninstall) {
        let keys: Vec<_> = doc["metadata"]
            .as_mapping()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert!(keys.len() <= 2, "uninstall prints more than names: {doc:?}");
    }
}

#[test]
fn unlink_names_what_link_creates() {
    let out = ok(&["unlink", "--cluster", "cluster-a"], "");
    assert!(out.contains("kubectl delete"));
    assert_eq!(
        names(&out),
        [
            (
                "multicluster.isthmus.io/v1alpha1".to_owned(),
                "Link".to_owned(),
                "isthmus-system".to_owned(),
                "cluster-a".to_owned()
            ),
            (
                "v1".to_owned(),
                "Secret".to_owned(),
                "isthmus-system".to_owned(),
                "cluster-a-credentials".to_owned()
            ),
        ]
    );
    let out = run(&["unlink", "--cluster", "Not_A_Name"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster"));
}
