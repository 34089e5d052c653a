//! `isthmus install` through the binary: every document parses as its Kubernetes
//! type strictly (nothing kubectl would drop or refuse), the order is the one
//! `kubectl apply` needs, the output is deterministic, the checked-in `deploy/`
//! examples have not drifted, the gateway's LoadBalancer exposes the tunnel port
//! only, identities come from csi-driver-spiffe only (no Certificate anyone could
//! copy), the link reader and the gateway may read exactly what they use, and bad
//! flags are named.

#![allow(clippy::unwrap_used)]

mod binary;

use std::path::{Path, PathBuf};
use std::process::Output;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use proxy_discovery::model::{Object, parse_manifests};
use serde_json::Value;

fn isthmus(args: &[&str]) -> Output {
    binary::run(args, "")
}

fn install(args: &[&str]) -> String {
    binary::ok(&[&["install"][..], args].concat(), "")
}

fn docs(text: &str) -> Vec<Value> {
    let yaml = binary::docs(text).into_iter();
    yaml.map(|d| serde_yaml_ng::from_value(d).unwrap())
        .collect()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The checked-in examples and the flags that render them.
const EXAMPLES: [(&str, &[&str]); 2] = [
    (
        "deploy/cluster-a.yaml",
        &["--cluster", "cluster-a", "--export-namespace", "default"],
    ),
    ("deploy/cluster-b.yaml", &["--cluster", "cluster-b"]),
];

/// Parses `doc` as `T` the way kubectl would read it: the typed object written back
/// must be the same document, so no field is unknown to the type (k8s-openapi
/// skips unknown fields; an API server would drop or refuse them). Duplicate keys
/// already fail in [`docs`].
fn parse<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let what = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what} does not parse as its type: {e}"));
    assert_eq!(
        &serde_json::to_value(&typed).unwrap(),
        doc,
        "{what}: a field is unknown to its type, or written differently"
    );
    typed
}

