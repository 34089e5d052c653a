//! [`ClusterName`]: which cluster of the mesh a service, a link or a leaf belongs to.

use std::fmt;
use std::sync::Arc;

/// The longest DNS label, and so the longest cluster name.
pub const MAX_CLUSTER_NAME_LEN: usize = 63;

/// The name of a cluster of the mesh (`cluster-a`): a DNS-1123 label, 1 to 63 of
/// `a-z`, `0-9` and `-`, starting and ending with a letter or digit.
///
/// It names the target cluster in the tunnel's `isthmus-cluster` header, in an
/// issuer's subject and in metric labels, so it is restricted to what all of them
/// take: no dots, no upper case. It is parsed exactly as spelled (no case folding,
/// no trimming) and cloned per connection, hence the shared string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(Arc<str>);

/// A string that is not a cluster name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cluster name {0:?} is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
)]
pub struct ClusterNameError(pub String);

impl ClusterName {
    /// Parses `name`, exactly as spelled.
    pub fn parse(name: &str) -> Result<Self, ClusterNameError> {
        if is_dns_label(name) {
            Ok(Self(name.into()))
        } else {
            Err(ClusterNameError(name.to_owned()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `s` is a DNS-1123 label: 1 to 63 of `a-z`, `0-9` and `-`, starting and
/// ending with a letter or digit. Kubernetes namespaces and most names follow it.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CLUSTER_NAME_LEN
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ClusterName {
    type Err = ClusterNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// Lets maps keyed by cluster be queried with a plain `&str` (the tunnel's header).
// Consistent with `Ord` and `Hash`, which are those of the inner string.
impl std::borrow::Borrow<str> for ClusterName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ClusterName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for ClusterName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_are_dns_labels_as_spelled() {
        let longest = "a".repeat(63);
        for good in ["cluster-a", "a", "b2", "x-1-y", "east-prod", "0", &longest] {
            assert_eq!(ClusterName::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "Cluster-a",
            "Cluster",
            "cluster-a.",
            "east.prod",
            "a..b",
            " cluster-a",
            "cluster-a ",
            "-a",
            "a-",
            "clüster",
            "a_b",
            &"a".repeat(64),
        ] {
            assert_eq!(
                ClusterName::parse(bad),
                Err(ClusterNameError(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn maps_by_cluster_answer_plain_strings() {
        let mut map = std::collections::BTreeMap::new();
        map.insert(ClusterName::parse("cluster-a").unwrap(), 1);
        assert_eq!(map.get("cluster-a"), Some(&1));
        assert_eq!(map.get("cluster-b"), None);
    }
}
