//! The `isthmus-init` command line: bad values exit 2 naming flag and value before
//! anything runs; a dry run prints exactly the golden rules; missing tools are named.
//! None of these change any rule, and none need root: `PATH` points at an empty
//! directory wherever iptables tools could otherwise be found and run.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn init(args: &[&str]) -> (Output, String, String) {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_isthmus-init"))
        .args(args)
        // No ISTHMUS_INIT_* from the caller's environment, no iptables tools.
        .env_clear()
        .env("PATH", empty.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

fn assert_bad_flag(args: &[&str], flag: &str, value: &str) {
    let (out, _, stderr) = init(args);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(flag) && stderr.contains(value),
        "{args:?}: message should name {flag} and {value}: {stderr}"
    );
}

#[test]
fn bad_values_exit_2_naming_flag_and_value() {
    assert_bad_flag(&["--outbound-port", "70000"], "--outbound-port", "70000");
    assert_bad_flag(&["--inbound-port", "0"], "--inbound-port", "0");
    assert_bad_flag(&["--proxy-uid=-1"], "--proxy-uid", "-1");
    assert_bad_flag(&["--proxy-uid", "proxy"], "--proxy-uid", "proxy");
    assert_bad_flag(
        &["--skip-outbound-ports", "25,8100-8000"],
        "--skip-outbound-ports",
        "8100-8000",
    );
    assert_bad_flag(
        &["--skip-inbound-ports", "22,http"],
        "--skip-inbound-ports",
        "http",
    );
    assert_bad_flag(
        &["--skip-outbound-subnets", "10.0.0.0/33"],
        "--skip-outbound-subnets",
        "10.0.0.0/33",
    );
    assert_bad_flag(
        &["--include-outbound-subnets", "10.0.0.1/8"],
        "--include-outbound-subnets",
        "10.0.0.1/8",
    );
    assert_bad_flag(
        &["--include-outbound-subnets", "10.0.0.0/8,nope"],
        "--include-outbound-subnets",
        "nope",
    );
    assert_bad_flag(&["--backend", "iptables"], "--backend", "iptables");
    assert_bad_flag(&["--outbound-port", "4143"], "--outbound-port", "4143");
    assert_bad_flag(
        &["--skip-outbound-subnets", "fd00::/8"],
        "--skip-outbound-subnets",
        "fd00::/8",
    );
}

#[test]
fn bad_environment_values_name_the_flag_too() {
    let out = Command::new(env!("CARGO_BIN_EXE_isthmus-init"))
        .arg("--dry-run")
        .env_clear()
        .env("ISTHMUS_INIT_OUTBOUND_PORT", "99999")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--outbound-port") && stderr.contains("99999"),
        "{stderr}"
    );
}

#[test]
fn dry_run_prints_exactly_the_golden_rules() {
    let golden = |name: &str| {
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/golden")
                .join(name),
        )
        .unwrap()
    };
    let (out, stdout, stderr) = init(&["--dry-run", "--ipv6", "--backend", "legacy"]);
    assert!(out.status.success(), "{stderr}");
    let expected = format!(
        "# IPv4 rules for: iptables-legacy-restore --noflush\n{}\
         # IPv6 rules for: ip6tables-legacy-restore --noflush\n{}\
         # and the sidecar's IPv6 inbound source: ip -6 addr replace ::6/128 dev lo nodad\n",
        golden("default-v4.rules"),
        golden("default-v6.rules")
    );
    assert_eq!(stdout, expected);
    // The tools are missing from PATH here; a dry run says so but still shows the rules.
    assert!(stderr.contains("not found in PATH"), "{stderr}");
}

#[test]
fn missing_tools_fail_with_their_name() {
    let (out, stdout, stderr) = init(&["--backend", "nft"]);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("iptables-nft-restore not found in PATH"),
        "{stderr}"
    );
}