/// Parses every document as its k8s-openapi type (or, for the mesh's and
/// cert-manager's kinds, checks what their consumers read), returning `kind/name`.
fn check_types(text: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for doc in docs(text) {
        let kind = doc["kind"].as_str().unwrap().to_owned();
        let api = doc["apiVersion"].as_str().unwrap();
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        match (api, kind.as_str()) {
            ("v1", "Namespace") => drop(parse::<Namespace>(&doc)),
            ("v1", "ServiceAccount") => drop(parse::<ServiceAccount>(&doc)),
            ("v1", "Secret") => drop(parse::<Secret>(&doc)),
            ("v1", "Service") => drop(parse::<Service>(&doc)),
            ("apps/v1", "Deployment") => drop(parse::<Deployment>(&doc)),
            ("policy/v1", "PodDisruptionBudget") => {
                let pdb: PodDisruptionBudget = parse(&doc);
                let selector = pdb.spec.unwrap().selector.unwrap().match_labels.unwrap();
                assert_eq!(
                    selector["app.kubernetes.io/name"], name,
                    "selects its Deployment"
                );
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(parse::<ClusterRole>(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                drop(parse::<ClusterRoleBinding>(&doc))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => drop(parse::<Role>(&doc)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(parse::<RoleBinding>(&doc)),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                drop(parse::<CustomResourceDefinition>(&doc))
            }
            ("multicluster.isthmus.io/v1alpha1", "ClusterSettings") => {
                // The same strict parser the proxies' directory source uses.
                let yaml = serde_yaml_ng::to_string(&doc).unwrap();
                let parsed = parse_manifests("install.yaml", &yaml).unwrap();
                assert!(matches!(parsed[0].object, Object::ClusterSettings(_)));
            }
            ("cert-manager.io/v1", "ClusterIssuer") => {
                assert_eq!(
                    doc["spec"],
                    serde_json::json!({"ca": {"secretName": "isthmus-issuer"}})
                );
            }
            ("v1", "ConfigMap") => drop(parse::<ConfigMap>(&doc)),
            other => panic!("unexpected object {other:?} {name}"),
        }
        seen.push(format!("{kind}/{name}"));
    }
    seen
}

#[test]
fn every_document_parses_as_its_type_in_apply_order() {
    let text = install(&["--cluster", "cluster-a"]);
    let seen = check_types(&text);
    let position = |what: &str| {
        seen.iter()
            .position(|s| s == what)
            .unwrap_or_else(|| panic!("{what} missing from {seen:?}"))
    };
    assert_eq!(position("Namespace/isthmus-system"), 0);
    for crd in [
        "CustomResourceDefinition/servicemirrors.linkerd.io",
        "CustomResourceDefinition/links.multicluster.isthmus.io",
        "CustomResourceDefinition/clustersettings.multicluster.isthmus.io",
    ] {
        assert!(
            position(crd) < position("ClusterSettings/cluster-a"),
            "{crd}"
        );
    }
    for later in [
        "Deployment/isthmus-controller",
        "Deployment/isthmus-gateway",
        "Service/isthmus-gateway",
        "ClusterIssuer/isthmus-issuer",
        "ClusterRole/isthmus-identity-requester",
        "RoleBinding/isthmus-identity-requester",
        "Secret/isthmus-link-reader-token",
        "PodDisruptionBudget/isthmus-gateway",
        "PodDisruptionBudget/isthmus-controller",
    ] {
        assert!(position("Namespace/isthmus-system") < position(later));
    }
    // Everything namespaced lives in the control plane's namespace.
    for doc in docs(&text) {
        if let Some(ns) = doc["metadata"]["namespace"].as_str() {
            assert_eq!(ns, "isthmus-system", "{}", doc["metadata"]["name"]);
        }
    }
    assert_eq!(
        text,
        install(&["--cluster", "cluster-a"]),
        "not deterministic"
    );
    let note = |args: &[&str]| String::from_utf8(isthmus(args).stderr).unwrap();
    // Sidecars resolve a gateway named by DNS name: nothing to warn about.
    assert!(note(&["install", "--cluster", "a"]).is_empty());
    assert!(
        note(&[
            "install",
            "--cluster",
            "a",
            "--gateway-cluster-ip",
            "10.96.0.9"
        ])
        .is_empty()
    );
}

#[test]
fn the_checked_in_examples_have_not_drifted() {
    for (file, flags) in EXAMPLES {
        let rendered = install(flags);
        let checked_in = std::fs::read_to_string(repo().join(file)).unwrap();
        assert!(
            rendered == checked_in,
            "{file} differs from what `isthmus install` renders now; regenerate it with\n  \
             cargo run -p isthmus -- install {} > {file}",
            flags.join(" ")
        );
        check_types(&checked_in);
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

#[test]
fn the_gateway_is_exposed_with_its_identity_and_the_settings_name_it() {
    let text = install(&[
        "--cluster",
        "cluster-b",
        "--trust-domain",
        "mesh.example",
        "--gateway-replicas",
        "3",
        "--image",
        "registry.example/isthmus:dev",
        "--gateway-cluster-ip",
        "10.96.0.43",
    ]);
    let docs = docs(&text);
    let svc: Service = parse(find(&docs, "Service", "isthmus-gateway"));
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.43"));
    // The tunnel port and nothing else: the admin port's /metrics and /config are
    // not for whoever reaches the load balancer.
    let ports = spec.ports.unwrap();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0].port, 4143);
    assert_eq!(ports[0].name.as_deref(), Some("isthmus-tunnel"));
    assert_eq!(
        ports[0].target_port,
        Some(
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                "isthmus-tunnel".to_owned()
            )
        )
    );

    let gw: Deployment = parse(find(&docs, "Deployment", "isthmus-gateway"));
    let gw = gw.spec.unwrap();
    assert_eq!(gw.replicas, Some(3));
    let pod = gw.template.spec.unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("registry.example/isthmus:dev"));
    assert_eq!(c.args.as_deref(), Some(&["gateway".to_owned()][..]));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(2102));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("isthmus-gateway"));
    let identity = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "isthmus-identity")
        .unwrap();
    // The gateway's identity follows from its ServiceAccount (csi-driver-spiffe):
    // no Secret holds it, and no Certificate names it.
    assert!(identity.secret.is_none());
    assert_eq!(identity.csi.unwrap().driver, "spiffe.csi.cert-manager.io");
    assert!(!docs.iter().any(|d| d["kind"] == "Certificate"));
    assert!(
        text.contains("--set app.trustDomain=mesh.example"),
        "the header says how to configure the driver"
    );
    let settings = find(&docs, "ClusterSettings", "cluster-b");
    assert_eq!(settings["spec"]["gateway"]["address"], "10.96.0.43");
    assert_eq!(
        settings["spec"]["gateway"]["identity"],
        "spiffe://mesh.example/ns/isthmus-system/sa/isthmus-gateway"
    );
    assert_eq!(settings["spec"]["trustDomain"], "mesh.example");

    let ctl: Deployment = parse(find(&docs, "Deployment", "isthmus-controller"));
    let ctl = ctl.spec.unwrap();
    assert_eq!(ctl.replicas, Some(2));
    let args = ctl.template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(
        args.contains("--namespace isthmus-system") && args.contains("--settings cluster-b"),
        "{args}"
    );
}

