//! `isthmus lab up`: mints the identities, builds the topology, brings up each
//! cluster's control plane ([`control`]: API server, `isthmus install`, the
//! controller, `isthmus link`), starts a gateway per cluster discovering through
//! its API server and, per pod, `isthmus-init`, the sidecar (UID 2102, reading
//! the controller's discovery ConfigMap projected into its volume) and the
//! containers; streams their output; ends on Ctrl-C, SIGTERM or `--duration`
//! with a summary read from the proxies; and removes everything it made.
//!
//! While the lab runs its node agents ([`kubelet`]) keep the API servers' Pods
//! and EndpointSlices in line with the pods (a pod whose containers have all
//! exited leaves its Services), and the pods' volumes, hosts files and
//! kube-proxy rules in line with the API servers; and they start and stop pods
//! as the Deployments' `replicas` and deleted Pods ask ([`replicas`]).
//!
//! An unmeshed pod (template annotation `isthmus.io/inject: disabled`) gets its
//! namespace, hosts file and kube-proxy rules, but neither `isthmus-init`, nor a
//! sidecar, nor an identity: its connections go straight to ClusterIPs, where a
//! mirrored Service (no local pods) answers with a reset, and meshed pods take
//! them as plain TCP.
//!
//! The decisions (addresses, manifests, rules) are [`super::plan`]'s; the
//! namespaces and the clean-up are [`super::net`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_vocab::SpiffeId;
use isthmus_vocab::ports::PROXY_UID;
use nix::sys::signal::{Signal as Sig, killpg};
use nix::unistd::{Gid, Pid, Uid, chown};
use proxy_discovery::ServiceRef;
use proxy_identity::mint::{self, KeyAlgorithm, Validity};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use isthmus_netns::Namespace;

use super::apiserver::ApiServer;
use super::net::Net;
use super::plan::{Plan, PodPlan, RELAY_PORT, TUNNEL_PORT, gateway_hosts_file};
use super::process::{
    Discovery, QUIET, admin_get, container_env, describe, not_ready, print_lines, proxy_command,
    spawn, start_capture, stop_capture, walk_dirs,
};
use super::project::mount_dir;
use super::spec::LabSpec;
use super::summary::{self, ProxyReport};
use super::{NEEDS_ROOT, UpArgs};
use crate::install::{DISCOVERY_MOUNT, GATEWAY, IDENTITY_MOUNT};

mod containers;
mod control;
mod identity;
mod kubelet;
mod replicas;

use kubelet::jump_to_services;

/// How often the lab's node agents look at the API servers.
const SYNC_INTERVAL: Duration = Duration::from_millis(300);
/// How long a controller gets to publish the discovery ConfigMaps.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// The image the lab serves with its built-in hello server.
pub const HELLO_IMAGE: &str = "nginxdemos/hello:plain-text";
/// The port nginxdemos/hello listens on when a container declares none.
const HELLO_DEFAULT_PORT: u16 = 80;
/// The lab's whole service range: every cluster's /21 is inside it.
const SERVICE_RANGE: &str = "198.19.0.0/16";
/// How long proxies get to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long identities minted for a run stay valid.
const CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The keys of every identity the lab mints.
const KEY_ALGORITHM: KeyAlgorithm = KeyAlgorithm::EcdsaP256;

