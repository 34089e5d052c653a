//! Sources of discovery state and the [`Discovery`] handle they publish through.
//!
//! A source reads objects from somewhere (a directory of manifests in [`dir`]; the
//! Kubernetes API later), builds a whole [`Snapshot`], and publishes it with
//! [`Discovery::publish`]. A state that fails to load is reported with
//! [`Discovery::report_failure`] and never replaces the last good one. Readers on
//! the hot path call [`Discovery::load`]: an atomic pointer load, no lock.

pub mod dir;
#[cfg(feature = "kube")]
pub mod kube;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::{ArcSwap, Guard};
use isthmus_vocab::error_chain;
use tokio::sync::watch;

use crate::model::{ManifestError, ViewError};
use crate::snapshot::Snapshot;

pub use self::dir::DirSource;

/// Why a source could not produce a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A file or directory could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// What could not be read.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The cluster's name is not given and cannot be derived.
    #[error(
        "{}: cannot tell which cluster these manifests are for: add a ClusterSettings with spec.clusterName, name the directory after the cluster, or pass the cluster name",
        path.display()
    )]
    NoClusterName {
        /// The manifest directory.
        path: PathBuf,
    },
    /// A directory under `clusters/` is not named as a cluster can be.
    #[error("{}: directory name is not a valid cluster name", path.display())]
    BadClusterDir {
        /// The directory.
        path: PathBuf,
        /// Why the name is invalid.
        #[source]
        source: isthmus_vocab::ClusterNameError,
    },
    /// A manifest does not parse or holds an invalid object.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Objects that are each valid do not fit together (duplicates, mismatches).
    #[error(transparent)]
    View(#[from] ViewError),
}

/// How loading has gone, for `/config` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReloadStatus {
    /// Snapshots published so far (the first load counts).
    pub generation: u64,
    /// Loads that failed and were not published.
    pub failed_reloads: u64,
    /// When the serving snapshot was published.
    pub last_reload: Option<SystemTime>,
    /// The most recent failure, with its whole cause chain.
    pub last_error: Option<String>,
    /// When that failure happened.
    pub last_error_at: Option<SystemTime>,
    /// Whether the most recent attempt failed (the serving state is then older
    /// than what the source holds).
    pub stale: bool,
}

/// The shared, atomically swapped discovery state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Discovery {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    current: ArcSwap<Snapshot>,
    failed: AtomicU64,
    status: Mutex<ReloadStatus>,
    generation: watch::Sender<u64>,
}

impl Discovery {
    /// A handle serving `initial` as generation 1.
    pub fn new(initial: Snapshot) -> Self {
        let (generation, _) = watch::channel(1);
        Self {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(initial),
                failed: AtomicU64::new(0),
                status: Mutex::new(ReloadStatus {
                    generation: 1,
                    last_reload: Some(SystemTime::now()),
                    ..ReloadStatus::default()
                }),
                generation,
            }),
        }
    }

    /// The serving snapshot, for the hot path: lock-free and allocation-free.
    /// Hold the guard only briefly (for a lookup), not across awaits.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.shared.current.load()
    }

    /// The serving snapshot, to keep.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.current.load_full()
    }

    /// Replaces the serving snapshot and bumps the generation.
    pub fn publish(&self, snapshot: Snapshot) {
        self.shared.current.store(Arc::new(snapshot));
        let mut status = self.lock_status();
        status.generation += 1;
        status.last_reload = Some(SystemTime::now());
        status.stale = false;
        let generation = status.generation;
        drop(status);
        self.shared.generation.send_replace(generation);
    }

    /// Records a failed load; the serving snapshot stays.
    pub fn report_failure(&self, err: &DiscoveryError) {
        let failed = self.shared.failed.fetch_add(1, Ordering::Relaxed) + 1;
        let mut status = self.lock_status();
        status.failed_reloads = failed;
        status.last_error = Some(error_chain(err));
        status.last_error_at = Some(SystemTime::now());
        status.stale = true;
    }

    /// Loads that failed so far.
    pub fn failed_reloads(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// The current generation (1 for the initial snapshot).
    pub fn generation(&self) -> u64 {
        *self.shared.generation.borrow()
    }

    /// Notified with the new generation on every publish.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.generation.subscribe()
    }

    /// How loading has gone.
    pub fn status(&self) -> ReloadStatus {
        self.lock_status().clone()
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, ReloadStatus> {
        // The status is plain data, always left consistent: a panic elsewhere
        // while holding the lock does not make it unusable.
        self.shared
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
