//! Untrusted text frames through the op parser: never a panic, and a parsed
//! publish keeps `data` as a slice of the input.
#![no_main]

use corecast::protocol::ClientOp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((ClientOp::Publish { data: d, .. }, _)) = ClientOp::parse(data) {
        let start = d.as_ptr() as usize;
        let base = data.as_ptr() as usize;
        assert!(start >= base && start + d.len() <= base + data.len());
    }
});
