//! Route lookups on an index of 1,000 Services (900 local, 100 mirrored), against a
//! baseline measured in the same run: a plain `HashMap` get with the same keys.
//! Report the ratio of the two, not the absolute times.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{Criterion, criterion_group, criterion_main};
use isthmus_vocab::ClusterName;
use proxy_discovery::model::{ClusterView, parse_manifests};
use proxy_discovery::{Discovery, Snapshot};

const LOCAL: usize = 900;
const MIRRORED: usize = 100;

fn local_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        198,
        18,
        1 + (i / 250) as u8,
        1 + (i % 250) as u8,
    ))
}

fn snapshot() -> Snapshot {
    let mut local = String::from(
        "apiVersion: multicluster.isthmus.io/v1alpha1\nkind: ClusterSettings\nmetadata: {name: b}\nspec: {clusterName: cluster-b, serviceCIDR: 198.19.0.0/16}\n---\napiVersion: multicluster.isthmus.io/v1alpha1\nkind: Link\nmetadata: {name: a}\nspec: {targetClusterName: cluster-a, gatewayAddress: 198.18.0.1, gatewayIdentity: spiffe://a.local/ns/isthmus/sa/gateway}\n",
    );
    for i in 0..LOCAL {
        local.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: ns{}}}\nspec: {{clusterIP: {}, ports: [{{port: 80}}]}}\n",
            i % 10,
            local_ip(i)
        ));
    }
    let mut remote = String::from(
        "apiVersion: multicluster.isthmus.io/v1alpha1\nkind: ClusterSettings\nmetadata: {name: a}\nspec: {clusterName: cluster-a, exportedNamespaces: [default]}\n",
    );
    for i in 0..MIRRORED {
        remote.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: remote{i}}}\nspec: {{ports: [{{port: 80}}]}}\n"
        ));
        local.push_str(&format!(
            "---\napiVersion: linkerd.io/v1alpha1\nkind: ServiceMirror\nmetadata: {{name: m{i}}}\nspec: {{cluster: cluster-a, service: {{name: remote{i}}}}}\n"
        ));
    }
    let a = ClusterName::parse("cluster-a").unwrap();
    let b = ClusterName::parse("cluster-b").unwrap();
    let local = ClusterView::build(b, parse_manifests("local.yaml", &local).unwrap()).unwrap();
    let remote =
        ClusterView::build(a.clone(), parse_manifests("remote.yaml", &remote).unwrap()).unwrap();
    let snap = Snapshot::build(local, BTreeMap::from([(a, remote)]));
    assert_eq!(snap.local().services.len(), LOCAL + MIRRORED);
    assert_eq!(snap.mirrored_services().count(), MIRRORED);
    snap
}

/// Cycles through `keys` so lookups do not hit one cache line only.
fn cycle<'a, T>(keys: &'a [T]) -> impl FnMut() -> &'a T {
    let mut i = 0;
    move || {
        i = (i + 1) % keys.len();
        &keys[i]
    }
}

fn lookups(c: &mut Criterion) {
    let snap = snapshot();
    let addrs: Vec<SocketAddr> = snap.index().addrs().keys().copied().collect();
    let authorities: Vec<String> = snap
        .index()
        .authorities()
        .keys()
        .filter(|a| a.contains(".svc.cluster.local:"))
        .map(|a| a.to_string())
        .collect();
    assert_eq!(addrs.len(), LOCAL + MIRRORED);
    assert_eq!(authorities.len(), LOCAL + MIRRORED);
    let upper: Vec<String> = authorities.iter().map(|a| a.to_ascii_uppercase()).collect();
    let miss_addrs: Vec<SocketAddr> = addrs.iter().map(|a| SocketAddr::new(a.ip(), 81)).collect();
    let miss_authorities: Vec<String> = authorities
        .iter()
        .map(|a| a.replace(":80", ":81"))
        .collect();

    let base_addr: HashMap<SocketAddr, u32> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (*a, i as u32))
        .collect();
    let base_auth: HashMap<String, u32> = authorities
        .iter()
        .enumerate()
        .map(|(i, a)| (a.clone(), i as u32))
        .collect();
    let discovery = Discovery::new(snap.clone());

    let mut g = c.benchmark_group("lookup");
    let mut next = cycle(&addrs);
    g.bench_function("baseline_hashmap_addr", |b| {
        b.iter(|| black_box(base_addr.get(black_box(next()))))
    });
    let mut next = cycle(&addrs);
    g.bench_function("addr_hit", |b| {
        b.iter(|| black_box(snap.lookup_addr(black_box(next()))))
    });
    let mut next = cycle(&miss_addrs);
    g.bench_function("addr_miss", |b| {
        b.iter(|| black_box(snap.lookup_addr(black_box(next()))))
    });
    let mut next = cycle(&addrs);
    g.bench_function("addr_hit_via_discovery_load", |b| {
        b.iter(|| black_box(discovery.load().lookup_addr(black_box(next())).is_some()))
    });
    let mut next = cycle(&authorities);
    g.bench_function("baseline_hashmap_authority", |b| {
        b.iter(|| black_box(base_auth.get(black_box(next().as_str()))))
    });
    let mut next = cycle(&authorities);
    g.bench_function("authority_hit", |b| {
        b.iter(|| black_box(snap.lookup_authority(black_box(next()))))
    });
    let mut next = cycle(&upper);
    g.bench_function("authority_hit_uppercase", |b| {
        b.iter(|| black_box(snap.lookup_authority(black_box(next()))))
    });
    let mut next = cycle(&miss_authorities);
    g.bench_function("authority_miss", |b| {
        b.iter(|| black_box(snap.lookup_authority(black_box(next()))))
    });
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
