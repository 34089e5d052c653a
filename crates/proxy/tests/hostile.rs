//! Hostile input against the real `isthmus-proxy` on loopback: the gateway's mesh
//! port (TLS policy, broken and slow handshakes, invalid HTTP/2) and the standalone
//! role's HTTP/1 parser (malformed and oversize heads, slowloris).
//!
//! Each test asserts the exact answer (alert, frame, status line or close) within a
//! generous bound, that a well-behaved bystander is still served afterwards, and
//! that the proxy's open file descriptors return to their baseline once the hostile
//! connections are gone. Bounds are upper limits for "it happened", never speed
//! claims.
//!
//! The transparent sidecar path (iptables capture) has the same checks in the netns
//! suite, `tests/tests/hostile.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use isthmus_tests::peer::test_peer;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use isthmus_tests::multicluster::{self, NAMESPACE};
use isthmus_tests::pod;
use isthmus_tests::tcp::{closed_within, read_response};
use isthmus_tests::tls_probe::{handshake_over, probe_config};
use isthmus_vocab::{Authority, ClusterName, SpiffeId};
use proxy_core::pool::Pool;
use proxy_identity::mint::{self, KeyAlgorithm, LeafBundle, Validity};
use proxy_identity::rustls::pki_types::ServerName;
use proxy_identity::rustls::{self, ClientConfig, ClientConnection, StreamOwned};
use proxy_identity::{CredentialPaths, CredentialStore, PeerPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{Proxy as Process, STEP, echo, read_head, serve_each, write_files};

/// `--tls-handshake-timeout` and `--header-read-timeout` of the proxies under test.
const SHORT_TIMEOUT: &str = "2s";
const HELLO: &str = "hello.default.svc.cluster.local:80";

/// The identity of the gateway under test, cluster-a's.
fn gateway_id() -> SpiffeId {
    multicluster::gateway_id("cluster-a")
}

/// The proxy process and where it listens.
struct Proxy {
    process: Process,
    /// The mesh (gateway) or explicit (standalone) listener.
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    fn spawn(role: &str, dir: &Path, listen: SocketAddr, extra: &[&str]) -> Proxy {
        let admin = free_addr(listen.ip());
        let listen_flag = match role {
            "gateway" => "--inbound-addr",
            _ => "--outbound-addr",
        };
        let mut process = Process::command(
            env!("CARGO_BIN_EXE_isthmus-proxy"),
            role,
            "cluster-a",
            &dir.join("identity"),
            &dir.join("manifests"),
            admin,
            dir.join(format!("{role}.log")),
        )
        .args((role == "gateway").then_some("--allow-local-endpoints"))
        .args([listen_flag, &listen.to_string()])
        .args(["--log", "info,proxy_core=debug,proxy_identity=debug"])
        .args(extra.iter().copied())
        .start();
        process.wait_ready_blocking();
        Proxy {
            process,
            listen,
            admin,
        }
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.process.pid()))
            .unwrap()
            .count()
    }

    /// Waits (bounded) until the proxy holds no more descriptors than `baseline`.
    fn fds_return_to(&self, baseline: usize) {
        pod::fds_return_to(self.process.pid(), baseline, STEP, "the proxy");
    }

    fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
    }
}

fn free_addr(ip: IpAddr) -> SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// Sends `request` and reads until the server closes (bounded by [`STEP`]).
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, STEP).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, STEP) else {
        return String::new();
    };
    stream.set_read_timeout(Some(STEP)).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// cluster-a's PKI and the gateway's files: its identity, its cluster settings and
/// an exported `hello` Service whose endpoint is an echo server.
struct Fixture {
    dir: tempfile::TempDir,
    issuer: mint::CertificateAuthority,
    validity: Validity,
}

