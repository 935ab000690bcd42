//! Frame headers (RFC 6455 §5.2): parsing what a client sends, formatting
//! what the server sends.
//!
//! Server frames are built as one `Bytes` holding header and payload, so that a
//! fan-out frame is encoded once and the same buffer is queued to every
//! recipient (`encode_with_headroom` builds it with no copy of the payload).

use bytes::{BufMut, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 §5.2, §11.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    Continue = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A violation of RFC 6455 by the client. Every variant is the client's
/// fault; the connection is closed with `CloseCode::for_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// RSV1-3 set without a negotiated extension (§5.2).
    ReservedBits,
    /// Opcode 0x3-0x7 or 0xB-0xF (§5.2).
    ReservedOpcode,
    /// A client frame without the mask bit (§5.1).
    UnmaskedFrame,
    /// A control frame with FIN clear (§5.5).
    FragmentedControl,
    /// A control frame with more than 125 bytes of payload (§5.5).
    ControlTooLong,
    /// A 64-bit length with the most significant bit set (§5.2).
    BadLength,
    /// A continuation frame with no message in progress, or a new data frame
    /// while one is (§5.4).
    BadFragmentation,
    /// A close frame with a 1-byte body, or a code that may not be sent (§5.5.1, §7.4).
    BadClose,
    /// Invalid UTF-8 in a text message or a close reason (§8.1).
    InvalidUtf8,
    /// A message larger than the configured limit (for a compressed one,
    /// once inflated).
    TooLarge,
    /// A compressed message that does not inflate (RFC 7692 §7.2.2).
    BadDeflate,
}

/// The parsed header of one client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1: with permessage-deflate, "this message is compressed" (RFC 7692
    /// §6); only ever set on the first frame of a data message.
    pub rsv1: bool,
    pub opcode: OpCode,
    pub mask: [u8; 4],
    pub len: u64,
}

impl FrameHeader {
    /// Parses a client frame header at the start of `buf`.
    ///
    /// Returns `Ok(None)` if `buf` does not yet hold the whole header and does
    /// not consume anything in this case; otherwise the header and its length
    /// in bytes. The payload may not be complete yet: the caller checks `len`.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        Self::parse_with(buf, false)
    }

    /// Like `parse`; `deflate`: permessage-deflate was negotiated, so RSV1
    /// may be set on the first frame of a text or binary message.
    pub fn parse_with(buf: &[u8], deflate: bool) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        // MUST be 0 unless an extension is negotiated that defines meanings
        // for non-zero values. (RFC 6455 §5.2)
        if b0 & 0x30 != 0 || (b0 & 0x40 != 0 && !deflate) {
            return Err(ProtocolError::ReservedBits);
        }
        let rsv1 = b0 & 0x40 != 0;
        // An endpoint MUST NOT set the "Per-Message Compressed" bit of control
        // frames and non-first fragments of a data message. (RFC 7692 §6.1)
        if rsv1 && !matches!(b0 & 0x0f, 0x1 | 0x2) {
            return Err(ProtocolError::ReservedBits);
        }
        let opcode = match b0 & 0x0f {
            0x0 => OpCode::Continue,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return Err(ProtocolError::ReservedOpcode),
        };
        let fin = b0 & 0x80 != 0;
        // The server MUST close the connection upon receiving a frame that is
        // not masked. (RFC 6455 §5.1)
        if b1 & 0x80 == 0 {
            return Err(ProtocolError::UnmaskedFrame);
        }
        let (len, at) = match b1 & 0x7f {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                let len = u64::from_be_bytes(b);
                // The most significant bit MUST be 0. (RFC 6455 §5.2)
                if len >> 63 != 0 {
                    return Err(ProtocolError::BadLength);
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        if opcode.is_control() {
            // All control frames MUST have a payload length of 125 bytes or
            // less and MUST NOT be fragmented. (RFC 6455 §5.5)
            if !fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if len > 125 {
                return Err(ProtocolError::ControlTooLong);
            }
        }
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        Ok(Some((FrameHeader { fin, rsv1, opcode, mask, len }, at + 4)))
    }
}

