//! Cost of the mesh's mutual TLS 1.3 handshake, against two baselines measured in the
//! same run: a server-authenticated-only TLS 1.3 handshake with the same certificate,
//! provider and verifier (what client authentication and the SPIFFE checks add), and a
//! TCP connect + accept on loopback (what any new connection costs anyway).
//!
//! The TLS handshakes run in memory, pumping records between a client and a server
//! connection on one thread: this measures CPU per handshake (both sides), which is
//! what bounds a gateway's rate of new links, without scheduler or socket noise.
//! Throughput is in handshakes per second ("elements").

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use isthmus_benches::store;
use isthmus_vocab::{SpiffeId, TrustDomain};
use proxy_identity::mint::{self, KeyAlgorithm, Validity};
use proxy_identity::rustls::pki_types::ServerName;
use proxy_identity::rustls::{
    self, ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection,
};
use proxy_identity::{PeerPolicy, client_config, crypto_provider, server_config};

/// Moves records both ways until both sides finish the handshake.
fn complete(client: &mut ClientConnection, server: &mut ServerConnection, buf: &mut Vec<u8>) {
    while client.is_handshaking() || server.is_handshaking() {
        deliver(client, server, buf, "server accepts the handshake");
        deliver(server, client, buf, "client accepts the handshake");
    }
}

/// Hands everything `from` has to send to `to`, which must accept it (`what`).
fn deliver<A, B>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
    buf: &mut Vec<u8>,
    what: &str,
) {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).expect("write to a Vec");
    }
    let mut records = &buf[..];
    while !records.is_empty() {
        to.read_tls(&mut records).expect("read from a slice");
        to.process_new_packets().expect(what);
    }
}

fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>, buf: &mut Vec<u8>) {
    let name = ServerName::try_from("gateway.cluster-a").expect("a valid DNS name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client connection");
    let mut s = ServerConnection::new(server.clone()).expect("server connection");
    complete(&mut c, &mut s, buf);
    assert!(c.peer_certificates().is_some());
}

fn bench(c: &mut Criterion) {
    let anchor = mint::trust_anchor(
        &mint::default_anchor_name(),
        Validity::from_now(mint::DEFAULT_ANCHOR_LIFETIME),
        KeyAlgorithm::default(),
    )
    .expect("mint an anchor");
    let issuer_for = |cluster| {
        mint::issuer(
            &anchor,
            cluster,
            Validity::from_now(mint::DEFAULT_ISSUER_LIFETIME),
            KeyAlgorithm::default(),
        )
        .expect("mint an issuer")
    };
    let (issuer_a, issuer_b) = (issuer_for("cluster-a"), issuer_for("cluster-b"));
    let gateway_id = "spiffe://cluster.local/ns/isthmus/sa/gateway";
    let gateway = store(&issuer_a, gateway_id);
    let sidecar = store(&issuer_b, "spiffe://cluster.local/ns/default/sa/frontend");
    let td = TrustDomain::parse("cluster.local").expect("a valid trust domain");

    let mtls_server = server_config(gateway.clone(), PeerPolicy::TrustDomain(td));
    let mtls_client = client_config(
        sidecar.clone(),
        PeerPolicy::Exact(SpiffeId::parse(gateway_id).expect("valid")),
    );

    // Baseline: the same server certificate and client-side verifier, no client auth.
    let plain_server = {
        let key = gateway.current().certified_key().clone();
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FixedCert(key)));
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.send_tls13_tickets = 0;
        Arc::new(config)
    };
    let plain_client = {
        // Our client config minus its certificate: same verifier, no client auth.
        let mut config = (*mtls_client).clone();
        config.client_auth_cert_resolver = Arc::new(NoClientCert);
        Arc::new(config)
    };

    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(16 * 1024);
    group.bench_function("mtls_spiffe", |b| {
        b.iter(|| handshake(&mtls_client, &mtls_server, &mut buf))
    });
    group.bench_function("tls13_server_auth_only", |b| {
        b.iter(|| handshake(&plain_client, &plain_server, &mut buf))
    });

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    group.bench_function("tcp_connect_loopback", |b| {
        b.iter(|| {
            let mut client = TcpStream::connect(addr).expect("connect loopback");
            let (mut server, _) = listener.accept().expect("accept loopback");
            // One byte each way, as a handshake's first flight would need.
            client.write_all(b"x").expect("write");
            let mut byte = [0u8; 1];
            server.read_exact(&mut byte).expect("read");
        })
    });
    group.finish();
}

#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Debug)]
struct NoClientCert;

impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
    fn has_certs(&self) -> bool {
        false
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
