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

/// An input and a predicate on the error it must give.
type Case = (&'static str, fn(&IdError) -> bool);

#[test]
fn rejects_each_rule_with_its_reason() {
    let cases: &[Case] = &[
        ("", |e| matches!(e, IdError::Empty)),
        ("http://example.org/a", |e| {
            matches!(e, IdError::Scheme { .. })
        }),
        ("SPIFFE://example.org/a", |e| {
            matches!(e, IdError::Scheme { .. })
        }),
        ("spiffe:/example.org/a", |e| {
            matches!(e, IdError::Scheme { .. })
        }),
        ("spiffe:///a", |e| {
            matches!(e, IdError::MissingTrustDomain { .. })
        }),
        ("spiffe://Example.org/a", |e| {
            matches!(e, IdError::TrustDomainChar { ch: 'E', at: 9, .. })
        }),
        ("spiffe://example.org:8080/a", |e| {
            matches!(e, IdError::TrustDomainChar { ch: ':', .. })
        }),
        ("spiffe://user@example.org/a", |e| {
            matches!(e, IdError::TrustDomainChar { ch: '@', .. })
        }),
        ("spiffe://example.org", |e| {
            matches!(e, IdError::MissingPath { .. })
        }),
        ("spiffe://example.org/", |e| {
            matches!(e, IdError::EmptySegment { .. })
        }),
        ("spiffe://example.org/a//b", |e| {
            matches!(e, IdError::EmptySegment { .. })
        }),
        ("spiffe://example.org/a/", |e| {
            matches!(e, IdError::EmptySegment { .. })
        }),
        ("spiffe://example.org/a/../b", |e| {
            matches!(e, IdError::DotSegment { .. })
        }),
        ("spiffe://example.org/./b", |e| {
            matches!(e, IdError::DotSegment { .. })
        }),
        ("spiffe://example.org/a?x=1", |e| {
            matches!(
                e,
                IdError::PathChar {
                    ch: '?',
                    at: 22,
                    ..
                }
            )
        }),
        ("spiffe://example.org/a#frag", |e| {
            matches!(e, IdError::PathChar { ch: '#', .. })
        }),
        ("spiffe://example.org/a%20b", |e| {
            matches!(e, IdError::PathChar { ch: '%', .. })
        }),
        ("spiffe://example.org/a b", |e| {
            matches!(e, IdError::PathChar { ch: ' ', .. })
        }),
        ("spiffe://example.org/é", |e| {
            matches!(e, IdError::PathChar { ch: 'é', .. })
        }),
    ];
    for (input, expected) in cases {
        let err = SpiffeId::parse(input).unwrap_err();
        assert!(expected(&err), "{input:?} gave {err:?}");
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
