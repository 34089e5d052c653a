//! `isthmus lab`: the clusters of a directory, built on one Linux machine and run
//! with the real binaries (ARCHITECTURE.md, "The lab").
//!
//! # Layout
//!
//! - [`spec`]: the lab directory (one folder per cluster: manifests and the mesh
//!   install `isthmus.yaml`), read and checked; the embedded seed.
//! - [`plan`]: what Kubernetes would decide: addresses, pods (meshed, or not
//!   when annotated `isthmus.io/inject: disabled`), ClusterIPs, Endpoints, the
//!   manifests each cluster's proxies watch, kube-proxy's rules, hosts files.
//!   Pure.
//! - [`net`]: the run on `isthmus-netns` (namespaces, bridges, veth pairs,
//!   processes in namespaces), its record, and the clean-up (also `isthmus lab
//!   down`).
//! - [`run`]: `isthmus lab up`: identities, topology, each cluster's control
//!   plane (API server, install, link, controller), gateways, pods (init,
//!   sidecar, containers), output, the end and its summary.
//! - [`process`]: starting proxies and containers, their prefixed output, admin
//!   queries, packet captures.
//! - [`project`]: a pod's mounted volumes, updated as kubelet projects a
//!   ConfigMap (the atomic `..data` swap).
//! - [`summary`]: reading the proxies' `/metrics` into the end-of-run table.
//! - [`attach`]: `isthmus lab apply`, `delete` and `kubeconfig`, on a running
//!   lab found through its record.
//! - [`apiserver`]: each cluster's API server (`test-apiserver`), and where the
//!   lab's pods reach it.
//! - [`apply`]: manifests onto an API server as `kubectl apply --server-side`.
//! - [`hello`]: the built-in `nginxdemos/hello:plain-text`.
//! - [`relay`]: the WAN delay relay behind `--wan-delay`.
//!
//! Not here: parsing manifests and the ServiceMirror reconcile (proxy-discovery),
//! minting (proxy-identity), capture rules (`isthmus-init`), the proxy itself.

pub mod apiserver;
pub mod apply;
pub mod attach;
pub mod hello;
pub mod net;
pub mod plan;
pub mod process;
pub mod project;
pub mod relay;
pub mod run;
pub mod spec;
pub mod summary;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

/// The `lab` subcommands.
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build the clusters of DIR (one folder per cluster) on this machine and run
    /// them until Ctrl-C or --duration; without DIR, the seed's two clusters.
    Up(UpArgs),
    /// Remove what a killed `lab up` left behind: processes, namespaces, files.
    Down(DownArgs),
    /// Apply manifests to a running lab's cluster, as `kubectl apply` would.
    Apply(attach::ChangeArgs),
    /// Delete the objects of manifests from a running lab's cluster.
    Delete(attach::ChangeArgs),
    /// Print a kubeconfig for a running lab's cluster's API server.
    Kubeconfig(attach::KubeconfigArgs),
    /// The built-in server standing in for nginxdemos/hello:plain-text.
    #[command(hide = true)]
    Hello(HelloArgs),
    /// A TCP relay that delays every chunk, both ways (the WAN of --wan-delay).
    #[command(hide = true)]
    Relay(RelayArgs),
}

/// `isthmus lab up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The lab directory: one folder per cluster, named as the cluster, holding
    /// Kubernetes manifests and an optional isthmus.yaml [default: the seed].
    pub dir: Option<PathBuf>,
    /// Stop after this long (e.g. 20s, 5m); without it, run until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Added latency, in milliseconds each way, on the link between the clusters'
    /// gateways.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub wan_delay: u64,
    /// Print every proxy log line (info and above), not only warnings and errors.
    #[arg(long)]
    pub verbose: bool,
    /// The proxies' log filter (tracing's env-filter syntax, e.g. `debug` or
    /// `info,proxy_core=debug`); overrides --verbose.
    #[arg(long, value_name = "FILTER")]
    pub proxy_log: Option<String>,
    /// Capture the WAN between the gateways into this pcap file.
    #[arg(long, hide = true, value_name = "FILE")]
    pub capture_wan: Option<PathBuf>,
    /// Capture a cluster's bridge (its pods and gateway) into a pcap file.
    #[arg(long, hide = true, value_name = "CLUSTER=FILE", value_parser = parse_capture)]
    pub capture_cluster: Vec<(String, PathBuf)>,
}

fn parse_capture(text: &str) -> Result<(String, PathBuf), String> {
    text.split_once('=')
        .filter(|(c, f)| !c.is_empty() && !f.is_empty())
        .map(|(c, f)| (c.to_owned(), PathBuf::from(f)))
        .ok_or_else(|| format!("{text:?} is not CLUSTER=FILE"))
}

/// `isthmus lab down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// Also stop runs whose `isthmus lab up` is still running.
    #[arg(long)]
    pub all: bool,
}

/// `isthmus lab hello`.
#[derive(Debug, Args)]
pub struct HelloArgs {
    /// Port to listen on (on 0.0.0.0).
    #[arg(long)]
    pub port: u16,
    /// The pod's name, answered as "Server name".
    #[arg(long)]
    pub name: String,
    /// The pod's address, answered as "Server address" for connections
    /// delivered over loopback.
    #[arg(long)]
    pub address: Option<IpAddr>,
}

/// `isthmus lab relay`.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Address to accept on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address to relay to.
    #[arg(long)]
    pub to: SocketAddr,
    /// Milliseconds each chunk is held, each way.
    #[arg(long)]
    pub delay_ms: u64,
}

/// Runs a `lab` subcommand; `Ok(false)` when the lab ran but a pod or proxy failed.
pub fn run(command: LabCommand) -> Result<bool> {
    match command {
        LabCommand::Up(args) => run::up(args),
        LabCommand::Down(args) => down(args),
        LabCommand::Apply(args) => attach::change(apply::Verb::Apply, &args).map(|()| true),
        LabCommand::Delete(args) => attach::change(apply::Verb::Delete, &args).map(|()| true),
        LabCommand::Kubeconfig(args) => attach::kubeconfig(&args).map(|()| true),
        LabCommand::Hello(args) => small_runtime()?.block_on(async move {
            hello::serve(args.port, args.name, args.address)
                .await
                .map(|()| true)
        }),
        LabCommand::Relay(args) => small_runtime()?.block_on(async move {
            relay::serve(args.listen, args.to, Duration::from_millis(args.delay_ms))
                .await
                .map(|()| true)
        }),
    }
}

fn small_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The message for a user without root.
pub const NEEDS_ROOT: &str =
    "isthmus lab needs root (network namespaces, iptables): run it with sudo";

fn down(args: DownArgs) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(NEEDS_ROOT);
    }
    let swept = net::sweep(args.all);
    for p in &swept.removed {
        println!("removed lab run {p}");
    }
    for p in &swept.live {
        println!(
            "lab run {p} is still running; stop it with Ctrl-C, or use `isthmus lab down --all`"
        );
    }
    if swept.removed.is_empty() && swept.live.is_empty() {
        println!("nothing to remove");
    }
    Ok(true)
}

/// Parses durations as Kubernetes writes them: `500ms`, `20s`, `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    proxy_discovery::model::GoDuration::parse(text)
        .map(|d| d.0)
        .map_err(|e| e.to_string())
}
