//! The reconcile of one ServiceMirror against the API servers: gather the inputs
//! (the mirror, its Link, the remote Service's last known state, the local
//! Services), let [`proxy_discovery::reconcile::reconcile`] decide, then write the
//! decision: server-side apply of the mirrored Service, deletion of one this
//! mirror owns and no longer wants, and the mirror's status.
//!
//! The decision itself is not made here (it is the same function the lab and the
//! sidecars run). What is added is what only a live controller knows: whether the
//! remote API answers, and if not, that the mirrored Service keeps its last known
//! state while the status says how stale it is.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use proxy_discovery::model::{
    ClusterSettings, ClusterSettingsSpec, ClusterView, Condition, ConditionStatus, Service,
    ServiceRef,
};
use proxy_discovery::reconcile::{
    ClusterIps, LocalState, MirrorReason, mirrored_condition, owned_by, reconcile,
};

use crate::kinds::{
    self, ClusterSettingsResource, FIELD_MANAGER, LinkResource, MIRRORED_CONDITION, MirrorObject,
    ServiceMirrorApiStatus, ServiceMirrorResource,
};
use crate::lease::Leadership;
use crate::metrics::Metrics;
use crate::remote::{RemoteState, Remotes};

/// The reason of the `Mirrored` condition when the remote API does not answer.
pub const REMOTE_UNREACHABLE: &str = "RemoteUnreachable";
/// The reason of the `Mirrored` condition when the Link's credentials are unusable.
pub const INVALID_CREDENTIALS: &str = "InvalidCredentials";
/// The reason of the `Mirrored` condition when the mirror's spec is invalid.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// Where the cluster's own settings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingsSource {
    /// A ClusterSettings object of this name in the control-plane namespace.
    Object(String),
    /// No object: defaults for a cluster of this name.
    Defaults(isthmus_vocab::ClusterName),
}

/// Timing of the reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileTiming {
    /// Re-reconcile every mirror this often even without a change.
    pub resync: Duration,
    /// While a remote is unreachable, refresh the status (its age) this often.
    pub stale_refresh: Duration,
    /// Rewrite `lastRemoteContact` when the recorded one is older than this.
    pub contact_refresh: Duration,
}

/// What every reconcile shares.
pub struct Context {
    /// The local cluster's client.
    pub client: kube::Client,
    /// The control-plane namespace (Links, Secrets, ClusterSettings).
    pub namespace: String,
    /// The cluster's settings.
    pub settings: SettingsSource,
    /// Every local Service.
    pub services: Store<KubeService>,
    /// The Links of the control-plane namespace.
    pub links: Store<LinkResource>,
    /// Remote watches.
    pub remotes: Remotes,
    /// Whether this replica may write.
    pub leadership: Leadership,
    /// Counters.
    pub metrics: Metrics,
    /// Timing.
    pub timing: ReconcileTiming,
    /// Events on the mirrors.
    pub events: crate::events::Events,
    /// For each invalid mirror whose status this replica wrote, the
    /// resourceVersion that write produced: its own status change is no news.
    pub invalid_reported: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

/// A reconcile that failed; retried with a backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API call on the local cluster failed.
    #[error("ServiceMirror {mirror}: {action}")]
    Api {
        /// `namespace/name` of the mirror.
        mirror: String,
        /// What was attempted, naming the object.
        action: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The cluster's ClusterSettings could not be read.
    #[error("ClusterSettings {namespace}/{name}: {problem}")]
    Settings {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// An object could not be converted.
    #[error("ServiceMirror {mirror}")]
    Convert {
        /// `namespace/name` of the mirror.
        mirror: String,
        /// Why.
        #[source]
        source: kinds::ConvertError,
    },
    /// This replica lost the lead in the middle of the reconcile.
    #[error("ServiceMirror {mirror}: not the leader any more; nothing written")]
    NotLeader {
        /// `namespace/name` of the mirror.
        mirror: String,
    },
}

impl ReconcileError {
    /// A short label for the error metric.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Api { .. } => "api",
            Self::Settings { .. } => "settings",
            Self::Convert { .. } => "convert",
            Self::NotLeader { .. } => "not_leader",
        }
    }
}

