//! Table-driven tests that keep a test per case.
//!
//! A check written once and run for each address family or backend would otherwise
//! be a column of three-line `#[test]` wrappers; [`test_cases!`](crate::test_cases)
//! writes them from a table, so each case still fails under its own name and runs
//! alone with `cargo test NAME`. [`fuzz_corpus`] gives the inputs a fuzz target
//! has collected, for suites that replay them against live processes.

use std::path::{Path, PathBuf};

/// One `#[test]` per case, each calling `check` with the case's argument.
///
/// With `for [...]` first, every check listed after it runs for every case of
/// the table, as a module named for the check with a test named for the case
/// (`check::v4`):
///
/// ```ignore
/// isthmus_test_support::test_cases!(for [v4: Fam::V4, v6: Fam::V6]
///     round_trip,
///     half_close,
/// );
/// ```
///
/// Without it, the cases of one check are named in full:
///
/// ```ignore
/// isthmus_test_support::test_cases!(round_trip {
///     round_trip_v4: Fam::V4,
///     round_trip_v6: Fam::V6,
/// });
/// ```
#[macro_export]
macro_rules! test_cases {
    (for $cases:tt $($check:ident),+ $(,)?) => {
        $( $crate::test_cases!(@module $check $cases); )+
    };
    (@module $check:ident [$($case:ident: $arg:expr),+ $(,)?]) => {
        mod $check {
            // The cases' arguments are written where the macro is called.
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $case() {
                    super::$check($arg);
                }
            )+
        }
    };
    ($check:path { $($name:ident: $arg:expr),+ $(,)? }) => {
        $(
            #[test]
            fn $name() {
                $check($arg);
            }
        )+
    };
}

/// The files of the fuzz target `target`'s corpus (`fuzz/corpus/<target>`), in name
/// order; a missing or empty corpus fails the test.
pub fn fuzz_corpus(target: &str) -> Vec<PathBuf> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("the {target} corpus {}: {e}", corpus.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} is empty", corpus.display());
    inputs
}
