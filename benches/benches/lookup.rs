//! Route lookups on an index of 1,000 Services (900 local, 100 mirrored), against a
//! baseline measured in the same run: a plain `HashMap` get with the same keys.
//! Report the ratio of the two, not the absolute times.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
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

/// Benchmarks `lookup` over `keys`, one key after the other ([`cycle`]).
fn bench_cycle<T, R>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    keys: &[T],
    lookup: impl Fn(&T) -> R,
) {
    let mut next = cycle(keys);
    g.bench_function(name, |b| b.iter(|| black_box(lookup(black_box(next())))));
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
    bench_cycle(&mut g, "baseline_hashmap_addr", &addrs, |a| {
        base_addr.get(a)
    });
    bench_cycle(&mut g, "addr_hit", &addrs, |a| snap.lookup_addr(a));
    bench_cycle(&mut g, "addr_miss", &miss_addrs, |a| snap.lookup_addr(a));
    bench_cycle(&mut g, "addr_hit_via_discovery_load", &addrs, |a| {
        discovery.load().lookup_addr(a).is_some()
    });
    bench_cycle(&mut g, "baseline_hashmap_authority", &authorities, |a| {
        base_auth.get(a.as_str())
    });
    bench_cycle(&mut g, "authority_hit", &authorities, |a| {
        snap.lookup_authority(a)
    });
    bench_cycle(&mut g, "authority_hit_uppercase", &upper, |a| {
        snap.lookup_authority(a)
    });
    bench_cycle(&mut g, "authority_miss", &miss_authorities, |a| {
        snap.lookup_authority(a)
    });
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
