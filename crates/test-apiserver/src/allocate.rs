//! ClusterIP allocation, as kube-apiserver's Service registry does it: a
//! Service written through the API without `clusterIP` gets a free address of
//! the configured service range, a requested address must lie in the range and
//! be free, `None` makes it headless, ExternalName Services get none, and the
//! address is immutable once set (an update that leaves it out keeps it).
//!
//! The addresses in use are read from the stored Services on every write
//! rather than kept in a second structure: deleting a Service frees its address
//! by construction, and a dry run cannot leak one. Dynamic allocation starts at
//! a random offset in the upper part of the range and falls back to the lower
//! part, which stays free longest for Services that ask for a fixed address
//! (the real allocator's two bands).
//!
//! Not here: dual-stack (one family per range), NodePorts, the `kubernetes`
//! Service of `default`.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Value, json};

use crate::status::ApiError;

/// The range kube-apiserver uses when `--service-cluster-ip-range` is not given.
pub const DEFAULT_SERVICE_RANGE: &str = "10.96.0.0/12";

/// The service range and what is usable in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceRange {
    net: IpNet,
}

impl Default for ServiceRange {
    fn default() -> Self {
        Self::new(
            DEFAULT_SERVICE_RANGE
                .parse()
                .expect("the default service range is a valid CIDR"),
        )
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl ServiceRange {
    pub(crate) fn new(net: IpNet) -> Self {
        Self { net: net.trunc() }
    }

    /// How many addresses can be handed out: the network address never is, nor
    /// an IPv4 broadcast address.
    fn size(&self) -> u128 {
        let host_bits = u32::from(self.net.max_prefix_len() - self.net.prefix_len());
        let all = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
        let reserved = match self.net {
            IpNet::V4(_) => 2,
            IpNet::V6(_) => 1,
        };
        all.saturating_sub(reserved)
    }

    /// The `offset`th usable address.
    fn nth(&self, offset: u128) -> Option<IpAddr> {
        let base = to_u128(self.net.network()) + 1 + offset;
        match self.net {
            IpNet::V4(_) => u32::try_from(base)
                .ok()
                .map(|v| IpAddr::from(std::net::Ipv4Addr::from(v))),
            IpNet::V6(_) => Some(IpAddr::from(std::net::Ipv6Addr::from(base))),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        if !self.net.contains(&ip) {
            return false;
        }
        let offset = to_u128(ip).wrapping_sub(to_u128(self.net.network()));
        offset >= 1 && offset <= self.size()
    }

    /// A free address, preferring the upper band; `None` when the range is full.
    fn next_free(&self, used: &BTreeSet<IpAddr>, random: u64) -> Option<IpAddr> {
        let size = self.size();
        // kube-apiserver keeps min(max(16, size/16), 256) addresses at the
        // bottom for Services that ask for a fixed one.
        let lower = (size / 16).clamp(16, 256).min(size);
        let bands = [(lower, size - lower), (0, lower)];
        bands.into_iter().find_map(|(start, len)| {
            if len == 0 {
                return None;
            }
            let first = u128::from(random) % len;
            // Among used.len() + 1 distinct candidates at least one is free,
            // unless the band is smaller and full.
            let tries = len.min(used.len() as u128 + 1);
            (0..tries)
                .filter_map(|i| self.nth(start + (first + i) % len))
                .find(|ip| !used.contains(ip))
        })
    }
}

impl std::fmt::Display for ServiceRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.net.fmt(f)
    }
}

/// The addresses `service` holds (`spec.clusterIPs`, else `spec.clusterIP`).
pub(crate) fn cluster_ips(service: &Value) -> Vec<IpAddr> {
    let listed: Vec<IpAddr> = service
        .pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.as_str()?.parse().ok())
        .collect();
    if !listed.is_empty() {
        return listed;
    }
    requested(service)
        .and_then(|ip| ip.parse().ok())
        .into_iter()
        .collect()
}

/// `spec.clusterIP`, or the first of `spec.clusterIPs`; `None` when neither is set.
fn requested(service: &Value) -> Option<&str> {
    service
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .filter(|ip| !ip.is_empty())
        .or_else(|| {
            service
                .pointer("/spec/clusterIPs/0")
                .and_then(Value::as_str)
                .filter(|ip| !ip.is_empty())
        })
}

fn is_external_name(service: &Value) -> bool {
    service.pointer("/spec/type").and_then(Value::as_str) == Some("ExternalName")
}

fn invalid(name: &str, field: &str, value: &Value, detail: &str) -> ApiError {
    let mut e = ApiError::invalid(format!(
        "Service \"{name}\" is invalid: {field}: Invalid value: {value}: {detail}"
    ));
    e.details = Some(json!({
        "name": name, "kind": "Service",
        "causes": [{"reason": "FieldValueInvalid", "message": format!("Invalid value: {value}: {detail}"), "field": field}],
    }));
    e
}

fn set_ip(service: &mut Value, ip: &str) {
    if !service.get("spec").is_some_and(Value::is_object) {
        service["spec"] = json!({});
    }
    service["spec"]["clusterIP"] = json!(ip);
    service["spec"]["clusterIPs"] = json!([ip]);
    if let Ok(addr) = ip.parse::<IpAddr>() {
        let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
        service["spec"]["ipFamilies"] = json!([family]);
        service["spec"]["ipFamilyPolicy"] = json!("SingleStack");
    }
}

