//! A route table instead of discovery.

use super::*;

/// A [`RouteLookup`] from a table; anything not in it passes through.
#[derive(Default)]
pub struct FixedRoutes {
    by_addr: HashMap<SocketAddr, Route>,
    by_authority: HashMap<String, Route>,
}

impl FixedRoutes {
    /// Connections to `dst` (a mirrored service's ClusterIP) go to `cluster`'s
    /// `authority`.
    pub fn mirror_addr(mut self, dst: SocketAddr, cluster: &str, authority: &str) -> Self {
        self.by_addr.insert(dst, mirrored(cluster, authority));
        self
    }

    /// [`FixedRoutes::mirror_addr`] for a Service with its own timeouts and retries.
    pub fn mirror_addr_with(
        mut self,
        dst: SocketAddr,
        cluster: &str,
        authority: &str,
        policy: isthmus_vocab::ServicePolicy,
    ) -> Self {
        let mut route = mirrored(cluster, authority);
        if let Route::Mirrored { policy: slot, .. } = &mut route {
            *slot = Arc::new(policy);
        }
        self.by_addr.insert(dst, route);
        self
    }

    /// An explicit proxy's `CONNECT name` goes to `cluster`'s `authority`.
    pub fn mirror_name(mut self, name: &str, cluster: &str, authority: &str) -> Self {
        self.by_authority
            .insert(name.to_owned(), mirrored(cluster, authority));
        self
    }
}

fn mirrored(cluster: &str, authority: &str) -> Route {
    Route::Mirrored {
        cluster: ClusterName::parse(cluster).unwrap(),
        authority: Authority::parse(authority).unwrap(),
        policy: Arc::default(),
    }
}

impl RouteLookup for FixedRoutes {
    fn route_addr(&self, dst: OrigDstAddr) -> Route {
        self.by_addr
            .get(&dst.0)
            .cloned()
            .unwrap_or(Route::Passthrough)
    }

    fn route_authority(&self, authority: &Authority) -> Route {
        self.by_authority
            .get(authority.as_str())
            .cloned()
            .unwrap_or(Route::Passthrough)
    }
}