/// The cluster's settings, as the reconcile and the publisher need them.
pub async fn cluster_settings(
    client: &kube::Client,
    namespace: &str,
    source: &SettingsSource,
) -> Result<ClusterSettings, ReconcileError> {
    match source {
        SettingsSource::Defaults(name) => Ok(ClusterSettings::defaults(name.clone())),
        SettingsSource::Object(name) => {
            let api: Api<ClusterSettingsResource> = Api::namespaced(client.clone(), namespace);
            match api.get_opt(name).await {
                Ok(Some(s)) => Ok(kinds::settings_to_model(&s)),
                Ok(None) => Err(ReconcileError::Settings {
                    namespace: namespace.to_owned(),
                    name: name.clone(),
                    problem: "not found (--settings names it)".to_owned(),
                }),
                Err(e) => Err(ReconcileError::Settings {
                    namespace: namespace.to_owned(),
                    name: name.clone(),
                    problem: isthmus_vocab::error_chain(&e),
                }),
            }
        }
    }
}

/// The local Services in the model's form (those that do not convert are left
/// out with a warning: they cannot be mirrored Services, and their addresses are
/// what a real API server guards anyway).
pub fn local_services(store: &Store<KubeService>) -> BTreeMap<ServiceRef, Service> {
    store
        .state()
        .iter()
        .filter_map(|s| match kinds::service_to_model(s) {
            Ok(m) => Some((ServiceRef::new(m.metadata.namespace(), &m.metadata.name), m)),
            Err(e) => {
                tracing::warn!(error = %e, "skipping a local Service the model cannot read");
                None
            }
        })
        .collect()
}

/// What was decided for one mirror.
enum Decision {
    /// The reconcile ran on a current remote state.
    Reconciled {
        outcome: Box<proxy_discovery::reconcile::MirrorOutcome>,
        remote: Option<RemoteState>,
    },
    /// The remote is not (yet) known to answer: keep what is there.
    Unreachable {
        message: String,
        reason: &'static str,
        remote: Option<RemoteState>,
    },
}

/// Reconciles one ServiceMirror (the kube-runtime `Controller`'s reconciler).
pub async fn reconcile_mirror(
    obj: Arc<MirrorObject>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let key = kinds::object_key(obj.as_ref());
    let sm = match &obj.0 {
        Ok(sm) => sm,
        Err(invalid) => {
            let result = report_invalid(&ctx, obj.as_ref(), &key, &invalid.error).await;
            match &result {
                Ok(_) => ctx.metrics.reconciled(INVALID_SPEC),
                Err(e) => ctx.metrics.failed(e.label()),
            }
            return result;
        }
    };
    let result = reconcile_inner(sm, &ctx, &key).await;
    match &result {
        Ok((reason, _)) => {
            ctx.metrics.reconciled(reason);
            ctx.events.mirrored(sm, reason).await;
        }
        Err(e) => ctx.metrics.failed(e.label()),
    }
    result.map(|(_, action)| action)
}

