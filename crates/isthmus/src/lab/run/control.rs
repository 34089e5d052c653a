//! The control plane of every lab cluster, brought up as on a real cluster: an
//! API server, `isthmus install`'s output and the cluster's own manifests applied
//! to it, the clusters linked by applying `isthmus link`'s output, and the
//! controller run from the Deployment `install` rendered (its command, arguments
//! and replicas, one network namespace per replica on the cluster's bridge, as
//! the proxy UID), electing its leader by Lease.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use isthmus_vocab::SpiffeId;
use isthmus_vocab::ports::PROXY_UID;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use proxy_discovery::model::GatewayAddress;

use super::super::apiserver::{self, API_NET};
use super::super::apply::{self, Verb};
use super::super::plan::{RELAY_PORT, TUNNEL_PORT, gateway_name};
use super::super::process::spawn;
use super::{Lab, Role};
use crate::install::{self, CONTROLLER, InstallOptions, LINK_READER_TOKEN, NAMESPACE};
use crate::link::{self, LinkInput};

/// Most controller replicas a lab cluster runs: `.3` to `.9` of its bridge.
const MAX_CONTROLLERS: usize = 7;

impl Lab {
    /// Starts every cluster's API server and applies the install and the
    /// cluster's manifests to it, then links the clusters.
    pub(super) async fn start_control_plane(&mut self) -> Result<()> {
        let lab = self.lab_ns()?;
        for (ci, c) in self.plan.clusters.iter().enumerate() {
            let name = c.spec.name.as_str();
            let dir = self.dir(&["kube", name]);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let kubeconfig = dir.join("kubeconfig");
            let range = c.service_cidr.to_string();
            let child = spawn(apiserver::command(
                &self.bins.apiserver,
                &range,
                &kubeconfig,
            ))?;
            self.supervise(child, format!("{name}/test-apiserver"), Role::Helper);
            let public = apiserver::public_addr(ci);
            lab.add_addr("lo", &format!("{}/32", public.ip()))?;
            let server = apiserver::connect(&lab, &kubeconfig, public)
                .await
                .with_context(|| format!("the API server of cluster {name}"))?;
            println!(
                "[{name}] API server at {} (kubeconfig {})",
                server.public,
                server.kubeconfig.display()
            );
            apply::prerequisites(&server.client)
                .await
                .with_context(|| format!("preparing the API server of cluster {name}"))?;
            let options = InstallOptions {
                cluster: c.spec.name.clone(),
                trust_domain: c.spec.trust_domain().to_owned(),
                image: install::default_image(),
                gateway_replicas: 1,
                export_namespaces: c.spec.install.exported_namespaces.clone(),
                gateway_cluster_ip: Some(c.gateway_cluster_ip),
                issuer: None,
                cert_manager_namespace: install::DEFAULT_CERT_MANAGER_NAMESPACE.to_owned(),
            };
            let origin = format!("isthmus install --cluster {name}");
            let text = install::render(&options).with_context(|| origin.clone())?;
            apply::run(&server.client, Verb::Apply, &origin, &text).await?;
            for (file, text) in &c.spec.files {
                // The Services `isthmus.yaml` exports carry the export label.
                let text = apply::edit(file, text, |o| {
                    let key = proxy_discovery::ServiceRef::new(
                        o["metadata"]["namespace"].as_str().unwrap_or("default"),
                        o["metadata"]["name"].as_str().unwrap_or_default(),
                    );
                    if o["kind"] == "Service" && c.spec.exports.contains(&key) {
                        o["metadata"]["labels"][proxy_discovery::model::EXPORTED_LABEL] =
                            "true".into();
                    }
                })?;
                apply::ensure_namespaces(&server.client, file, &text).await?;
                apply::run(&server.client, Verb::Apply, file, &text).await?;
            }
            self.apiservers.push(server);
        }
        Ok(())
    }

    /// Links every cluster to its peers with `isthmus link`'s output.
    pub(super) async fn link_clusters(&mut self) -> Result<()> {
        for (ci, c) in self.plan.clusters.iter().enumerate() {
            for l in &c.spec.links {
                let Some(pi) = self.plan.clusters.iter().position(|p| &p.spec.name == l) else {
                    continue;
                };
                let text = self.link_output(pi).await?;
                let origin = format!("isthmus link --cluster {l}");
                apply::run(&self.apiservers[ci].client, Verb::Apply, &origin, &text)
                    .await
                    .with_context(|| format!("linking cluster {} to {l}", c.spec.name))?;
            }
        }
        Ok(())
    }

