//! `test-apiserver`: the in-memory API server as a process, for a rehearsal
//! cluster that needs one per cluster. It listens, writes an admin kubeconfig
//! once the port accepts connections, and serves until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use test_apiserver::{DEFAULT_SERVICE_RANGE, TestApiServer};

/// How requests are authorized, as kube-apiserver's `--authorization-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuthorizationMode {
    /// Every request is allowed.
    #[value(name = "AlwaysAllow")]
    AlwaysAllow,
    /// Bearer tokens and the stored RBAC objects decide; the kubeconfig written
    /// is the admin's (`system:masters`).
    #[value(name = "RBAC")]
    Rbac,
}

/// An in-memory Kubernetes API server (plain HTTP) for tests and rehearsals.
#[derive(Debug, Parser)]
#[command(name = "test-apiserver", version)]
struct Cli {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The range Services get their ClusterIPs from.
    #[arg(long, default_value = DEFAULT_SERVICE_RANGE)]
    service_cluster_ip_range: ipnet::IpNet,
    /// How requests are authorized.
    #[arg(long, value_enum, default_value = "AlwaysAllow")]
    authorization_mode: AuthorizationMode,
    /// Where to write an admin kubeconfig once the server listens.
    #[arg(long)]
    kubeconfig_out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut builder =
        TestApiServer::builder().service_cluster_ip_range(cli.service_cluster_ip_range);
    if cli.authorization_mode == AuthorizationMode::Rbac {
        builder = builder.authorize_rbac();
    }
    let server = builder
        .start_on(cli.listen)
        .await
        .with_context(|| format!("starting on {}", cli.listen))?;
    server
        .write_kubeconfig_file(&cli.kubeconfig_out)
        .with_context(|| format!("writing {}", cli.kubeconfig_out.display()))?;
    tracing::info!(
        addr = %server.addr(),
        service_cluster_ip_range = %cli.service_cluster_ip_range,
        authorization_mode = ?cli.authorization_mode,
        kubeconfig = %cli.kubeconfig_out.display(),
        "test-apiserver serving"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.stop().await;
    Ok(())
}
