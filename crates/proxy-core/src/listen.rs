//! Accept loops: bounded concurrency, prompt refusal past the bound, and a graceful
//! drain on shutdown. What happens to one connection is a [`Handler`]'s business.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
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

/// Handles one connection to its end. `drain` turns true when the proxy shuts down:
/// protocols that can (HTTP) finish in-flight work and close; byte streams may run
/// on until the grace period ends.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        conn: Accepted,
        drain: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send;
}

#[derive(Clone, Debug)]
pub struct ListenConfig {
    /// Connections served at once; past it new ones are reset at once.
    pub max_connections: usize,
    /// How long open connections may run on after shutdown before they are cut.
    pub grace: Duration,
}

/// Resolves once `drain` turns true. A dropped sender means nobody can ask for a
/// drain any more, so it then never resolves (rather than draining by accident).
pub async fn drained(drain: &mut watch::Receiver<bool>) {
    if drain.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Pause after an accept error such as EMFILE, so a full descriptor table does not
/// turn the loop into a busy spin while connections close.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// Accepts until `shutdown` turns true, then drains: returns when every connection
/// has ended or the grace period has cut the rest.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    cfg: ListenConfig,
    metrics: ProxyMetrics,
    direction: Direction,
    shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let mut tasks = JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            biased;
            _ = drained(&mut stop) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
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
                    let drain = shutdown.clone();
                    tasks.spawn(async move {
                        handler.handle(conn, drain).await;
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
    if tasks.is_empty() {
        return;
    }
    info!(?direction, open = tasks.len(), grace = ?cfg.grace, "draining connections");
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(cfg.grace, drained).await.is_err() {
        warn!(
            ?direction,
            cut = tasks.len(),
            "grace period over, closing remaining connections"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Tasks a connection spawned for streams that outlive its HTTP exchange (an
/// upgraded WebSocket, a CONNECT tunnel), tied to the connection's own task: joined
/// before the connection counts as finished, so drains wait for them and metrics
/// stay true, and aborted if the connection's task is cut (grace period over).
///
/// A tunnel connection lives long and carries many streams, so finished tasks are
/// pruned whenever the list has doubled since the last pruning: amortised O(1) per
/// stream, and memory bounded by twice the streams alive.
#[derive(Debug, Default)]
pub struct ConnectionTasks(std::sync::Mutex<TaskList>);

#[derive(Debug, Default)]
pub struct TaskList {
    handles: Vec<tokio::task::JoinHandle<()>>,
    prune_at: usize,
}

/// Below this many tasks pruning is not worth its scan.
const MIN_PRUNE: usize = 64;

impl ConnectionTasks {
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let mut list = self.list();
        if list.handles.len() >= list.prune_at.max(MIN_PRUNE) {
            list.handles.retain(|h| !h.is_finished());
            list.prune_at = list.handles.len() * 2;
        }
        list.handles.push(handle);
    }

    /// Tasks tracked, finished ones not yet pruned included.
    pub fn len(&self) -> usize {
        self.list().handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cuts every task spawned so far (a connection past its grace).
    pub fn abort(&self) {
        for handle in self.list().handles.drain(..) {
            handle.abort();
        }
    }

    /// Waits for every task spawned so far, and for any they spawn meanwhile.
    pub async fn join(&self) {
        loop {
            let Some(handle) = self.list().handles.pop() else {
                return;
            };
            // If this future is dropped mid-wait, the task must not run on alone.
            let _abort = AbortOnDrop(handle.abort_handle());
            let _ = handle.await;
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, TaskList> {
        // A push, pop or prune cannot be torn by a panic.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ConnectionTasks {
    fn drop(&mut self) {
        for handle in self.list().handles.drain(..) {
            handle.abort();
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
        // Finished tasks are pruned as new ones come: never more than twice the
        // live ones plus the pruning floor.
        assert!(tasks.len() <= 2 * MIN_PRUNE, "{} tasks kept", tasks.len());

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
