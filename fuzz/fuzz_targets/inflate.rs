//! Fuzz target `inflate`: the body is `corecast_fuzz::inflate` (src/lib.rs), which
//! tests/fuzz_seeds.rs of the main crate also runs on every committed seed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corecast_fuzz::inflate(data));
