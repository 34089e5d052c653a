//! Running `*-save` and `*-restore`: reading what the `nat` tables hold, installing
//! the rendered rules, and cleaning up, in both backends.
//!
//! Each family's change is one `iptables-restore --noflush` transaction: the kernel
//! gets the whole new rule set or none of it, so a failure part-way leaves the rules
//! that were there before. IPv4 and IPv6 are two transactions; to keep them from
//! diverging, both inputs are checked with `--test` before either is applied, and if
//! IPv6 still fails after IPv4 went in on a namespace that had none of our rules, the
//! IPv4 rules are removed again.
//!
//! # Both backends
//!
//! The legacy and the nft implementation keep separate tables in the kernel and the
//! kernel consults both for every packet, so a copy of the capture in either one
//! captures. Every run therefore reads both, IPv4 and IPv6, wherever the tools exist:
//!
//! - An install puts the capture into the chosen backend and then removes any copy
//!   the other backend holds (left by an image that used the other backend, or by a
//!   run with another `--backend`). The new copy goes in first, so the pod is never
//!   without a capture; if the old copy cannot be removed, the run fails naming it,
//!   with the new capture in place. Refusing instead would keep the init container
//!   failing until someone cleans up by hand, over chains that are ours alone.
//! - A cleanup removes our chains and the jumps into them from every backend and
//!   family that holds them, trying each even when another fails, then reads every
//!   table again and fails, naming backend, family and chain, if anything remains.
//!
//! A backend whose tools are missing or cannot read its tables is not checked; the
//! run says so in a note.
//!
//! What the rules are is [`crate::rules`]; which tools run is [`crate::backend`];
//! every tool runs through a [`Runner`], so the logic here can be tested with a fake.

use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::backend::{self, BackendError, Holdings, Mode, Tools};
use crate::config::{BackendChoice, Config, Family};
use crate::rules::{self, NatState};

/// How long `*-restore` waits for the xtables lock another program may hold.
const LOCK_WAIT_SECS: &str = "10";

/// Why reading or changing the rules failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot find the {mode} iptables tools for {family}")]
    Tools {
        mode: Mode,
        family: Family,
        #[source]
        source: BackendError,
    },
    #[error("could not run {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} was denied permission: isthmus-init must run as root or with CAP_NET_ADMIN in the pod's network namespace ({stderr})",
        program.display()
    )]
    PermissionDenied { program: PathBuf, stderr: String },
    #[error("{} failed with {status}: {stderr}", program.display())]
    Failed {
        program: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{applied} rules were applied but {failed} rules were not; {what}")]
    Partial {
        applied: Family,
        failed: Family,
        what: &'static str,
        #[source]
        source: Box<ApplyError>,
    },
    #[error("the capture is still in place after removing it: {remains}")]
    Remains {
        remains: Remnants,
        /// The first removal that failed, if one did.
        #[source]
        source: Option<Box<ApplyError>>,
    },
}

/// What one backend and family still held after a removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remnant {
    pub mode: Mode,
    pub family: Family,
    /// Our chains by name, then the jumps into them as saved.
    pub leftovers: Vec<String>,
}

/// Every [`Remnant`] of a run, for [`ApplyError::Remains`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remnants(pub Vec<Remnant>);

impl fmt::Display for Remnants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "the {} backend's {} nat table holds {}",
                r.mode,
                r.family,
                r.leftovers.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Where the iptables tools come from and how they run: the system's in
/// production ([`System`]), an in-memory fake in tests.
pub trait Runner {
    /// The save and restore tools of `mode` for `family`.
    fn locate(&self, mode: Mode, family: Family) -> Result<Tools, BackendError>;
    /// Runs `tools.save` and returns what it printed: every table that exists.
    /// (Asking for one table, `-t nat`, would create it empty where it does not
    /// exist, and reading a backend must not change it.)
    fn save(&self, tools: &Tools) -> Result<String, ApplyError>;
    /// Feeds `text` to `tools.restore --noflush` as one transaction; with
    /// `test_only` the tool only checks it (`--test`) and changes nothing.
    fn restore(&self, tools: &Tools, text: &str, test_only: bool) -> Result<(), ApplyError>;
}

