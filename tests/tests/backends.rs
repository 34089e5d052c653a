//! `isthmus-init` across the nft and legacy backends, on real tables: each test gets
//! a fresh network namespace and runs the real binary with the host's
//! `iptables-nft-*` and `iptables-legacy-*` tools (Debian's `iptables` package ships
//! both). The kernel consults both backends' tables for every packet, so a copy of
//! the capture left in either one still captures. Needs root (fails, with
//! instructions, without it).
#![allow(clippy::unwrap_used)]

use isthmus_test_support::test_cases;
use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use iptables_init::backend::Mode;
use iptables_init::rules::CHAINS;
use isthmus_tests::netns::{Lab, Namespace};

const FAMILIES: [&str; 2] = ["iptables", "ip6tables"];

fn init_path() -> String {
    isthmus_tests::binary::binary("isthmus-init")
        .to_str()
        .unwrap()
        .to_owned()
}

/// Runs `isthmus-init args` in `ns`, with `path` as its `PATH` if given.
fn init(ns: &Namespace, args: &[&str], path: Option<&str>) -> Output {
    let mut cmd = ns.command(init_path());
    cmd.args(args);
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    cmd.output().unwrap()
}

fn init_ok(ns: &Namespace, args: &[&str]) -> String {
    let out = init(ns, args, None);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "isthmus-init {args:?} failed: {text}");
    text
}

/// Our chains in one backend, per family, as `iptables-nft` and the like name them.
fn ours(ns: &Namespace, mode: Mode) -> Vec<String> {
    let mut found = Vec::new();
    for program in FAMILIES {
        let save = ns
            .exec(&format!("{program}-{mode}-save"), &["-t", "nat"])
            .unwrap();
        for chain in CHAINS {
            if save.lines().any(|l| l.starts_with(&format!(":{chain} "))) {
                found.push(format!("{program}-{mode} {chain}"));
            }
        }
        if save
            .lines()
            .any(|l| l.starts_with("-A ") && l.contains("ISTHMUS_"))
        {
            found.push(format!("{program}-{mode} rules into ours"));
        }
    }
    found
}

fn all_four(mode: Mode, program: &str) -> Vec<String> {
    CHAINS
        .iter()
        .map(|c| format!("{program}-{mode} {c}"))
        .chain([format!("{program}-{mode} rules into ours")])
        .collect()
}

/// The capture in `held`, then an install with the other backend chosen: the
/// capture ends up in the chosen backend only; a cleanup leaves nothing anywhere.
fn install_over_the_other_backend(held: Mode) {
    let lab = Lab::new();
    let ns = lab.namespace();
    let chosen = held.other();
    init_ok(&ns, &["--backend", &held.to_string(), "--ipv6"]);
    assert_eq!(
        ours(&ns, held),
        [all_four(held, "iptables"), all_four(held, "ip6tables")].concat()
    );

    let said = init_ok(&ns, &["--backend", &chosen.to_string()]);
    assert!(
        said.contains(&format!("the {held} backend's IPv4 nat table holds a copy")),
        "{said}"
    );
    assert_eq!(
        ours(&ns, held),
        Vec::<String>::new(),
        "the {held} copy is gone: {said}\n{}",
        ns.diagnostics()
    );
    assert_eq!(ours(&ns, chosen), all_four(chosen, "iptables"));

    let said = init_ok(&ns, &["--cleanup"]);
    for mode in Mode::ALL {
        assert_eq!(
            ours(&ns, mode),
            Vec::<String>::new(),
            "{said}\n{}",
            ns.diagnostics()
        );
    }
    assert!(said.contains("no capture rules remain in"), "{said}");
}

test_cases!(install_over_the_other_backend {
    legacy_holds_the_capture_then_nft_install_and_cleanup: Mode::Legacy,
    nft_holds_the_capture_then_legacy_install_and_cleanup: Mode::Nft,
});

/// Both backends hold the capture (what an older `isthmus-init` left after
/// `--backend nft` over a legacy install): whichever backend a cleanup is pointed
/// at, it removes both.
#[test]
fn cleanup_removes_the_capture_from_both_backends() {
    for backend in ["nft", "legacy", "auto"] {
        let lab = Lab::new();
        let ns = lab.namespace();
        // Two copies, made the way an older version could: each run with one
        // backend and no knowledge of the other (the other's tools hidden).
        for mode in Mode::ALL {
            let hidden = hide(mode.other());
            let out = init(&ns, &["--backend", &mode.to_string()], Some(&hidden.path));
            assert!(out.status.success(), "{out:?}");
        }
        assert_eq!(ours(&ns, Mode::Nft).len(), CHAINS.len() + 1);
        assert_eq!(ours(&ns, Mode::Legacy).len(), CHAINS.len() + 1);
        let said = init_ok(&ns, &["--cleanup", "--backend", backend]);
        for mode in Mode::ALL {
            assert_eq!(ours(&ns, mode), Vec::<String>::new(), "{backend}: {said}");
        }
    }
}

/// A directory to use as `PATH`, replacing some iptables tools.
struct ShimPath {
    path: String,
    _dir: tempfile::TempDir,
}

fn system_tool(name: &str) -> std::path::PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} is not installed"))
}

/// A `PATH` holding only `ip` and the other backend's tools: a run sees no tool
/// of `mode`, as an older `isthmus-init` saw nothing of the other backend.
fn hide(mode: Mode) -> ShimPath {
    let dir = tempfile::tempdir().unwrap();
    let mut names = vec!["ip".to_owned()];
    for program in FAMILIES {
        for verb in ["save", "restore"] {
            names.push(format!("{program}-{}-{verb}", mode.other()));
        }
    }
    for name in names {
        std::os::unix::fs::symlink(system_tool(&name), dir.path().join(name)).unwrap();
    }
    let path = dir.path().display().to_string();
    ShimPath { path, _dir: dir }
}

/// The system's `PATH` behind a directory whose `*-{mode}-restore` tools read
/// their input, report success and change nothing.
fn stuck(mode: Mode) -> ShimPath {
    let dir = tempfile::tempdir().unwrap();
    for program in FAMILIES {
        let target = dir.path().join(format!("{program}-{mode}-restore"));
        std::fs::write(&target, "#!/bin/sh\ncat >/dev/null\nexit 0\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    ShimPath { path, _dir: dir }
}

/// A cleanup whose removal in one backend silently does nothing (a restore tool
/// that exits 0 and changes nothing) fails, naming backend, family and chain; the
/// other backend is cleaned all the same.
#[test]
fn cleanup_fails_naming_a_leftover_it_could_not_remove() {
    let lab = Lab::new();
    let ns = lab.namespace();
    let hidden = hide(Mode::Nft);
    let out = init(&ns, &["--backend", "legacy"], Some(&hidden.path));
    assert!(out.status.success(), "{out:?}");
    let hidden = hide(Mode::Legacy);
    let out = init(&ns, &["--backend", "nft"], Some(&hidden.path));
    assert!(out.status.success(), "{out:?}");

    let stuck = stuck(Mode::Legacy);
    let out = init(&ns, &["--cleanup"], Some(&stuck.path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the legacy backend's IPv4 nat table holds ISTHMUS_PREROUTING")
            && stderr.contains("ISTHMUS_OUTPUT")
            && stderr.contains("-A OUTPUT -p tcp -j ISTHMUS_OUTPUT"),
        "{stderr}"
    );
    assert_eq!(ours(&ns, Mode::Nft), Vec::<String>::new(), "{stderr}");
    assert_eq!(ours(&ns, Mode::Legacy), all_four(Mode::Legacy, "iptables"));
}
