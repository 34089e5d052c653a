//! What the suites that run the standalone `isthmus-proxy` on loopback share: its
//! command line (on the test-support process fixture), free ports, a minted
//! identity, a thread-per-connection server (an echo server on it), reading an
//! HTTP/1 head, a CONNECT tunnel, a round trip on any stream and writing a
//! directory of manifests.
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