/// The tools found in `PATH`, run as child processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Runner for System {
    fn locate(&self, mode: Mode, family: Family) -> Result<Tools, BackendError> {
        backend::locate(mode, family)
    }

    fn save(&self, tools: &Tools) -> Result<String, ApplyError> {
        let out = Command::new(&tools.save)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ApplyError::Spawn {
                program: tools.save.clone(),
                source,
            })?;
        check(&tools.save, out.status, &out.stderr)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn restore(&self, tools: &Tools, text: &str, test_only: bool) -> Result<(), ApplyError> {
        let mut cmd = Command::new(&tools.restore);
        cmd.args(["--noflush", "-w", LOCK_WAIT_SECS]);
        if test_only {
            cmd.arg("--test");
        }
        let spawn_err = |source| ApplyError::Spawn {
            program: tools.restore.clone(),
            source,
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A tool that dies early closes its stdin; its exit status says why, so a
            // write error here is not the error to report.
            let _ = stdin.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        check(&tools.restore, out.status, &out.stderr)
    }
}

/// The IPv6 source (`::6`) the sidecar delivers inbound traffic from, the one the
/// rules let through to the app (IPv4's is `127.0.0.6`, inside `127.0.0.0/8` on `lo`
/// already). IPv6 has only `::1` on loopback, so an IPv6 capture adds it, or every
/// inbound delivery would fail to bind. `nodad`: no duplicate detection on `lo`,
/// so the address is usable at once.
pub const INBOUND_SOURCE_V6_ARGS: [&str; 7] =
    ["-6", "addr", "replace", "::6/128", "dev", "lo", "nodad"];

/// Adds [`INBOUND_SOURCE_V6_ARGS`]'s address to `lo` with iproute2's `ip`;
/// `replace` makes a second run a no-op. It stays after `--cleanup`: an address on
/// the pod's own loopback captures nothing.
pub fn add_inbound_source_v6() -> Result<(), ApplyError> {
    let program = PathBuf::from("ip");
    let out = Command::new(&program)
        .args(INBOUND_SOURCE_V6_ARGS)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ApplyError::Spawn {
            program: program.clone(),
            source,
        })?;
    check(&program, out.status, &out.stderr)
}

/// What a step does to its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Installs (or refreshes) the capture.
    Install,
    /// Removes our chains and the jumps into them.
    Remove,
}

/// One backend's and family's part of a run: its tools, the state read before, and
/// the restore input (`None` when there is nothing to change).
#[derive(Debug, Clone)]
pub struct Step {
    pub mode: Mode,
    pub family: Family,
    pub change: Change,
    /// `None` only in a lenient (dry-run) plan whose tools are missing.
    pub tools: Option<Tools>,
    /// What the `nat` table held when the plan was made.
    pub before: NatState,
    pub text: Option<String>,
}

impl Step {
    /// The restore tool's file name, for headers and messages.
    pub fn restore_name(&self) -> String {
        match &self.tools {
            Some(tools) => tools
                .restore
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| tools.restore.display().to_string()),
            None => {
                let program = match self.family {
                    Family::V4 => "iptables",
                    Family::V6 => "ip6tables",
                };
                format!("{program}-{}-restore", self.mode)
            }
        }
    }
}

/// What a run will do, per backend and family, before it does it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The backend the capture is installed into (for a cleanup: the one looked
    /// at first).
    pub mode: Mode,
    pub action: Action,
    /// The chosen backend's steps first, then the other backend's removals.
    pub steps: Vec<Step>,
    /// Things the user should know (why a mode was chosen, what was not checked).
    pub notes: Vec<String>,
}

/// Whether a run installs the capture or removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Install,
    Cleanup,
}

/// [`plan_with`] the system's tools.
pub fn plan(config: &Config, action: Action, lenient: bool) -> Result<Plan, ApplyError> {
    plan_with(&System, config, action, lenient)
}

