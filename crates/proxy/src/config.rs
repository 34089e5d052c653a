//! Command line and environment of `isthmus-proxy`, validated into a [`Config`]
//! before anything is bound.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use proxy_identity::CredentialPaths;

pub const DEFAULT_OUTBOUND_PORT: u16 = 4140;
pub const DEFAULT_INBOUND_PORT: u16 = 4143;
pub const DEFAULT_ADMIN_PORT: u16 = 4191;

#[derive(Debug, Parser)]
#[command(name = "isthmus-proxy", version, about = "The Isthmus mesh proxy")]
pub struct Cli {
    #[command(subcommand)]
    pub role: RoleCommand,
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// The per-pod proxy that isthmus-init redirects the pod's TCP into.
    Sidecar(CommonArgs),
    /// A cluster's gateway: carries tunnel streams between clusters.
    Gateway(CommonArgs),
    /// An explicit proxy on loopback (HTTP CONNECT and absolute-form requests) that
    /// reaches mirrored services by name, without iptables.
    Standalone(CommonArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// This cluster's name.
    #[arg(long, env = "ISTHMUS_CLUSTER")]
    pub cluster: String,
    /// Directory with tls.crt (leaf and chain), tls.key and ca.crt (trust anchors).
    #[arg(long, env = "ISTHMUS_IDENTITY_DIR")]
    pub identity_dir: PathBuf,
    /// The leaf and its chain, if not `tls.crt` in --identity-dir.
    #[arg(long, env = "ISTHMUS_IDENTITY_CERT")]
    pub identity_cert: Option<PathBuf>,
    /// The leaf's key, if not `tls.key` in --identity-dir.
    #[arg(long, env = "ISTHMUS_IDENTITY_KEY")]
    pub identity_key: Option<PathBuf>,
    /// The trust anchors, if not `ca.crt` in --identity-dir.
    #[arg(long, env = "ISTHMUS_IDENTITY_ANCHORS")]
    pub identity_anchors: Option<PathBuf>,
    /// Directory of Kubernetes manifests to discover services from (watched).
    #[arg(long, env = "ISTHMUS_MANIFESTS")]
    pub manifests: PathBuf,
    /// Where the outbound listener binds (loopback only: it must not be an open proxy).
    #[arg(long, env = "ISTHMUS_OUTBOUND_ADDR", value_delimiter = ',',
          default_values_t = [SocketAddr::from(([127, 0, 0, 1], DEFAULT_OUTBOUND_PORT)), SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, DEFAULT_OUTBOUND_PORT))])]
    pub outbound_addr: Vec<SocketAddr>,
    /// Where the inbound (and gateway tunnel) listener binds.
    #[arg(long, env = "ISTHMUS_INBOUND_ADDR", value_delimiter = ',',
          default_values_t = [SocketAddr::from(([0, 0, 0, 0], DEFAULT_INBOUND_PORT)), SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, DEFAULT_INBOUND_PORT))])]
    pub inbound_addr: Vec<SocketAddr>,
    /// Where the admin server (/metrics, /ready, /live, /config) binds.
    #[arg(long, env = "ISTHMUS_ADMIN_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_ADMIN_PORT)))]
    pub admin_addr: SocketAddr,
    /// Ports whose traffic skips protocol detection (server-speaks-first protocols).
    #[arg(long, env = "ISTHMUS_OPAQUE_PORTS", value_delimiter = ',', default_values_t = [25u16, 587, 3306, 5432, 6379, 11211])]
    pub opaque_ports: Vec<u16>,
    /// How long to wait for a client's first bytes before treating it as opaque.
    #[arg(long, env = "ISTHMUS_DETECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub detect_timeout: Duration,
    #[arg(long, env = "ISTHMUS_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    #[arg(long, env = "ISTHMUS_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections served at once per listener; more are reset at once.
    #[arg(long, env = "ISTHMUS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// How long open connections may finish after SIGTERM.
    #[arg(long, env = "ISTHMUS_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How often the manifests and identity directories are checked for changes.
    #[arg(long, env = "ISTHMUS_RELOAD_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// Tunnel connections kept open to each peer gateway.
    #[arg(long, env = "ISTHMUS_TUNNEL_CONNECTIONS", default_value_t = 2)]
    pub tunnel_connections: usize,
    /// Runtime worker threads. Default: 1 for a sidecar or standalone proxy (one
    /// per pod adds up), every core for a gateway (it carries a whole cluster).
    #[arg(long, env = "ISTHMUS_WORKERS")]
    pub workers: Option<usize>,
    #[arg(long, env = "ISTHMUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Log filter (tracing's env-filter syntax).
    #[arg(long, env = "ISTHMUS_LOG", default_value = "info")]
    pub log: String,
}

/// Parses durations as Kubernetes writes them: `500ms`, `5s`, `1m30s`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    proxy_discovery::model::GoDuration::parse(text)
        .map(|d| d.0)
        .map_err(|e| e.to_string())
}

/// The validated configuration of one proxy process.
#[derive(Clone, Debug)]
pub struct Config {
    pub cluster: String,
    /// The credential files, `--identity-dir`'s standard names unless overridden.
    pub identity: CredentialPaths,
    pub manifests: PathBuf,
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub opaque_ports: HashSet<u16>,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub reload_interval: Duration,
    pub tunnel_connections: usize,
    /// `None`: the role's default.
    pub workers: Option<usize>,
}

