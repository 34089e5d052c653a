//! The credentials a pod gets mounted, validated, and their hot rotation.
//!
//! The directory layout is the one cert-manager's CSI drivers and the SPIFFE helpers
//! write: `tls.crt` (the leaf, then the chain up to but excluding the anchor), `tls.key`
//! (the leaf's private key, PKCS#8, SEC1 or PKCS#1 PEM) and `ca.crt` (one or more trust
//! anchors). Each path can be overridden on its own ([`CredentialPaths`]).
//!
//! [`Credentials`] are only ever built validated: parsable, the key matching the leaf,
//! the leaf carrying exactly one SPIFFE ID, the chain leading to one of the anchors now,
//! for both server and client use, and the current time within the leaf's validity.
//! They also know the cluster their verified issuer names ([`Credentials::cluster`]);
//! a store told which cluster it serves ([`CredentialStore::for_cluster`]) refuses
//! credentials of any other cluster, at start and on every rotation.
//! The [`CredentialStore`] holds the credentials in use behind an `ArcSwap` (handshakes
//! read it without locking) and swaps only validated updates: a bad update is refused,
//! logged, counted and shown in [`IdentityStatus`], and the previous identity keeps
//! serving. Live connections never see a rotation: TLS keys are fixed at handshake.
//!
//! Validity is checked again after loading: a leaf is presented only inside its
//! window ([`CredentialStore::presentable`], asked at every handshake), and
//! [`CredentialStore::watch`] wakes at notAfter to log the expiry and set the
//! `identity_leaf_expired` metric, so a proxy whose leaf ran out fails closed (no
//! certificate shown, not ready) until a valid leaf is written, without a restart.
//!
//! This module does not watch with inotify: Kubernetes updates secret volumes by
//! swapping a `..data` symlink, which inotify on the files misses, so [`CredentialStore::watch`]
//! polls the contents.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use isthmus_vocab::{ClusterName, SpiffeId, error_chain};
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use serde::Serialize;
use tokio::time::MissedTickBehavior;

mod validity;

pub use validity::LeafValidity;
use validity::until_validity_changes;

use crate::cluster::{self, Usage};
use crate::metrics::IdentityMetrics;
use crate::rfc3339;
use crate::tls::crypto_provider;
use crate::verify::{self, VerifyError};

/// The leaf and its chain, in the mounted directory.
pub const CERT_FILE: &str = "tls.crt";
/// The leaf's private key, in the mounted directory.
pub const KEY_FILE: &str = "tls.key";
/// The trust anchors, in the mounted directory.
pub const ANCHORS_FILE: &str = "ca.crt";

/// Where the three credential files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPaths {
    /// Leaf certificate followed by its chain (PEM).
    pub cert: PathBuf,
    /// The leaf's private key (PEM).
    pub key: PathBuf,
    /// Trust anchors (PEM, one or many).
    pub anchors: PathBuf,
}

impl CredentialPaths {
    /// The standard names `tls.crt`, `tls.key`, `ca.crt` inside `dir`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self {
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
            anchors: dir.join(ANCHORS_FILE),
        }
    }
}

