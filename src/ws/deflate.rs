//! ③ permessage-deflate (RFC 7692), server side: negotiation, shared
//! compressed frames, bounded inflate.
//!
//! In: the client's `Sec-WebSocket-Extensions` offers (`negotiate`); server
//! frames built by `frame` (`compress_frame`, `Lazy`); the payloads of client
//! frames with RSV1 set (`Inflater`). Out: the response header and the
//! agreed parameters packed in a `u16` (`Agreed`, kept in `Conn`); one
//! compressed frame (a `Bytes` with RSV1 set) per message per shard; inflated
//! messages, never larger than `--max-message-bytes`.
//!
//! The server always answers with `server_no_context_takeover` and
//! `client_no_context_takeover` (an inflater exists only while a compressed
//! message is being read), so every
//! compressed message it sends is an independent raw DEFLATE stream (its
//! trailing 0x00 0x00 0xff 0xff removed, §7.2.1) and one frame serves every
//! subscriber that negotiated compression. A client's
//! `server_max_window_bits=N` is honoured without a compressor per window:
//! a stream over fewer than 2^N input bytes cannot refer further back than
//! 2^N, so such a connection gets the shared compressed frame for payloads of
//! at most 2^N bytes and the plain frame for larger ones (RFC 7692 lets any
//! message go uncompressed).

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::{self, HEADROOM, OpCode, ProtocolError};

/// The extension's name in `Sec-WebSocket-Extensions` (RFC 7692 §7).
pub const NAME: &str = "permessage-deflate";

/// The four octets a sync flush ends with, removed from each compressed
/// message and appended again before inflating (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Compression level of outgoing messages (zlib's default trade-off).
const LEVEL: u32 = 6;

/// What was agreed for one connection, packed in a `u16` (`Conn` keeps it in
/// a `Cell`): 0 means not negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Agreed(u16);

const ON: u16 = 0x100;
const CLIENT_NO_CONTEXT: u16 = 0x200;

impl Agreed {
    pub const OFF: Agreed = Agreed(0);

    fn new(client_no_context: bool, client_bits: u8, server_bits: u8) -> Agreed {
        Agreed(
            ON | if client_no_context { CLIENT_NO_CONTEXT } else { 0 } | (client_bits as u16) << 4 | server_bits as u16,
        )
    }
    pub fn from_bits(b: u16) -> Agreed {
        Agreed(b)
    }
    pub fn bits(self) -> u16 {
        self.0
    }
    pub fn is_on(self) -> bool {
        self.0 & ON != 0
    }
    /// The client starts every message with an empty window: an inflater is
    /// needed only while a compressed message is being read.
    pub fn client_no_context(self) -> bool {
        self.0 & CLIENT_NO_CONTEXT != 0
    }
    /// The client's LZ77 window (8..=15).
    pub fn client_bits(self) -> u8 {
        ((self.0 >> 4) & 0xf) as u8
    }
    /// The window our messages may use (8..=15).
    pub fn server_bits(self) -> u8 {
        (self.0 & 0xf) as u8
    }
    /// Largest payload this connection may get compressed (module docs).
    pub fn max_compressed_payload(self) -> usize {
        if self.server_bits() >= 15 { usize::MAX } else { 1 << self.server_bits() }
    }
}

/// Picks the first `permessage-deflate` offer we can honour from the values
/// of every `Sec-WebSocket-Extensions` header; returns what was agreed and
/// the response header's value. An offer we cannot honour (an unknown or
/// repeated parameter, a bad value) is declined and the next one tried
/// (RFC 7692 §5: "the server ... MUST decline"); none left: `None`, and the
/// handshake goes on without the extension.
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<(Agreed, String)> {
    for value in values {
        let Ok(value) = std::str::from_utf8(value) else { continue };
        for offer in value.split(',') {
            let mut parts = offer.split(';').map(str::trim);
            if !parts.next().is_some_and(|n| n.eq_ignore_ascii_case(NAME)) {
                continue;
            }
            if let Some(agreed) = accept_offer(parts) {
                return Some(agreed);
            }
        }
    }
    None
}

