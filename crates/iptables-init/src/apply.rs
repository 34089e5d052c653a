//! Running `*-save` and `*-restore`: reading what the `nat` table holds, installing
//! the rendered rules, and cleaning up.
//!
//! Each family's change is one `iptables-restore --noflush` transaction: the kernel
//! gets the whole new rule set or none of it, so a failure part-way leaves the rules
//! that were there before. IPv4 and IPv6 are two transactions; to keep them from
//! diverging, both inputs are checked with `--test` before either is applied, and if
//! IPv6 still fails after IPv4 went in on a namespace that had none of our rules, the
//! IPv4 rules are removed again.
//!
//! What the rules are is [`crate::rules`]; which tools run is [`crate::backend`].

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::backend::{self, BackendError, Mode, Tools};
use crate::config::{Config, Family};
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
}

/// One family's part of a run: its tools, the state read before, and the restore
/// input (`None` when there is nothing to change).
#[derive(Debug, Clone)]
pub struct Step {
    pub family: Family,
    /// `None` only in a lenient (dry-run) plan whose tools are missing.
    pub tools: Option<Tools>,
    /// What the `nat` table held when the plan was made.
    pub before: NatState,
    pub text: Option<String>,
}

impl Step {
    /// The restore tool's file name, for headers and messages.
    pub fn restore_name(&self, mode: Mode) -> String {
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
                format!("{program}-{mode}-restore")
            }
        }
    }
}

/// What a run will do, per family, before it does it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub steps: Vec<Step>,
    /// Things the user should know (why a mode was chosen, state that could not be
    /// read in a dry run).
    pub notes: Vec<String>,
}

/// Whether a run installs the capture or removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Install,
    Cleanup,
}

/// Reads the current state and renders what `action` needs, for every family of
/// `config`. With `lenient` (dry runs), missing tools and unreadable state are notes
/// and count as empty, so the rules can be shown on a machine that cannot apply them.
///
/// A cleanup also looks at IPv6 without `--ipv6`, so a capture installed with it is
/// not left behind; IPv6 is then skipped quietly if its tools are missing.
pub fn plan(config: &Config, action: Action, lenient: bool) -> Result<Plan, ApplyError> {
    let extra_v6 = action == Action::Cleanup && !config.ipv6;
    let families = if extra_v6 {
        vec![Family::V4, Family::V6]
    } else {
        config.families()
    };
    let (mode, why) = backend::resolve(config.backend, &families);
    let mut notes = vec![format!("backend {mode} ({why})")];
    let mut steps = Vec::new();
    for family in families {
        let tools = match backend::locate(mode, family) {
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
            Some(tools) => match save_nat(tools) {
                Ok(state) => state,
                Err(e) if lenient => {
                    notes.push(format!("{e}; assuming an empty {family} nat table"));
                    NatState::default()
                }
                Err(e) => return Err(e),
            },
        };
        let text = match action {
            Action::Install => Some(rules::render_install(config, family, &before)),
            Action::Cleanup => rules::render_cleanup(&before),
        };
        steps.push(Step {
            family,
            tools,
            before,
            text,
        });
    }
    Ok(Plan { mode, steps, notes })
}

/// Applies a plan made without `lenient`: checks every input with `--test`, then
/// applies each family in one transaction.
pub fn execute(plan: &Plan) -> Result<(), ApplyError> {
    let runnable: Vec<(&Step, &Tools, &str)> = plan
        .steps
        .iter()
        .filter_map(|s| Some((s, s.tools.as_ref()?, s.text.as_deref()?)))
        .collect();
    for (_, tools, text) in &runnable {
        run_restore(tools, text, true)?;
    }
    let mut applied: Vec<(&Step, &Tools)> = Vec::new();
    for (step, tools, text) in &runnable {
        if let Err(e) = run_restore(tools, text, false) {
            let Some((done, done_tools)) = applied.first() else {
                return Err(e);
            };
            let what = if done.before.holds_our_chains() {
                "the earlier family keeps the new rules; fix the cause and run again"
            } else {
                match save_nat(done_tools)
                    .ok()
                    .and_then(|now| rules::render_cleanup(&now))
                    .map(|undo| run_restore(done_tools, &undo, false))
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

/// Reads the `nat` table through `tools.save`.
pub fn save_nat(tools: &Tools) -> Result<NatState, ApplyError> {
    let out = Command::new(&tools.save)
        .args(["-t", "nat"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ApplyError::Spawn {
            program: tools.save.clone(),
            source,
        })?;
    check(&tools.save, out.status, &out.stderr)?;
    Ok(NatState::parse(&String::from_utf8_lossy(&out.stdout)))
}

/// Feeds `text` to `tools.restore --noflush` as one transaction; with `test_only`
/// the tool only checks it (`--test`) and changes nothing.
pub fn run_restore(tools: &Tools, text: &str, test_only: bool) -> Result<(), ApplyError> {
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
