//! The seam between the hot path and discovery: a [`RouteLookup`] answers, for one
//! connection, whether it passes through or goes to another cluster.
//!
//! proxy-core does not know where routes come from; the proxy crate adapts the
//! discovery index to this trait, and tests hand in a fixed table.

use std::sync::Arc;

use isthmus_vocab::{Authority, ClusterName, ServicePolicy};

use crate::addr::OrigDstAddr;

/// What to do with one outbound connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Not a mirrored service: connect to the original destination as the app asked.
    Passthrough,
    /// A mirrored service: open a tunnel stream through the cluster's gateway (one
    /// per HTTP request, else one per connection).
    Mirrored {
        cluster: ClusterName,
        authority: Authority,
        /// The Service's timeouts and retries, applied to each HTTP request.
        policy: Arc<ServicePolicy>,
    },
}

/// Answers routes for the hot path. Implementations must not block: they are called
/// once per accepted connection on the runtime's worker threads.
pub trait RouteLookup: Send + Sync + 'static {
    /// The route for a transparently redirected connection.
    fn route_addr(&self, dst: OrigDstAddr) -> Route;
    /// The route for a name, as an explicit proxy (`CONNECT host:port`) sees it.
    fn route_authority(&self, authority: &Authority) -> Route;
}

/// A lookup that passes everything through: a sidecar with no discovery yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassthroughOnly;

impl RouteLookup for PassthroughOnly {
    fn route_addr(&self, _dst: OrigDstAddr) -> Route {
        Route::Passthrough
    }

    fn route_authority(&self, _authority: &Authority) -> Route {
        Route::Passthrough
    }
}

impl<T: RouteLookup + ?Sized> RouteLookup for Arc<T> {
    fn route_addr(&self, dst: OrigDstAddr) -> Route {
        (**self).route_addr(dst)
    }

    fn route_authority(&self, authority: &Authority) -> Route {
        (**self).route_authority(authority)
    }
}