/// Bytes a server frame header takes for a payload of `len` bytes.
#[inline]
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Writes an unmasked, final server frame header into `out` (exactly
/// `header_len(len)` bytes).
#[inline]
pub fn format_header(out: &mut [u8], opcode: OpCode, len: usize) {
    out[0] = 0x80 | opcode as u8;
    match len {
        0..=125 => out[1] = len as u8,
        126..=65535 => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Like `format_header`, with RSV1 set: a compressed message (RFC 7692 §6).
#[inline]
pub fn format_header_compressed(out: &mut [u8], opcode: OpCode, len: usize) {
    format_header(out, opcode, len);
    out[0] |= 0x40;
}

/// Room left in front of an encoded payload for the largest frame header.
pub const HEADROOM: usize = 10;

/// Turns a buffer that holds `HEADROOM` spare bytes followed by a payload into
/// one complete frame, writing the header into the headroom: no copy.
pub fn encode_with_headroom(mut buf: BytesMut, opcode: OpCode) -> Bytes {
    debug_assert!(buf.len() >= HEADROOM);
    let len = buf.len() - HEADROOM;
    let h = header_len(len);
    format_header(&mut buf[HEADROOM - h..HEADROOM], opcode, len);
    buf.freeze().slice(HEADROOM - h..)
}

/// A complete server frame holding a copy of `payload`.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let h = header_len(payload.len());
    let mut buf = BytesMut::with_capacity(h + payload.len());
    buf.resize(h, 0);
    format_header(&mut buf[..h], opcode, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(b0: u8, payload_len_byte: u8, ext: &[u8]) -> Vec<u8> {
        let mut v = vec![b0, 0x80 | payload_len_byte];
        v.extend_from_slice(ext);
        v.extend_from_slice(&[1, 2, 3, 4]);
        v
    }

    #[test]
    fn parses_short_medium_long_lengths() {
        let (h, n) = FrameHeader::parse(&masked(0x81, 5, &[])).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.len, h.mask, n), (true, OpCode::Text, 5, [1, 2, 3, 4], 6));
        let (h, n) = FrameHeader::parse(&masked(0x02, 126, &[0x01, 0x00])).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.len, n), (false, OpCode::Binary, 256, 8));
        let (h, n) = FrameHeader::parse(&masked(0x82, 127, &[0, 0, 0, 0, 0, 1, 0, 0])).unwrap().unwrap();
        assert_eq!((h.len, n), (65536, 14));
    }

    #[test]
    fn incomplete_header_is_none_at_every_cut() {
        let full = masked(0x82, 127, &[0, 0, 0, 0, 0, 1, 0, 0]);
        for cut in 0..full.len() {
            assert_eq!(FrameHeader::parse(&full[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn rejects_what_rfc_6455_forbids() {
        assert_eq!(FrameHeader::parse(&masked(0xC1, 0, &[])), Err(ProtocolError::ReservedBits));
        assert_eq!(FrameHeader::parse(&masked(0x83, 0, &[])), Err(ProtocolError::ReservedOpcode));
        assert_eq!(FrameHeader::parse(&masked(0x8B, 0, &[])), Err(ProtocolError::ReservedOpcode));
        assert_eq!(FrameHeader::parse(&[0x81, 0x05]), Err(ProtocolError::UnmaskedFrame));
        assert_eq!(FrameHeader::parse(&masked(0x09, 0, &[])), Err(ProtocolError::FragmentedControl));
        assert_eq!(FrameHeader::parse(&masked(0x89, 126, &[0, 126])), Err(ProtocolError::ControlTooLong));
        assert_eq!(FrameHeader::parse(&masked(0x82, 127, &[0x80, 0, 0, 0, 0, 0, 0, 0])), Err(ProtocolError::BadLength));
    }

    #[test]
    fn rsv1_only_with_deflate_and_only_on_a_first_data_frame() {
        let (h, _) = FrameHeader::parse_with(&masked(0xC1, 0, &[]), true).unwrap().unwrap();
        assert!(h.rsv1 && h.fin && h.opcode == OpCode::Text);
        let (h, _) = FrameHeader::parse_with(&masked(0x81, 0, &[]), true).unwrap().unwrap();
        assert!(!h.rsv1);
        assert_eq!(FrameHeader::parse_with(&masked(0xC1, 0, &[]), false), Err(ProtocolError::ReservedBits));
        assert_eq!(FrameHeader::parse_with(&masked(0xC0, 0, &[]), true), Err(ProtocolError::ReservedBits));
        assert_eq!(FrameHeader::parse_with(&masked(0xC9, 0, &[]), true), Err(ProtocolError::ReservedBits));
        assert_eq!(FrameHeader::parse_with(&masked(0xA1, 0, &[]), true), Err(ProtocolError::ReservedBits));
        assert_eq!(FrameHeader::parse_with(&masked(0x91, 0, &[]), true), Err(ProtocolError::ReservedBits));
    }

    #[test]
    fn encodes_byte_exact() {
        assert_eq!(&encode(OpCode::Text, b"Hello")[..], b"\x81\x05Hello");
        let f = encode(OpCode::Binary, &[7u8; 256]);
        assert_eq!(&f[..4], &[0x82, 126, 0x01, 0x00]);
        assert_eq!(f.len(), 260);
        let f = encode(OpCode::Binary, &vec![0u8; 65536]);
        assert_eq!(&f[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(&encode(OpCode::Pong, b"")[..], &[0x8A, 0]);
    }

    #[test]
    fn headroom_encoding_equals_copying_encoding() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = BytesMut::with_capacity(HEADROOM + len);
            buf.resize(HEADROOM, 0);
            buf.extend_from_slice(&payload);
            assert_eq!(encode_with_headroom(buf, OpCode::Text), encode(OpCode::Text, &payload), "len {len}");
        }
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// No input can make the header parser panic, and a parsed header
        /// never claims more header bytes than it was given.
        #[test]
        fn parse_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some((_, n))) = FrameHeader::parse(&buf) {
                prop_assert!(n <= buf.len());
            }
        }

        /// A masked client frame built from any payload parses back to its
        /// length, flags and key.
        #[test]
        fn client_frames_round_trip(len in 0usize..70000, fin: bool, key: [u8; 4], binary: bool) {
            let mut head = vec![(if fin { 0x80 } else { 0 }) | if binary { 2 } else { 1 }];
            match len {
                0..=125 => head.push(0x80 | len as u8),
                126..=65535 => { head.push(0x80 | 126); head.extend_from_slice(&(len as u16).to_be_bytes()); }
                _ => { head.push(0x80 | 127); head.extend_from_slice(&(len as u64).to_be_bytes()); }
            }
            head.extend_from_slice(&key);
            let (h, n) = FrameHeader::parse(&head).unwrap().unwrap();
            prop_assert_eq!(n, head.len());
            prop_assert_eq!(h.len, len as u64);
            prop_assert_eq!(h.fin, fin);
            prop_assert_eq!(h.mask, key);
            prop_assert_eq!(h.opcode, if binary { OpCode::Binary } else { OpCode::Text });
        }
    }
}
