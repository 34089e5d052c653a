//! An in-memory Kubernetes API server that speaks the real REST and watch
//! protocol, so controllers are tested through kube-rs clients end to end.
//!
//! # Use
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use k8s_openapi::api::core::v1::Service;
//! use kube::api::{Api, Patch, PatchParams, PostParams};
//! use test_apiserver::{ResourceType, TestApiServer};
//!
//! let server = TestApiServer::builder()
//!     // Any extra type, besides the built-in ones and CRDs created at run time.
//!     .resource(ResourceType::new("example.io", "v1", "widgets", "Widget", true).with_status())
//!     .start()
//!     .await?;
//! let services: Api<Service> = Api::namespaced(server.client(), "default");
//! let svc: Service = serde_json::from_value(serde_json::json!({
//!     "apiVersion": "v1", "kind": "Service",
//!     "metadata": {"name": "hello"},
//!     "spec": {"ports": [{"port": 80}]},
//! }))?;
//! services.create(&PostParams::default(), &svc).await?;
//! // Server-side apply, conflicts and all:
//! services
//!     .patch("hello", &PatchParams::apply("my-controller"), &Patch::Apply(&svc))
//!     .await?;
//! // Seed or assert without HTTP:
//! let stored: Option<Service> = server.store().get(Some("default"), "hello");
//! // A remote cluster's credentials, as a controller would read them from a Secret:
//! let kubeconfig = server.kubeconfig();
//! // An outage: the port refuses connections and open watches end ...
//! server.stop().await;
//! // ... and the same state is served again on the same port.
//! server.restart().await?;
//! # let _ = (stored, kubeconfig);
//! # Ok(()) }
//! ```
//!
//! # What it serves
//!
//! - Built-in types: core v1 `services`, `endpoints`, `secrets`, `configmaps`,
//!   `namespaces`, `serviceaccounts`, `pods`, `nodes`, `events`;
//!   `events.k8s.io/v1 events` (kube-runtime's event recorder);
//!   `discovery.k8s.io/v1 endpointslices`; `coordination.k8s.io/v1 leases`;
//!   `apps/v1` deployments, replicasets, daemonsets, statefulsets;
//!   `apiextensions.k8s.io/v1 customresourcedefinitions`;
//!   `rbac.authorization.k8s.io/v1` roles, rolebindings, clusterroles,
//!   clusterrolebindings; `linkerd.io/v1alpha1 servicemirrors`;
//!   `multicluster.isthmus.io/v1alpha1 links`. Creating a CRD makes its served
//!   versions servable (with `/status` when the CRD declares it); deleting it
//!   removes them and their objects.
//! - Discovery: `/version`, `/api`, `/apis`, `/apis/{group}`, `/api/v1`,
//!   `/apis/{group}/{version}`, and the aggregated form (`apidiscovery.k8s.io/v2`)
//!   of `/api` and `/apis` for clients that ask for it.
//! - Verbs: get, list (label and field selectors, `limit`/`continue`), watch
//!   (each also metadata only, `as=PartialObjectMetadata` in `Accept`),
//!   create (`generateName`), update (409 on a stale `resourceVersion`), delete and
//!   deletecollection (finalizers, owner-reference garbage collection in the
//!   background style, also of objects written through the API whose owners are
//!   all gone, `propagationPolicy=Orphan`, uid/resourceVersion
//!   preconditions), patch (merge, JSON patch, strategic merge approximated by
//!   merge, server-side apply with managedFields, conflicts and `force`), and
//!   `/status`; `dryRun=All` answers without writing. Writes that change nothing
//!   keep the resourceVersion and send no event, as on a real server.
//! - ClusterIPs: a Service written without `clusterIP` gets a free address of
//!   the service range ([`Builder::service_cluster_ip_range`], default
//!   10.96.0.0/12); one that asks for an address outside it or already taken is
//!   refused (422); `clusterIP` is immutable; deleting the Service frees it.
//! - Namespaces: `default`, `kube-system`, `kube-public` and `kube-node-lease`
//!   exist from the start; creating an object in a namespace that does not
//!   exist is 404, as on a real server.
//! - Authorization, when asked ([`Builder::authorize_rbac`]): bearer tokens
//!   (the admin's, TokenRequest's `POST .../serviceaccounts/NAME/token`, and
//!   legacy `kubernetes.io/service-account-token` Secrets, which the server
//!   fills in) checked against the stored Roles, ClusterRoles and bindings;
//!   403 and 401 answered as the real server words them.
//! - kube-runtime's `watcher`, `reflector` and `Controller` work unchanged, with
//!   list-then-watch (the default) and streaming lists.
//! - Watches: newline-delimited JSON events from a `resourceVersion` (or all
//!   current objects first when it is absent or `"0"`), `allowWatchBookmarks`,
//!   `sendInitialEvents` (streaming lists, ending with the
//!   `k8s.io/initial-events-end` bookmark), `timeoutSeconds`, and an `ERROR`
//!   event with a 410 `Status` when the `resourceVersion` is older than the
//!   retained history (1000 events by default), so kube-runtime's watcher relists.
//!
//! # Deliberately not
//!
//! Authentication and authorization other than the above, admission webhooks, validation against
//! OpenAPI schemas, defaulting (no pod scheduling),
//! protobuf, TLS, and HTTP/2. A list is not a consistent snapshot across pages
//! (a page starts after the last key served), `resourceVersionMatch` is
//! ignored, and a continue token never expires. Strategic merge patch is a
//! JSON merge patch (lists replaced whole), and server-side apply keeps lists
//! atomic except those a real server merges by key (Service ports, containers,
//! their ports and env): two managers applying different elements of another
//! list conflict.

