//! Each lab cluster's API server: a `test-apiserver` process on this machine's
//! loopback (where `isthmus lab apply` and kubectl reach it), and the address
//! the lab's pods reach it at, `198.18.251.<i+1>:6443` in the lab namespace,
//! relayed by the lab itself to the loopback port. It authorizes by RBAC, as a
//! cluster's does. Kubeconfigs are recorded in the run's directory:
//! `kube/<cluster>/kubeconfig` (the admin's, on loopback: the lab's own and
//! what `isthmus lab kubeconfig` prints) and, per component,
//! `kube/<cluster>/sa-<namespace>-<name>.kubeconfig` (a ServiceAccount's token,
//! at the pods' address: what a pod running as it holds).
//!
//! Not here: what is applied to it ([`super::apply`]), or the processes that
//! read it (the controller and gateways, [`super::run`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_netns::Namespace;
use isthmus_vocab::ports::PROXY_UID;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::unistd::{Gid, Uid, chown};

/// The network of the API servers' addresses as pods reach them (on the lab
/// namespace's loopback, routed through each cluster's bridge).
pub const API_NET: [u8; 3] = [198, 18, 251];
/// The port pods reach an API server at.
pub const API_PORT: u16 = 6443;
/// How long an API server gets to write its kubeconfig.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// One cluster's API server, started.
pub struct ApiServer {
    /// The kubeconfig for this machine (loopback).
    pub kubeconfig: PathBuf,
    /// The admin's kubeconfig at the pods' address: what a ServiceAccount's
    /// kubeconfig is made from.
    pods_config: Kubeconfig,
    /// Where pods reach it.
    pub public: SocketAddr,
    /// A client for the lab itself.
    pub client: kube::Client,
}

/// Where cluster `index`'s API server is reached from pods.
pub fn public_addr(index: usize) -> SocketAddr {
    let host = u8::try_from(index + 1).expect("at most MAX_CLUSTERS clusters");
    SocketAddr::from((
        Ipv4Addr::new(API_NET[0], API_NET[1], API_NET[2], host),
        API_PORT,
    ))
}

/// The `test-apiserver` command of a cluster whose Services take ClusterIPs from
/// `service_range`, writing its kubeconfig to `kubeconfig`.
pub fn command(bin: &Path, service_range: &str, kubeconfig: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env_clear()
        .env("RUST_LOG", "warn")
        .args(["--listen", "127.0.0.1:0"])
        .args(["--service-cluster-ip-range", service_range])
        .args(["--authorization-mode", "RBAC"])
        .arg("--kubeconfig-out")
        .arg(kubeconfig);
    cmd
}

/// Waits for the kubeconfig of a started API server and relays `public` (in the
/// lab namespace) to it.
pub async fn connect(lab: &Namespace, kubeconfig: &Path, public: SocketAddr) -> Result<ApiServer> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while !kubeconfig.is_file() {
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the API server wrote no kubeconfig to {} within {}s",
                kubeconfig.display(),
                START_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let server = config
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .with_context(|| format!("{} names no server", kubeconfig.display()))?;
    let local: SocketAddr = server
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| {
            format!(
                "{}: server {server:?} is not http://IP:PORT",
                kubeconfig.display()
            )
        })?;
    relay(lab, public, local)?;

    let mut pods = config.clone();
    for c in pods.clusters.iter_mut().filter_map(|c| c.cluster.as_mut()) {
        c.server = Some(format!("http://{public}"));
    }

    let client_config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("using {}", kubeconfig.display()))?;
    let client = kube::Client::try_from(client_config).context("building the lab's API client")?;
    Ok(ApiServer {
        kubeconfig: kubeconfig.to_owned(),
        pods_config: pods,
        public,
        client,
    })
}

impl ApiServer {
    /// A kubeconfig at the pods' address holding a token of ServiceAccount
    /// `namespace/name` (a TokenRequest, as kubelet projects one into a pod):
    /// what a component running as it may do is what RBAC grants it.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let issued = accounts
            .create_token_request(name, &PostParams::default(), &TokenRequest::default())
            .await
            .with_context(|| format!("requesting a token of ServiceAccount {namespace}/{name}"))?;
        let token = issued
            .status
            .map(|s| s.token)
            .with_context(|| format!("the token of ServiceAccount {namespace}/{name} is empty"))?;
        let mut config = self.pods_config.clone();
        for user in config
            .auth_infos
            .iter_mut()
            .filter_map(|a| a.auth_info.as_mut())
        {
            user.token = Some(token.clone().into());
        }
        let path = self
            .kubeconfig
            .with_file_name(format!("sa-{namespace}-{name}.kubeconfig"));
        let text = serde_yaml_ng::to_string(&config).context("rendering a kubeconfig")?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        // Only the proxy UID, which every lab component runs as, reads a token.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let owner = (
            Some(Uid::from_raw(PROXY_UID)),
            Some(Gid::from_raw(PROXY_UID)),
        );
        chown(&path, owner.0, owner.1)
            .with_context(|| format!("handing {} to UID {PROXY_UID}", path.display()))?;
        Ok(path)
    }
}

/// Accepts on `public` inside `lab` and relays each connection to `local` on
/// this machine's loopback, until the lab's runtime ends.
fn relay(lab: &Namespace, public: SocketAddr, local: SocketAddr) -> Result<()> {
    let listener = lab
        .try_run(move || std::net::TcpListener::bind(public))?
        .with_context(|| format!("listening on {public} in {lab}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(local).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(())
}
