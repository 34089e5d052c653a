//! What the suites that run the standalone `isthmus-proxy` on loopback share: its
//! command line (on the test-support process fixture), free ports, a minted
//! identity, a thread-per-connection server (an echo server on it), reading an
//! HTTP/1 head, a CONNECT tunnel, a round trip on any stream, writing a
//! directory of manifests, an echo check, and a mesh client: a warm pool to one
//! gateway.
//!
//! Deliberately not here: each suite's fixtures and readiness checks, and the
//! gateway and sidecar roles' command lines (their flags differ per suite) and origin servers whose answers a suite
//! asserts on. Each test binary uses a subset, hence `dead_code` is allowed.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use isthmus_test_support::{Pki, Proxy, STEP};

/// Starts `isthmus-proxy standalone` as cluster-b with the identity and manifests
/// directories given, its explicit proxy on `listen` and admin on `admin`, then
/// `extra` flags; its stderr goes to `log`. Does not wait for readiness: each suite
/// probes it its own way.
pub fn spawn_standalone(
    identity: &Path,
    manifests: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    extra: &[&str],
    log: &Path,
) -> Proxy {
    Proxy::command(
        env!("CARGO_BIN_EXE_isthmus-proxy"),
        "standalone",
        "cluster-b",
        identity,
        manifests,
        admin,
        log.to_owned(),
    )
    .args(["--outbound-addr", &listen.to_string()])
    .args(extra.iter().copied())
    .start()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a fresh leaf for `spiffe://cluster.local/ns/default/sa/dev`, issued for
/// cluster-b under a new trust anchor, into `dir` (valid for an hour).
pub fn mint_identity(dir: &Path) {
    Pki::new("test anchor")
        .leaf("cluster-b", "spiffe://cluster.local/ns/default/sa/dev")
        .write_dir(dir, false)
        .unwrap();
}

/// A loopback server that runs `serve` on a thread of its own for each connection;
/// it lives as long as the test binary.
pub fn serve_each(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let serve = serve.clone();
            std::thread::spawn(move || serve(stream));
        }
    });
    addr
}

/// A TCP echo server on loopback: it sends back what it reads, then ends its side.
pub fn echo() -> SocketAddr {
    serve_each(|mut stream| {
        let mut reader = stream.try_clone().unwrap();
        let _ = std::io::copy(&mut reader, &mut stream);
        let _ = stream.shutdown(Shutdown::Write);
    })
}

/// Reads an HTTP/1 head up to its blank line, byte by byte so that nothing after
/// it is consumed; `None` if the stream ends (or fails) first.
pub fn read_head(stream: &mut impl Read) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}

/// Opens a CONNECT tunnel through the proxy at `listen` to `target` and returns the
/// stream after the `200` head; fails the test on any other answer.
pub fn connect_through(listen: SocketAddr, target: SocketAddr) -> TcpStream {
    let mut tunnel = TcpStream::connect_timeout(&listen, STEP).unwrap();
    tunnel.set_read_timeout(Some(STEP)).unwrap();
    write!(
        tunnel,
        "CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut tunnel).expect("CONNECT answer cut short");
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tunnel
}

/// Sends `payload` on `stream`, half-closes, and returns all that comes back until
/// the far side closes; fails the test if that takes longer than [`STEP`].
pub async fn round_trip<S>(stream: S, payload: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    round_trip_within(stream, payload, STEP).await
}

/// [`round_trip`] with a bound of `limit`.
pub async fn round_trip_within<S>(stream: S, payload: &[u8], limit: Duration) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(stream);
    let write = async {
        wr.write_all(payload).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let read = async {
        let mut back = Vec::with_capacity(payload.len());
        rd.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::time::timeout(limit, async { tokio::join!(write, read) })
        .await
        .expect("round trip hung");
    back
}

/// Writes each `(file name, contents)` into the directory `dir`, creating it first.
pub fn write_files<T: AsRef<[u8]>>(dir: &Path, files: &[(&str, T)]) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    for (name, contents) in files {
        let path = dir.join(name);
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

/// A test client's warm pool to one gateway; its tasks stop when it is dropped.
pub struct Client {
    pub pool: proxy_core::pool::Pool,
    limit: Duration,
    _stop: tokio_util::sync::CancellationToken,
}

impl Client {
    /// A pool of `connections` to `gateway`, which must present `expect`, holding
    /// `store`'s identity; a connect or an answer may take `limit`.
    pub fn new(
        store: Arc<proxy_identity::CredentialStore>,
        gateway: SocketAddr,
        expect: isthmus_vocab::SpiffeId,
        connections: usize,
        limit: Duration,
    ) -> Client {
        let stop = tokio_util::sync::CancellationToken::new();
        let policy = proxy_identity::PeerPolicy::Exact(expect);
        let peer = isthmus_tests::peer::test_peer(
            &format!("test/{gateway}"),
            gateway,
            proxy_identity::client_config(store, policy),
            connections,
            limit,
        );
        let pool = proxy_core::pool::Pool::spawn(peer, stop.clone());
        Client {
            pool,
            limit,
            _stop: stop,
        }
    }

    /// Opens a stream to `authority` in `cluster` and waits for its answer.
    pub async fn open(
        &self,
        authority: &str,
        cluster: &str,
    ) -> Result<proxy_core::tunnel::client::TunnelStream, proxy_core::pool::PoolError> {
        let authority = isthmus_vocab::Authority::parse(authority).unwrap();
        let cluster = isthmus_vocab::ClusterName::parse(cluster).unwrap();
        tokio::time::timeout(
            self.limit,
            self.pool.open_answered(&authority, Some(&cluster)),
        )
        .await
        .unwrap_or_else(|_| panic!("opening {authority} in {cluster} hung"))
    }
}

/// Sends `bytes` on `stream` and reads as many back, which must be the same: an
/// echo that keeps the stream open.
pub async fn assert_echoed<S>(stream: &mut S, bytes: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(bytes).await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    tokio::time::timeout(STEP, stream.read_exact(&mut back))
        .await
        .expect("the echo hung")
        .unwrap();
    assert_eq!(back, bytes);
}
