//! RBAC through unmodified kube-rs clients: ServiceAccount tokens (from a
//! TokenRequest and from a legacy token Secret) are allowed what their Roles
//! and ClusterRoles grant, and refused everything else with the real server's
//! 403; unknown tokens get 401; the admin is always allowed. Also the
//! namespace rule: an object needs its namespace.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use test_apiserver::TestApiServer;

async fn rbac_server() -> TestApiServer {
    TestApiServer::builder()
        .authorize_rbac()
        .start()
        .await
        .unwrap()
}

/// Applies `docs` as the admin, in order, as `kubectl apply` would.
async fn apply(server: &TestApiServer, docs: &[Value]) {
    let client = server.client();
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap();
        let (group, version) = doc["apiVersion"]
            .as_str()
            .unwrap()
            .rsplit_once('/')
            .unwrap_or(("", doc["apiVersion"].as_str().unwrap()));
        let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
        let name = doc["metadata"]["name"].as_str().unwrap();
        let api: Api<kube::api::DynamicObject> = match doc["metadata"]["namespace"].as_str() {
            Some(ns) if caps.scope == kube::discovery::Scope::Namespaced => {
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            _ => Api::all_with(client.clone(), &resource),
        };
        api.patch(name, &PatchParams::apply("test"), &Patch::Apply(doc))
            .await
            .unwrap_or_else(|e| panic!("apply {kind} {name}: {e}"));
    }
}

fn refusal(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn account(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}})
}

/// A Role in `shop` reading Services and patching their status, bound to
/// ServiceAccount shop/reader.
fn reader_grants() -> Vec<Value> {
    vec![
        namespace("shop"),
        namespace("other"),
        account("shop", "reader"),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "services", "namespace": "shop"},
        "rules": [
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["services/status"], "verbs": ["patch"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["settings"]},
        ]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "reader", "namespace": "shop"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "services"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "shop"}]}),
    ]
}

#[tokio::test]
async fn a_service_account_gets_its_grant_and_nothing_more() {
    let server = rbac_server().await;
    apply(&server, &reader_grants()).await;
    let client = server.service_account_client("shop", "reader").unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    services.list(&ListParams::default()).await.unwrap();

    let secrets: Api<Secret> = Api::namespaced(client.clone(), "shop");
    let (code, message) = refusal(secrets.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(code, 403);
    assert_eq!(
        message,
        "secrets is forbidden: User \"system:serviceaccount:shop:reader\" cannot list resource \"secrets\" in API group \"\" in the namespace \"shop\""
    );
    // A Role binds in its namespace only.
    let elsewhere: Api<Service> = Api::namespaced(client.clone(), "other");
    assert_eq!(
        refusal(elsewhere.list(&ListParams::default()).await.unwrap_err()).0,
        403
    );
    let everywhere: Api<Service> = Api::all(client.clone());
    let (code, message) = refusal(everywhere.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(code, 403);
    assert!(message.ends_with("at the cluster scope"), "{message}");

    // Reading is not writing; the status subresource is its own resource.
    let svc: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "hello", "namespace": "shop"}, "spec": {"ports": [{"port": 80}]}}))
    .unwrap();
    Api::<Service>::namespaced(server.client(), "shop")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let (code, message) = refusal(
        services
            .patch(
                "hello",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert!(
        message.starts_with("services \"hello\" is forbidden: User \"system:serviceaccount:shop:reader\" cannot patch resource \"services\""),
        "{message}"
    );
    services
        .patch_status(
            "hello",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {}}})),
        )
        .await
        .unwrap();

    // resourceNames: one ConfigMap, by name only.
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    for name in ["settings", "other"] {
        let cm: ConfigMap = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "shop"}}))
        .unwrap();
        Api::<ConfigMap>::namespaced(server.client(), "shop")
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
    }
    configmaps.get("settings").await.unwrap();
    assert_eq!(refusal(configmaps.get("other").await.unwrap_err()).0, 403);
    assert_eq!(
        refusal(configmaps.list(&ListParams::default()).await.unwrap_err()).0,
        403
    );
}