async fn reconcile_inner(
    sm: &ServiceMirrorResource,
    ctx: &Context,
    key: &str,
) -> Result<(String, Action), ReconcileError> {
    let ns = sm.namespace().unwrap_or_default();
    let mirror_ref = ObjectRef::<MirrorObject>::new(&sm.name_any()).within(&ns);
    let mirror = kinds::service_mirror_to_model(sm);
    // Nothing of the settings decides the Service any more (the API server
    // allocates its address), but a controller pointed at settings that do not
    // exist still says so on every reconcile.
    cluster_settings(&ctx.client, &ctx.namespace, &ctx.settings).await?;
    let local = local_services(&ctx.services);
    // The API server allocates the address, from the range only it knows.
    let local_state = LocalState {
        services: &local,
        cluster_ips: ClusterIps::ApiServer,
    };
    let link = ctx
        .links
        .state()
        .into_iter()
        .find(|l| l.spec.link.target_cluster_name == sm.spec.cluster);
    let decision = match link {
        None => {
            ctx.remotes.forget(&mirror_ref);
            Decision::Reconciled {
                outcome: Box::new(reconcile(&mirror, None, local_state)),
                remote: None,
            }
        }
        Some(link) => {
            match ctx
                .remotes
                .ensure(
                    &mirror_ref,
                    &link,
                    mirror.remote_namespace(),
                    &sm.spec.service.name,
                )
                .await
            {
                Err(e) => Decision::Unreachable {
                    message: isthmus_vocab::error_chain(&e),
                    reason: INVALID_CREDENTIALS,
                    remote: None,
                },
                Ok(state) if state.synced && state.reachable => {
                    let mut view = ClusterView::empty(sm.spec.cluster.clone());
                    if let Some(spec) = &state.settings {
                        // Its exports and domain count; its name is the one the
                        // Link gives it, which the mirror's labels carry.
                        view.settings.spec = ClusterSettingsSpec {
                            cluster_name: sm.spec.cluster.clone(),
                            ..spec.clone()
                        };
                    }
                    if let Some(svc) = &state.service {
                        let svc = kinds::service_to_model(svc).map_err(|source| {
                            ReconcileError::Convert {
                                mirror: key.to_owned(),
                                source,
                            }
                        })?;
                        view.services.insert(
                            ServiceRef::new(svc.metadata.namespace(), &svc.metadata.name),
                            svc,
                        );
                    }
                    Decision::Reconciled {
                        outcome: Box::new(reconcile(&mirror, Some(&view), local_state)),
                        remote: Some(state),
                    }
                }
                Ok(state) => Decision::Unreachable {
                    message: unreachable_message(sm, &state),
                    reason: REMOTE_UNREACHABLE,
                    remote: Some(state),
                },
            }
        }
    };

    let services: Api<KubeService> = Api::namespaced(ctx.client.clone(), &ns);
    let local_ref = ServiceRef::new(&ns, &sm.spec.service.name);
    let (status, reason, message, remote) = match decision {
        Decision::Reconciled { outcome, remote } => {
            let condition = outcome.conditions.first();
            let mut message = condition.map(|c| c.message.clone()).unwrap_or_default();
            let mut status = condition.map_or(ConditionStatus::Unknown, |c| c.status);
            let mut reason = outcome.reason.as_str();
            match &outcome.service {
                Some(svc) => match apply_service(ctx, &services, sm, svc, key).await? {
                    Applied::MirrorGone => {
                        return Ok((reason.to_owned(), Action::await_change()));
                    }
                    Applied::Conflict => {
                        // A Service appeared that this mirror does not own.
                        status = ConditionStatus::False;
                        reason = MirrorReason::NameConflict.as_str();
                        message = format!(
                            "a local Service {local_ref} exists that ServiceMirror {} does not own; it is left untouched",
                            sm.name_any()
                        );
                    }
                    Applied::Done(live) => {
                        // The address is the one the API server allocated.
                        message = mirrored_condition(&mirror, &live).message;
                    }
                    Applied::NoAddressLeft(refusal) => {
                        status = ConditionStatus::False;
                        reason = MirrorReason::NoAddressLeft.as_str();
                        message = format!(
                            "the API server allocates no ClusterIP for {local_ref}: {refusal}"
                        );
                    }
                },
                None if outcome.reason != MirrorReason::NameConflict => {
                    delete_owned(ctx, &services, sm, &mirror, &local, &local_ref, key).await?;
                }
                None => {}
            }
            (status, reason.to_owned(), message, remote)
        }
        Decision::Unreachable {
            message,
            reason,
            remote,
        } => {
            let kept = local.get(&local_ref).is_some_and(|s| owned_by(s, &mirror));
            let status = if kept {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            };
            let message = if kept {
                format!("{message}; the mirrored Service {local_ref} keeps its last known state")
            } else {
                format!("{message}; no mirrored Service {local_ref} yet")
            };
            (status, reason.to_owned(), message, remote)
        }
    };

    delete_renamed(ctx, &services, &mirror, &local, &local_ref, key).await?;
    write_status(ctx, sm, key, status, &reason, message, remote.as_ref()).await?;
    let requeue = if reason == REMOTE_UNREACHABLE || reason == INVALID_CREDENTIALS {
        ctx.timing.stale_refresh
    } else {
        ctx.timing.resync
    };
    Ok((reason, Action::requeue(requeue)))
}

