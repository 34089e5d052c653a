//! What a node's agents do with a lab cluster's API server: the pods the lab
//! runs are published as Pod objects (labelled meshed when they run a sidecar)
//! and their Services' EndpointSlices written as the endpoints controller would
//! (kubelet and the endpoints controller); each meshed pod's discovery volume is
//! the `isthmus-discovery` ConfigMap of its namespace, projected as kubelet does;
//! and every pod's hosts file (DNS) and kube-proxy rules follow the Services the
//! API server holds, mirrored ones included. Also here: a pod's place on the
//! node (its namespace on the cluster's bridge, routes, hosts file, capture)
//! and the kube-proxy chain in each pod.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use proxy_discovery::model::{ClusterIp, MESHED_POD_LABEL, MIRRORED_SERVICE_LABEL};
use proxy_discovery::{DirSource, ServiceRef};
use serde_json::json;

use std::path::Path;

use isthmus_netns::{Namespace, run_checked, run_with_input};

use super::super::plan::{SERVICES_CHAIN, ServiceRoute, TUNNEL_PORT, hosts_file, service_rules};
use super::super::project::{mount_dir, project};
use super::{Lab, SERVICE_RANGE, control};
use crate::install::{DISCOVERY_CONFIGMAP, DISCOVERY_MOUNT, GATEWAY, NAMESPACE};

/// The field manager of what the lab's node agents write.
const NODE_MANAGER: &str = "isthmus-lab-node";

/// What the API server said about a cluster's Services at the last sync.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct ServiceView {
    /// Every Service with a ClusterIP.
    pub ips: BTreeMap<ServiceRef, IpAddr>,
    /// The ports of mirrored Services (no local pod backs them).
    pub mirrored: Vec<ServiceRoute>,
    /// The gateway Service's ClusterIP.
    pub gateway: Option<IpAddr>,
}

