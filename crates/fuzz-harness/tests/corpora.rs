//! Replays every checked-in fuzz input through the harness the fuzz targets call:
//! `fuzz/corpus/<target>/*` (what the fuzzer kept, seeds included) and
//! `fuzz/regressions/<target>/*` (inputs that once failed). A target without a
//! corpus fails, so a corpus that goes missing cannot pass silently.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use isthmus_fuzz_harness::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted; empty when the directory does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8]), files: &[PathBuf]) {
    for file in files {
        let data = std::fs::read(file).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!("{target}: {} fails: {why}", file.display());
        }
    }
}

#[test]
fn every_target_has_a_fuzz_target_file_and_a_corpus() {
    for (target, _) in TARGETS {
        let source = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
        assert!(source.is_file(), "{} is missing", source.display());
        let corpus = fuzz_dir().join("corpus").join(target);
        assert!(
            !inputs(&corpus).is_empty(),
            "{} is missing or empty",
            corpus.display()
        );
    }
}

/// Replays every input kept under `fuzz/<kind>/<target>` through its target's check.
fn replay_all(kind: &str) {
    for (target, check) in TARGETS {
        replay(target, check, &inputs(&fuzz_dir().join(kind).join(target)));
    }
}

#[test]
fn corpora_replay_without_failures() {
    replay_all("corpus");
}

#[test]
fn regressions_replay_without_failures() {
    replay_all("regressions");
}