/// A ServiceMirror the model rejects: nothing is mirrored for it (a Service it
/// owned stays until it is fixed or deleted), and its status says why.
async fn report_invalid(
    ctx: &Context,
    obj: &MirrorObject,
    key: &str,
    error: &str,
) -> Result<Action, ReconcileError> {
    ctx.remotes.forget(&ObjectRef::from_obj(obj));
    let reported = ctx
        .invalid_reported
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(key)
        .cloned();
    if reported.is_some() && reported == obj.resource_version() {
        return Ok(Action::await_change());
    }
    tracing::warn!(service_mirror = %key, error, "ServiceMirror rejected");
    let message = format!("ServiceMirror {key}: {error}");
    let patch = serde_json::json!({
        "status": {
            "conditions": [Condition {
                type_: MIRRORED_CONDITION.to_owned(),
                status: ConditionStatus::False,
                reason: INVALID_SPEC.to_owned(),
                message,
                last_transition_time: Some(Timestamp::now().to_string()),
            }],
            "observedGeneration": obj.meta().generation,
        }
    });
    let written = patch_status(ctx, key, obj, &patch).await?;
    if let Some(rv) = written.resource_version() {
        ctx.invalid_reported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.to_owned(), rv);
    }
    // Until the object changes there is nothing new to say.
    Ok(Action::await_change())
}

fn unreachable_message(sm: &ServiceMirrorResource, state: &RemoteState) -> String {
    let error = state
        .last_error
        .as_deref()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    match state.last_contact {
        Some(at) => format!(
            "the API server of cluster {} does not answer{error}; last reached {}s ago at {at}",
            sm.spec.cluster,
            state.staleness().as_secs()
        ),
        None => format!(
            "the API server of cluster {} has not answered yet{error}; waiting {}s so far",
            sm.spec.cluster,
            state.staleness().as_secs()
        ),
    }
}

/// Merge-patches the status of the mirror `key`, once this replica knows it leads, and
/// answers the object as written. Generic because an invalid mirror is written through
/// the guard that holds its metadata, a valid one as itself.
async fn patch_status<K>(
    ctx: &Context,
    key: &str,
    obj: &K,
    patch: &serde_json::Value,
) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    ensure_leading(ctx, key)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
    .map_err(|source| ReconcileError::Api {
        mirror: key.to_owned(),
        action: "patch status".to_owned(),
        source,
    })
}

fn ensure_leading(ctx: &Context, key: &str) -> Result<(), ReconcileError> {
    if ctx.leadership.is_leading() {
        Ok(())
    } else {
        Err(ReconcileError::NotLeader {
            mirror: key.to_owned(),
        })
    }
}

/// What [`apply_service`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Applied {
    /// The mirrored Service is as wanted; this is it as the API server holds it.
    Done(Box<Service>),
    /// The API server's service range is full (its message).
    NoAddressLeft(String),
    /// A Service of that name exists that the mirror does not own: untouched.
    Conflict,
    /// The mirror was deleted meanwhile: nothing created for it.
    MirrorGone,
}

