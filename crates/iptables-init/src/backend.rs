//! Finding the iptables tools to run, and choosing between the nft and legacy
//! implementations.
//!
//! Both implementations can be present on one host, and both can hold rules at the
//! same time; a pod's rules must go where the rest of the host's live, or a reader of
//! the other one sees nothing. `auto` therefore asks each implementation's `*-save`
//! what it holds: our own chains decide first (so a second run or a cleanup finds
//! what the first installed), then whichever holds more rules, and nft on a tie,
//! since it is the default of current distributions.
//!
//! Tools are looked up in `PATH` only, so what runs is what the container image
//! ships. The mode-specific names (`iptables-nft-restore`) are preferred; the plain
//! name (`iptables-restore`) is accepted when its `--version` says it is that mode.
//! This module runs only `--version`; reading and changing rules is [`crate::apply`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::Family;
use crate::rules::NatState;

/// One of the two kernel interfaces the iptables tools speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Nft,
    Legacy,
}

impl Mode {
    /// Both modes, nft first.
    pub const ALL: [Mode; 2] = [Mode::Nft, Mode::Legacy];

    /// The mode that is not this one.
    pub fn other(self) -> Mode {
        match self {
            Mode::Nft => Mode::Legacy,
            Mode::Legacy => Mode::Nft,
        }
    }

    fn infix(self) -> &'static str {
        match self {
            Mode::Nft => "nft",
            Mode::Legacy => "legacy",
        }
    }

    /// What `iptables --version` prints for this mode, e.g. `iptables v1.8.9 (nf_tables)`.
    fn version_marker(self) -> &'static str {
        match self {
            Mode::Nft => "(nf_tables)",
            Mode::Legacy => "(legacy)",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.infix())
    }
}

/// Why the tools could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "{name} not found in PATH ({path}); install the iptables package (nft and legacy tools) in the init container image"
    )]
    NotFound { name: String, path: String },
}

/// The pair of tools for one family and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub family: Family,
    pub mode: Mode,
    /// `iptables-nft-restore` and the like.
    pub restore: PathBuf,
    /// `iptables-nft-save` and the like.
    pub save: PathBuf,
}

fn program(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

/// Finds the restore and save tools of `mode` for `family` in `PATH`.
pub fn locate(mode: Mode, family: Family) -> Result<Tools, BackendError> {
    let find = |verb: &str| {
        let specific = format!("{}-{}-{verb}", program(family), mode.infix());
        if let Some(path) = find_in_path(&specific) {
            return Ok(path);
        }
        let plain = format!("{}-{verb}", program(family));
        if let Some(path) = find_in_path(&plain).filter(|p| reports_mode(p, mode)) {
            return Ok(path);
        }
        Err(BackendError::NotFound {
            name: specific,
            path: std::env::var("PATH").unwrap_or_default(),
        })
    };
    Ok(Tools {
        family,
        mode,
        restore: find("restore")?,
        save: find("save")?,
    })
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn reports_mode(path: &Path, mode: Mode) -> bool {
    Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(mode.version_marker()))
}

/// What one mode's `*-save` showed, for choosing between modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Whether any of our chains exists in a `nat` table.
    pub ours: bool,
    /// Rules plus user-defined chains, over every table.
    pub rules: usize,
}

impl Holdings {
    /// Scores one `*-save` output (all tables).
    pub fn of(save_output: &str) -> Self {
        let rules = save_output
            .lines()
            .filter(|l| {
                l.starts_with("-A ")
                    || l.strip_prefix(':').is_some_and(|decl| {
                        // Built-in chains carry a policy; user chains show `-`.
                        decl.split_whitespace().nth(1) == Some("-")
                    })
            })
            .count();
        Self {
            ours: NatState::parse(save_output).holds_our_chains(),
            rules,
        }
    }
}

/// The decision `auto` makes from what each mode holds.
pub fn choose(nft: Holdings, legacy: Holdings) -> Mode {
    match (nft.ours, legacy.ours) {
        (true, _) => Mode::Nft,
        (false, true) => Mode::Legacy,
        (false, false) if legacy.rules > nft.rules => Mode::Legacy,
        _ => Mode::Nft,
    }
}

/// The mode `auto` picks from what each mode holds, and a sentence saying why.
pub fn auto(nft: Holdings, legacy: Holdings) -> (Mode, String) {
    let ours = |h: Holdings| if h.ours { " (ours among them)" } else { "" };
    let why = format!(
        "auto: nft holds {} rules and user chains{}, legacy holds {}{}",
        nft.rules,
        ours(nft),
        legacy.rules,
        ours(legacy),
    );
    (choose(nft, legacy), why)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";

    #[test]
    fn empty_tables_hold_nothing() {
        assert_eq!(Holdings::of(EMPTY), Holdings::default());
        assert_eq!(Holdings::of(""), Holdings::default());
    }

    #[test]
    fn counts_rules_and_user_chains() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-X - [0:0]\n-A INPUT -j KUBE-X\nCOMMIT\n\
                    *nat\n:ISTHMUS_OUTPUT - [0:0]\nCOMMIT\n";
        assert_eq!(
            Holdings::of(save),
            Holdings {
                ours: true,
                rules: 3
            }
        );
    }

    #[test]
    fn our_chains_decide_first_then_rule_count_then_nft() {
        let none = Holdings::default();
        let some = Holdings {
            ours: false,
            rules: 5,
        };
        let ours = Holdings {
            ours: true,
            rules: 1,
        };
        assert_eq!(choose(none, none), Mode::Nft);
        assert_eq!(choose(none, some), Mode::Legacy);
        assert_eq!(choose(some, some), Mode::Nft);
        assert_eq!(choose(some, ours), Mode::Legacy);
        assert_eq!(choose(ours, ours), Mode::Nft);
    }
}
