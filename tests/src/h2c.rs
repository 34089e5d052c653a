//! Async code on the plain threads of the end-to-end tests: HTTP/2 origins and
//! clients each run on a current-thread runtime of their own, so a test can start
//! them from inside a namespace ([`crate::netns::Namespace::run`]) and bound them.

use std::future::Future;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;

/// Runs `f` to completion on a current-thread runtime of this thread; fails the test
/// naming `what` when it takes longer than `limit`.
///
/// # Panics
///
/// When the runtime cannot be built or `limit` passes.
pub fn block_on<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    current_thread()
        .block_on(async { tokio::time::timeout(limit, f).await })
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

/// Runs `serve` on a thread of its own with `listener` (made in the right
/// namespace) as a tokio listener, for at most `limit`; the handle joins to what it
/// returned, or `None` when `limit` ended it.
pub fn spawn_server<T, Fut>(
    listener: std::net::TcpListener,
    limit: Duration,
    serve: impl FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
) -> JoinHandle<Option<T>>
where
    T: Send + 'static,
    Fut: Future<Output = T>,
{
    std::thread::spawn(move || {
        let runtime = current_thread();
        runtime.block_on(async move {
            listener
                .set_nonblocking(true)
                .expect("a nonblocking listener");
            let listener =
                tokio::net::TcpListener::from_std(listener).expect("a listener for tokio");
            tokio::time::timeout(limit, serve(listener)).await.ok()
        })
    })
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// An h2c connection to `addr`, its driver spawned on the current runtime.
///
/// # Panics
///
/// When the connection or the HTTP/2 handshake fails.
pub async fn connect(addr: SocketAddr) -> (SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let socket = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let (client, conn) = h2::client::handshake(socket)
        .await
        .unwrap_or_else(|e| panic!("the h2 handshake with {addr}: {e}"));
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, driver)
}

/// Reads `body` to its end, giving back flow-control capacity as it goes (or the
/// peer stops sending once the window is used up).
///
/// # Errors
///
/// When the stream is reset or its connection fails.
pub async fn read_body(mut body: h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}
