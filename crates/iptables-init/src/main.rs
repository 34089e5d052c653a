//! `isthmus-init`: the pod's init container. Parses flags (each also an
//! `ISTHMUS_INIT_*` environment variable) into a validated [`Config`], then installs
//! the capture, removes it (`--cleanup`) or prints what it would apply (`--dry-run`).
//!
//! Exit status: 2 for a bad flag value (nothing was changed), 1 when the rules could
//! not be read or applied, 0 otherwise.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use iptables_init::apply::{self, Action, Change, Plan};
use iptables_init::config::{
    BackendChoice, Cidr, Config, DEFAULT_SKIP_INBOUND_PORTS, PortList, parse_cidr_list, parse_port,
};
use isthmus_vocab::ports::{DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, PROXY_UID};

/// Redirects a pod's TCP through the Isthmus sidecar with iptables (nat table).
#[derive(Debug, Parser)]
#[command(name = "isthmus-init", version)]
struct Args {
    /// UID the proxy runs as; its connections are not captured.
    #[arg(long, env = "ISTHMUS_INIT_PROXY_UID", default_value_t = PROXY_UID)]
    proxy_uid: u32,
    /// Port of the proxy's outbound listener.
    #[arg(long, env = "ISTHMUS_INIT_OUTBOUND_PORT", default_value_t = DEFAULT_OUTBOUND_PORT, value_parser = parse_port)]
    outbound_port: u16,
    /// Port of the proxy's inbound listener.
    #[arg(long, env = "ISTHMUS_INIT_INBOUND_PORT", default_value_t = DEFAULT_INBOUND_PORT, value_parser = parse_port)]
    inbound_port: u16,
    /// Inbound destination ports not captured, e.g. `22,8000-8100` ('' for none).
    #[arg(long, env = "ISTHMUS_INIT_SKIP_INBOUND_PORTS", default_value = DEFAULT_SKIP_INBOUND_PORTS, value_parser = parse_port_list)]
    skip_inbound_ports: PortList,
    /// Outbound destination ports not captured, e.g. `25,3306,8000-8100`.
    #[arg(long, env = "ISTHMUS_INIT_SKIP_OUTBOUND_PORTS", default_value = "", value_parser = parse_port_list)]
    skip_outbound_ports: PortList,
    /// Outbound destination networks not captured, e.g. `10.96.0.0/12,fd00::/8`.
    #[arg(long, env = "ISTHMUS_INIT_SKIP_OUTBOUND_SUBNETS", default_value = "", value_parser = parse_cidrs)]
    skip_outbound_subnets: CidrList,
    /// If set, only outbound TCP to these networks is captured (default: all).
    #[arg(long, env = "ISTHMUS_INIT_INCLUDE_OUTBOUND_SUBNETS", default_value = "", value_parser = parse_cidrs)]
    include_outbound_subnets: CidrList,
    /// Also program ip6tables.
    #[arg(long, env = "ISTHMUS_INIT_IPV6")]
    ipv6: bool,
    /// Which iptables implementation to program; auto picks the one the host uses.
    #[arg(long, env = "ISTHMUS_INIT_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Print the exact iptables-restore input and change nothing.
    #[arg(long, env = "ISTHMUS_INIT_DRY_RUN")]
    dry_run: bool,
    /// Remove the chains and jump rules isthmus-init installed, and nothing else.
    #[arg(long, env = "ISTHMUS_INIT_CLEANUP")]
    cleanup: bool,
}

/// A whole comma-separated list as one flag value (a bare `Vec` would make clap
/// expect the flag repeated).
#[derive(Debug, Clone)]
struct CidrList(Vec<Cidr>);

fn parse_cidrs(s: &str) -> Result<CidrList, iptables_init::config::ParseError> {
    parse_cidr_list(s).map(CidrList)
}

fn parse_port_list(s: &str) -> Result<PortList, iptables_init::config::ParseError> {
    s.parse()
}

impl Args {
    fn config(&self) -> Result<Config, iptables_init::config::ConfigError> {
        Config {
            proxy_uid: self.proxy_uid,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            skip_inbound_ports: self.skip_inbound_ports.clone(),
            skip_outbound_ports: self.skip_outbound_ports.clone(),
            skip_outbound_subnets: self.skip_outbound_subnets.0.clone(),
            include_outbound_subnets: self.include_outbound_subnets.0.clone(),
            ipv6: self.ipv6,
            backend: self.backend,
        }
        .validate()
    }
}

fn main() -> ExitCode {
    // clap exits with status 2 and names the flag and value on a bad value.
    let args = Args::parse();
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("isthmus-init: error: {e}");
            return ExitCode::from(2);
        }
    };
    let action = if args.cleanup {
        Action::Cleanup
    } else {
        Action::Install
    };
    match run(&config, action, args.dry_run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isthmus-init: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &Config, action: Action, dry_run: bool) -> anyhow::Result<()> {
    let plan = apply::plan(config, action, dry_run).context("reading the current nat tables")?;
    for note in &plan.notes {
        eprintln!("isthmus-init: {note}");
    }
    let adds_inbound_source = action == Action::Install && config.ipv6;
    if dry_run {
        print!("{}", dry_run_text(&plan));
        if adds_inbound_source {
            println!(
                "# and the sidecar's IPv6 inbound source: ip {}",
                apply::INBOUND_SOURCE_V6_ARGS.join(" ")
            );
        }
        return Ok(());
    }
    apply::execute(&plan).with_context(|| match action {
        Action::Install => "installing the capture rules",
        Action::Cleanup => "removing the capture rules",
    })?;
    if adds_inbound_source {
        apply::add_inbound_source_v6().context(
            "adding ::6 to lo, the source the sidecar delivers IPv6 inbound traffic from",
        )?;
        println!("isthmus-init: ::6 on lo, the sidecar's IPv6 inbound source");
    }
    for step in &plan.steps {
        let (family, mode, name) = (step.family, step.mode, step.restore_name());
        match (action, step.change, &step.text) {
            (_, Change::Install, _) => println!(
                "isthmus-init: {family} capture installed with {name}: outbound to port {}, inbound to port {}, proxy uid {} exempt",
                config.outbound_port, config.inbound_port, config.proxy_uid
            ),
            (Action::Install, Change::Remove, _) => println!(
                "isthmus-init: {family} copy of the capture in the {mode} backend removed with {name}"
            ),
            (Action::Cleanup, Change::Remove, Some(_)) => {
                println!("isthmus-init: {family} capture removed with {name}")
            }
            (Action::Cleanup, Change::Remove, None) => {
                println!("isthmus-init: {family} {mode} backend has no capture rules to remove")
            }
        }
    }
    if action == Action::Cleanup {
        let checked: Vec<String> = plan
            .steps
            .iter()
            .map(|s| format!("{} {}", s.mode, s.family))
            .collect();
        println!(
            "isthmus-init: no capture rules remain in {}",
            checked.join(", ")
        );
    }
    Ok(())
}

/// The restore input of every step, each under a comment header naming the tool
/// it is for; comments are valid restore input, so the text can be fed as is.
fn dry_run_text(plan: &Plan) -> String {
    let mut out = String::new();
    for step in &plan.steps {
        let name = step.restore_name();
        match &step.text {
            Some(text) => {
                out.push_str(&format!(
                    "# {} rules for: {name} --noflush\n{text}",
                    step.family
                ));
            }
            None => out.push_str(&format!(
                "# {} {}: nothing of isthmus-init to remove\n",
                step.family, step.mode
            )),
        }
    }
    out
}
