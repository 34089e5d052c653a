//! What can go wrong while building or removing namespaces.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// A failure, naming the command, namespace, address or file involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program could not be started at all.
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("{command} failed ({status}): {output}")]
    Failed {
        command: String,
        status: ExitStatus,
        /// Its stderr, then its stdout, trimmed.
        output: String,
    },
    /// A program did not exit in time and was killed.
    #[error("{command} did not exit within {timeout:?} and was killed; stderr: {stderr}")]
    Timeout {
        command: String,
        timeout: Duration,
        stderr: String,
    },
    /// An address outside the ranges this crate may use.
    #[error("{addr} is outside the ranges 198.18.0.0/15 and 2001:2::/48")]
    OutsideRange { addr: String },
    /// Text that is not an address (or a network) at all.
    #[error("{text} is not an IP address or network")]
    BadAddress { text: String },
    /// A default route would let traffic leave the run's namespaces.
    #[error("no default route ({dst}) out of namespace {namespace}")]
    DefaultRoute { namespace: String, dst: String },
    /// A name longer than an interface name may be.
    #[error("{name} is longer than the 15 bytes of an interface name")]
    NameTooLong { name: String },
    /// `setns` into a namespace failed.
    #[error("entering namespace {}: {source}", path.display())]
    Enter { path: PathBuf, source: nix::Error },
    /// A file of the run (record, hosts file, handle) could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A thread that entered a namespace could not be started.
    #[error("starting a thread to enter namespace {namespace}: {source}")]
    Thread {
        namespace: String,
        source: std::io::Error,
    },
}
