//! Service authorities (`host:port`) as the tunnel's `:authority` and the explicit
//! proxy's CONNECT target deliver them: [`isthmus_vocab::Authority::parse`], the one
//! grammar discovery, the tunnel and the explicit proxy share.

use std::net::{IpAddr, Ipv6Addr};

use isthmus_vocab::Authority;
use isthmus_vocab::authority::MAX_AUTHORITY_LEN;

/// Parses `data` as an authority (raw UTF-8 when it is, the lossy decoding too) and
/// checks that an accepted authority is canonical: a fixed point of parsing, equal
/// to its input lowercased unless the input's host had a trailing dot or was an IP
/// address spelled otherwise; that its host is a DNS name or an IP address; and that
/// it splits back into the host and port it was made of.
pub fn check(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_str(text);
    }
    check_str(&String::from_utf8_lossy(data));
}

fn check_str(text: &str) {
    let authority = match Authority::parse(text) {
        Ok(authority) => authority,
        Err(e) => {
            let message = e.to_string();
            assert!(
                text.len() > MAX_AUTHORITY_LEN || message.contains(&format!("{text:?}")),
                "error {message:?} does not name the input {text:?}"
            );
            return;
        }
    };
    assert!(
        text.len() <= MAX_AUTHORITY_LEN,
        "{text:?}: too long accepted"
    );
    let rendered = authority.to_string();
    assert_eq!(rendered, authority.as_str());
    assert_eq!(
        Authority::parse(&rendered).as_ref(),
        Ok(&authority),
        "{rendered:?} does not parse back to itself"
    );
    assert_ne!(authority.port(), 0, "{text:?}: port 0 accepted");
    assert!(
        text.ends_with(&format!(":{}", authority.port())),
        "{text:?}: port spelled otherwise than {}",
        authority.port()
    );
    let host = authority.host();
    assert!(!host.is_empty(), "{text:?}: empty host accepted");
    let ip = host.parse::<IpAddr>().ok();
    let rejoined = match ip {
        Some(IpAddr::V6(v6)) => {
            assert_eq!(host, v6.to_string(), "{text:?}: IPv6 host not canonical");
            format!("[{host}]:{}", authority.port())
        }
        Some(IpAddr::V4(v4)) => {
            assert_eq!(host, v4.to_string(), "{text:?}: IPv4 host not canonical");
            format!("{host}:{}", authority.port())
        }
        None => {
            assert!(
                host.split('.').all(|label| {
                    (1..=63).contains(&label.len())
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                }),
                "{text:?}: host {host:?} is not lowercase DNS labels"
            );
            assert!(
                !host
                    .rsplit('.')
                    .all(|l| l.bytes().all(|b| b.is_ascii_digit())),
                "{text:?}: numeric host {host:?} accepted as a DNS name"
            );
            format!("{host}:{}", authority.port())
        }
    };
    assert_eq!(
        rejoined,
        authority.as_str(),
        "{text:?}: host() and port() do not make up the authority"
    );
    // Canonicalising changes nothing but case, one trailing dot of a DNS name, and
    // the spelling of an IP address.
    let lower = text.to_ascii_lowercase();
    if lower != authority.as_str() {
        let trailing_dot = format!("{host}.:{}", authority.port());
        let spelled_ip = match ip {
            Some(IpAddr::V6(v6)) => {
                lower
                    .strip_prefix('[')
                    .and_then(|t| t.split_once("]:"))
                    .and_then(|(h, _)| h.parse::<Ipv6Addr>().ok())
                    == Some(v6)
            }
            Some(IpAddr::V4(_)) => lower == trailing_dot,
            None => false,
        };
        assert!(
            lower == trailing_dot || spelled_ip,
            "{text:?} became {authority}: more than case, a trailing dot or an IP's spelling changed"
        );
    }
}
