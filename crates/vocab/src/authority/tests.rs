use super::*;

/// Accepted spellings and their canonical form.
const ACCEPTED: &[(&str, &str)] = &[
    (
        "hello.default.svc.cluster.local:80",
        "hello.default.svc.cluster.local:80",
    ),
    (
        "Hello.default.svc.cluster.local:80",
        "hello.default.svc.cluster.local:80",
    ),
    (
        "Hello.Default.SVC.cluster.local.:80",
        "hello.default.svc.cluster.local:80",
    ),
    ("hello:1", "hello:1"),
    ("hello:65535", "hello:65535"),
    ("a-b.c0:8080", "a-b.c0:8080"),
    ("0a.example:443", "0a.example:443"),
    ("10.0.0.1:1", "10.0.0.1:1"),
    ("10.0.0.1.:80", "10.0.0.1:80"),
    ("198.18.0.10:8080", "198.18.0.10:8080"),
    ("[::1]:8080", "[::1]:8080"),
    ("[2001:2::1]:8080", "[2001:2::1]:8080"),
    ("[2001:DB8:0:0::1]:80", "[2001:db8::1]:80"),
    ("[::ffff:1.2.3.4]:80", "[::ffff:1.2.3.4]:80"),
];

/// Refused spellings, each with the rule it breaks.
const REFUSED: &[&str] = &[
    // no port, or not a canonical port
    "hello",
    "hello:",
    "hello:0",
    "hello:65536",
    "h:70000",
    "hello:x",
    "hello:080",
    "hello:+80",
    "hello:00080",
    "hello:-80",
    "hello: 80",
    // no host, or not a DNS name
    ":80",
    ".:80",
    "a..b:80",
    ".a:80",
    "a..:80",
    "a b:80",
    "héllo:80",
    "a_b:80",
    "_http._tcp.example:80",
    "-a.example:80",
    "a-.example:80",
    "a/b:80",
    "a@b:80",
    "user@hello:80",
    // numeric last label: an IPv4 address or nothing
    "1.2.3:80",
    "127.1:80",
    "010.0.0.1:80",
    "999.1.1.1:80",
    "1.2.3.4.5:80",
    "a.123:80",
    // IPv6 only in brackets, and only addresses
    "::1:80",
    "[zz]:80",
    "[]:80",
    "[::1:80",
    "::1]:80",
    "[fe80::1%eth0]:80",
    "[1.2.3.4]:80",
];

#[test]
fn accepted_spellings_become_canonical() {
    for (input, canonical) in ACCEPTED {
        let parsed = Authority::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(parsed.as_str(), *canonical, "{input}");
        assert_eq!(parsed.to_string(), *canonical, "{input}");
        // The canonical form is a fixed point.
        assert_eq!(Authority::parse(canonical).as_ref(), Ok(&parsed), "{input}");
    }
}

#[test]
fn refused_spellings_are_refused() {
    for input in REFUSED {
        assert!(Authority::parse(input).is_err(), "{input:?} accepted");
    }
}

#[test]
fn labels_and_names_are_bounded() {
    let label = "a".repeat(63);
    assert!(Authority::parse(&format!("{label}.b:80")).is_ok());
    assert!(Authority::parse(&format!("{label}a.b:80")).is_err());
    // 4 labels of 63 and the dots: 255 bytes, past 253.
    let long = [label.as_str(); 4].join(".");
    assert!(matches!(
        Authority::parse(&format!("{long}:80")),
        Err(AuthorityError::BadHost { .. })
    ));
    assert_eq!(
        Authority::parse(&"a".repeat(300)),
        Err(AuthorityError::TooLong(300))
    );
}

#[test]
fn parts_are_read_back() {
    let a = Authority::parse("Hello.default.svc.cluster.local.:80").unwrap();
    assert_eq!(a.host(), "hello.default.svc.cluster.local");
    assert_eq!(a.port(), 80);
    let v6 = Authority::parse("[2001:2::1]:8080").unwrap();
    assert_eq!(v6.host(), "2001:2::1");
    assert_eq!(v6.port(), 8080);
    let v4 = Authority::parse("10.0.0.1:1").unwrap();
    assert_eq!((v4.host(), v4.port()), ("10.0.0.1", 1));
}

#[test]
fn from_parts_checks_as_parse_does() {
    for (host, text) in [
        (
            "hello.default.svc.cluster.local",
            "hello.default.svc.cluster.local:80",
        ),
        ("::1", "[::1]:80"),
        ("[::1]", "[::1]:80"),
        ("10.0.0.1", "10.0.0.1:80"),
    ] {
        assert_eq!(
            Authority::from_parts(host, 80),
            Authority::parse(text),
            "{host}"
        );
    }
    assert!(Authority::from_parts("hello", 0).is_err());
    assert!(Authority::from_parts("a_b", 80).is_err());
    assert!(Authority::from_parts("", 80).is_err());
}

#[test]
fn errors_name_the_input() {
    for input in ["hello", "hello:+80", "a_b:80"] {
        let message = Authority::parse(input).unwrap_err().to_string();
        assert!(message.contains(&format!("{input:?}")), "{message}");
    }
}