mod allocate;
mod apply;
mod authz;
mod listmap;
mod patch;
mod resource;
mod selector;
mod server;
mod status;
mod store;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use resource::ResourceType;
pub use selector::{FieldSelector, LabelSelector};
pub use status::ApiError;
pub use store::Store;

pub use allocate::DEFAULT_SERVICE_RANGE;
use allocate::ServiceRange;
use authz::Authenticator;
pub use authz::User;
use server::{Ctx, Settings};

/// The namespaces every cluster starts with; an object in any other needs its
/// namespace created first.
pub const BUILTIN_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listening socket could not be bound.
    #[error("test-apiserver: cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// A kube client could not be built for the server's URL.
    #[error("test-apiserver: cannot build a kube client for {url}")]
    Client {
        /// The server's URL.
        url: String,
        /// kube's error.
        #[source]
        source: kube::Error,
    },
}

/// Options of a server before it starts.
#[derive(Debug, Clone)]
pub struct Builder {
    resources: Vec<ResourceType>,
    settings: Settings,
    history_limit: usize,
    service_range: ServiceRange,
    rbac: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            resources: Vec::new(),
            settings: Settings {
                body_limit: 3 * 1024 * 1024,
                bookmark_interval: Duration::from_secs(2),
                max_watch: Duration::from_secs(1800),
            },
            history_limit: 1000,
            service_range: ServiceRange::default(),
            rbac: false,
        }
    }
}

impl Builder {
    /// Serves `rt` besides the built-in types (replacing a built-in one with the
    /// same group, plural and version).
    pub fn resource(mut self, rt: ResourceType) -> Self {
        self.resources.push(rt);
        self
    }

    /// How often a watch that allows bookmarks gets one (default 2 s).
    pub fn bookmark_interval(mut self, every: Duration) -> Self {
        self.settings.bookmark_interval = every;
        self
    }

    /// How many events are kept for watches to resume from (default 1000);
    /// a watch from before them gets 410 Gone.
    pub fn history_limit(mut self, events: usize) -> Self {
        self.history_limit = events;
        self
    }

