//! What the benchmark builds before it measures: the origin's files and nginx
//! configuration, the sidecar's identity and manifests, and the chain's two clusters
//! (identities, ClusterSettings, exported Services, the Link, the seed's
//! ServiceMirror), written as `isthmus lab` writes them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{O_IP, PROXY_UID};

/// The gateways' SPIFFE IDs, `-<cluster>` appended.
pub const GW_ID: &str = "spiffe://cluster.local/ns/isthmus-multicluster/sa/gateway";

/// About the size of the seed's hello answer.
fn hello_body() -> String {
    format!(
        "Server address: {O_IP}:8080\nServer name: origin\nDate: 23/Nov/2026:00:00:00 +0000\n\
         URI: /hello\nRequest ID: 00000000000000000000000000000000\n"
    )
}

/// The origin's documents (`/hello`, `/1mib`) and nginx's configuration; returns
/// the configuration's path.
pub fn origin(work: &Path) -> Result<PathBuf> {
    let www = work.join("www");
    let nginx = work.join("nginx");
    std::fs::create_dir_all(&www)?;
    std::fs::create_dir_all(nginx.join("logs"))?;
    std::fs::write(www.join("hello"), hello_body())?;
    std::fs::write(www.join("1mib"), vec![b'x'; 1 << 20])?;
    chmod("755", &[&www])?;
    chmod("644", &[&www.join("hello"), &www.join("1mib")])?;
    let n = nginx.display();
    let conf = format!(
        "daemon off;
worker_processes 1;
pid {n}/nginx.pid;
error_log {n}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {n}/body;
    proxy_temp_path {n}/proxy;
    fastcgi_temp_path {n}/fastcgi;
    uwsgi_temp_path {n}/uwsgi;
    scgi_temp_path {n}/scgi;
    default_type text/plain;
    server {{
        listen {O_IP}:8080 backlog=4096;
        root {};
    }}
}}
",
        www.display()
    );
    let path = nginx.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// Runs a program on the host (the `isthmus` tooling, `chown`); fails with its
/// output.
fn host(program: impl AsRef<std::ffi::OsStr>, args: &[&std::ffi::OsStr]) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    isthmus_netns::run_checked(&mut cmd)
        .map(drop)
        .with_context(|| format!("running {cmd:?}"))
}

