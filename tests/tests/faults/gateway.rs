//! A black-holed peer gateway: noticed by the link's keepalive, refused at once
//! while known down, and recovered from when the path heals.

use super::*;

const HELLO: &str = "hello.default.svc.cluster.local:80";
/// The gateways' connect timeout: the bound of a connect into a black hole.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// PING interval + timeout of the tunnel's HTTP/2 connections (their defaults).
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Slack for a debug build on a shared machine.
const SLACK: Duration = Duration::from_secs(10);

/// Two gateways in two namespaces joined by a veth pair: gateway-b (198.18.0.1) in
/// `ns_b`, where the test plays cluster-b's sidecar, and gateway-a (198.18.0.2) in
/// `ns_a`, in front of an echo server on its loopback.
struct Gateways {
    ns_b: Namespace,
    gw_a: SocketAddr,
    gw_b: SocketAddr,
    admin_b: SocketAddr,
    dir: tempfile::TempDir,
    logs: Vec<PathBuf>,
    /// Dropped last: kills the gateways and deletes the namespaces.
    _lab: Lab,
}

impl Drop for Gateways {
    fn drop(&mut self) {
        pod::show_logs_if_failing(&self.logs);
    }
}

impl Gateways {
    fn start(pki: &Pki) -> Self {
        let lab = Lab::new();
        let Pair {
            pod: ns_a,
            server: ns_b,
            ..
        } = lab.pair(false);
        let gw_b: SocketAddr = "198.18.0.1:4143".parse().unwrap();
        // On loopback: the test reads gateway-b's /config, which answers loopback only.
        let admin_b: SocketAddr = "127.0.0.1:4191".parse().unwrap();
        let gw_a: SocketAddr = "198.18.0.2:4143".parse().unwrap();
        let admin_a: SocketAddr = "198.18.0.2:4191".parse().unwrap();
        let backend: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        tcp::echo_forever(ns_a.run(|| tcp::listen(backend)).unwrap(), ECHO_IDLE);

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for cluster in ["cluster-a", "cluster-b"] {
            pki.leaf(cluster, &gateway_id(cluster))
                .write_dir(&root.join(format!("identity-{cluster}")), false)
                .unwrap();
        }
        let a = root.join("manifests-cluster-a");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("settings.yaml"), cluster_settings("cluster-a", gw_a)).unwrap();
        std::fs::write(a.join("hello.yaml"), service("hello", backend, true)).unwrap();
        std::fs::write(a.join("link.yaml"), link("cluster-b", gw_b, admin_b)).unwrap();
        let b = root.join("manifests-cluster-b");
        std::fs::create_dir_all(b.join("clusters/cluster-a")).unwrap();
        std::fs::write(b.join("settings.yaml"), cluster_settings("cluster-b", gw_b)).unwrap();
        std::fs::write(b.join("link.yaml"), link("cluster-a", gw_a, admin_a)).unwrap();
        std::fs::write(
            b.join("clusters/cluster-a/settings.yaml"),
            cluster_settings("cluster-a", gw_a),
        )
        .unwrap();
        std::fs::write(
            b.join("clusters/cluster-a/hello.yaml"),
            service("hello", backend, true),
        )
        .unwrap();

