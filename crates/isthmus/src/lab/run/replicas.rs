//! What a ReplicaSet controller and kubelet do while the lab runs: each
//! Deployment's `replicas`, as the API server holds it, followed by starting or
//! stopping pods (namespace, identity, capture, sidecar, containers, Pod object
//! and Endpoints), and a Pod deleted on the API server stopped, then replaced
//! since its Deployment still wants it.
//!
//! A pod stopped stays in the plan (its namespace too, until the lab ends), so
//! names and addresses are never reused. The Deployments of the mesh's own
//! namespace are the lab's to run (controller, gateway) and are left alone; a
//! pod whose containers exited by themselves still counts as a replica, as
//! nothing restarts containers in the lab.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use proxy_discovery::model;

use super::*;
use crate::install::NAMESPACE;

/// How long a new pod's sidecar gets to be ready before its containers start.
const SIDECAR_READY: Duration = Duration::from_secs(15);

impl Lab {
    /// One pass over cluster `ci`: Pods deleted on the API server are stopped,
    /// then each Deployment gets as many pods as its `replicas` (the newest
    /// stopped first).
    pub(super) async fn follow_replicas(&mut self, ci: usize) -> Result<()> {
        let client = self.apiservers[ci].client.clone();
        let mut wanted: BTreeMap<ServiceRef, model::Deployment> = BTreeMap::new();
        let list = Api::<Deployment>::all(client.clone())
            .list(&ListParams::default())
            .await
            .context("listing Deployments")?;
        for d in list.items {
            let key = ServiceRef::new(
                d.metadata.namespace.as_deref().unwrap_or("default"),
                d.metadata.name.as_deref().unwrap_or_default(),
            );
            if key.namespace == NAMESPACE {
                continue;
            }
            let parsed = serde_json::to_value(&d)
                .and_then(serde_json::from_value::<model::Deployment>)
                .with_context(|| format!("reading Deployment {key}"))?;
            wanted.insert(key, parsed);
        }
        let pods = Api::<Pod>::all(client)
            .list(&ListParams::default())
            .await
            .context("listing Pods")?;
        let held: BTreeSet<(String, String)> = pods
            .items
            .iter()
            .map(|p| {
                let m = &p.metadata;
                (
                    m.namespace.clone().unwrap_or_default(),
                    m.name.clone().unwrap_or_default(),
                )
            })
            .collect();
        let c = &self.plan.clusters[ci];
        let deleted: Vec<usize> = (0..c.pods.len())
            .filter(|pi| self.published.contains(&(ci, *pi)) && !self.stopped.contains(&(ci, *pi)))
            .filter(|pi| !held.contains(&(c.pods[*pi].namespace.clone(), c.pods[*pi].name.clone())))
            .collect();
        for pi in deleted {
            self.stop_pod(ci, pi, "its Pod was deleted");
        }

        let mut keys: BTreeSet<ServiceRef> = wanted.keys().cloned().collect();
        keys.extend(
            self.plan.clusters[ci]
                .pods
                .iter()
                .map(|p| ServiceRef::new(&p.namespace, &p.deployment)),
        );
        for key in keys {
            let live: Vec<usize> = (0..self.plan.clusters[ci].pods.len())
                .filter(|pi| !self.stopped.contains(&(ci, *pi)))
                .filter(|pi| {
                    let p = &self.plan.clusters[ci].pods[*pi];
                    p.namespace == key.namespace && p.deployment == key.name
                })
                .collect();
            let want = wanted.get(&key).map_or(0, |d| {
                usize::try_from(d.spec.replicas).unwrap_or(usize::MAX)
            });
            for &pi in live.iter().rev().take(live.len().saturating_sub(want)) {
                self.stop_pod(ci, pi, "its Deployment wants fewer replicas");
            }
            if let Some(d) = wanted.get(&key) {
                for _ in live.len()..want {
                    self.start_pod(ci, &key, d).await?;
                }
            }
        }
        Ok(())
    }

