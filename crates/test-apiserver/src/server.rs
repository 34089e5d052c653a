//! HTTP: the accept loop, path routing (`/api/v1/...`, `/apis/{group}/{version}/...`,
//! namespaced, cluster-scoped and all-namespaces paths, `/status`), query
//! parameters, body limits, discovery documents and watch streams.
//!
//! Not here: object semantics (see `store`). Every refusal is answered with a
//! Kubernetes `Status` (see `status`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::apply::Scope;
use crate::authz::{Authenticator, User};
use crate::resource::{self, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{DeleteOpts, Event, EventKind, PatchKind, Store, WriteOpts, present};

mod access;

use access::{authorize, token_request};

pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Limits and timings of one server.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub body_limit: usize,
    pub bookmark_interval: Duration,
    /// How long a watch without `timeoutSeconds` runs before the server ends it
    /// (the client then resumes from its last resourceVersion).
    pub max_watch: Duration,
}

/// A bound on reading a request body, so a stalled client cannot hold a task.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A bound on handing one event to a watch client that stopped reading.
const WATCH_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Events buffered per watch before the producer waits for the client.
const WATCH_BUFFER: usize = 64;

pub(crate) struct Ctx {
    pub store: Store,
    pub auth: Authenticator,
    pub settings: Settings,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
}

/// Serves connections until `shutdown` is cancelled, then drops the listener and
/// every open connection (watches included).
pub(crate) async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    let shutdown = ctx.shutdown.clone();
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "test-apiserver: accept failed");
                        sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let ctx = ctx.clone();
                        async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        // Clients keep idle connections pooled, as with a real server.
                        .header_read_timeout(None)
                        .serve_connection(TokioIo::new(stream), service);
                    // Dropped where it stands on shutdown, as an outage would.
                    let Some(result) = shutdown.run_until_cancelled(conn).await else {
                        return;
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "test-apiserver: connection ended");
                    }
                });
            }
            () = shutdown.cancelled() => break,
        }
    }
    // Every connection task ends on the same cancellation; nothing to wait for.
    connections.close();
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(full(body));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.code, &err.to_status())
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

fn truthy(query: &BTreeMap<String, String>, key: &str) -> bool {
    query
        .get(key)
        .is_some_and(|v| v == "true" || v == "1" || v.is_empty())
}

/// What a path names.
enum Target {
    Version,
    CoreVersions,
    Groups,
    Group(String),
    Resources(String, String),
    Collection {
        rt: ResourceType,
        ns: Option<String>,
    },
    Object {
        rt: ResourceType,
        ns: String,
        name: String,
        status: bool,
    },
    /// `POST .../serviceaccounts/NAME/token` (TokenRequest).
    Token {
        ns: String,
        name: String,
    },
}

fn route(store: &Store, path: &str) -> Result<Target, ApiError> {
    let segments: Vec<String> = path
        .trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Ok(Target::Version),
        ["api"] => return Ok(Target::CoreVersions),
        ["apis"] => return Ok(Target::Groups),
        ["apis", group] => return Ok(Target::Group((*group).to_owned())),
        ["api", "v1"] => return Ok(Target::Resources(String::new(), "v1".to_owned())),
        ["apis", group, version] => {
            return Ok(Target::Resources(
                (*group).to_owned(),
                (*version).to_owned(),
            ));
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::no_route(path)),
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if *plural != "status" && *plural != "finalize" => (
            Some((*ns).to_owned()),
            std::iter::once(plural)
                .chain(tail)
                .copied()
                .collect::<Vec<_>>(),
        ),
        _ => (None, rest.to_vec()),
    };
    let Some(plural) = rest.first() else {
        return Err(ApiError::no_route(path));
    };
    let rt = store
        .resolve(group, version, plural)
        .ok_or_else(|| ApiError::no_route(path))?;
    if ns.is_some() && !rt.namespaced {
        return Err(ApiError::no_route(path));
    }
    match rest.as_slice() {
        [_] => Ok(Target::Collection { rt, ns }),
        [_, name, "token"] if rt.group.is_empty() && rt.plural == "serviceaccounts" => {
            Ok(Target::Token {
                ns: ns.ok_or_else(|| ApiError::no_route(path))?,
                name: (*name).to_owned(),
            })
        }
        [_, name] | [_, name, "status"] => {
            if rt.namespaced && ns.is_none() {
                return Err(ApiError::no_route(path));
            }
            let status = rest.len() == 3;
            if status && !rt.status_subresource {
                return Err(ApiError::no_route(path));
            }
            Ok(Target::Object {
                rt,
                ns: ns.unwrap_or_default(),
                name: (*name).to_owned(),
                status,
            })
        }
        _ => Err(ApiError::no_route(path)),
    }
}

