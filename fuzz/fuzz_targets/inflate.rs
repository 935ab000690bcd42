//! Untrusted compressed payloads through the bounded inflater the way the
//! frame loop uses it (RFC 7692): the first byte picks the limit and how the
//! message is cut into frames; the inflater must never panic, never produce
//! more than the limit, and never allocate more than the limit + 1 byte.
//! Also: the offer parser on the same bytes, and a compress → inflate round
//! trip of them.
#![no_main]

use corecast::ws::OpCode;
use corecast::ws::deflate::{self, Inflater};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else { return };
    let max = 1usize << (ctl & 0x0f).min(16);
    let cuts = 1 + (ctl >> 4) as usize;
    let mut inf = Inflater::new(15);
    let mut out = Vec::new();
    let step = rest.len() / cuts + 1;
    let chunks: Vec<&[u8]> = rest.chunks(step).collect();
    for (i, c) in chunks.iter().enumerate() {
        let fin = i + 1 == chunks.len();
        if inf.inflate(c, fin, &mut out, max).is_err() {
            break;
        }
    }
    assert!(out.len() <= max + 1 && out.capacity() <= max + 1);
    let _ = deflate::negotiate([rest]);
    if let Some(z) = deflate::compress(OpCode::Binary, rest) {
        let h = if z[1] & 0x7f == 126 { 4 } else if z[1] & 0x7f == 127 { 10 } else { 2 };
        let mut back = Vec::new();
        Inflater::new(15).inflate(&z[h..], true, &mut back, rest.len()).expect("our own output inflates");
        assert_eq!(back, rest);
    }
});
