//! Service authorities (`host:port`) as the tunnel's `:authority` and CONNECT targets deliver them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_fuzz_harness::authority::check(data));
