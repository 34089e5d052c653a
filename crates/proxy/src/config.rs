//! Command line and environment of `isthmus-proxy`, validated into a [`Config`]
//! before anything is bound.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use isthmus_vocab::ports::{DEFAULT_ADMIN_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT};
use proxy_core::http::{HttpSettings, MIN_HTTP1_MAX_HEAD_BYTES};
use proxy_core::inbound::AppAddress;
use proxy_core::tunnel::H2Settings;
use proxy_identity::CredentialPaths;

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

/// Where a proxy learns Services, Endpoints, Links and its cluster's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiscoveryKind {
    /// A directory of manifests (`--manifests`): what the controller publishes in a
    /// ConfigMap for sidecars, or the local lab's files.
    Dir,
    /// The cluster's API server (in a pod, its service account): for gateways,
    /// which need the Services and EndpointSlices of exported services.
    Kube,
}

/// The validated discovery source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoverySource {
    Dir(PathBuf),
    /// All namespaces unless one is named.
    Kube {
        namespace: Option<String>,
    },
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
    /// Where services are discovered: `dir` reads --manifests, `kube` the cluster's
    /// API server (the pod's service account, or the kubeconfig of the environment).
    #[arg(long, env = "ISTHMUS_DISCOVERY", value_enum, default_value_t = DiscoveryKind::Dir)]
    pub discovery: DiscoveryKind,
    /// Directory of Kubernetes manifests to discover services from (watched); needed
    /// with `--discovery dir`.
    #[arg(long, env = "ISTHMUS_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// With `--discovery kube`: read only this namespace (for a proxy whose service
    /// account may not list cluster-wide).
    #[arg(long, env = "ISTHMUS_DISCOVERY_NAMESPACE")]
    pub discovery_namespace: Option<String>,
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
    /// Deliver inbound traffic to the app on loopback instead of the pod's own
    /// address: for apps that listen on loopback only, which this opens to the
    /// mesh (a pod opts in with the annotation `isthmus.io/inbound-loopback: "true"`).
    #[arg(long, env = "ISTHMUS_INBOUND_LOOPBACK")]
    pub inbound_loopback: bool,
    /// Gateway only: let an exported Service's endpoint be an address of this host
    /// (loopback, link-local, the host's own IPs) on a port no listener of the
    /// gateway holds. For a single-host lab whose backends listen on loopback;
    /// never in a cluster, where it opens the host's local services to linked ones.
    #[arg(long, env = "ISTHMUS_ALLOW_LOCAL_ENDPOINTS")]
    pub allow_local_endpoints: bool,
    /// Ports whose traffic skips protocol detection (server-speaks-first protocols).
    #[arg(long, env = "ISTHMUS_OPAQUE_PORTS", value_delimiter = ',', default_values_t = [25u16, 587, 3306, 5432, 6379, 11211])]
    pub opaque_ports: Vec<u16>,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// How long open connections may finish after SIGTERM.
    #[arg(long, env = "ISTHMUS_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How often the manifests and identity directories are checked for changes.
    #[arg(long, env = "ISTHMUS_RELOAD_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// Tunnel connections kept open to each peer gateway (to each of its addresses
    /// at least one, when its name resolves to several).
    #[arg(long, env = "ISTHMUS_TUNNEL_CONNECTIONS", default_value_t = 2)]
    pub tunnel_connections: usize,
    /// How often a gateway named by DNS (a Link's gatewayAddress, the cluster
    /// settings' gateway) is looked up again; also at once after a connection to it
    /// fails, and sooner while lookups fail. The last good addresses serve until a
    /// lookup succeeds.
    #[arg(long, env = "ISTHMUS_DNS_REFRESH_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub dns_refresh_interval: Duration,
    /// Runtime worker threads. Default: 1 for a sidecar or standalone proxy (one
    /// per pod adds up), every core for a gateway (it carries a whole cluster).
    #[arg(long, env = "ISTHMUS_WORKERS")]
    pub workers: Option<usize>,
    #[command(flatten)]
    pub log: isthmus_log::LogArgs,
}

