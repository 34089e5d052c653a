//! Wiring: the metrics endpoint and the leader election run always; while this
//! replica leads, the kube-runtime `Controller` on ServiceMirrors (triggered by
//! local Services, Links and remote watches), the ConfigMap publisher and the
//! clean-up of unused remote watches run, and all of them stop at once when the
//! lead is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service as KubeService};
use kube::Api;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::kinds::{LinkResource, MirrorObject};
use crate::lease::{Elector, Leadership, LeaseConfig};
use crate::metrics::{Endpoint, Metrics};
use crate::mirror::{self, Context, ReconcileTiming, SettingsSource};
use crate::publish::Publisher;
use crate::remote::{RemoteTiming, Remotes};

/// Everything the controller needs to run, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The control-plane namespace: Links, their Secrets, ClusterSettings, the
    /// Lease and the published ConfigMap.
    pub namespace: String,
    /// Where the cluster's settings come from.
    pub settings: SettingsSource,
    /// Leader election; `None` runs as the only writer without a Lease.
    pub lease: Option<LeaseConfig>,
    /// Where `/metrics`, `/ready`, `/live` are served; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// The name of the sidecars' discovery ConfigMap.
    pub configmap: String,
    /// How often the ConfigMap is re-rendered from the caches (written only when
    /// it changed).
    pub publish_interval: Duration,
    /// Remote watch timing.
    pub remote: RemoteTiming,
    /// Reconcile timing.
    pub timing: ReconcileTiming,
}

/// The controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The metrics address could not be bound.
    #[error("--metrics-addr {addr}: cannot bind")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running controller.
pub struct Running {
    metrics_addr: Option<SocketAddr>,
    leadership: Leadership,
    metrics: Metrics,
    /// Cancelled by [`Running::stop`]: every task holds a clone.
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Where the metrics endpoint listens (the bound port when `:0` was asked).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Whether this replica leads now.
    pub fn is_leading(&self) -> bool {
        self.leadership.is_leading()
    }

    /// A view of this replica's leadership that outlives [`Running::stop`].
    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// The metrics, as `/metrics` would render them.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops writing at once, releases the Lease, and waits for every task.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in std::mem::take(&mut self.tasks) {
            // A task that panicked has nothing left to clean up.
            let _ = task.await;
        }
    }

    /// Runs until `signal`, then stops.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.stop().await;
    }
}

impl Drop for Running {
    /// Dropping without [`Running::stop`] ends every task at once, like a crash:
    /// the Lease is not released, so a successor waits out its duration.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the controller on `client`'s cluster.
pub async fn start(client: kube::Client, config: Config) -> Result<Running, RunError> {
    let shutdown = CancellationToken::new();
    let shutdown_rx = shutdown.clone();
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let remotes_slot: Arc<Mutex<Option<Remotes>>> = Arc::new(Mutex::new(None));
    let mut tasks = Vec::new();

    let leadership = match &config.lease {
        Some(lease) => {
            let (elector, leadership) = Elector::new(client.clone(), lease.clone());
            tasks.push(tokio::spawn(
                elector.run(shutdown_rx.clone().cancelled_owned()),
            ));
            leadership
        }
        None => Leadership::always(),
    };

    let metrics_addr = match config.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| RunError::Bind { addr, source })?;
            let endpoint = Endpoint {
                metrics: metrics.clone(),
                remotes: remotes_slot.clone(),
                leadership: leadership.clone(),
                ready: ready.clone(),
            };
            tasks.push(tokio::spawn(
                endpoint.serve(listener, shutdown_rx.clone().cancelled_owned()),
            ));
            Some(bound)
        }
        None => None,
    };

    let main = {
        let mut leadership = leadership.clone();
        let metrics = metrics.clone();
        let shutdown_rx = shutdown_rx.clone();
        async move {
            loop {
                tokio::select! {
                    () = shutdown_rx.cancelled() => break,
                    () = leadership.leading() => {}
                }
                metrics.set_leader(true);
                tracing::info!(namespace = %config.namespace, "leading: reconciling ServiceMirrors");
                let mut lost = leadership.clone();
                tokio::select! {
                    () = shutdown_rx.cancelled() => {}
                    () = lost.lost() => {
                        tracing::warn!("not leading any more: stopped reconciling and writing");
                    }
                    () = lead(client.clone(), &config, metrics.clone(), leadership.clone(), remotes_slot.clone(), ready.clone()) => {}
                }
                // Dropping `lead` cancelled every write in flight; the remote
                // watches go with it.
                if let Some(remotes) = remotes_slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                {
                    remotes.clear();
                }
                metrics.set_leader(false);
                if shutdown_rx.is_cancelled() {
                    break;
                }
            }
        }
    };
    tasks.push(tokio::spawn(main));

    Ok(Running {
        metrics_addr,
        leadership,
        metrics,
        shutdown,
        tasks,
    })
}

