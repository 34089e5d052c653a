//! Where a leaf stands in its validity window, and what the store does about it:
//! an own leaf is presented only inside its window, and leaving the window is
//! logged and published as a metric once.
//!
//! Handshakes and readiness read the clock themselves ([`CredentialStore::presentable`],
//! [`CredentialStore::validity`]); the store's watch only has to wake at notAfter for
//! the log line and the metric ([`until_validity_changes`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;

use super::{CredentialStore, Credentials};
use crate::rfc3339;

impl Credentials {
    /// Where `now` falls in the leaf's validity window. notAfter itself counts as
    /// expired: x509 times have whole seconds, and failing closed a second early is
    /// the safe side.
    pub fn validity_at(&self, now: SystemTime) -> LeafValidity {
        if now < self.not_before {
            LeafValidity::NotYetValid {
                not_before: self.not_before,
            }
        } else if now >= self.not_after {
            LeafValidity::Expired {
                not_after: self.not_after,
            }
        } else {
            LeafValidity::Valid
        }
    }
}

/// Where the current time falls in a leaf's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafValidity {
    /// Inside the window: the leaf may be presented.
    Valid,
    /// Before notBefore (the clock stepped back after the leaf was loaded).
    NotYetValid {
        /// The leaf's notBefore.
        not_before: SystemTime,
    },
    /// At or past notAfter.
    Expired {
        /// The leaf's notAfter.
        not_after: SystemTime,
    },
}

impl LeafValidity {
    /// Whether the leaf may be presented.
    pub fn is_valid(self) -> bool {
        self == LeafValidity::Valid
    }
}

impl std::fmt::Display for LeafValidity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeafValidity::Valid => f.write_str("valid"),
            LeafValidity::NotYetValid { not_before } => {
                write!(f, "not valid before {}", rfc3339::format(*not_before))
            }
            LeafValidity::Expired { not_after } => {
                write!(f, "expired at {}", rfc3339::format(*not_after))
            }
        }
    }
}

impl CredentialStore {
    /// The leaf, chain and key to present in a handshake now, or `None` when the
    /// leaf in use is outside its validity window: an expired leaf is never shown,
    /// so the handshake fails (rustls sends no certificate) instead of succeeding
    /// with a certificate the peer should not accept. Asked at every handshake.
    pub fn presentable(&self) -> Option<Arc<CertifiedKey>> {
        let creds = self.current();
        let validity = creds.validity_at(SystemTime::now());
        if validity.is_valid() {
            Some(creds.certified_key().clone())
        } else {
            // The expiry itself is logged once by `watch`; this is per handshake.
            tracing::debug!(id = %creds.id(), %validity, "own leaf withheld from a handshake");
            None
        }
    }

    /// Where the current time falls in the validity window of the leaf in use.
    pub fn validity(&self) -> LeafValidity {
        self.current().validity_at(SystemTime::now())
    }

    /// Logs and publishes (metric) a change of the current leaf's validity at `now`.
    pub(super) fn publish_validity(&self, now: SystemTime) {
        let creds = self.current();
        let validity = creds.validity_at(now);
        let previous = std::mem::replace(&mut self.lock().published_validity, validity);
        if let Some(metrics) = &self.metrics {
            metrics.set_leaf_expired(!validity.is_valid());
        }
        if previous == validity {
            return;
        }
        if validity.is_valid() {
            tracing::info!(id = %creds.id(), serial = creds.serial(), "identity leaf valid again: presented in handshakes, ready");
        } else {
            tracing::error!(
                id = %creds.id(),
                serial = creds.serial(),
                %validity,
                cert_file = %self.paths.cert.display(),
                "identity leaf outside its validity: not presented in handshakes and not ready until a valid leaf is written"
            );
        }
    }
}

/// The longest the validity watch sleeps: the runtime's timer follows a monotonic
/// clock, so a wall clock stepped forward (NTP, a suspended VM) is noticed within
/// this; the next poll tick usually notices it sooner.
const MAX_VALIDITY_SLEEP: Duration = Duration::from_secs(60);

/// How long from `now` until `creds` enter or leave their validity window (a few
/// milliseconds past notAfter, so the wake-up sees the leaf expired).
pub(super) fn until_validity_changes(creds: &Credentials, now: SystemTime) -> Duration {
    let next = if now < creds.not_before() {
        creds.not_before()
    } else {
        creds.not_after()
    };
    match next.duration_since(now) {
        Ok(left) => (left + Duration::from_millis(5)).min(MAX_VALIDITY_SLEEP),
        // Already past: nothing changes any more until a rotation, which a tick brings.
        Err(_) => MAX_VALIDITY_SLEEP,
    }
}