        let mut logs = Vec::new();
        for (cluster, ns, inbound, admin) in [
            ("cluster-a", &ns_a, gw_a, admin_a),
            ("cluster-b", &ns_b, gw_b, admin_b),
        ] {
            let log = root.join(format!("gateway-{cluster}.log"));
            let mut cmd = ns.command(binary("isthmus-proxy"));
            cmd.args(["gateway", "--cluster", cluster, "--identity-dir"])
                .arg(root.join(format!("identity-{cluster}")))
                .arg("--manifests")
                .arg(root.join(format!("manifests-{cluster}")))
                .args(["--inbound-addr", &inbound.to_string()])
                .args(["--admin-addr", &admin.to_string()])
                .args(["--reload-interval", "200ms", "--tunnel-connections", "1"])
                .args([
                    "--connect-timeout",
                    &format!("{}s", CONNECT_TIMEOUT.as_secs()),
                ])
                .args(["--log", "info,proxy_core=debug", "--workers", "1"])
                // The echo server is on the gateway namespace's loopback.
                .arg("--allow-local-endpoints");
            lab.spawn_logged(&mut cmd, &log);
            logs.push(log);
        }
        let gateways = Gateways {
            ns_b,
            gw_a,
            gw_b,
            admin_b,
            dir,
            logs,
            _lab: lab,
        };
        gateways.eventually("gateway-b's link to cluster-a to come up", SLACK, || {
            gateways.link_up_metric() == Some(1.0)
        });
        gateways
    }

    fn admin_b(&self, path: &str) -> String {
        self.ns_b
            .run(|| pod::http_get(self.admin_b, path))
            .unwrap_or_default()
    }

    fn link_up_metric(&self) -> Option<f64> {
        let response = self.admin_b("/metrics");
        let (_, body) = response.split_once("\r\n\r\n")?;
        Metrics::parse(body).get("gateway_link_up", &[r#"cluster="cluster-a""#])
    }

    /// Waits until `ok` holds, within `limit`; how long that took.
    fn eventually(&self, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
        let started = Instant::now();
        eventually_blocking(what, limit, || ok().then_some(()));
        started.elapsed()
    }

    /// DROPs everything between gateway-b and gateway-a, in gateway-b's namespace.
    fn black_hole(&self, on: bool) {
        let op = if on { "-I" } else { "-D" };
        let peer = self.gw_a.ip().to_string();
        for (chain, dir) in [("OUTPUT", "-d"), ("INPUT", "-s")] {
            self.ns_b
                .exec("iptables", &[op, chain, dir, &peer, "-j", "DROP"])
                .unwrap();
        }
    }
}

#[test]
fn a_black_holed_peer_gateway_is_noticed_by_keepalive_and_recovers() {
    use proxy_core::pool::Pool;

    use proxy_identity::{CredentialPaths, CredentialStore, PeerPolicy};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::timeout;

    let pki = Pki::new("faults anchor");
    let g = Gateways::start(&pki);
    let sidecar_dir = g.dir.path().join("identity-sidecar-b");
    pki.leaf(
        "cluster-b",
        &SpiffeId::parse("spiffe://cluster.local/ns/default/sa/frontend").unwrap(),
    )
    .write_dir(&sidecar_dir, false)
    .unwrap();
    let store = Arc::new(CredentialStore::load(CredentialPaths::in_dir(&sidecar_dir)).unwrap());

    // The test plays cluster-b's sidecar: a warm pool to gateway-b, from its namespace.
    g.ns_b.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let stopped = tokio_util::sync::CancellationToken::new();
            let pool = Pool::spawn(
                test_peer(
                    "test/gateway-b",
                    g.gw_b,
                    proxy_identity::client_config(
                        store,
                        PeerPolicy::Exact(gateway_id("cluster-b")),
                    ),
                    1,
                    WAIT,
                ),
                stopped,
            );
            let authority = Authority::parse(HELLO).unwrap();
            let cluster = ClusterName::parse("cluster-a").unwrap();
            let limit = CONNECT_TIMEOUT + KEEPALIVE + SLACK;
            let open = || async {
                timeout(limit, pool.open(&authority, Some(&cluster)))
                    .await
                    .unwrap_or_else(|_| panic!("opening a stream hung past {limit:?}"))
            };

            let mut held = open().await.unwrap();
            held.write_all(b"before\n").await.unwrap();
            let mut back = [0u8; 7];
            timeout(WAIT, held.read_exact(&mut back))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&back, b"before\n");

            g.black_hole(true);
            let holed = Instant::now();

            // A new stream now rides the dead link connection or a connect into the
            // black hole: either way it must fail, bounded by the connect timeout
            // or the keepalive, never hang.
            let first_took = timed_failure(
                open().await,
                limit,
                holed,
                "blackhole_first_stream_failed_ms",
            )
            .await;

            // The established stream's loss is noticed: it ends, with no more bytes.
            let _ = held.write_all(b"lost?\n").await;
            let mut rest = Vec::new();
            let ended = timeout(limit, held.read_to_end(&mut rest)).await;
            assert!(ended.is_ok(), "the held stream outlived the keepalive");
            assert!(rest.is_empty(), "bytes crossed a black hole: {rest:?}");
            figure(
                "blackhole_established_stream_ended_ms",
                holed.elapsed().as_millis(),
            );

            // The link is down on /metrics and /config.
            let noticed = g.eventually("gateway_link_up to turn 0", limit, || {
                g.link_up_metric() == Some(0.0)
            });
            figure(
                "blackhole_link_down_noticed_ms",
                (noticed + first_took).as_millis(),
            );
            let config = g.admin_b("/config");
            assert!(config.contains("down"), "{config}");

            // Known down: refused at once.
            let started = Instant::now();
            let fast = timed_failure(
                open().await,
                limit,
                started,
                "blackhole_known_down_refusal_ms",
            )
            .await;
            assert!(fast < CONNECT_TIMEOUT + SLACK / 2, "{fast:?}");

            g.black_hole(false);
            let healed = Instant::now();
            loop {
                if let Ok(mut stream) = open().await {
                    // Streams open optimistically: only the echo proves the path.
                    let mut back = [0u8; 6];
                    let echoed = async {
                        stream.write_all(b"after\n").await?;
                        stream.read_exact(&mut back).await
                    };
                    if timeout(WAIT, echoed).await.is_ok_and(|r| r.is_ok()) {
                        assert_eq!(&back, b"after\n");
                        break;
                    }
                }
                assert!(
                    healed.elapsed() < limit,
                    "the link did not recover within {limit:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            figure("blackhole_recovery_ms", healed.elapsed().as_millis());
        });
    });
}

/// How long a stream across a broken path took to fail, and how: refused when it
/// was opened, or (tunnel streams open optimistically, before the far end answers)
/// ended with no bytes echoed when used. Fails the test if bytes came back or it
/// did not fail within `limit`.
/// [`stream_fails`] of `opened`, published as the figure `name`: the milliseconds
/// since `since`, and how it failed. Returns that time.
async fn timed_failure(
    opened: Result<proxy_core::tunnel::client::TunnelStream, proxy_core::pool::PoolError>,
    limit: Duration,
    since: Instant,
    name: &str,
) -> Duration {
    let (_, how) = stream_fails(opened, limit).await;
    let took = since.elapsed();
    figure(name, format!("{} ({how})", took.as_millis()));
    took
}

async fn stream_fails(
    opened: Result<proxy_core::tunnel::client::TunnelStream, proxy_core::pool::PoolError>,
    limit: Duration,
) -> (Duration, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut stream = match opened {
        Err(e) => return (started.elapsed(), format!("refused: {e}")),
        Ok(stream) => stream,
    };
    let mut rest = Vec::new();
    let used = async {
        stream.write_all(b"across?\n").await?;
        stream.read_to_end(&mut rest).await
    };
    let ended = tokio::time::timeout(limit, used)
        .await
        .unwrap_or_else(|_| panic!("a stream across a broken path still waits after {limit:?}"));
    assert!(rest.is_empty(), "bytes crossed a broken path: {rest:?}");
    let how = match ended {
        Ok(_) => "opened, then ended with no bytes".to_owned(),
        Err(e) => format!("opened, then failed: {e}"),
    };
    (started.elapsed(), how)
}
