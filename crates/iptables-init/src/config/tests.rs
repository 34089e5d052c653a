use super::*;

fn ports(s: &str) -> Result<PortList, ParseError> {
    s.parse()
}

#[test]
fn port_lists_with_ranges() {
    let list = ports("25, 3306,8000-8100").unwrap();
    assert_eq!(
        list.ranges(),
        &[
            PortRange::single(25).unwrap(),
            PortRange::single(3306).unwrap(),
            PortRange::new(8000, 8100).unwrap(),
        ]
    );
    assert_eq!(list.to_string(), "25,3306,8000-8100");
    assert!(list.contains(8050) && !list.contains(8101));
    assert!(ports("").unwrap().is_empty());
    assert_eq!(ports("65535").unwrap().to_string(), "65535");
    assert_eq!(ports("7-7").unwrap().to_string(), "7");
}

#[test]
fn bad_port_lists_name_the_value() {
    assert_eq!(
        ports("70000"),
        Err(ParseError::Port {
            value: "70000".into()
        })
    );
    assert_eq!(ports("0"), Err(ParseError::Port { value: "0".into() }));
    assert_eq!(
        ports("ssh"),
        Err(ParseError::Port {
            value: "ssh".into()
        })
    );
    assert_eq!(
        ports("8100-8000"),
        Err(ParseError::PortRange {
            value: "8100-8000".into()
        })
    );
    assert_eq!(
        ports("1-70000"),
        Err(ParseError::PortRange {
            value: "1-70000".into()
        })
    );
    assert_eq!(
        ports("1-"),
        Err(ParseError::PortRange { value: "1-".into() })
    );
    assert_eq!(
        ports("25,,26"),
        Err(ParseError::EmptyEntry {
            value: "25,,26".into()
        })
    );
    let msg = ports("99999").unwrap_err().to_string();
    assert!(msg.contains("99999"), "{msg}");
}

#[test]
fn cidrs_of_both_families() {
    let v4: Cidr = "10.0.0.0/8".parse().unwrap();
    assert_eq!(v4.to_string(), "10.0.0.0/8");
    assert_eq!(v4.family(), Family::V4);
    assert!(v4.contains("10.1.2.3".parse().unwrap()));
    assert!(!v4.contains("11.0.0.0".parse().unwrap()));
    assert!(!v4.contains("::1".parse().unwrap()));
    let v6: Cidr = "2001:2::/48".parse().unwrap();
    assert_eq!(v6.family(), Family::V6);
    assert!(v6.contains("2001:2::9".parse().unwrap()));
    assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix(), 0);
    assert_eq!("::/0".parse::<Cidr>().unwrap().to_string(), "::/0");
    assert_eq!(
        "198.18.0.1".parse::<Cidr>().unwrap().to_string(),
        "198.18.0.1/32"
    );
    assert_eq!("2001:2::1".parse::<Cidr>().unwrap().prefix(), 128);
    assert_eq!("198.18.0.1/32".parse::<Cidr>().unwrap().prefix(), 32);
}

#[test]
fn bad_cidrs_are_refused_with_the_reason() {
    let err = |s: &str| s.parse::<Cidr>().unwrap_err();
    assert_eq!(
        err("10.0.0.1/8"),
        ParseError::HostBits {
            value: "10.0.0.1/8".into(),
            network: "10.0.0.0/8".parse().unwrap()
        }
    );
    assert!(err("10.0.0.1/8").to_string().contains("10.0.0.0/8"));
    assert!(matches!(err("2001:2::1/48"), ParseError::HostBits { .. }));
    assert!(matches!(
        err("10.0.0.0/33"),
        ParseError::Prefix { max: 32, .. }
    ));
    assert!(matches!(err("::/129"), ParseError::Prefix { max: 128, .. }));
    assert!(matches!(err("10.0.0.0/+8"), ParseError::Prefix { .. }));
    assert!(matches!(err("10.0.0.0/x"), ParseError::Prefix { .. }));
    assert!(matches!(err("10.0.0/8"), ParseError::Address { .. }));
    assert!(matches!(err("example.com"), ParseError::Address { .. }));
    assert_eq!(
        parse_cidr_list("10.0.0.0/8,,"),
        Err(ParseError::EmptyEntry {
            value: "10.0.0.0/8,,".into()
        })
    );
    assert_eq!(parse_cidr_list(" ").unwrap(), vec![]);
    assert_eq!(parse_cidr_list("10.0.0.0/8, fd00::/8").unwrap().len(), 2);
}

#[test]
fn defaults_are_the_documented_ports() {
    let config = Config::default().validate().unwrap();
    assert_eq!(config.proxy_uid, 2102);
    assert_eq!(config.outbound_port, 4140);
    assert_eq!(config.inbound_port, 4143);
    assert_eq!(config.skip_inbound_ports.to_string(), "4191");
    assert_eq!(config.families(), vec![Family::V4]);
    // The flag's text default spells the mesh's admin port.
    assert_eq!(DEFAULT_SKIP_INBOUND_PORTS, DEFAULT_ADMIN_PORT.to_string());
}

#[test]
fn conflicting_values_name_the_flags() {
    let same = Config {
        inbound_port: 4140,
        ..Config::default()
    };
    let msg = same.validate().unwrap_err().to_string();
    assert!(
        msg.contains("--outbound-port") && msg.contains("--inbound-port"),
        "{msg}"
    );

    let v6 = Config {
        include_outbound_subnets: parse_cidr_list("fd00::/8").unwrap(),
        ..Config::default()
    };
    let msg = v6.clone().validate().unwrap_err().to_string();
    assert!(
        msg.contains("--include-outbound-subnets") && msg.contains("fd00::/8"),
        "{msg}"
    );
    assert!(Config { ipv6: true, ..v6 }.validate().is_ok());
}