/// Why credentials were refused. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    /// A file could not be read (missing, permissions, a symlink swap in progress).
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM (a half-written file usually ends here).
    #[error("{} is not valid PEM", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM parser's error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A file holds no PEM block of the kind expected.
    #[error("{} holds no {what}", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// What was expected (`CERTIFICATE block`, `private key`).
        what: &'static str,
    },
    /// A certificate does not parse as X.509.
    #[error("{} certificate #{index} is not parsable X.509: {detail}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Which certificate of the file, from 0.
        index: usize,
        /// The parser's message.
        detail: String,
    },
    /// An anchor cannot serve as a trust anchor.
    #[error("{} holds an unusable trust anchor", path.display())]
    Anchor {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The leaf does not carry exactly one valid SPIFFE ID.
    #[error("{} leaf has no usable SPIFFE ID", path.display())]
    Identity {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: VerifyError,
    },
    /// The leaf is a CA certificate; an X509-SVID leaf must not be.
    #[error("{} leaf is a CA certificate (basicConstraints CA:TRUE)", path.display())]
    LeafIsCa {
        /// The file.
        path: PathBuf,
    },
    /// The private key is of a kind the provider cannot sign with.
    #[error("{} is not a usable private key", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The private key is not the leaf's.
    #[error("{} does not match the public key of the leaf in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The leaf's notBefore is in the future.
    #[error("{} leaf is not valid before {} (now {})", path.display(), rfc3339::format(*not_before), rfc3339::format(*now))]
    NotYetValid {
        /// The file.
        path: PathBuf,
        /// The leaf's notBefore.
        not_before: SystemTime,
        /// The time of the check.
        now: SystemTime,
    },
    /// The leaf's notAfter is in the past.
    #[error("{} leaf expired at {} (now {})", path.display(), rfc3339::format(*not_after), rfc3339::format(*now))]
    Expired {
        /// The file.
        path: PathBuf,
        /// The leaf's notAfter.
        not_after: SystemTime,
        /// The time of the check.
        now: SystemTime,
    },
    /// The chain does not lead to any anchor of the anchors file, now, for both uses.
    #[error("{} does not chain to a trust anchor of {}", cert.display(), anchors.display())]
    Untrusted {
        /// The certificate file.
        cert: PathBuf,
        /// The anchors file.
        anchors: PathBuf,
        /// webpki's reason (unknown issuer, expired intermediate, wrong key usage...).
        #[source]
        source: rustls::Error,
    },
    /// The leaf's verified issuer is not the issuer of the cluster this proxy serves.
    #[error(
        "{} leaf was issued {}, but this proxy serves cluster {expected} (--cluster); \
         mint its identity with the issuer of cluster {expected}",
        path.display(),
        match found { Some(c) => format!("by the issuer of cluster {c}"), None => "by no cluster's issuer (signed by the trust anchor directly, or by an issuer that names no cluster)".to_owned() }
    )]
    WrongCluster {
        /// The certificate file.
        path: PathBuf,
        /// The cluster its verified issuer names.
        found: Option<ClusterName>,
        /// The cluster the proxy serves.
        expected: ClusterName,
    },
}

impl CredsError {
    /// A fixed label for metrics and `/config`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read { .. } => "unreadable",
            Self::Pem { .. } | Self::Missing { .. } | Self::Certificate { .. } => "unparsable",
            Self::Anchor { .. } => "bad_anchor",
            Self::Identity { .. } | Self::LeafIsCa { .. } => "bad_identity",
            Self::Key { .. } => "bad_key",
            Self::KeyMismatch { .. } => "key_mismatch",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::Expired { .. } => "expired",
            Self::Untrusted { .. } => "untrusted",
            Self::WrongCluster { .. } => "wrong_cluster",
        }
    }
}

/// A validated identity: leaf, chain, key and trust anchors. See the module docs for
/// what "validated" means; there is no way to build one that is not.
pub struct Credentials {
    id: SpiffeId,
    certified_key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    cluster: Option<ClusterName>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key stays out of logs.
        f.debug_struct("Credentials")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("cluster", &self.cluster)
            .field("not_after", &rfc3339::format(self.not_after))
            .field("anchors", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads and validates the three files at time `now`.
    pub fn load(paths: &CredentialPaths, now: SystemTime) -> Result<Self, CredsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| CredsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Self::from_pem(
            paths,
            &read(&paths.cert)?,
            &read(&paths.key)?,
            &read(&paths.anchors)?,
            now,
        )
    }

