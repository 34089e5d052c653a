//! Cost of protocol detection on typical first bytes: the pure classifier on an
//! HTTP/1.1 request, the HTTP/2 preface, a TLS ClientHello (decided opaque at its
//! first byte) and a request with a 4 KiB target (the scan's worst realistic case),
//! plus the whole `detect` call over an in-memory reader. A `starts_with` check of
//! the HTTP/2 preface is the baseline: the least any detector must do.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use proxy_core::detect::{DetectConfig, H2_PREFACE, Protocol, classify, detect};

fn bench(c: &mut Criterion) {
    let http1: &[u8] = b"GET /api/v1/users?id=42 HTTP/1.1\r\nHost: hello.default.svc.cluster.local\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
    let mut h2 = H2_PREFACE.to_vec();
    h2.extend_from_slice(&[0, 0, 0x12, 4, 0, 0, 0, 0, 0]);
    let tls: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
    let mut long = b"GET /".to_vec();
    long.resize(4096, b'a');
    long.extend_from_slice(b" HTTP/1.1\r\n\r\n");

    let mut g = c.benchmark_group("detect");
    g.throughput(Throughput::Elements(1));
    g.bench_function("baseline_h2_starts_with", |b| {
        b.iter(|| black_box(black_box(&h2[..]).starts_with(H2_PREFACE)))
    });
    for (name, bytes, want) in [
        ("classify_http1", http1, Protocol::Http1),
        ("classify_h2_preface", &h2[..], Protocol::Http2),
        ("classify_tls_client_hello", tls, Protocol::Opaque),
        ("classify_http1_4k_target", &long[..], Protocol::Http1),
    ] {
        assert_eq!(classify(bytes), Some(want), "{name}");
        g.bench_function(name, |b| b.iter(|| black_box(classify(black_box(bytes)))));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let cfg = DetectConfig {
        timeout: Duration::from_secs(1),
        ..DetectConfig::default()
    };
    g.bench_function("detect_http1_in_memory", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut io = black_box(http1);
                let d = detect(&mut io, &cfg)
                    .await
                    .expect("reading a slice cannot fail");
                black_box(d.protocol)
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
