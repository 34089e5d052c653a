//! The rows: what each one starts (HAProxy, the sidecar, the gateways' chain), how
//! it is measured, and the order of a run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use isthmus_netns::{Namespace, Net};

use crate::load::{RssSampler, Wrk, cpu_ticks, iperf_gbit, rss_kib, ttfb_ms};
use crate::table::{COLUMNS, ERRORS, Sample};
use crate::{C_IP, LAT_CONNS, O_IP, PACE_MS, Procs, WAN_MS, curl, curl_ok, setup, wait_for};

/// The client pod (wrk, the iperf3 client, the sidecar or HAProxy) and the
/// origin (nginx, the iperf3 server, the chains' later hops), with what the rows
/// need of them.
pub struct Bench {
    c: Namespace,
    o: Namespace,
    work: PathBuf,
    chain: PathBuf,
    bin: PathBuf,
    sat_secs: u64,
    short_secs: u64,
    tick: f64,
    body_len: usize,
    samples: Vec<Sample>,
}

/// What a row is measured through.
struct Row<'a> {
    name: &'static str,
    url: &'a str,
    /// Where iperf3 connects, for rows that forward raw TCP.
    iperf: Option<(&'a str, u16)>,
    /// The row's proxies, whose RSS is reported.
    proxies: &'a [i32],
    ttfb: Option<f64>,
}

impl Bench {
    /// The namespaces, the origin, the identities and manifests.
    pub fn build(
        net: &Net,
        work: &Path,
        bin: &Path,
        short_secs: u64,
        sat_secs: u64,
        procs: &mut Procs,
    ) -> Result<Self> {
        let c = net.namespace("c")?;
        let o = net.namespace("o")?;
        let (ifc, ifo) = net.veth(&c, &o)?;
        c.add_addr(&ifc, &format!("{C_IP}/24"))?;
        o.add_addr(&ifo, &format!("{O_IP}/24"))?;
        // The mirrored Service's ClusterIP (cluster-b's service range) is reached
        // through the capture; the route only lets connect() pick a source before
        // NAT.
        c.add_device_route("198.19.1.0/24", &ifc)?;
        // The no-keep-alive load opens tens of thousands of connections in a few
        // seconds: allow reusing TIME_WAIT ports (these sysctls are per namespace).
        for ns in [&c, &o] {
            ns.sysctl(&[
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=10000 65000",
            ])?;
        }

        let conf = setup::origin(work)?;
        let nginx = work.join("nginx");
        let mut cmd = o.command("nginx");
        cmd.arg("-p").arg(&nginx).arg("-c").arg(&conf);
        procs.start("nginx", cmd)?;
        let mut cmd = o.command("iperf3");
        cmd.args(["-s", "-B", O_IP, "-p", "5201"]);
        procs.start("iperf3-server", cmd)?;
        let hello = format!("http://{O_IP}:8080/hello");
        wait_for(&format!("nginx on {O_IP}:8080"), || curl_ok(&c, &hello, 1))?;
        let body_len = curl(&c, &hello, 2)?.len();
        let big_len = curl(&c, &format!("http://{O_IP}:8080/1mib"), 5)?.len();
        ensure!(
            big_len == 1 << 20,
            "the origin's /1mib answered {big_len} bytes, not 1048576"
        );
        std::fs::write(
            work.join("pace.lua"),
            format!("function delay() return {PACE_MS} end\n"),
        )?;

        setup::sidecar(work, bin)?;
        let chain = work.join("chain");
        setup::chain(work, &chain, bin)?;

        let tick = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .context("getconf CLK_TCK")?;
        Ok(Self {
            c,
            o,
            work: work.to_owned(),
            chain,
            bin: bin.to_owned(),
            sat_secs,
            short_secs,
            tick,
            body_len,
            samples: Vec::new(),
        })
    }