    /// Validates PEM contents at time `now`; `paths` only names the files in errors.
    pub fn from_pem(
        paths: &CredentialPaths,
        cert_pem: &[u8],
        key_pem: &[u8],
        anchors_pem: &[u8],
        now: SystemTime,
    ) -> Result<Self, CredsError> {
        let chain = parse_certs(&paths.cert, cert_pem)?;
        let anchors = parse_certs(&paths.anchors, anchors_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| match source {
            rustls_pki_types::pem::Error::NoItemsFound => CredsError::Missing {
                path: paths.key.clone(),
                what: "private key",
            },
            source => CredsError::Pem {
                path: paths.key.clone(),
                source,
            },
        })?;

        let leaf = &chain[0];
        let (not_before, not_after, serial, is_ca) = {
            let (_, x509) =
                x509_parser::parse_x509_certificate(leaf).map_err(|e| CredsError::Certificate {
                    path: paths.cert.clone(),
                    index: 0,
                    detail: e.to_string(),
                })?;
            let validity = x509.validity();
            (
                unix_to_system(validity.not_before.timestamp()),
                unix_to_system(validity.not_after.timestamp()),
                x509.raw_serial_as_string(),
                x509.is_ca(),
            )
        };
        let id = verify::spiffe_id_of(leaf).map_err(|source| CredsError::Identity {
            path: paths.cert.clone(),
            source,
        })?;
        if is_ca {
            return Err(CredsError::LeafIsCa {
                path: paths.cert.clone(),
            });
        }
        if now < not_before {
            return Err(CredsError::NotYetValid {
                path: paths.cert.clone(),
                not_before,
                now,
            });
        }
        if now >= not_after {
            return Err(CredsError::Expired {
                path: paths.cert.clone(),
                not_after,
                now,
            });
        }

        let provider = crypto_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|source| CredsError::Key {
                path: paths.key.clone(),
                source,
            })?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        match certified_key.keys_match() {
            // A key type that cannot report its public key cannot be checked here; the
            // first handshake would fail instead. ring's keys all report theirs.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(CredsError::KeyMismatch {
                    cert: paths.cert.clone(),
                    key: paths.key.clone(),
                });
            }
        }

        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots.add(anchor).map_err(|source| CredsError::Anchor {
                path: paths.anchors.clone(),
                source,
            })?;
        }
        let roots = Arc::new(roots);

        // Our leaf must pass what our peers will check: the chain for a server (the
        // gateway's inbound side) and for a client (the sidecar's outbound side).
        let untrusted = |source| CredsError::Untrusted {
            cert: paths.cert.clone(),
            anchors: paths.anchors.clone(),
            source,
        };
        let unix_now =
            UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO));
        let intermediates = &certified_key.cert[1..];
        let algorithms = provider.signature_verification_algorithms.all;
        let mut cluster = None;
        for usage in [Usage::Server, Usage::Client] {
            cluster = cluster::verify_chain(
                leaf_of(&certified_key),
                intermediates,
                &roots,
                unix_now,
                usage,
                algorithms,
            )
            .map_err(untrusted)?;
        }

        Ok(Self {
            id,
            certified_key: Arc::new(certified_key),
            roots,
            cluster,
            not_before,
            not_after,
            serial,
        })
    }

    /// The leaf's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf, its chain and its signing key, as rustls presents them.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// The trust anchors peers are verified against.
    pub fn roots(&self) -> &RootCertStore {
        &self.roots
    }

    /// The cluster whose issuer signed the leaf, read from the leaf's verified path;
    /// `None` for a leaf of no cluster's issuer (see [`crate::cluster`]).
    pub fn cluster(&self) -> Option<&ClusterName> {
        self.cluster.as_ref()
    }

    /// The leaf's notBefore.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The leaf's notAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number, as colon-separated hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }
}

fn leaf_of(key: &CertifiedKey) -> &CertificateDer<'static> {
    // CertifiedKeys are only built here from a chain checked to be non-empty.
    &key.cert[0]
}

fn unix_to_system(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}

fn system_to_unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// All CERTIFICATE blocks of a PEM file, at least one, each parsable X.509.
fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CredsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CredsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CredsError::Missing {
            path: path.to_owned(),
            what: "CERTIFICATE block",
        });
    }
    for (index, cert) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(cert) {
            return Err(CredsError::Certificate {
                path: path.to_owned(),
                index,
                detail: e.to_string(),
            });
        }
    }
    Ok(certs)
}

