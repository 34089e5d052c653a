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
    ok(&[
        "identity",
        "issuer",
        "--anchor",
        s(&anchor),
        "--cluster",
        "cluster-a",
        "--out",
        s(&issuer_a),
    ]);
    ok(&[
        "identity",
        "issuer",
        "--anchor",
        s(&anchor),
        "--cluster",
        "cluster-b",
        "--out",
        s(&issuer_b),
    ]);
    let hello_id = "spiffe://cluster.local/ns/default/sa/hello";
    let frontend_id = "spiffe://cluster.local/ns/default/sa/frontend";
    let report = ok(&[
        "identity",
        "leaf",
        "--issuer",
        s(&issuer_a),
        "--id",
        hello_id,
        "--out",
        s(&hello),
    ]);
    assert!(
        report.contains(hello_id) && report.contains("tls.key"),
        "{report}"
    );
    ok(&[
        "identity",
        "leaf",
        "--issuer",
        s(&issuer_b),
        "--id",
        frontend_id,
        "--out",
        s(&frontend),
        "--valid-for",
        "2h",
    ]);

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
    let out = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            s(&ca),
            "-untrusted",
            s(&issuer_b.join("ca.crt")),
            s(&hello.join("tls.crt")),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());

    // A lifetime flag changes the leaf's notAfter: 2h from now, within a minute.
    let end = openssl(&[
        "x509",
        "-in",
        s(&frontend.join("tls.crt")),
        "-noout",
        "-checkend",
        "7140",
    ]);
    assert!(end.contains("will not expire"), "{end}");
    let out = Command::new("openssl")
        .args([
            "x509",
            "-in",
            s(&frontend.join("tls.crt")),
            "-noout",
            "-checkend",
            "7260",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the leaf outlives its --valid-for 2h"
    );
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

    let err = fails(&[
        "identity",
        "issuer",
        "--anchor",
        s(&root.join("nope")),
        "--cluster",
        "a",
        "--out",
        s(&issuer),
    ]);
    assert!(err.contains("--anchor") && err.contains("nope"), "{err}");

    let err = fails(&[
        "identity",
        "issuer",
        "--anchor",
        s(&anchor),
        "--cluster",
        "Cluster A",
        "--out",
        s(&issuer),
    ]);
    assert!(err.contains("\"Cluster A\" is not a DNS label"), "{err}");

    ok(&[
        "identity",
        "issuer",
        "--anchor",
        s(&anchor),
        "--cluster",
        "cluster-a",
        "--out",
        s(&issuer),
        "--valid-for",
        "1d",
    ]);
    let err = fails(&[
        "identity",
        "issuer",
        "--anchor",
        s(&issuer),
        "--cluster",
        "b",
        "--out",
        s(&root.join("x")),
    ]);
    assert!(err.contains("not a trust anchor"), "{err}");

    // The anchor signs issuers only.
    let err = fails(&[
        "identity",
        "leaf",
        "--issuer",
        s(&anchor),
        "--id",
        "spiffe://td/ns/a/sa/b",
        "--out",
        s(&root.join("l")),
    ]);
    assert!(err.contains("signs issuers only"), "{err}");

    let err = fails(&[
        "identity",
        "leaf",
        "--issuer",
        s(&issuer),
        "--id",
        "spiffe://Cluster.local/ns/a/sa/b",
        "--out",
        s(&root.join("l")),
    ]);
    assert!(
        err.contains("--id") && err.contains("trust domain character 'C'"),
        "{err}"
    );

    let err = fails(&[
        "identity",
        "leaf",
        "--issuer",
        s(&issuer),
        "--id",
        "spiffe://td/ns/a/sa/b",
        "--out",
        s(&root.join("l")),
        "--valid-for",
        "2d",
    ]);
    assert!(err.contains("before the requested notAfter"), "{err}");

    let err = fails(&[
        "identity",
        "leaf",
        "--issuer",
        s(&issuer),
        "--id",
        "spiffe://td/ns/a/sa/b",
        "--out",
        s(&root.join("l")),
        "--valid-for",
        // Weeks are days; a year has no fixed length.
        "1y",
    ]);
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
        ok(&[
            "identity",
            "issuer",
            "--anchor",
            s(&anchor),
            "--cluster",
            "c",
            "--out",
            s(&issuer),
            "--key-alg",
            alg,
        ]);
        ok(&[
            "identity",
            "leaf",
            "--issuer",
            s(&issuer),
            "--id",
            "spiffe://td/ns/a/sa/b",
            "--out",
            s(&leaf),
            "--key-alg",
            alg,
        ]);
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
