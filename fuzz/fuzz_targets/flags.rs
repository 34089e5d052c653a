//! isthmus-init's flag values: ports, port lists, CIDRs, CIDR lists.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isthmus_fuzz_harness::flags::check(data));
