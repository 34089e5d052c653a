//! Per-request balancing seen from an application under capture: keep-alive
//! HTTP/1.1 and HTTP/2 clients, one connection each, call the mirrored `hello`
//! through their pod's sidecar, cluster-b's gateway and cluster-a's gateway, which
//! chooses among three replicas for every request (not once per connection).
//!
//! The world: the sidecar pod (198.18.0.2, capture by `isthmus-init`) and, in the
//! server namespace (198.18.0.1), cluster-b's two gateway replicas b1 and b2
//! (198.18.0.3 and .4, both `gateway.cluster-b.test` in the pod's hosts file),
//! cluster-a's gateway on 198.18.0.1:5143 and the replicas on loopback addresses 127.0.0.21 to .23, each speaking
//! HTTP/1.1 or h2c (whichever a connection opens with) and answering its name.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use isthmus_test_support::eventually_blocking;
use isthmus_tests::h2c;
use isthmus_tests::identity::{self, Pki};
use isthmus_tests::multicluster::{
    MIRROR, NAMESPACE, cluster_settings, gateway_id, link, service, settings_at,
};
use isthmus_tests::pod::{self, SidecarPod};
use isthmus_tests::wan::{proxy_command, write_files};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{WITHIN, addr, read_head};

const GATEWAY_A: &str = "198.18.0.1:5143";
const ADMIN_A: &str = "127.0.0.1:5191";
/// cluster-b's gateway replicas (name, address, admin server), on addresses of
/// their own in the server namespace, both named [`B_NAME`] in the pod.
const GATEWAYS_B: [(&str, &str, &str); 2] = [
    ("b1", "198.18.0.3:4143", "127.0.0.1:4192"),
    ("b2", "198.18.0.4:4143", "127.0.0.1:4193"),
];
const B_NAME: &str = "gateway.cluster-b.test";
const REPLICAS: [&str; 3] = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];
/// Mirrored Services get addresses on the pod's own link, so the app's connect
/// is routed (and then captured).
const SERVICE_CIDR: &str = "198.18.0.128/25";
/// Requests per client connection.
const REQUESTS: usize = 300;

/// Counts the requests it answers, on either protocol.
#[derive(Clone)]
struct Origin {
    name: &'static str,
    served: Arc<AtomicUsize>,
}

