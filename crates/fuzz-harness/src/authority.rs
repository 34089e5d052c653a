//! Service authorities (`host:port`) as the tunnel's `:authority` and the explicit
//! proxy's CONNECT target deliver them: [`isthmus_vocab::Authority::parse`].

use isthmus_vocab::Authority;

/// Parses `data` as an authority (raw UTF-8 when it is, the lossy decoding too) and
/// checks that an accepted authority is canonical lowercase, round-trips through its
/// display form, and splits back into the host and port it was made of.
pub fn check(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_str(text);
    }
    check_str(&String::from_utf8_lossy(data));
}

fn check_str(text: &str) {
    let Ok(authority) = Authority::parse(text) else {
        return;
    };
    assert_eq!(
        authority.as_str(),
        text.to_ascii_lowercase(),
        "an authority is its input, lowercased"
    );
    let rendered = authority.to_string();
    assert_eq!(
        Authority::parse(&rendered).as_ref(),
        Ok(&authority),
        "{rendered:?} does not parse back to itself"
    );
    assert_ne!(authority.port(), 0, "{text:?}: port 0 accepted");
    let host = authority.host();
    assert!(!host.is_empty(), "{text:?}: empty host accepted");
    let rejoined = if host.contains(':') {
        assert!(
            host.parse::<std::net::Ipv6Addr>().is_ok(),
            "{text:?}: host {host:?} has a colon but is no IPv6 literal"
        );
        format!("[{host}]:{}", authority.port())
    } else {
        format!("{host}:{}", authority.port())
    };
    assert_eq!(
        rejoined,
        authority.as_str(),
        "{text:?}: host() and port() do not make up the authority"
    );
}