    /// Every row `runs` times; the report with both tables.
    pub fn measure_all(&mut self, runs: u64, procs: &mut Procs) -> Result<String> {
        let started = std::time::Instant::now();
        for run in 1..=runs {
            self.one_run(run, procs)?;
        }
        let elapsed = started.elapsed().as_secs();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = |cmd: &mut Command| {
            cmd.output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|| "unknown".into())
        };
        let commit =
            text(
                Command::new("git")
                    .arg("-C")
                    .arg(&root)
                    .args(["rev-parse", "--short", "HEAD"]),
            );
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let uname = text(Command::new("uname").arg("-sr"));
        Ok(format!(
            "\ncommit {commit}; {cpus} CPUs, {uname}; {runs} runs in {elapsed}s; hello body {} bytes\n\
             each figure: mean of the runs [min-max]; ratios of the means to direct and to the matching HAProxy row\n\n{}",
            self.body_len,
            crate::table::render(&self.samples, LAT_CONNS, PACE_MS, WAN_MS)
        ))
    }

    fn one_run(&mut self, run: u64, procs: &mut Procs) -> Result<()> {
        let direct = format!("http://{O_IP}:8080");
        let local = "http://127.0.0.1:18080";
        self.measure(
            run,
            procs,
            &Row {
                name: "direct",
                url: &direct,
                iperf: Some((O_IP, 5201)),
                proxies: &[],
                ttfb: None,
            },
        )?;

        let pid = self.start_haproxy(procs, "tcp")?;
        self.measure(
            run,
            procs,
            &Row {
                name: "haproxy-tcp",
                url: local,
                iperf: Some(("127.0.0.1", 15201)),
                proxies: &[pid],
                ttfb: None,
            },
        )?;
        procs.stop(pid);

        let pid = self.start_haproxy(procs, "http")?;
        self.measure(
            run,
            procs,
            &Row {
                name: "haproxy-http",
                url: local,
                iperf: None,
                proxies: &[pid],
                ttfb: None,
            },
        )?;
        procs.stop(pid);

        let relay = self.start_relay(procs, 18454, 18444)?;
        let hops = self.start_haproxy_chain(procs, 18454)?;
        let ttfb = ttfb_ms(&self.c, local)?;
        procs.stop_all(&hops);
        procs.stop(relay);
        let hops = self.start_haproxy_chain(procs, 18444)?;
        self.measure(
            run,
            procs,
            &Row {
                name: "haproxy-chain",
                url: local,
                iperf: None,
                proxies: &hops,
                ttfb: Some(ttfb),
            },
        )?;
        procs.stop_all(&hops);

        // From here the client pod's outbound TCP is captured, as in a meshed pod.
        self.init(&[])
            .context("isthmus-init could not install the capture (see its log)")?;

        let pid = self.start_sidecar(
            procs,
            "sidecar-passthrough",
            &["--opaque-ports", "8080,5201"],
        )?;
        self.measure(
            run,
            procs,
            &Row {
                name: "isthmus-passthrough",
                url: &direct,
                iperf: Some((O_IP, 5201)),
                proxies: &[pid],
                ttfb: None,
            },
        )?;
        // The sidecar must have carried the load, and as opaque TCP.
        self.check_carried("isthmus-passthrough", false)?;
        procs.stop(pid);

        let pid = self.start_sidecar(procs, "sidecar-http", &[])?;
        self.measure(
            run,
            procs,
            &Row {
                name: "isthmus-http",
                url: &direct,
                iperf: None,
                proxies: &[pid],
                ttfb: None,
            },
        )?;
        self.check_carried("isthmus-http", true)?;
        procs.stop(pid);

        setup::write_link(&self.chain, 4153)?;
        let relay = self.start_relay(procs, 4153, 4144)?;
        let (pids, ip, _) = self.start_isthmus_chain(procs)?;
        let ttfb = ttfb_ms(&self.c, &format!("http://{ip}"))?;
        procs.stop_all(&pids);
        procs.stop(relay);
        setup::write_link(&self.chain, 4144)?;
        let (pids, ip, iperf_ip) = self.start_isthmus_chain(procs)?;
        let url = format!("http://{ip}");
        self.measure(
            run,
            procs,
            &Row {
                name: "isthmus-chain",
                url: &url,
                iperf: Some((&iperf_ip, 5201)),
                proxies: &pids,
                ttfb: Some(ttfb),
            },
        )?;
        self.check_carried("isthmus-chain", true)?;
        procs.stop_all(&pids);

        self.init(&["--cleanup"])
            .context("isthmus-init --cleanup failed (see its log)")
    }

    /// `isthmus-init` in the client pod, its output appended to its log.
    fn init(&self, args: &[&str]) -> Result<()> {
        let out =
            isthmus_netns::run_checked(self.c.command(self.bin.join("isthmus-init")).args(args));
        let log = self.work.join("isthmus-init.log");
        let mut text = std::fs::read_to_string(&log).unwrap_or_default();
        match &out {
            Ok(o) => text.push_str(&String::from_utf8_lossy(&o.stderr)),
            Err(e) => text.push_str(&e.to_string()),
        }
        std::fs::write(&log, text)?;
        out.map(drop).map_err(Into::into)
    }

    fn measure(&mut self, run: u64, _procs: &mut Procs, row: &Row<'_>) -> Result<()> {
        eprintln!("run {run}: {}", row.name);
        let mut errors = 0;
        let mut f = [None; COLUMNS.len()];
        if !row.proxies.is_empty() {
            f[8] = Some(rss_kib(row.proxies) as f64);
        }
        // The row's processes, each once: its proxies and everything in the origin
        // namespace (where the chain rows' second and third hops also run).
        let mut row_pids: Vec<i32> = row.proxies.iter().copied().chain(self.o.pids()).collect();
        row_pids.sort_unstable();
        row_pids.dedup();

        // Saturation, sampling the proxies' RSS once a second meanwhile.
        let sampler = (!row.proxies.is_empty())
            .then(|| RssSampler::start(row.proxies.to_vec(), self.sat_secs));
        let cpu0 = cpu_ticks(&row_pids);
        let hello = format!("{}/hello", row.url);
        let wrk = Wrk::run(
            &self.c,
            self.sat_secs,
            &["-t2", "-c50", &hello],
            &mut errors,
        )?;
        let cpu1 = cpu_ticks(&row_pids);
        f[0] = wrk.rps();
        if let Some(sampler) = sampler {
            f[9] = Some(sampler.peak() as f64);
        }
        let requests = wrk.requests().context("wrk reported no request count")?;
        f[7] = Some((cpu1 - cpu0) as f64 * 1e6 / self.tick / requests);

        let pace = self.work.join("pace.lua").to_string_lossy().into_owned();
        let conns = format!("-c{LAT_CONNS}");
        let wrk = Wrk::run(
            &self.c,
            self.short_secs,
            &["-t2", &conns, "--latency", "-s", &pace, &hello],
            &mut errors,
        )?;
        f[1] = wrk.percentile_ms(50);
        f[2] = wrk.percentile_ms(99);
        f[3] = wrk.rps();

        let big = format!("{}/1mib", row.url);
        f[4] = Wrk::run(
            &self.c,
            self.short_secs,
            &["-t2", "-c10", &big],
            &mut errors,
        )?
        .rps();
        f[6] = Wrk::run(
            &self.c,
            self.short_secs,
            &["-t2", "-c50", "-H", "Connection: close", &hello],
            &mut errors,
        )?
        .rps();

        if let Some((host, port)) = row.iperf {
            f[5] = Some(iperf_gbit(&self.c, host, port, self.short_secs)?);
        }
        f[ERRORS] = Some(errors as f64);
        f[11] = row.ttfb;
        self.samples.push(Sample {
            row: row.name,
            figures: f,
        });
        Ok(())
    }

    /// HAProxy in the client pod in `mode`, on 127.0.0.1:18080 (and :15201 for raw
    /// TCP in `mode tcp`).
    fn start_haproxy(&self, procs: &mut Procs, mode: &str) -> Result<i32> {
        let mut sections = format!(
            "frontend web\n    bind 127.0.0.1:18080\n    default_backend origin\nbackend origin\n    server origin {O_IP}:8080\n"
        );
        if mode == "tcp" {
            sections.push_str(&format!(
                "frontend raw\n    bind 127.0.0.1:15201\n    default_backend iperf\nbackend iperf\n    server iperf {O_IP}:5201\n"
            ));
        }
        let cfg = self.work.join(format!("haproxy-{mode}.cfg"));
        setup::haproxy_cfg(&cfg, mode, &sections)?;
        // -db: foreground, one process, so its pid is the one measured.
        let mut cmd = self.c.command("haproxy");
        cmd.arg("-db").arg("-f").arg(&cfg);
        let pid = procs.start(&format!("haproxy-{mode}"), cmd)?;
        wait_for(&format!("HAProxy ({mode}) on 127.0.0.1:18080"), || {
            curl_ok(&self.c, "http://127.0.0.1:18080/hello", 1)
        })?;
        Ok(pid)
    }

    /// Three HAProxy processes in TCP mode, at the sidecar's and the gateways'
    /// places: plain in and TLS 1.3 with a client certificate out (client pod),
    /// TLS in and out, TLS in and plain out (origin namespace). Hop 2 dials
    /// `next_port`: hop 3, or the WAN relay.
    fn start_haproxy_chain(&self, procs: &mut Procs, next_port: u16) -> Result<Vec<i32>> {
        let ch = self.chain.display();
        let tls = format!("ssl-min-ver TLSv1.3 ca-file {ch}/anchors.pem verify required");
        let hops = [
            (
                "hop3",
                &self.o,
                format!(
                    "    bind 127.0.0.1:18444 ssl crt {ch}/gateway-cluster-a.pem {tls}\n    server origin {O_IP}:8080\n"
                ),
            ),
            (
                "hop2",
                &self.o,
                format!(
                    "    bind {O_IP}:18443 ssl crt {ch}/gateway-cluster-b.pem {tls}\n    server next 127.0.0.1:{next_port} ssl crt {ch}/gateway-cluster-b.pem {tls}\n"
                ),
            ),
            (
                "hop1",
                &self.c,
                format!(
                    "    bind 127.0.0.1:18080\n    server next {O_IP}:18443 ssl crt {ch}/frontend.pem {tls}\n"
                ),
            ),
        ];
        let mut pids = Vec::new();
        for (name, ns, body) in hops {
            let cfg = self.work.join(format!("haproxy-{name}.cfg"));
            setup::haproxy_cfg(&cfg, "tcp", &format!("listen {name}\n{body}"))?;
            let mut cmd = ns.command("haproxy");
            cmd.arg("-db").arg("-f").arg(&cfg);
            pids.push(procs.start(&format!("haproxy-{name}"), cmd)?);
        }
        wait_for("hello through the HAProxy chain", || {
            curl_ok(&self.c, "http://127.0.0.1:18080/hello", 2)
        })?;
        Ok(pids)
    }

    /// `isthmus-proxy sidecar` in the client pod under the proxy UID, which the
    /// capture exempts.
    fn start_sidecar(&self, procs: &mut Procs, log: &str, extra: &[&str]) -> Result<i32> {
        let w = &self.work;
        let pid = self.sidecar(procs, log, &w.join("identity"), &w.join("manifests"), extra)?;
        wait_for("the sidecar's /ready", || {
            curl_ok(&self.c, "http://127.0.0.1:4191/ready", 1)
        })?;
        Ok(pid)
    }

    fn sidecar(
        &self,
        procs: &mut Procs,
        log: &str,
        identity: &Path,
        manifests: &Path,
        extra: &[&str],
    ) -> Result<i32> {
        let mut cmd = Command::new(self.work.join("bin/isthmus-proxy"));
        cmd.args(["sidecar", "--cluster", "cluster-b", "--identity-dir"])
            .arg(identity)
            .arg("--manifests")
            .arg(manifests)
            .args([
                "--outbound-addr",
                "127.0.0.1:4140",
                "--inbound-addr",
                "0.0.0.0:4143",
            ])
            .args([
                "--admin-addr",
                "127.0.0.1:4191",
                "--log",
                "warn",
                "--shutdown-grace",
                "1s",
            ])
            .args(extra);
        procs.start_proxy(log, &self.c, cmd)
    }

    /// One gateway in the origin namespace under the proxy UID.
    fn start_gateway(
        &self,
        procs: &mut Procs,
        cluster: &str,
        inbound: &str,
        admin: u16,
        outbound: u16,
    ) -> Result<i32> {
        let short = cluster.trim_start_matches("cluster-");
        let mut cmd = Command::new(self.work.join("bin/isthmus-proxy"));
        cmd.args(["gateway", "--cluster", cluster, "--identity-dir"])
            .arg(self.chain.join(format!("id-gateway-{cluster}")))
            .arg("--manifests")
            .arg(self.chain.join(short))
            .args(["--inbound-addr", inbound])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(["--outbound-addr", &format!("127.0.0.1:{outbound}")])
            .args(["--log", "warn", "--shutdown-grace", "1s"]);
        if cluster == "cluster-a" {
            // Its endpoint, the origin, shares its namespace: on one host a gateway
            // refuses that unless told otherwise.
            cmd.arg("--allow-local-endpoints");
        }
        let pid = procs.start_proxy(&format!("gateway-{cluster}"), &self.o, cmd)?;
        wait_for(&format!("gateway {cluster}'s /ready"), || {
            curl_ok(&self.o, &format!("http://127.0.0.1:{admin}/ready"), 1)
        })?;
        Ok(pid)
    }

    /// gateway-a, gateway-b with its link up, and the client pod's sidecar of
    /// cluster-b; their pids and the mirrored hello's and iperf's ClusterIPs.
    fn start_isthmus_chain(&self, procs: &mut Procs) -> Result<(Vec<i32>, String, String)> {
        let mut pids =
            vec![self.start_gateway(procs, "cluster-a", "127.0.0.1:4144", 4191, 4240)?];
        pids.push(self.start_gateway(procs, "cluster-b", &format!("{O_IP}:4143"), 4192, 4241)?);
        wait_for("gateway-b's link to cluster-a", || self.link_up())?;
        let (identity, manifests) = (self.chain.join("id-frontend"), self.chain.join("b"));
        pids.push(self.sidecar(procs, "sidecar-chain", &identity, &manifests, &[])?);
        wait_for("the chain sidecar's /ready", || {
            curl_ok(&self.c, "http://127.0.0.1:4191/ready", 1)
        })?;
        let config = curl(&self.c, "http://127.0.0.1:4191/config", 2)?;
        let ip = mirrored_ip(&config, "hello")
            .context("the chain sidecar's /config shows no mirrored hello in 198.19.1.0/24")?;
        let iperf_ip = mirrored_ip(&config, "iperf")
            .context("the chain sidecar's /config shows no mirrored iperf in 198.19.1.0/24")?;
        wait_for(&format!("hello through the chain at {ip}"), || {
            curl_ok(&self.c, &format!("http://{ip}/hello"), 2)
        })?;
        Ok((pids, ip, iperf_ip))
    }

    fn link_up(&self) -> bool {
        curl(&self.o, "http://127.0.0.1:4192/config", 1).is_ok_and(|config| {
            let flat: String = config.split_whitespace().collect();
            flat.split_once("\"links\":{\"cluster-a\":{")
                .is_some_and(|(_, rest)| rest.contains("\"up\":true"))
        })
    }

    /// Between the chains' second and third hops: `isthmus lab relay`, which holds
    /// every chunk [`WAN_MS`] each way (the lab's --wan-delay). It does not delay
    /// the TCP handshake to itself, so a chain that opens new connections across it
    /// is spared one round trip a real WAN would cost.
    fn start_relay(&self, procs: &mut Procs, listen: u16, to: u16) -> Result<i32> {
        let mut cmd = self.o.command(self.bin.join("isthmus"));
        cmd.args(["lab", "relay", "--listen", &format!("127.0.0.1:{listen}")])
            .args([
                "--to",
                &format!("127.0.0.1:{to}"),
                "--delay-ms",
                &WAN_MS.to_string(),
            ]);
        procs.start(&format!("wan-relay-{listen}"), cmd)
    }

    /// Fails unless the sidecar accepted the row's connections, and counted HTTP
    /// requests exactly when `http`.
    fn check_carried(&self, row: &str, http: bool) -> Result<()> {
        let metrics = curl(&self.c, "http://127.0.0.1:4191/metrics", 2)?;
        let tcp = metric_sum(&metrics, "tcp_open_total");
        let requests = metric_sum(&metrics, "http_requests_total");
        ensure!(
            tcp > 0.0,
            "{row}: the sidecar accepted no connection; was the load captured?"
        );
        match http {
            true if requests < 1.0 => bail!("{row}: the sidecar counted no HTTP request"),
            false if requests != 0.0 => {
                bail!("{row}: the sidecar counted {requests} HTTP requests on an opaque port")
            }
            _ => Ok(()),
        }
    }
}