/// What `/config` shows of the identity in use and of its rotation.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityStatus {
    /// The SPIFFE ID in use.
    pub id: SpiffeId,
    /// The cluster its verified issuer names (`null`: none).
    pub cluster: Option<String>,
    /// Its leaf's serial number.
    pub serial: String,
    /// Its leaf's notBefore (RFC 3339).
    pub not_before: String,
    /// Its leaf's notAfter (RFC 3339).
    pub not_after: String,
    /// Whether the leaf is inside its validity window now, i.e. presented in
    /// handshakes; `false` means the proxy is failing closed and not ready.
    pub valid_now: bool,
    /// `valid`, or why not (`expired at ...`).
    pub validity: String,
    /// How many trust anchors are in use.
    pub anchors: usize,
    /// The watched leaf-and-chain file.
    pub cert_file: String,
    /// The watched private key file.
    pub key_file: String,
    /// The watched trust anchors file.
    pub anchors_file: String,
    /// When the identity in use was loaded (RFC 3339).
    pub loaded_at: String,
    /// Updates validated and swapped in since start.
    pub reloads: u64,
    /// Updates refused since start.
    pub refusals: u64,
    /// The most recent refusal, kept after later successes for debugging.
    pub last_refusal: Option<RefusedUpdate>,
}

/// One refused update.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedUpdate {
    /// When (RFC 3339).
    pub at: String,
    /// The [`CredsError::reason`] label.
    pub reason: &'static str,
    /// The full error with its causes.
    pub error: String,
}

#[derive(Debug)]
struct Rotation {
    loaded_at: SystemTime,
    reloads: u64,
    refusals: u64,
    last_refusal: Option<RefusedUpdate>,
    /// Fingerprint of the file contents last tried, good or bad, so an unchanged bad
    /// update is refused (and counted) once, not at every poll.
    last_seen: Option<u64>,
    /// A refused update that was only early: retry it once its notBefore has passed.
    retry_at: Option<SystemTime>,
    /// The validity last logged and published, so a transition is logged once.
    published_validity: LeafValidity,
}

/// The identity in use and its rotation. Share it as `Arc<CredentialStore>`.
#[derive(Debug)]
pub struct CredentialStore {
    paths: CredentialPaths,
    current: ArcSwap<Credentials>,
    // A std mutex: held for a few field writes, never across an await.
    rotation: Mutex<Rotation>,
    metrics: Option<IdentityMetrics>,
    /// The cluster every leaf served must belong to, when the owner said.
    cluster: Option<ClusterName>,
}

/// The three files' contents, or the error reading each.
type Contents = [io::Result<Vec<u8>>; 3];

impl CredentialStore {
    /// Loads and validates the files now; the proxy cannot start without an identity.
    pub fn load(paths: CredentialPaths) -> Result<Self, CredsError> {
        Self::load_checked(paths, None)
    }

    /// [`Self::load`] for a proxy of `cluster`: the leaf's verified issuer must be
    /// `cluster`'s, now and after every rotation (a leaf of another cluster is
    /// refused like any bad update, and the previous one keeps serving).
    pub fn for_cluster(paths: CredentialPaths, cluster: ClusterName) -> Result<Self, CredsError> {
        Self::load_checked(paths, Some(cluster))
    }

    fn load_checked(
        paths: CredentialPaths,
        cluster: Option<ClusterName>,
    ) -> Result<Self, CredsError> {
        let contents = read_all_blocking(&paths);
        let creds = from_contents(&paths, &contents, SystemTime::now())
            .and_then(|creds| in_cluster(&paths, cluster.as_ref(), creds))?;
        let mut store = Self::from_credentials(paths, creds);
        store.cluster = cluster;
        store.lock().last_seen = Some(fingerprint(&contents));
        Ok(store)
    }