/// Admits a Service write: fills, checks or keeps its ClusterIP. `old` is the
/// stored Service on an update, `used` the addresses other Services hold, and
/// `random` picks where a dynamic allocation starts.
pub(crate) fn admit_service(
    range: &ServiceRange,
    used: &BTreeSet<IpAddr>,
    old: Option<&Value>,
    new: &mut Value,
    random: u64,
) -> Result<(), ApiError> {
    let name = new
        .pointer("/metadata/name")
        .or_else(|| new.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if is_external_name(new) {
        return Ok(());
    }
    let kept = old
        .filter(|o| !is_external_name(o))
        .and_then(requested)
        .map(str::to_owned);
    if let Some(kept) = kept {
        return match requested(new) {
            None => {
                set_ip(new, &kept);
                Ok(())
            }
            Some(ip) if ip == kept => {
                set_ip(new, &kept);
                Ok(())
            }
            Some(ip) => Err(invalid(
                &name,
                "spec.clusterIP",
                &json!(ip),
                "field is immutable",
            )),
        };
    }
    if let (Some(single), Some(first)) = (
        new.pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty()),
        new.pointer("/spec/clusterIPs/0").and_then(Value::as_str),
    ) && single != first
    {
        return Err(invalid(
            &name,
            "spec.clusterIPs[0]",
            &json!(first),
            "must match `clusterIP` when `clusterIP` is set",
        ));
    }
    let ip = match requested(new) {
        Some("None") => {
            set_ip(new, "None");
            return Ok(());
        }
        Some(text) => {
            let Ok(ip) = text.parse::<IpAddr>() else {
                return Err(invalid(
                    &name,
                    "spec.clusterIPs[0]",
                    &json!(text),
                    "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
                ));
            };
            let listed = json!([text]);
            let refuse = |why: String| {
                invalid(
                    &name,
                    "spec.clusterIPs",
                    &listed,
                    &format!("failed to allocate IP {text}: {why}"),
                )
            };
            if !range.contains(ip) {
                return Err(refuse(format!(
                    "the provided IP ({text}) is not in the valid range. The range of valid IPs is {range}"
                )));
            }
            if used.contains(&ip) {
                return Err(refuse("provided IP is already allocated".to_owned()));
            }
            ip
        }
        None => range.next_free(used, random).ok_or_else(|| {
            ApiError::internal(format!(
                "failed to allocate a serviceIP: range is full (service range {range}, Service {name:?})"
            ))
        })?,
    };
    set_ip(new, &ip.to_string());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(cidr: &str) -> ServiceRange {
        ServiceRange::new(cidr.parse().expect("test CIDR"))
    }

    fn svc(spec: Value) -> Value {
        json!({"metadata": {"name": "hello"}, "spec": spec})
    }

    #[test]
    fn usable_addresses_exclude_network_and_broadcast() {
        let r = range("10.0.0.0/30");
        assert_eq!(r.size(), 2);
        assert!(!r.contains("10.0.0.0".parse().expect("ip")));
        assert!(r.contains("10.0.0.1".parse().expect("ip")));
        assert!(r.contains("10.0.0.2".parse().expect("ip")));
        assert!(!r.contains("10.0.0.3".parse().expect("ip")));
        assert_eq!(range("fd00::/126").size(), 3);
    }

    #[test]
    fn dynamic_allocation_fills_the_range_then_refuses() {
        let r = range("10.0.0.0/29");
        let mut used = BTreeSet::new();
        for i in 0..6 {
            let mut s = svc(json!({"ports": [{"port": 80}]}));
            admit_service(&r, &used, None, &mut s, i * 7919).expect("free address");
            let ip = cluster_ips(&s)[0];
            assert!(r.contains(ip) && used.insert(ip), "{ip}");
            assert_eq!(s["spec"]["clusterIPs"], json!([ip.to_string()]));
        }
        let mut s = svc(json!({}));
        let e = admit_service(&r, &used, None, &mut s, 1).expect_err("full");
        assert_eq!(e.code, 500);
        assert!(e.message.contains("range is full"), "{}", e.message);
    }

    #[test]
    fn requested_addresses_are_checked_and_kept() {
        let r = range("10.96.0.0/16");
        let used = BTreeSet::from(["10.96.0.7".parse().expect("ip")]);
        for (ip, detail) in [
            ("10.97.0.1", "is not in the valid range"),
            ("10.96.0.7", "provided IP is already allocated"),
            ("nope", "must be a valid IP address"),
        ] {
            let mut s = svc(json!({"clusterIP": ip}));
            let e = admit_service(&r, &used, None, &mut s, 0).expect_err(ip);
            assert_eq!(e.code, 422, "{ip}");
            assert!(e.message.contains(detail), "{}", e.message);
        }
        let mut headless = svc(json!({"clusterIP": "None"}));
        admit_service(&r, &used, None, &mut headless, 0).expect("headless");
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
        let mut external = svc(json!({"type": "ExternalName", "externalName": "x.example"}));
        admit_service(&r, &used, None, &mut external, 0).expect("external");
        assert!(external["spec"].get("clusterIP").is_none());

        let old = svc(json!({"clusterIP": "10.96.1.1", "clusterIPs": ["10.96.1.1"]}));
        let mut omitted = svc(json!({"ports": []}));
        admit_service(&r, &used, Some(&old), &mut omitted, 0).expect("kept");
        assert_eq!(omitted["spec"]["clusterIP"], "10.96.1.1");
        let mut changed = svc(json!({"clusterIP": "10.96.1.2"}));
        let e = admit_service(&r, &used, Some(&old), &mut changed, 0).expect_err("immutable");
        assert!(
            e.message
                .contains("spec.clusterIP: Invalid value: \"10.96.1.2\": field is immutable"),
            "{}",
            e.message
        );
    }
}