/// The limits flags, one per [`Limits`] field. Their defaults are the values of
/// [`Limits::default`] (a test keeps the two equal).
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// How long to wait for a client's first bytes before treating it as opaque
    /// (forwarded untouched, for server-speaks-first protocols).
    #[arg(long, env = "ISTHMUS_DETECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub detect_timeout: Duration,
    /// How long a connection to an upstream (app, destination, gateway) may take.
    #[arg(long, env = "ISTHMUS_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    #[arg(long, env = "ISTHMUS_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections served at once per listener; more are reset at once.
    #[arg(long, env = "ISTHMUS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// A mesh peer must finish its TLS handshake within this time (gateway and
    /// sidecar inbound port).
    #[arg(long, env = "ISTHMUS_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// An HTTP/1 request head must be complete within this time of its first byte.
    #[arg(long, env = "ISTHMUS_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Most headers in one HTTP/1 request; more get 431.
    #[arg(long, env = "ISTHMUS_HTTP1_MAX_HEADERS", default_value_t = 100)]
    pub http1_max_headers: usize,
    /// Largest HTTP/1 request head in bytes; larger gets 431 (a longer request line 414).
    #[arg(long, env = "ISTHMUS_HTTP1_MAX_HEAD_BYTES", default_value_t = 65_536)]
    pub http1_max_head_bytes: usize,
    /// HTTP/2 streams a peer may open at once on one connection (tunnel and app).
    #[arg(
        long,
        env = "ISTHMUS_H2_MAX_CONCURRENT_STREAMS",
        default_value_t = 1000
    )]
    pub h2_max_concurrent_streams: u32,
    /// Largest HTTP/2 header list in bytes (decoded); larger gets 431 and a reset stream.
    #[arg(
        long,
        env = "ISTHMUS_H2_MAX_HEADER_LIST_SIZE",
        default_value_t = 65_536
    )]
    pub h2_max_header_list_size: u32,
    /// HTTP/2 streams opened and reset by the peer before being accepted, tolerated
    /// at once; more close the connection with GOAWAY (rapid reset).
    #[arg(
        long,
        env = "ISTHMUS_H2_MAX_PENDING_ACCEPT_RESET_STREAMS",
        default_value_t = 20
    )]
    pub h2_max_pending_accept_reset_streams: usize,
    /// Bytes buffered for sending per HTTP/2 stream before the writer waits.
    #[arg(long, env = "ISTHMUS_H2_MAX_SEND_BUF_SIZE", default_value_t = 409_600)]
    pub h2_max_send_buf_size: usize,
    /// Admin server connections served at once; more are reset at once.
    #[arg(long, env = "ISTHMUS_ADMIN_MAX_CONNECTIONS", default_value_t = 64)]
    pub admin_max_connections: usize,
    /// An admin request head must be complete within this time (idle keep-alive
    /// time included), or the connection is closed.
    #[arg(long, env = "ISTHMUS_ADMIN_HEADER_READ_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub admin_header_read_timeout: Duration,
}

/// Every resource limit of one proxy process, validated; what `/config` shows under
/// `limits`. [`Limits::default`] is the one place the defaults live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub tls_handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub http1_max_headers: usize,
    pub http1_max_head_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_size: u32,
    pub h2_max_pending_accept_reset_streams: usize,
    pub h2_max_send_buf_size: usize,
    pub admin_max_connections: usize,
    pub admin_header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let http = HttpSettings::default();
        Self {
            detect_timeout: proxy_core::detect::DEFAULT_DETECT_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: proxy_core::forward::DEFAULT_IDLE_TIMEOUT,
            max_connections: 10_000,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: proxy_core::http::DEFAULT_HEADER_READ_TIMEOUT,
            http1_max_headers: http.max_headers,
            http1_max_head_bytes: http.max_buf_size,
            h2_max_concurrent_streams: http.h2.max_concurrent_streams,
            h2_max_header_list_size: http.h2.max_header_list_size,
            h2_max_pending_accept_reset_streams: http.h2.max_pending_accept_reset_streams,
            h2_max_send_buf_size: http.h2.max_send_buf_size,
            admin_max_connections: crate::admin::DEFAULT_ADMIN_MAX_CONNECTIONS,
            admin_header_read_timeout: crate::admin::DEFAULT_ADMIN_HEADER_READ_TIMEOUT,
        }
    }
}

/// Bounds beyond which a value is a typo or an attack on ourselves, not a setting.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const MAX_SETUP_TIMEOUT: Duration = Duration::from_secs(300);