/// One offer's parameters → what we answer, or `None` to decline it.
fn accept_offer<'a>(params: impl Iterator<Item = &'a str>) -> Option<(Agreed, String)> {
    let (mut cnct, mut snct) = (false, false);
    let (mut cbits, mut sbits): (Option<Option<u8>>, Option<u8>) = (None, None);
    for p in params {
        if p.is_empty() {
            return None;
        }
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (p, None),
        };
        // A server MUST decline an extension negotiation offer ... if the
        // negotiation offer includes an extension parameter not defined for
        // use in an offer, an extension parameter with an invalid value, or
        // multiple extension parameters with the same name. (RFC 7692 §7)
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if !snct && value.is_none() => snct = true,
            "client_no_context_takeover" if !cnct && value.is_none() => cnct = true,
            "server_max_window_bits" if sbits.is_none() => sbits = Some(window_bits(value?)?),
            "client_max_window_bits" if cbits.is_none() => {
                cbits = Some(match value {
                    None => None,
                    Some(v) => Some(window_bits(v)?),
                })
            }
            _ => return None,
        }
    }
    // We always use no context takeover, asked for or not; and we always ask
    // it of the client, offered or not ("A server MAY include the
    // client_no_context_takeover extension parameter in an extension
    // negotiation response", RFC 7692 §7.1.1.2): the node then holds an
    // inflater only while a compressed message is being read, and an idle
    // compressed connection costs what a plain one does. Client-to-server
    // traffic on a fan-out server is small; its ratio matters less than
    // memory per idle connection.
    let _ = (snct, cnct);
    let mut response = format!("{NAME}; server_no_context_takeover; client_no_context_takeover");
    if let Some(n) = sbits {
        // The server MUST include the "server_max_window_bits" extension
        // parameter ... with a value equal to or smaller than the received
        // one. (RFC 7692 §7.1.2.1)
        response.push_str(&format!("; server_max_window_bits={n}"));
    }
    let client_bits = match cbits {
        Some(Some(n)) => {
            response.push_str(&format!("; client_max_window_bits={n}"));
            n
        }
        _ => 15,
    };
    Some((Agreed::new(true, client_bits, sbits.unwrap_or(15)), response))
}

/// A quoted-string value is the same after unquoting (RFC 7692 §7); only
/// digits are ever valid here, so no escapes need handling.
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(v),
    }
}

/// A window size: 1*DIGIT between 8 and 15, no leading zero (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|n| (8..=15).contains(n))
}

// ---- outgoing ------------------------------------------------------------------

thread_local! {
    /// The shard's one compressor, reset for every message.
    static DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(LEVEL), false));
}

/// Opcode and payload of a server frame `frame::encode*` built (unmasked,
/// final, RSV clear); `None` for anything else.
fn split_server_frame(f: &[u8]) -> Option<(OpCode, &[u8])> {
    let (&b0, &b1) = (f.first()?, f.get(1)?);
    let op = match b0 {
        0x81 => OpCode::Text,
        0x82 => OpCode::Binary,
        _ => return None,
    };
    let at = match b1 {
        126 => 4,
        127 => 10,
        n if n < 126 => 2,
        _ => return None,
    };
    Some((op, f.get(at..)?))
}

/// The compressed form of a message: one frame with RSV1 set holding the raw
/// DEFLATE stream of `payload` without its trailing 0x00 0x00 0xff 0xff.
/// `None` when it would not be smaller than the plain payload.
pub fn compress(op: OpCode, payload: &[u8]) -> Option<Bytes> {
    let mut out: Vec<u8> = Vec::with_capacity(HEADROOM + payload.len() / 2 + 64);
    out.resize(HEADROOM, 0);
    DEFLATE.with(|d| {
        let mut d = d.borrow_mut();
        d.reset();
        loop {
            let before = d.total_in() as usize;
            let status = d.compress_vec(&payload[before..], &mut out, FlushCompress::Sync).ok()?;
            let done = d.total_in() as usize == payload.len() && out.len() < out.capacity();
            if done || status == Status::StreamEnd {
                break;
            }
            if out.len() - HEADROOM > payload.len() + 64 {
                return None; // incompressible: send it plain
            }
            out.reserve(payload.len() / 2 + 64);
        }
        Some(())
    })?;
    // The sync flush ends with an empty stored block, 00 00 ff ff. (§7.2.1)
    if !out.ends_with(&TAIL) {
        return None;
    }
    out.truncate(out.len() - TAIL.len());
    let len = out.len() - HEADROOM;
    if len >= payload.len() {
        return None;
    }
    let h = frame::header_len(len);
    frame::format_header_compressed(&mut out[HEADROOM - h..HEADROOM], op, len);
    Some(Bytes::from(out).slice(HEADROOM - h..))
}