/// Reads the current state of both backends and renders what `action` needs. With
/// `lenient` (dry runs), missing tools and unreadable state of the chosen backend
/// are notes and count as empty, so the rules can be shown on a machine that cannot
/// apply them.
///
/// A cleanup also looks at IPv6 without `--ipv6`, so a capture installed with it is
/// not left behind; IPv6 is then skipped quietly if its tools are missing.
pub fn plan_with(
    runner: &dyn Runner,
    config: &Config,
    action: Action,
    lenient: bool,
) -> Result<Plan, ApplyError> {
    let extra_v6 = action == Action::Cleanup && !config.ipv6;
    let families = if extra_v6 {
        vec![Family::V4, Family::V6]
    } else {
        config.families()
    };
    let (mode, why) = resolve(runner, config.backend, &families);
    let mut notes = vec![format!("backend {mode} ({why})")];
    let mut steps = Vec::new();
    for family in families {
        let tools = match runner.locate(mode, family) {
            Ok(tools) => Some(tools),
            Err(_) if extra_v6 && family == Family::V6 => continue,
            Err(source) if lenient => {
                notes.push(format!("{source}; assuming an empty nat table"));
                None
            }
            Err(source) => {
                return Err(ApplyError::Tools {
                    mode,
                    family,
                    source,
                });
            }
        };
        let before = match &tools {
            None => NatState::default(),
            Some(tools) => match save_nat_with(runner, tools) {
                Ok(state) => state,
                Err(e) if lenient => {
                    notes.push(format!("{e}; assuming an empty {family} nat table"));
                    NatState::default()
                }
                Err(e) => return Err(e),
            },
        };
        let (change, text) = match action {
            Action::Install => (
                Change::Install,
                Some(rules::render_install(config, family, &before)),
            ),
            Action::Cleanup => (Change::Remove, rules::render_cleanup(&before)),
        };
        steps.push(Step {
            mode,
            family,
            change,
            tools,
            before,
            text,
        });
    }
    // The other backend is only ever cleaned, in both families whatever `--ipv6`
    // says: a copy there captures as well as one in the chosen backend.
    let other = mode.other();
    for family in [Family::V4, Family::V6] {
        let tools = match runner.locate(other, family) {
            Ok(tools) => tools,
            Err(e) => {
                notes.push(format!(
                    "{e}; the {other} backend's {family} rules were not checked for a copy of the capture"
                ));
                continue;
            }
        };
        let before = match save_nat_with(runner, &tools) {
            Ok(state) => state,
            // A cleanup that could not look cannot say no copy remains: its tools
            // are there, so a capture may be too.
            Err(e) if action == Action::Cleanup && !lenient => return Err(e),
            Err(e) => {
                notes.push(format!(
                    "{e}; the {other} backend's {family} rules were not checked for a copy of the capture"
                ));
                continue;
            }
        };
        let text = rules::render_cleanup(&before);
        if action == Action::Install {
            if text.is_none() {
                continue;
            }
            notes.push(format!(
                "the {other} backend's {family} nat table holds a copy of the capture ({}); it is removed once the {mode} rules are in place",
                before.leftovers().join(", ")
            ));
        }
        steps.push(Step {
            mode: other,
            family,
            change: Change::Remove,
            tools: Some(tools),
            before,
            text,
        });
    }
    Ok(Plan {
        mode,
        action,
        steps,
        notes,
    })
}

/// The mode to use and, for `auto`, why. Unreadable state (missing tools, no
/// permission) counts as empty: the plan reports those errors properly.
fn resolve(runner: &dyn Runner, choice: BackendChoice, families: &[Family]) -> (Mode, String) {
    let holdings = |mode| {
        let mut total = Holdings::default();
        for family in families {
            let Ok(out) = runner
                .locate(mode, *family)
                .map_err(drop)
                .and_then(|tools| runner.save(&tools).map_err(drop))
            else {
                continue;
            };
            let h = Holdings::of(&out);
            total.ours |= h.ours;
            total.rules += h.rules;
        }
        total
    };
    match choice {
        BackendChoice::Nft => (Mode::Nft, "chosen by --backend".to_owned()),
        BackendChoice::Legacy => (Mode::Legacy, "chosen by --backend".to_owned()),
        BackendChoice::Auto => backend::auto(holdings(Mode::Nft), holdings(Mode::Legacy)),
    }
}

/// [`execute_with`] the system's tools.
pub fn execute(plan: &Plan) -> Result<(), ApplyError> {
    execute_with(&System, plan)
}