/// A configuration value that cannot work, named by its flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag}: {problem}")]
    Invalid { flag: &'static str, problem: String },
}

fn invalid(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        problem: problem.into(),
    }
}

impl Config {
    pub fn from_args(args: &CommonArgs) -> Result<Self, ConfigError> {
        if args.cluster.is_empty()
            || args.cluster.len() > 63
            || !args
                .cluster
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                "cluster",
                format!(
                    "{:?} is not a cluster name (lowercase letters, digits and '-', at most 63)",
                    args.cluster
                ),
            ));
        }
        if !args.identity_dir.is_dir() {
            return Err(invalid(
                "identity-dir",
                format!("{} is not a directory", args.identity_dir.display()),
            ));
        }
        let mut identity = CredentialPaths::in_dir(&args.identity_dir);
        for (flag, path, slot) in [
            ("identity-cert", &args.identity_cert, &mut identity.cert),
            ("identity-key", &args.identity_key, &mut identity.key),
            (
                "identity-anchors",
                &args.identity_anchors,
                &mut identity.anchors,
            ),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(invalid(flag, format!("{} is not a file", path.display())));
                }
                *slot = path.clone();
            }
        }
        if !args.manifests.is_dir() {
            return Err(invalid(
                "manifests",
                format!("{} is not a directory", args.manifests.display()),
            ));
        }
        if let Some(open) = args.outbound_addr.iter().find(|a| !a.ip().is_loopback()) {
            return Err(invalid(
                "outbound-addr",
                format!(
                    "{open} is not a loopback address: the outbound listener would be an open proxy"
                ),
            ));
        }
        for (flag, value) in [
            ("max-connections", args.max_connections),
            ("tunnel-connections", args.tunnel_connections),
            ("workers", args.workers.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(invalid(flag, "must be at least 1"));
            }
        }
        for (flag, value) in [
            ("detect-timeout", args.detect_timeout),
            ("connect-timeout", args.connect_timeout),
            ("idle-timeout", args.idle_timeout),
            ("reload-interval", args.reload_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(flag, "must be longer than zero"));
            }
        }
        if args.opaque_ports.contains(&0) {
            return Err(invalid("opaque-ports", "0 is not a port"));
        }
        Ok(Config {
            cluster: args.cluster.clone(),
            identity,
            manifests: args.manifests.clone(),
            outbound_addrs: args.outbound_addr.clone(),
            inbound_addrs: args.inbound_addr.clone(),
            admin_addr: args.admin_addr,
            opaque_ports: args.opaque_ports.iter().copied().collect(),
            detect_timeout: args.detect_timeout,
            connect_timeout: args.connect_timeout,
            idle_timeout: args.idle_timeout,
            max_connections: args.max_connections,
            shutdown_grace: args.shutdown_grace,
            reload_interval: args.reload_interval,
            tunnel_connections: args.tunnel_connections,
            workers: args.workers,
        })
    }

    /// Every port this proxy listens on: a destination on one of them is a loop.
    pub fn proxy_ports(&self) -> HashSet<u16> {
        self.outbound_addrs
            .iter()
            .chain(&self.inbound_addrs)
            .map(SocketAddr::port)
            .chain([self.admin_addr.port()])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_only() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        for bad in ["5", "5d", "s", ""] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("3s, 500ms or 1m30s"), "{bad}: {err}");
        }
    }

    fn args(dir: &std::path::Path) -> CommonArgs {
        let cli = Cli::try_parse_from([
            "isthmus-proxy",
            "sidecar",
            "--cluster",
            "cluster-b",
            "--identity-dir",
            dir.to_str().unwrap(),
            "--manifests",
            dir.to_str().unwrap(),
        ])
        .unwrap();
        match cli.role {
            RoleCommand::Sidecar(args) => args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn bad_values_name_their_flag() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_args(&args(dir.path())).unwrap();
        assert!(
            config
                .proxy_ports()
                .is_superset(&HashSet::from([4140, 4143, 4191]))
        );

        let mut bad = args(dir.path());
        bad.cluster = "Cluster B".into();
        assert!(
            Config::from_args(&bad)
                .unwrap_err()
                .to_string()
                .starts_with("--cluster:")
        );

        let mut bad = args(dir.path());
        bad.outbound_addr = vec!["0.0.0.0:4140".parse().unwrap()];
        let err = Config::from_args(&bad).unwrap_err().to_string();
        assert!(
            err.contains("--outbound-addr") && err.contains("open proxy"),
            "{err}"
        );

        let mut custom = args(dir.path());
        let key = dir.path().join("elsewhere.key");
        std::fs::write(&key, "").unwrap();
        custom.identity_key = Some(key.clone());
        let config = Config::from_args(&custom).unwrap();
        assert_eq!(config.identity.key, key);
        assert_eq!(config.identity.cert, dir.path().join("tls.crt"));
        custom.identity_anchors = Some(dir.path().join("missing.crt"));
        assert!(
            Config::from_args(&custom)
                .unwrap_err()
                .to_string()
                .starts_with("--identity-anchors:")
        );

        let mut bad = args(dir.path());
        bad.manifests = dir.path().join("missing");
        assert!(
            Config::from_args(&bad)
                .unwrap_err()
                .to_string()
                .starts_with("--manifests:")
        );
    }
}
