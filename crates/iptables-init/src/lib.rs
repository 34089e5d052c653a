//! Traffic capture for a pod's network namespace: the library behind `isthmus-init`.
//!
//! # Layout
//!
//! - [`config`]: the validated, typed [`config::Config`] and the parsers for the
//!   values a user types (port lists and ranges, CIDRs).
//! - [`rules`]: a pure function from a `Config` (and what the `nat` table holds now)
//!   to the text fed to `iptables-restore`, for IPv4 and IPv6. The module doc lists
//!   the rules in order and why each one is there.
//! - [`backend`]: finding the `iptables-nft-*` / `iptables-legacy-*` (and `ip6tables-*`)
//!   tools and choosing between them.
//! - [`apply`]: running `*-save` and `*-restore` (through a [`apply::Runner`], faked
//!   in tests), installing into one backend and cleaning up every backend.
//!
//! This crate deliberately knows nothing of the proxy: it only knows the proxy's UID
//! and ports. It touches only the `nat` table, and inside it only its own chains and
//! the two jump rules into them.

pub mod apply;
pub mod backend;
pub mod config;
pub mod rules;