/// Applies the mirrored Service.
async fn apply_service(
    ctx: &Context,
    services: &Api<KubeService>,
    sm: &ServiceMirrorResource,
    svc: &Service,
    key: &str,
) -> Result<Applied, ReconcileError> {
    let name = &svc.metadata.name;
    let api_err = |action: String| {
        let mirror = key.to_owned();
        move |source| ReconcileError::Api {
            mirror,
            action,
            source,
        }
    };
    // The cache may lag: ask the API server itself before writing, so a Service
    // someone just created is never merged into.
    let live = services.get_opt(name).await.map_err(api_err(format!(
        "get Service {}/{name}",
        svc.metadata.namespace()
    )))?;
    let owned = match &live {
        None => false,
        Some(l) => {
            let model = kinds::service_to_model(l).map_err(|source| ReconcileError::Convert {
                mirror: key.to_owned(),
                source,
            })?;
            if !owned_by(&model, &kinds::service_mirror_to_model(sm)) {
                return Ok(Applied::Conflict);
            }
            if same_service(&model, svc) {
                return Ok(Applied::Done(Box::new(model)));
            }
            true
        }
    };
    if live.is_none() {
        // A reconcile may run on a mirror deleted a moment ago; a Service created
        // for it now would outlive it (its owner's deletion has passed).
        let mirrors: Api<MirrorObject> =
            Api::namespaced(ctx.client.clone(), svc.metadata.namespace());
        let current = mirrors
            .get_opt(&sm.name_any())
            .await
            .map_err(api_err(format!("get ServiceMirror {key}")))?;
        if current.is_none_or(|m| m.uid() != sm.uid()) {
            return Ok(Applied::MirrorGone);
        }
    }
    // Never an address: the API server allocates one on create and keeps it on
    // every later apply, and this manager owning it would only pin it.
    let mut body = kinds::service_from_model(svc).map_err(|source| ReconcileError::Convert {
        mirror: key.to_owned(),
        source,
    })?;
    if let Some(spec) = body.spec.as_mut() {
        spec.cluster_ip = None;
        spec.cluster_ips = None;
    }
    let mut value = serde_json::to_value(&body).map_err(|e| ReconcileError::Convert {
        mirror: key.to_owned(),
        source: kinds::ConvertError::Invalid {
            kind: "Service",
            key: format!("{}/{name}", svc.metadata.namespace()),
            message: e.to_string(),
        },
    })?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "Service".into();
    // Force only over fields of a Service this mirror owns; a new one is created
    // without force, so a racing writer's fields make the apply fail, not vanish.
    let mut params = PatchParams::apply(FIELD_MANAGER);
    if owned {
        params = params.force();
    }
    ensure_leading(ctx, key)?;
    let written = match services.patch(name, &params, &Patch::Apply(&value)).await {
        Ok(written) => written,
        // kube-apiserver's words when its service range is exhausted.
        Err(kube::Error::Api(s)) if s.code == 500 && s.message.contains("range is full") => {
            return Ok(Applied::NoAddressLeft(s.message));
        }
        Err(e) => {
            return Err(api_err(format!(
                "apply Service {}/{name}",
                svc.metadata.namespace()
            ))(e));
        }
    };
    let written = kinds::service_to_model(&written).map_err(|source| ReconcileError::Convert {
        mirror: key.to_owned(),
        source,
    })?;
    tracing::info!(service_mirror = %key, service = %format!("{}/{name}", svc.metadata.namespace()),
        created = !owned, cluster_ip = ?written.cluster_ips().first(), "applied mirrored Service");
    Ok(Applied::Done(Box::new(written)))
}

/// Whether the live Service already is what the reconcile wants (labels,
/// annotations, owners, ports; not its address, which the API server keeps).
fn same_service(live: &Service, want: &Service) -> bool {
    let subset = |want: &BTreeMap<String, String>, have: &BTreeMap<String, String>| {
        want.iter().all(|(k, v)| have.get(k) == Some(v))
    };
    subset(&want.metadata.labels, &live.metadata.labels)
        && subset(&want.metadata.annotations, &live.metadata.annotations)
        && live.metadata.owner_references == want.metadata.owner_references
        && live.spec.ports == want.spec.ports
        && live.spec.selector == want.spec.selector
}

