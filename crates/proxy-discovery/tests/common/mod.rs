//! Builds manifest directories from the fixtures, in the layout the directory
//! source reads (`DIR/*.yaml`, `DIR/clusters/<name>/*.yaml`).
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub fn read_fixture(rel: &str) -> String {
    std::fs::read_to_string(fixture(rel)).unwrap()
}

/// Copies fixture `rel` to `dir/<as_name>`, creating directories.
pub fn put(dir: &Path, rel: &str, as_name: &str) {
    let to = dir.join(as_name);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(fixture(rel), to).unwrap();
}

/// cluster-b's directory as the seed has it, plus the mesh objects that tie it to
/// cluster-a; `with_mirror` adds the seed's ServiceMirror.
pub fn cluster_b_dir(with_mirror: bool) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cluster-b")
        .tempdir()
        .unwrap();
    let d = dir.path();
    put(d, "seed/cluster-b.yaml", "cluster-b.yaml");
    put(d, "mesh/cluster-b-settings.yaml", "settings.yaml");
    put(d, "mesh/link-cluster-a.yaml", "link-cluster-a.yaml");
    put(
        d,
        "seed/cluster-a.yaml",
        "clusters/cluster-a/cluster-a.yaml",
    );
    put(
        d,
        "mesh/cluster-a-settings.yaml",
        "clusters/cluster-a/settings.yaml",
    );
    if with_mirror {
        put(
            d,
            "seed/cluster-b-servicemirror.yaml",
            "cluster-b-servicemirror.yaml",
        );
    }
    dir
}
