//! One network namespace: commands, closures and processes inside it, its
//! addresses, routes, hosts file and diagnostics.

use std::ffi::OsStr;
use std::fs::File;
use std::net::IpAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sched::{CloneFlags, setns};

use crate::command::{run_checked, spawn_when_not_busy};
use crate::{Error, Result, allowed};

/// Where `ip netns add` puts the handle of a namespace.
pub(crate) const NETNS_DIR: &str = "/var/run/netns";
/// Where `ip netns exec` finds a namespace's own `/etc` files (hosts).
pub(crate) const ETC_NETNS: &str = "/etc/netns";

/// A handle to one namespace; the [`crate::Net`] that made it deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace {
    name: String,
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl AsRef<str> for Namespace {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl Namespace {
    /// A handle to the existing namespace `name` (nothing is created).
    pub fn named(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's handle file, for `setns`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip netns exec <ns> <program>`, ready for arguments.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args...` in the namespace; its stdout, or an error naming the
    /// command, status and stderr.
    pub fn exec<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Result<String> {
        let out = run_checked(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a new thread inside the namespace and returns its result; a
    /// panic in `f` is passed on.
    pub fn try_run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns {}", self.name))
                .spawn_scoped(scope, || {
                    let file = File::open(&path).map_err(|source| Error::File {
                        what: "opening namespace handle",
                        path: path.clone(),
                        source,
                    })?;
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
                        path: path.clone(),
                        source,
                    })?;
                    Ok(f())
                })
                .map_err(|source| Error::Thread {
                    namespace: self.name.clone(),
                    source,
                })?;
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// [`Namespace::try_run`] for a namespace that exists for sure (its
    /// [`crate::Net`] is alive).
    ///
    /// # Panics
    ///
    /// If the namespace cannot be entered, or `f` panics.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.try_run(f)
            .unwrap_or_else(|e| panic!("running in namespace {}: {e}", self.name))
    }

    /// Starts `cmd` inside the namespace as `uid`/`gid` (supplementary groups
    /// dropped), stdout and stderr piped. The program must be executable by that
    /// UID. Give the child to [`crate::Net::adopt`] if it may outlive its caller's
    /// own wait.
    pub fn spawn_as(&self, mut cmd: Command, uid: u32, gid: u32) -> std::io::Result<Child> {
        cmd.uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.spawn_in(cmd)
    }

    /// Like [`Namespace::spawn_as`], but stdout and stderr go to `log` (created or
    /// truncated by this process): a long-running server that logs into a pipe
    /// nobody drains would block once the pipe is full.
    pub fn spawn_logged_as(
        &self,
        mut cmd: Command,
        uid: u32,
        gid: u32,
        log: &Path,
    ) -> std::io::Result<Child> {
        let file = File::create(log)?;
        cmd.uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        self.spawn_in(cmd)
    }

    fn spawn_in(&self, mut cmd: Command) -> std::io::Result<Child> {
        self.try_run(move || spawn_when_not_busy(&mut cmd))
            .map_err(std::io::Error::other)?
    }

    /// Adds `addr` (`198.18.0.1/24`, `2001:2::1/64`) to `iface`; IPv6 addresses
    /// skip duplicate address detection so they are usable at once.
    pub fn add_addr(&self, iface: &str, addr: &str) -> Result<()> {
        let ip = parse_ip(addr)?;
        if !allowed(ip) {
            return Err(Error::OutsideRange {
                addr: addr.to_owned(),
            });
        }
        let mut args = vec!["addr", "add", addr, "dev", iface];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        self.exec("ip", &args).map(drop)
    }

    /// Routes `dst` via `gateway`, both in the allowed ranges; never a default
    /// route.
    pub fn add_route(&self, dst: &str, gateway: &str) -> Result<()> {
        self.check_route(dst)?;
        let via = parse_ip(gateway)?;
        if !allowed(via) {
            return Err(Error::OutsideRange {
                addr: gateway.to_owned(),
            });
        }
        self.exec("ip", &["route", "add", dst, "via", gateway])
            .map(drop)
    }

    /// Routes `dst` (in the allowed ranges) out of `iface` with no gateway: for
    /// addresses that only exist behind a NAT rule, so that `connect()` can pick a
    /// source address before the rule rewrites the destination.
    pub fn add_device_route(&self, dst: &str, iface: &str) -> Result<()> {
        self.check_route(dst)?;
        self.exec("ip", &["route", "add", dst, "dev", iface])
            .map(drop)
    }

    fn check_route(&self, dst: &str) -> Result<()> {
        let net = parse_ip(dst).map_err(|_| Error::DefaultRoute {
            namespace: self.name.clone(),
            dst: dst.to_owned(),
        })?;
        if !allowed(net) {
            return Err(Error::OutsideRange {
                addr: dst.to_owned(),
            });
        }
        Ok(())
    }

    /// Sets sysctls (`net.ipv4.tcp_tw_reuse=1`) of this namespace.
    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        let mut args = vec!["-q", "-w"];
        args.extend_from_slice(settings);
        self.exec("sysctl", &args).map(drop)
    }

    /// Writes the hosts file `ip netns exec` mounts over `/etc/hosts` here, and a
    /// `resolv.conf` whose only nameserver is the namespace's own loopback: names
    /// outside the hosts file fail at once, and no lookup is ever addressed to the
    /// host's resolvers, whatever the routes. Both go with the namespace.
    pub fn write_hosts(&self, text: &str) -> Result<()> {
        let dir = Path::new(ETC_NETNS).join(&self.name);
        let file = |what, path: PathBuf| move |source| Error::File { what, path, source };
        std::fs::create_dir_all(&dir).map_err(file("creating", dir.clone()))?;
        std::fs::write(dir.join("hosts"), text).map_err(file("writing", dir.join("hosts")))?;
        std::fs::write(
            dir.join("resolv.conf"),
            "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n",
        )
        .map_err(file("writing", dir.join("resolv.conf")))
    }

    /// The pids of the processes in this namespace.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Addresses, routes and `iptables-save` (nft and legacy, IPv4 and IPv6) of
    /// this namespace, for failure reports.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("===== namespace {} =====\n", self.name);
        for (program, args) in [
            ("ip", &["addr"][..]),
            ("ip", &["route"][..]),
            ("ip", &["-6", "route"][..]),
            ("iptables-nft-save", &[][..]),
            ("iptables-legacy-save", &[][..]),
            ("ip6tables-nft-save", &[][..]),
            ("ip6tables-legacy-save", &[][..]),
        ] {
            out.push_str(&format!("--- {program} {}\n", args.join(" ")));
            match self
                .command(program)
                .args(args)
                .stdin(Stdio::null())
                .output()
            {
                Ok(o) => {
                    out.push_str(&String::from_utf8_lossy(&o.stdout));
                    out.push_str(&String::from_utf8_lossy(&o.stderr));
                }
                Err(e) => out.push_str(&format!("(could not run: {e})\n")),
            }
        }
        out
    }
}