/// Every (group, resource, verb) a ClusterRole grants, sorted.
fn grants(role: ClusterRole) -> Vec<(String, String, String)> {
    let mut grants: Vec<(String, String, String)> = Vec::new();
    for rule in role.rules.unwrap() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.unwrap() {
            for resource in rule.resources.clone().unwrap() {
                for verb in &rule.verbs {
                    grants.push((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    grants.sort();
    grants
}

/// The API calls the gateway makes through `--discovery kube`, and only those:
/// keep in step with the gateway's reflectors (proxy-discovery's kube source).
#[test]
fn the_gateway_reads_what_it_routes_by_and_pod_metadata_and_nothing_else() {
    let docs = docs(&install(&["--cluster", "cluster-a"]));
    let role: ClusterRole = parse(find(&docs, "ClusterRole", "isthmus-gateway"));
    let mut expected: Vec<(String, String, String)> = [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        // Whether an endpoint is meshed is read from its pod, never probed.
        ("", "pods"),
        ("multicluster.isthmus.io", "links"),
        ("multicluster.isthmus.io", "clustersettings"),
    ]
    .iter()
    .flat_map(|(g, r)| {
        ["get", "list", "watch"].map(|v| ((*g).to_owned(), (*r).to_owned(), v.to_owned()))
    })
    .collect();
    expected.sort();
    assert_eq!(grants(role), expected);
    let binding: ClusterRoleBinding = parse(find(&docs, "ClusterRoleBinding", "isthmus-gateway"));
    assert_eq!(binding.role_ref.name, "isthmus-gateway");
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (subjects[0].name.as_str(), subjects[0].namespace.as_deref()),
        ("isthmus-gateway", Some("isthmus-system"))
    );
}

/// Every pod spec in `docs`, named.
fn pod_specs(docs: &[Value]) -> Vec<(String, k8s_openapi::api::core::v1::PodSpec)> {
    docs.iter()
        .filter(|d| d["kind"] == "Deployment")
        .map(|d| {
            let deployment: Deployment = parse(d);
            (
                deployment.metadata.name.clone().unwrap(),
                deployment.spec.unwrap().template.spec.unwrap(),
            )
        })
        .collect()
}

/// Identities on a real cluster come from csi-driver-spiffe, which issues a pod
/// its own ServiceAccount's SPIFFE ID only: no generic cert-manager CSI volume and
/// no Certificate (which anyone allowed to create Certificates could copy, and
/// whose Secret anyone allowed to read Secrets could take) names one.
#[test]
fn identities_come_from_csi_driver_spiffe_only() {
    let mut texts: Vec<String> = EXAMPLES
        .iter()
        .map(|(file, _)| std::fs::read_to_string(repo().join(file)).unwrap())
        .collect();
    texts.push(install(&[
        "--cluster",
        "cluster-c",
        "--trust-domain",
        "mesh.example",
    ]));
    for text in &texts {
        let docs = docs(text);
        assert!(!docs.iter().any(|d| d["kind"] == "Certificate"));
        assert!(
            !text
                .replace("spiffe.csi.cert-manager.io", "")
                .contains("csi.cert-manager.io"),
            "a generic cert-manager CSI volume or attribute"
        );
        let mut identity_volumes = 0;
        for (name, spec) in pod_specs(&docs) {
            for volume in spec.volumes.unwrap_or_default() {
                assert!(
                    volume.secret.is_none() || volume.name != "isthmus-identity",
                    "{name}: identity from a Secret"
                );
                if let Some(csi) = volume.csi {
                    assert_eq!(csi.driver, "spiffe.csi.cert-manager.io", "{name}");
                    assert_eq!(
                        csi.volume_attributes.unwrap_or_default(),
                        [(
                            "spiffe.csi.cert-manager.io/fs-group".to_owned(),
                            "2102".to_owned()
                        )]
                        .into(),
                        "{name}: the volume names nothing but the files' group"
                    );
                    identity_volumes += 1;
                }
            }
        }
        assert_eq!(identity_volumes, 1, "the gateway's");
        // The driver creates the gateway's CertificateRequest with the gateway's own
        // token: its ServiceAccount may create them in its namespace, and no more.
        let role: ClusterRole = parse(find(&docs, "ClusterRole", "isthmus-identity-requester"));
        assert_eq!(
            grants(role),
            [(
                "cert-manager.io".to_owned(),
                "certificaterequests".to_owned(),
                "create".to_owned()
            )]
        );
        let binding: k8s_openapi::api::rbac::v1::RoleBinding =
            parse(find(&docs, "RoleBinding", "isthmus-identity-requester"));
        assert_eq!(
            binding.metadata.namespace.as_deref(),
            Some("isthmus-system")
        );
        let subjects = binding.subjects.unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].name, "isthmus-gateway");
        // How cert-manager must run for the driver's approver to be the only one.
        assert!(
            text.contains("--controllers=*\\,-certificaterequests-approver")
                && text.contains("--set app.issuer.name=isthmus-issuer"),
            "the header names the approver set-up"
        );
    }
}

#[test]
fn the_link_reader_reads_what_a_linked_controller_needs_and_nothing_else() {
    let docs = docs(&install(&["--cluster", "cluster-a"]));
    let role: ClusterRole = parse(find(&docs, "ClusterRole", "isthmus-link-reader"));
    let grants = grants(role);
    let expected: Vec<(String, String, String)> = [
        ("", "services", "get"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("multicluster.isthmus.io", "clustersettings", "list"),
    ]
    .iter()
    .map(|(g, r, v)| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned()))
    .collect();
    let mut expected = expected;
    expected.sort();
    assert_eq!(grants, expected);
    // Everything the other cluster's controller calls through the Link is granted.
    for rule in proxy_discovery::manifests::remote_reader_role()
        .rules
        .unwrap()
    {
        for group in rule.api_groups.unwrap() {
            for resource in rule.resources.clone().unwrap() {
                for verb in &rule.verbs {
                    let needed = (group.clone(), resource.clone(), verb.clone());
                    assert!(grants.contains(&needed), "the link reader lacks {needed:?}");
                }
            }
        }
    }

    let binding: ClusterRoleBinding =
        parse(find(&docs, "ClusterRoleBinding", "isthmus-link-reader"));
    assert_eq!(binding.role_ref.name, "isthmus-link-reader");
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].name, "isthmus-link-reader");
    let token: Secret = parse(find(&docs, "Secret", "isthmus-link-reader-token"));
    assert_eq!(
        token.type_.as_deref(),
        Some("kubernetes.io/service-account-token")
    );
    assert_eq!(
        token.metadata.annotations.unwrap()["kubernetes.io/service-account.name"],
        "isthmus-link-reader"
    );
}