struct Parsed {
    method: Method,
    query: BTreeMap<String, String>,
    content_type: String,
    /// Whether the client asked for aggregated discovery.
    aggregated: bool,
    /// Whether the client asked for metadata only (`as=PartialObjectMetadata`).
    metadata_only: bool,
    manager: String,
    body: Bytes,
}

async fn read(req: Request<Incoming>, limit: usize) -> Result<Parsed, ApiError> {
    let (parts, body) = req.into_parts();
    let query = parse_query(parts.uri.query());
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let accepts = |what: &str| {
        parts
            .headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains(what))
    };
    let aggregated = accepts("as=APIGroupDiscoveryList");
    let metadata_only = accepts("as=PartialObjectMetadata");
    let agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split('/').next())
        .filter(|a| !a.is_empty())
        .unwrap_or("unknown")
        .to_owned();
    let manager = query.get("fieldManager").cloned().unwrap_or(agent);
    let collected = timeout(BODY_READ_TIMEOUT, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ApiError::timeout("timed out reading the request body"))?;
    let body = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::too_large(limit));
        }
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "reading the request body: {e}"
            )));
        }
    };
    Ok(Parsed {
        method: parts.method,
        query,
        content_type,
        aggregated,
        metadata_only,
        manager,
        body,
    })
}

fn decode_body(p: &Parsed) -> Result<Value, ApiError> {
    if p.body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    if p.content_type.contains("yaml") {
        serde_yaml_ng::from_slice(&p.body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}")))
    } else {
        serde_json::from_slice(&p.body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
    }
}

async fn handle(ctx: &Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let user = if ctx.auth.enforces_rbac() {
        match ctx.auth.authenticate(&ctx.store, authorization.as_deref()) {
            Ok(user) => Some(user),
            Err(e) => return error_response(&e),
        }
    } else {
        None
    };
    let response = match read(req, ctx.settings.body_limit).await {
        Ok(parsed) => match dispatch(ctx, &path, parsed, user.as_ref()).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        },
        Err(e) => error_response(&e),
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), "test-apiserver");
    response
}

async fn dispatch(
    ctx: &Arc<Ctx>,
    path: &str,
    p: Parsed,
    user: Option<&User>,
) -> Result<Response<Body>, ApiError> {
    let store = &ctx.store;
    let target = route(store, path)?;
    if let Some(user) = user {
        authorize(store, user, &target, &p)?;
    }
    let get_only = |doc: Option<Value>| {
        if p.method != Method::GET {
            return Err(ApiError::method_not_allowed(format!("{} {path}", p.method)));
        }
        doc.map(|d| json_response(200, &d))
            .ok_or_else(|| ApiError::no_route(path))
    };
    match target {
        Target::Version => get_only(Some(resource::version_doc())),
        Target::CoreVersions if p.aggregated => {
            get_only(Some(resource::aggregated_doc(&store.types(), true)))
        }
        Target::Groups if p.aggregated => {
            get_only(Some(resource::aggregated_doc(&store.types(), false)))
        }
        Target::CoreVersions => get_only(Some(resource::core_versions_doc(&ctx.addr.to_string()))),
        Target::Groups => get_only(Some(resource::group_list_doc(&store.types()))),
        Target::Group(g) => get_only(resource::group_single_doc(&store.types(), &g)),
        Target::Resources(g, v) => get_only(resource::resource_list_doc(&store.types(), &g, &v)),
        Target::Collection { rt, ns } => collection(ctx, rt, ns, p).await,
        Target::Object {
            rt,
            ns,
            name,
            status,
        } => object(store, &rt, &ns, &name, status, &p),
        Target::Token { ns, name } => token_request(ctx, &ns, &name, &p),
    }
}

fn selectors(q: &BTreeMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    Ok((
        LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?,
        FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))?,
    ))
}

