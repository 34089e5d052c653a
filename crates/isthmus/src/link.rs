//! `isthmus link --cluster NAME`: run against the exporting cluster, prints what the
//! importing cluster applies to reach it (as `linkerd multicluster link` does):
//!
//! - a Secret holding a kubeconfig for the exporting cluster's API server, with the
//!   token of the read-only ServiceAccount `isthmus-link-reader` that
//!   `isthmus install` created (get, list and watch of Services and EndpointSlices,
//!   list of ClusterSettings for the exported namespaces, nothing more);
//! - the `Link` naming the cluster, its gateway's address (the LoadBalancer's, or
//!   `--gateway-address`), its tunnel port, the identity the gateway must present,
//!   and that Secret. The gateway's LoadBalancer exposes the tunnel port only, so
//!   the Link's probe names that port too: a peer learns that the gateway is alive
//!   over the mTLS tunnel, never through its admin port.
//!
//! It only reads the exporting cluster: the ServiceAccount, its token Secret and
//! the gateway Service come from the install. This module also owns how every
//! cluster-facing command finds its cluster ([`KubeArgs`]: `--kubeconfig`,
//! `--context`, else the usual `KUBECONFIG`, `~/.kube/config` or in-cluster
//! account). Not here: applying anything, or checking that the link works (that
//! is [`crate::check`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use isthmus_vocab::{ClusterName, SpiffeId};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Resource as _};
use proxy_discovery::kubectl_yaml;
use proxy_discovery::model::{
    GatewayAddress, Link, LinkResource, LinkResourceSpec, LinkSpec, ProbeSpec,
};
use serde_json::json;

use crate::install;

/// Annotation on the gateway Service naming the identity its pods present.
pub const GATEWAY_IDENTITY_ANNOTATION: &str = "isthmus.io/gateway-identity";

/// How a command reaches a cluster's API server.
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// The kubeconfig file [default: $KUBECONFIG, ~/.kube/config, or the in-cluster
    /// service account].
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context [default: its current context].
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

impl KubeArgs {
    /// The client configuration these flags select.
    pub async fn config(&self) -> Result<kube::Config> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        match (&self.kubeconfig, &self.context) {
            (Some(path), _) => {
                let file = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .with_context(|| format!("using --kubeconfig {}", path.display()))
            }
            (None, Some(context)) => kube::Config::from_kubeconfig(&options)
                .await
                .with_context(|| format!("loading --context {context} from the kubeconfig")),
            (None, None) => kube::Config::infer()
                .await
                .context("finding a cluster: no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a pod; pass --kubeconfig"),
        }
    }

    /// A client for the selected cluster, and its API server's URL.
    pub async fn client(&self) -> Result<(kube::Client, String)> {
        let config = self.config().await?;
        let url = config.cluster_url.to_string();
        let client = kube::Client::try_from(config)
            .with_context(|| format!("building a client for {url}"))?;
        Ok((client, url))
    }
}

/// `isthmus link`.
#[derive(Debug, Args)]
pub struct LinkArgs {
    /// The name of the cluster being linked to (the one the kubeconfig reaches),
    /// as ServiceMirrors in the other cluster will name it.
    #[arg(long)]
    pub cluster: String,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The control plane's namespace, here and in the cluster that applies the output.
    #[arg(long, default_value = install::NAMESPACE)]
    pub namespace: String,
    /// The gateway's address as the other cluster reaches it [default: the
    /// LoadBalancer address of the gateway Service].
    #[arg(long, value_name = "IP_OR_NAME")]
    pub gateway_address: Option<String>,
    /// The gateway's tunnel port as the other cluster reaches it [default: the
    /// gateway Service's isthmus-tunnel port].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub gateway_port: Option<u16>,
    /// The identity the gateway presents [default: the gateway Service's
    /// isthmus.io/gateway-identity annotation].
    #[arg(long, value_name = "SPIFFE_ID")]
    pub gateway_identity: Option<String>,
    /// The API server URL the other cluster uses [default: the kubeconfig's, which
    /// may be a local address the other cluster cannot reach].
    #[arg(long, value_name = "URL")]
    pub api_server: Option<String>,
}

/// What `isthmus link` read from the exporting cluster.
#[derive(Debug, Clone)]
pub struct LinkInput {
    /// The exporting cluster.
    pub cluster: ClusterName,
    /// The control plane's namespace (of the Secret and the Link).
    pub namespace: String,
    /// Where the other cluster reaches the gateway.
    pub gateway_address: GatewayAddress,
    /// The gateway's tunnel port (also what the Link's probe names).
    pub gateway_port: u16,
    /// The identity the gateway must present.
    pub gateway_identity: SpiffeId,
    /// The API server URL written into the kubeconfig.
    pub api_server: String,
    /// The link reader's token.
    pub token: String,
    /// PEM of the API server's CA, when the token Secret holds one.
    pub ca_crt: Option<Vec<u8>>,
}

