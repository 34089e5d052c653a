//! The directory source's watch: changes appear without restart, and a bad change
//! keeps the last good state serving while saying what is wrong and where.
#![allow(clippy::unwrap_used)]

mod common;

use isthmus_test_support::assert_eventually;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use proxy_discovery::{DirSource, Discovery, Route};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for anything to happen; never a speed assertion.
const PATIENCE: Duration = Duration::from_secs(10);
/// cluster-b's address for the mirrored hello (see the expected fixture).
const HELLO_VIP: &str = "198.19.251.140:80";

fn hello_vip() -> SocketAddr {
    HELLO_VIP.parse().unwrap()
}

/// Writes `text` to `dir/name` atomically (temp file + rename), as tools and
/// editors that care do; the temp name starts with '.' so the source skips it.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn start(dir: &Path) -> (Discovery, JoinHandle<()>, oneshot::Sender<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let (discovery, task) = tokio::time::timeout(
        PATIENCE,
        DirSource::new(dir).watch(Duration::from_millis(25), shutdown),
    )
    .await
    .unwrap()
    .unwrap();
    (discovery, task, stop)
}

async fn stop(task: JoinHandle<()>, stop: oneshot::Sender<()>) {
    stop.send(()).unwrap();
    tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_service_mirror_file_makes_the_route_appear() {
    let dir = common::cluster_b_dir(false);
    let (discovery, task, stopper) = start(dir.path()).await;
    assert_eq!(discovery.generation(), 1);
    assert_eq!(discovery.load().lookup_addr(&hello_vip()), None);
    assert_eq!(
        discovery
            .load()
            .lookup_authority("hello.default.svc.cluster.local:80"),
        None
    );

    write(
        dir.path(),
        "cluster-b-servicemirror.yaml",
        &common::read_fixture("seed/cluster-b-servicemirror.yaml"),
    );
    assert_eventually!(within PATIENCE, {
        discovery.load().lookup_addr(&hello_vip()).is_some()
    }, "the mirrored route");
    let snap = discovery.snapshot();
    let Some(Route::Remote {
        cluster, authority, ..
    }) = snap.lookup_addr(&hello_vip())
    else {
        panic!("not a remote route");
    };
    assert_eq!(
        (cluster.as_str(), authority.as_str()),
        ("cluster-a", "hello.default.svc.cluster.local:80")
    );
    assert_eq!(discovery.generation(), 2);
    assert_eq!(discovery.failed_reloads(), 0);

    // Removing the mirror removes what it made.
    std::fs::remove_file(dir.path().join("cluster-b-servicemirror.yaml")).unwrap();
    assert_eventually!(within PATIENCE, {
        discovery.load().lookup_addr(&hello_vip()).is_none()
    }, "the route to go");
    assert_eq!(discovery.load().service("default", "hello"), None);
    stop(task, stopper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_old_routes_and_says_where() {
    let dir = common::cluster_b_dir(true);
    let (discovery, task, stopper) = start(dir.path()).await;
    assert!(discovery.load().lookup_addr(&hello_vip()).is_some());
    let good = discovery.snapshot();

    // A second mirror with its cluster missing, as document 2 of the file.
    let broken = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n---\napiVersion: linkerd.io/v1alpha1\nkind: ServiceMirror\nmetadata:\n  name: other\n  namespace: default\nspec:\n  service:\n    name: other\n";
    write(dir.path(), "more.yaml", broken);
    assert_eventually!(within PATIENCE, {
        discovery.failed_reloads() == 1
    }, "the failure to be recorded");
    let status = discovery.status();
    let err = status.last_error.clone().unwrap();
    let file = dir.path().join("more.yaml").display().to_string();
    assert!(
        err.starts_with(&format!(
            "{file}: document 2 (ServiceMirror default/other): spec.cluster: missing field"
        )),
        "{err}"
    );
    assert!(status.stale && status.last_error_at.is_some());
    // Still serving the last good state, untouched.
    assert_eq!(discovery.generation(), 1);
    assert!(std::sync::Arc::ptr_eq(&discovery.snapshot(), &good));
    assert!(discovery.load().lookup_addr(&hello_vip()).is_some());
    // The same broken content is not re-reported on every poll.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(discovery.failed_reloads(), 1);

    // Fixing it is picked up.
    write(
        dir.path(),
        "more.yaml",
        &broken.replace(
            "spec:\n  service:",
            "spec:\n  cluster: cluster-a\n  service:",
        ),
    );
    assert_eventually!(within PATIENCE, discovery.generation() == 2, "the fixed state");
    let status = discovery.status();
    assert!(!status.stale);
    assert_eq!(status.failed_reloads, 1);
    let other = discovery
        .load()
        .service_mirror("default", "other")
        .unwrap()
        .clone();
    assert_eq!(
        other.status.unwrap().conditions[0].reason,
        "RemoteServiceNotFound"
    );
    assert!(discovery.load().lookup_addr(&hello_vip()).is_some());
    stop(task, stopper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_is_followed() {
    // ConfigMap volumes: files are symlinks into `..data`, itself a symlink to a
    // timestamped directory that is swapped atomically on update.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cluster-b");
    let v1 = dir.join("..v1");
    let src = common::cluster_b_dir(false);
    std::fs::create_dir_all(&v1).unwrap();
    for name in ["cluster-b.yaml", "settings.yaml", "link-cluster-a.yaml"] {
        std::fs::copy(src.path().join(name), v1.join(name)).unwrap();
    }
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    for name in [
        "cluster-b.yaml",
        "settings.yaml",
        "link-cluster-a.yaml",
        "cluster-b-servicemirror.yaml",
    ] {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    }
    common::put(
        &dir,
        "seed/cluster-a.yaml",
        "clusters/cluster-a/cluster-a.yaml",
    );
    common::put(
        &dir,
        "mesh/cluster-a-settings.yaml",
        "clusters/cluster-a/settings.yaml",
    );

    let (discovery, task, stopper) = start(&dir).await;
    assert_eq!(discovery.load().lookup_addr(&hello_vip()), None);

    let v2 = dir.join("..v2");
    std::fs::create_dir_all(&v2).unwrap();
    for name in ["cluster-b.yaml", "settings.yaml", "link-cluster-a.yaml"] {
        std::fs::copy(v1.join(name), v2.join(name)).unwrap();
    }
    common::put(
        &v2,
        "seed/cluster-b-servicemirror.yaml",
        "cluster-b-servicemirror.yaml",
    );
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    assert_eventually!(within PATIENCE, {
        discovery.load().lookup_addr(&hello_vip()).is_some()
    }, "the swapped-in mirror");
    stop(task, stopper).await;
}

#[tokio::test]
async fn the_first_load_must_succeed() {
    let dir = common::cluster_b_dir(true);
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Service\n",
    )
    .unwrap();
    let err = DirSource::new(dir.path())
        .watch(Duration::from_millis(25), std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.yaml: document 1 (Service default/<unnamed>): metadata: missing field"),
        "{err}"
    );
}