impl Origin {
    fn start(listener: TcpListener, name: &'static str) -> Origin {
        let origin = Origin {
            name,
            served: Arc::new(AtomicUsize::new(0)),
        };
        let serving = origin.clone();
        h2c::spawn_server(listener, WITHIN * 10, move |listener| async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serving.clone().serve(socket));
            }
        });
        origin
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    async fn serve(self, socket: tokio::net::TcpStream) {
        // The h2c preface's first bytes, or an HTTP/1.1 request line.
        let mut first = [0u8; 3];
        for _ in 0..100 {
            match socket.peek(&mut first).await {
                Ok(3) => break,
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        if &first == b"PRI" {
            self.serve_h2(socket).await;
        } else {
            self.serve_http1(socket).await;
        }
    }

    async fn serve_h2(&self, socket: tokio::net::TcpStream) {
        let Ok(mut conn) = h2::server::handshake(socket).await else {
            return;
        };
        while let Some(Ok((_, mut respond))) = conn.accept().await {
            self.served.fetch_add(1, Ordering::SeqCst);
            let response = http::Response::builder().status(200).body(()).unwrap();
            if let Ok(mut body) = respond.send_response(response, false) {
                let _ = body.send_data(bytes::Bytes::from_static(self.name.as_bytes()), true);
            }
        }
    }

    /// Keep-alive: answers bodiless requests until the connection ends.
    async fn serve_http1(&self, socket: tokio::net::TcpStream) {
        let mut socket = BufReader::new(socket);
        loop {
            let mut line = String::new();
            let mut head_ended = false;
            while !head_ended {
                line.clear();
                if !matches!(socket.read_line(&mut line).await, Ok(n) if n > 0) {
                    return;
                }
                head_ended = line == "\r\n";
            }
            self.served.fetch_add(1, Ordering::SeqCst);
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{}",
                self.name.len(),
                self.name
            );
            if socket.get_mut().write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// cluster-b's settings as the sidecar reads them: its gateway, and where
/// mirrored Services get their addresses.
fn sidecar_settings() -> String {
    let id = gateway_id("cluster-b").to_string();
    settings_at(NAMESPACE, "cluster-b", B_NAME, 4143, &id).replace(
        "  trustDomain: cluster.local\n",
        &format!("  trustDomain: cluster.local\n  serviceCIDR: {SERVICE_CIDR}\n"),
    )
}

/// The mirrored `hello`'s address: the first key of the sidecar's address index
/// (the only Service it knows).
fn mirrored_hello(pod: &SidecarPod) -> Option<SocketAddr> {
    let config: String = pod.admin("/config").ok()?.split_whitespace().collect();
    let rest = config.split_once("\"addresses\":{\"")?.1;
    rest.split('"').next()?.parse().ok()
}

/// `GET /` on a keep-alive connection: the name of the replica that answered.
fn get(stream: &mut TcpStream) -> Option<String> {
    write!(stream, "GET / HTTP/1.1\r\nhost: hello\r\n\r\n").ok()?;
    let head = read_head(stream)?;
    let length: usize = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    head.starts_with("HTTP/1.1 200")
        .then(|| String::from_utf8_lossy(&body).into_owned())
}

/// [`REQUESTS`] GETs on one keep-alive connection: who answered each.
fn http1_client(pod: &SidecarPod, hello: SocketAddr) -> Vec<String> {
    pod.pod.run(|| {
        let mut stream = TcpStream::connect_timeout(&hello, WITHIN).unwrap();
        stream.set_read_timeout(Some(WITHIN)).unwrap();
        (0..REQUESTS)
            .map(|i| get(&mut stream).unwrap_or_else(|| panic!("HTTP/1.1 request {i} failed")))
            .collect()
    })
}

/// [`REQUESTS`] GETs, one after another, on one h2c connection: who answered each.
fn h2_client(pod: &SidecarPod, hello: SocketAddr) -> Vec<String> {
    pod.pod.run(|| {
        h2c::block_on(WITHIN * 4, "the h2 client", async {
            let (mut client, driver) = h2c::connect(hello).await;
            let mut names = Vec::new();
            for i in 0..REQUESTS {
                client = client.ready().await.unwrap();
                let request = http::Request::get(format!("http://{hello}/"))
                    .body(())
                    .unwrap();
                let (response, _) = client.send_request(request, true).unwrap();
                let response = response
                    .await
                    .unwrap_or_else(|e| panic!("h2 request {i}: {e}"));
                assert_eq!(response.status(), 200, "h2 request {i}");
                let name = h2c::read_body(response.into_body()).await.unwrap();
                names.push(String::from_utf8(name).unwrap());
            }
            driver.abort();
            names
        })
    })
}

/// The pod, both gateways and the replicas.
struct World {
    /// The second of cluster-b's gateway replicas, which a test kills.
    b2: Option<Child>,
    /// Dropped first, while the logs are still there.
    _show: ShowLogs,
    pod: SidecarPod,
    origins: Vec<Origin>,
    /// The mirrored `hello`, once it answers.
    hello: SocketAddr,
    _dir: tempfile::TempDir,
}

/// A gateway of the world: its name, cluster, address, admin server and manifests.
type Gateway<'a> = (&'a str, &'a str, &'a str, &'a str, Vec<(&'a str, String)>);

fn start() -> World {
    let pki = Pki::new("balance through a sidecar anchor");
    let mut pod =
        SidecarPod::start(identity::frontend_of(&pki), &["--reload-interval", "200ms"]).unwrap();
    let origins: Vec<Origin> = REPLICAS
        .iter()
        .zip(["r1", "r2", "r3"])
        .map(|(ip, name)| {
            let listener = pod.server.run(|| TcpListener::bind((*ip, 8080))).unwrap();
            Origin::start(listener, name)
        })
        .collect();
    let endpoints: String = REPLICAS
        .iter()
        .map(|ip| format!("  - ip: '{ip}'\n"))
        .collect();
    let first = format!("  - ip: '{}'\n", REPLICAS[0]);
    let hello =
        service("hello", addr(&format!("{}:8080", REPLICAS[0])), true).replace(&first, &endpoints);
    let a_settings = cluster_settings("cluster-a", addr(GATEWAY_A));
    let a_link = link("cluster-a", addr(GATEWAY_A), addr(ADMIN_A));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut logs = vec![pod.log.clone()];
    let mut gateways: Vec<Gateway<'_>> = vec![(
        "a",
        "cluster-a",
        GATEWAY_A,
        ADMIN_A,
        vec![
            ("settings.yaml", a_settings.clone()),
            ("hello.yaml", hello.clone()),
        ],
    )];
    for (name, listen, admin) in GATEWAYS_B {
        let settings = cluster_settings("cluster-b", addr(listen));
        let files = vec![("settings.yaml", settings), ("link.yaml", a_link.clone())];
        gateways.push((name, "cluster-b", listen, admin, files));
    }
    let mut b2 = None;
    for (name, cluster, listen, admin, files) in gateways {
        write_files(&root.join(format!("manifests-{name}")), &files);
        pki.leaf(cluster, &gateway_id(cluster))
            .write_dir(&root.join(format!("identity-{name}")), false)
            .unwrap();
        let ip = addr(listen).ip().to_string();
        if ip != "198.18.0.1" {
            pod.server
                .exec("ip", &["addr", "add", &format!("{ip}/32"), "dev", "lo"])
                .unwrap();
        }
        let mut cmd = proxy_command(&pod.server, "gateway", cluster, root, name, admin);
        cmd.args(["--inbound-addr", listen, "--allow-local-endpoints"])
            .args(["--reload-interval", "200ms", "--log", "info"]);
        let log = root.join(format!("gateway-{name}.log"));
        if name == "b2" {
            // Its own child, for the test that kills it.
            let stderr = std::fs::File::create(&log).unwrap();
            b2 = Some(cmd.env_clear().stderr(stderr).spawn().unwrap());
        } else {
            pod.lab.spawn_logged(&mut cmd, &log);
        }
        logs.push(log);
    }
    // Both of cluster-b's gateway replicas answer to its name, in the pod.
    let hosts: String = GATEWAYS_B
        .iter()
        .map(|(_, listen, _)| format!("{} {B_NAME}\n", addr(listen).ip()))
        .collect();
    pod.pod.write_hosts(&hosts).unwrap();
    write_files(
        &pod.manifests,
        &[
            ("settings.yaml", sidecar_settings()),
            ("link.yaml", a_link),
            ("clusters/cluster-a/settings.yaml", a_settings),
            ("clusters/cluster-a/hello.yaml", hello),
            ("mirror.yaml", MIRROR.to_owned()),
        ],
    );
    // The sidecar dials the gateway its settings named when it started.
    pod.kill_and_restart().unwrap();
    let hello = eventually_blocking("the sidecar to route the mirrored hello", WITHIN, || {
        mirrored_hello(&pod)
    });
    // Until the gateways' link is up a request may be refused.
    eventually_blocking("a first answer through the gateways", WITHIN, || {
        pod.pod.run(|| {
            let mut stream = TcpStream::connect_timeout(&hello, WITHIN).ok()?;
            stream.set_read_timeout(Some(WITHIN)).ok()?;
            get(&mut stream)
        })
    });
    World {
        b2,
        _show: ShowLogs(logs),
        pod,
        origins,
        hello,
        _dir: dir,
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut b2) = self.b2.take() {
            let _ = b2.kill();
            let _ = b2.wait();
        }
    }
}

