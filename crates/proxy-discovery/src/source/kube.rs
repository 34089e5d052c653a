//! The Kubernetes API source: kube-runtime reflectors over this cluster's
//! Services and EndpointSlices, the metadata of its Pods (those labelled
//! `isthmus.io/meshed=true` are reached over their sidecar's tunnel only; an
//! endpoint whose `targetRef` names a pod not seen yet is not reached at all, so
//! a slice that arrives before its pod never opens a plain path; joined to
//! EndpointSlice endpoints by `targetRef`), and, with
//! [`KubeSource::with_mesh_kinds`], its Links and ClusterSettings, feeding the
//! same model, [`Snapshot`] and index as the directory source, published
//! through the same [`Discovery`] handle.
//!
//! Each object is converted by the manifest parser the directory source uses
//! (its JSON is a YAML document), so an object the model rejects fails exactly
//! as a bad manifest does, its "file" being the object's API path
//! (`/api/v1/namespaces/default/services/hello`) and the field named. Changes are
//! debounced into batches; a batch that does not build is logged, counted and
//! recorded with [`Discovery::report_failure`], and the last good snapshot keeps
//! serving. While the API is unreachable the reflectors keep their last state
//! (so does the snapshot), each watch failure is reported the same way, and on
//! recovery the watchers resume (or relist after a 410) and the changes made
//! meanwhile are published.
//!
//! Not here: ServiceMirrors. In a cluster the controller reconciles them and
//! writes the mirrored Services, which this source reads like any Service;
//! reconciling them again here, without the remote clusters' views, would
//! withdraw those Services. Nor Endpoints (EndpointSlices replace them), nor the
//! remote clusters (the controller's business), nor Link credentials (dropped
//! before parsing: only the controller reads them).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::api::Api;
use ::kube::core::PartialObjectMeta;
use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::watcher::{self, Event, watcher};
use ::kube::runtime::{WatchStreamExt, reflector as reflect};
use ::kube::{Client, Resource};
use futures_util::StreamExt;
use isthmus_vocab::{ClusterName, error_chain};
use k8s_openapi::api::core::v1::{Pod as KubePod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice as KubeEndpointSlice;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Discovery, DiscoveryError};
use crate::model::{
    ClusterSettingsResource, ClusterView, LinkResource, Parsed, Pod, parse_manifests,
};
use crate::snapshot::Snapshot;

/// How long changes are gathered into one batch by default.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// How long [`KubeSource::watch`] waits for the first complete lists by default.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How often, while watches are failing, the API is probed to tell when it is back.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// No client could be built from the config.
    #[error("kubernetes discovery: cannot build a client for {url}")]
    Client {
        /// The API server.
        url: String,
        /// kube's error.
        #[source]
        source: ::kube::Error,
    },
    /// The first lists did not complete in time (the API unreachable, or a
    /// resource not served, such as a CRD not installed).
    #[error(
        "kubernetes discovery: no complete list of {pending} from {url} within {timeout:?}{}",
        last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default()
    )]
    InitialSync {
        /// The API server.
        url: String,
        /// The resources still not listed, comma-separated.
        pending: String,
        /// How long the source waited.
        timeout: Duration,
        /// The last watch error seen, with its cause chain.
        last_error: Option<String>,
    },
    /// The first state does not build: there is no last good state to serve yet.
    #[error("kubernetes discovery: the first state from {url} is unusable")]
    Build {
        /// The API server.
        url: String,
        /// Why (boxed: the error is large and this path is cold).
        #[source]
        source: Box<DiscoveryError>,
    },
}

/// A Kubernetes API source for one cluster.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    /// The API server's URL when known, for messages.
    server: String,
    cluster: ClusterName,
    namespace: Option<String>,
    mesh_kinds: bool,
    debounce: Duration,
    sync_timeout: Duration,
    probe_interval: Duration,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("server", &self.server)
            .field("cluster", &self.cluster)
            .field("namespace", &self.namespace)
            .field("mesh_kinds", &self.mesh_kinds)
            .finish_non_exhaustive()
    }
}