/// Deletes Services this mirror owns under another name than its spec names now
/// (its `spec.service.name` changed): the owner reference alone would keep them
/// until the mirror is deleted.
async fn delete_renamed(
    ctx: &Context,
    services: &Api<KubeService>,
    mirror: &proxy_discovery::model::ServiceMirror,
    local: &BTreeMap<ServiceRef, Service>,
    local_ref: &ServiceRef,
    key: &str,
) -> Result<(), ReconcileError> {
    for (r, svc) in local {
        if r.namespace != local_ref.namespace || r == local_ref || !owned_by(svc, mirror) {
            continue;
        }
        let Some(uid) = &svc.metadata.uid else {
            continue;
        };
        ensure_leading(ctx, key)?;
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match services.delete(&r.name, &params).await {
            Ok(_) => tracing::info!(service_mirror = %key, service = %r,
                "deleted a mirrored Service the mirror no longer names"),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(source) => {
                return Err(ReconcileError::Api {
                    mirror: key.to_owned(),
                    action: format!("delete Service {r}"),
                    source,
                });
            }
        }
    }
    Ok(())
}

async fn delete_owned(
    ctx: &Context,
    services: &Api<KubeService>,
    sm: &ServiceMirrorResource,
    mirror: &proxy_discovery::model::ServiceMirror,
    local: &BTreeMap<ServiceRef, Service>,
    local_ref: &ServiceRef,
    key: &str,
) -> Result<(), ReconcileError> {
    let Some(existing) = local.get(local_ref) else {
        return Ok(());
    };
    if !owned_by(existing, mirror) {
        return Ok(());
    }
    ensure_leading(ctx, key)?;
    // The uid precondition: only the very Service this mirror owns goes.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match services.delete(&local_ref.name, &params).await {
        Ok(_) => {
            tracing::info!(service_mirror = %key, service = %local_ref,
                mirror = %sm.name_any(), "deleted mirrored Service: the mirror no longer yields one");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(source) => Err(ReconcileError::Api {
            mirror: key.to_owned(),
            action: format!("delete Service {local_ref}"),
            source,
        }),
    }
}

/// Patches the status when it says something new.
async fn write_status(
    ctx: &Context,
    sm: &ServiceMirrorResource,
    key: &str,
    status: ConditionStatus,
    reason: &str,
    message: String,
    remote: Option<&RemoteState>,
) -> Result<(), ReconcileError> {
    let old = sm.status.clone().unwrap_or_default();
    let old_condition = old
        .conditions
        .iter()
        .find(|c| c.type_ == MIRRORED_CONDITION);
    let now = Timestamp::now();
    let transition = match old_condition {
        Some(c) if c.status == status && c.reason == reason => c.last_transition_time.clone(),
        _ => None,
    }
    .unwrap_or_else(|| now.to_string());
    let condition = Condition {
        type_: MIRRORED_CONDITION.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        last_transition_time: Some(transition),
    };
    let remote_rv = remote
        .and_then(|r| r.service.as_ref())
        .and_then(|s| s.resource_version())
        .or_else(|| {
            // Unreachable: the version last seen stays.
            remote
                .filter(|r| !r.reachable)
                .and(old.remote_resource_version.clone())
        });
    let contact = remote.and_then(|r| r.last_contact).or_else(|| {
        old.last_remote_contact
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
    });
    let old_contact = old
        .last_remote_contact
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok());
    let contact_is_news = match (old_contact, contact) {
        (None, Some(_)) => true,
        (Some(o), Some(n)) => n.duration_since(o).unsigned_abs() >= ctx.timing.contact_refresh,
        _ => false,
    };
    let new = ServiceMirrorApiStatus {
        conditions: vec![condition],
        observed_generation: sm.meta().generation,
        remote_resource_version: remote_rv,
        last_remote_contact: if contact_is_news {
            contact.map(|c| c.to_string())
        } else {
            old.last_remote_contact.clone()
        },
    };
    if new == old {
        return Ok(());
    }
    // A merge patch with explicit nulls, so a field that no longer applies goes.
    let patch = serde_json::json!({
        "status": {
            "conditions": new.conditions,
            "observedGeneration": new.observed_generation,
            "remoteResourceVersion": new.remote_resource_version,
            "lastRemoteContact": new.last_remote_contact,
        }
    });
    patch_status(ctx, key, sm, &patch).await?;
    Ok(())
}

