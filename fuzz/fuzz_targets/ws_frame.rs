//! Untrusted client bytes through the WebSocket codec the way the connection
//! task uses it: parse headers back to back, unmask each complete payload,
//! validate close bodies and text as UTF-8 (whole and fragment by fragment).
#![no_main]

use corecast::ws::{FrameHeader, OpCode, close, mask, utf8::Utf8Check};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut pos = 0;
    let mut text = Vec::new();
    let mut check = Utf8Check::default();
    while let Ok(Some((h, hl))) = FrameHeader::parse(&buf[pos..]) {
        assert!(hl <= buf.len() - pos);
        let Some(end) = (pos + hl).checked_add(h.len as usize).filter(|e| *e <= buf.len()) else { break };
        let payload = &mut buf[pos + hl..end];
        mask::unmask(payload, h.mask);
        match h.opcode {
            OpCode::Close => {
                let _ = close::parse(payload);
            }
            OpCode::Text | OpCode::Continue => {
                text.extend_from_slice(payload);
                if check.feed(&text).is_err() {
                    assert!(std::str::from_utf8(&text).is_err());
                    break;
                }
                if h.fin && check.is_complete(&text) {
                    assert!(std::str::from_utf8(&text).is_ok());
                }
            }
            _ => {}
        }
        pos = end;
    }
});
