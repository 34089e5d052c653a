//! The WAN delay relay (`isthmus lab relay`): a TCP forwarder that holds every
//! chunk for a fixed time before passing it on, both ways, so the link between
//! two gateways costs what a link between regions would. The kernel's netem is
//! not available everywhere, which is why this lives in userspace.
//!
//! Each direction is a timestamped queue: a chunk read at `t` is written at
//! `t + delay`, while later chunks keep being read, so the delay adds latency but
//! does not divide throughput. Half-closes are passed on after the queued data.
//! Not a general proxy: no TLS, no protocol awareness, one upstream.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Chunk size read at once; a TLS record's worth.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction before reading pauses (about 4 MiB).
const QUEUE: usize = 256;
/// How long connecting upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts on `listen` and relays each connection to `to` with `delay` each way,
/// until killed.
pub async fn serve(listen: SocketAddr, to: SocketAddr, delay: Duration) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("relay: {listen} -> {to}, {} ms each way", delay.as_millis());
    loop {
        let (down, peer) = listener.accept().await.context("accepting")?;
        tokio::spawn(async move {
            if let Err(e) = relay(down, to, delay).await {
                eprintln!("relay: {peer} -> {to}: {e:#}");
            }
        });
    }
}

/// Relays one connection.
pub async fn relay(down: TcpStream, to: SocketAddr, delay: Duration) -> Result<()> {
    let up = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .with_context(|| format!("connecting to {to}: timed out"))?
        .with_context(|| format!("connecting to {to}"))?;
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (down_r, down_w) = down.into_split();
    let (up_r, up_w) = up.into_split();
    let a = tokio::spawn(one_way(down_r, up_w, delay));
    let b = tokio::spawn(one_way(up_r, down_w, delay));
    let (a, b) = (a.await, b.await);
    a.context("relay task")??;
    b.context("relay task")??;
    Ok(())
}

async fn one_way<R, W>(mut from: R, mut to: W, delay: Duration) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if to.write_all(&chunk).await.is_err() {
            reader.abort();
            return Ok(());
        }
    }
    // The reader ended (EOF or error) and every chunk is out: pass the half-close on.
    let _ = to.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounds every await of the test at once.
    #[tokio::test]
    async fn bytes_arrive_intact_and_late_both_ways() {
        tokio::time::timeout(
            Duration::from_secs(20),
            bytes_arrive_intact_and_late_both_ways_inner(),
        )
        .await
        .expect("the test finishes within 20 s");
    }

    async fn bytes_arrive_intact_and_late_both_ways_inner() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = upstream.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut data = Vec::new();
            s.read_to_end(&mut data).await.unwrap();
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = front.local_addr().unwrap();
        let delay = Duration::from_millis(50);
        let relayed = tokio::spawn(async move {
            let (down, _) = front.accept().await.unwrap();
            relay(down, to, delay).await.unwrap();
        });
        let mut c = TcpStream::connect(listen).await.unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let start = Instant::now();
        c.write_all(&payload).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        // A lower bound only: each way holds data at least `delay`.
        assert!(start.elapsed() >= delay * 2);
        assert_eq!(back, payload);
        tokio::time::timeout(Duration::from_secs(5), echo)
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), relayed)
            .await
            .unwrap()
            .unwrap();
    }
}