    /// The largest request body accepted; larger ones get 413 (default 3 MiB).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.settings.body_limit = bytes;
        self
    }

    /// How long a watch without `timeoutSeconds` lasts (default 30 minutes).
    pub fn max_watch(mut self, lifetime: Duration) -> Self {
        self.settings.max_watch = lifetime;
        self
    }

    /// The range Services get their ClusterIPs from, as kube-apiserver's
    /// `--service-cluster-ip-range` (default 10.96.0.0/12).
    pub fn service_cluster_ip_range(mut self, range: ipnet::IpNet) -> Self {
        self.service_range = ServiceRange::new(range);
        self
    }

    /// Authorizes every request by its bearer token against the RBAC objects
    /// stored in the server (kube-apiserver's `--authorization-mode=RBAC`).
    /// [`TestApiServer::client`] and [`TestApiServer::kubeconfig`] stay
    /// admin (`system:masters`); [`TestApiServer::service_account_client`]
    /// and a Secret's or a TokenRequest's token act as a ServiceAccount.
    /// Without it, every request is allowed, with or without a token.
    pub fn authorize_rbac(mut self) -> Self {
        self.rbac = true;
        self
    }

    /// Starts on `127.0.0.1` on a free port.
    pub async fn start(self) -> Result<TestApiServer, StartError> {
        self.start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on `addr` (for example the port of a server that was dropped).
    pub async fn start_on(self, addr: SocketAddr) -> Result<TestApiServer, StartError> {
        let store = Store::new(self.resources, self.history_limit, self.service_range);
        for ns in BUILTIN_NAMESPACES {
            store
                .put_value(serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                }))
                .expect("a namespace with a name is always stored");
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let server = TestApiServer {
            store,
            auth: Authenticator::new(self.rbac),
            settings: self.settings,
            addr,
            running: Mutex::new(None),
        };
        server.spawn(listener);
        Ok(server)
    }
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// A running in-memory API server; dropping it stops it.
pub struct TestApiServer {
    store: Store,
    auth: Authenticator,
    settings: Settings,
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for TestApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestApiServer")
            .field("addr", &self.addr)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl TestApiServer {
    /// Starts with the built-in types on `127.0.0.1` on a free port.
    ///
    /// # Panics
    ///
    /// When no loopback port can be bound: a test cannot go on without one. Use
    /// [`TestApiServer::builder`] for the error instead.
    pub async fn start() -> Self {
        Self::builder()
            .start()
            .await
            .expect("test-apiserver: binding 127.0.0.1:0 must work for tests to run")
    }

    /// Starts with the built-in types on `addr`.
    pub async fn start_on(addr: SocketAddr) -> Result<Self, StartError> {
        Self::builder().start_on(addr).await
    }

    /// Options before starting.
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn spawn(&self, listener: TcpListener) {
        let shutdown = CancellationToken::new();
        let ctx = Arc::new(Ctx {
            store: self.store.clone(),
            auth: self.auth.clone(),
            settings: self.settings.clone(),
            addr: self.addr,
            shutdown: shutdown.clone(),
        });
        let task = tokio::spawn(server::serve(listener, ctx));
        *self.lock() = Some(Running { shutdown, task });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube config for this server: plain HTTP, the admin's bearer token
    /// (group `system:masters`), default namespace `default`.
    pub fn config(&self) -> kube::Config {
        self.config_with_token(self.auth.admin_token())
    }

    fn config_with_token(&self, token: &str) -> kube::Config {
        let uri: http::Uri = self
            .url()
            .parse()
            .expect("http://<socket address> is always a valid URI");
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".to_owned();
        config.auth_info = auth_info(token);
        config
    }

    /// A fresh token of ServiceAccount `namespace/name`, as a TokenRequest
    /// gives it; 404 when the ServiceAccount does not exist.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> Result<String, ApiError> {
        self.auth.issue(&self.store, namespace, name)
    }

    /// A kube client acting as ServiceAccount `namespace/name` (default
    /// namespace: its own).
    pub fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<kube::Client, ApiError> {
        let token = self.service_account_token(namespace, name)?;
        let mut config = self.config_with_token(&token);
        config.default_namespace = namespace.to_owned();
        kube::Client::try_from(config).map_err(|e| {
            ApiError::bad_request(format!(
                "kube client for ServiceAccount {namespace}/{name}: {e}"
            ))
        })
    }

    /// A kubeconfig acting as ServiceAccount `namespace/name`, as a pod's
    /// mounted token would.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<kube::config::Kubeconfig, ApiError> {
        let token = self.service_account_token(namespace, name)?;
        Ok(self.kubeconfig_with(&token, namespace))
    }

