//! `isthmus`: operator tooling for the mesh.
//!
//! One module per subcommand family: `identity` (minting trust anchors, cluster
//! issuers and workload certificates), `lab` (the clusters of a directory, run
//! on one machine), and for real clusters `install` (the control plane's
//! manifests), `inject` (adding the mesh to workloads), `link` (what another
//! cluster applies to reach this one), each with its undoing (`uninstall`,
//! `uninject`, `unlink`) and `check` (what is wrong, and what to do).
//! The proxy itself is another binary (`isthmus-proxy`); nothing here runs on the
//! data path.

mod check;
mod identity;
mod inject;
mod install;
mod lab;
mod link;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "isthmus",
    version,
    about = "Operator tooling for the Isthmus mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mint SPIFFE identities: a trust anchor, an issuer per cluster, workload leaves.
    #[command(subcommand)]
    Identity(identity::IdentityCommand),
    /// The local lab: the clusters of a directory, built on this machine with
    /// network namespaces and run with the real binaries.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Add the mesh (isthmus-init and the isthmus-proxy sidecar) to the workloads
    /// of a manifest; prints the result, other objects unchanged.
    Inject(inject::InjectArgs),
    /// Take the mesh out of the workloads of a manifest, exactly as inject added
    /// it; prints the result, other objects unchanged.
    Uninject(inject::UninjectArgs),
    /// Print the control plane and gateway of one cluster as manifests for
    /// `kubectl apply -f -`.
    Install(install::InstallArgs),
    /// Print every object `isthmus install` creates, for `kubectl delete -f -`.
    Uninstall(install::UninstallArgs),
    /// Print the Link and credentials Secret that another cluster applies to reach
    /// this one (run against the exporting cluster).
    Link(link::LinkArgs),
    /// Print the Link and Secret `isthmus link` creates, for `kubectl delete -f -`
    /// in the cluster that applied them.
    Unlink(link::UnlinkArgs),
    /// Check the mesh of a cluster: CRDs, controller, gateway, certificates, links,
    /// service mirrors; says what to do about each failure.
    Check(check::CheckArgs),
}

fn main() -> ExitCode {
    // The CLI speaks to a person: warnings only, unless ISTHMUS_LOG asks for more.
    let filter = std::env::var(isthmus_log::LOG_ENV).unwrap_or_else(|_| "warn".to_owned());
    isthmus_log::init(&filter, isthmus_log::LogFormat::Plain);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Identity(command) => identity::run(command).map(|()| true),
        Command::Lab(command) => lab::run(command),
        Command::Inject(args) => inject::run(args),
        Command::Uninject(args) => inject::run_uninject(args),
        Command::Install(args) => install::run(args).map(|()| true),
        Command::Uninstall(args) => install::run_uninstall(args).map(|()| true),
        Command::Link(args) => link::run(args).map(|()| true),
        Command::Unlink(args) => link::run_unlink(args).map(|()| true),
        Command::Check(args) => check::run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // The command ran and said what failed.
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line: what failed, and why.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
