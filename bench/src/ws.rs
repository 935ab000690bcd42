//! A small RFC 6455 codec for the load generator: the client's opening
//! handshake (request out, `101` response in), frame headers (parse and
//! format) and masking. Frames leave masked, as a client's must; the stand-in
//! server reuses the same functions with `mask: None`.
//!
//! Every decoder has the shape `fn parse(buf) -> Result<Option<(T, usize)>, E>`:
//! `Ok(None)` means "not enough bytes yet" and consumes nothing.

use memchr::memmem;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The client's `Sec-WebSocket-Key`. RFC 6455 §4.1 wants a fresh random nonce
/// per connection; a load generator gains nothing from that, so every
/// connection sends the sample nonce of §1.3, whose accept value is known.
pub const HANDSHAKE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// `base64(sha1(HANDSHAKE_KEY + GUID))`, as printed in RFC 6455 §1.3.
pub const HANDSHAKE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A response head larger than this is refused rather than buffered forever.
const MAX_RESPONSE_HEAD_BYTES: usize = 8192;
/// The largest frame payload accepted from a server.
pub const MAX_FRAME_BYTES: u64 = 16 << 20;

/// Appends the opening handshake request for `ws://{host}{path}`.
pub fn format_handshake(host: &str, path: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ");
    out.extend_from_slice(HANDSHAKE_KEY.as_bytes());
    out.extend_from_slice(b"\r\nSec-WebSocket-Version: 13\r\n\r\n");
}

/// Why an opening handshake failed. All of them are the server's doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// The server answered with this status instead of 101 (e.g. 503 at `--max-connections`).
    Status(u16),
    /// 101, but `Upgrade`/`Connection`/`Sec-WebSocket-Accept` were missing or wrong.
    BadHeaders,
    /// Not an HTTP/1.1 response, or a head over 8 KiB.
    Malformed,
}

/// Checks the server's handshake response in `buf`.
///
/// Returns `Ok(None)` if the head (up to the blank line) is not complete yet,
/// and `Ok(Some(n))` with the head's length on success: bytes after it are
/// already WebSocket frames.
pub fn parse_handshake_response(buf: &[u8]) -> Result<Option<usize>, HandshakeError> {
    let Some(end) = memmem::find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_RESPONSE_HEAD_BYTES { Err(HandshakeError::Malformed) } else { Ok(None) };
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| HandshakeError::Malformed)?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(HandshakeError::Malformed);
    }
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or(HandshakeError::Malformed)?;
    if status != 101 {
        return Err(HandshakeError::Status(status));
    }
    // RFC 6455 §4.1: the client MUST fail the connection unless Upgrade is
    // "websocket", Connection contains "Upgrade" and the accept value matches.
    let (mut upgrade, mut connection, mut accept) = (false, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HandshakeError::Malformed);
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection = value.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = value == HANDSHAKE_ACCEPT;
        }
    }
    if upgrade && connection && accept { Ok(Some(end + 4)) } else { Err(HandshakeError::BadHeaders) }
}

/// A protocol violation by the peer; the connection is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// RSV1-3 set without a negotiated extension (RFC 6455 §5.2).
    ReservedBits,
    /// Opcode 3-7 or B-F (§5.2).
    ReservedOpcode,
    /// A control frame with more than 125 bytes or without FIN (§5.5).
    BadControlFrame,
    /// Payload longer than [`MAX_FRAME_BYTES`].
    TooLarge,
}

/// The fixed part of a frame (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

impl FrameHeader {
    /// Parses a header from the front of `buf`.
    ///
    /// Returns `Ok(None)` if `buf` holds less than a whole header and
    /// consumes nothing in that case; otherwise the header and its length.
    /// The caller decides whether a mask is allowed: "A client MUST close a
    /// connection if it detects a masked frame." (RFC 6455 §5.1)
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        if b0 & 0x70 != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
            _ => return Err(ProtocolError::ReservedOpcode),
        }
        let masked = b1 & 0x80 != 0;
        let (payload_len, mut at) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
            }
            127 => {
                let Some(bytes) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut be = [0u8; 8];
                be.copy_from_slice(bytes);
                (u64::from_be_bytes(be), 10)
            }
            n => (u64::from(n), 2),
        };
        if opcode >= OP_CLOSE && (payload_len > 125 || !fin) {
            return Err(ProtocolError::BadControlFrame);
        }
        if payload_len > MAX_FRAME_BYTES {
            return Err(ProtocolError::TooLarge);
        }
        let mask = if masked {
            let Some(key) = buf.get(at..at + 4) else {
                return Ok(None);
            };
            at += 4;
            Some([key[0], key[1], key[2], key[3]])
        } else {
            None
        };
        Ok(Some((FrameHeader { fin, opcode, mask, payload_len }, at)))
    }
}