/// The compressed form of a server frame, if it is a data frame with a
/// payload of at least `min` bytes that deflate makes smaller.
pub fn compress_frame(f: &Bytes, min: usize) -> Option<Bytes> {
    let (op, payload) = split_server_frame(f)?;
    if payload.len() < min {
        return None;
    }
    compress(op, payload)
}

/// One message's compressed frame for one fan-out, built the first time a
/// member that negotiated compression needs it (so at most once per message
/// per shard, and never for a shard without such members).
pub struct Lazy<'a> {
    plain: &'a Bytes,
    /// The plain payload's length (0 for a frame that is never compressed).
    payload: usize,
    min: usize,
    built: Option<Option<Bytes>>,
}

impl<'a> Lazy<'a> {
    pub fn new(plain: &'a Bytes, min: usize) -> Lazy<'a> {
        let payload = split_server_frame(plain).map_or(0, |(_, p)| p.len());
        Lazy { plain, payload, min, built: None }
    }

    /// The frame for a member with `agreed`: the shared compressed one when
    /// it may have it, else the plain one. `compressed` is called the one
    /// time the message is deflated.
    /// The plain frame.
    pub fn plain(&self) -> &Bytes {
        self.plain
    }

    pub fn frame_for(&mut self, agreed: Agreed, compressed: impl FnOnce()) -> &Bytes {
        if !agreed.is_on() || self.payload < self.min || self.payload > agreed.max_compressed_payload() {
            return self.plain;
        }
        let plain = self.plain;
        let built = self.built.get_or_insert_with(|| {
            let z = compress_frame(plain, 0);
            if z.is_some() {
                compressed();
            }
            z
        });
        built.as_ref().unwrap_or(plain)
    }
}

// ---- incoming ------------------------------------------------------------------

/// Inflates the compressed messages of one connection, never producing more
/// than the caller's limit.
pub struct Inflater {
    z: Decompress,
    /// The stream ended with a BFINAL block: the rest of this message is
    /// ignored and the next one starts a new stream.
    ended: bool,
}

impl Inflater {
    /// `bits`: the client's window (raw deflate needs at least 9, which
    /// also inflates what a window of 8 produced).
    pub fn new(bits: u8) -> Inflater {
        Inflater { z: Decompress::new_with_window_bits(false, bits.clamp(9, 15)), ended: false }
    }

    /// Inflates one frame's payload of a compressed message onto `out`;
    /// `fin`: the last frame (the removed tail is fed back). Fails with
    /// `TooLarge` as soon as `out` would pass `max` bytes, having allocated at
    /// most `max + 1` of them, and with `BadDeflate` on corrupt data.
    pub fn inflate(&mut self, input: &[u8], fin: bool, out: &mut Vec<u8>, max: usize) -> Result<(), ProtocolError> {
        self.feed(input, out, max)?;
        if fin {
            // Append 4 octets of 0x00 0x00 0xff 0xff to the tail end of the
            // payload of the message. (RFC 7692 §7.2.2)
            self.feed(&TAIL, out, max)?;
            if self.ended {
                self.z.reset(false);
                self.ended = false;
            }
        }
        Ok(())
    }

    /// Ready for a new message with an empty window (no context takeover).
    pub fn reset(&mut self) {
        self.z.reset(false);
        self.ended = false;
    }

    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>, max: usize) -> Result<(), ProtocolError> {
        while !self.ended {
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(ProtocolError::TooLarge);
                }
                // Grow geometrically, but never past max + 1: one byte over
                // the limit is how a bomb is told from a message that fits.
                let want = out.len().max(input.len() * 2).clamp(4096, 256 * 1024);
                out.reserve_exact(want.min(max + 1 - out.len()));
            }
            let (in0, out0) = (self.z.total_in(), out.len());
            let status =
                self.z.decompress_vec(input, out, FlushDecompress::None).map_err(|_| ProtocolError::BadDeflate)?;
            input = &input[(self.z.total_in() - in0) as usize..];
            if out.len() > max {
                return Err(ProtocolError::TooLarge);
            }
            if status == Status::StreamEnd {
                self.ended = true;
                break;
            }
            let progressed = self.z.total_in() != in0 || out.len() != out0;
            if (input.is_empty() && out.len() < out.capacity()) || !progressed && out.len() < out.capacity() {
                break;
            }
        }
        Ok(())
    }
}

