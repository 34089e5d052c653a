//! Network namespaces for tests: [`isthmus_netns`], the workspace's one namespace
//! library, with the conventions of a test.
//!
//! A [`Lab`] owns everything a test creates: namespaces, the veth pairs and bridges
//! inside them, and child processes. Names share a per-process prefix,
//! `ist<pid in hex>`. Dropping the lab kills its children, stops whatever else runs
//! in its namespaces and deletes them, which takes every link inside along; when the
//! drop happens during a panic it first prints `iptables-save` (nft and legacy, IPv4
//! and IPv6) and `ip addr` of each namespace. The first lab of a process also sweeps
//! namespaces left by dead runs: names of this prefix whose pid no longer exists.
//!
//! Code of the test process runs in a namespace on a thread of its own
//! ([`Namespace::run`]): sockets keep the namespace they were created in, so a
//! listener or stream made there can be used from any thread afterwards. A process
//! forked from such a thread starts in the namespace too, which is how
//! [`Namespace::spawn_as`] starts a process under another UID (an owner match in
//! iptables sees processes, and glibc keeps every thread of one process at the same
//! UID, so a thread of the test cannot be "the proxy").
//!
//! Addresses are checked to come from 198.18.0.0/15 or 2001:2::/48, and nothing here
//! adds a default route or NAT.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

pub use isthmus_netns::{Namespace, run_checked, wait_with_timeout};
use isthmus_netns::{Net, Options};

/// Every name this harness creates starts with this.
const TAG: &str = "ist";

static NAMESPACES: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

const HOW_TO_RUN: &str = "the end-to-end tests create network namespaces and program iptables, \
     so they must run as root: `sudo -E cargo test --workspace` (or as root: `cargo test --workspace`)";

/// Owns the namespaces, links and processes of one test; cleans up on drop.
pub struct Lab {
    net: Net,
}

impl Lab {
    /// A new, empty lab.
    ///
    /// # Panics
    ///
    /// If the test does not run as root, saying how to run it.
    pub fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "not running as root: {HOW_TO_RUN}"
        );
        SWEEP.call_once(|| {
            for run in isthmus_netns::sweep(TAG, None, false, |_| true).removed {
                eprintln!("netns: removed {run}, left by a dead run");
            }
        });
        let options = Options {
            diagnose_on_panic: true,
            ..Options::new(TAG)
        };
        let net = Net::create(options)
            .unwrap_or_else(|e| panic!("cannot start a namespace lab: {e}\n{HOW_TO_RUN}"));
        Self { net }
    }

    /// A new namespace with `lo` up and nothing else.
    ///
    /// # Panics
    ///
    /// If `ip netns add` fails, with its message and how to run the tests.
    pub fn namespace(&self) -> Namespace {
        let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
        self.net
            .namespace(&format!("{n:x}"))
            .unwrap_or_else(|e| panic!("cannot create a network namespace: {e}\n{HOW_TO_RUN}"))
    }

    /// A veth pair with one end in `a` and the other in `b`, both up; returns the
    /// interface names (in `a`, in `b`). Deleted with the namespaces.
    pub fn veth(&self, a: &Namespace, b: &Namespace) -> anyhow::Result<(String, String)> {
        Ok(self.net.veth(a, b)?)
    }

    /// Two new namespaces joined by a veth pair, the topology every suite starts
    /// from: the first (the pod) is 198.18.0.2/24, the second (what it talks to)
    /// 198.18.0.1/24, and with `ipv6` also 2001:2::2/64 and 2001:2::1/64. Addresses
    /// beyond these go on the returned interfaces.
    ///
    /// # Panics
    ///
    /// If a namespace, the link or an address cannot be made.
    pub fn pair(&self, ipv6: bool) -> Pair {
        let pod = self.namespace();
        let server = self.namespace();
        let (pod_if, server_if) = self
            .net
            .veth(&pod, &server)
            .unwrap_or_else(|e| panic!("cannot join two namespaces: {e}"));
        let mut addrs = vec![
            (&pod, &pod_if, "198.18.0.2/24"),
            (&server, &server_if, "198.18.0.1/24"),
        ];
        if ipv6 {
            addrs.push((&pod, &pod_if, "2001:2::2/64"));
            addrs.push((&server, &server_if, "2001:2::1/64"));
        }
        for (ns, iface, addr) in addrs {
            ns.add_addr(iface, addr)
                .unwrap_or_else(|e| panic!("cannot add {addr} to {iface}: {e}"));
        }
        Pair {
            pod,
            server,
            pod_if,
            server_if,
        }
    }

    /// A bridge inside `ns`, up; attach pods to it with [`Lab::attach`].
    pub fn bridge(&self, ns: &Namespace) -> anyhow::Result<String> {
        Ok(self.net.bridge(ns)?)
    }

    /// Connects `pod` to `bridge` (in `bridge_ns`) with a veth pair; returns the
    /// pod's interface name.
    pub fn attach(
        &self,
        bridge_ns: &Namespace,
        bridge: &str,
        pod: &Namespace,
    ) -> anyhow::Result<String> {
        Ok(self.net.attach(bridge_ns, bridge, pod, None)?)
    }

    /// Takes ownership of a child process: it is killed when the lab drops.
    pub fn adopt(&self, child: Child) {
        self.net.adopt(child);
    }

    /// Starts `cmd` (a [`Namespace::command`]) with an empty environment, no input
    /// and its stderr in `log`, and adopts it: it is killed when the lab drops.
    ///
    /// # Panics
    ///
    /// If `log` cannot be created or the program not started.
    pub fn spawn_logged(&self, cmd: &mut Command, log: &Path) {
        let file = File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let child = cmd
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        self.adopt(child);
    }

    /// Diagnostics of every namespace of the lab.
    pub fn diagnostics(&self) -> String {
        self.net.diagnostics()
    }
}

