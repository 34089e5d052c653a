//! `isthmus-controller`: `run` the controller, print its `crds` or `rbac`.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use isthmus_controller::config::{Cli, Command};
use proxy_discovery::manifests;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => print(&manifests::crds_yaml().context("rendering the CRDs")?),
        Command::Rbac { namespace } => {
            print(&manifests::rbac_yaml(&namespace).context("rendering the RBAC objects")?)
        }
        Command::Run(args) => {
            args.log.init();
            // Kubernetes sets HOSTNAME to the pod's name; a shell may not export it.
            let hostname = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            let config = args
                .into_config(&hostname)
                .context("invalid command line")?;
            let client = kube::Client::try_default().await.context(
                "no Kubernetes API credentials (in-cluster service account or kubeconfig)",
            )?;
            let running = isthmus_controller::start(client, config)
                .await
                .context("starting the controller")?;
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("installing the SIGTERM handler")?;
            // Kubernetes stops a pod with SIGTERM; a terminal with SIGINT. Either
            // way the Lease is released, so the next replica takes over at once.
            running
                .run_until(async {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                })
                .await;
            Ok(())
        }
    }
}

fn print(text: &str) -> anyhow::Result<()> {
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
}