    /// Starts a new pod of Deployment `key` in cluster `ci`, ready (its sidecar
    /// answering, its servers listening) before it joins its Services'
    /// Endpoints. A Deployment the lab cannot run is reported once per
    /// template.
    async fn start_pod(
        &mut self,
        ci: usize,
        key: &ServiceRef,
        d: &model::Deployment,
    ) -> Result<()> {
        let cluster = self.plan.clusters[ci].spec.name.to_string();
        let template = serde_json::to_string(&d.spec.template).unwrap_or_default();
        if self.refused.contains(&(ci, key.clone(), template.clone())) {
            return Ok(());
        }
        let pod = self
            .plan
            .next_pod(ci, key, d)
            .with_context(|| format!("scaling Deployment {key} of cluster {cluster}"))?;
        if let Some(e) = pod
            .containers
            .iter()
            .find_map(|k| containers::workload(&cluster, &pod, k).err())
        {
            println!("[{cluster}] not starting a pod: {e:#}");
            self.refused.insert((ci, key.clone(), template));
            return Ok(());
        }
        // Not ready until it has started.
        self.gone.insert(pod.ip);
        self.plan.clusters[ci].pods.push(pod);
        let pi = self.plan.clusters[ci].pods.len() - 1;
        let started = self.start_pushed(ci, pi).await;
        if started.is_err() {
            // Tried once per template: a pod that cannot start would fail again.
            self.refused.insert((ci, key.clone(), template));
            self.stop_pod(ci, pi, "it failed to start");
        }
        started.with_context(|| format!("starting a pod of Deployment {key} in cluster {cluster}"))
    }

    /// Brings pod `pi` of cluster `ci`, just planned, up to ready.
    async fn start_pushed(&mut self, ci: usize, pi: usize) -> Result<()> {
        let cluster = self.plan.clusters[ci].spec.name.to_string();
        let (name, identity, meshed) = {
            let p = &self.plan.clusters[ci].pods[pi];
            (p.name.clone(), p.identity.clone(), p.meshed)
        };
        if meshed {
            self.mint_leaf(ci, &name, &identity)?;
        }
        let bin = self.dir(&["bin"]);
        let ips = self
            .views
            .get(ci)
            .map(|v| v.ips.clone())
            .unwrap_or_default();
        self.place_pod(ci, pi, &bin, &ips)?;
        self.apply_rules(ci)?;
        jump_to_services(&self.pod_ns[&(ci, pi)])?;
        // Projects the discovery ConfigMap into its volume, as kubelet does
        // before it starts a pod.
        self.sync().await?;
        self.start_sidecar(ci, pi, &bin)?;
        if meshed {
            let ns = self.pod_ns[&(ci, pi)].clone();
            let deadline = tokio::time::Instant::now() + SIDECAR_READY;
            while let Some(why) = not_ready(&ns, &[]).await {
                if tokio::time::Instant::now() >= deadline {
                    bail!("the sidecar of pod {cluster}/{name} is not ready: {why}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.start_containers(&[(ci, pi)]).await?;
        let ip = self.plan.clusters[ci].pods[pi].ip;
        self.gone.remove(&ip);
        self.unpublished.insert(ci);
        self.apply_rules(ci)
    }

    /// Stops pod `pi` of cluster `ci` for good: its containers and sidecar get
    /// SIGTERM (the containers' groups SIGKILL 2 s later; the sidecar ends
    /// within its shutdown grace), and it leaves its Services at once.
    fn stop_pod(&mut self, ci: usize, pi: usize, why: &str) {
        if !self.stopped.insert((ci, pi)) {
            return;
        }
        let c = &self.plan.clusters[ci];
        let pod = &c.pods[pi];
        let label = format!("{}/{}", c.spec.name, pod.name);
        println!(
            "[{}] pod {}/{} stopped: {why}",
            c.spec.name, pod.namespace, pod.name
        );
        let groups = self.containers.get(&(ci, pi)).cloned().unwrap_or_default();
        let sidecar = self.sidecars.get(&(ci, pi)).copied();
        if let Some(pid) = sidecar {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Sig::SIGTERM);
        }
        let signal_all = move |signal| {
            for pgid in &groups {
                let _ = killpg(Pid::from_raw(*pgid), signal);
            }
        };
        signal_all(Sig::SIGTERM);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            signal_all(Sig::SIGKILL);
        });
        self.leave_endpoints(ci, pi, &label);
    }
}