/// The reflector stores one snapshot is built from.
struct Stores {
    services: Store<KubeService>,
    slices: Store<KubeEndpointSlice>,
    /// Meshed pods, metadata only: all a gateway needs to know of a pod, and far
    /// less to hold than every pod of the cluster.
    pods: Store<PartialObjectMeta<KubePod>>,
    links: Option<Store<LinkResource>>,
    settings: Option<Store<ClusterSettingsResource>>,
    /// Objects already converted, so a batch only converts what changed.
    converted: Mutex<Converted>,
}

/// Converted objects by (resource, namespace/name), with the resourceVersion
/// they were converted at.
#[derive(Default)]
struct Converted(HashMap<(&'static str, String), (String, Vec<Parsed>)>);

/// What the reflector tasks tell the builder.
enum Signal {
    /// Objects changed (or were relisted).
    Changed,
    /// A watch failed; the reflector retries with backoff.
    Failed(DiscoveryError),
}

/// Aborts the reflector tasks when the source stops (or is dropped).
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl KubeSource {
    /// A source reading cluster `cluster` through `client`, in all namespaces.
    /// Prefer [`KubeSource::from_config`], whose errors name the server's URL.
    pub fn new(client: Client, cluster: ClusterName) -> Self {
        Self::with_server(
            client,
            format!("the API server of cluster {cluster}"),
            cluster,
        )
    }

    /// A source reading cluster `cluster` through a client built from `config`
    /// (for example `kube::Config::infer()` in a pod).
    pub fn from_config(
        config: ::kube::Config,
        cluster: ClusterName,
    ) -> Result<Self, KubeSourceError> {
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|source| KubeSourceError::Client {
            url: server.clone(),
            source,
        })?;
        Ok(Self::with_server(client, server, cluster))
    }

    fn with_server(client: Client, server: String, cluster: ClusterName) -> Self {
        Self {
            client,
            server,
            cluster,
            namespace: None,
            mesh_kinds: false,
            debounce: DEFAULT_DEBOUNCE,
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
            probe_interval: DEFAULT_PROBE_INTERVAL,
        }
    }

    /// Reads only namespace `namespace` (for a proxy allowed no cluster-wide list).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Also watches Links (`multicluster.isthmus.io/v1alpha1`) and ClusterSettings,
    /// whose CRDs must then be installed: a gateway needs its Links to dial
    /// peers, and ClusterSettings say what is exported and where the gateway is.
    /// Without them the cluster has [`crate::model::ClusterSettings::defaults`].
    pub fn with_mesh_kinds(mut self) -> Self {
        self.mesh_kinds = true;
        self
    }

    /// How long changes are gathered into one batch (default [`DEFAULT_DEBOUNCE`]).
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// How long [`KubeSource::watch`] waits for the first lists
    /// (default [`DEFAULT_SYNC_TIMEOUT`]).
    pub fn sync_timeout(mut self, timeout: Duration) -> Self {
        self.sync_timeout = timeout;
        self
    }

    /// How often the API is probed while watches fail (default [`DEFAULT_PROBE_INTERVAL`]).
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    fn url(&self) -> String {
        self.server.clone()
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Lists and watches, waits for the first complete state, publishes it, and
    /// keeps publishing batches of changes until `shutdown` completes.
    ///
    /// Fails if the first lists do not complete within the sync timeout, or if
    /// the first state does not build. Afterwards, failures are reported on the
    /// handle and in the log, and the last good snapshot keeps serving.
    pub async fn watch(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(Discovery, JoinHandle<()>), KubeSourceError> {
        let (tx, mut rx) = mpsc::channel(64);
        let mut tasks = Tasks(Vec::new());
        let services = tasks.reflect(self.api::<KubeService>(), "services", &tx);
        let slices = tasks.reflect(self.api::<KubeEndpointSlice>(), "endpointslices", &tx);
        // Every pod, not only the labelled ones: an unlabelled pod is known to be
        // unmeshed, where a pod not seen at all is unknown and is not reached.
        let pods = tasks.reflect(self.api::<PartialObjectMeta<KubePod>>(), "pods", &tx);
        let (mut links, mut settings) = (None, None);
        if self.mesh_kinds {
            links = Some(tasks.reflect(self.api::<LinkResource>(), "links", &tx));
            let kind = self.api::<ClusterSettingsResource>();
            settings = Some(tasks.reflect(kind, "clustersettings", &tx));
        }
        let stores = Stores {
            services,
            slices,
            pods,
            links,
            settings,
            converted: Mutex::new(Converted::default()),
        };
        drop(tx);

        self.initial_sync(&stores, &mut rx).await?;
        let snapshot = self
            .build(&stores)
            .map_err(|source| KubeSourceError::Build {
                url: self.url(),
                source: Box::new(source),
            })?;
        log_loaded(&self.cluster, 1, &snapshot);
        let discovery = Discovery::new(snapshot);
        let task = tokio::spawn(self.run(discovery.clone(), stores, rx, tasks, shutdown));
        Ok((discovery, task))
    }

    async fn initial_sync(
        &self,
        stores: &Stores,
        rx: &mut mpsc::Receiver<Signal>,
    ) -> Result<(), KubeSourceError> {
        let deadline = tokio::time::Instant::now() + self.sync_timeout;
        let mut last_error = None;
        loop {
            let pending = stores.pending();
            if pending.is_empty() {
                return Ok(());
            }
            tokio::select! {
                signal = rx.recv() => match signal {
                    Some(Signal::Failed(e)) => last_error = Some(error_chain(&e)),
                    Some(Signal::Changed) => {}
                    None => return Err(self.sync_error(pending, last_error)),
                },
                () = tokio::time::sleep_until(deadline) => {
                    return Err(self.sync_error(pending, last_error));
                }
            }
        }
    }

    fn sync_error(&self, pending: Vec<&str>, last_error: Option<String>) -> KubeSourceError {
        KubeSourceError::InitialSync {
            url: self.url(),
            pending: pending.join(", "),
            timeout: self.sync_timeout,
            last_error,
        }
    }

    async fn run(
        self,
        discovery: Discovery,
        stores: Stores,
        mut rx: mpsc::Receiver<Signal>,
        tasks: Tasks,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        tokio::pin!(shutdown);
        let mut probe = tokio::time::interval(self.probe_interval.max(Duration::from_millis(10)));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the serving state may lag the API because watches failed.
        let mut api_failing = false;
        loop {
            let first = tokio::select! {
                () = &mut shutdown => break,
                signal = rx.recv() => match signal {
                    Some(s) => s,
                    None => break,
                },
                _ = probe.tick(), if api_failing => {
                    // A resumed watch with nothing new says nothing; ask the API
                    // directly so the state stops being marked stale once it is back.
                    if tokio::time::timeout(self.probe_interval, self.client.apiserver_version())
                        .await
                        .is_ok_and(|r| r.is_ok())
                    {
                        api_failing = false;
                        self.rebuild(&discovery, &stores, false);
                    }
                    continue;
                }
            };
            // Gather the rest of the batch.
            let mut changed = false;
            let mut failed = false;
            let mut handle = |signal: Signal| match signal {
                Signal::Changed => changed = true,
                Signal::Failed(err) => {
                    failed = true;
                    discovery.report_failure(&err);
                    tracing::error!(cluster = %self.cluster, error = %error_chain(&err),
                        failed_reloads = discovery.failed_reloads(),
                        "kubernetes discovery watch failed; the last good state keeps serving");
                }
            };
            handle(first);
            tokio::time::sleep(self.debounce).await;
            while let Ok(signal) = rx.try_recv() {
                handle(signal);
            }
            if failed {
                api_failing = true;
            } else if changed {
                api_failing = false;
            }
            if changed {
                self.rebuild(&discovery, &stores, api_failing);
            }
        }
        drop(tasks);
        tracing::debug!(cluster = %self.cluster, "kubernetes discovery stopped");
    }

    /// Builds and publishes a new state. An unchanged state is not published
    /// again (readers would see a new generation for nothing), except to clear
    /// the stale mark once the API is known to be reachable.
    fn rebuild(&self, discovery: &Discovery, stores: &Stores, api_failing: bool) {
        match self.build(stores) {
            Ok(snapshot)
                if *discovery.load().as_ref() == snapshot
                    && (api_failing || !discovery.status().stale) => {}
            Ok(snapshot) => {
                discovery.publish(snapshot);
                log_loaded(&self.cluster, discovery.generation(), &discovery.load());
            }
            Err(err) => {
                discovery.report_failure(&err);
                tracing::error!(cluster = %self.cluster, error = %error_chain(&err),
                    failed_reloads = discovery.failed_reloads(),
                    "kubernetes discovery update failed; the last good state keeps serving");
            }
        }
    }

    /// Converts what the stores hold and builds a snapshot, as the directory
    /// source does from files.
    fn build(&self, stores: &Stores) -> Result<Snapshot, DiscoveryError> {
        // Only the builder task converts; the lock is never contended.
        let mut converted = stores
            .converted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut seen = HashSet::new();
        let mut parsed = Vec::new();
        let mut batch = Batch {
            converted: &mut converted,
            seen: &mut seen,
            out: &mut parsed,
        };
        batch.convert_all("services", &stores.services, |_| {})?;
        batch.convert_all("endpointslices", &stores.slices, |_| {})?;
        batch.convert_all("pods", &stores.pods, |v| {
            // The API answers metadata as `meta.k8s.io/v1 PartialObjectMetadata`;
            // the model reads it as the Pod it describes.
            if let Value::Object(object) = v {
                object.insert("apiVersion".into(), Pod::API_VERSION.into());
                object.insert("kind".into(), Pod::KIND.into());
            }
        })?;
        if let Some(links) = &stores.links {
            batch.convert_all("links", links, |v| {
                // Credentials are the controller's; the model's LinkSpec rejects them.
                if let Some(Value::Object(spec)) = v.get_mut("spec") {
                    spec.remove("credentialsSecret");
                }
            })?;
        }
        if let Some(settings) = &stores.settings {
            batch.convert_all("clustersettings", settings, |_| {})?;
        }
        converted.0.retain(|key, _| seen.contains(key));
        drop(converted);
        let view = ClusterView::build(self.cluster.clone(), parsed)?;
        Ok(Snapshot::build(view, BTreeMap::new()))
    }
}

impl Stores {
    /// The resources whose first list has not completed.
    fn pending(&self) -> Vec<&'static str> {
        let mut pending = Vec::new();
        if !is_ready(&self.services) {
            pending.push("services");
        }
        if !is_ready(&self.slices) {
            pending.push("endpointslices");
        }
        if !is_ready(&self.pods) {
            pending.push("pods");
        }
        if self.links.as_ref().is_some_and(|s| !is_ready(s)) {
            pending.push("links");
        }
        if self.settings.as_ref().is_some_and(|s| !is_ready(s)) {
            pending.push("clustersettings");
        }
        pending
    }
}

fn is_ready<K>(store: &Store<K>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    // `wait_until_ready` completes once the first list is in.
    futures_util::FutureExt::now_or_never(store.wait_until_ready()).is_some()
}

impl Tasks {
    /// Starts a reflector for every object of `api`, which signals every change and
    /// failure on `tx`, and keeps its task; answers the store it fills.
    fn reflect<K>(
        &mut self,
        api: Api<K>,
        resource: &'static str,
        tx: &mpsc::Sender<Signal>,
    ) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    {
        let tx = tx.clone();
        let (reader, writer) = reflector::store();
        let path = api.resource_url().to_owned();
        let stream = reflect(
            writer,
            watcher(api, watcher::Config::default()).default_backoff(),
        );
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let signal = match item {
                    // A relist is applied to the store as a whole at InitDone.
                    Ok(Event::Init | Event::InitApply(_)) => continue,
                    Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)) => Signal::Changed,
                    Err(e) => Signal::Failed(DiscoveryError::Read {
                        path: PathBuf::from(&path),
                        source: io::Error::other(e),
                    }),
                };
                // A full channel already holds a pending rebuild; a failure dropped
                // here is already reflected by the ones queued before it.
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(signal) {
                    break;
                }
            }
            tracing::debug!(resource, "kubernetes discovery reflector ended");
        });
        self.0.push(task);
        reader
    }
}

