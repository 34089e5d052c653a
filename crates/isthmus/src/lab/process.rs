//! The lab's processes: how proxies and containers are started, their output
//! streamed with a `[cluster/pod/container]` prefix, their admin endpoints
//! queried, and packet captures started and stopped.
//!
//! What runs where, and when, is [`super::run`]'s decision; namespaces are
//! [`super::net`]'s, on [`isthmus_netns`].

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_netns::Namespace;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::plan::{ADMIN_PORT, PodPlan};
use super::summary;

/// Where a proxy discovers services.
#[derive(Debug, Clone, Copy)]
pub enum Discovery<'a> {
    /// A mounted directory (a sidecar's projected ConfigMap).
    Dir(&'a Path),
    /// The API server of this kubeconfig (`--discovery kube`, a gateway).
    Kube(&'a Path),
}

/// `proxy` (a command that runs `isthmus-proxy`, such as
/// [`super::net::Net::command_as`] gives) with `<role>` and the flags every lab
/// proxy gets; nothing from the caller's environment (an `ISTHMUS_*` there must
/// not reconfigure the lab).
pub fn proxy_command(
    mut proxy: tokio::process::Command,
    role: &str,
    cluster: &str,
    identity: &Path,
    discovery: Discovery<'_>,
    log: &str,
) -> tokio::process::Command {
    let cmd = &mut proxy;
    cmd.env_clear()
        .arg(role)
        .args(["--cluster", cluster])
        .arg("--identity-dir")
        .arg(identity);
    match discovery {
        Discovery::Dir(dir) => cmd.arg("--manifests").arg(dir),
        Discovery::Kube(kubeconfig) => cmd
            .args(["--discovery", "kube"])
            .env("KUBECONFIG", kubeconfig),
    };
    cmd.args(["--admin-addr", &format!("0.0.0.0:{ADMIN_PORT}")])
        .args(["--log", log])
        .args(["--shutdown-grace", "1s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    proxy
}

/// The environment a container sees: the host's `PATH`, `HOME=/root`, the pod's
/// `HOSTNAME`, then its own `env`.
pub fn container_env(cmd: &mut tokio::process::Command, pod: &PodPlan, env: &[(String, String)]) {
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("HOME", "/root")
        .env("HOSTNAME", &pod.name);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Its own process group, so stopping it also stops what its shell started.
    cmd.process_group(0);
}

/// Starts `cmd` with its output piped (for [`print_lines`]); killed if dropped.
pub fn spawn(mut cmd: tokio::process::Command) -> Result<tokio::process::Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))
}

/// Set once the summary is out: what processes say while being torn down (peers
/// going away) would only bury it.
pub static QUIET: AtomicBool = AtomicBool::new(false);

/// Prints each line of `stream` as `[label] line`, until it ends.
pub async fn print_lines(stream: impl AsyncRead + Unpin, label: String) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if !QUIET.load(Ordering::Relaxed) {
            println!("[{label}] {line}");
        }
    }
}

/// An exit status for messages: `exit status: 3`, `signal: 9 (SIGKILL)`.
pub fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("could not wait for it: {e}"),
    }
}

/// Why the proxy in `ns` is not ready yet: `/ready` fails, or a link to one of
/// `links` is not up (its `gateway_link_up` gauge); `None` when ready.
pub async fn not_ready(ns: &Namespace, links: &[String]) -> Option<String> {
    if let Err(e) = admin_get(ns, "/ready").await {
        return Some(format!("/ready: {e}"));
    }
    if links.is_empty() {
        return None;
    }
    let metrics = match admin_get(ns, "/metrics").await {
        Ok(text) => summary::parse(&text),
        Err(e) => return Some(format!("/metrics: {e}")),
    };
    let down: Vec<&str> = links
        .iter()
        .filter(|l| summary::sum(&metrics, "gateway_link_up", &[("cluster", l)]) < 1.0)
        .map(String::as_str)
        .collect();
    (!down.is_empty()).then(|| format!("link to {} not up", down.join(", ")))
}

/// GET `path` from the admin server of the proxy in `ns`.
pub async fn admin_get(ns: &Namespace, path: &str) -> Result<String, String> {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "curl",
            "-sS",
            "--fail",
            "-m",
            "2",
        ])
        .arg(format!("http://127.0.0.1:{ADMIN_PORT}{path}"))
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running curl in {ns}: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `root` and every directory below it.
pub fn walk_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = std::fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Starts tcpdump on `iface` of the lab namespace, writing every packet to
/// `file` as it comes; returns it once it has written the pcap header.
pub fn start_capture(lab_ns: &Namespace, iface: &str, file: &Path) -> Result<std::process::Child> {
    let _ = std::fs::remove_file(file);
    let mut cmd = lab_ns.command("tcpdump");
    cmd.args(["-i", iface, "-U", "-s", "0", "-w"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    for _ in 0..100 {
        if std::fs::metadata(file).is_ok_and(|m| m.len() > 0) {
            // Its stderr stays open but unread: tcpdump writes a few lines there,
            // at the start and the end, which the pipe holds.
            return Ok(child);
        }
        if child.try_wait().ok().flatten().is_some() {
            let out = child.wait_with_output()?;
            bail!(
                "tcpdump could not capture {iface} into {} ({}): {}",
                file.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    bail!(
        "tcpdump did not start writing {} within 5 s",
        file.display()
    )
}

/// SIGTERM to tcpdump so it writes its last packets, and a bounded wait for it
/// (SIGKILL after 2 s).
pub async fn stop_capture(mut child: std::process::Child) {
    let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    for _ in 0..40 {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}
