//! SPIFFE IDs and trust domains.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_fuzz_harness::spiffe::check(data));