async fn collection(
    ctx: &Arc<Ctx>,
    rt: ResourceType,
    ns: Option<String>,
    p: Parsed,
) -> Result<Response<Body>, ApiError> {
    let store = &ctx.store;
    match p.method {
        Method::GET if truthy(&p.query, "watch") => watch(ctx, rt, ns, &p.query, p.metadata_only),
        Method::GET => {
            let (labels, fields) = selectors(&p.query)?;
            let (items, rv) = store.list_objs(&rt, ns.as_deref(), &labels, &fields);
            // The token is the last key served: a page starts after it, so
            // objects created or deleted between pages neither repeat nor shift.
            let after: Option<(String, String)> =
                match p.query.get("continue").filter(|c| !c.is_empty()) {
                    Some(token) => Some(
                        token
                            .split_once('/')
                            .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
                            .ok_or_else(|| {
                                ApiError::bad_request(format!(
                                    "continue: {token:?} is not a token this server issued"
                                ))
                            })?,
                    ),
                    None => None,
                };
            let limit = p
                .query
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let key = |o: &Value| {
                let text = |f: &str| {
                    o.pointer(&format!("/metadata/{f}"))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                (text("namespace"), text("name"))
            };
            let mut rest: Vec<Value> = items
                .into_iter()
                .filter(|o| after.as_ref().is_none_or(|a| key(o) > *a))
                .collect();
            let remaining = rest.len().saturating_sub(limit);
            rest.truncate(limit);
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if remaining > 0
                && let Some(last) = rest.last()
            {
                let (ns, name) = key(last);
                metadata["continue"] = json!(format!("{ns}/{name}"));
                metadata["remainingItemCount"] = json!(remaining);
            }
            if p.metadata_only {
                let items: Vec<Value> = rest.iter().map(partial).collect();
                return Ok(json_response(
                    200,
                    &json!({
                        "kind": "PartialObjectMetadataList",
                        "apiVersion": META_API_VERSION,
                        "metadata": metadata,
                        "items": items,
                    }),
                ));
            }
            let page = rest;
            Ok(json_response(
                200,
                &json!({
                    "kind": rt.list_kind(),
                    "apiVersion": rt.api_version(),
                    "metadata": metadata,
                    "items": page,
                }),
            ))
        }
        Method::POST => {
            let Some(ns) = ns.or_else(|| (!rt.namespaced).then(String::new)) else {
                return Err(ApiError::method_not_allowed(format!(
                    "create {}: a namespaced resource is created under /namespaces/{{namespace}}/",
                    rt.plural
                )));
            };
            let body = decode_body(&p)?;
            let opts = WriteOpts {
                manager: &p.manager,
                scope: Scope::Main {
                    status_subresource: rt.status_subresource,
                },
                force: false,
                dry_run: dry_run(&p.query),
            };
            let created = store.create(&rt, &ns, body, &opts)?;
            Ok(json_response(201, &created))
        }
        Method::DELETE => {
            let (labels, fields) = selectors(&p.query)?;
            let opts = delete_opts(&p);
            let (items, rv) = store.list_objs(&rt, ns.as_deref(), &labels, &fields);
            let mut deleted = Vec::new();
            for item in items {
                let item_ns = item
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let name = item
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if let Ok(d) = store.delete(&rt, item_ns, name, &opts) {
                    deleted.push(d);
                }
            }
            Ok(json_response(
                200,
                &json!({
                    "kind": rt.list_kind(),
                    "apiVersion": rt.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": deleted,
                }),
            ))
        }
        other => Err(ApiError::method_not_allowed(format!(
            "{other} on the collection {}",
            rt.plural
        ))),
    }
}

fn dry_run(q: &BTreeMap<String, String>) -> bool {
    q.get("dryRun").is_some_and(|v| !v.is_empty())
}

/// `DeleteOptions` from the body (kube sends them there) and the query.
fn delete_opts(p: &Parsed) -> DeleteOpts {
    let body = serde_json::from_slice::<Value>(&p.body).unwrap_or(Value::Null);
    let text = |pointer: &str| {
        body.pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let policy = if body.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
        Some("Orphan".to_owned())
    } else {
        text("/propagationPolicy").or_else(|| p.query.get("propagationPolicy").cloned())
    };
    DeleteOpts {
        orphan: policy.is_some_and(|policy| policy == "Orphan"),
        dry_run: dry_run(&p.query)
            || body
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|v| !v.is_empty()),
        uid: text("/preconditions/uid"),
        resource_version: text("/preconditions/resourceVersion"),
    }
}

fn object(
    store: &Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    status: bool,
    p: &Parsed,
) -> Result<Response<Body>, ApiError> {
    let scope = if status {
        Scope::Status
    } else {
        Scope::Main {
            status_subresource: rt.status_subresource,
        }
    };
    let opts = WriteOpts {
        manager: &p.manager,
        scope,
        force: truthy(&p.query, "force"),
        dry_run: dry_run(&p.query),
    };
    let object = match p.method.clone() {
        Method::GET => store.get_obj(rt, ns, name)?,
        Method::PUT => store.replace(rt, ns, name, decode_body(p)?, &opts)?,
        Method::PATCH => {
            let media = p.content_type.split(';').next().unwrap_or_default().trim();
            let kind = match media {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/strategic-merge-patch+json" => PatchKind::StrategicMerge,
                "application/json-patch+json" => PatchKind::Json,
                "application/apply-patch+yaml" | "application/apply-patch+json" => PatchKind::Apply,
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            if kind == PatchKind::Apply && p.query.get("fieldManager").is_none_or(String::is_empty)
            {
                return Err(ApiError::invalid(format!(
                    "apply to {} {name:?}: fieldManager: Required value: is required for apply patch",
                    rt.plural
                )));
            }
            let body = decode_body(p)?;
            store.patch(rt, ns, name, kind, body, &opts)?
        }
        Method::DELETE if !status => store.delete(rt, ns, name, &delete_opts(p))?,
        other => {
            return Err(ApiError::method_not_allowed(format!(
                "{other} on {} {name:?}",
                rt.plural
            )));
        }
    };
    if p.metadata_only {
        return Ok(json_response(200, &partial(&object)));
    }
    Ok(json_response(200, &object))
}

/// The group version of `PartialObjectMetadata`.
const META_API_VERSION: &str = "meta.k8s.io/v1";

/// An object as a metadata-only request gets it: its type erased, as the real
/// server answers `as=PartialObjectMetadata`.
fn partial(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": META_API_VERSION,
        "metadata": object.get("metadata").cloned().unwrap_or(Value::Null),
    })
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut object = json!({
        "kind": rt.kind,
        "apiVersion": rt.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
    });
    if initial_end {
        object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line("BOOKMARK", &object)
}