/// Deletes mirrored Services whose owning ServiceMirror no longer exists (as
/// `reconcile_all` does for the lab, and as Kubernetes' garbage collector would
/// eventually): a reconcile racing with the mirror's deletion can leave one. A
/// live GET confirms the owner is gone, so a lagging cache never deletes a
/// Service whose mirror was just created.
pub async fn delete_orphans(
    client: &kube::Client,
    services: &Store<KubeService>,
    mirrors: &Store<MirrorObject>,
    leadership: &Leadership,
) {
    for svc in services.state() {
        let Some(owner) = svc
            .owner_references()
            .iter()
            .find(|o| o.kind == "ServiceMirror" && o.api_version.starts_with("linkerd.io/"))
            .cloned()
        else {
            continue;
        };
        let ns = svc.namespace().unwrap_or_default();
        let cached = mirrors.get(&ObjectRef::new(&owner.name).within(&ns));
        if cached.is_some_and(|m| m.uid().as_deref() == Some(owner.uid.as_str())) {
            continue;
        }
        let api: Api<MirrorObject> = Api::namespaced(client.clone(), &ns);
        match api.get_opt(&owner.name).await {
            Ok(Some(m)) if m.uid().as_deref() == Some(owner.uid.as_str()) => continue,
            Ok(_) => {}
            Err(_) => continue,
        }
        if !leadership.is_leading() {
            return;
        }
        let services: Api<KubeService> = Api::namespaced(client.clone(), &ns);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: svc.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match services.delete(&svc.name_any(), &params).await {
            Ok(_) => {
                tracing::info!(service = %kinds::object_key(svc.as_ref()), owner = %owner.name,
                "deleted a mirrored Service whose ServiceMirror is gone")
            }
            Err(e) => {
                tracing::debug!(error = %isthmus_vocab::error_chain(&e), "orphan delete failed")
            }
        }
    }
}

/// The requeue after a failed reconcile.
pub fn error_policy(_sm: Arc<MirrorObject>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %isthmus_vocab::error_chain(error), "reconcile failed; retrying");
    Action::requeue(ctx.timing.stale_refresh.min(Duration::from_secs(5)))
}

/// The mirrors that a local Service `namespace/name` may concern: those in its
/// namespace that mirror a Service of that name (their own, or a conflict).
pub fn mirrors_for_service(
    mirrors: &Store<MirrorObject>,
    svc: &KubeService,
) -> Vec<ObjectRef<MirrorObject>> {
    let ns = svc.namespace();
    let name = svc.name_any();
    mirrors
        .state()
        .iter()
        .filter(|m| {
            m.namespace() == ns && m.0.as_ref().is_ok_and(|sm| sm.spec.service.name == name)
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// The mirrors a Link concerns: those naming its target cluster.
pub fn mirrors_for_link(
    mirrors: &Store<MirrorObject>,
    link: &LinkResource,
) -> Vec<ObjectRef<MirrorObject>> {
    mirrors
        .state()
        .iter()
        .filter(|m| {
            m.0.as_ref()
                .is_ok_and(|sm| sm.spec.cluster == link.spec.link.target_cluster_name)
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}