impl Limits {
    /// Validates the flags; the error names the flag and the accepted range.
    pub fn from_args(args: &LimitArgs) -> Result<Self, ConfigError> {
        let limits = Limits {
            detect_timeout: args.detect_timeout,
            connect_timeout: args.connect_timeout,
            idle_timeout: args.idle_timeout,
            max_connections: args.max_connections,
            tls_handshake_timeout: args.tls_handshake_timeout,
            header_read_timeout: args.header_read_timeout,
            http1_max_headers: args.http1_max_headers,
            http1_max_head_bytes: args.http1_max_head_bytes,
            h2_max_concurrent_streams: args.h2_max_concurrent_streams,
            h2_max_header_list_size: args.h2_max_header_list_size,
            h2_max_pending_accept_reset_streams: args.h2_max_pending_accept_reset_streams,
            h2_max_send_buf_size: args.h2_max_send_buf_size,
            admin_max_connections: args.admin_max_connections,
            admin_header_read_timeout: args.admin_header_read_timeout,
        };
        limits.validate()?;
        Ok(limits)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (flag, value, max) in [
            // Detection delays every server-speaks-first connection by this much.
            (
                "detect-timeout",
                self.detect_timeout,
                Duration::from_secs(60),
            ),
            ("connect-timeout", self.connect_timeout, MAX_SETUP_TIMEOUT),
            ("idle-timeout", self.idle_timeout, 7 * MAX_TIMEOUT),
            (
                "tls-handshake-timeout",
                self.tls_handshake_timeout,
                MAX_SETUP_TIMEOUT,
            ),
            (
                "header-read-timeout",
                self.header_read_timeout,
                MAX_SETUP_TIMEOUT,
            ),
            // A probe's own timeout is a few seconds; a minute is plenty for anyone.
            (
                "admin-header-read-timeout",
                self.admin_header_read_timeout,
                Duration::from_secs(60),
            ),
        ] {
            if value.is_zero() {
                return Err(invalid(flag, "must be longer than zero"));
            }
            if value > max {
                return Err(invalid(
                    flag,
                    format!("{value:?} is longer than the most accepted, {max:?}"),
                ));
            }
        }
        let counts: [(&'static str, u64, u64, u64); 8] = [
            ("max-connections", self.max_connections as u64, 1, 1_000_000),
            (
                "admin-max-connections",
                self.admin_max_connections as u64,
                1,
                10_000,
            ),
            (
                "http1-max-headers",
                self.http1_max_headers as u64,
                1,
                10_000,
            ),
            (
                "http1-max-head-bytes",
                self.http1_max_head_bytes as u64,
                MIN_HTTP1_MAX_HEAD_BYTES as u64,
                16 << 20,
            ),
            (
                "h2-max-concurrent-streams",
                u64::from(self.h2_max_concurrent_streams),
                1,
                100_000,
            ),
            (
                "h2-max-header-list-size",
                u64::from(self.h2_max_header_list_size),
                1024,
                16 << 20,
            ),
            (
                "h2-max-pending-accept-reset-streams",
                self.h2_max_pending_accept_reset_streams as u64,
                1,
                100_000,
            ),
            (
                "h2-max-send-buf-size",
                self.h2_max_send_buf_size as u64,
                16 * 1024,
                64 << 20,
            ),
        ];
        for (flag, value, min, max) in counts {
            if !(min..=max).contains(&value) {
                return Err(invalid(
                    flag,
                    format!("{value} is outside the accepted range {min}..={max}"),
                ));
            }
        }
        Ok(())
    }

    /// The HTTP/2 settings of the tunnel and of the transparent HTTP/2 path.
    pub fn h2_settings(&self) -> H2Settings {
        H2Settings {
            max_concurrent_streams: self.h2_max_concurrent_streams,
            max_header_list_size: self.h2_max_header_list_size,
            max_pending_accept_reset_streams: self.h2_max_pending_accept_reset_streams,
            max_send_buf_size: self.h2_max_send_buf_size,
            ..H2Settings::default()
        }
    }

    /// The HTTP settings of the transparent and explicit HTTP paths.
    pub fn http_settings(&self) -> HttpSettings {
        HttpSettings {
            header_read_timeout: Some(self.header_read_timeout),
            max_headers: self.http1_max_headers,
            max_buf_size: self.http1_max_head_bytes,
            h2: self.h2_settings(),
        }
    }

    /// The limits as `/config` shows them: durations as written on the command line.
    pub fn to_json(&self) -> serde_json::Value {
        let d = |d: Duration| format!("{d:?}");
        serde_json::json!({
            "detect_timeout": d(self.detect_timeout),
            "connect_timeout": d(self.connect_timeout),
            "idle_timeout": d(self.idle_timeout),
            "max_connections": self.max_connections,
            "tls_handshake_timeout": d(self.tls_handshake_timeout),
            "header_read_timeout": d(self.header_read_timeout),
            "http1_max_headers": self.http1_max_headers,
            "http1_max_head_bytes": self.http1_max_head_bytes,
            "h2_max_concurrent_streams": self.h2_max_concurrent_streams,
            "h2_max_header_list_size": self.h2_max_header_list_size,
            "h2_max_pending_accept_reset_streams": self.h2_max_pending_accept_reset_streams,
            "h2_max_send_buf_size": self.h2_max_send_buf_size,
            "admin_max_connections": self.admin_max_connections,
            "admin_header_read_timeout": d(self.admin_header_read_timeout),
        })
    }

    /// The admin server's bounds.
    pub fn admin(&self) -> crate::admin::AdminLimits {
        crate::admin::AdminLimits {
            max_connections: self.admin_max_connections,
            header_read_timeout: self.admin_header_read_timeout,
        }
    }
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
    pub discovery: DiscoverySource,
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub opaque_ports: HashSet<u16>,
    /// Deliver inbound traffic on loopback (`--inbound-loopback`).
    pub inbound_loopback: bool,
    /// Gateway endpoints may be this host's addresses (`--allow-local-endpoints`).
    pub allow_local_endpoints: bool,
    /// Every resource limit: timeouts, connection bounds, header and HTTP/2 limits.
    pub limits: Limits,
    pub shutdown_grace: Duration,
    pub reload_interval: Duration,
    pub tunnel_connections: usize,
    /// Between two lookups of a gateway's DNS name (`--dns-refresh-interval`).
    pub dns_refresh_interval: Duration,
    /// `None`: the role's default.
    pub workers: Option<usize>,
}

/// Why `--discovery kube` fails in a build without the `kube` feature (the
/// sidecar's): it has no Kubernetes client to read the API server with.
pub const WITHOUT_KUBE: &str = "kube needs an isthmus-proxy built with the `kube` feature \
    (the gateway's build); this one reads only --discovery dir";

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
        let discovery = match (args.discovery, &args.manifests) {
            (DiscoveryKind::Dir, None) => {
                return Err(invalid(
                    "manifests",
                    "is required with --discovery dir (the default)",
                ));
            }
            (DiscoveryKind::Dir, Some(dir)) if !dir.is_dir() => {
                return Err(invalid(
                    "manifests",
                    format!("{} is not a directory", dir.display()),
                ));
            }
            (DiscoveryKind::Dir, Some(dir)) => DiscoverySource::Dir(dir.clone()),
            (DiscoveryKind::Kube, Some(dir)) => {
                return Err(invalid(
                    "manifests",
                    format!(
                        "{} is given with --discovery kube, which reads the API server instead",
                        dir.display()
                    ),
                ));
            }
            (DiscoveryKind::Kube, None) if !cfg!(feature = "kube") => {
                return Err(invalid("discovery", WITHOUT_KUBE));
            }
            (DiscoveryKind::Kube, None) => DiscoverySource::Kube {
                namespace: args.discovery_namespace.clone(),
            },
        };
        if args.discovery_namespace.is_some() && args.discovery == DiscoveryKind::Dir {
            return Err(invalid(
                "discovery-namespace",
                "only applies to --discovery kube",
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
        let limits = Limits::from_args(&args.limits)?;
        for (flag, value) in [
            ("tunnel-connections", args.tunnel_connections),
            ("workers", args.workers.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(invalid(flag, "must be at least 1"));
            }
        }
        if args.reload_interval.is_zero() {
            return Err(invalid("reload-interval", "must be longer than zero"));
        }
        if args.dns_refresh_interval.is_zero() {
            return Err(invalid("dns-refresh-interval", "must be longer than zero"));
        }
        if args.opaque_ports.contains(&0) {
            return Err(invalid("opaque-ports", "0 is not a port"));
        }
        Ok(Config {
            cluster: args.cluster.clone(),
            identity,
            discovery,
            outbound_addrs: args.outbound_addr.clone(),
            inbound_addrs: args.inbound_addr.clone(),
            admin_addr: args.admin_addr,
            opaque_ports: args.opaque_ports.iter().copied().collect(),
            inbound_loopback: args.inbound_loopback,
            allow_local_endpoints: args.allow_local_endpoints,
            limits,
            shutdown_grace: args.shutdown_grace,
            reload_interval: args.reload_interval,
            tunnel_connections: args.tunnel_connections,
            dns_refresh_interval: args.dns_refresh_interval,
            workers: args.workers,
        })
    }

    /// Where inbound traffic reaches the app.
    pub fn app_address(&self) -> AppAddress {
        if self.inbound_loopback {
            AppAddress::Loopback
        } else {
            AppAddress::Pod
        }
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
        // The mesh's one grammar has days too.
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(5 * 86_400)));
        for bad in ["5", "5x", "s", ""] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("3s, 500ms, 1m30s or 28d"), "{bad}: {err}");
        }
        let err = parse_duration("1y").unwrap_err();
        assert!(err.contains("no fixed length"), "{err}");
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
        bad.manifests = Some(dir.path().join("missing"));
        assert!(
            Config::from_args(&bad)
                .unwrap_err()
                .to_string()
                .starts_with("--manifests:")
        );
        bad.manifests = None;
        assert!(
            Config::from_args(&bad)
                .unwrap_err()
                .to_string()
                .contains("required with --discovery dir")
        );
        bad.discovery = DiscoveryKind::Kube;
        bad.discovery_namespace = Some("isthmus-system".into());
        if cfg!(feature = "kube") {
            assert_eq!(
                Config::from_args(&bad).unwrap().discovery,
                DiscoverySource::Kube {
                    namespace: Some("isthmus-system".into())
                }
            );
        } else {
            let err = Config::from_args(&bad).unwrap_err().to_string();
            assert!(
                err.starts_with("--discovery: kube needs") && err.contains("`kube` feature"),
                "{err}"
            );
        }
        bad.manifests = Some(dir.path().to_path_buf());
        assert!(
            Config::from_args(&bad)
                .unwrap_err()
                .to_string()
                .contains("reads the API server instead")
        );
    }

    #[test]
    fn flag_defaults_are_the_limits_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_args(&args(dir.path())).unwrap();
        assert_eq!(config.limits, Limits::default());
        let http = config.limits.http_settings();
        let core = HttpSettings::default();
        assert_eq!(http.header_read_timeout, core.header_read_timeout);
        assert_eq!(http.max_headers, core.max_headers);
        assert_eq!(http.max_buf_size, core.max_buf_size);
        assert_eq!(
            http.h2.max_header_list_size,
            H2Settings::default().max_header_list_size
        );
    }

    #[test]
    fn zero_and_absurd_limits_name_their_flag() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &str, &str); 15] = [
            ("--admin-max-connections", "0", "outside the accepted range"),
            (
                "--admin-max-connections",
                "100000",
                "outside the accepted range",
            ),
            ("--admin-header-read-timeout", "0s", "longer than zero"),
            ("--detect-timeout", "0s", "longer than zero"),
            ("--detect-timeout", "2h", "longer than the most"),
            ("--connect-timeout", "0ms", "longer than zero"),
            ("--idle-timeout", "0s", "longer than zero"),
            ("--tls-handshake-timeout", "1h", "longer than the most"),
            ("--header-read-timeout", "0s", "longer than zero"),
            ("--max-connections", "0", "outside the accepted range"),
            ("--http1-max-headers", "0", "outside the accepted range"),
            (
                "--http1-max-head-bytes",
                "1024",
                "outside the accepted range",
            ),
            (
                "--h2-max-concurrent-streams",
                "0",
                "outside the accepted range",
            ),
            ("--h2-max-header-list-size", "99999999999", "invalid value"),
            ("--h2-max-send-buf-size", "10", "outside the accepted range"),
        ];
        for (flag, value, problem) in cases {
            let parsed = Cli::try_parse_from([
                "isthmus-proxy",
                "gateway",
                "--cluster",
                "cluster-a",
                "--identity-dir",
                dir.path().to_str().unwrap(),
                "--manifests",
                dir.path().to_str().unwrap(),
                flag,
                value,
            ]);
            let err = match parsed {
                Err(e) => e.to_string(),
                Ok(cli) => match cli.role {
                    RoleCommand::Gateway(args) => Config::from_args(&args).unwrap_err().to_string(),
                    _ => unreachable!(),
                },
            };
            assert!(
                err.contains(flag) && err.contains(problem),
                "{flag} {value}: {err}"
            );
        }
    }

    #[test]
    fn every_limit_flag_has_its_isthmus_variable() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let gateway = cli.find_subcommand("gateway").unwrap();
        let limits = [
            "detect-timeout",
            "connect-timeout",
            "idle-timeout",
            "max-connections",
            "tls-handshake-timeout",
            "header-read-timeout",
            "http1-max-headers",
            "http1-max-head-bytes",
            "h2-max-concurrent-streams",
            "h2-max-header-list-size",
            "h2-max-pending-accept-reset-streams",
            "h2-max-send-buf-size",
            "admin-max-connections",
            "admin-header-read-timeout",
        ];
        for flag in limits {
            let arg = gateway
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .unwrap_or_else(|| panic!("no --{flag}"));
            let want = format!("ISTHMUS_{}", flag.to_uppercase().replace('-', "_"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "--{flag}"
            );
        }
        // Every field of Limits has its flag (the JSON view lists every field).
        let shown = Limits::default().to_json();
        assert_eq!(shown.as_object().unwrap().len(), limits.len());
    }
}