    /// What `isthmus link --cluster PEER` prints, run against cluster `pi`: its
    /// link reader's token, its API server as the lab's pods reach it, its
    /// gateway on the WAN by its public name (as a cloud load balancer's
    /// hostname; through the delay relay with `--wan-delay`).
    async fn link_output(&self, pi: usize) -> Result<String> {
        let peer = &self.plan.clusters[pi];
        let secrets: Api<Secret> = Api::namespaced(self.apiservers[pi].client.clone(), NAMESPACE);
        // A server that does not populate token Secrets authorizes everyone.
        let token = secrets
            .get_opt(LINK_READER_TOKEN)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.data)
            .and_then(|d| {
                d.get("token")
                    .map(|t| String::from_utf8_lossy(&t.0).into_owned())
            })
            .unwrap_or_default();
        let input = LinkInput {
            cluster: peer.spec.name.clone(),
            namespace: NAMESPACE.to_owned(),
            gateway_address: GatewayAddress::parse(&gateway_name(peer.spec.name.as_str()))
                .map_err(|e| anyhow::anyhow!("the gateway address of {}: {e}", peer.spec.name))?,
            gateway_port: if self.plan.wan_delay_ms > 0 {
                RELAY_PORT
            } else {
                TUNNEL_PORT
            },
            gateway_identity: SpiffeId::parse(&peer.gateway_identity)
                .with_context(|| format!("identity {}", peer.gateway_identity))?,
            api_server: format!("http://{}", self.apiservers[pi].public),
            token,
            ca_crt: None,
        };
        link::render(&input)
    }

    /// A kubeconfig holding a token of the ServiceAccount that Deployment
    /// `deployment` of the mesh's namespace runs as in cluster `ci`: a
    /// component gets what `isthmus install` grants it, nothing more.
    pub(super) async fn account_kubeconfig(&self, ci: usize, deployment: &str) -> Result<PathBuf> {
        let server = &self.apiservers[ci];
        let d = Api::<Deployment>::namespaced(server.client.clone(), NAMESPACE)
            .get(deployment)
            .await
            .with_context(|| format!("reading Deployment {NAMESPACE}/{deployment}"))?;
        let account = (d.spec.and_then(|s| s.template.spec))
            .and_then(|s| s.service_account_name)
            .unwrap_or_else(|| "default".to_owned());
        server.service_account_kubeconfig(NAMESPACE, &account).await
    }

    /// Runs each cluster's controller as its Deployment says: command and
    /// arguments, environment values, replicas, ServiceAccount.
    pub(super) async fn start_controllers(&mut self, bin: &Path) -> Result<()> {
        let lab = self.lab_ns()?;
        let log = self.log_filter();
        for (ci, c) in self.plan.clusters.iter().enumerate() {
            let name = c.spec.name.as_str();
            let deployments: Api<Deployment> =
                Api::namespaced(self.apiservers[ci].client.clone(), NAMESPACE);
            let d = deployments.get(CONTROLLER).await.with_context(|| {
                format!("reading Deployment {NAMESPACE}/{CONTROLLER} of {name}")
            })?;
            let spec = d.spec.unwrap_or_default();
            let container = spec
                .template
                .spec
                .and_then(|s| s.containers.into_iter().next())
                .with_context(|| {
                    format!("Deployment {NAMESPACE}/{CONTROLLER} of {name} has no container")
                })?;
            let replicas = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(1);
            let kubeconfig = self.account_kubeconfig(ci, CONTROLLER).await?;
            for r in 0..replicas.min(MAX_CONTROLLERS) {
                let pod = format!("{CONTROLLER}-{r}");
                let host = u8::try_from(3 + r).expect("bounded by MAX_CONTROLLERS");
                let ip = std::net::Ipv4Addr::from({
                    let mut o = c.bridge_ip.octets();
                    o[3] = host;
                    o
                });
                let ns = self.net.namespace(&format!("{name}-ctl{r}"))?;
                self.net
                    .attach_at(&lab, &self.bridges[ci], &ns, "eth0", (ip, 24))?;
                ns.add_route(&api_route(), &c.bridge_ip.to_string())?;
                let command = container.command.clone().unwrap_or_default();
                let program = command
                    .first()
                    .context("the controller container has no command")?;
                let mut cmd = self
                    .net
                    .command_as(&ns, bin.join(program), PROXY_UID, PROXY_UID);
                cmd.args(&command[1..])
                    .args(container.args.clone().unwrap_or_default())
                    .env("HOSTNAME", &pod)
                    .env("KUBECONFIG", &kubeconfig)
                    .env("RUST_LOG", &log)
                    .env("ISTHMUS_LOG", &log);
                for e in container.env.iter().flatten() {
                    cmd.env(&e.name, e.value.clone().unwrap_or_default());
                }
                let child = spawn(cmd)?;
                self.supervise(child, format!("{name}/{pod}"), Role::Proxy);
            }
        }
        Ok(())
    }
}

/// The route every lab namespace needs to the API servers.
pub(super) fn api_route() -> String {
    format!("{}.{}.{}.0/24", API_NET[0], API_NET[1], API_NET[2])
}