#[tokio::test]
async fn groups_and_cluster_roles_grant_across_namespaces() {
    let server = rbac_server().await;
    let mut docs = reader_grants();
    docs.extend([
        account("other", "gw"),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "read-endpoints"},
            "rules": [{"apiGroups": ["discovery.k8s.io"], "resources": ["*"], "verbs": ["list", "watch"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "all-accounts-of-other"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "read-endpoints"},
            "subjects": [{"kind": "Group", "name": "system:serviceaccounts:other", "apiGroup": "rbac.authorization.k8s.io"}]}),
    ]);
    apply(&server, &docs).await;
    let slices =
        |client: kube::Client| Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::all(client);
    let gw = server.service_account_client("other", "gw").unwrap();
    slices(gw).list(&ListParams::default()).await.unwrap();
    let reader = server.service_account_client("shop", "reader").unwrap();
    let (code, message) = refusal(
        slices(reader)
            .list(&ListParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert!(
        message.starts_with("endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:shop:reader\" cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\" at the cluster scope"),
        "{message}"
    );
    // The admin is allowed everything.
    slices(server.client())
        .list(&ListParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn tokens_from_requests_and_secrets_and_unknown_ones() {
    let server = rbac_server().await;
    let mut docs = reader_grants();
    docs.push(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "reader-token", "namespace": "shop",
            "annotations": {"kubernetes.io/service-account.name": "reader"}},
        "type": "kubernetes.io/service-account-token"}));
    apply(&server, &docs).await;

    // The legacy Secret is filled in as the token controller would.
    let secret: Secret = Api::namespaced(server.client(), "shop")
        .get("reader-token")
        .await
        .unwrap();
    let data = secret.data.unwrap();
    assert_eq!(data["namespace"].0, b"shop");
    assert!(data.contains_key("ca.crt"));
    let from_secret = String::from_utf8(data["token"].0.clone()).unwrap();

    // A TokenRequest through the API, as kubelet or `kubectl create token` asks.
    let accounts: Api<ServiceAccount> = Api::namespaced(server.client(), "shop");
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": []}}))
    .unwrap();
    let answered = accounts
        .create_token_request("reader", &PostParams::default(), &request)
        .await
        .unwrap();
    let from_request = answered.status.unwrap().token;

    let as_token = |token: &str| {
        let mut config = server.config();
        config.auth_info = serde_json::from_value(json!({"token": token})).unwrap();
        Api::<Service>::namespaced(kube::Client::try_from(config).unwrap(), "shop")
    };
    for token in [&from_secret, &from_request] {
        as_token(token).list(&ListParams::default()).await.unwrap();
        let secrets: Api<Secret> = Api::namespaced(as_token(token).into_client(), "shop");
        assert_eq!(
            refusal(secrets.list(&ListParams::default()).await.unwrap_err()).0,
            403
        );
    }
    let (code, _) = refusal(
        as_token("not-a-token")
            .list(&ListParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 401);

    // Deleting the ServiceAccount ends its tokens.
    accounts
        .delete("reader", &Default::default())
        .await
        .unwrap();
    assert_eq!(
        refusal(
            as_token(&from_request)
                .list(&ListParams::default())
                .await
                .unwrap_err()
        )
        .0,
        401
    );
}

#[tokio::test]
async fn an_object_needs_its_namespace() {
    let server = TestApiServer::start().await;
    let cm: ConfigMap = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "a"}}))
    .unwrap();
    let (code, message) = refusal(
        Api::<ConfigMap>::namespaced(server.client(), "nowhere")
            .create(&PostParams::default(), &cm)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (code, message.as_str()),
        (404, "namespaces \"nowhere\" not found")
    );
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        Api::<ConfigMap>::namespaced(server.client(), ns)
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
    }
}
