//! Remote clusters: API clients built from each Link's credentials Secret, and one
//! watch per (link, remote Service) that some ServiceMirror needs.
//!
//! A [`Remotes`] registry records which mirror needs which remote Service. The
//! first mirror to need one starts its watch; the watch ends when no mirror needs
//! it any more (the mirror points elsewhere, is deleted, or its Link's credentials
//! change, which gives the watch a new key). Each watch keeps the last state it
//! saw, whether the remote answers (the watch is healthy and a periodic probe
//! succeeds), and when it last answered; on any change it wakes the mirrors that
//! need it. What to do with that state is [`crate::mirror`]'s business.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use isthmus_vocab::ClusterName;
use k8s_openapi::api::core::v1::{Secret, Service as KubeService};
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use proxy_discovery::model::{ClusterSettingsSpec, Link};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::kinds::{ClusterSettingsResource, LinkResource, MirrorObject};

/// Why a remote cluster cannot be reached at all: its credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The Link names no credentials Secret.
    #[error(
        "Link {link}: spec.credentialsSecret is not set; the controller cannot reach cluster {cluster}"
    )]
    NoSecretNamed {
        /// `namespace/name` of the Link.
        link: String,
        /// The Link's target cluster.
        cluster: ClusterName,
    },
    /// Reading the Secret failed (absent, forbidden, API down).
    #[error("Link {link}: cannot read Secret {secret}")]
    Read {
        /// `namespace/name` of the Link.
        link: String,
        /// `namespace/name` of the Secret.
        secret: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The Secret lacks the kubeconfig key.
    #[error("Link {link}: Secret {secret} has no key {key:?}")]
    NoKey {
        /// `namespace/name` of the Link.
        link: String,
        /// `namespace/name` of the Secret.
        secret: String,
        /// The expected key.
        key: &'static str,
    },
    /// The kubeconfig does not parse or does not make a client.
    #[error("Link {link}: Secret {secret} key {key:?}: {message}")]
    Kubeconfig {
        /// `namespace/name` of the Link.
        link: String,
        /// `namespace/name` of the Secret.
        secret: String,
        /// The key read.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// One remote Service a mirror needs, through one Link's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteKey {
    /// The remote cluster.
    pub cluster: ClusterName,
    /// `namespace/name` of the Link.
    pub link: String,
    /// The credentials Secret's resourceVersion: new credentials, new watch.
    pub credentials_version: String,
    /// The remote Service's namespace.
    pub namespace: String,
    /// The remote Service's name.
    pub name: String,
}

/// What one watch knows of its remote Service.
#[derive(Debug, Clone, Default)]
pub struct RemoteState {
    /// The first full list arrived: `service` is the remote's answer, not a guess.
    pub synced: bool,
    /// The remote Service as last seen (`None`: it does not exist).
    pub service: Option<KubeService>,
    /// The remote answers: the watch is healthy and the last probe succeeded.
    pub reachable: bool,
    /// When the remote last answered (wall clock, for the status).
    pub last_contact: Option<Timestamp>,
    /// When the remote last answered (monotonic, for ages).
    pub last_contact_at: Option<Instant>,
    /// When the watch started (the age of a remote never reached).
    pub started_at: Option<Instant>,
    /// The last error talking to the remote.
    pub last_error: Option<String>,
    /// The remote cluster's own ClusterSettings spec (its exported namespaces
    /// and DNS domain), when it has one the controller may read; `None` means
    /// defaults: export by label only, domain `cluster.local`.
    pub settings: Option<ClusterSettingsSpec>,
}

impl RemoteState {
    /// Seconds since the remote last answered (since the watch started if never).
    pub fn staleness(&self) -> Duration {
        self.last_contact_at
            .or(self.started_at)
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }
}

/// Timing of remote watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteTiming {
    /// How often each watch probes its remote with a GET (the "last reached" clock).
    pub probe_interval: Duration,
    /// Longest wait for one remote call.
    pub call_timeout: Duration,
}