fn chmod(mode: &str, paths: &[&Path]) -> Result<()> {
    let mut args: Vec<&std::ffi::OsStr> = vec![mode.as_ref()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    host("chmod", &args)
}

fn chown_proxy(path: &Path) -> Result<()> {
    let owner = format!("{PROXY_UID}:{PROXY_UID}");
    host("chown", &["-R".as_ref(), owner.as_ref(), path.as_os_str()])
}

/// `isthmus identity <what> <args>`.
fn identity(bin: &Path, what: &str, args: &[&str], out: &Path) -> Result<()> {
    let mut all: Vec<&std::ffi::OsStr> = vec!["identity".as_ref(), what.as_ref()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    all.push("--out".as_ref());
    all.push(out.as_os_str());
    host(bin.join("isthmus"), &all)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The one-hop sidecar's identity (`work/identity`) and manifests (only a
/// ClusterSettings: every destination is a passthrough), the trust anchor, and a
/// copy of `isthmus-proxy` the proxy UID can execute whatever the checkout's
/// permissions (`work/bin`).
pub fn sidecar(work: &Path, bin: &Path) -> Result<()> {
    let anchor = work.join("anchor");
    let issuer = work.join("issuer");
    let a = anchor.to_string_lossy().into_owned();
    identity(bin, "trust-anchor", &[], &anchor)?;
    identity(
        bin,
        "issuer",
        &["--anchor", &a, "--cluster", "cluster-b"],
        &issuer,
    )?;
    let i = issuer.to_string_lossy().into_owned();
    identity(
        bin,
        "leaf",
        &[
            "--issuer",
            &i,
            "--id",
            "spiffe://cluster.local/ns/default/sa/client",
        ],
        &work.join("identity"),
    )?;
    chown_proxy(&work.join("identity"))?;
    std::fs::create_dir_all(work.join("manifests"))?;
    std::fs::create_dir_all(work.join("bin"))?;
    write(
        &work.join("manifests/settings.yaml"),
        "apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata: {name: cluster-b, namespace: isthmus}
spec: {clusterName: cluster-b}
",
    )?;
    host(
        "chmod",
        &[
            "-R".as_ref(),
            "a+rX".as_ref(),
            work.join("manifests").as_os_str(),
        ],
    )?;
    let proxy = work.join("bin/isthmus-proxy");
    std::fs::copy(bin.join("isthmus-proxy"), &proxy)
        .with_context(|| format!("copying {}", bin.join("isthmus-proxy").display()))?;
    chmod("755", &[&work.join("bin"), &proxy])
}

fn settings_yaml(cluster: &str, cidr: &str, ip: &str, port: u16) -> String {
    format!(
        "apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata: {{name: {cluster}, namespace: isthmus-multicluster}}
spec:
  clusterName: {cluster}
  trustDomain: cluster.local
  serviceCIDR: {cidr}
  gateway: {{address: '{ip}', port: {port}, identity: '{GW_ID}-{cluster}'}}
"
    )
}

/// An exported Service `name` on `port`, its Endpoints at the origin's `target`.
fn exported_yaml(name: &str, port: u16, target: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
  labels: {{mirror.isthmus.io/exported: \"true\"}}
spec:
  ports: [{{port: {port}, protocol: TCP, targetPort: {target}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: {name}, namespace: default}}
subsets:
- addresses: [{{ip: '{O_IP}'}}]
  ports: [{{port: {target}, protocol: TCP}}]
"
    )
}

fn mirror_yaml(name: &str, service: &str) -> String {
    format!(
        "apiVersion: linkerd.io/v1alpha1
kind: ServiceMirror
metadata: {{name: {name}, namespace: default}}
spec:
  cluster: cluster-a
  service: {{name: {service}, namespace: default}}
"
    )
}

/// cluster-b's Link to gateway-a: its tunnel port, or the WAN relay in front of it.
pub fn write_link(chain: &Path, port: u16) -> Result<()> {
    let path = chain.join("b/link-cluster-a.yaml");
    write(
        &path,
        &format!(
            "apiVersion: multicluster.isthmus.io/v1alpha1
kind: Link
metadata: {{name: cluster-a, namespace: isthmus-multicluster}}
spec:
  targetClusterName: cluster-a
  gatewayAddress: 127.0.0.1
  gatewayPort: {port}
  gatewayIdentity: '{GW_ID}-cluster-a'
  probeSpec: {{path: /ready, port: 4191, period: 3s}}
"
        ),
    )?;
    chmod("644", &[&path])
}

/// The chain's two clusters in `chain` (`work/chain`): gateway-b on the pod network
/// (`O_IP:4143`), gateway-a on the origin's loopback (`127.0.0.1:4144`), delivering
/// to the origin. cluster-a exports `hello` and `iperf`; cluster-b mirrors them with
/// the seed's ServiceMirror. HAProxy gets the same identities as PEM files (key
/// appended to the chain).
pub fn chain(work: &Path, chain: &Path, bin: &Path) -> Result<()> {
    std::fs::create_dir_all(chain.join("a"))?;
    std::fs::create_dir_all(chain.join("b/clusters/cluster-a"))?;
    let anchor = work.join("anchor").to_string_lossy().into_owned();
    for c in ["cluster-a", "cluster-b"] {
        let issuer = chain.join(format!("issuer-{c}"));
        identity(
            bin,
            "issuer",
            &["--anchor", &anchor, "--cluster", c],
            &issuer,
        )?;
        let i = issuer.to_string_lossy().into_owned();
        let id = format!("{GW_ID}-{c}");
        identity(
            bin,
            "leaf",
            &["--issuer", &i, "--id", &id],
            &chain.join(format!("id-gateway-{c}")),
        )?;
    }
    let issuer_b = chain
        .join("issuer-cluster-b")
        .to_string_lossy()
        .into_owned();
    identity(
        bin,
        "leaf",
        &[
            "--issuer",
            &issuer_b,
            "--id",
            "spiffe://cluster.local/ns/default/sa/frontend",
        ],
        &chain.join("id-frontend"),
    )?;
    let a = [
        (
            "settings.yaml",
            settings_yaml("cluster-a", "198.19.0.0/24", "127.0.0.1", 4144),
        ),
        ("hello.yaml", exported_yaml("hello", 80, 8080)),
        // The origin's iperf3 server, for raw TCP through the chain.
        ("iperf.yaml", exported_yaml("iperf", 5201, 5201)),
    ];
    for (file, text) in &a {
        write(&chain.join("a").join(file), text)?;
        // What a controller watching cluster-a would show cluster-b.
        write(&chain.join("b/clusters/cluster-a").join(file), text)?;
    }
    write(
        &chain.join("b/settings.yaml"),
        &settings_yaml("cluster-b", "198.19.1.0/24", O_IP, 4143),
    )?;
    write_link(chain, 4144)?;
    write(
        &chain.join("b/mirror.yaml"),
        &mirror_yaml("hello-mirror", "hello"),
    )?;
    write(
        &chain.join("b/mirror-iperf.yaml"),
        &mirror_yaml("iperf-mirror", "iperf"),
    )?;
    chmod("755", &[chain])?;
    host(
        "chmod",
        &[
            "-R".as_ref(),
            "a+rX".as_ref(),
            chain.join("a").as_os_str(),
            chain.join("b").as_os_str(),
        ],
    )?;
    for id in ["gateway-cluster-a", "gateway-cluster-b", "frontend"] {
        let dir = chain.join(format!("id-{id}"));
        chown_proxy(&dir)?;
        let mut pem = std::fs::read(dir.join("tls.crt"))?;
        pem.extend(std::fs::read(dir.join("tls.key"))?);
        std::fs::write(chain.join(format!("{id}.pem")), pem)?;
    }
    std::fs::copy(work.join("anchor/ca.crt"), chain.join("anchors.pem"))
        .context("copying the trust anchor for HAProxy")?;
    Ok(())
}

/// A HAProxy configuration in `mode`, one thread like the sidecar's default
/// runtime, with zero-copy forwarding where HAProxy judges it useful (as the
/// sidecar splices plain TCP): off by default, but any tuned deployment turns it
/// on. `sections` follow the defaults.
pub fn haproxy_cfg(path: &Path, mode: &str, sections: &str) -> Result<()> {
    write(
        path,
        &format!(
            "global
    nbthread 1
    maxconn 4000
defaults
    mode {mode}
    option splice-auto
    timeout connect 5s
    timeout client 60s
    timeout server 60s
{sections}"
        ),
    )?;
    let out = Command::new("haproxy")
        .args(["-c", "-q", "-f"])
        .arg(path)
        .output()
        .context("running haproxy -c")?;
    if !out.status.success() {
        bail!(
            "HAProxy rejected its configuration {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
