//! Each lab cluster's API server: a `test-apiserver` process on this machine's
//! loopback (where `isthmus lab apply` and kubectl reach it), and the address
//! the lab's pods reach it at, `198.18.251.<i+1>:6443` in the lab namespace,
//! relayed by the lab itself to the loopback port. Two kubeconfigs per cluster
//! are recorded in the run's directory: `kube/<cluster>/kubeconfig` (loopback,
//! what `isthmus lab kubeconfig` prints) and `kube/<cluster>/pods.kubeconfig`
//! (the pods' address).
//!
//! Not here: what is applied to it ([`super::apply`]), or the processes that
//! read it (the controller and gateways, [`super::run`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_netns::Namespace;
use kube::config::{KubeConfigOptions, Kubeconfig};

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
    /// The kubeconfig for the lab's pods.
    pub pods_kubeconfig: PathBuf,
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
        .arg("--kubeconfig-out")
        .arg(kubeconfig);
    cmd
}

/// Waits for the kubeconfig of a started API server, relays `public` (in the lab
/// namespace) to it, and writes the pods' kubeconfig beside it.
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
    let pods_kubeconfig = kubeconfig.with_file_name("pods.kubeconfig");
    let text = serde_yaml_ng::to_string(&pods).context("rendering the pods' kubeconfig")?;
    std::fs::write(&pods_kubeconfig, text)
        .with_context(|| format!("writing {}", pods_kubeconfig.display()))?;

    let client_config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("using {}", kubeconfig.display()))?;
    let client = kube::Client::try_from(client_config).context("building the lab's API client")?;
    Ok(ApiServer {
        kubeconfig: kubeconfig.to_owned(),
        pods_kubeconfig,
        public,
        client,
    })
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