/// Runs `isthmus link`: prints the Secret and the Link.
pub fn run(args: LinkArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let input = runtime.block_on(read(&args))?;
    print!("{}", render(&input)?);
    Ok(())
}

/// Reads the gateway Service and the link reader's token from the cluster.
pub async fn read(args: &LinkArgs) -> Result<LinkInput> {
    let cluster =
        ClusterName::parse(&args.cluster).map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
    let (client, url) = args.kube.client().await?;
    let ns = &args.namespace;
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let gateway = services
        .get_opt(install::GATEWAY)
        .await
        .with_context(|| format!("reading Service {ns}/{} at {url}", install::GATEWAY))?
        .with_context(|| {
            format!(
                "there is no Service {ns}/{} at {url}: install the mesh first \
                 (isthmus install --cluster {cluster} | kubectl apply -f -)",
                install::GATEWAY
            )
        })?;
    let port_named = |name: &str| {
        gateway
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some(name)))
            .and_then(|p| u16::try_from(p.port).ok())
    };
    let gateway_port = args
        .gateway_port
        .or_else(|| port_named(install::TUNNEL_PORT_NAME))
        .unwrap_or(proxy_discovery::model::DEFAULT_GATEWAY_PORT);
    let address = match &args.gateway_address {
        Some(a) => a.clone(),
        None => load_balancer_address(&gateway).with_context(|| {
            format!(
                "Service {ns}/{} has no LoadBalancer address yet: wait for it \
                 (kubectl -n {ns} get svc {} -w), or pass --gateway-address",
                install::GATEWAY,
                install::GATEWAY
            )
        })?,
    };
    let gateway_address =
        GatewayAddress::parse(&address).map_err(|e| anyhow::anyhow!("the gateway address: {e}"))?;
    // The linking gateway would refuse it: say so now, in its words.
    proxy_core::resolve::GatewayHost::parse(gateway_address.as_str())
        .map_err(|e| anyhow::anyhow!("the gateway address: {e}"))?;
    let identity = match &args.gateway_identity {
        Some(id) => id.clone(),
        None => gateway
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(GATEWAY_IDENTITY_ANNOTATION))
            .cloned()
            .with_context(|| {
                format!(
                    "Service {ns}/{} has no {GATEWAY_IDENTITY_ANNOTATION} annotation: pass \
                     --gateway-identity",
                    install::GATEWAY
                )
            })?,
    };
    let gateway_identity =
        SpiffeId::parse(&identity).map_err(|e| anyhow::anyhow!("the gateway identity: {e}"))?;

    let secrets: Api<Secret> = Api::namespaced(client, ns);
    let token_secret = secrets
        .get_opt(install::LINK_READER_TOKEN)
        .await
        .with_context(|| format!("reading Secret {ns}/{}", install::LINK_READER_TOKEN))?
        .with_context(|| {
            format!(
                "there is no Secret {ns}/{}: install the mesh first",
                install::LINK_READER_TOKEN
            )
        })?;
    let data = token_secret.data.unwrap_or_default();
    let token = data
        .get("token")
        .map(|t| String::from_utf8_lossy(&t.0).trim().to_owned())
        .filter(|t| !t.is_empty())
        .with_context(|| {
            format!(
                "Secret {ns}/{} has no token yet: Kubernetes fills it in a moment after \
                 install; run this again",
                install::LINK_READER_TOKEN
            )
        })?;
    let ca_crt = data.get("ca.crt").map(|c| c.0.clone());
    let api_server = args.api_server.clone().unwrap_or(url);
    Ok(LinkInput {
        cluster,
        namespace: ns.clone(),
        gateway_address,
        gateway_port,
        gateway_identity,
        api_server,
        token,
        ca_crt,
    })
}

/// The first LoadBalancer ingress address of `svc`, an IP or a host name.
pub fn load_balancer_address(svc: &Service) -> Option<String> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
}

/// `isthmus unlink`.
#[derive(Debug, Args)]
pub struct UnlinkArgs {
    /// The cluster linked to, as `isthmus link --cluster` named it.
    #[arg(long)]
    pub cluster: String,
    /// The control plane's namespace, as `isthmus link --namespace` was given it.
    #[arg(long, default_value = install::NAMESPACE)]
    pub namespace: String,
}

