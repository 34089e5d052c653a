//! What the real server's admission and registry strategies add to a write made
//! through the API, hooked in before the object is stored: ClusterIP
//! allocation for Services (see `allocate`).
//!
//! Writes through [`Store::put_value`](super::Store::put_value) and friends
//! bypass this, as their docs say.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde_json::Value;

use super::{State, meta_str};
use crate::allocate;
use crate::resource::ResourceType;
use crate::status::ApiError;

impl State {
    /// Admits `new` (an update of `old`, or a create) in namespace `ns`.
    pub(super) fn admit(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        old: Option<&Value>,
        new: &mut Value,
    ) -> Result<(), ApiError> {
        if !(rt.group.is_empty() && rt.plural == "services") {
            return Ok(());
        }
        let name = meta_str(new, "name").unwrap_or_default().to_owned();
        let used: BTreeSet<IpAddr> = self
            .objects
            .iter()
            .filter(|(k, _)| k.group.is_empty() && k.plural == "services")
            .filter(|(k, _)| name.is_empty() || k.namespace != ns || k.name != name)
            .flat_map(|(_, o)| allocate::cluster_ips(o))
            .collect();
        let random = self.next_id();
        allocate::admit_service(&self.service_range, &used, old, new, random)
    }
}