impl Lab {
    /// Writes cluster `ci`'s Pods and its Services' EndpointSlices as they are
    /// now (pods whose containers are all gone are deleted and leave the slices).
    pub(super) async fn publish_pods(&mut self, ci: usize) -> Result<()> {
        let c = &self.plan.clusters[ci];
        let client = &self.apiservers[ci].client;
        let apply = PatchParams::apply(NODE_MANAGER).force();
        let ready = self.ready();
        let mut published = Vec::new();
        let mut withdrawn = Vec::new();
        for (pi, pod) in c.pods.iter().enumerate() {
            let pods: Api<k8s_openapi::api::core::v1::Pod> =
                Api::namespaced(client.clone(), &pod.namespace);
            if !ready(pod) {
                if self.published.contains(&(ci, pi)) {
                    let _ = pods.delete(&pod.name, &DeleteParams::default()).await;
                    withdrawn.push((ci, pi));
                }
                continue;
            }
            let mut labels = pod.labels.clone();
            if pod.meshed {
                labels.insert(MESHED_POD_LABEL.to_owned(), "true".to_owned());
            }
            let object = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": labels},
                "spec": {"containers": pod.containers.iter().map(|k| json!({"name": k.name, "image": k.image})).collect::<Vec<_>>()},
            });
            pods.patch(&pod.name, &apply, &Patch::Apply(&object))
                .await
                .with_context(|| format!("publishing Pod {}/{}", pod.namespace, pod.name))?;
            published.push((ci, pi));
        }
        for e in self.plan.endpoints(c, &ready) {
            let ns = e.metadata.namespace().to_owned();
            let service = e.metadata.name.clone();
            let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
                Api::namespaced(client.clone(), &ns);
            let mut subsets = e.subsets.clone();
            if subsets.is_empty() {
                subsets.push(Default::default());
            }
            for (i, s) in subsets.iter().enumerate() {
                let name = format!("{service}-lab{i}");
                let endpoints: Vec<_> = s
                    .addresses
                    .iter()
                    .map(|a| {
                        let mut ep =
                            json!({"addresses": [a.ip.to_string()], "conditions": {"ready": true}});
                        if let Some(t) = &a.target_ref {
                            ep["targetRef"] =
                                json!({"kind": "Pod", "name": t.name, "namespace": t.namespace});
                        }
                        ep
                    })
                    .collect();
                let ports: Vec<_> = s
                    .ports
                    .iter()
                    .map(|p| json!({"name": p.name.clone().unwrap_or_default(), "port": p.port, "protocol": "TCP"}))
                    .collect();
                let object = json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": name, "namespace": ns,
                                 "labels": {"kubernetes.io/service-name": service}},
                    "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
                });
                slices
                    .patch(&name, &apply, &Patch::Apply(&object))
                    .await
                    .with_context(|| format!("publishing EndpointSlice {ns}/{name}"))?;
            }
        }
        drop(ready);
        for key in withdrawn {
            self.published.remove(&key);
        }
        self.published.extend(published);
        Ok(())
    }

    /// The gateway's own Pod and EndpointSlice: what its Service's ClusterIP
    /// leads to.
    pub(super) async fn publish_gateway(&self, ci: usize) -> Result<()> {
        let c = &self.plan.clusters[ci];
        let client = &self.apiservers[ci].client;
        let apply = PatchParams::apply(NODE_MANAGER).force();
        let name = format!("{GATEWAY}-lab0");
        let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            Api::namespaced(client.clone(), NAMESPACE);
        let object = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": GATEWAY}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [c.gateway_ip.to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": crate::install::TUNNEL_PORT_NAME, "port": TUNNEL_PORT, "protocol": "TCP"}],
        });
        slices
            .patch(&name, &apply, &Patch::Apply(&object))
            .await
            .with_context(|| format!("publishing EndpointSlice {NAMESPACE}/{name}"))?;
        Ok(())
    }

    /// The Services of cluster `ci` as its API server holds them.
    pub(super) async fn service_view(&self, ci: usize) -> Result<ServiceView> {
        let services: Api<Service> = Api::all(self.apiservers[ci].client.clone());
        let list = services
            .list(&ListParams::default())
            .await
            .context("listing Services")?;
        let mut view = ServiceView::default();
        for svc in list.items {
            let ns = svc.metadata.namespace.clone().unwrap_or_default();
            let name = svc.metadata.name.clone().unwrap_or_default();
            let spec = svc.spec.unwrap_or_default();
            let Some(ip) = spec
                .cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let key = ServiceRef::new(&ns, &name);
            view.ips.insert(key.clone(), ip);
            if ns == NAMESPACE && name == GATEWAY {
                view.gateway = Some(ip);
            }
            let mirrored = svc
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MIRRORED_SERVICE_LABEL))
                .is_some_and(|v| v == "true");
            if mirrored {
                for p in spec.ports.iter().flatten() {
                    if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                        continue;
                    }
                    let port = u16::try_from(p.port).unwrap_or_default();
                    view.mirrored.push(ServiceRoute {
                        service: key.clone(),
                        front: SocketAddr::new(ip, port),
                        backends: Vec::new(),
                    });
                }
            }
        }
        Ok(view)
    }

    /// One pass of the node agents over every cluster: Services into hosts
    /// files and kube-proxy rules when they changed, each namespace's discovery
    /// ConfigMap into its meshed pods' volumes. Returns what is not settled yet
    /// (per cluster): a ServiceMirror the controller has not reconciled, a
    /// ConfigMap not published, a mirrored Service it does not hold yet.
    pub(super) async fn sync(&mut self) -> Result<Vec<(usize, String)>> {
        let mut missing = Vec::new();
        for ci in 0..self.plan.clusters.len() {
            // Mirrors first: a mirror reported done has its Service in the view.
            for pending in self.report_mirrors(ci).await? {
                missing.push((ci, pending));
            }
            let view = self.service_view(ci).await?;
            if self.views.get(ci) != Some(&view) {
                // kube-proxy programs the ClusterIPs the API server allocated.
                for (key, svc) in self.plan.clusters[ci].services.iter_mut() {
                    if let Some(ip) = view.ips.get(key) {
                        svc.spec.cluster_ip = Some(ClusterIp::Addr(*ip));
                        svc.spec.cluster_ips.clear();
                    }
                }
                let c = &self.plan.clusters[ci];
                for (pi, pod) in c.pods.iter().enumerate() {
                    if let Some(ns) = self.pod_ns.get(&(ci, pi)) {
                        ns.write_hosts(&hosts_file(c, pod, &view.ips))?;
                    }
                }
                if self.views.len() <= ci {
                    self.views.resize(ci + 1, ServiceView::default());
                }
                self.views[ci] = view;
                self.apply_rules(ci)?;
            }
            let c = &self.plan.clusters[ci];
            let namespaces: BTreeSet<&str> = c
                .pods
                .iter()
                .filter(|p| p.meshed)
                .map(|p| p.namespace.as_str())
                .collect();
            for ns in namespaces {
                let maps: Api<ConfigMap> = Api::namespaced(self.apiservers[ci].client.clone(), ns);
                let Some(map) = maps.get_opt(DISCOVERY_CONFIGMAP).await? else {
                    missing.push((ci, format!("ConfigMap {ns}/{DISCOVERY_CONFIGMAP}")));
                    continue;
                };
                let files: Vec<(String, String)> =
                    map.data.unwrap_or_default().into_iter().collect();
                let name = c.spec.name.as_str();
                let mut projected = None;
                for pod in c.pods.iter().filter(|p| p.meshed && p.namespace == ns) {
                    let dir = mount_dir(&self.pod_root(name, &pod.name), DISCOVERY_MOUNT);
                    project(&dir, &files).with_context(|| {
                        format!(
                            "projecting ConfigMap {ns}/{DISCOVERY_CONFIGMAP} into pod {name}/{}",
                            pod.name
                        )
                    })?;
                    projected = Some(dir);
                }
                // Whether the sidecars know every mirrored Service the API
                // server holds (the controller publishes each a moment after
                // it applies it).
                let known = projected
                    .and_then(|dir| {
                        DirSource::new(dir)
                            .with_cluster(c.spec.name.clone())
                            .load()
                            .ok()
                    })
                    .map(|s| s.local().services.keys().cloned().collect::<BTreeSet<_>>())
                    .unwrap_or_default();
                for route in self.views[ci]
                    .mirrored
                    .iter()
                    .filter(|r| r.service.namespace == ns)
                {
                    if !known.contains(&route.service) {
                        missing.push((
                            ci,
                            format!(
                                "mirrored Service {} in ConfigMap {ns}/{DISCOVERY_CONFIGMAP}",
                                route.service
                            ),
                        ));
                    }
                }
            }
        }
        Ok(missing)
    }

    /// Prints each ServiceMirror's state as the controller reports it, when it
    /// changes: mirrored, or why not.
    async fn report_mirrors(&mut self, ci: usize) -> Result<Vec<String>> {
        let mut pending = Vec::new();
        let gvk = kube::core::GroupVersionKind::gvk("linkerd.io", "v1alpha1", "ServiceMirror");
        let resource = kube::discovery::ApiResource::from_gvk_with_plural(&gvk, "servicemirrors");
        let mirrors: Api<kube::api::DynamicObject> =
            Api::all_with(self.apiservers[ci].client.clone(), &resource);
        let c = &self.plan.clusters[ci];
        for m in mirrors.list(&ListParams::default()).await?.items {
            let key = format!(
                "{}/{}",
                m.metadata.namespace.as_deref().unwrap_or_default(),
                m.metadata.name.as_deref().unwrap_or_default()
            );
            let conditions = m.data["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            // The controller's condition (isthmus-controller's `MIRRORED_CONDITION`).
            let Some(cond) = conditions.iter().find(|c| c["type"] == "Mirrored") else {
                pending.push(format!("ServiceMirror {key} (not reconciled yet)"));
                continue;
            };
            // A refusal that only time mends (the Link or the remote Service
            // not seen yet) is waited for; one that the manifests cause is not.
            let settled = cond["status"] == "True"
                || ["NotExported", "NameConflict", "NoAddressLeft"]
                    .iter()
                    .any(|r| cond["reason"] == *r);
            if !settled {
                pending.push(format!(
                    "ServiceMirror {key} ({})",
                    cond["reason"].as_str().unwrap_or_default()
                ));
            }
            let line = if cond["status"] == "True" {
                format!(
                    "mirrored {} from {}",
                    m.data["spec"]["service"]["name"]
                        .as_str()
                        .unwrap_or_default(),
                    m.data["spec"]["cluster"].as_str().unwrap_or_default()
                )
            } else {
                format!(
                    "{}: {}",
                    cond["reason"].as_str().unwrap_or_default(),
                    cond["message"].as_str().unwrap_or_default()
                )
            };
            if self.mirror_states.get(&(ci, key.clone())) != Some(&line) {
                println!("[{}] ServiceMirror {key}: {line}", c.spec.name);
                self.mirror_states.insert((ci, key), line);
            }
        }
        Ok(pending)
    }

    /// The kube-proxy routes of cluster `ci` beyond its planned Services: the
    /// mirrored ones (rejected: only a sidecar carries them) and the gateway's.
    pub(super) fn api_routes(&self, ci: usize) -> Vec<ServiceRoute> {
        let Some(view) = self.views.get(ci) else {
            return Vec::new();
        };
        let mut routes = view.mirrored.clone();
        if let Some(ip) = view.gateway {
            routes.push(ServiceRoute {
                service: ServiceRef::new(NAMESPACE, GATEWAY),
                front: SocketAddr::new(ip, TUNNEL_PORT),
                backends: vec![SocketAddr::new(
                    IpAddr::V4(self.plan.clusters[ci].gateway_ip),
                    TUNNEL_PORT,
                )],
            });
        }
        routes
    }
}