struct Watch {
    state: watch::Receiver<RemoteState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Inner {
    watches: HashMap<RemoteKey, Watch>,
    needs: HashMap<ObjectRef<MirrorObject>, RemoteKey>,
}

struct Shared {
    inner: Mutex<Inner>,
    trigger: mpsc::UnboundedSender<ObjectRef<MirrorObject>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps, still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wake(&self, key: &RemoteKey) {
        let inner = self.lock();
        for (mirror, k) in &inner.needs {
            if k == key {
                // The receiver is gone only when the controller stopped.
                let _ = self.trigger.send(mirror.clone());
            }
        }
    }
}

/// The registry of remote watches. Cloning shares it.
#[derive(Clone)]
pub struct Remotes {
    shared: Arc<Shared>,
    local: kube::Client,
    timing: RemoteTiming,
}

impl Remotes {
    /// A registry reading Link Secrets through `local`; mirrors whose remote
    /// changed are sent on `trigger`.
    pub fn new(
        local: kube::Client,
        timing: RemoteTiming,
        trigger: mpsc::UnboundedSender<ObjectRef<MirrorObject>>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner::default()),
                trigger,
            }),
            local,
            timing,
        }
    }

    /// The state of remote Service `namespace/name` through `link`, recording that
    /// `mirror` needs it (and no longer needs whatever it needed before). Starts
    /// the watch if none runs.
    pub async fn ensure(
        &self,
        mirror: &ObjectRef<MirrorObject>,
        link: &LinkResource,
        namespace: &str,
        name: &str,
    ) -> Result<RemoteState, CredentialsError> {
        let link_key = format!(
            "{}/{}",
            link.namespace().unwrap_or_default(),
            link.name_any()
        );
        let cluster = link.spec.link.target_cluster_name.clone();
        let secret = self.read_secret(link, &link_key, &cluster).await;
        let (secret_name, secret) = match secret {
            Ok(s) => s,
            Err(e) => {
                self.forget(mirror);
                return Err(e);
            }
        };
        let key = RemoteKey {
            cluster,
            link: link_key.clone(),
            credentials_version: secret.resource_version().unwrap_or_default(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        if let Some(state) = self.need(mirror, &key) {
            return Ok(state);
        }
        let client = client_from_secret(&secret, &link_key, &secret_name, self.timing).await;
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                self.forget(mirror);
                return Err(e);
            }
        };
        let (tx, rx) = watch::channel(RemoteState {
            started_at: Some(Instant::now()),
            ..RemoteState::default()
        });
        let task = tokio::spawn(run_watch(
            Api::namespaced(client.clone(), namespace),
            Api::all(client),
            key.clone(),
            tx,
            Arc::downgrade(&self.shared),
            self.timing,
        ));
        let mut inner = self.shared.lock();
        // Another reconcile may have started the same watch meanwhile: keep one.
        let state = match inner.watches.get(&key) {
            Some(w) => {
                task.abort();
                w.state.borrow().clone()
            }
            None => {
                let state = rx.borrow().clone();
                inner.watches.insert(key.clone(), Watch { state: rx, task });
                tracing::info!(cluster = %key.cluster, link = %key.link,
                    service = %format!("{}/{}", key.namespace, key.name), "watching remote Service");
                state
            }
        };
        if let Some(old) = inner.needs.insert(mirror.clone(), key) {
            release_if_unused(&mut inner, &old);
        }
        Ok(state)
    }

    /// Records the need; the state if the watch already runs.
    fn need(&self, mirror: &ObjectRef<MirrorObject>, key: &RemoteKey) -> Option<RemoteState> {
        let mut inner = self.shared.lock();
        let state = inner.watches.get(key)?.state.borrow().clone();
        if let Some(old) = inner.needs.insert(mirror.clone(), key.clone())
            && &old != key
        {
            release_if_unused(&mut inner, &old);
        }
        Some(state)
    }

    /// `mirror` needs no remote Service (no Link, or it is gone).
    pub fn forget(&self, mirror: &ObjectRef<MirrorObject>) {
        let mut inner = self.shared.lock();
        if let Some(old) = inner.needs.remove(mirror) {
            release_if_unused(&mut inner, &old);
        }
    }

    /// Forgets every mirror for which `exists` is false (deleted mirrors).
    pub fn retain(&self, exists: impl Fn(&ObjectRef<MirrorObject>) -> bool) {
        let mut inner = self.shared.lock();
        let gone: Vec<_> = inner.needs.keys().filter(|m| !exists(m)).cloned().collect();
        for mirror in gone {
            if let Some(old) = inner.needs.remove(&mirror) {
                release_if_unused(&mut inner, &old);
            }
        }
    }

    /// Stops every watch (the controller stops leading).
    pub fn clear(&self) {
        let mut inner = self.shared.lock();
        for (_, w) in inner.watches.drain() {
            w.task.abort();
        }
        inner.needs.clear();
    }

    /// Number of running watches.
    pub fn watch_count(&self) -> usize {
        self.shared.lock().watches.len()
    }

    /// The staleness of each remote cluster: the oldest last contact among its
    /// watches.
    pub fn staleness(&self) -> BTreeMap<ClusterName, Duration> {
        let inner = self.shared.lock();
        let mut out: BTreeMap<ClusterName, Duration> = BTreeMap::new();
        for (key, w) in &inner.watches {
            let age = w.state.borrow().staleness();
            let e = out.entry(key.cluster.clone()).or_default();
            *e = (*e).max(age);
        }
        out
    }

    async fn read_secret(
        &self,
        link: &LinkResource,
        link_key: &str,
        cluster: &ClusterName,
    ) -> Result<(String, Secret), CredentialsError> {
        let ns = link.namespace().unwrap_or_default();
        let Some(name) = link.spec.credentials_secret.clone() else {
            return Err(CredentialsError::NoSecretNamed {
                link: link_key.to_owned(),
                cluster: cluster.clone(),
            });
        };
        let secret_key = format!("{ns}/{name}");
        let api: Api<Secret> = Api::namespaced(self.local.clone(), &ns);
        let read = tokio::time::timeout(self.timing.call_timeout, api.get(&name)).await;
        let secret = match read {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            )))),
        }
        .map_err(|source| CredentialsError::Read {
            link: link_key.to_owned(),
            secret: secret_key.clone(),
            source,
        })?;
        Ok((secret_key, secret))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let inner = self
            .inner
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, w) in inner.watches.drain() {
            w.task.abort();
        }
    }
}