/// Applies a plan made without `lenient`: checks every install input with `--test`
/// and applies each family in one transaction; then runs every removal, each tried
/// even when another failed, and reads each table a removal was meant for again.
pub fn execute_with(runner: &dyn Runner, plan: &Plan) -> Result<(), ApplyError> {
    install(runner, plan)?;
    let removals: Vec<(&Step, &Tools)> = plan
        .steps
        .iter()
        .filter(|s| s.change == Change::Remove)
        .filter_map(|s| Some((s, s.tools.as_ref()?)))
        .collect();
    let mut failed = None;
    for (step, tools) in &removals {
        if let Some(text) = &step.text
            && let Err(e) = runner.restore(tools, text, false)
        {
            failed.get_or_insert(e);
        }
    }
    // What a removal achieved is read back, not assumed: a tool can report success
    // and change nothing.
    let mut remains = Vec::new();
    for (step, tools) in &removals {
        let leftovers = save_nat_with(runner, tools)?.leftovers();
        if !leftovers.is_empty() {
            remains.push(Remnant {
                mode: step.mode,
                family: step.family,
                leftovers,
            });
        }
    }
    match (remains.is_empty(), failed) {
        (true, None) => Ok(()),
        (true, Some(e)) => Err(e),
        (false, failed) => Err(ApplyError::Remains {
            remains: Remnants(remains),
            source: failed.map(Box::new),
        }),
    }
}

/// The install steps of a plan, all or nothing across families.
fn install(runner: &dyn Runner, plan: &Plan) -> Result<(), ApplyError> {
    let runnable: Vec<(&Step, &Tools, &str)> = plan
        .steps
        .iter()
        .filter(|s| s.change == Change::Install)
        .filter_map(|s| Some((s, s.tools.as_ref()?, s.text.as_deref()?)))
        .collect();
    for (_, tools, text) in &runnable {
        runner.restore(tools, text, true)?;
    }
    let mut applied: Vec<(&Step, &Tools)> = Vec::new();
    for (step, tools, text) in &runnable {
        if let Err(e) = runner.restore(tools, text, false) {
            let Some((done, done_tools)) = applied.first() else {
                return Err(e);
            };
            let what = if done.before.holds_our_chains() {
                "the earlier family keeps the new rules; fix the cause and run again"
            } else {
                match save_nat_with(runner, done_tools)
                    .ok()
                    .and_then(|now| rules::render_cleanup(&now))
                    .map(|undo| runner.restore(done_tools, &undo, false))
                {
                    Some(Ok(())) | None => "the earlier family's rules were removed again",
                    Some(Err(_)) => "removing the earlier family's rules failed too",
                }
            };
            return Err(ApplyError::Partial {
                applied: done.family,
                failed: step.family,
                what,
                source: Box::new(e),
            });
        }
        applied.push((step, tools));
    }
    Ok(())
}

/// Reads the `nat` table through `tools.save`, creating no table.
pub fn save_nat(tools: &Tools) -> Result<NatState, ApplyError> {
    save_nat_with(&System, tools)
}

/// Reads the `nat` table through `runner`.
pub fn save_nat_with(runner: &dyn Runner, tools: &Tools) -> Result<NatState, ApplyError> {
    Ok(NatState::parse(&runner.save(tools)?))
}

/// Feeds `text` to `tools.restore --noflush` as one transaction; with `test_only`
/// the tool only checks it (`--test`) and changes nothing.
pub fn run_restore(tools: &Tools, text: &str, test_only: bool) -> Result<(), ApplyError> {
    System.restore(tools, text, test_only)
}

fn check(
    program: &std::path::Path,
    status: std::process::ExitStatus,
    stderr: &[u8],
) -> Result<(), ApplyError> {
    if status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(stderr).trim().replace('\n', "; ");
    let denied = [
        "Permission denied",
        "you must be root",
        "Operation not permitted",
    ]
    .iter()
    .any(|m| stderr.contains(m));
    Err(if denied {
        ApplyError::PermissionDenied {
            program: program.to_path_buf(),
            stderr,
        }
    } else {
        ApplyError::Failed {
            program: program.to_path_buf(),
            status,
            stderr,
        }
    })
}