    /// A store serving `creds`, watching `paths` for updates.
    pub fn from_credentials(paths: CredentialPaths, creds: Credentials) -> Self {
        Self {
            paths,
            current: ArcSwap::from_pointee(creds),
            rotation: Mutex::new(Rotation {
                loaded_at: SystemTime::now(),
                reloads: 0,
                refusals: 0,
                last_refusal: None,
                last_seen: None,
                retry_at: None,
                published_validity: LeafValidity::Valid,
            }),
            metrics: None,
            cluster: None,
        }
    }

    /// Reports rotation into `metrics` from now on, starting with the current expiry.
    pub fn with_metrics(mut self, metrics: IdentityMetrics) -> Self {
        metrics.set_leaf_expiry(system_to_unix(self.current().not_after()));
        self.metrics = Some(metrics);
        self.publish_validity(SystemTime::now());
        self
    }

    /// The credentials in use; new handshakes read this, live connections keep theirs.
    pub fn current(&self) -> Arc<Credentials> {
        self.current.load_full()
    }

    /// The watched files.
    pub fn paths(&self) -> &CredentialPaths {
        &self.paths
    }

    /// Reads the files now and swaps them in if valid. On refusal the previous identity
    /// stays in use and the refusal is logged, counted and kept for [`Self::status`].
    pub fn reload(&self) -> Result<Arc<Credentials>, CredsError> {
        let contents = read_all_blocking(&self.paths);
        let result = self.try_contents(&contents, SystemTime::now());
        self.publish_validity(SystemTime::now());
        result
    }

    fn try_contents(
        &self,
        contents: &Contents,
        now: SystemTime,
    ) -> Result<Arc<Credentials>, CredsError> {
        let result = from_contents(&self.paths, contents, now)
            .and_then(|creds| in_cluster(&self.paths, self.cluster.as_ref(), creds));
        let mut rotation = self.lock();
        rotation.last_seen = Some(fingerprint(contents));
        rotation.retry_at = None;
        match result {
            Ok(creds) => {
                let creds = Arc::new(creds);
                let previous = self.current.swap(creds.clone());
                rotation.loaded_at = now;
                rotation.reloads += 1;
                if let Some(metrics) = &self.metrics {
                    metrics.reloaded(system_to_unix(creds.not_after()));
                }
                if previous.id() != creds.id() {
                    tracing::warn!(previous = %previous.id(), id = %creds.id(), "identity changed on rotation");
                }
                tracing::info!(
                    id = %creds.id(),
                    serial = creds.serial(),
                    not_after = %rfc3339::format(creds.not_after()),
                    "identity rotated; new handshakes use the new certificate"
                );
                Ok(creds)
            }
            Err(err) => {
                let reason = err.reason();
                let text = error_chain(&err);
                if let CredsError::NotYetValid { not_before, .. } = &err {
                    rotation.retry_at = Some(*not_before);
                }
                rotation.refusals += 1;
                rotation.last_refusal = Some(RefusedUpdate {
                    at: rfc3339::format(now),
                    reason,
                    error: text.clone(),
                });
                if let Some(metrics) = &self.metrics {
                    metrics.refused(reason);
                }
                tracing::warn!(
                    reason,
                    error = %text,
                    keeping = %self.current.load().id(),
                    "identity update refused; the previous identity keeps serving"
                );
                Err(err)
            }
        }
    }

    /// A snapshot for `/config`.
    pub fn status(&self) -> IdentityStatus {
        let creds = self.current();
        let rotation = self.lock();
        IdentityStatus {
            id: creds.id().clone(),
            cluster: creds.cluster().map(|c| c.as_str().to_owned()),
            serial: creds.serial().to_owned(),
            not_before: rfc3339::format(creds.not_before()),
            not_after: rfc3339::format(creds.not_after()),
            valid_now: creds.validity_at(SystemTime::now()).is_valid(),
            validity: creds.validity_at(SystemTime::now()).to_string(),
            anchors: creds.roots().len(),
            cert_file: self.paths.cert.display().to_string(),
            key_file: self.paths.key.display().to_string(),
            anchors_file: self.paths.anchors.display().to_string(),
            loaded_at: rfc3339::format(rotation.loaded_at),
            reloads: rotation.reloads,
            refusals: rotation.refusals,
            last_refusal: rotation.last_refusal.clone(),
        }
    }

