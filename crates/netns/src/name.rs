//! The names of a run (`<tag><pid in hex>`), and the address ranges it may use.

use std::net::IpAddr;

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// The prefix of this process's runs under `tag`.
pub(crate) fn run_prefix(tag: &str) -> String {
    format!("{tag}{:x}", std::process::id())
}

/// The pid encoded in a prefix `<tag><hex>`, if `prefix` is one.
pub(crate) fn prefix_pid(tag: &str, prefix: &str) -> Option<u32> {
    let hex = prefix.strip_prefix(tag)?;
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// The run prefix of namespace (or hosts directory) `name` under `tag`:
/// `<tag><hex>` before the first `-`.
pub(crate) fn namespace_prefix<'a>(tag: &str, name: &'a str) -> Option<&'a str> {
    let (prefix, _) = name.split_once('-')?;
    prefix_pid(tag, prefix).map(|_| prefix)
}

/// Whether namespace `name` belongs to the run `prefix`.
pub(crate) fn belongs(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('-'))
}

/// Whether `ip` is in 198.18.0.0/15 or 2001:2::/48, the benchmarking ranges
/// (RFC 2544, RFC 5180) that no real network routes.
pub fn allowed(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 198 && (o[1] == 18 || o[1] == 19)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0x2001 && s[1] == 0x2 && s[2] == 0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_encode_the_pid_and_fit_interfaces() {
        for tag in ["ist", "isl", "isb"] {
            let prefix = run_prefix(tag);
            assert_eq!(prefix_pid(tag, &prefix), Some(std::process::id()));
            // The longest interface name: the prefix, a letter, a four-digit counter.
            assert!(format!("{prefix}v9999").len() <= MAX_IFNAME);
        }
        assert_eq!(prefix_pid("isl", "islzz"), None);
        assert_eq!(prefix_pid("isl", "ist12"), None);
        assert_eq!(prefix_pid("isl", "isl"), None);
        assert_eq!(prefix_pid("ist", "ist3fffff"), Some(0x3fffff));
    }

    #[test]
    fn namespaces_belong_to_their_run_only() {
        assert!(belongs("isl1f-lab", "isl1f"));
        assert!(!belongs("isl1f0-lab", "isl1f"));
        assert!(!belongs("isl1f", "isl1f"));
        assert_eq!(namespace_prefix("isl", "isl1f-cluster-a"), Some("isl1f"));
        assert_eq!(namespace_prefix("isl", "isthmus-lab"), None);
        assert_eq!(namespace_prefix("ist", "isl1f-lab"), None);
        assert_eq!(namespace_prefix("ist", "ist12x3"), None);
    }

    #[test]
    fn only_the_benchmarking_ranges_are_allowed() {
        for ok in [
            "198.18.0.1",
            "198.19.255.1",
            "198.18.1.10",
            "2001:2::1",
            "2001:2:0:ff::1",
        ] {
            assert!(allowed(ok.parse().expect("an address")), "{ok}");
        }
        for bad in [
            "10.0.0.1",
            "198.20.0.1",
            "198.17.0.1",
            "127.0.0.1",
            "2001:db8::1",
            "2001:2:1::1",
        ] {
            assert!(!allowed(bad.parse().expect("an address")), "{bad}");
        }
    }
}