/// Everything a leader runs; returns only if all of it ends (it should not).
async fn lead(
    client: kube::Client,
    config: &Config,
    metrics: Metrics,
    leadership: Leadership,
    remotes_slot: Arc<Mutex<Option<Remotes>>>,
    synced: Arc<AtomicBool>,
) {
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel::<ObjectRef<MirrorObject>>();
    let remotes = Remotes::new(client.clone(), config.remote, trigger_tx);
    *remotes_slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(remotes.clone());

    let (services, service_events) = cache(Api::<KubeService>::all(client.clone()));
    let service_events = service_events.touched_objects();
    let links = Api::<LinkResource>::namespaced(client.clone(), &config.namespace);
    let (links, link_events) = cache(links);
    let link_events = link_events.touched_objects();

    // Where the discovery ConfigMap is published: every namespace, so a pod of any
    // namespace can mount it (a ConfigMap volume reads its own namespace only).
    let (namespaces, namespace_events) = cache(Api::<Namespace>::all(client.clone()));
    let namespace_events = namespace_events.for_each(|event| async move {
        if let Err(e) = event {
            tracing::debug!(error = %e, "namespace watch");
        }
    });

    let controller = Controller::new(
        Api::<MirrorObject>::all(client.clone()),
        watcher::Config::default(),
    );
    let mirrors = controller.store();
    let (m1, m2, m3) = (mirrors.clone(), mirrors.clone(), mirrors.clone());
    let remote_triggers = futures_util::stream::unfold(trigger_rx, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    let ctx = Arc::new(Context {
        client: client.clone(),
        namespace: config.namespace.clone(),
        settings: config.settings.clone(),
        services: services.clone(),
        links: links.clone(),
        remotes: remotes.clone(),
        leadership: leadership.clone(),
        metrics: metrics.clone(),
        timing: config.timing,
        events: crate::events::Events::new(
            client.clone(),
            config
                .lease
                .as_ref()
                .map_or(crate::events::REPORTER, |l| l.identity.as_str()),
        ),
        invalid_reported: std::sync::Mutex::default(),
    });
    let run = controller
        .watches_stream(service_events, move |svc| {
            mirror::mirrors_for_service(&m1, &svc)
        })
        .watches_stream(link_events, move |link| {
            mirror::mirrors_for_link(&m2, &link)
        })
        .reconcile_on(remote_triggers)
        .run(mirror::reconcile_mirror, mirror::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %isthmus_vocab::error_chain(&e), "controller event");
            }
        });

    let publish = {
        let (client, services, links, metrics, leadership) = (
            client.clone(),
            services.clone(),
            links.clone(),
            metrics.clone(),
            leadership.clone(),
        );
        let (namespace, name, settings) = (
            config.namespace.clone(),
            config.configmap.clone(),
            config.settings.clone(),
        );
        let interval = config.publish_interval;
        async move {
            // An empty cache must not be published as "no mirrored Services".
            if services.wait_until_ready().await.is_err()
                || links.wait_until_ready().await.is_err()
                || m3.wait_until_ready().await.is_err()
            {
                return;
            }
            let mut publishers: BTreeMap<String, Publisher> = BTreeMap::new();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !leadership.is_leading() {
                    // A new leader republishes everything once.
                    publishers.clear();
                    continue;
                }
                let settings = match mirror::cluster_settings(&client, &namespace, &settings).await
                {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %isthmus_vocab::error_chain(&e), "cannot publish the discovery ConfigMap");
                        continue;
                    }
                };
                let wanted = discovery_namespaces(&namespace, &namespaces.state());
                publishers.retain(|ns, _| wanted.contains(ns));
                for ns in wanted {
                    let publisher = publishers
                        .entry(ns.clone())
                        .or_insert_with(|| Publisher::new(client.clone(), &ns, &name));
                    match publisher.publish(&settings, &links, &services).await {
                        Ok(true) => {
                            metrics.published();
                            tracing::info!(configmap = %publisher.key(), "published the discovery ConfigMap");
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %isthmus_vocab::error_chain(&e), "cannot publish the discovery ConfigMap")
                        }
                    }
                }
                // The first full sync: every cache holds the API server's first
                // list, and the discovery ConfigMap has been written from them.
                if !synced.swap(true, Ordering::AcqRel) {
                    tracing::info!("first full sync done: ready");
                }
            }
        }
    };

    let sweep = {
        let interval = config.publish_interval;
        async move {
            if mirrors.wait_until_ready().await.is_err()
                || services.wait_until_ready().await.is_err()
            {
                return;
            }
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
            loop {
                tick.tick().await;
                remotes.retain(|m| mirrors.get(m).is_some());
                mirror::delete_orphans(&client, &services, &mirrors, &leadership).await;
            }
        }
    };

    tokio::join!(run, publish, sweep, namespace_events);
}