impl Lab {
    /// Pod `pi` of cluster `ci`: its namespace on the cluster's bridge, its hosts
    /// file naming the Services `ips`, and the capture when it is meshed.
    pub(super) fn place_pod(
        &mut self,
        ci: usize,
        pi: usize,
        bin: &Path,
        ips: &BTreeMap<ServiceRef, IpAddr>,
    ) -> Result<()> {
        let lab = self.lab_ns()?;
        let c = &self.plan.clusters[ci];
        let name = c.spec.name.as_str();
        let pod = &c.pods[pi];
        let ns = self.net.namespace(&format!("{name}-{}", pod.name))?;
        self.net
            .attach_at(&lab, &self.bridges[ci], &ns, "eth0", (pod.ip, 24))?;
        ns.add_route(SERVICE_RANGE, &c.bridge_ip.to_string())?;
        ns.add_route(&control::api_route(), &c.bridge_ip.to_string())?;
        ns.write_hosts(&hosts_file(c, pod, ips))?;
        if pod.meshed {
            run_checked(
                ns.command(bin.join("isthmus-init"))
                    .args(["--backend", "nft"]),
            )
            .with_context(|| format!("installing the capture in pod {name}/{}", pod.name))?;
        }
        println!(
            "[{name}] pod {}/{} at {}{} (ip netns exec {ns} ...)",
            pod.namespace,
            pod.name,
            pod.ip,
            if pod.meshed { "" } else { ", unmeshed" }
        );
        self.pod_ns.insert((ci, pi), ns);
        Ok(())
    }

    /// (Re)programs cluster `ci`'s Services in each of its pods (the chain
    /// [`jump_to_services`] leads to).
    pub(super) fn apply_rules(&self, ci: usize) -> Result<()> {
        let c = &self.plan.clusters[ci];
        let mut routes = self.plan.service_routes(c, &self.ready());
        routes.extend(self.api_routes(ci));
        let rules = service_rules(&routes);
        for pi in 0..c.pods.len() {
            let Some(ns) = self.pod_ns.get(&(ci, pi)) else {
                continue;
            };
            run_with_input(ns.command("iptables-nft-restore").arg("--noflush"), &rules)
                .with_context(|| {
                    format!(
                        "programming the Services of cluster {} in {ns}",
                        c.spec.name
                    )
                })?;
        }
        Ok(())
    }
}

/// Sends the connections of the pod in `ns` through the kube-proxy chain, after
/// the capture's own jump so the app's connections reach the sidecar first.
pub(super) fn jump_to_services(ns: &Namespace) -> Result<()> {
    for table in ["nat", "filter"] {
        run_checked(ns.command("iptables-nft").args([
            "-t",
            table,
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            SERVICES_CHAIN,
        ]))?;
    }
    Ok(())
}