thread_local! {
    /// The shard's spare inflater for connections without context: taken
    /// for one compressed message, reset and put back after it.
    static SPARE: RefCell<Option<Box<Inflater>>> = const { RefCell::new(None) };
}

/// An inflater for one message of a connection without context takeover.
pub fn take_spare() -> Box<Inflater> {
    SPARE.with(|s| s.borrow_mut().take()).unwrap_or_else(|| Box::new(Inflater::new(15)))
}

/// Gives back what `take_spare` lent.
pub fn put_spare(mut i: Box<Inflater>) {
    i.reset();
    SPARE.with(|s| *s.borrow_mut() = Some(i));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(v: &str) -> Option<(Agreed, String)> {
        negotiate([v.as_bytes()])
    }

    #[test]
    fn a_plain_offer_is_accepted_with_server_no_context_takeover() {
        let (a, r) = neg("permessage-deflate").unwrap();
        assert_eq!(r, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
        assert!(a.is_on() && a.client_no_context(), "asked of the client even if not offered");
        assert_eq!((a.client_bits(), a.server_bits()), (15, 15));
    }

    #[test]
    fn client_parameters_are_answered_as_offered() {
        let (a, r) = neg("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(r, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
        assert_eq!(a.client_bits(), 15);
        let (a, r) = neg("permessage-deflate; client_max_window_bits=10; client_no_context_takeover").unwrap();
        assert_eq!(
            r,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits=10"
        );
        assert!(a.client_no_context());
        assert_eq!(a.client_bits(), 10);
        let (a, r) = neg("Permessage-Deflate; server_max_window_bits=\"9\"; server_no_context_takeover").unwrap();
        assert_eq!(
            r,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"
        );
        assert_eq!((a.server_bits(), a.max_compressed_payload()), (9, 512));
    }

    #[test]
    fn offers_we_cannot_honour_are_declined_and_the_next_is_tried() {
        for bad in [
            "permessage-deflate; foo",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=08",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(neg(bad), None, "{bad}");
        }
        let (a, _) = neg("permessage-deflate; foo, permessage-deflate; client_no_context_takeover").unwrap();
        assert!(a.client_no_context());
        // Offers may come in several header lines.
        let (a, _) =
            negotiate(["permessage-deflate; bar".as_bytes(), b"permessage-deflate; server_max_window_bits=12"])
                .unwrap();
        assert_eq!(a.server_bits(), 12);
    }

    fn split_compressed(f: &[u8]) -> &[u8] {
        assert_eq!(f[0] & 0x40, 0x40);
        let mut plain = f.to_vec();
        plain[0] &= !0x40;
        &f[f.len() - split_server_frame(&plain).unwrap().1.len()..]
    }

    fn inflate_all(z: &[u8], max: usize) -> Result<Vec<u8>, ProtocolError> {
        let mut out = Vec::new();
        Inflater::new(15).inflate(z, true, &mut out, max)?;
        Ok(out)
    }

    #[test]
    fn compressed_frames_inflate_to_the_payload() {
        let json =
            br#"{"type":"message","room":"lobby","data":{"text":"hello hello hello hello hello hello"}}"#.repeat(8);
        let plain = frame::encode(OpCode::Text, &json);
        let z = compress_frame(&plain, 256).unwrap();
        assert_eq!(z[0], 0xC1, "FIN + RSV1 + text");
        let (h, n) = (z[1] as usize, 2);
        assert_eq!(h, z.len() - n);
        assert_eq!(inflate_all(&z[n..], 1 << 20).unwrap(), json);
        // Below the threshold, and not a data frame: no compressed form.
        assert!(compress_frame(&plain, json.len() + 1).is_none());
        assert!(compress_frame(&frame::encode(OpCode::Ping, b"x"), 0).is_none());
    }

    #[test]
    fn inflate_stops_one_byte_past_the_limit() {
        let bomb = compress(OpCode::Binary, &vec![0u8; 10 << 20]).unwrap();
        let payload = split_compressed(&bomb);
        assert!(payload.len() < 20_000);
        let mut out = Vec::new();
        let r = Inflater::new(15).inflate(payload, true, &mut out, 65536);
        assert_eq!(r, Err(ProtocolError::TooLarge));
        assert!(out.capacity() <= 65537, "allocated {}", out.capacity());
        // Exactly at the limit is fine.
        let z = compress(OpCode::Binary, &[7u8; 65536]).unwrap();
        assert_eq!(inflate_all(split_compressed(&z), 65536).unwrap().len(), 65536);
        assert_eq!(inflate_all(split_compressed(&z), 65535), Err(ProtocolError::TooLarge));
    }

    #[test]
    fn corrupt_data_is_an_error_not_a_panic() {
        assert_eq!(inflate_all(&[0xff, 0xff, 0xff, 0xff, 0xff], 1000), Err(ProtocolError::BadDeflate));
    }

    #[test]
    fn context_takeover_inflates_messages_that_refer_back() {
        // Two messages of one client stream (context kept): the second
        // refers to the first's window.
        let mut c = Compress::new(Compression::new(6), false);
        let (mut a, mut b) = (Vec::with_capacity(1024), Vec::with_capacity(1024));
        let text = b"the same sentence, said again and again. ".repeat(4);
        c.compress_vec(&text, &mut a, FlushCompress::Sync).unwrap();
        c.compress_vec(&text, &mut b, FlushCompress::Sync).unwrap();
        let mut inf = Inflater::new(15);
        for m in [&a, &b] {
            let mut out = Vec::new();
            inf.inflate(&m[..m.len() - 4], true, &mut out, 1 << 16).unwrap();
            assert_eq!(out, text);
        }
        assert!(b.len() < a.len());
    }

    #[test]
    fn a_window_limited_connection_gets_compressed_frames_only_for_small_payloads() {
        let small = frame::encode(OpCode::Text, &b"abcabcabc".repeat(50)); // 450 bytes
        let big = frame::encode(OpCode::Text, &b"abcabcabc".repeat(100)); // 900 bytes
        let nine = Agreed::new(false, 15, 9);
        let full = Agreed::new(false, 15, 15);
        let mut l = Lazy::new(&small, 16);
        assert_eq!(l.frame_for(nine, || {})[0], 0xC1);
        let mut l = Lazy::new(&big, 16);
        assert_eq!(l.frame_for(nine, || panic!("not compressed for this one"))[0], 0x81);
        let mut n = 0;
        assert_eq!(l.frame_for(full, || n += 1)[0], 0xC1);
        assert_eq!(l.frame_for(full, || n += 1)[0], 0xC1);
        assert_eq!(n, 1, "deflated once");
        assert_eq!(l.frame_for(Agreed::OFF, || {})[0], 0x81);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a client sends as compressed data, the inflater neither
        /// panics nor holds more than the limit + 1 byte, cut into any frames.
        #[test]
        fn inflate_is_bounded_on_any_input(data in proptest::collection::vec(any::<u8>(), 0..2048), max in 0usize..4096, cut in 1usize..64) {
            let mut inf = Inflater::new(15);
            let mut out = Vec::new();
            let chunks: Vec<&[u8]> = data.chunks(cut).collect();
            for (i, c) in chunks.iter().enumerate() {
                if inf.inflate(c, i + 1 == chunks.len(), &mut out, max).is_err() {
                    break;
                }
            }
            prop_assert!(out.len() <= max + 1 && out.capacity() <= max + 1);
        }

        /// What we send inflates back to the payload, whole or cut into frames.
        #[test]
        fn compressed_payloads_round_trip(text in "[a-c ]{0,3000}", cut in 1usize..512) {
            if let Some(z) = compress(OpCode::Text, text.as_bytes()) {
                let h = match z[1] { 126 => 4, 127 => 10, _ => 2 };
                let mut inf = Inflater::new(15);
                let mut out = Vec::new();
                let chunks: Vec<&[u8]> = z[h..].chunks(cut).collect();
                for (i, c) in chunks.iter().enumerate() {
                    inf.inflate(c, i + 1 == chunks.len(), &mut out, text.len()).unwrap();
                }
                prop_assert_eq!(out, text.as_bytes());
            }
        }
    }
}
