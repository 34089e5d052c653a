//! Multi-document Kubernetes YAML manifests, and the view, snapshot and index built from them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_fuzz_harness::manifest::check(data));
