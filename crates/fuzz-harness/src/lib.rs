//! Property checks over every parser that reads untrusted bytes, one function per
//! fuzz target: protocol detection, the tunnel's CONNECT request, service authorities,
//! cluster names, SPIFFE IDs, manifests and `isthmus-init`'s flag values.
//!
//! Each function takes arbitrary bytes, runs the real parser on them and panics when
//! a property the parser promises does not hold (a round trip that changes the value,
//! a decision that flips when more bytes arrive, an error that does not say where).
//! The cargo-fuzz targets in `fuzz/` are one-line calls into this crate, and this
//! crate's `tests/corpora.rs` replays the checked-in corpora through the same
//! functions, so every input the fuzzer kept is a regression test of `cargo test`.
//!
//! It deliberately holds no parsing logic of its own: a property that needs an
//! expected answer derives it from a second public API of the crate under test
//! (render and re-parse), never from a copy of the parser.

pub mod authority;
pub mod cluster_name;
pub mod detect;
pub mod flags;
pub mod manifest;
pub mod spiffe;
pub mod tunnel;

/// A harness: panics when the parser breaks a property on these bytes.
pub type Check = fn(&[u8]);

/// The fuzz targets, by the name of their `fuzz/fuzz_targets/<name>.rs` file and
/// corpus directory, with the check each one runs.
pub const TARGETS: [(&str, Check); 7] = [
    ("authority", authority::check),
    ("cluster_name", cluster_name::check),
    ("detect", detect::check),
    ("flags", flags::check),
    ("manifest", manifest::check),
    ("spiffe_id", spiffe::check),
    ("tunnel_connect", tunnel::check),
];