#[test]
fn an_issuer_directory_becomes_the_cluster_issuer_secret() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = dir.path().join("anchor");
    let issuer = dir.path().join("issuer");
    for args in [
        vec![
            "identity",
            "trust-anchor",
            "--out",
            anchor.to_str().unwrap(),
        ],
        vec![
            "identity",
            "issuer",
            "--anchor",
            anchor.to_str().unwrap(),
            "--cluster",
            "cluster-a",
            "--out",
            issuer.to_str().unwrap(),
        ],
    ] {
        assert!(isthmus(&args).status.success());
    }
    let text = install(&[
        "--cluster",
        "cluster-a",
        "--issuer",
        issuer.to_str().unwrap(),
    ]);
    let docs = docs(&text);
    let secret: Secret = parse(find(&docs, "Secret", "isthmus-issuer"));
    assert_eq!(secret.metadata.namespace.as_deref(), Some("cert-manager"));
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.unwrap();
    let pem = |key: &str| String::from_utf8(data[key].0.clone()).unwrap();
    // The issuer, then the anchor: cert-manager's CA issuer hands out the chain.
    assert_eq!(pem("tls.crt").matches("BEGIN CERTIFICATE").count(), 2);
    assert!(pem("tls.key").contains("PRIVATE KEY"));
    assert_eq!(
        pem("ca.crt"),
        std::fs::read_to_string(anchor.join("ca.crt")).unwrap()
    );
    // The anchors alone, for csi-driver-spiffe's ca.crt: the driver runs on every
    // node, and must not hold the issuer's key.
    let anchors: ConfigMap = parse(find(&docs, "ConfigMap", "isthmus-trust-anchors"));
    assert_eq!(anchors.metadata.namespace.as_deref(), Some("cert-manager"));
    let data = anchors.data.unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data["ca.crt"], pem("ca.crt"));
    assert!(
        !text.contains("PRIVATE KEY"),
        "the key travels base64 in the Secret only"
    );
    check_types(&text);

    // A trust anchor is not an issuer.
    let out = isthmus(&[
        "install",
        "--cluster",
        "cluster-a",
        "--issuer",
        anchor.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("--issuer") && stderr.contains("trust anchor"),
        "{stderr}"
    );
}