/// One batch's conversion: reuses what is unchanged since the last one.
struct Batch<'a> {
    converted: &'a mut Converted,
    seen: &'a mut HashSet<(&'static str, String)>,
    out: &'a mut Vec<Parsed>,
}

impl Batch<'_> {
    /// Converts every object of `store` into the model, in a stable order.
    fn convert_all<K>(
        &mut self,
        resource: &'static str,
        store: &Store<K>,
        adjust: impl Fn(&mut Value),
    ) -> Result<(), DiscoveryError>
    where
        K: Resource<DynamicType = ()> + Clone + Serialize + 'static,
    {
        let mut objects: Vec<Arc<K>> = store.state();
        objects.sort_by_key(|o| (o.meta().namespace.clone(), o.meta().name.clone()));
        for obj in objects {
            let meta = obj.meta();
            let key = (
                resource,
                format!(
                    "{}/{}",
                    meta.namespace.as_deref().unwrap_or_default(),
                    meta.name.as_deref().unwrap_or_default()
                ),
            );
            let version = meta.resource_version.clone().unwrap_or_default();
            match self.converted.0.get(&key) {
                // Without a resourceVersion nothing says the object is unchanged.
                Some((at, parsed)) if *at == version && !version.is_empty() => {
                    self.out.extend(parsed.iter().cloned());
                }
                _ => {
                    let parsed = convert(obj.as_ref(), &adjust)?;
                    self.out.extend(parsed.iter().cloned());
                    self.converted.0.insert(key.clone(), (version, parsed));
                }
            }
            self.seen.insert(key);
        }
        Ok(())
    }
}

