//! Multi-document Kubernetes YAML manifests, as the directory source reads them
//! ([`proxy_discovery::model::parse_manifests`]), and what discovery builds from them.

use std::collections::BTreeMap;

use isthmus_vocab::ClusterName;
use proxy_discovery::index::Index;
use proxy_discovery::model::{ClusterView, Object, parse_manifests};
use proxy_discovery::snapshot::Snapshot;

/// The file name the input is presented as; every error must name it.
const FILE: &str = "fuzz.yaml";

/// Parses `data` as a manifest file, then builds the cluster view, the snapshot and
/// the route index from it, as a reload does.
///
/// Checks: a refusal names the file and the document; an accepted object renders to
/// a manifest that parses back to the same object; building on top never panics.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = match parse_manifests(FILE, text) {
        Ok(parsed) => parsed,
        Err(e) => {
            let message = e.to_string();
            assert_eq!(e.file(), FILE);
            assert!(
                message.starts_with(FILE),
                "{message:?} does not name the file"
            );
            let document = e
                .document()
                .unwrap_or_else(|| panic!("{message:?} does not name a document"));
            assert!(
                message.contains(&format!("document {document}")),
                "{message:?} does not show its document"
            );
            return;
        }
    };
    for p in &parsed {
        assert_eq!(p.origin.file, FILE);
        check_round_trip(&p.object);
    }
    let cluster = ClusterName::parse("fuzz").expect("a valid cluster name literal");
    if let Ok(view) = ClusterView::build(cluster, parsed) {
        let snapshot = Snapshot::build(view, BTreeMap::new());
        let index = Index::build(snapshot.local(), snapshot.gateway());
        for (addr, _) in index.addrs() {
            assert!(
                index.lookup_addr(&addr).is_some(),
                "{addr} listed but not found"
            );
        }
        let authorities: Vec<String> = index.authorities().keys().map(|a| a.to_string()).collect();
        for authority in authorities {
            assert!(
                index.lookup_authority(&authority).is_some(),
                "{authority} listed but not found"
            );
        }
    }
}

/// An accepted object, written back as YAML, is accepted again as the same object:
/// what `isthmus` tooling renders, the proxy reads.
fn check_round_trip(object: &Object) {
    let yaml = serde_yaml_ng_text(object);
    let again = parse_manifests(FILE, &yaml)
        .unwrap_or_else(|e| panic!("rendered object does not parse: {e}\n{yaml}"));
    assert_eq!(
        again.len(),
        1,
        "rendered object is {} objects:\n{yaml}",
        again.len()
    );
    assert_eq!(
        &again[0].object, object,
        "round trip changed the object:\n{yaml}"
    );
}

fn serde_yaml_ng_text(object: &Object) -> String {
    serde_yaml_ng::to_string(object).expect("objects always serialise to YAML")
}
