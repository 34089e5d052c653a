//! Command line and environment of `isthmus-controller`, validated into a
//! [`crate::run::Config`] before anything connects.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use isthmus_vocab::ClusterName;
use proxy_discovery::model::GoDuration;

use crate::lease::LeaseConfig;
use crate::mirror::{ReconcileTiming, SettingsSource};
use crate::remote::RemoteTiming;
use crate::run::Config;

/// The control-plane namespace when none is given.
pub const DEFAULT_NAMESPACE: &str = "isthmus";
/// The Lease's name when none is given.
pub const DEFAULT_LEASE_NAME: &str = "isthmus-controller";
/// client-go's default lease duration.
pub const DEFAULT_LEASE_DURATION: &str = "15s";
/// The metrics endpoint when none is given: the mesh's admin port
/// (`isthmus_vocab::ports::DEFAULT_ADMIN_PORT`, which a test holds it to).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:4191";
/// The sidecars' discovery ConfigMap when none is given.
pub const DEFAULT_CONFIGMAP: &str = "isthmus-discovery";

/// `isthmus-controller`.
#[derive(Debug, Parser)]
#[command(
    name = "isthmus-controller",
    version,
    about = "The Isthmus ServiceMirror controller"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller against the cluster of the ambient kubeconfig or
    /// in-cluster service account.
    Run(Box<RunArgs>),
    /// Print the CRDs (ServiceMirror, Link, ClusterSettings) as YAML.
    Crds,
    /// Print the controller's ServiceAccount, roles and bindings as YAML.
    Rbac {
        /// The controller's namespace.
        #[arg(long, env = "ISTHMUS_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
        namespace: String,
    },
}

/// `isthmus-controller run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The control-plane namespace: Links, their Secrets, ClusterSettings, the
    /// Lease and the published ConfigMap.
    #[arg(long, env = "ISTHMUS_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// This cluster's name, with default settings (no gateway); or use --settings.
    #[arg(
        long,
        env = "ISTHMUS_CLUSTER",
        conflicts_with = "settings",
        required_unless_present = "settings"
    )]
    pub cluster: Option<String>,
    /// The ClusterSettings object (in --namespace) holding this cluster's name,
    /// service range, trust domain and gateway.
    #[arg(long, env = "ISTHMUS_SETTINGS")]
    pub settings: Option<String>,
    /// The Lease used for leader election.
    #[arg(long, env = "ISTHMUS_LEASE_NAME", default_value = DEFAULT_LEASE_NAME)]
    pub lease_name: String,
    /// How long others wait for a silent leader (e.g. 15s).
    #[arg(long, env = "ISTHMUS_LEASE_DURATION", default_value = DEFAULT_LEASE_DURATION)]
    pub lease_duration: String,
    /// This replica's identity in the Lease (defaults to the host name, which is
    /// the pod name in Kubernetes).
    #[arg(long, env = "ISTHMUS_IDENTITY")]
    pub identity: Option<String>,
    /// Run as the only writer, without a Lease.
    #[arg(long, env = "ISTHMUS_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,
    /// Where /metrics, /ready and /live are served.
    #[arg(long, env = "ISTHMUS_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// The ConfigMap (in --namespace) the sidecars mount.
    #[arg(long, env = "ISTHMUS_CONFIGMAP", default_value = DEFAULT_CONFIGMAP)]
    pub configmap: String,
    /// How often each remote watch probes its API server.
    #[arg(long, env = "ISTHMUS_REMOTE_PROBE_INTERVAL", default_value = "5s")]
    pub remote_probe_interval: String,
    /// Re-reconcile every ServiceMirror this often.
    #[arg(long, env = "ISTHMUS_RESYNC", default_value = "5m")]
    pub resync: String,
    #[command(flatten)]
    pub log: isthmus_log::LogArgs,
}

/// A flag that does not hold a valid value.
#[derive(Debug, thiserror::Error)]
#[error("--{flag} {value:?}: {problem}")]
pub struct ConfigError {
    /// The flag.
    pub flag: &'static str,
    /// What was given.
    pub value: String,
    /// What is wrong.
    pub problem: String,
}

fn duration(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = GoDuration::parse(value).map_err(|e| ConfigError {
        flag,
        value: value.to_owned(),
        problem: e.to_string(),
    })?;
    if d.0.is_zero() {
        return Err(ConfigError {
            flag,
            value: value.to_owned(),
            problem: "must be longer than zero".to_owned(),
        });
    }
    Ok(d.0)
}