/// Prints the gateways' and the sidecar's logs when the test fails.
struct ShowLogs(Vec<std::path::PathBuf>);

impl Drop for ShowLogs {
    fn drop(&mut self) {
        pod::show_logs_if_failing(&self.0);
    }
}

#[test]
fn keep_alive_and_h2_clients_through_a_sidecar_spread_over_every_replica() {
    let _turn = super::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let world = start();
    let (pod, origins, hello) = (&world.pod, &world.origins, world.hello);
    let before: Vec<usize> = origins.iter().map(Origin::served).collect();
    let clients: Vec<Vec<String>> = std::thread::scope(|scope| {
        let http1 = [(); 2].map(|()| scope.spawn(|| http1_client(pod, hello)));
        let h2 = scope.spawn(|| h2_client(pod, hello));
        let mut answers: Vec<Vec<String>> = http1.into_iter().map(|c| c.join().unwrap()).collect();
        answers.push(h2.join().unwrap());
        answers
    });
    let shares: Vec<usize> = origins
        .iter()
        .zip(before)
        .map(|(origin, before)| origin.served() - before)
        .collect();
    eprintln!("FIGURE balance_sidecar_fair_share_of_900 = {shares:?}");
    // Each connection is spread, not pinned: every replica answered it often.
    for (client, names) in ["http/1.1 #1", "http/1.1 #2", "h2"].iter().zip(&clients) {
        for origin in origins {
            let got = names.iter().filter(|n| *n == origin.name).count();
            assert!(
                got >= REQUESTS / 6,
                "{} answered {got} of {client}'s {REQUESTS} requests",
                origin.name
            );
        }
    }
    let fair = REQUESTS * clients.len() / origins.len();
    for (origin, share) in origins.iter().zip(&shares) {
        assert!(
            (fair * 3 / 4..=fair * 5 / 4).contains(share),
            "{} got {share} (fair: {fair} +- 25%): {shares:?}",
            origin.name
        );
    }
}

