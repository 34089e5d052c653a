//! Support for end-to-end tests that need a real kernel: network namespaces,
//! veth pairs, iptables, and the workspace's own binaries.
//!
//! # Layout
//!
//! - [`netns`]: [`netns::Lab`], the guard that creates namespaces and links under a
//!   per-run prefix and removes them (and kills its child processes) on drop, even when
//!   a test fails; [`netns::Namespace`] runs commands and closures inside one.
//! - [`binary`]: finding the workspace's binaries next to the running test, and
//!   copying them where another UID can execute them.
//! - [`tcp`]: listeners, dials and waits, each bounded by a timeout.
//! - [`identity`]: the minted identity of a test pod, and a multi-cluster PKI.
//! - [`multicluster`]: cluster settings, Link and Service manifests for gateways.
//! - [`h2c`]: HTTP/2 origins and clients on threads of their own, each with a
//!   current-thread runtime and a bound.
//! - [`figure`]: `FIGURE name = value` lines for what tests measure.
//! - [`tls_probe`]: a raw TLS client config for probing a mesh port's TLS policy.
//! - [`peer`]: the pool configuration of a test client of a mesh port.
//! - [`pod`]: one pod with the real capture and sidecar, and a server namespace,
//!   for the fault and load tests; process probes (RSS, descriptors, limits).
//! - [`wan`]: namespaces of several clusters on one bridge, and a proxy's command
//!   line with its files in one folder.
//!
//! Addresses come only from 198.18.0.0/15 and 2001:2::/48, inside namespaces the tests
//! create; nothing gets a default route or NAT to the host. This crate is never a
//! dependency of the product; it only uses the public APIs of the crates it tests.
//! The tests in `tests/` need root and fail (never skip) without it.

pub mod binary;
pub mod figure;
pub mod h2c;
pub mod identity;
pub mod multicluster;
pub mod netns;
pub mod peer;
pub mod pod;
pub mod tcp;
pub mod tls_probe;
pub mod wan;