#[test]
fn bad_flags_are_named() {
    for (args, flag) in [
        (vec!["--cluster", "Cluster A"], "--cluster"),
        (
            vec!["--cluster", "a", "--trust-domain", "Not A Domain"],
            "--trust-domain",
        ),
        (
            vec!["--cluster", "a", "--gateway-replicas", "0"],
            "--gateway-replicas",
        ),
        (
            vec!["--cluster", "a", "--export-namespace", "Bad_Ns"],
            "--export-namespace",
        ),
        (
            vec!["--cluster", "a", "--issuer", "/nonexistent"],
            "--issuer",
        ),
    ] {
        let mut all = vec!["install"];
        all.extend(&args);
        let out = isthmus(&all);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

#[test]
fn crds_alone_come_first_and_match_the_full_render() {
    let crds = docs(&install(&["--crds"]));
    assert_eq!(crds.len(), 3);
    let full = docs(&install(&["--cluster", "cluster-a"]));
    for crd in &crds {
        let _: CustomResourceDefinition = parse(crd);
        assert_eq!(
            crd["metadata"]["labels"]["app.kubernetes.io/part-of"], "isthmus",
            "labelled for kubectl wait -l"
        );
        assert!(
            full.contains(crd),
            "{} differs in the full render",
            crd["metadata"]["name"]
        );
    }
    let out = isthmus(&["install", "--crds", "--cluster", "a"]);
    assert!(!out.status.success(), "--crds renders no cluster");
}
