//! What the workspace's tests share, so each concept is written once.
//!
//! # Layout
//!
//! - [`eventually`]: bounded retries instead of sleeps: [`eventually()`] and
//!   [`eventually_blocking`] return what a check found, [`assert_eventually!`] waits
//!   for a condition.
//! - [`cases`]: [`test_cases!`], a `#[test]` per case of a table, for a check run
//!   once per address family or backend; [`cases::fuzz_corpus`], a fuzz target's
//!   collected inputs, for suites that replay them.
//! - [`echo`]: [`echo::Echo`], an echo origin that counts what reaches it.
//! - [`metrics`]: [`Metrics`], the admin server's OpenMetrics text parsed once, and
//!   matched by name and labels.
//! - [`pki`]: [`Pki`], a trust anchor with an issuer per cluster minted at test time
//!   through `proxy_identity::mint`, validity windows, and [`Presented`], a raw TLS
//!   peer that shows any chain (expired, forged, foreign) and trusts anyone.
//! - [`proxy`]: [`Proxy`], one `isthmus-proxy` process on loopback: started from a
//!   command line, waited for on `/ready`, read through `/config` and `/metrics`,
//!   killed on drop with its log shown when the test fails.
//!
//! Deliberately not here: network namespaces and the sidecar pod (the end-to-end
//! harness in `tests/` owns them), and any suite's own origins or assertions. This
//! crate is a dev-dependency only and panics instead of returning errors: a fixture
//! that cannot be built is a failed test, named by the message.

#![allow(clippy::unwrap_used)]

pub mod cases;
pub mod echo;
pub mod eventually;
pub mod metrics;
pub mod pki;
pub mod proxy;

use std::time::Duration;

pub use eventually::{eventually, eventually_blocking};
pub use metrics::Metrics;
pub use pki::{Pki, Presented};
pub use proxy::Proxy;

/// Bound of every single wait that should take milliseconds: a debug build on a
/// busy machine.
pub const STEP: Duration = Duration::from_secs(10);
