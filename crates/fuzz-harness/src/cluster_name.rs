//! Cluster names, as the tunnel's `isthmus-cluster` header, an issuer's subject and
//! manifests deliver them: [`isthmus_vocab::ClusterName::parse`].

use isthmus_vocab::{ClusterName, ClusterNameError};

/// Parses `data` as a cluster name and checks that an accepted name is its input
/// unchanged, a DNS label, and parses back to itself; and that a refusal quotes the
/// input it refused.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let name = match ClusterName::parse(text) {
        Ok(name) => name,
        Err(ClusterNameError(refused)) => {
            assert_eq!(refused, text, "a refusal quotes another input");
            return;
        }
    };
    assert_eq!(
        name.as_str(),
        text,
        "a cluster name is its input, unchanged"
    );
    assert_eq!(name.to_string(), text);
    assert_eq!(ClusterName::parse(name.as_str()).as_ref(), Ok(&name));
    assert!((1..=63).contains(&text.len()), "{text:?}: length accepted");
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "{text:?}: a character outside a-z, 0-9 and '-' accepted"
    );
    assert!(
        !text.starts_with('-') && !text.ends_with('-'),
        "{text:?}: a name with a hyphen at an end accepted"
    );
}