/// Appends one final frame: header, then `payload` masked with `mask` if given.
pub fn format_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>, out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let start = out.len();
    if let Some(key) = mask {
        out.extend_from_slice(&key);
        out.extend_from_slice(payload);
        apply_mask(&mut out[start + 4..], key, 0);
    } else {
        out.extend_from_slice(payload);
    }
}

/// XORs `buf` with `key`, where `buf[0]` is payload byte number `offset`
/// (RFC 6455 §5.3: byte i is XORed with `key[i % 4]`). Masking twice undoes it.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= key[(offset + i) % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    #[test]
    fn masked_hello_matches_rfc_example() {
        // RFC 6455 §5.7: "A single-frame masked text message".
        let mut out = Vec::new();
        format_frame(OP_TEXT, b"Hello", Some(KEY), &mut out);
        assert_eq!(out, [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }

    #[test]
    fn unmasked_hello_parses_like_rfc_example() {
        // RFC 6455 §5.7: "A single-frame unmasked text message".
        let buf = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let (h, n) = FrameHeader::parse(&buf).unwrap().unwrap();
        assert_eq!(h, FrameHeader { fin: true, opcode: OP_TEXT, mask: None, payload_len: 5 });
        assert_eq!(&buf[n..], b"Hello");
    }

    #[test]
    fn length_encodings_round_trip_at_each_boundary() {
        for (len, header) in [(0, 6), (125, 6), (126, 8), (65535, 8), (65536, 14), (70000, 14)] {
            let payload = vec![b'a'; len];
            let mut out = Vec::new();
            format_frame(OP_BINARY, &payload, Some(KEY), &mut out);
            assert_eq!(out.len(), header + len, "len {len}");
            let (h, n) = FrameHeader::parse(&out).unwrap().unwrap();
            assert_eq!((h.payload_len, n, h.mask), (len as u64, header, Some(KEY)));
            let mut body = out[n..].to_vec();
            apply_mask(&mut body, KEY, 0);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn every_truncated_header_is_incomplete_not_an_error() {
        let mut out = Vec::new();
        format_frame(OP_TEXT, &[b'x'; 70000], Some(KEY), &mut out);
        for cut in 0..14 {
            assert_eq!(FrameHeader::parse(&out[..cut]), Ok(None), "cut {cut}");
        }
        assert!(FrameHeader::parse(&out[..14]).unwrap().is_some());
    }

    #[test]
    fn protocol_violations_are_rejected() {
        assert_eq!(FrameHeader::parse(&[0xC1, 0x00]), Err(ProtocolError::ReservedBits));
        assert_eq!(FrameHeader::parse(&[0x83, 0x00]), Err(ProtocolError::ReservedOpcode));
        assert_eq!(FrameHeader::parse(&[0x89, 126, 0, 126]), Err(ProtocolError::BadControlFrame));
        assert_eq!(FrameHeader::parse(&[0x09, 0x00]), Err(ProtocolError::BadControlFrame));
        let huge = [0x82, 127, 0, 0, 0, 0, 0x10, 0, 0, 1];
        assert_eq!(FrameHeader::parse(&huge), Err(ProtocolError::TooLarge));
    }

    #[test]
    fn mask_at_an_offset_equals_masking_the_whole() {
        let data: Vec<u8> = (0..=255).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, KEY, 0);
        for start in 0..8 {
            let mut part = data[start..].to_vec();
            apply_mask(&mut part, KEY, start);
            assert_eq!(part, whole[start..]);
        }
    }

    #[test]
    fn handshake_request_carries_the_required_headers() {
        let mut out = Vec::new();
        format_handshake("127.0.0.1:8080", "/ws?user=u1", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("GET /ws?user=u1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn handshake_response_is_checked() {
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Accept: {HANDSHAKE_ACCEPT}\r\n\r\n\x01\x00"
        );
        let head_len = ok.len() - 2;
        assert_eq!(parse_handshake_response(ok.as_bytes()), Ok(Some(head_len)));
        assert_eq!(parse_handshake_response(&ok.as_bytes()[..head_len - 1]), Ok(None));
        let busy = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(parse_handshake_response(busy), Err(HandshakeError::Status(503)));
        let wrong = ok.replace(HANDSHAKE_ACCEPT, "AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        assert_eq!(parse_handshake_response(wrong.as_bytes()), Err(HandshakeError::BadHeaders));
        assert_eq!(parse_handshake_response(b"SSH-2.0\r\n\r\n"), Err(HandshakeError::Malformed));
        assert_eq!(parse_handshake_response(&[b'x'; 9000]), Err(HandshakeError::Malformed));
    }
}