/// Runs `isthmus unlink`: prints the Secret and the Link `isthmus link` rendered,
/// for `kubectl delete -f -` in the importing cluster. Its mirrored Services go
/// with their ServiceMirrors, which stay (they report the link missing).
pub fn run_unlink(args: UnlinkArgs) -> Result<()> {
    let cluster =
        ClusterName::parse(&args.cluster).map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
    proxy_discovery::model::check_dns_label("namespace", &args.namespace)
        .map_err(|e| anyhow::anyhow!("--namespace: {e}"))?;
    let ns = &args.namespace;
    let objects = [
        json!({
            "apiVersion": LinkResource::api_version(&()),
            "kind": LinkResource::kind(&()),
            "metadata": { "name": cluster.as_str(), "namespace": ns },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": credentials_secret_name(&cluster), "namespace": ns },
        }),
    ];
    print!(
        "# The link to cluster {cluster}: delete in the cluster that imports its services,\n\
         # with kubectl delete --ignore-not-found -f -\n{}",
        install::documents(&install::deletion_stubs(&objects))
            .context("writing the objects as YAML")?
    );
    Ok(())
}

/// The name of the credentials Secret for a link to `cluster`.
pub fn credentials_secret_name(cluster: &ClusterName) -> String {
    format!("{cluster}-credentials")
}

/// The Secret (kubeconfig) and the Link, as YAML for `kubectl apply -f -`.
pub fn render(input: &LinkInput) -> Result<String> {
    let user = format!("{}-{}", install::LINK_READER, input.cluster);
    let mut cluster = json!({ "server": input.api_server });
    if let Some(ca) = &input.ca_crt {
        // ByteString serialises as base64, the encoding kubeconfig's *-data fields use.
        cluster["certificate-authority-data"] =
            serde_json::to_value(ByteString(ca.clone())).context("encoding the API server's CA")?;
    }
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": input.cluster.as_str(), "cluster": cluster }],
        "users": [{ "name": user, "user": { "token": input.token } }],
        "contexts": [{
            "name": input.cluster.as_str(),
            "context": { "cluster": input.cluster.as_str(), "user": user },
        }],
        "current-context": input.cluster.as_str(),
    });
    let kubeconfig =
        kubectl_yaml::to_string(&kubeconfig).context("writing the kubeconfig as YAML")?;
    let (secret, link) = objects(
        &input.cluster,
        &input.namespace,
        kubeconfig.into_bytes(),
        LinkTarget {
            gateway_address: input.gateway_address.clone(),
            gateway_port: input.gateway_port,
            gateway_identity: input.gateway_identity.clone(),
        },
    );
    if ["://127.", "://localhost", "://[::1]"]
        .iter()
        .any(|local| input.api_server.contains(local))
    {
        eprintln!(
            "warning: the API server of cluster {} is {}, which other clusters cannot reach; \
             pass --api-server with an address they can",
            input.cluster, input.api_server
        );
    }
    let mut out = format!(
        "# The link to cluster {}: apply in the cluster that imports its services.\n",
        input.cluster
    );
    out.push_str(&kubectl_yaml::to_string(&secret).context("writing the Secret as YAML")?);
    out.push_str("---\n");
    out.push_str(&kubectl_yaml::to_string(&link).context("writing the Link as YAML")?);
    Ok(out)
}

/// Where a Link points.
struct LinkTarget {
    gateway_address: GatewayAddress,
    gateway_port: u16,
    gateway_identity: SpiffeId,
}

/// The credentials Secret and the Link of a link to `cluster`, both labelled as
/// part of the mesh.
fn objects(
    cluster: &ClusterName,
    namespace: &str,
    kubeconfig: Vec<u8>,
    target: LinkTarget,
) -> (Secret, LinkResource) {
    let secret_name = credentials_secret_name(cluster);
    let labels: std::collections::BTreeMap<String, String> = [
        (install::PART_OF.0.to_owned(), install::PART_OF.1.to_owned()),
        (
            proxy_discovery::model::REMOTE_CLUSTER_LABEL.to_owned(),
            cluster.to_string(),
        ),
    ]
    .into();
    let secret = Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(secret_name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some([(Link::CREDENTIALS_KEY.to_owned(), ByteString(kubeconfig))].into()),
        ..Secret::default()
    };
    let mut link = LinkResource::new(
        cluster.as_str(),
        LinkResourceSpec {
            link: LinkSpec {
                target_cluster_name: cluster.clone(),
                gateway_address: target.gateway_address,
                gateway_port: target.gateway_port,
                gateway_identity: target.gateway_identity,
                // The tunnel port: the admin port is not on the LoadBalancer.
                probe_spec: ProbeSpec {
                    port: target.gateway_port,
                    ..ProbeSpec::default()
                },
            },
            credentials_secret: Some(secret_name),
        },
    );
    link.metadata.namespace = Some(namespace.to_owned());
    link.metadata.labels = Some(labels);
    (secret, link)
}
