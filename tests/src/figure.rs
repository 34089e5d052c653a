//! Figures the end-to-end tests measure: printed, never asserted (the machine is
//! shared), as `FIGURE name = value` lines on stderr that `tests/figures` collects.
//! This module does not measure anything itself.

use std::fmt::Display;

/// Prints `FIGURE name = value` on stderr.
pub fn figure(name: &str, value: impl Display) {
    eprintln!("FIGURE {name} = {value}");
}