/// What a selector watch reports for `e`: a change that moves an object into
/// or out of the selection is an ADDED or DELETED, as the real server reports it.
fn translate(e: &Event, labels: &LabelSelector, fields: &FieldSelector) -> Option<&'static str> {
    let selected = |o: &Value| labels.matches(o) && fields.matches(o);
    let now = selected(&e.object);
    let before = e.previous.as_ref().is_some_and(selected);
    match e.kind {
        EventKind::Added => now.then_some("ADDED"),
        EventKind::Modified => match (before, now) {
            (true, true) => Some("MODIFIED"),
            (false, true) => Some("ADDED"),
            (true, false) => Some("DELETED"),
            (false, false) => None,
        },
        EventKind::Deleted => (now || before).then_some(EventKind::Deleted.as_str()),
    }
}

fn watch(
    ctx: &Arc<Ctx>,
    rt: ResourceType,
    ns: Option<String>,
    q: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Result<Response<Body>, ApiError> {
    let (labels, fields) = selectors(q)?;
    let shown = move |object: &Value| {
        if metadata_only {
            partial(object)
        } else {
            object.clone()
        }
    };
    let start: Option<u64> = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(rv.parse().map_err(|_| {
            ApiError::bad_request(format!("resourceVersion: {rv:?} is not a resource version"))
        })?),
    };
    let send_initial = truthy(q, "sendInitialEvents");
    let bookmarks = truthy(q, "allowWatchBookmarks");
    let lifetime = match q.get("timeoutSeconds") {
        Some(t) => Duration::from_secs(t.parse().map_err(|_| {
            ApiError::bad_request(format!("timeoutSeconds: {t:?} is not a number of seconds"))
        })?),
        None => ctx.settings.max_watch,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(WATCH_BUFFER);
    let store = ctx.store.clone();
    let shutdown = ctx.shutdown.clone();
    let bookmark_every = ctx.settings.bookmark_interval;
    tokio::spawn(async move {
        let send = |bytes: Bytes| {
            let tx = tx.clone();
            async move {
                matches!(
                    timeout(WATCH_SEND_TIMEOUT, tx.send(bytes)).await,
                    Ok(Ok(()))
                )
            }
        };
        let deadline = Instant::now() + lifetime;
        let mut changes = store.subscribe();
        let mut last = match start {
            Some(rv) if !send_initial => rv,
            _ => {
                let (items, rv) = store.list_objs(&rt, ns.as_deref(), &labels, &fields);
                for item in &items {
                    if !send(event_line("ADDED", &shown(item))).await {
                        return;
                    }
                }
                if send_initial && !send(bookmark(&rt, rv, true)).await {
                    return;
                }
                rv
            }
        };
        let mut next_bookmark = Instant::now() + bookmark_every;
        loop {
            match store.events_after(&rt, ns.as_deref(), last) {
                Err(gone) => {
                    send(event_line("ERROR", &gone.to_status())).await;
                    return;
                }
                Ok((events, now)) => {
                    for e in &events {
                        if let Some(kind) = translate(e, &labels, &fields)
                            && !send(event_line(kind, &shown(&present(&rt, &e.object)))).await
                        {
                            return;
                        }
                    }
                    last = last.max(now);
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = sleep_until(next_bookmark), if bookmarks => {
                    if !send(bookmark(&rt, last, false)).await {
                        return;
                    }
                    next_bookmark = Instant::now() + bookmark_every;
                }
                _ = sleep_until(deadline) => return,
                () = shutdown.cancelled() => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = parse_query(Some(
            "labelSelector=app%3Dhello%2Ctier+in+%28a%29&watch=1&x",
        ));
        assert_eq!(q["labelSelector"], "app=hello,tier in (a)");
        assert!(truthy(&q, "watch"));
        assert!(truthy(&q, "x"));
        assert!(!truthy(&q, "force"));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