fn release_if_unused(inner: &mut Inner, key: &RemoteKey) {
    if inner.needs.values().any(|k| k == key) {
        return;
    }
    if let Some(w) = inner.watches.remove(key) {
        w.task.abort();
        tracing::info!(cluster = %key.cluster, link = %key.link,
            service = %format!("{}/{}", key.namespace, key.name), "stopped watching remote Service: no mirror needs it");
    }
}

async fn client_from_secret(
    secret: &Secret,
    link: &str,
    secret_key: &str,
    timing: RemoteTiming,
) -> Result<kube::Client, CredentialsError> {
    let key = Link::CREDENTIALS_KEY;
    let bad = |message: String| CredentialsError::Kubeconfig {
        link: link.to_owned(),
        secret: secret_key.to_owned(),
        key,
        message,
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or_else(|| CredentialsError::NoKey {
            link: link.to_owned(),
            secret: secret_key.to_owned(),
            key,
        })?;
    let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8".to_owned()))?;
    let kubeconfig =
        Kubeconfig::from_yaml(&text).map_err(|e| bad(isthmus_vocab::error_chain(&e)))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| bad(isthmus_vocab::error_chain(&e)))?;
    // A dead remote must show as unreachable within a probe or two, not after
    // the default timeouts of minutes.
    config.connect_timeout = Some(timing.call_timeout);
    kube::Client::try_from(config).map_err(|e| bad(isthmus_vocab::error_chain(&e)))
}

