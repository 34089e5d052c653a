//! Running the programs that build namespaces (`ip`, `sysctl`, `iptables-restore`),
//! each bounded, each failure naming the command line, status and output.

use std::io::Write as _;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How long a program that was just written may stay "busy" (`ETXTBSY`).
const BUSY_FOR: Duration = Duration::from_secs(5);

fn failed(cmd: &Command, out: &Output) -> Error {
    Error::Failed {
        command: format!("{cmd:?}"),
        status: out.status,
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
    }
}

/// Runs `cmd` with no input; its output, or an error naming the command line,
/// exit status and stderr unless it succeeds.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            command: format!("{cmd:?}"),
            source,
        })?;
    if !out.status.success() {
        return Err(failed(cmd, &out));
    }
    Ok(out)
}

/// Writes `text` to the stdin of `cmd` and waits for it to succeed; a failure
/// quotes the input (a ruleset `iptables-restore` refused, say).
pub fn run_with_input(cmd: &mut Command, text: &str) -> Result<()> {
    let spawn_error = |cmd: &Command, source| Error::Spawn {
        command: format!("{cmd:?}"),
        source,
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(cmd, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        // Dropped at the end of the block: the program sees the end of its input.
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| spawn_error(cmd, e))?;
    }
    let out = child.wait_with_output().map_err(|e| spawn_error(cmd, e))?;
    if !out.status.success() {
        let mut error = failed(cmd, &out);
        if let Error::Failed { output, .. } = &mut error {
            output.push_str("\ninput was:\n");
            output.push_str(text);
        }
        return Err(error);
    }
    Ok(())
}

/// Waits for `child` to exit for at most `timeout`, killing it after that.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Result<Output> {
    let command = format!("process {}", child.id());
    let io = |source| Error::Spawn {
        command: command.clone(),
        source,
    };
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().map_err(io)?.is_some() {
            return child.wait_with_output().map_err(io);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().map_err(io)?;
            return Err(Error::Timeout {
                command,
                timeout,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Spawns `cmd`, retrying for a while on `ETXTBSY`. A program that was just
/// copied can be briefly "busy": a fork on another thread between the copy's
/// open and close keeps a writable descriptor of it until that child execs.
pub fn spawn_when_not_busy(cmd: &mut Command) -> std::io::Result<Child> {
    let deadline = Instant::now() + BUSY_FOR;
    loop {
        match cmd.spawn() {
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_command_and_its_output() {
        let err = run_checked(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .expect_err("exit 3 is a failure");
        let text = err.to_string();
        assert!(text.contains("\"sh\""), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("oops"), "{text}");
        let out = run_checked(Command::new("sh").args(["-c", "echo fine"])).expect("exit 0");
        assert_eq!(out.stdout, b"fine\n");
    }

    #[test]
    fn input_reaches_the_program_and_failures_quote_it() {
        run_with_input(Command::new("grep").arg("-q").arg("rule"), "a rule\n")
            .expect("grep finds its input");
        let err = run_with_input(Command::new("grep").arg("-q").arg("absent"), "a rule\n")
            .expect_err("grep fails without a match");
        assert!(err.to_string().contains("input was:\na rule"), "{err}");
    }

    #[test]
    fn a_slow_process_is_killed_at_the_deadline() {
        let child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sleep starts");
        let started = Instant::now();
        let err = wait_with_timeout(child, Duration::from_millis(100)).expect_err("killed");
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
