//! Identity metrics (prometheus-client): the current leaf's expiry and whether it has
//! run out, rotations, refused updates and handshake failures by reason.
//!
//! The [`crate::CredentialStore`] updates the rotation metrics itself; handshake failures
//! are recorded by whoever drives the handshake (it alone sees every failure, including
//! the plaintext client that never reaches a verifier), with [`IdentityMetrics::handshake_error`],
//! which also logs the failure with its reason.
//! This module does not serve `/metrics`; the admin server encodes the registry.

use std::io;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::verify::HandshakeFailure;

/// The label set of the reason-labelled families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A fixed, low-cardinality reason such as `expired` or `identity_mismatch`.
    pub reason: &'static str,
}

/// Handles to the identity metrics; clones share the same series.
#[derive(Debug, Clone, Default)]
pub struct IdentityMetrics {
    leaf_expiry: Gauge,
    leaf_expired: Gauge,
    reloads: Counter,
    refusals: Family<ReasonLabels, Counter>,
    handshake_failures: Family<ReasonLabels, Counter>,
}

impl IdentityMetrics {
    /// Creates the metrics and registers them into `registry` as
    /// `identity_leaf_expiry_timestamp_seconds`, `identity_leaf_expired`, `identity_reloads_total`,
    /// `identity_reload_refusals_total{reason}` and `identity_handshake_failures_total{reason}`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register_with_unit(
            "identity_leaf_expiry_timestamp",
            "notAfter of the leaf certificate in use, as a Unix timestamp",
            Unit::Seconds,
            metrics.leaf_expiry.clone(),
        );
        registry.register(
            "identity_leaf_expired",
            "1 while the leaf in use is outside its validity window: it is not presented \
             in handshakes and the proxy is not ready until a valid leaf is written",
            metrics.leaf_expired.clone(),
        );
        registry.register(
            "identity_reloads",
            "Credential updates validated and put in use",
            metrics.reloads.clone(),
        );
        registry.register(
            "identity_reload_refusals",
            "Credential updates refused (the previous identity kept serving), by reason",
            metrics.refusals.clone(),
        );
        registry.register(
            "identity_handshake_failures",
            "TLS handshakes that failed, by reason",
            metrics.handshake_failures.clone(),
        );
        metrics
    }

    /// Counts one failed handshake.
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Classifies a tokio-rustls handshake error, counts it, logs it (a warning with the
    /// reason label and the full error; call it inside a span that names the peer) and
    /// returns the reason.
    pub fn handshake_error(&self, err: &io::Error) -> HandshakeFailure {
        let reason = HandshakeFailure::classify_io(err);
        self.handshake_failed(reason);
        tracing::warn!(reason = reason.as_str(), error = %err, "TLS handshake failed");
        reason
    }

    /// The number of failed handshakes counted with this reason (for tests and `/config`).
    pub fn handshake_failures(&self, reason: HandshakeFailure) -> u64 {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .get()
    }

    pub(crate) fn set_leaf_expiry(&self, not_after_unix: i64) {
        self.leaf_expiry.set(not_after_unix);
    }

    pub(crate) fn set_leaf_expired(&self, expired: bool) {
        self.leaf_expired.set(i64::from(expired));
    }

    /// Whether the leaf in use was last seen outside its validity window.
    pub fn leaf_expired(&self) -> bool {
        self.leaf_expired.get() != 0
    }

    pub(crate) fn reloaded(&self, not_after_unix: i64) {
        self.reloads.inc();
        self.set_leaf_expiry(not_after_unix);
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn encodes_names_and_labels() {
        let mut registry = Registry::default();
        let metrics = IdentityMetrics::register(&mut registry);
        metrics.reloaded(1_700_000_000);
        metrics.refused("expired");
        metrics.set_leaf_expired(true);
        let err = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(metrics.handshake_error(&err), HandshakeFailure::Io);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "identity_leaf_expiry_timestamp_seconds 1700000000",
            "identity_reloads_total 1",
            "identity_leaf_expired 1",
            "identity_reload_refusals_total{reason=\"expired\"} 1",
            "identity_handshake_failures_total{reason=\"io\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