/// Label with which a namespace opts out of the discovery ConfigMap.
pub const DISCOVERY_LABEL: &str = "isthmus.io/discovery";

/// The namespaces that get the discovery ConfigMap: the control plane's, and
/// every other one that is not the cluster's own (`kube-*`), not being deleted, and
/// not labelled `isthmus.io/discovery: disabled`.
/// A cache of what `api` lists, and the stream of watch events that keeps it (and
/// must be polled for it to fill), backing off while the API server errs.
fn cache<K>(
    api: Api<K>,
) -> (
    reflector::Store<K>,
    impl futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let events = reflector::reflector(writer, watcher(api, watcher::Config::default()));
    (store, events.default_backoff())
}

fn discovery_namespaces(control_plane: &str, namespaces: &[Arc<Namespace>]) -> BTreeSet<String> {
    let mut wanted: BTreeSet<String> = namespaces
        .iter()
        .filter(|ns| {
            let terminating = ns.status.as_ref().and_then(|s| s.phase.as_deref())
                == Some("Terminating")
                || ns.metadata.deletion_timestamp.is_some();
            let opted_out = ns
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(DISCOVERY_LABEL))
                .is_some_and(|v| v == "disabled");
            !terminating && !opted_out
        })
        .filter_map(|ns| ns.metadata.name.clone())
        .filter(|name| !name.starts_with("kube-"))
        .collect();
    wanted.insert(control_plane.to_owned());
    wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(name: &str, labels: &[(&str, &str)], phase: Option<&str>) -> Arc<Namespace> {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.to_owned());
        if !labels.is_empty() {
            ns.metadata.labels = Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            );
        }
        if let Some(phase) = phase {
            ns.status = Some(k8s_openapi::api::core::v1::NamespaceStatus {
                phase: Some(phase.to_owned()),
                ..Default::default()
            });
        }
        Arc::new(ns)
    }

    #[test]
    fn the_configmap_goes_to_every_application_namespace() {
        let all = [
            namespace("default", &[], Some("Active")),
            namespace("shop", &[], None),
            namespace("kube-system", &[], Some("Active")),
            namespace("legacy", &[(DISCOVERY_LABEL, "disabled")], None),
            namespace("leaving", &[], Some("Terminating")),
        ];
        let wanted = discovery_namespaces("isthmus-system", &all);
        assert_eq!(
            wanted.into_iter().collect::<Vec<_>>(),
            ["default", "isthmus-system", "shop"]
        );
    }
}