/// Runs `isthmus lab up`; `Ok(false)` when a pod or proxy failed.
pub fn up(args: UpArgs) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!(NEEDS_ROOT);
    }
    let spec = match &args.dir {
        Some(dir) => LabSpec::read(dir)
            .with_context(|| format!("reading the lab directory {}", dir.display()))?,
        None => LabSpec::seed().context("reading the embedded seed")?,
    };
    let plan = Plan::new(&spec, args.wan_delay).context("placing the clusters")?;
    for (cluster, _) in &args.capture_cluster {
        if plan.cluster(cluster).is_none() {
            bail!("--capture-cluster: no cluster {cluster:?} in this lab");
        }
    }
    // Every image is checked before anything is built.
    for c in &plan.clusters {
        for pod in &c.pods {
            for container in &pod.containers {
                containers::workload(c.spec.name.as_str(), pod, container)?;
            }
        }
    }
    let binaries = Binaries::locate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let net = Arc::new(Net::create()?);
        // Dropped before `net` (also when unwinding): what processes print while
        // they are torn down would bury the error or the summary.
        let _quiet = Quiet;
        let result = match Lab::new(plan, args, binaries, net.clone()) {
            Ok(lab) => lab.run(&spec.source).await,
            Err(e) => Err(e),
        };
        QUIET.store(true, Ordering::Relaxed);
        net.teardown();
        result
    })
}

/// Silences the processes' output when dropped.
struct Quiet;

impl Drop for Quiet {
    fn drop(&mut self) {
        QUIET.store(true, Ordering::Relaxed);
    }
}

/// The workspace binaries the lab runs, found beside `isthmus`.
struct Binaries {
    proxy: PathBuf,
    init: PathBuf,
    controller: PathBuf,
    apiserver: PathBuf,
    this: PathBuf,
}

impl Binaries {
    fn locate() -> Result<Self> {
        let this = std::env::current_exe().context("locating the isthmus binary")?;
        let dir = this
            .parent()
            .context("the isthmus binary has no directory")?
            .to_owned();
        let find = |name: &str| -> Result<PathBuf> {
            let beside = dir.join(name);
            if beside.is_file() {
                return Ok(beside);
            }
            for p in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
                if p.join(name).is_file() {
                    return Ok(p.join(name));
                }
            }
            bail!(
                "{name} not found beside {} nor on PATH: build it (`cargo build --bins`) or install it next to isthmus",
                this.display()
            )
        };
        Ok(Self {
            proxy: find("isthmus-proxy")?,
            controller: find("isthmus-controller")?,
            apiserver: find("test-apiserver")?,
            init: find("isthmus-init")?,
            this,
        })
    }
}

/// Which process an exit belongs to.
#[derive(Debug, Clone)]
enum Role {
    Proxy,
    Sidecar { cluster: usize, pod: usize },
    Container { cluster: usize, pod: usize },
    Helper,
}

#[derive(Debug)]
struct Exit {
    label: String,
    role: Role,
    status: std::io::Result<ExitStatus>,
}

struct Lab {
    plan: Plan,
    args: UpArgs,
    bins: Binaries,
    net: Arc<Net>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    /// Process-group ids of each pod's containers, to stop them.
    containers: BTreeMap<(usize, usize), Vec<i32>>,
    /// Addresses of pods out of their Services' Endpoints: starting, stopped, or
    /// whose containers have all exited (pod addresses are unique across the
    /// lab).
    gone: BTreeSet<Ipv4Addr>,
    /// Running containers per pod.
    running: BTreeMap<(usize, usize), usize>,
    failures: Vec<String>,
    pod_ns: BTreeMap<(usize, usize), Namespace>,
    gateway_ns: Vec<Namespace>,
    /// The namespace holding the bridges, once built.
    lab_ns: Option<Namespace>,
    /// Each cluster's bridge, in the lab namespace.
    bridges: Vec<String>,
    /// Each cluster's API server.
    apiservers: Vec<ApiServer>,
    /// Each cluster's issuer, for the identities of pods started later.
    issuers: Vec<mint::CertificateAuthority>,
    /// The validity of every certificate of the run: a leaf minted later must
    /// not outlive its issuer.
    validity: Validity,
    /// Pods the lab stopped (scaled down or deleted): their exits are not
    /// failures, and they never come back.
    stopped: BTreeSet<(usize, usize)>,
    /// Pods whose Pod object the API server has held.
    published: BTreeSet<(usize, usize)>,
    /// Each meshed pod's sidecar, by pid.
    sidecars: BTreeMap<(usize, usize), u32>,
    /// Deployment templates (by cluster and Deployment) the lab said it cannot
    /// run, so it says so once.
    refused: BTreeSet<(usize, ServiceRef, String)>,
    /// Per cluster, its Services as its API server held them at the last sync
    /// (mirrored ones: kube-proxy rejects their ClusterIPs, no local pod backs
    /// them).
    views: Vec<kubelet::ServiceView>,
    /// Clusters whose Pods and EndpointSlices changed since they were published.
    unpublished: BTreeSet<usize>,
    /// The last state printed of each ServiceMirror, by cluster and
    /// `namespace/name`.
    mirror_states: BTreeMap<(usize, String), String>,
    /// SIGINT and SIGTERM, caught from the start so that an interrupted start
    /// still cleans up.
    interrupt: Signal,
    terminate: Signal,
}

