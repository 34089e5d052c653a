//! One `isthmus-proxy` process on loopback, as the suites of the proxy crate run it:
//! a command line built flag by flag, started with a clean environment and its
//! stderr in a log file, waited for on `/ready`, read through `/config` and
//! `/metrics`, stopped by SIGTERM or killed, and started again on the same log.
//!
//! The binary's path comes from the caller (`env!("CARGO_BIN_EXE_isthmus-proxy")`),
//! which only the proxy crate's tests know.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::STEP;
use crate::eventually::{POLL, eventually, eventually_blocking};

/// One `isthmus-proxy` process: killed when dropped, its log printed when the test
/// is failing.
pub struct Proxy {
    /// What the log and the failures call it (`gateway-cluster-a`).
    pub name: String,
    program: PathBuf,
    args: Vec<OsString>,
    child: Option<Child>,
    /// Its stderr; kept across restarts.
    pub log: PathBuf,
    /// Its admin server, from `--admin-addr`.
    pub admin: SocketAddr,
}

impl Proxy {
    /// A proxy not started yet: `program <role> --cluster <cluster> --identity-dir
    /// <identity> --manifests <manifests> --admin-addr <admin>`, logging to `log`.
    /// More flags follow with [`Proxy::arg`]; [`Proxy::start`] runs it.
    pub fn command(
        program: impl AsRef<Path>,
        role: &str,
        cluster: &str,
        identity: &Path,
        manifests: &Path,
        admin: SocketAddr,
        log: PathBuf,
    ) -> Proxy {
        Proxy {
            name: format!("{role}-{cluster}"),
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            child: None,
            log,
            admin,
        }
        .arg(role)
        .args(["--cluster", cluster])
        .arg("--identity-dir")
        .arg(identity)
        .arg("--manifests")
        .arg(manifests)
        .args(["--admin-addr", &admin.to_string()])
    }

    /// Appends one flag or value.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Proxy {
        self.args.push(arg.into());
        self
    }

    /// Appends flags and values.
    pub fn args<A: Into<OsString>>(mut self, args: impl IntoIterator<Item = A>) -> Proxy {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Renames it in logs and failures.
    pub fn named(mut self, name: impl Into<String>) -> Proxy {
        self.name = name.into();
        self
    }

    /// Starts the process; only its flags configure it (the environment is cleared).
    pub fn start(mut self) -> Proxy {
        self.restart();
        self
    }

    /// Starts the process again after [`Proxy::kill`] or an exit, appending to its
    /// log.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        let child = Command::new(&self.program)
            .args(&self.args)
            .env_clear()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} ({}): {e}", self.name, self.program.display()));
        self.child = Some(child);
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
            .id()
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends SIGTERM, as a kubelet stopping the pod would.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("running kill: {e}"));
        assert!(status.success(), "kill -TERM {}", self.name);
    }

    /// Kills and reaps the process, if it runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test at once when the process has exited (a bad flag or manifest).
    fn assert_alive(&mut self) {
        let exited = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            panic!("{} exited: {status}\n{}", self.name, self.log_text());
        }
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            self.assert_alive();
            if http_get(self.admin, "/ready").await == "ready\n" {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never became ready",
                self.name
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// [`Proxy::wait_ready`] for tests on plain threads.
    pub fn wait_ready_blocking(&mut self) {
        let deadline = std::time::Instant::now() + STEP;
        loop {
            self.assert_alive();
            if get_blocking(self.admin, "/ready").is_ok_and(|(status, _)| status == 200) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never became ready",
                self.name
            );
            std::thread::sleep(POLL);
        }
    }

    /// The process and its name, to wait for; fails the test if it was reaped already.
    fn running_child(&mut self) -> (String, &mut Child) {
        let name = self.name.clone();
        match self.child.as_mut() {
            Some(child) => (name, child),
            None => panic!("{name} is not running"),
        }
    }

    /// Waits at most `limit` for the process to exit by itself.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let (name, child) = self.running_child();
        let status = eventually(&format!("{name} to exit"), limit, || {
            std::future::ready(child.try_wait().ok().flatten())
        })
        .await;
        self.child = None;
        status
    }

    /// [`Proxy::wait_exit`] for tests on plain threads.
    pub fn wait_exit_blocking(&mut self, limit: Duration) -> ExitStatus {
        let (name, child) = self.running_child();
        let status = eventually_blocking(&format!("{name} to exit"), limit, || {
            child.try_wait().ok().flatten()
        });
        self.child = None;
        status
    }

    /// `/config`, parsed.
    pub async fn config(&self) -> serde_json::Value {
        let body = http_get(self.admin, "/config").await;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/config is not JSON ({e}): {body}"))
    }

    /// `/metrics`, as text (see [`crate::Metrics`]).
    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await
    }

    /// `/metrics` from a test on a plain thread; empty when the admin server does
    /// not answer.
    pub fn metrics_blocking(&self) -> String {
        get_blocking(self.admin, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log_text());
        }
    }
}

/// A plain HTTP/1.1 GET to an admin server (bounded by [`STEP`]): the body of a
/// 200, else `error: ...` with what came back.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = match tokio::time::timeout(STEP, exchange).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return format!("error: {e}"),
        Err(_) => panic!("GET {path} from {addr} hung"),
    };
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body.to_owned(),
        _ => format!("error: {response}"),
    }
}

/// A plain HTTP/1.1 GET from a plain thread (each read bounded by [`STEP`]): the
/// status and body, whatever the status.
pub fn get_blocking(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let response = get_raw_blocking(addr, path)?;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A plain HTTP/1.1 GET with `connection: close` from a plain thread (connect and
/// each read bounded by [`STEP`]): the whole response as text.
pub fn get_raw_blocking(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, STEP)?;
    stream.set_read_timeout(Some(STEP))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// A port nobody listens on at `ip` right now.
pub fn free_addr(ip: impl Into<std::net::IpAddr>) -> SocketAddr {
    std::net::TcpListener::bind((ip.into(), 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("binding a free port: {e}"))
}
