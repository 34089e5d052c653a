//! Cluster names: the tunnel's `isthmus-cluster` header, issuers' subjects, manifests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_fuzz_harness::cluster_name::check(data));