impl RunArgs {
    /// Validates the flags; `hostname` is the identity when none is given.
    pub fn into_config(self, hostname: &str) -> Result<Config, ConfigError> {
        let settings = match (&self.settings, &self.cluster) {
            (Some(name), _) => SettingsSource::Object(name.clone()),
            (None, Some(cluster)) => {
                SettingsSource::Defaults(ClusterName::parse(cluster).map_err(|e| ConfigError {
                    flag: "cluster",
                    value: cluster.clone(),
                    problem: e.to_string(),
                })?)
            }
            (None, None) => {
                return Err(ConfigError {
                    flag: "cluster",
                    value: String::new(),
                    problem: "give --cluster or --settings".to_owned(),
                });
            }
        };
        let lease_duration = duration("lease-duration", &self.lease_duration)?;
        if lease_duration < Duration::from_secs(1) {
            return Err(ConfigError {
                flag: "lease-duration",
                value: self.lease_duration.clone(),
                problem: "must be at least 1s (leaseDurationSeconds is whole seconds)".to_owned(),
            });
        }
        let probe = duration("remote-probe-interval", &self.remote_probe_interval)?;
        let resync = duration("resync", &self.resync)?;
        let identity = self.identity.clone().unwrap_or_else(|| hostname.to_owned());
        if identity.is_empty() {
            return Err(ConfigError {
                flag: "identity",
                value: identity,
                problem: "must not be empty (the host name is the default)".to_owned(),
            });
        }
        Ok(Config {
            lease: (!self.no_leader_election).then(|| LeaseConfig {
                namespace: self.namespace.clone(),
                name: self.lease_name.clone(),
                identity,
                lease_duration,
            }),
            namespace: self.namespace,
            settings,
            metrics_addr: Some(self.metrics_addr),
            configmap: self.configmap,
            publish_interval: Duration::from_secs(1),
            remote: RemoteTiming {
                probe_interval: probe,
                call_timeout: probe.max(Duration::from_secs(1)),
            },
            timing: ReconcileTiming {
                resync,
                // Each refresh is a status write per mirror of an unreachable cluster:
                // lastRemoteContact already gives the exact age, the message a rounded one.
                stale_refresh: probe.saturating_mul(2).max(Duration::from_secs(30)),
                contact_refresh: Duration::from_secs(30),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_metrics_address_is_the_mesh_admin_port() {
        let addr: std::net::SocketAddr = DEFAULT_METRICS_ADDR.parse().unwrap();
        assert_eq!(addr.port(), isthmus_vocab::ports::DEFAULT_ADMIN_PORT);
    }

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(a) => a.into_config("pod-1").map_err(|e| e.to_string()),
            _ => Err("not run".to_owned()),
        }
    }

    #[test]
    fn defaults_and_flags() {
        let c = parse(&["isthmus-controller", "run", "--cluster", "cluster-b"]).unwrap();
        assert_eq!(c.namespace, DEFAULT_NAMESPACE);
        assert_eq!(c.configmap, DEFAULT_CONFIGMAP);
        let lease = c.lease.unwrap();
        assert_eq!(
            (lease.identity.as_str(), lease.lease_duration),
            ("pod-1", Duration::from_secs(15))
        );
        let c = parse(&[
            "isthmus-controller",
            "run",
            "--settings",
            "cluster",
            "--no-leader-election",
        ])
        .unwrap();
        assert_eq!(c.settings, SettingsSource::Object("cluster".to_owned()));
        assert!(c.lease.is_none());
    }

    #[test]
    fn bad_flags_are_named() {
        let e = parse(&["isthmus-controller", "run", "--cluster", "Bad_Name"]).unwrap_err();
        assert!(e.starts_with("--cluster \"Bad_Name\""), "{e}");
        let e = parse(&[
            "isthmus-controller",
            "run",
            "--cluster",
            "b",
            "--lease-duration",
            "soon",
        ])
        .unwrap_err();
        assert!(e.starts_with("--lease-duration \"soon\""), "{e}");
        let e = parse(&["isthmus-controller", "run"]).unwrap_err();
        assert!(e.contains("--cluster"), "{e}");
    }
}