    /// Polls the files every `interval` and reloads when their contents change (or when
    /// an update refused as not yet valid becomes valid). It also wakes when the leaf
    /// in use leaves its validity window, to log that and set the expiry metric
    /// (handshakes and readiness check the time themselves, so they do not depend on
    /// this wake-up). Runs until dropped; spawn it and abort the task at shutdown.
    /// Cancel-safe: it holds no lock across an await.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let boundary = until_validity_changes(&self.current(), SystemTime::now());
            tokio::select! {
                _ = ticker.tick() => {}
                () = tokio::time::sleep(boundary) => {
                    self.publish_validity(SystemTime::now());
                    continue;
                }
            }
            let contents = read_all(&self.paths).await;
            let now = SystemTime::now();
            let due = {
                let rotation = self.lock();
                rotation.last_seen != Some(fingerprint(&contents))
                    || rotation.retry_at.is_some_and(|at| now >= at)
            };
            // The three files are read one after the other: a kubelet swap of
            // `..data` between two reads gives the old certificate with the new key,
            // which is no update anyone wrote. Only contents read the same twice in a
            // row are judged; a read that straddled a swap waits for the next tick.
            if due && fingerprint(&read_all(&self.paths).await) == fingerprint(&contents) {
                // The outcome is logged, counted and kept in the status already.
                let _ = self.try_contents(&contents, now);
            }
            self.publish_validity(SystemTime::now());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rotation> {
        // The guarded fields stay consistent even if a holder panicked.
        self.rotation.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn read_all_blocking(paths: &CredentialPaths) -> Contents {
    [
        std::fs::read(&paths.cert),
        std::fs::read(&paths.key),
        std::fs::read(&paths.anchors),
    ]
}

async fn read_all(paths: &CredentialPaths) -> Contents {
    [
        tokio::fs::read(&paths.cert).await,
        tokio::fs::read(&paths.key).await,
        tokio::fs::read(&paths.anchors).await,
    ]
}

fn from_contents(
    paths: &CredentialPaths,
    contents: &Contents,
    now: SystemTime,
) -> Result<Credentials, CredsError> {
    let files = [&paths.cert, &paths.key, &paths.anchors];
    let mut bytes: [&[u8]; 3] = [&[]; 3];
    for ((slot, content), path) in bytes.iter_mut().zip(contents).zip(files) {
        *slot = match content {
            Ok(b) => b,
            Err(e) => {
                return Err(CredsError::Read {
                    path: path.clone(),
                    source: io::Error::new(e.kind(), e.to_string()),
                });
            }
        };
    }
    Credentials::from_pem(paths, bytes[0], bytes[1], bytes[2], now)
}

/// `creds` if `expected` is `None` or the cluster of their verified issuer.
fn in_cluster(
    paths: &CredentialPaths,
    expected: Option<&ClusterName>,
    creds: Credentials,
) -> Result<Credentials, CredsError> {
    match expected {
        Some(expected) if creds.cluster() != Some(expected) => Err(CredsError::WrongCluster {
            path: paths.cert.clone(),
            found: creds.cluster().cloned(),
            expected: expected.clone(),
        }),
        _ => Ok(creds),
    }
}

/// A 64-bit SipHash of the contents. Only a writer of the mounted directory could
/// craft a collision, and it can replace the credentials outright anyway.
fn fingerprint(contents: &Contents) -> u64 {
    let mut hasher = DefaultHasher::new();
    for content in contents {
        match content {
            Ok(bytes) => {
                0u8.hash(&mut hasher);
                bytes.hash(&mut hasher);
            }
            Err(e) => {
                1u8.hash(&mut hasher);
                e.kind().hash(&mut hasher);
                e.raw_os_error().hash(&mut hasher);
            }
        }
    }
    hasher.finish()
}
