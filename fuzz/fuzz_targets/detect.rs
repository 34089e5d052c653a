//! Protocol detection on a client's first bytes, delivered in chunks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_fuzz_harness::detect::check(data));
