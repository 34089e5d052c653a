use super::*;

#[test]
fn parses_mesh_workload_ids() {
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/hello").unwrap();
    assert_eq!(id.trust_domain_name(), "cluster.local");
    assert_eq!(id.path(), "/ns/default/sa/hello");
    assert_eq!(id.namespace(), Some("default"));
    assert_eq!(id.service_account(), Some("hello"));
    assert!(id.is_member_of(&TrustDomain::parse("cluster.local").unwrap()));
    assert!(!id.is_member_of(&TrustDomain::parse("other.local").unwrap()));
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/hello");
}

#[test]
fn other_paths_are_ids_without_ns_sa() {
    let id = SpiffeId::parse("spiffe://example.org/gateway/cluster-a").unwrap();
    assert_eq!(id.namespace(), None);
    let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/b/extra").unwrap();
    assert_eq!(id.service_account(), None);
    SpiffeId::parse("spiffe://a_b-c.9/P.a-t_h/X").unwrap();
}

#[test]
fn workload_builds_and_checks_segments() {
    let td = TrustDomain::parse("spiffe://example.org").unwrap();
    assert_eq!(td.as_str(), "example.org");
    let id = SpiffeId::workload(&td, "ns1", "sa1").unwrap();
    assert_eq!(id.as_str(), "spiffe://example.org/ns/ns1/sa/sa1");
    assert!(matches!(
        SpiffeId::workload(&td, "a/b", "sa"),
        Err(IdError::Segment {
            field: "namespace",
            ..
        })
    ));
    assert!(matches!(
        SpiffeId::workload(&td, "ns", ".."),
        Err(IdError::Segment { .. })
    ));
}

/// An input, and the error it must give: the variant's name, then what its `Debug`
/// must also show (the offending character and where).
type Case = (&'static str, &'static str);

#[test]
fn rejects_each_rule_with_its_reason() {
    let cases: &[Case] = &[
        ("", "Empty"),
        ("http://example.org/a", "Scheme"),
        ("SPIFFE://example.org/a", "Scheme"),
        ("spiffe:/example.org/a", "Scheme"),
        ("spiffe:///a", "MissingTrustDomain"),
        ("spiffe://Example.org/a", "TrustDomainChar ch: 'E', at: 9"),
        ("spiffe://example.org:8080/a", "TrustDomainChar ch: ':'"),
        ("spiffe://user@example.org/a", "TrustDomainChar ch: '@'"),
        ("spiffe://example.org", "MissingPath"),
        ("spiffe://example.org/", "EmptySegment"),
        ("spiffe://example.org/a//b", "EmptySegment"),
        ("spiffe://example.org/a/", "EmptySegment"),
        ("spiffe://example.org/a/../b", "DotSegment"),
        ("spiffe://example.org/./b", "DotSegment"),
        ("spiffe://example.org/a?x=1", "PathChar ch: '?', at: 22"),
        ("spiffe://example.org/a#frag", "PathChar ch: '#'"),
        ("spiffe://example.org/a%20b", "PathChar ch: '%'"),
        ("spiffe://example.org/a b", "PathChar ch: ' '"),
        ("spiffe://example.org/é", "PathChar ch: 'é'"),
    ];
    for (input, expected) in cases {
        let (variant, detail) = expected.split_once(' ').unwrap_or((*expected, ""));
        let err = SpiffeId::parse(input).unwrap_err();
        let debug = format!("{err:?}");
        assert!(
            debug.split([' ', '{']).next() == Some(variant) && debug.contains(detail),
            "{input:?} gave {err:?}, expected {variant} with {detail:?}"
        );
        if !input.is_empty() {
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
        }
    }
}

#[test]
fn length_limits() {
    let long_td = format!("spiffe://{}/a", "a".repeat(256));
    assert!(matches!(
        SpiffeId::parse(&long_td),
        Err(IdError::TrustDomainTooLong { .. })
    ));
    let long_id = format!("spiffe://example.org/{}", "a".repeat(2048));
    assert!(matches!(
        SpiffeId::parse(&long_id),
        Err(IdError::TooLong { .. })
    ));
}

#[test]
fn trust_domain_parse_rules() {
    assert_eq!(
        TrustDomain::parse("example.org").unwrap().id_string(),
        "spiffe://example.org"
    );
    assert!(matches!(TrustDomain::parse(""), Err(IdError::Empty)));
    assert!(matches!(
        TrustDomain::parse("https://example.org"),
        Err(IdError::Scheme { .. })
    ));
    assert!(matches!(
        TrustDomain::parse("spiffe://example.org/path"),
        Err(IdError::TrustDomainChar { ch: '/', .. })
    ));
}
