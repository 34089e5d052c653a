//! Throughput of the forwarder on loopback: one long-lived connection through an
//! in-process `forward_tcp` with the copy loop, the same with `splice(2)`, and a
//! direct client-to-server connection (no forwarder) as the baseline, all measured in
//! the same run.
//!
//! Each iteration sends 4 MiB from the client to a sink that acknowledges every 4 MiB
//! with one byte, so an iteration ends only once every byte crossed the forwarder.
//! After criterion's own report, a summary prints each variant's throughput as a
//! ratio to the direct baseline; quote the ratios, not the absolute figures, which
//! depend on the machine.

use std::net::SocketAddr;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use isthmus_benches::{Tally, runtime};
use proxy_core::forward::{ByteCounters, ForwardConfig, forward_tcp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes per iteration: large enough that per-iteration round trips (the ack) are a
/// small share of the time, small enough for many samples per second.
const CHUNK: usize = 4 * 1024 * 1024;

/// Total bytes and time per variant, for the ratio summary.
static TALLY: Tally = Tally::new();

/// A server that reads and discards, answering one byte per `CHUNK` received.
async fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the sink");
    let addr = listener.local_addr().expect("the sink's address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut pending = 0;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending += n,
                    }
                    while pending >= CHUNK {
                        pending -= CHUNK;
                        if s.write_all(b"k").await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A listener forwarding every connection to `upstream` with `forward_tcp`.
async fn forwarder(upstream: SocketAddr, cfg: ForwardConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the forwarder");
    let addr = listener.local_addr().expect("the forwarder's address");
    tokio::spawn(async move {
        let counters = ByteCounters::default();
        while let Ok((down, _)) = listener.accept().await {
            let (cfg, counters) = (cfg.clone(), counters.clone());
            tokio::spawn(async move {
                let up = TcpStream::connect(upstream)
                    .await
                    .expect("connect the sink");
                let _ = forward_tcp(down, up, b"", &cfg, &counters).await;
            });
        }
    });
    addr
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let sink_addr = rt.block_on(sink());
    let copy = ForwardConfig {
        splice: false,
        ..ForwardConfig::default()
    };
    let splice = ForwardConfig {
        splice: true,
        ..ForwardConfig::default()
    };
    let variants = [
        ("direct_loopback", sink_addr),
        ("forward_copy", rt.block_on(forwarder(sink_addr, copy))),
        ("forward_splice", rt.block_on(forwarder(sink_addr, splice))),
    ];
    let payload = vec![0x5au8; CHUNK];

    let mut group = c.benchmark_group("forward");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    for (name, addr) in variants {
        let mut client = rt.block_on(TcpStream::connect(addr)).expect("connect");
        client.set_nodelay(true).expect("TCP_NODELAY");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let elapsed = rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        send_chunk(&mut client, &payload).await;
                    }
                    start.elapsed()
                });
                TALLY.add(name, iters * CHUNK as u64, elapsed);
                elapsed
            })
        });
    }
    group.finish();
    summary();
}

async fn send_chunk(client: &mut TcpStream, payload: &[u8]) {
    client.write_all(payload).await.expect("send to the sink");
    let mut ack = [0u8; 1];
    client.read_exact(&mut ack).await.expect("the sink's ack");
}

/// Prints each variant's mean throughput over warm-up and measurement, and its ratio
/// to the direct baseline.
fn summary() {
    TALLY.summary(
        "forward throughput relative to direct loopback (same run):",
        "direct_loopback",
        |bytes, time| Some(bytes as f64 / time.as_secs_f64().max(f64::MIN_POSITIVE)),
        |name, rate, ratio| {
            format!(
                "{name:<16} {:>8.0} MiB/s  ratio {ratio:.2}",
                rate / (1024.0 * 1024.0)
            )
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
