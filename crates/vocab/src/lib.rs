//! The mesh's vocabulary: the names and wire contract every Isthmus crate shares.
//!
//! A concept that crosses crates is defined here once, parsed here once, and moved
//! between crates as a value, never re-parsed at a boundary: what discovery indexes
//! is what the tunnel sends, and what a gateway reads off the wire compares equal to
//! what discovery holds.
//!
//! # Layout
//!
//! - [`cluster`]: [`ClusterName`], a DNS label (`cluster-a`).
//! - [`authority`]: [`Authority`], a service's `host:port` as the tunnel carries it.
//! - [`spiffe`]: [`SpiffeId`] and [`TrustDomain`], after the SPIFFE ID specification.
//! - [`tunnel`]: the tunnel's header names and its [`Refusal`] reasons with their
//!   HTTP statuses.
//! - [`policy`]: a Service's request [`ServicePolicy`] (timeouts, retries) and the
//!   annotations that set it.
//! - [`ports`]: the mesh's default ports and the proxy's UID.
//! - [`error_chain`]: one error and its causes on one line.
//!
//! This crate holds grammar only: no sockets, no certificates, no Kubernetes. With
//! the `serde` feature the names (de)serialize as their strings, parsed as here.

pub mod authority;
pub mod cluster;
pub mod policy;
pub mod ports;
pub mod spiffe;
pub mod tunnel;

pub use authority::{Authority, AuthorityError};
pub use cluster::{ClusterName, ClusterNameError};
pub use policy::ServicePolicy;
pub use spiffe::{IdError, SpiffeId, TrustDomain};
pub use tunnel::{
    CLUSTER_HEADER, ONE_REQUEST_H2, ONE_REQUEST_HEADER, ONE_REQUEST_HTTP1, REFUSAL_HEADER, Refusal,
};

/// `error` and its sources on one line, `outer: inner: innermost`, for a log field,
/// a status message or `/config`.
///
/// A cause whose text the line already holds is left out: some errors repeat their
/// source in their own message, and saying it twice adds nothing.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(feature = "serde")]
mod serde_impls;
#[cfg(feature = "serde")]
pub use serde_impls::de_str;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layers(texts: &[&'static str]) -> Layer {
        let mut inner: Option<Box<Layer>> = None;
        for text in texts.iter().rev() {
            inner = Some(Box::new(Layer {
                text,
                source: inner,
            }));
        }
        *inner.expect("at least one layer")
    }

    #[test]
    fn error_chain_joins_causes_once() {
        assert_eq!(error_chain(&layers(&["a"])), "a");
        assert_eq!(
            error_chain(&layers(&["loading x", "reading y", "denied"])),
            "loading x: reading y: denied"
        );
        // A layer that already quotes its cause is not followed by it again.
        assert_eq!(
            error_chain(&layers(&["watch failed: timed out", "timed out"])),
            "watch failed: timed out"
        );
    }
}
