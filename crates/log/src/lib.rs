//! How every Isthmus binary logs, so that an operator configures the proxy, the
//! controller and the CLI alike: a filter in tracing's env-filter syntax
//! (`--log`, `ISTHMUS_LOG`), one JSON object a line or plain text
//! (`--log-format`, `ISTHMUS_LOG_FORMAT`), on stderr, with colour codes only when
//! stderr is a terminal (a pod's log, a file or a pipe would keep them as escape
//! sequences).
//!
//! Not here: what is logged, or metrics.

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// The variable naming the log filter.
pub const LOG_ENV: &str = "ISTHMUS_LOG";
/// The variable naming the log format.
pub const LOG_FORMAT_ENV: &str = "ISTHMUS_LOG_FORMAT";

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Plain,
    /// One JSON object a line, for log collectors.
    Json,
}

/// The log flags of a long-running binary.
#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = LOG_FORMAT_ENV, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Log filter (tracing's env-filter syntax).
    #[arg(long, env = LOG_ENV, default_value = "info")]
    pub log: String,
}

impl LogArgs {
    /// Installs the subscriber these flags select.
    pub fn init(&self) {
        init(&self.log, self.log_format);
    }
}

/// Installs a subscriber writing `format` to stderr, filtered by `filter` (`info`
/// when `filter` does not parse). Only the first call of a process counts.
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second subscriber (a test that set one up) is refused; the first stays.
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
