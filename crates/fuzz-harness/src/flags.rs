//! `isthmus-init`'s flag values, as users and manifests type them: ports, port lists
//! with ranges, CIDRs and CIDR lists ([`iptables_init::config`]).

use iptables_init::config::{Cidr, ParseError, PortList, parse_cidr_list, parse_port};

/// Runs every flag parser on `data` and checks that each accepts what it renders
/// (render, re-parse, same value), that accepted values are in range, and that an
/// error names a part of the input.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_port(text) {
        Ok(port) => {
            assert_ne!(port, 0, "{text:?}: port 0 accepted");
            assert_eq!(parse_port(&port.to_string()), Ok(port));
        }
        Err(e) => check_error(text, &e),
    }
    match text.parse::<PortList>() {
        Ok(list) => {
            for range in list.ranges() {
                assert!(
                    range.first() != 0 && range.first() <= range.last(),
                    "{text:?}: bad range {range:?}"
                );
                assert!(list.contains(range.first()) && list.contains(range.last()));
            }
            assert!(!list.contains(0), "{text:?}: list contains port 0");
            let rendered = list.to_string();
            assert_eq!(
                rendered.parse::<PortList>().as_ref(),
                Ok(&list),
                "{text:?} rendered as {rendered:?} does not parse back"
            );
        }
        Err(e) => check_error(text, &e),
    }
    match text.parse::<Cidr>() {
        Ok(cidr) => check_cidr(text, cidr),
        Err(e) => check_error(text, &e),
    }
    match parse_cidr_list(text) {
        Ok(list) => {
            for cidr in &list {
                check_cidr(text, *cidr);
            }
            let rendered = list
                .iter()
                .map(Cidr::to_string)
                .collect::<Vec<_>>()
                .join(",");
            assert_eq!(
                parse_cidr_list(&rendered).as_ref(),
                Ok(&list),
                "{text:?} rendered as {rendered:?} does not parse back"
            );
        }
        Err(e) => check_error(text, &e),
    }
}

fn check_cidr(text: &str, cidr: Cidr) {
    let max = match cidr.addr() {
        std::net::IpAddr::V4(_) => 32,
        std::net::IpAddr::V6(_) => 128,
    };
    assert!(
        cidr.prefix() <= max,
        "{text:?}: prefix {} too long",
        cidr.prefix()
    );
    assert!(
        cidr.contains(cidr.addr()),
        "{cidr} does not contain its own address"
    );
    assert_eq!(
        Cidr::new(cidr.addr(), cidr.prefix()),
        Some(cidr),
        "{text:?}: accepted a CIDR with host bits"
    );
    let rendered = cidr.to_string();
    assert_eq!(
        rendered.parse::<Cidr>(),
        Ok(cidr),
        "{text:?} rendered as {rendered:?} does not parse back"
    );
}

/// Every refusal quotes the value (or the list entry) it refused, and that value is
/// part of what the user typed.
fn check_error(text: &str, e: &ParseError) {
    let value = match e {
        ParseError::Port { value }
        | ParseError::PortRange { value }
        | ParseError::EmptyEntry { value }
        | ParseError::Address { value }
        | ParseError::Prefix { value, .. }
        | ParseError::HostBits { value, .. } => value,
    };
    assert!(
        text.contains(value.as_str()),
        "error {e} quotes {value:?}, which is not part of {text:?}"
    );
    assert!(
        e.to_string().contains(&format!("{value:?}")),
        "error {e} does not quote {value:?}"
    );
}