impl Lab {
    fn new(plan: Plan, args: UpArgs, bins: Binaries, net: Arc<Net>) -> Result<Self> {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let catch = |kind| signal(kind).context("catching signals");
        Ok(Self {
            interrupt: catch(SignalKind::interrupt())?,
            terminate: catch(SignalKind::terminate())?,
            plan,
            args,
            bins,
            net,
            exits_tx,
            exits,
            containers: BTreeMap::new(),
            gone: BTreeSet::new(),
            running: BTreeMap::new(),
            failures: Vec::new(),
            pod_ns: BTreeMap::new(),
            gateway_ns: Vec::new(),
            lab_ns: None,
            bridges: Vec::new(),
            apiservers: Vec::new(),
            issuers: Vec::new(),
            validity: Validity::from_now(CERT_LIFETIME),
            stopped: BTreeSet::new(),
            published: BTreeSet::new(),
            sidecars: BTreeMap::new(),
            refused: BTreeSet::new(),
            views: Vec::new(),
            unpublished: BTreeSet::new(),
            mirror_states: BTreeMap::new(),
        })
    }

    fn lab_ns(&self) -> Result<Namespace> {
        self.lab_ns
            .clone()
            .context("the lab namespace is built before the clusters' control planes")
    }

    fn dir(&self, parts: &[&str]) -> PathBuf {
        parts
            .iter()
            .fold(self.net.run_dir().to_owned(), |p, part| p.join(part))
    }

    async fn run(mut self, source: &str) -> Result<bool> {
        println!(
            "isthmus lab {}: {} clusters from {source}; namespaces {}-*, files in {}",
            self.net.prefix(),
            self.plan.clusters.len(),
            self.net.prefix(),
            self.net.run_dir().display()
        );
        let bin = self.install_binaries()?;
        self.mint_identities()?;
        let captures = self.build_topology(&bin)?;
        self.start_control_plane().await?;
        self.start_controllers(&bin).await?;
        for ci in 0..self.plan.clusters.len() {
            self.publish_pods(ci).await?;
            self.publish_gateway(ci).await?;
        }
        // Gateways first, linked once they all listen: no gateway then dials a
        // peer that is not there yet.
        let mut gateway_kubeconfigs = Vec::new();
        for ci in 0..self.plan.clusters.len() {
            gateway_kubeconfigs.push(self.account_kubeconfig(ci, GATEWAY).await?);
        }
        self.start_gateways(&bin, &gateway_kubeconfigs)?;
        self.wait_ready(false).await?;
        self.link_clusters().await?;
        // As kubelet starts a pod only once its ConfigMap volumes exist.
        self.wait_published().await?;
        self.start_sidecars(&bin)?;
        self.wait_ready(true).await?;
        let pods: Vec<(usize, usize)> = (self.plan.clusters.iter().enumerate())
            .flat_map(|(ci, c)| (0..c.pods.len()).map(move |pi| (ci, pi)))
            .collect();
        self.start_containers(&pods).await?;
        println!(
            "isthmus lab {}: running{}; Ctrl-C to stop",
            self.net.prefix(),
            match self.args.duration {
                Some(d) => format!(" for {}s", d.as_secs_f64()),
                None => String::new(),
            }
        );
        self.wait_for_end().await;
        self.stop_containers().await;
        let reports = self.read_metrics().await;
        QUIET.store(true, Ordering::Relaxed);
        print!("{}", summary::render(&reports));
        for capture in captures {
            stop_capture(capture).await;
        }
        for f in &self.failures {
            println!("FAILED: {f}");
        }
        Ok(self.failures.is_empty())
    }

