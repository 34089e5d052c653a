//! The tunnel server's reading of a peer's HTTP/2 CONNECT: frames, HPACK, :authority, isthmus-cluster.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_fuzz_harness::tunnel::check(data));
