//! libFuzzer entry of `pohmelfs::fuzz::engine_decode` (see src/fuzz/mod.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pohmelfs::fuzz::engine_decode(data));