impl Fixture {
    fn new(gateway: SocketAddr) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let validity = Validity::from_now(Duration::from_secs(3600));
        let anchor =
            mint::trust_anchor("hostile anchor", validity, KeyAlgorithm::EcdsaP256).unwrap();
        let issuer = mint::issuer(&anchor, "cluster-a", validity, KeyAlgorithm::EcdsaP256).unwrap();
        let fixture = Fixture {
            dir,
            issuer,
            validity,
        };
        fixture
            .leaf(&gateway_id())
            .write_dir(&fixture.dir.path().join("identity"), false)
            .unwrap();
        let manifests = fixture.dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        write_files(
            &manifests,
            &[(
                "settings.yaml",
                &format!(
                    "apiVersion: multicluster.isthmus.io/v1alpha1
kind: ClusterSettings
metadata: {{name: cluster-a, namespace: {NAMESPACE}}}
spec:
  clusterName: cluster-a
  trustDomain: cluster.local
  gateway: {{address: '{ip}', port: {port}, identity: {id}}}
",
                    ip = gateway.ip(),
                    port = gateway.port(),
                    id = gateway_id(),
                ),
            )],
        );
        let backend = echo();
        write_files(
            &manifests,
            &[(
                "hello.yaml",
                &format!(
                    "apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: default
  labels: {{mirror.isthmus.io/exported: 'true'}}
spec:
  ports: [{{port: 80, protocol: TCP, targetPort: {port}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: hello, namespace: default}}
subsets:
- addresses: [{{ip: '{ip}'}}]
  ports: [{{port: {port}, protocol: TCP}}]
",
                    ip = backend.ip(),
                    port = backend.port(),
                ),
            )],
        );
        fixture
    }

    fn leaf(&self, id: &SpiffeId) -> LeafBundle {
        mint::leaf(&self.issuer, id, self.validity, KeyAlgorithm::EcdsaP256).unwrap()
    }

    /// A workload of cluster-a, as a sidecar of the cluster would present itself.
    fn workload(&self) -> LeafBundle {
        self.leaf(&SpiffeId::parse("spiffe://cluster.local/ns/default/sa/frontend").unwrap())
    }

