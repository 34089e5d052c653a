//! `isthmus-proxy`: the sidecar, gateway and standalone roles.
//!
//! # Layout
//! - [`config`]: flags and environment, validated into a `Config` before binding.
//! - [`role`]: what each role builds from the proxy-* crates.
//! - [`admin`]: `/metrics`, `/ready`, `/live`, `/config`.
//! - [`lookup`]: discovery's index behind proxy-core's route seam.

mod admin;
mod config;
mod lookup;
mod role;

use anyhow::{Context, Result};
use clap::Parser;

use crate::config::{Cli, Config, RoleCommand};

fn main() {
    let cli = Cli::parse();
    let (role, args) = match &cli.role {
        RoleCommand::Sidecar(args) => ("sidecar", args),
        RoleCommand::Gateway(args) => ("gateway", args),
        RoleCommand::Standalone(args) => ("standalone", args),
    };
    args.log.init();
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("isthmus-proxy {role}: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&cli.role, config) {
        eprintln!("isthmus-proxy {role}: {e:#}");
        std::process::exit(1);
    }
}

fn run(role: &RoleCommand, config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers.unwrap_or_else(|| match role {
            RoleCommand::Gateway(_) => {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
            }
            RoleCommand::Sidecar(_) | RoleCommand::Standalone(_) => 1,
        }))
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        match role {
            RoleCommand::Sidecar(_) => role::sidecar::run(config).await,
            RoleCommand::Gateway(_) => role::gateway::run(config).await,
            RoleCommand::Standalone(_) => role::standalone::run(config).await,
        }
    })
}