/// The address of `text` (`198.18.0.1`, `198.18.0.0/24`, `2001:2::1/64`).
fn parse_ip(text: &str) -> Result<IpAddr> {
    text.split('/')
        .next()
        .unwrap_or(text)
        .parse()
        .map_err(|_| Error::BadAddress {
            text: text.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_routes_outside_the_ranges_are_refused_before_any_command() {
        // A namespace that does not exist: a check that ran `ip` would fail
        // differently.
        let ns = Namespace::named("isthmus-netns-absent");
        for addr in ["10.0.0.1/24", "127.0.0.2/8", "2001:db8::1/64"] {
            let err = ns.add_addr("eth0", addr).expect_err(addr);
            assert!(matches!(err, Error::OutsideRange { .. }), "{addr}: {err}");
        }
        for dst in ["default", "0.0.0.0/0", "::/0"] {
            let err = ns.add_route(dst, "198.18.0.1").expect_err(dst);
            assert!(
                matches!(err, Error::DefaultRoute { .. } | Error::OutsideRange { .. }),
                "{dst}: {err}"
            );
        }
        let err = ns
            .add_route("198.19.0.0/16", "10.0.0.1")
            .expect_err("gateway outside");
        assert!(matches!(err, Error::OutsideRange { .. }), "{err}");
        let err = ns.add_addr("eth0", "not-an-address").expect_err("garbage");
        assert!(matches!(err, Error::BadAddress { .. }), "{err}");
    }
}