/// One API object through the manifest parser; the "file" in its errors is the
/// object's API path.
fn convert<K>(obj: &K, adjust: &impl Fn(&mut Value)) -> Result<Vec<Parsed>, DiscoveryError>
where
    K: Resource<DynamicType = ()> + Serialize,
{
    let meta = obj.meta();
    let label = K::url_path(&(), meta.namespace.as_deref())
        + "/"
        + meta.name.as_deref().unwrap_or("<unnamed>");
    let read_err = |e: serde_json::Error| DiscoveryError::Read {
        path: PathBuf::from(&label),
        source: io::Error::other(e),
    };
    let mut value = serde_json::to_value(obj).map_err(read_err)?;
    if let Some(Value::Object(meta)) = value.get_mut("metadata") {
        // Bulky and of no use to the model.
        meta.remove("managedFields");
    }
    adjust(&mut value);
    let text = serde_json::to_string(&value).map_err(read_err)?;
    Ok(parse_manifests(&label, &text)?)
}

fn log_loaded(cluster: &ClusterName, generation: u64, snapshot: &Snapshot) {
    tracing::info!(
        %cluster,
        generation,
        services = snapshot.local().services.len(),
        endpoint_slices = snapshot.local().endpoint_slices.len(),
        pods = snapshot.local().pods.len(),
        linked_clusters = snapshot.links().len(),
        "kubernetes discovery loaded"
    );
}
