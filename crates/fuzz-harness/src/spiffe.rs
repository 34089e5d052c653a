//! SPIFFE IDs and trust domains, as certificates' URI SANs and flags deliver them:
//! [`isthmus_vocab::spiffe`].

use isthmus_vocab::{IdError, SpiffeId, TrustDomain};

/// Parses `data` as a SPIFFE ID and as a trust domain and checks that what parses
/// renders back to the same string and decomposes consistently, and that a refusal
/// names the input it refused.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_id(text);
    check_trust_domain(text);
}

fn check_id(text: &str) {
    let id = match SpiffeId::parse(text) {
        Ok(id) => id,
        Err(e) => return check_error(text, &e),
    };
    assert_eq!(id.as_str(), text, "a SPIFFE ID is its input, unchanged");
    assert_eq!(id.to_string(), text);
    assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
    assert_eq!(
        format!("spiffe://{}{}", id.trust_domain_name(), id.path()),
        text,
        "trust domain and path do not make up the ID"
    );
    assert!(id.path().starts_with('/'), "{text:?}: path without '/'");
    let td = id.trust_domain();
    assert_eq!(TrustDomain::parse(id.trust_domain_name()).as_ref(), Ok(&td));
    assert!(id.is_member_of(&td));
    match (id.namespace(), id.service_account()) {
        (Some(ns), Some(sa)) => {
            let rebuilt = SpiffeId::workload(&td, ns, sa);
            assert_eq!(
                rebuilt.as_ref(),
                Ok(&id),
                "workload() does not rebuild {text:?}"
            );
        }
        (None, None) => {}
        other => panic!("{text:?}: namespace and service account disagree: {other:?}"),
    }
}

fn check_trust_domain(text: &str) {
    let td = match TrustDomain::parse(text) {
        Ok(td) => td,
        Err(e) => return check_error(text, &e),
    };
    assert!(
        text == td.as_str() || text == td.id_string(),
        "{text:?} parsed as trust domain {td}"
    );
    assert_eq!(TrustDomain::parse(td.as_str()).as_ref(), Ok(&td));
    assert_eq!(TrustDomain::parse(&td.id_string()).as_ref(), Ok(&td));
}

/// A refusal quotes the input it refused, except where quoting is pointless (empty)
/// or the input is too long to quote.
fn check_error(text: &str, e: &IdError) {
    let message = e.to_string();
    match e {
        IdError::Empty => assert!(text.is_empty()),
        IdError::TooLong { len } => assert_eq!(*len, text.len()),
        IdError::Segment { .. } => panic!("parse() returned a workload() error: {message}"),
        _ => assert!(
            message.contains(&format!("{text:?}")),
            "error {message:?} does not name the input {text:?}"
        ),
    }
}