/// The address family a test runs in: the suites run most checks once for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fam {
    V4,
    V6,
}

impl Fam {
    /// The pod's address from [`Lab::pair`]: 198.18.0.2 or 2001:2::2.
    pub fn pod_ip(self) -> IpAddr {
        match self {
            Fam::V4 => Ipv4Addr::new(198, 18, 0, 2).into(),
            Fam::V6 => Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2).into(),
        }
    }

    /// The server's address from [`Lab::pair`]: 198.18.0.1 or 2001:2::1.
    pub fn server_ip(self) -> IpAddr {
        match self {
            Fam::V4 => Ipv4Addr::new(198, 18, 0, 1).into(),
            Fam::V6 => Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1).into(),
        }
    }

    /// The unspecified address, where a listener takes every address of a pod.
    pub fn any(self) -> IpAddr {
        match self {
            Fam::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Fam::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    /// The loopback address.
    pub fn loopback(self) -> IpAddr {
        match self {
            Fam::V4 => Ipv4Addr::LOCALHOST.into(),
            Fam::V6 => Ipv6Addr::LOCALHOST.into(),
        }
    }

    /// The source a sidecar binds when it delivers inbound traffic to its app
    /// (127.0.0.6 and ::6, which `isthmus-init --ipv6` puts on `lo`).
    pub fn inbound_source(self) -> IpAddr {
        match self {
            Fam::V4 => Ipv4Addr::new(127, 0, 0, 6).into(),
            Fam::V6 => Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6).into(),
        }
    }
}

/// Two namespaces of a [`Lab`] joined by a veth pair ([`Lab::pair`]).
pub struct Pair {
    /// 198.18.0.2 (and 2001:2::2).
    pub pod: Namespace,
    /// 198.18.0.1 (and 2001:2::1).
    pub server: Namespace,
    pub pod_if: String,
    pub server_if: String,
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}