    /// Copies the proxy and init binaries where the proxy UID can run them.
    fn install_binaries(&self) -> Result<PathBuf> {
        let bin = self.dir(&["bin"]);
        std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        for source in [&self.bins.proxy, &self.bins.init, &self.bins.controller] {
            let name = source.file_name().context("binary without a name")?;
            let target = bin.join(name);
            std::fs::copy(source, &target)
                .with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(bin)
    }

    /// Whether a pod counts as ready for Endpoints: until its containers are gone.
    fn ready(&self) -> impl Fn(&PodPlan) -> bool + '_ {
        move |pod: &PodPlan| !self.gone.contains(&pod.ip)
    }

    /// The root of a pod's files (`gateway` for the cluster's gateway): its
    /// volumes sit below it at their mount paths.
    fn pod_root(&self, cluster: &str, pod: &str) -> PathBuf {
        self.dir(&["pods", cluster, pod])
    }

    /// The lab namespace with the WAN and a bridge per cluster, a namespace per
    /// gateway and per pod, hosts files, capture and kube-proxy rules. Returns the
    /// packet captures asked for (a failed start leaves them to the namespace
    /// clean-up).
    fn build_topology(&mut self, bin: &Path) -> Result<Vec<std::process::Child>> {
        let net = self.net.clone();
        let lab = net.namespace("lab")?;
        self.lab_ns = Some(lab.clone());
        // The lab namespace joins the bridges but never routes between them: the
        // only way across is through the gateways.
        lab.sysctl(&["net.ipv4.ip_forward=0"])?;
        let wan = net.bridge_at(&lab, None)?;
        let mut captures = Vec::new();
        if let Some(file) = &self.args.capture_wan {
            captures.push(start_capture(&lab, &wan, file)?);
        }
        for ci in 0..self.plan.clusters.len() {
            let c = &self.plan.clusters[ci];
            let name = c.spec.name.as_str();
            let bridge = net.bridge_at(&lab, Some((c.bridge_ip, 24)))?;
            self.bridges.push(bridge.clone());
            for (_, file) in self.args.capture_cluster.iter().filter(|(n, _)| n == name) {
                captures.push(start_capture(&lab, &bridge, file)?);
            }
            let gw = net.namespace(&format!("{name}-gateway"))?;
            net.attach_at(&lab, &bridge, &gw, "eth0", (c.gateway_ip, 24))?;
            net.attach_at(&lab, &wan, &gw, "wan0", (c.wan_ip, 24))?;
            gw.add_route(&control::api_route(), &c.bridge_ip.to_string())?;
            gw.write_hosts(&gateway_hosts_file(&self.plan))?;
            self.gateway_ns.push(gw);
            let ips = planned_ips(c);
            for pi in 0..c.pods.len() {
                self.place_pod(ci, pi, bin, &ips)?;
            }
            self.apply_rules(ci)?;
            for pi in 0..self.plan.clusters[ci].pods.len() {
                jump_to_services(&self.pod_ns[&(ci, pi)])?;
            }
        }
        Ok(captures)
    }

    /// The proxies' log filter.
    fn log_filter(&self) -> String {
        match (&self.args.proxy_log, self.args.verbose) {
            (Some(filter), _) => filter.clone(),
            (None, true) => "info".to_owned(),
            (None, false) => "warn".to_owned(),
        }
    }