/// Watches one remote Service and probes its API, publishing the state and
/// waking the mirrors that need it on every change.
async fn run_watch(
    api: Api<KubeService>,
    settings_api: Api<ClusterSettingsResource>,
    key: RemoteKey,
    state: watch::Sender<RemoteState>,
    shared: std::sync::Weak<Shared>,
    timing: RemoteTiming,
) {
    let wake = |key: &RemoteKey| {
        if let Some(shared) = shared.upgrade() {
            shared.wake(key);
        }
    };
    let config = watcher::Config::default().fields(&format!("metadata.name={}", key.name));
    let stream = watcher(api.clone(), config);
    futures_util::pin_mut!(stream);
    let mut probe = tokio::time::interval(timing.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The list being received: `Some(found)` between Init and InitDone.
    let mut listing: Option<Option<KubeService>> = None;
    let mut watch_ok = false;
    let mut probe_ok = false;
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { break };
                let changed = match event {
                    Ok(ev) => {
                        failures = 0;
                        let was_ok = watch_ok;
                        watch_ok = true;
                        let mut service_changed = None;
                        match ev {
                            watcher::Event::Init => listing = Some(None),
                            watcher::Event::InitApply(s) => {
                                if s.name_any() == key.name {
                                    listing = Some(Some(s));
                                }
                            }
                            watcher::Event::InitDone => {
                                service_changed = Some(listing.take().flatten());
                            }
                            watcher::Event::Apply(s) => {
                                if s.name_any() == key.name {
                                    service_changed = Some(Some(s));
                                }
                            }
                            watcher::Event::Delete(s) => {
                                if s.name_any() == key.name {
                                    service_changed = Some(None);
                                }
                            }
                        }
                        let mut changed = !was_ok && probe_ok;
                        state.send_modify(|st| {
                            if let Some(svc) = service_changed {
                                changed |= !st.synced || st.service != svc;
                                st.service = svc;
                                st.synced = true;
                            }
                            st.reachable = probe_ok && watch_ok;
                            st.last_contact = Some(Timestamp::now());
                            st.last_contact_at = Some(Instant::now());
                        });
                        changed
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let text = isthmus_vocab::error_chain(&e);
                        tracing::debug!(cluster = %key.cluster, error = %text, "remote watch failed");
                        let was = watch_ok;
                        watch_ok = false;
                        state.send_modify(|st| {
                            st.reachable = false;
                            st.last_error = Some(text);
                        });
                        // The watcher retries on the next poll: pace it here.
                        let backoff = timing.probe_interval.saturating_mul(failures.min(5));
                        tokio::time::sleep(backoff).await;
                        was
                    }
                };
                if changed {
                    wake(&key);
                }
            }
            _ = probe.tick() => {
                let result = tokio::time::timeout(timing.call_timeout, api.get_opt(&key.name)).await;
                let ok = matches!(result, Ok(Ok(_)));
                tracing::debug!(cluster = %key.cluster, ok, watch_ok, "remote probe");
                let was = probe_ok && watch_ok;
                probe_ok = ok;
                // The watcher resumes on its own after an error, from the last
                // resourceVersion, and a quiet watch yields nothing to tell: a
                // probe that gets through counts for it until it fails again.
                watch_ok |= ok && listing.is_none() && state.borrow().synced;
                state.send_modify(|st| {
                    st.reachable = probe_ok && watch_ok;
                    if st.reachable {
                        st.last_contact = Some(Timestamp::now());
                        st.last_contact_at = Some(Instant::now());
                    }
                    match result {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => st.last_error = Some(isthmus_vocab::error_chain(&e)),
                        Err(_) => st.last_error = Some(format!(
                            "no answer within {:?}", timing.call_timeout)),
                    }
                });
                let mut changed = was != (probe_ok && watch_ok);
                if ok {
                    let settings = remote_settings(&settings_api, &key.cluster, timing).await;
                    state.send_modify(|st| {
                        if let Some(settings) = settings
                            && st.settings != settings
                        {
                            changed = true;
                            st.settings = settings;
                        }
                    });
                }
                if changed {
                    wake(&key);
                }
            }
        }
    }
}

/// The remote's ClusterSettings spec: `Some(None)` when it has none (or the kind
/// is not installed there, or the Link's identity may not read it), `None` when
/// the question got no answer (keep what was known).
async fn remote_settings(
    api: &Api<ClusterSettingsResource>,
    cluster: &ClusterName,
    timing: RemoteTiming,
) -> Option<Option<ClusterSettingsSpec>> {
    match tokio::time::timeout(timing.call_timeout, api.list(&ListParams::default())).await {
        Ok(Ok(list)) => {
            // One per cluster; if several, the one naming the cluster the Link names.
            let items = list.items;
            let chosen = items
                .iter()
                .find(|s| &s.spec.cluster_name == cluster)
                .or_else(|| items.first())
                .map(|s| s.spec.clone());
            Some(chosen)
        }
        Ok(Err(kube::Error::Api(s))) if matches!(s.code, 403 | 404) => Some(None),
        Ok(Err(e)) => {
            tracing::debug!(cluster = %cluster, error = %isthmus_vocab::error_chain(&e),
                "cannot read the remote ClusterSettings; keeping what was known");
            None
        }
        Err(_) => None,
    }
}