/// Sends GETs on one keep-alive connection (a new one after a failure) until
/// `count` were sent, counting them in `sent`: the indices of those that failed.
fn keep_alive_failures(
    pod: &SidecarPod,
    hello: SocketAddr,
    count: usize,
    sent: &AtomicUsize,
) -> Vec<usize> {
    pod.pod.run(|| {
        let connect = || {
            let stream = TcpStream::connect_timeout(&hello, WITHIN).ok()?;
            stream.set_read_timeout(Some(WITHIN)).ok()?;
            Some(stream)
        };
        let mut stream = connect();
        let mut failed = Vec::new();
        for i in 0..count {
            if stream.as_mut().and_then(get).is_none() {
                failed.push(i);
                stream = connect();
            }
            sent.fetch_add(1, Ordering::SeqCst);
        }
        failed
    })
}

#[test]
fn a_killed_local_gateway_replica_fails_no_idempotent_request() {
    let _turn = super::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mut world = start();
    let mut b2 = world.b2.take().unwrap();
    let (pod, hello) = (&world.pod, world.hello);
    let pool_is = |state: &str| {
        let config: String = pod.admin("/config").ok()?.split_whitespace().collect();
        config.contains(state).then_some(())
    };
    eventually_blocking(
        "the sidecar's pool on both gateway replicas",
        WITHIN,
        || pool_is("\"state\":\"up(2connections)\""),
    );
    let sent = AtomicUsize::new(0);
    let failed = std::thread::scope(|scope| {
        let client = scope.spawn(|| keep_alive_failures(pod, hello, 2 * REQUESTS, &sent));
        eventually_blocking("a first hundred requests", WITHIN, || {
            (sent.load(Ordering::SeqCst) >= 100).then_some(())
        });
        b2.kill().unwrap();
        b2.wait().unwrap();
        client.join().unwrap()
    });
    assert_eq!(
        failed,
        Vec::<usize>::new(),
        "requests that failed (of {}; b2 was killed after 100)",
        2 * REQUESTS
    );
    // The kill was seen, not missed: the pool holds only b1's connection.
    eventually_blocking("the sidecar's pool to drop b2", WITHIN, || {
        pool_is("\"state\":\"up(1connections)\"")
    });
}