    /// Each cluster's gateway, discovering through its API server with the
    /// kubeconfig of its ServiceAccount (`kubeconfigs`, by cluster).
    fn start_gateways(&mut self, bin: &Path, kubeconfigs: &[PathBuf]) -> Result<()> {
        for (ci, c) in self.plan.clusters.iter().enumerate() {
            let name = c.spec.name.as_str();
            let gw = &self.gateway_ns[ci];
            let kubeconfig = Discovery::Kube(&kubeconfigs[ci]);
            let cmd = self.proxy(bin, gw, "gateway", name, "gateway", kubeconfig);
            let child = spawn(cmd)?;
            self.supervise(child, format!("{name}/gateway"), Role::Proxy);
            if self.plan.wan_delay_ms > 0 {
                let mut relay = tokio::process::Command::new("ip");
                relay
                    .args(["netns", "exec", gw.name()])
                    .arg(&self.bins.this)
                    .args(["lab", "relay", "--listen"])
                    .arg(format!("{}:{RELAY_PORT}", c.wan_ip))
                    .arg("--to")
                    .arg(format!("{}:{TUNNEL_PORT}", c.wan_ip))
                    .arg("--delay-ms")
                    .arg(self.plan.wan_delay_ms.to_string());
                let child = spawn(relay)?;
                self.supervise(child, format!("{name}/wan-relay"), Role::Helper);
            }
        }
        Ok(())
    }

    /// `isthmus-proxy ROLE` in `ns` as the proxy UID, for `who` (a pod, or
    /// `gateway`) of `cluster`: its identity volume, the tunnel port on every
    /// address, the lab's log filter.
    fn proxy(
        &self,
        bin: &Path,
        ns: &Namespace,
        role: &str,
        cluster: &str,
        who: &str,
        discovery: Discovery<'_>,
    ) -> tokio::process::Command {
        let launch = (self.net).command_as(ns, bin.join("isthmus-proxy"), PROXY_UID, PROXY_UID);
        let identity = mount_dir(&self.pod_root(cluster, who), IDENTITY_MOUNT);
        let log = self.log_filter();
        let mut cmd = proxy_command(launch, role, cluster, &identity, discovery, &log);
        cmd.args(["--inbound-addr", &format!("0.0.0.0:{TUNNEL_PORT}")]);
        cmd
    }

    fn start_sidecars(&mut self, bin: &Path) -> Result<()> {
        for ci in 0..self.plan.clusters.len() {
            for pi in 0..self.plan.clusters[ci].pods.len() {
                self.start_sidecar(ci, pi, bin)?;
            }
        }
        Ok(())
    }

    /// The sidecar of pod `pi` of cluster `ci`, if it is meshed.
    fn start_sidecar(&mut self, ci: usize, pi: usize, bin: &Path) -> Result<()> {
        let c = &self.plan.clusters[ci];
        let (name, pod) = (c.spec.name.as_str(), &c.pods[pi]);
        if !pod.meshed {
            return Ok(());
        }
        let ns = &self.pod_ns[&(ci, pi)];
        let volume = mount_dir(&self.pod_root(name, &pod.name), DISCOVERY_MOUNT);
        let mut cmd = self.proxy(bin, ns, "sidecar", name, &pod.name, Discovery::Dir(&volume));
        cmd.args(["--outbound-addr", "127.0.0.1:4140"]);
        let child = spawn(cmd)?;
        if let Some(pid) = child.id() {
            self.sidecars.insert((ci, pi), pid);
        }
        let label = format!("{name}/{}/isthmus-proxy", pod.name);
        self.supervise(
            child,
            label,
            Role::Sidecar {
                cluster: ci,
                pod: pi,
            },
        );
        Ok(())
    }