    /// A kube client for this server.
    ///
    /// # Panics
    ///
    /// If kube cannot build a client for a plain-HTTP config; see
    /// [`TestApiServer::try_client`] for the error instead.
    pub fn client(&self) -> kube::Client {
        self.try_client()
            .expect("kube builds a client for a plain-http config without auth")
    }

    /// A kube client for this server, or kube's error.
    pub fn try_client(&self) -> Result<kube::Client, StartError> {
        kube::Client::try_from(self.config()).map_err(|source| StartError::Client {
            url: self.url(),
            source,
        })
    }

    /// A kubeconfig naming this server (cluster, user and context all called
    /// `test-apiserver`) with the admin's token, as a remote cluster's
    /// credentials would be handed over.
    pub fn kubeconfig(&self) -> kube::config::Kubeconfig {
        self.kubeconfig_with(self.auth.admin_token(), "default")
    }

    /// Writes [`TestApiServer::kubeconfig`] as `dir/kubeconfig` (JSON, which
    /// kubeconfig readers take as YAML) for a process run with `--kubeconfig`
    /// or `KUBECONFIG`; returns its path.
    pub fn write_kubeconfig(&self, dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
        let path = dir.join("kubeconfig");
        self.write_kubeconfig_file(&path)?;
        Ok(path)
    }

    fn kubeconfig_with(&self, token: &str, namespace: &str) -> kube::config::Kubeconfig {
        use kube::config::{
            Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
        };
        const NAME: &str = "test-apiserver";
        let cluster = Cluster {
            server: Some(self.url()),
            ..Cluster::default()
        };
        let context = Context {
            cluster: NAME.to_owned(),
            user: Some(NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Context::default()
        };
        Kubeconfig {
            api_version: Some("v1".to_owned()),
            kind: Some("Config".to_owned()),
            clusters: vec![NamedCluster {
                name: NAME.to_owned(),
                cluster: Some(cluster),
                ..NamedCluster::default()
            }],
            auth_infos: vec![NamedAuthInfo {
                name: NAME.to_owned(),
                auth_info: Some(auth_info(token)),
                ..NamedAuthInfo::default()
            }],
            contexts: vec![NamedContext {
                name: NAME.to_owned(),
                context: Some(context),
                ..NamedContext::default()
            }],
            current_context: Some(NAME.to_owned()),
            ..Kubeconfig::default()
        }
    }

    /// Writes [`TestApiServer::kubeconfig`] to `path` as YAML, atomically
    /// (through a sibling file renamed into place), so a process waiting for
    /// the file never reads half of it.
    pub fn write_kubeconfig_file(&self, path: &std::path::Path) -> io::Result<()> {
        let text = serde_yaml_ng::to_string(&self.kubeconfig()).map_err(io::Error::other)?;
        let partial = path.with_extension("partial");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, path)
    }

    /// The store, to seed and assert without HTTP.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the server is accepting connections.
    pub fn is_running(&self) -> bool {
        self.lock().is_some()
    }

    /// Closes the listener and every open connection (watches included); the
    /// stored state stays. Does nothing when already stopped.
    pub async fn stop(&self) {
        let running = self.lock().take();
        if let Some(running) = running {
            running.shutdown.cancel();
            let mut task = running.task;
            // The accept loop ends at once on shutdown; abort rather than wait
            // if it does not, so `stop` is bounded.
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    /// Serves the same state on the same port again after [`TestApiServer::stop`].
    /// Does nothing when running.
    pub async fn restart(&self) -> Result<(), StartError> {
        if self.is_running() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: self.addr,
                source,
            })?;
        self.spawn(listener);
        Ok(())
    }
}

/// Credentials holding `token` (through serde: kube keeps tokens in a secret
/// string type this crate need not name).
fn auth_info(token: &str) -> kube::config::AuthInfo {
    serde_json::from_value(serde_json::json!({ "token": token }))
        .expect("a kubeconfig user with a token deserializes")
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if let Some(running) = self.lock().take() {
            running.shutdown.cancel();
            running.task.abort();
        }
    }
}
