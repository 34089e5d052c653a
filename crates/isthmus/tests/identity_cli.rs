//! `isthmus identity` end to end: mint a two-cluster set with the binary, then check
//! it with openssl (chain, purposes, URI SAN, key pairing) and with the proxy's loader.

#![allow(clippy::unwrap_used)]

mod binary;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::SystemTime;

use isthmus_vocab::SpiffeId;
use proxy_identity::{CredentialPaths, Credentials};

/// The binary with a clean environment, so no `ISTHMUS_*` variable of the caller leaks in.
/// A well-formed workload id for the cases where the id is not what is tested.
const ID: &str = "spiffe://td/ns/a/sa/b";

fn isthmus(args: &[&str]) -> Output {
    binary::run(args, "")
}

fn ok(args: &[&str]) -> String {
    binary::ok(args, "")
}

fn fails(args: &[&str]) -> String {
    let out = isthmus(args);
    assert!(!out.status.success(), "isthmus {args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

/// `isthmus identity issuer` for `cluster`, signed by the anchor in `anchor`, written to `out`.
fn issuer_cmd<'a>(
    anchor: &'a Path,
    cluster: &'a str,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "identity",
        "issuer",
        "--anchor",
        s(anchor),
        "--cluster",
        cluster,
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    args
}

/// `isthmus identity leaf` for `id`, signed by the issuer in `issuer`, written to `out`.
fn leaf_cmd<'a>(issuer: &'a Path, id: &'a str, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "identity",
        "leaf",
        "--issuer",
        s(issuer),
        "--id",
        id,
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    args
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether openssl exits 0: for checks whose answer is the exit status.
fn openssl_succeeds(args: &[&str]) -> bool {
    Command::new("openssl")
        .args(args)
        .output()
        .unwrap()
        .status
        .success()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn mints_a_two_cluster_set_that_openssl_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor = root.join("anchor");
    let (issuer_a, issuer_b) = (root.join("cluster-a"), root.join("cluster-b"));
    let (hello, frontend) = (root.join("hello"), root.join("frontend"));

    ok(&["identity", "trust-anchor", "--out", s(&anchor)]);
    ok(&issuer_cmd(&anchor, "cluster-a", &issuer_a, &[]));
    ok(&issuer_cmd(&anchor, "cluster-b", &issuer_b, &[]));
    let hello_id = "spiffe://cluster.local/ns/default/sa/hello";
    let frontend_id = "spiffe://cluster.local/ns/default/sa/frontend";
    let report = ok(&leaf_cmd(&issuer_a, hello_id, &hello, &[]));
    assert!(
        report.contains(hello_id) && report.contains("tls.key"),
        "{report}"
    );
    ok(&leaf_cmd(
        &issuer_b,
        frontend_id,
        &frontend,
        &["--valid-for", "2h"],
    ));

    assert_eq!(mode(&anchor.join("ca.key")), 0o600);
    assert_eq!(mode(&issuer_a.join("ca.key")), 0o600);
    assert_eq!(mode(&hello.join("tls.key")), 0o600);

    let ca = anchor.join("ca.crt");
    for (dir, id) in [(&hello, hello_id), (&frontend, frontend_id)] {
        let crt = dir.join("tls.crt");
        // The leaf's ca.crt is the anchor.
        assert_eq!(
            std::fs::read(dir.join("ca.crt")).unwrap(),
            std::fs::read(&ca).unwrap()
        );
        // tls.crt carries its issuer, so the anchor alone verifies it, for both uses.
        for purpose in ["sslserver", "sslclient"] {
            let out = openssl(&[
                "verify",
                "-CAfile",
                s(&ca),
                "-untrusted",
                s(&crt),
                "-purpose",
                purpose,
                s(&crt),
            ]);
            assert!(out.contains(": OK"), "{out}");
        }
        let san = openssl(&["x509", "-in", s(&crt), "-noout", "-ext", "subjectAltName"]);
        assert!(san.contains(&format!("URI:{id}")), "{san}");
        // tls.key is the key of the leaf.
        let cert_pub = openssl(&["x509", "-in", s(&crt), "-noout", "-pubkey"]);
        let key_pub = openssl(&["pkey", "-in", s(&dir.join("tls.key")), "-pubout"]);
        assert_eq!(cert_pub, key_pub);
        let text = openssl(&["x509", "-in", s(&crt), "-noout", "-text"]);
        assert!(
            text.contains("prime256v1") && text.contains("CA:FALSE"),
            "{text}"
        );

        let creds = Credentials::load(&CredentialPaths::in_dir(dir), SystemTime::now()).unwrap();
        assert_eq!(creds.id(), &SpiffeId::parse(id).unwrap());
        // The leaf belongs to the cluster its issuer names.
        let cluster = if dir == &hello {
            "cluster-a"
        } else {
            "cluster-b"
        };
        assert_eq!(creds.cluster().map(|c| c.as_str()), Some(cluster));
    }
    // Each issuer names its cluster and signs no CA.
    for (dir, cluster) in [(&issuer_a, "cluster-a"), (&issuer_b, "cluster-b")] {
        let text = openssl(&["x509", "-in", s(&dir.join("ca.crt")), "-noout", "-text"]);
        assert!(
            text.contains(&format!("OU = {cluster}")) && text.contains("CA:TRUE, pathlen:0"),
            "{text}"
        );
    }
    // The leaf names its issuer: cluster-a's leaf does not verify with cluster-b's chain.
    assert!(!openssl_succeeds(&[
        "verify",
        "-CAfile",
        s(&ca),
        "-untrusted",
        s(&issuer_b.join("ca.crt")),
        s(&hello.join("tls.crt")),
    ]));

    // A lifetime flag changes the leaf's notAfter: 2h from now, within a minute.
    let frontend_crt = frontend.join("tls.crt");
    let valid_in =
        |secs| openssl_succeeds(&["x509", "-in", s(&frontend_crt), "-noout", "-checkend", secs]);
    assert!(valid_in("7140"), "the leaf ends before its --valid-for 2h");
    assert!(!valid_in("7260"), "the leaf outlives its --valid-for 2h");
}

#[test]
fn bad_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let anchor = root.join("anchor");
    let issuer = root.join("issuer");
    ok(&["identity", "trust-anchor", "--out", s(&anchor)]);

    let err = fails(&["identity", "trust-anchor", "--out", s(&anchor)]);
    assert!(
        err.contains("ca.crt already exists") && err.contains("--force"),
        "{err}"
    );
    ok(&["identity", "trust-anchor", "--out", s(&anchor), "--force"]);

    let err = fails(&issuer_cmd(&root.join("nope"), "a", &issuer, &[]));
    assert!(err.contains("--anchor") && err.contains("nope"), "{err}");

    let err = fails(&issuer_cmd(&anchor, "Cluster A", &issuer, &[]));
    assert!(err.contains("\"Cluster A\" is not a DNS label"), "{err}");

    ok(&issuer_cmd(
        &anchor,
        "cluster-a",
        &issuer,
        &["--valid-for", "1d"],
    ));
    let err = fails(&issuer_cmd(&issuer, "b", &root.join("x"), &[]));
    assert!(err.contains("not a trust anchor"), "{err}");

    let l = root.join("l");
    // The anchor signs issuers only.
    let err = fails(&leaf_cmd(&anchor, ID, &l, &[]));
    assert!(err.contains("signs issuers only"), "{err}");

    let err = fails(&leaf_cmd(
        &issuer,
        "spiffe://Cluster.local/ns/a/sa/b",
        &l,
        &[],
    ));
    assert!(
        err.contains("--id") && err.contains("trust domain character 'C'"),
        "{err}"
    );

    let err = fails(&leaf_cmd(&issuer, ID, &l, &["--valid-for", "2d"]));
    assert!(err.contains("before the requested notAfter"), "{err}");

    // Weeks are days; a year has no fixed length.
    let err = fails(&leaf_cmd(&issuer, ID, &l, &["--valid-for", "1y"]));
    assert!(err.contains("--valid-for") && err.contains("unit"), "{err}");

    let err = fails(&[
        "identity",
        "trust-anchor",
        "--out",
        s(&root.join("k")),
        "--key-alg",
        "rsa",
    ]);
    assert!(
        err.contains("--key-alg") && err.contains("ecdsa-p256"),
        "{err}"
    );
}

#[test]
fn other_key_algorithms() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for alg in ["ecdsa-p384", "ed25519"] {
        let (anchor, issuer, leaf) = (
            root.join(format!("{alg}-a")),
            root.join(format!("{alg}-i")),
            root.join(format!("{alg}-l")),
        );
        ok(&[
            "identity",
            "trust-anchor",
            "--out",
            s(&anchor),
            "--key-alg",
            alg,
        ]);
        ok(&issuer_cmd(&anchor, "c", &issuer, &["--key-alg", alg]));
        ok(&leaf_cmd(&issuer, ID, &leaf, &["--key-alg", alg]));
        let crt = leaf.join("tls.crt");
        let out = openssl(&[
            "verify",
            "-CAfile",
            s(&anchor.join("ca.crt")),
            "-untrusted",
            s(&crt),
            s(&crt),
        ]);
        assert!(out.contains(": OK"), "{out}");
        Credentials::load(&CredentialPaths::in_dir(&leaf), SystemTime::now()).unwrap();
    }
}