    /// Waits until the gateways (and with `all`, the sidecars) answer `/ready`,
    /// and with `all` until every gateway's links are up, so the applications'
    /// first calls find a warm path. An early exit of a proxy is an error.
    async fn wait_ready(&mut self, all: bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut pending: Vec<(Namespace, Vec<String>)> = Vec::new();
        for (ci, c) in self.plan.clusters.iter().enumerate() {
            let links = match all {
                true => c.spec.links.iter().map(|l| l.to_string()).collect(),
                false => Vec::new(),
            };
            pending.push((self.gateway_ns[ci].clone(), links));
            for pi in (0..c.pods.len()).filter(|pi| all && c.pods[*pi].meshed) {
                pending.push((self.pod_ns[&(ci, pi)].clone(), Vec::new()));
            }
        }
        loop {
            while let Ok(exit) = self.exits.try_recv() {
                if let Role::Proxy | Role::Sidecar { .. } = exit.role {
                    bail!(
                        "{} exited while starting ({})",
                        exit.label,
                        describe(&exit.status)
                    );
                }
                self.record(exit);
            }
            let mut still = Vec::new();
            let mut why = Vec::new();
            for (ns, links) in pending {
                match not_ready(&ns, &links).await {
                    None => {}
                    Some(reason) => {
                        why.push(format!("{ns} ({reason})"));
                        still.push((ns, links));
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "proxies not ready after {}s: {}",
                    READY_TIMEOUT.as_secs(),
                    why.join(", ")
                );
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = self.interrupt.recv() => bail!("interrupted while starting"),
                _ = self.terminate.recv() => bail!("terminated while starting"),
            }
        }
    }

    /// Streams the child's output with `[label]` and reports its exit.
    fn supervise(&self, mut child: tokio::process::Child, label: String, role: Role) {
        let mut streams = Vec::new();
        if let Some(out) = child.stdout.take() {
            streams.push(tokio::spawn(print_lines(out, label.clone())));
        }
        if let Some(err) = child.stderr.take() {
            streams.push(tokio::spawn(print_lines(err, label.clone())));
        }
        let tx = self.exits_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            for s in streams {
                let _ = s.await;
            }
            let _ = tx.send(Exit {
                label,
                role,
                status,
            });
        });
    }

    /// Records an exit while the lab runs: a proxy or helper that dies, or a
    /// container that fails, fails the run; a pod whose containers are all gone
    /// leaves its Services' Endpoints.
    fn record(&mut self, exit: Exit) {
        let ok = exit.status.as_ref().is_ok_and(ExitStatus::success);
        println!("[{}] exited ({})", exit.label, describe(&exit.status));
        let failed = format!("{} exited ({})", exit.label, describe(&exit.status));
        match exit.role {
            Role::Proxy | Role::Helper => self.failures.push(failed),
            Role::Sidecar { cluster, pod } => {
                if !self.stopped.contains(&(cluster, pod)) {
                    self.failures.push(failed);
                }
            }
            Role::Container { cluster, pod } => {
                if !ok && !self.stopped.contains(&(cluster, pod)) {
                    self.failures.push(format!("container {failed}"));
                }
                let left = self.running.entry((cluster, pod)).or_default();
                *left = left.saturating_sub(1);
                if *left == 0 {
                    self.leave_endpoints(cluster, pod, &exit.label);
                }
            }
        }
    }

    /// Takes pod `pi` of cluster `ci` out of its Services' Endpoints and its Pod
    /// object off the API server (at the next publication).
    fn leave_endpoints(&mut self, ci: usize, pi: usize, why: &str) {
        let ip = self.plan.clusters[ci].pods[pi].ip;
        if !self.gone.insert(ip) {
            return;
        }
        self.unpublished.insert(ci);
        if let Err(e) = self.apply_rules(ci) {
            self.failures
                .push(format!("updating Endpoints after {why} ended: {e:#}"));
        }
    }

    async fn wait_for_end(&mut self) {
        let duration = self.args.duration;
        let end = async move {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(end);
        let mut sync = tokio::time::interval(SYNC_INTERVAL);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sync.tick() => self.tick().await,
                () = &mut end => {
                    println!("isthmus lab {}: --duration reached, stopping", self.net.prefix());
                    return;
                }
                _ = self.interrupt.recv() => {
                    println!("isthmus lab {}: interrupted, stopping", self.net.prefix());
                    return;
                }
                _ = self.terminate.recv() => {
                    println!("isthmus lab {}: terminated, stopping", self.net.prefix());
                    return;
                }
                exit = self.exits.recv() => match exit {
                    Some(exit) => self.record(exit),
                    None => return,
                },
            }
        }
    }

    /// One pass of the node agents while the lab runs; a failure is reported
    /// and the next pass tries again.
    async fn tick(&mut self) {
        for ci in 0..self.plan.clusters.len() {
            if let Err(e) = self.follow_replicas(ci).await {
                println!(
                    "isthmus lab {}: following the Deployments of cluster {}: {e:#}",
                    self.net.prefix(),
                    self.plan.clusters[ci].spec.name
                );
            }
        }
        let mut result = Ok(());
        for ci in std::mem::take(&mut self.unpublished) {
            if let Err(e) = self.publish_pods(ci).await {
                self.unpublished.insert(ci);
                result = Err(e);
            }
        }
        if let Err(e) = result.and(self.sync().await.map(drop)) {
            println!(
                "isthmus lab {}: syncing with the API servers: {e:#}",
                self.net.prefix()
            );
        }
    }

    /// Waits until every ServiceMirror is reconciled and every namespace with
    /// meshed pods holds the discovery ConfigMap with every mirrored Service,
    /// projected into their volumes: the applications' first calls then find
    /// their names and their sidecars' routes (in a cluster, readiness gates).
    async fn wait_published(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + PUBLISH_TIMEOUT;
        loop {
            let missing = self.sync().await?;
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let names: Vec<String> = missing
                    .iter()
                    .map(|(ci, what)| format!("{}: {what}", self.plan.clusters[*ci].spec.name))
                    .collect();
                // What stays unsettled is the manifests' business (a mirror of a
                // Service that does not exist); the pods start all the same.
                println!(
                    "isthmus lab {}: after {}s still not settled: {}; starting the pods",
                    self.net.prefix(),
                    PUBLISH_TIMEOUT.as_secs(),
                    names.join("; ")
                );
                return Ok(());
            }
            tokio::select! {
                () = tokio::time::sleep(SYNC_INTERVAL) => {}
                _ = self.interrupt.recv() => bail!("interrupted while starting"),
                _ = self.terminate.recv() => bail!("terminated while starting"),
            }
        }
    }

    async fn read_metrics(&self) -> Vec<ProxyReport> {
        let mut reports = Vec::new();
        for (ci, c) in self.plan.clusters.iter().enumerate() {
            let cluster = c.spec.name.to_string();
            let gw = &self.gateway_ns[ci];
            reports.push(ProxyReport {
                cluster: cluster.clone(),
                name: "gateway".to_owned(),
                gateway: true,
                metrics: admin_get(gw, "/metrics").await.map(|t| summary::parse(&t)),
            });
            for (pi, pod) in c.pods.iter().enumerate().filter(|(_, p)| p.meshed) {
                // A pod stopped while the lab ran took its sidecar's counts along.
                let Some(ns) = self.pod_ns.get(&(ci, pi)) else {
                    continue;
                };
                if self.stopped.contains(&(ci, pi)) {
                    continue;
                }
                reports.push(ProxyReport {
                    cluster: cluster.clone(),
                    name: pod.name.clone(),
                    gateway: false,
                    metrics: admin_get(ns, "/metrics").await.map(|t| summary::parse(&t)),
                });
            }
        }
        reports
    }
}

/// The ClusterIPs of `c`'s own Services, as planned.
fn planned_ips(c: &super::plan::ClusterPlan) -> BTreeMap<ServiceRef, IpAddr> {
    c.services
        .iter()
        .filter_map(|(k, s)| s.cluster_ips().into_iter().next().map(|ip| (k.clone(), ip)))
        .collect()
}