    fn store(&self, leaf: &LeafBundle) -> Arc<CredentialStore> {
        let dir = self.dir.path().join(format!("client-{}", rand_suffix()));
        leaf.write_dir(&dir, false).unwrap();
        Arc::new(CredentialStore::load(CredentialPaths::in_dir(&dir)).unwrap())
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// A well-behaved mesh client: a warm tunnel pool to the gateway that round-trips
/// bytes through the exported echo service.
struct Bystander {
    runtime: tokio::runtime::Runtime,
    pool: Pool,
    _stop: tokio_util::sync::CancellationToken,
}

impl Bystander {
    fn new(fixture: &Fixture, gateway: SocketAddr) -> Bystander {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let store = fixture.store(&fixture.workload());
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let pool = runtime.block_on(async {
            Pool::spawn(
                test_peer(
                    "bystander",
                    gateway,
                    proxy_identity::client_config(store, PeerPolicy::Exact(gateway_id())),
                    1,
                    STEP,
                ),
                stopped,
            )
        });
        Bystander {
            runtime,
            pool,
            _stop: stop,
        }
    }

    /// One stream through the gateway to the echo service and back.
    fn served(&self) {
        let authority = Authority::parse(HELLO).unwrap();
        let cluster = ClusterName::parse("cluster-a").unwrap();
        let round_trip = async {
            let stream = self.pool.open(&authority, Some(&cluster)).await.unwrap();
            let (mut rd, mut wr) = tokio::io::split(stream);
            wr.write_all(b"still served").await.unwrap();
            wr.shutdown().await.unwrap();
            let mut back = Vec::new();
            rd.read_to_end(&mut back).await.unwrap();
            back
        };
        let back = self
            .runtime
            .block_on(async { tokio::time::timeout(STEP, round_trip).await })
            .expect("the bystander's stream hung");
        assert_eq!(back, b"still served");
    }
}

fn no_sni(addr: SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

fn handshake(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<StreamOwned<ClientConnection, TcpStream>, String> {
    let sock = TcpStream::connect_timeout(&addr, STEP).unwrap();
    handshake_over(sock, ClientConnection::new(config, name).unwrap(), STEP)
}

/// The client's first flight (its ClientHello record), and the connection that
/// continues the handshake once those bytes are on the wire.
fn client_hello(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> (ClientConnection, Vec<u8>) {
    let mut conn = ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    (conn, hello)
}

/// A proxy in `role` with `flags`, listening on `127.0.<net>.1`, and its fixture.
fn start(role: &str, net: u8, flags: &[&str]) -> (Fixture, Proxy) {
    let listen = free_addr(IpAddr::V4(Ipv4Addr::new(127, 0, net, 1)));
    let fixture = Fixture::new(listen);
    let proxy = Proxy::spawn(role, fixture.dir.path(), listen, flags);
    (fixture, proxy)
}

fn start_gateway(net: u8) -> (Fixture, Proxy, Bystander) {
    let limits = ["--h2-max-header-list-size", "4096"];
    let flags = [&["--tls-handshake-timeout", SHORT_TIMEOUT][..], &limits].concat();
    let (fixture, proxy) = start("gateway", net, &flags);
    let bystander = Bystander::new(&fixture, proxy.listen);
    bystander.served();
    (fixture, proxy, bystander)
}

#[test]
fn the_gateway_refuses_tls12_weak_offers_plaintext_foreign_sni_and_certless_clients() {
    let (fixture, proxy, bystander) = start_gateway(81);
    let addr = proxy.listen;
    let workload = fixture.workload();
    let baseline = proxy.fds();

    // The mesh client as it is: TLS 1.3, a certificate, no SNI (it dials an IP).
    let (good, _) = probe_config(&[&rustls::version::TLS13], Some(&workload)).unwrap();
    handshake(addr, good.clone(), no_sni(addr)).unwrap();
    // SNI naming the gateway's own identity is served too.
    let own = proxy_identity::sni_name(&gateway_id()).unwrap();
    handshake(addr, good.clone(), ServerName::try_from(own).unwrap()).unwrap();

    // TLS 1.2 only: refused with protocol_version, before any certificate.
    let (tls12, seen) = probe_config(&[&rustls::version::TLS12], Some(&workload)).unwrap();
    let err = handshake(addr, tls12, no_sni(addr)).err().unwrap();
    assert!(err.contains("AlertReceived(ProtocolVersion)"), "{err}");
    assert!(
        !seen.load(Ordering::SeqCst),
        "a TLS 1.2 client saw our certificate"
    );

    // A ClientHello naming another server: access_denied, our certificate unseen.
    let (foreign, seen) = probe_config(&[&rustls::version::TLS13], Some(&workload)).unwrap();
    let name = ServerName::try_from("hello.default.svc.cluster.local").unwrap();
    let err = handshake(addr, foreign, name).err().unwrap();
    assert!(err.contains("AlertReceived(AccessDenied)"), "{err}");
    assert!(
        !seen.load(Ordering::SeqCst),
        "a foreign SNI was answered with our certificate"
    );

    // No client certificate: the server asks for one and refuses its absence.
    let (certless, _) = probe_config(&[&rustls::version::TLS13], None).unwrap();
    let err = handshake(addr, certless, no_sni(addr)).err().unwrap();
    assert!(err.contains("AlertReceived(CertificateRequired)"), "{err}");

    // Only a suite the mesh does not offer (CCM with an 8-byte tag): handshake_failure.
    let output = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", &addr.to_string()])
        .args(["-tls1_3", "-ciphersuites", "TLS_AES_128_CCM_8_SHA256"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("handshake failure"), "{text}");
    assert!(text.contains("no peer certificate available"), "{text}");

    // Plaintext HTTP on the mesh port: closed, never answered in HTTP.
    let mut plain = TcpStream::connect_timeout(&addr, STEP).unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n")
        .unwrap();
    let answer = closed_within(&mut plain, STEP, "plaintext client");
    assert!(!answer.windows(5).any(|w| w == b"HTTP/"), "{answer:?}");
    // What it got, if anything, is a TLS alert record.
    assert!(answer.is_empty() || answer[0] == 0x15, "{answer:?}");
    drop(plain);

    bystander.served();
    proxy.fds_return_to(baseline);
    let metrics = proxy.metrics();
    assert!(metrics.contains("reason=\"tls_handshake\""), "{metrics}");
    // The limits in effect are on /config, as set on the command line.
    let config = http_get(proxy.admin, "/config");
    for shown in [
        "\"tls_handshake_timeout\": \"2s\"",
        "\"h2_max_header_list_size\": 4096",
        "\"max_connections\": 10000",
    ] {
        assert!(config.contains(shown), "{shown} not in {config}");
    }
}

#[test]
fn broken_split_and_slow_handshakes_are_handled_and_release_their_descriptors() {
    let (fixture, proxy, bystander) = start_gateway(82);
    let addr = proxy.listen;
    let workload = fixture.workload();
    let (good, _) = probe_config(&[&rustls::version::TLS13], Some(&workload)).unwrap();
    let baseline = proxy.fds();

    // A ClientHello in 1-byte TCP segments is still a ClientHello.
    let (conn, hello) = client_hello(good.clone(), no_sni(addr));
    let mut sock = TcpStream::connect_timeout(&addr, STEP).unwrap();
    sock.set_nodelay(true).unwrap();
    for byte in &hello {
        sock.write_all(std::slice::from_ref(byte)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Err(e) = handshake_over(sock, conn, STEP) {
        panic!("1-byte segments: {e}");
    }

    // A ClientHello fragmented over several TLS records, as RFC 8446 5.1 allows.
    let (conn, hello) = client_hello(good.clone(), no_sni(addr));
    assert_eq!(hello[0], 0x16, "a handshake record");
    let body = &hello[5..];
    let mut records = Vec::new();
    for chunk in body.chunks(40) {
        records.extend_from_slice(&[0x16, hello[1], hello[2]]);
        records.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        records.extend_from_slice(chunk);
    }
    assert!(body.len() > 80, "at least three records");
    let mut sock = TcpStream::connect_timeout(&addr, STEP).unwrap();
    sock.write_all(&records).unwrap();
    if let Err(e) = handshake_over(sock, conn, STEP) {
        panic!("fragmented records: {e}");
    }

    // Garbage before a valid ClientHello: refused and closed.
    let (_conn, hello) = client_hello(good.clone(), no_sni(addr));
    let mut sock = TcpStream::connect_timeout(&addr, STEP).unwrap();
    sock.write_all(b"\x00\x01garbage\r\n").unwrap();
    let _ = sock.write_all(&hello);
    let answer = closed_within(&mut sock, STEP, "garbage before the ClientHello");
    assert!(answer.is_empty() || answer[0] == 0x15, "{answer:?}");

    // A truncated handshake: half a ClientHello, then the client goes away.
    let mut sock = TcpStream::connect_timeout(&addr, STEP).unwrap();
    sock.write_all(&hello[..hello.len() / 2]).unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    closed_within(&mut sock, STEP, "a truncated ClientHello");
    drop(sock);

    // Slow handshakes: silence, and half a ClientHello then silence. Both are cut
    // by the handshake timeout while a bystander is served meanwhile.
    let mut silent = TcpStream::connect_timeout(&addr, STEP).unwrap();
    let mut stalled = TcpStream::connect_timeout(&addr, STEP).unwrap();
    stalled.write_all(&hello[..hello.len() / 2]).unwrap();
    bystander.served();
    closed_within(&mut silent, STEP, "a silent client");
    closed_within(&mut stalled, STEP, "a stalled handshake");
    drop((silent, stalled));

    bystander.served();
    proxy.fds_return_to(baseline);
    let metrics = proxy.metrics();
    assert!(
        metrics.contains("reason=\"tls_handshake_timeout\""),
        "{metrics}"
    );
}

/// An HTTP/2 frame: 9-byte header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PROTOCOL_ERROR: u32 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header field without indexing; `name` is a static table index or a
/// literal name.
fn hpack_field(out: &mut Vec<u8>, name: Result<usize, &str>, value: &str) {
    match name {
        Ok(index) => hpack_int(out, 0x00, 4, index),
        Err(name) => {
            out.push(0x00);
            hpack_int(out, 0x00, 7, name.len());
            out.extend_from_slice(name.as_bytes());
        }
    }
    hpack_int(out, 0x00, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// The header block of a tunnel CONNECT for [`HELLO`] in cluster-a, plus `extra`.
fn connect_block(extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    hpack_field(&mut block, Ok(2), "CONNECT"); // :method
    hpack_field(&mut block, Ok(1), HELLO); // :authority
    hpack_field(&mut block, Err("isthmus-cluster"), "cluster-a");
    for (name, value) in extra {
        hpack_field(&mut block, Err(name), value);
    }
    block
}

/// Reads frames until one of `kind` arrives (returned), or the connection ends.
fn read_until(
    stream: &mut StreamOwned<ClientConnection, TcpStream>,
    kinds: &[u8],
) -> Option<(u8, u8, u32, Vec<u8>)> {
    loop {
        let mut head = [0u8; 9];
        if stream.read_exact(&mut head).is_err() {
            return None;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let sid = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if stream.read_exact(&mut payload).is_err() {
            return None;
        }
        if kinds.contains(&head[3]) {
            return Some((head[3], head[4], sid, payload));
        }
    }
}

/// A served mesh connection that has sent the HTTP/2 preface and empty SETTINGS.
fn h2_connection(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> StreamOwned<ClientConnection, TcpStream> {
    let mut stream = handshake(addr, config, no_sni(addr)).unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    stream
}

fn goaway_code(payload: &[u8]) -> u32 {
    u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]])
}

#[test]
fn invalid_http2_on_the_tunnel_gets_goaway_or_rst_stream() {
    let (fixture, proxy, bystander) = start_gateway(83);
    let addr = proxy.listen;
    let (good, _) = probe_config(&[&rustls::version::TLS13], Some(&fixture.workload())).unwrap();
    let baseline = proxy.fds();

    // DATA on stream 0 is a connection error: GOAWAY(PROTOCOL_ERROR), then close.
    let mut conn = h2_connection(addr, good.clone());
    conn.write_all(&frame(DATA, 0, 0, b"oops")).unwrap();
    let (_, _, _, payload) = read_until(&mut conn, &[GOAWAY]).expect("a GOAWAY");
    assert_eq!(goaway_code(&payload), PROTOCOL_ERROR);
    assert!(read_until(&mut conn, &[]).is_none(), "closed after GOAWAY");
    drop(conn);

    // A frame longer than the peer's SETTINGS_MAX_FRAME_SIZE: a connection error too.
    let mut conn = h2_connection(addr, good.clone());
    conn.write_all(&frame(DATA, 0, 1, &vec![0u8; 20_000]))
        .unwrap();
    let (_, _, _, payload) = read_until(&mut conn, &[GOAWAY]).expect("a GOAWAY");
    assert_ne!(goaway_code(&payload), 0, "an error code");
    drop(conn);

    // A header list over --h2-max-header-list-size (4096): the stream is refused
    // (431 and a reset), the connection lives on for the next stream.
    let mut conn = h2_connection(addr, good.clone());
    let big = "x".repeat(6000);
    let block = connect_block(&[("x-padding", &big)]);
    conn.write_all(&frame(HEADERS, END_HEADERS, 1, &block))
        .unwrap();
    let (kind, flags, sid, _) =
        read_until(&mut conn, &[HEADERS, RST_STREAM, GOAWAY]).expect("an answer to stream 1");
    assert_eq!(sid, 1);
    assert!(
        kind == RST_STREAM || (kind == HEADERS && flags & END_STREAM != 0),
        "stream 1 answered with frame type {kind}"
    );
    // The same connection still opens a stream of normal size (past the reset
    // that may still follow on stream 1).
    conn.write_all(&frame(HEADERS, END_HEADERS, 3, &connect_block(&[])))
        .unwrap();
    let (kind, sid, block) = loop {
        let (kind, _, sid, block) =
            read_until(&mut conn, &[HEADERS, RST_STREAM, GOAWAY]).expect("an answer to stream 3");
        if sid != 1 {
            break (kind, sid, block);
        }
    };
    assert_eq!((kind, sid), (HEADERS, 3));
    assert_eq!(
        block.first(),
        Some(&0x88),
        "`:status 200`, HPACK static index 8"
    );
    drop(conn);

    // Rapid reset: streams opened and reset at once, far past
    // --h2-max-pending-accept-reset-streams, end the connection with ENHANCE_YOUR_CALM.
    let mut conn = h2_connection(addr, good.clone());
    let mut burst = Vec::new();
    for i in 0..200u32 {
        let sid = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS, sid, &connect_block(&[])));
        burst.extend(frame(RST_STREAM, 0, sid, &8u32.to_be_bytes()));
    }
    let _ = conn.write_all(&burst);
    match read_until(&mut conn, &[GOAWAY]) {
        Some((_, _, _, payload)) => assert_eq!(goaway_code(&payload), ENHANCE_YOUR_CALM),
        None => panic!("no GOAWAY after a rapid reset burst"),
    }
    drop(conn);

    bystander.served();
    proxy.fds_return_to(baseline);
}

fn start_standalone(net: u8) -> (Fixture, Proxy) {
    let limits = [
        "--http1-max-headers",
        "50",
        "--http1-max-head-bytes",
        "16384",
    ];
    start(
        "standalone",
        net,
        &[&["--header-read-timeout", SHORT_TIMEOUT][..], &limits].concat(),
    )
}

/// An HTTP/1.1 origin that answers `200 ok` to each request, keeping connections.
fn origin() -> SocketAddr {
    serve_each(|mut stream| {
        stream.set_read_timeout(Some(STEP)).unwrap();
        while read_head(&mut stream).is_some() {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        }
    })
}

/// The status line of what `request` gets, and that the proxy closed afterwards.
fn status_and_close(proxy: SocketAddr, request: &[u8]) -> String {
    let response = exchange(proxy, request);
    response.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn malformed_and_oversize_http1_heads_get_400_or_431_on_the_explicit_proxy() {
    let (_fixture, proxy) = start_standalone(84);
    let addr = proxy.listen;
    let origin = origin();
    let baseline = proxy.fds();
    let good =
        format!("GET http://{origin}/ HTTP/1.1\r\nhost: {origin}\r\nconnection: close\r\n\r\n");
    assert!(status_and_close(addr, good.as_bytes()).starts_with("HTTP/1.1 200"));

    let line = |rest: &str| format!("GET http://{origin}/ HTTP/1.1\r\n{rest}\r\n");
    let malformed = [
        ("a bare CR", line("host: x\rfoo: bar\r\n")),
        ("a NUL in a value", line("host: x\r\nx-a: b\0c\r\n")),
        ("obs-fold", line("host: x\r\nx-a: b\r\n  folded\r\n")),
        ("a space before the colon", line("host : x\r\n")),
        (
            "a bad version",
            format!("GET http://{origin}/ HTTP/9.7\r\nhost: x\r\n\r\n"),
        ),
        (
            "a bad method",
            format!("G(T http://{origin}/ HTTP/1.1\r\nhost: x\r\n\r\n"),
        ),
    ];
    let (huge, many) = ("h".repeat(20_000), "x-h: 1\r\n");
    let oversize = [
        (
            "a huge URI",
            format!("GET http://{origin}/{huge} HTTP/1.1\r\nhost: x\r\n\r\n"),
        ),
        (
            "one huge header",
            line(&format!("host: x\r\nx-big: {huge}\r\n")),
        ),
        (
            "thousands of small headers",
            line(&format!("host: x\r\n{}", many.repeat(2000))),
        ),
        (
            "more headers than --http1-max-headers",
            line(&format!("host: x\r\n{}", many.repeat(60))),
        ),
    ];
    for (status, cases) in [("400", &malformed[..]), ("431", &oversize[..])] {
        for (what, request) in cases {
            let got = status_and_close(addr, request.as_bytes());
            assert!(
                got.starts_with(&format!("HTTP/1.1 {status}")),
                "{what}: expected {status}, got {got:?}"
            );
        }
    }
    assert!(status_and_close(addr, good.as_bytes()).starts_with("HTTP/1.1 200"));
    proxy.fds_return_to(baseline);
}

#[test]
fn slowloris_is_cut_by_the_header_timeout_and_idle_keep_alive_is_not() {
    let (_fixture, proxy) = start_standalone(85);
    let addr = proxy.listen;
    let origin = origin();
    let baseline = proxy.fds();
    let request = format!("GET http://{origin}/ HTTP/1.1\r\nhost: {origin}\r\n\r\n");

    // A keep-alive connection idle for longer than the header timeout between two
    // requests is not cut: idleness is the idle timeout's business.
    let mut keep = TcpStream::connect_timeout(&addr, STEP).unwrap();
    keep.set_read_timeout(Some(STEP)).unwrap();
    keep.write_all(request.as_bytes()).unwrap();
    let answer = read_response(&mut keep, STEP);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Slowloris: one header byte every 500 ms, never finishing the head.
    let mut slow = TcpStream::connect_timeout(&addr, STEP).unwrap();
    slow.set_nodelay(true).unwrap();
    let started = Instant::now();
    let trickle = format!("GET http://{origin}/ HTTP/1.1\r\nhost: {origin}\r\nx-slow: ");
    let mut cut = false;
    for byte in trickle.bytes().chain(std::iter::repeat(b'a')) {
        if slow.write_all(&[byte]).is_err() {
            cut = true;
            break;
        }
        // A bystander is served all along.
        assert!(
            status_and_close(
                addr,
                format!(
                    "GET http://{origin}/ HTTP/1.1\r\nhost: {origin}\r\nconnection: close\r\n\r\n"
                )
                .as_bytes()
            )
            .starts_with("HTTP/1.1 200")
        );
        if started.elapsed() > 3 * STEP {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut probe = [0u8; 1];
        slow.set_nonblocking(true).unwrap();
        let gone = matches!(slow.read(&mut probe), Ok(0));
        slow.set_nonblocking(false).unwrap();
        if gone {
            cut = true;
            break;
        }
    }
    assert!(cut, "a trickled head was not cut within {:?}", 3 * STEP);

    // The idle keep-alive connection (idle since before the slowloris started, well
    // past the header timeout) still serves its next request.
    keep.write_all(request.as_bytes()).unwrap();
    let again = read_response(&mut keep, STEP);
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    drop((keep, slow));

    proxy.fds_return_to(baseline);
    let metrics = proxy.metrics();
    assert!(metrics.contains("header_timeout"), "{metrics}");
}
