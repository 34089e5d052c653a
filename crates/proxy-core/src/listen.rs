//! Accept loops: bounded concurrency, prompt refusal past the bound, and a graceful
//! drain on shutdown. What happens to one connection is a [`Handler`]'s business.
//!
//! Lifecycle: the process holds one `CancellationToken`, each role, listener and pool
//! a child of it, and each connection a child of its listener's, so cancelling a
//! node drains everything below it and nothing else. Tasks are counted by
//! `TaskTracker`s, never by hand.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::addr::ClientAddr;
use crate::metrics::{Direction, ProxyMetrics};
use crate::outcome::{Outcome, Rejection};

/// One accepted connection.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub client: ClientAddr,
    /// The listener's address as this socket sees it (not the original destination).
    pub local: SocketAddr,
}

/// Handles one connection to its end. `drain` is cancelled when the proxy shuts
/// down: protocols that can (HTTP) finish in-flight work and close; byte streams may
/// run on until the grace period ends.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        conn: Accepted,
        drain: CancellationToken,
    ) -> impl Future<Output = ()> + Send;
}

#[derive(Clone, Debug)]
pub struct ListenConfig {
    /// Connections served at once; past it new ones are reset at once.
    pub max_connections: usize,
    /// How long open connections may run on after shutdown before they are cut.
    pub grace: Duration,
}

/// Pause after an accept error such as EMFILE, so a full descriptor table does not
/// turn the loop into a busy spin while connections close.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// Accepts until `shutdown` is cancelled, then drains: returns when every
/// connection has ended or the grace period has cut the rest.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    cfg: ListenConfig,
    metrics: ProxyMetrics,
    direction: Direction,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let tasks = TaskTracker::new();
    // Cancelled once the grace period is over: a connection still open is dropped
    // where it stands (its sockets closed, its guards counted).
    let cut = CancellationToken::new();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        metrics.refused(direction, Outcome::rejected(Rejection::MaxConnections));
                        debug!(%client, ?direction, "connection limit reached, resetting");
                        reset(stream);
                        continue;
                    };
                    // The proxy must not add Nagle's delay to small writes (HTTP/2
                    // frames, request heads); the peer's own socket keeps its choice.
                    let _ = stream.set_nodelay(true);
                    let local = match stream.local_addr() {
                        Ok(local) => local,
                        Err(_) => continue,
                    };
                    let conn = Accepted { stream, client: ClientAddr(client), local };
                    let handler = handler.clone();
                    let drain = shutdown.child_token();
                    let cut = cut.clone();
                    tasks.spawn(async move {
                        cut.run_until_cancelled(handler.handle(conn, drain)).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!(?direction, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    tasks.close();
    if tasks.is_empty() {
        return;
    }
    info!(?direction, open = tasks.len(), grace = ?cfg.grace, "draining connections");
    if tokio::time::timeout(cfg.grace, tasks.wait()).await.is_err() {
        warn!(
            ?direction,
            cut = tasks.len(),
            "grace period over, closing remaining connections"
        );
        cut.cancel();
        tasks.wait().await;
    }
}

/// Tasks a connection spawned for streams that outlive its HTTP exchange (an
/// upgraded WebSocket, a CONNECT tunnel), tied to the connection's own task: joined
/// before the connection counts as finished, so drains wait for them and metrics
/// stay true, and cut if the connection's task is cut (grace period over) or drops
/// them.
#[derive(Debug, Default)]
pub struct ConnectionTasks {
    tasks: TaskTracker,
    cut: CancellationToken,
}

impl ConnectionTasks {
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let cut = self.cut.clone();
        self.tasks.spawn(async move {
            cut.run_until_cancelled(task).await;
        });
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Cuts every task (a connection past its grace).
    pub fn abort(&self) {
        self.cut.cancel();
    }

    /// Waits for every task spawned so far, and for any they spawn meanwhile.
    pub async fn join(&self) {
        // If this future is dropped mid-wait, the tasks must not run on alone.
        let cut_on_drop = self.cut.clone().drop_guard();
        self.tasks.close();
        self.tasks.wait().await;
        cut_on_drop.disarm();
    }
}

impl Drop for ConnectionTasks {
    fn drop(&mut self) {
        self.cut.cancel();
    }
}

/// Closes a socket with RST instead of FIN: the peer learns at once that nothing will
/// be served, and a half-done stream is never mistaken for a complete one.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connection_tasks_stay_bounded_and_are_joined() {
        let tasks = ConnectionTasks::default();
        for _ in 0..10_000 {
            tasks.spawn(async {});
            tokio::task::yield_now().await;
        }
        // Finished tasks are forgotten as they end: what is kept is bounded by
        // the live ones, not by how many a long-lived connection ever spawned.
        assert!(tasks.len() <= 128, "{} tasks kept", tasks.len());

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _ = rx.await;
        });
        let join = tasks.join();
        tokio::pin!(join);
        assert!(futures_util::FutureExt::now_or_never(join.as_mut()).is_none());
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), join)
            .await
            .unwrap();
        assert!(tasks.is_empty());
    }

    #[tokio::test]
    async fn dropping_the_connection_aborts_its_tasks() {
        let tasks = ConnectionTasks::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(tasks);
        // The aborted task drops its sender, which the receiver sees.
        assert!(
            tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .unwrap()
                .is_err()
        );
    }
}
