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
                        metrics.refused(direction, "max_connections");
                        debug!(%client, ?direction, "connection limit reached, resetting");
                        reset(stream);
                        continue;
                    };
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

/// Closes a socket with RST instead of FIN: the peer learns at once that nothing will
/// be served, and a half-done stream is never mistaken for a complete one.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