/// A metric's value summed over its label sets, from Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// The ClusterIP of mirrored Service `name` in the sidecar's `/config`: the first
/// clusterIP in 198.19.1.0/24 after the Service's name in the list of Services
/// (keys are sorted there, so `metadata` comes before `spec`).
fn mirrored_ip(config: &str, name: &str) -> Option<String> {
    let flat: String = config.split_whitespace().collect();
    let services = &flat[flat.find("\"services\":[")?..];
    let after = &services[services.find(&format!("\"name\":\"{name}\""))?..];
    let key = "\"clusterIP\":\"198.19.1.";
    let start = after.find(key)? + key.len() - "198.19.1.".len();
    let ip: String = after[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    Some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_label_sets_of_that_name_only() {
        let text = "# TYPE tcp_open_total counter\ntcp_open_total{dir=\"out\"} 3\ntcp_open_total{dir=\"in\"} 2\ntcp_open_total_x 9\nhttp_requests_total 0\n";
        assert_eq!(metric_sum(text, "tcp_open_total"), 5.0);
        assert_eq!(metric_sum(text, "http_requests_total"), 0.0);
    }

    #[test]
    fn the_mirrored_cluster_ip_is_read_from_the_services() {
        let config = r#"{"links": {}, "services": [
            {"metadata": {"name": "other"}, "spec": {"clusterIP": "198.19.1.7"}},
            {"metadata": {"name": "hello"}, "spec": {"clusterIP": "198.19.1.12", "ports": []}}
        ]}"#;
        assert_eq!(mirrored_ip(config, "hello").as_deref(), Some("198.19.1.12"));
        assert_eq!(mirrored_ip(config, "absent"), None);
    }
}
