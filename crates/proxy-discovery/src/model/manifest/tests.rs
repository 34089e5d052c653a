use super::*;
use crate::model::{ClusterIp, TargetPort};

fn one(text: &str) -> Result<Object, ManifestError> {
    let mut v = parse_manifests("m.yaml", text)?;
    assert_eq!(v.len(), 1, "{v:?}");
    Ok(v.remove(0).object)
}

fn err(text: &str) -> ManifestError {
    parse_manifests("dir/m.yaml", text).expect_err("must be rejected")
}

const MIRROR: &str = "apiVersion: linkerd.io/v1alpha1
kind: ServiceMirror
metadata:
  name: hello-mirror
  namespace: default
spec:
  cluster: cluster-a
  service:
    name: hello
    namespace: default
";

#[test]
fn parses_every_document_and_keeps_unknown_kinds() {
    let text = format!(
        "{MIRROR}---\n# only a comment\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\ndata: {{a: b}}\n---\n"
    );
    let v = parse_manifests("m.yaml", &text).unwrap();
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].origin.document, 1);
    assert!(matches!(v[0].object, Object::ServiceMirror(_)));
    assert_eq!(v[1].origin.document, 3);
    match &v[1].object {
        Object::Other(o) => {
            assert_eq!(
                (o.kind.as_str(), o.name.as_str(), o.namespace.as_str()),
                ("ConfigMap", "c", "default")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn service_fields() {
    let o = one("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, targetPort: http}\n  - {name: admin, port: \"9090\", targetPort: 9091}\n  selector: {app: web}\n").unwrap();
    let Object::Service(s) = o else { panic!() };
    assert_eq!(s.metadata.namespace(), "default");
    assert_eq!(
        s.spec.cluster_ip,
        Some(ClusterIp::Addr("10.96.0.10".parse().unwrap()))
    );
    assert_eq!(
        s.spec.ports[0].target_port,
        Some(TargetPort::Name("http".into()))
    );
    assert_eq!(s.spec.ports[1].port, 9090);
    assert_eq!(s.spec.ports[1].target_port, Some(TargetPort::Number(9091)));
    let o = one("apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None}\n")
        .unwrap();
    let Object::Service(s) = o else { panic!() };
    assert!(s.cluster_ips().is_empty());
}

#[test]
fn missing_field_names_file_document_object_and_path() {
    let e = err(&format!(
        "{MIRROR}---\napiVersion: linkerd.io/v1alpha1\nkind: ServiceMirror\nmetadata: {{name: m2}}\nspec:\n  service: {{name: x}}\n"
    ));
    assert_eq!(e.document(), Some(2));
    assert_eq!(e.field(), Some("spec.cluster"));
    assert_eq!(
        e.to_string(),
        "dir/m.yaml: document 2 (ServiceMirror default/m2): spec.cluster: missing field (line 16)"
    );
}

#[test]
fn unknown_spec_field_is_rejected_for_our_kinds() {
    let e = err(&MIRROR.replace(
        "  cluster: cluster-a\n",
        "  cluster: cluster-a\n  clustr: x\n",
    ));
    assert_eq!(e.field(), Some("spec.clustr"));
    assert!(e.message().starts_with("unknown field"), "{e}");
}

#[test]
fn bad_values_name_their_path() {
    let e = err(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - port: 70000\n",
    );
    assert_eq!(e.field(), Some("spec.ports[0].port"), "{e}");
    assert_eq!(e.line(), Some(6));
    let e = err(
        "apiVersion: multicluster.isthmus.io/v1alpha1\nkind: Link\nmetadata: {name: a}\nspec:\n  targetClusterName: cluster-a\n  gatewayAddress: 198.18.0.1\n  gatewayIdentity: https://x/y\n",
    );
    assert_eq!(e.field(), Some("spec.gatewayIdentity"), "{e}");
    assert!(e.message().contains("spiffe://"), "{e}");
    let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: Web}\n");
    assert_eq!(e.field(), Some("metadata.name"), "{e}");
    let e = err(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}, {port: 81}]\n",
    );
    assert_eq!(e.field(), Some("spec.ports[0].name"), "{e}");
    let e = err(
        "apiVersion: multicluster.isthmus.io/v1alpha1\nkind: ClusterSettings\nmetadata: {name: a}\nspec:\n  clusterName: a\n  serviceCIDR: 10.0.0.1/8\n",
    );
    assert_eq!(e.field(), Some("spec.serviceCIDR"), "{e}");
    let e = err(
        "apiVersion: multicluster.isthmus.io/v1alpha1\nkind: ClusterSettings\nmetadata: {name: a}\nspec:\n  clusterName: a\n  exportedNamespaces: [ok, Not_Ok]\n",
    );
    assert_eq!(e.field(), Some("spec.exportedNamespaces[1]"), "{e}");
}

#[test]
fn link_defaults_and_string_ports() {
    let o = one("apiVersion: multicluster.isthmus.io/v1alpha1\nkind: Link\nmetadata: {name: cluster-a, namespace: isthmus}\nspec:\n  targetClusterName: cluster-a\n  gatewayAddress: Gateway.Cluster-A.example.\n  gatewayPort: \"4143\"\n  gatewayIdentity: spiffe://cluster-a.local/ns/isthmus/sa/gateway\n").unwrap();
    let Object::Link(l) = o else { panic!() };
    assert_eq!(l.spec.gateway_address.as_str(), "gateway.cluster-a.example");
    assert_eq!(l.spec.gateway_port, 4143);
    assert_eq!(l.spec.probe_spec, crate::model::ProbeSpec::default());
    assert_eq!(l.spec.probe_spec.port, 4191);
}

#[test]
fn structural_errors() {
    let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: [x\n");
    assert_eq!(e.document(), Some(1));
    assert!(e.line().is_some(), "{e}");
    let e = err("- a\n- b\n");
    assert!(e.message().contains("mapping"), "{e}");
    let e = err("kind: Service\nmetadata: {name: a}\n");
    assert_eq!(e.field(), Some("apiVersion"));
    let e = err("apiVersion: linkerd.io/v1beta9\nkind: ServiceMirror\nmetadata: {name: a}\n");
    assert_eq!(e.field(), Some("apiVersion"));
    // Another project's Link is somebody else's kind, not a typo of ours.
    let o = one("apiVersion: multicluster.linkerd.io/v1alpha3\nkind: Link\nmetadata: {name: a}\nspec: {anything: 1}\n").unwrap();
    assert!(matches!(o, Object::Other(_)));
}

#[test]
fn deployment_for_the_lab() {
    let o = one("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {app: x}}\n  template:\n    metadata: {labels: {app: x}}\n    spec:\n      containers:\n      - name: c\n        image: img\n        ports: [{containerPort: 8000, name: http}]\n        command: [\"/bin/sh\", \"-c\"]\n        args: [\"echo hi\"]\n        env: [{name: A, value: b}]\n").unwrap();
    let Object::Deployment(d) = o else { panic!() };
    assert_eq!(d.spec.replicas, 1);
    let c = &d.spec.template.spec.containers[0];
    assert_eq!(c.ports[0].container_port, 8000);
    assert_eq!(c.command, ["/bin/sh", "-c"]);
    assert_eq!(c.env[0].value.as_deref(), Some("b"));
    assert_eq!(d.spec.template.metadata.labels["app"], "x");
}
