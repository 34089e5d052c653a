//! Each pod's containers as the lab runs them: the built-in hello server for
//! its image, any other container's `command` with this machine's tools, in the
//! pod's network namespace; servers first, each client once they listen.

use super::*;

/// What a container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// The built-in `nginxdemos/hello:plain-text` on these ports.
    Hello(Vec<u16>),
    /// `command` + `args`, with the host's tools.
    Command(Vec<String>),
}

/// What `image`/`command`/`args` of a container run in the lab, or an error that
/// names the container and lists what the lab can run.
pub fn workload(
    cluster: &str,
    pod: &PodPlan,
    container: &proxy_discovery::model::Container,
) -> Result<Workload> {
    if !container.command.is_empty() {
        let mut argv = container.command.clone();
        argv.extend(container.args.iter().cloned());
        return Ok(Workload::Command(argv));
    }
    if container.image == HELLO_IMAGE {
        let mut ports: Vec<u16> = container.ports.iter().map(|p| p.container_port).collect();
        if ports.is_empty() {
            ports.push(HELLO_DEFAULT_PORT);
        }
        return Ok(Workload::Hello(ports));
    }
    bail!(
        "container {} of Deployment {}/{} in cluster {cluster}: the lab cannot run image {:?} without a `command`. \
         It runs: {HELLO_IMAGE} (a built-in server answering like that image), and any image whose container has a `command` \
         (run in the pod's namespace with this machine's tools, e.g. /bin/sh and curl)",
        container.name,
        pod.namespace,
        pod.deployment,
        container.image
    )
}

impl Lab {
    /// Starts the containers of `pods` (cluster, pod): the servers first, the
    /// others once those listen. A client container's first call must not race
    /// its server's bind; in a cluster a readiness probe would keep the pod out
    /// of its Endpoints until then.
    pub(super) async fn start_containers(&mut self, pods: &[(usize, usize)]) -> Result<()> {
        let mut servers = Vec::new();
        let mut started = Vec::new();
        for &(ci, pi) in pods {
            let c = &self.plan.clusters[ci];
            let name = c.spec.name.as_str();
            let pod = &c.pods[pi];
            let ns = &self.pod_ns[&(ci, pi)];
            for container in &pod.containers {
                let label = format!("{name}/{}/{}", pod.name, container.name);
                let env: Vec<(String, String)> = container
                    .env
                    .iter()
                    .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
                    .collect();
                match workload(name, pod, container)? {
                    Workload::Hello(ports) => {
                        for port in ports {
                            let mut cmd = tokio::process::Command::new("ip");
                            cmd.args(["netns", "exec", ns.name()])
                                .arg(&self.bins.this)
                                .args([
                                    "lab",
                                    "hello",
                                    "--port",
                                    &port.to_string(),
                                    "--name",
                                    &pod.name,
                                ])
                                .arg("--address")
                                .arg(pod.ip.to_string());
                            container_env(&mut cmd, pod, &env);
                            servers.push((cmd, label.clone(), ci, pi, port));
                        }
                    }
                    Workload::Command(argv) => {
                        let mut cmd = tokio::process::Command::new("ip");
                        cmd.args(["netns", "exec", ns.name()]).args(&argv);
                        container_env(&mut cmd, pod, &env);
                        started.push((cmd, label, ci, pi));
                    }
                }
            }
        }
        let mut listening = Vec::new();
        for (cmd, label, ci, pi, port) in servers {
            let pid = self.start_container(cmd, label.clone(), ci, pi)?;
            listening.push((pid, port, label));
        }
        for (pid, port, label) in listening {
            if let Some(pid) = pid {
                wait_listening(pid, port)
                    .await
                    .with_context(|| format!("container {label}"))?;
            }
        }
        for (cmd, label, ci, pi) in started {
            self.start_container(cmd, label, ci, pi)?;
        }
        Ok(())
    }

    /// Spawns one container and supervises it; returns its pid.
    fn start_container(
        &mut self,
        cmd: tokio::process::Command,
        label: String,
        ci: usize,
        pi: usize,
    ) -> Result<Option<u32>> {
        let child = spawn(cmd).with_context(|| format!("starting container {label}"))?;
        let pid = child.id();
        if let Some(pid) = pid {
            self.containers
                .entry((ci, pi))
                .or_default()
                .push(pid as i32);
        }
        *self.running.entry((ci, pi)).or_default() += 1;
        self.supervise(
            child,
            label,
            Role::Container {
                cluster: ci,
                pod: pi,
            },
        );
        Ok(pid)
    }

    /// SIGTERM to each container's process group (the shell and what it started),
    /// then SIGKILL to what is left after a grace period.
    pub(super) async fn stop_containers(&mut self) {
        // Exits from here on are the lab's doing, not failures.
        while let Ok(exit) = self.exits.try_recv() {
            self.record(exit);
        }
        for signal in [Sig::SIGTERM, Sig::SIGKILL] {
            for pgid in self.containers.values().flatten() {
                let _ = killpg(Pid::from_raw(*pgid), signal);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// How long a server container gets to listen on its port.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// Waits until process `pid` has a TCP socket listening on `port` in its network
/// namespace (`/proc/PID/net/tcp*` lists that namespace's sockets).
async fn wait_listening(pid: u32, port: u16) -> Result<()> {
    let deadline = tokio::time::Instant::now() + LISTEN_WAIT;
    loop {
        let mut alive = false;
        for table in ["tcp", "tcp6"] {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
                alive = true;
                if listens_on(&text, port) {
                    return Ok(());
                }
            }
        }
        if !alive {
            bail!("exited before it listened on port {port}");
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "not listening on port {port} after {}s",
                LISTEN_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a `/proc/net/tcp`-style table has a socket in state LISTEN (`0A`) on `port`.
fn listens_on(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        state == Some("0A")
            && local
                .and_then(|l| l.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port)
    })
}

#[cfg(test)]
mod tests {
    use super::listens_on;

    #[test]
    fn a_listening_socket_is_found_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0A0012C6:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0A0012C6:0050 0B0012C6:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
";
        assert!(listens_on(table, 8080));
        // Port 80 is only an established connection here.
        assert!(!listens_on(table, 80));
        assert!(!listens_on(table, 9090));
    }
}
