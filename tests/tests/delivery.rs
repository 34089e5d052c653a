//! Where a sidecar delivers inbound traffic, on the wire: a pod namespace with the
//! real capture (`isthmus-init`) and the real `isthmus-proxy sidecar` (proxy UID),
//! and an outside namespace from which the test is a mesh peer (an mTLS tunnel
//! client of the pod's trust domain, as a gateway is) and an unmeshed client.
//!
//! The pod's app has two listeners: one on every address (reachable), and one
//! bound to loopback only (a debug or admin server), which counts the connections
//! and bytes it receives. From outside the pod, neither a tunnel stream nor
//! redirected plain TCP may reach the loopback-only one, whatever the stream's
//! authority says: the sidecar delivers to the pod's own address. A pod that opts
//! in (`ISTHMUS_INBOUND_LOOPBACK=true`, what `isthmus inject` sets for the
//! annotation `isthmus.io/inbound-loopback: "true"`) gets loopback delivery.
//!
//! Needs root (fails, with instructions, without it) and the `isthmus-init` and
//! `isthmus-proxy` binaries (see `tests/README.md`).
#![allow(clippy::unwrap_used)]

use isthmus_test_support::test_cases;
use isthmus_tests::h2c;
use isthmus_tests::peer::test_pool;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use isthmus_tests::binary::{WorldExecutable, binary};
use isthmus_tests::identity::Pki;
use isthmus_tests::netns::{Fam, Lab, Namespace, Pair};
use isthmus_tests::pod::{self, ADMIN_PORT, INBOUND_PORT, PROXY_UID, READY, metric};
use isthmus_tests::tcp::{self, WAIT};
use isthmus_vocab::{Authority, SpiffeId};
use proxy_core::pool::PoolError;
use proxy_identity::mint;
use proxy_identity::{CredentialPaths, CredentialStore, PeerPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The app port bound on every address of the pod.
const OPEN_PORT: u16 = 8080;
/// The app port bound to loopback only.
const PRIVATE_PORT: u16 = 8081;

fn app_id() -> SpiffeId {
    SpiffeId::parse("spiffe://cluster.local/ns/default/sa/app").unwrap()
}

/// A listener in the pod that echoes what it reads and counts connections and
/// bytes; stopped (and joined) on drop.
struct App {
    accepted: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl App {
    fn start(listener: TcpListener) -> App {
        let accepted = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, total, stopped) = (accepted.clone(), bytes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                let Ok(Some((mut stream, _))) =
                    tcp::accept_within(&listener, Duration::from_millis(50))
                else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                while let Ok(n) = tcp::read_once(&mut stream, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    total.fetch_add(n, Ordering::SeqCst);
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
            }
        });
        App {
            accepted,
            bytes,
            stop,
            thread: Some(thread),
        }
    }

    /// (connections, bytes) received so far.
    fn seen(&self) -> (usize, usize) {
        (
            self.accepted.load(Ordering::SeqCst),
            self.bytes.load(Ordering::SeqCst),
        )
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The pod (capture, sidecar, both apps) and the outside namespace.
struct Pod {
    fam: Fam,
    pod_ip: IpAddr,
    outside: Namespace,
    pod: Namespace,
    pki: Pki,
    open: App,
    private: App,
    log: PathBuf,
    _bin: WorldExecutable,
    _dir: tempfile::TempDir,
    /// Declared last so it drops last, after the log was shown.
    _lab: Lab,
}

impl Drop for Pod {
    fn drop(&mut self) {
        pod::show_log_if_failing(&self.log, "", || {
            format!("\n--- namespaces ---\n{}", self._lab.diagnostics())
        });
    }
}

/// Starts the sidecar as the proxy UID with nothing from the test's environment
/// but `env`, and waits until it is ready.
fn start_sidecar(
    pod: &Namespace,
    bin: &Path,
    identity: &Path,
    manifests: &Path,
    env: &[(&str, &str)],
    log: &Path,
) -> Child {
    let mut cmd = Command::new(bin);
    cmd.args(["sidecar", "--cluster", "cluster-b", "--identity-dir"])
        .arg(identity)
        .arg("--manifests")
        .arg(manifests)
        .args(["--connect-timeout", "1s", "--log", "info"])
        .env_clear()
        .envs(env.iter().copied());
    let mut child = pod.spawn_logged_as(cmd, PROXY_UID, PROXY_UID, log).unwrap();
    let deadline = Instant::now() + READY;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the sidecar exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let ready = pod
            .run(|| pod::http_get(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), "/ready"))
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"));
        if ready {
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar was not ready within {READY:?}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Pod {
    fn start(fam: Fam, env: &[(&str, &str)]) -> Pod {
        let lab = Lab::new();
        let Pair {
            pod,
            server: outside,
            ..
        } = lab.pair(true);
        let (pod_ip, any, loopback) = (fam.pod_ip(), fam.any(), fam.loopback());
        let init = binary("isthmus-init");
        let init_args: &[&str] = match fam {
            Fam::V4 => &[],
            Fam::V6 => &["--ipv6"],
        };
        pod.exec(init.to_str().unwrap(), init_args).unwrap();
        // For IPv6, isthmus-init also adds ::6 to lo, the sidecar's inbound
        // delivery source: the IPv6 inbound tests fail without it.

        let open = App::start(
            pod.run(|| tcp::listen(SocketAddr::new(any, OPEN_PORT)))
                .unwrap(),
        );
        let private = App::start(
            pod.run(|| tcp::listen(SocketAddr::new(loopback, PRIVATE_PORT)))
                .unwrap(),
        );

        let pki = Pki::new(&mint::default_anchor_name());
        let dir = tempfile::Builder::new()
            .prefix("isthmus-delivery")
            .tempdir()
            .unwrap();
        let (identity, manifests) = pod::prepare_dirs(dir.path(), |identity| {
            pki.leaf("cluster-b", &app_id())
                .write_dir(identity, false)
                .unwrap();
        })
        .unwrap();
        let log = dir.path().join("sidecar.log");
        let bin = WorldExecutable::copy(&binary("isthmus-proxy")).unwrap();
        let child = start_sidecar(&pod, bin.path(), &identity, &manifests, env, &log);
        lab.adopt(child);
        Pod {
            fam,
            pod_ip,
            outside,
            pod,
            pki,
            open,
            private,
            log,
            _bin: bin,
            _dir: dir,
            _lab: lab,
        }
    }

    /// Opens one tunnel stream per authority from outside the pod, as a gateway
    /// of the pod's trust domain, sends `payload`, half-closes and returns, per
    /// authority, the bytes that came back or the refusal.
    fn tunnel(&self, authorities: &[String], payload: &[u8]) -> Vec<Result<Vec<u8>, String>> {
        let dir = tempfile::tempdir().unwrap();
        let leaf = self.pki.leaf(
            "cluster-b",
            &SpiffeId::parse("spiffe://cluster.local/ns/isthmus/sa/gateway").unwrap(),
        );
        leaf.write_dir(dir.path(), false).unwrap();
        let store = Arc::new(CredentialStore::load(CredentialPaths::in_dir(dir.path())).unwrap());
        let peer = SocketAddr::new(self.pod_ip, INBOUND_PORT);
        self.outside.run(|| {
            // Each stream's open and exchange are bounded; this bounds them all.
            let limit = WAIT * (2 * authorities.len() as u32 + 1);
            h2c::block_on(limit, "the tunnel streams", async {
                let pool = test_pool(
                    "test/pod",
                    peer,
                    proxy_identity::client_config(store, PeerPolicy::Exact(app_id())),
                );
                let mut out = Vec::new();
                for authority in authorities {
                    let authority = Authority::parse(authority).unwrap();
                    let opened =
                        tokio::time::timeout(WAIT, pool.open_answered(&authority, None)).await;
                    out.push(match opened {
                        Err(_) => Err(format!("{authority}: no answer within {WAIT:?}")),
                        Ok(Err(PoolError::Refused { refusal, .. })) => {
                            Err(refusal.as_str().to_owned())
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Ok(Ok(stream)) => {
                            let (mut rd, mut wr) = tokio::io::split(stream);
                            let exchange = async {
                                wr.write_all(payload).await?;
                                wr.shutdown().await?;
                                let mut back = Vec::new();
                                rd.read_to_end(&mut back).await?;
                                Ok::<_, io::Error>(back)
                            };
                            match tokio::time::timeout(WAIT, exchange).await {
                                Ok(Ok(back)) => Ok(back),
                                Ok(Err(e)) => Err(e.to_string()),
                                Err(_) => Err("exchange hung".to_owned()),
                            }
                        }
                    });
                }
                out
            })
        })
    }

    /// A plain TCP connection from outside to the pod's `port` (redirected to the
    /// sidecar by the capture): what comes back for `payload`, or the error.
    fn plain(&self, port: u16, payload: &[u8]) -> Result<Vec<u8>, io::ErrorKind> {
        let addr = SocketAddr::new(self.pod_ip, port);
        self.outside.run(|| {
            let mut stream = tcp::connect(addr).map_err(|e| e.kind())?;
            stream.write_all(payload).map_err(|e| e.kind())?;
            stream.shutdown(Shutdown::Write).map_err(|e| e.kind())?;
            let mut back = Vec::new();
            stream.read_to_end(&mut back).map_err(|e| e.kind())?;
            Ok(back)
        })
    }

    /// Authorities naming the loopback-only port in every shape a peer could try:
    /// the pod's address, loopback, a name, another address.
    fn private_authorities(&self) -> Vec<String> {
        let pod = match self.fam {
            Fam::V4 => self.pod_ip.to_string(),
            Fam::V6 => format!("[{}]", self.pod_ip),
        };
        [
            pod.as_str(),
            "127.0.0.1",
            "[::1]",
            "localhost",
            "127.0.0.6",
            "app.default.svc.cluster.local",
            "198.18.0.1",
        ]
        .iter()
        .map(|host| format!("{host}:{PRIVATE_PORT}"))
        .collect()
    }

    fn config(&self) -> String {
        self.pod
            .run(|| pod::http_get(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), "/config"))
            .unwrap()
    }

    fn metrics(&self) -> String {
        self.pod
            .run(|| pod::http_get(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), "/metrics"))
            .unwrap()
    }
}

fn the_pod_address_is_served_and_loopback_stays_private(fam: Fam) {
    let p = Pod::start(fam, &[]);
    assert!(
        p.config().contains("\"inbound_loopback\": false"),
        "{}",
        p.config()
    );
    let pod = match fam {
        Fam::V4 => p.pod_ip.to_string(),
        Fam::V6 => format!("[{}]", p.pod_ip),
    };

    // The app on every address is served, through the tunnel and plain.
    let served = p.tunnel(&[format!("{pod}:{OPEN_PORT}")], b"through the tunnel");
    assert_eq!(served, [Ok(b"through the tunnel".to_vec())]);
    assert_eq!(p.plain(OPEN_PORT, b"plain"), Ok(b"plain".to_vec()));
    assert_eq!(p.open.seen().0, 2);

    // The loopback-only app is not, however the stream names it.
    let authorities = p.private_authorities();
    let attempts = p.tunnel(&authorities, b"GET /debug HTTP/1.1\r\nhost: x\r\n\r\n");
    const PLAIN_ATTEMPTS: usize = 5;
    let plain: Vec<_> = (0..PLAIN_ATTEMPTS)
        .map(|_| p.plain(PRIVATE_PORT, b"GET /debug HTTP/1.1\r\nhost: x\r\n\r\n"))
        .collect();
    assert_eq!(
        p.private.seen(),
        (0, 0),
        "the loopback-only listener received (connections, bytes) from outside the pod \
         after {} tunnel streams and {PLAIN_ATTEMPTS} plain connections",
        authorities.len()
    );
    for (authority, outcome) in authorities.iter().zip(&attempts) {
        assert_eq!(
            outcome
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .map_err(String::as_str),
            Err("upstream_refused"),
            "tunnel stream to {authority}"
        );
    }
    for outcome in plain {
        match outcome {
            Ok(back) => assert!(back.is_empty(), "plain TCP got an answer: {back:?}"),
            Err(kind) => assert_eq!(kind, io::ErrorKind::ConnectionReset),
        }
    }
    let m = p.metrics();
    assert_eq!(
        metric(
            &m,
            "tunnel_refusals_total",
            &[r#"reason="upstream_refused""#]
        ),
        authorities.len() as f64,
        "{m}"
    );
}

test_cases!(the_pod_address_is_served_and_loopback_stays_private {
    the_pod_address_is_served_and_loopback_stays_private_v4: Fam::V4,
    the_pod_address_is_served_and_loopback_stays_private_v6: Fam::V6,
});

#[test]
fn a_pod_that_opts_in_gets_loopback_delivery() {
    let p = Pod::start(Fam::V4, &[("ISTHMUS_INBOUND_LOOPBACK", "true")]);
    assert!(
        p.config().contains("\"inbound_loopback\": true"),
        "{}",
        p.config()
    );
    let served = p.tunnel(&[format!("{}:{PRIVATE_PORT}", p.pod_ip)], b"debug");
    assert_eq!(served, [Ok(b"debug".to_vec())]);
    assert_eq!(p.plain(PRIVATE_PORT, b"plain"), Ok(b"plain".to_vec()));
    assert_eq!(p.private.seen(), (2, 10));
    // An app on every address is reached on loopback too.
    assert_eq!(p.plain(OPEN_PORT, b"open"), Ok(b"open".to_vec()));
}
