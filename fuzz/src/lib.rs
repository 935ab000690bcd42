//! The bodies of the fuzz targets (`fuzz_targets/*.rs` call them with
//! libFuzzer's input): plain functions, so that the committed seeds can be
//! replayed through the very same code by a normal test on stable Rust
//! (`tests/fuzz_seeds.rs` of the main crate includes this file), and the
//! targets cannot drift from the crate's API unnoticed (scripts/test.sh).
//! Each one panics on a broken property; none may panic on any input.

use bytes::BytesMut;
use corecast::protocol::ClientOp;
use corecast::ws::deflate::{self, Inflater};
use corecast::ws::{FrameHeader, OpCode, close, mask, utf8::Utf8Check};
use monoio_codec::Decoder;
use monoio_http::h1::codec::decoder::RequestHeadDecoder;

/// Untrusted text frames through the op parser: never a panic, and a parsed
/// publish keeps `data` as a slice of the input.
pub fn client_op(data: &[u8]) {
    if let Ok((ClientOp::Publish { data: d, .. }, _)) = ClientOp::parse(data) {
        let start = d.as_ptr() as usize;
        let base = data.as_ptr() as usize;
        assert!(start >= base && start + d.len() <= base + data.len());
    }
}

/// Untrusted request heads through monoio-http's decoder as corecast calls it.
pub fn http_head(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(monoio_codec::Decoded::Some(head)) = RequestHeadDecoder.decode(&mut buf) {
        let _ = head.uri.path();
        let _ = head.uri.query();
    }
}

/// Untrusted compressed payloads through the bounded inflater the way the
/// frame loop uses it (RFC 7692): the first byte picks the limit and how the
/// message is cut into frames; the inflater must never panic, never produce
/// more than the limit, and never allocate more than the limit + 1 byte.
/// Also: the offer parser on the same bytes, and a compress -> inflate round
/// trip of them.
pub fn inflate(data: &[u8]) {
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
        let h = if z[1] & 0x7f == 126 {
            4
        } else if z[1] & 0x7f == 127 {
            10
        } else {
            2
        };
        let mut back = Vec::new();
        Inflater::new(15).inflate(&z[h..], true, &mut back, rest.len()).expect("our own output inflates");
        assert_eq!(back, rest);
    }
}

/// Untrusted client bytes through the WebSocket codec the way the connection
/// task uses it: parse headers back to back, unmask each complete payload,
/// validate close bodies and text as UTF-8 (whole and fragment by fragment).
pub fn ws_frame(data: &[u8]) {
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
}
