//! Close frames (RFC 6455 §5.5.1, §7.4): status codes, validation of what a
//! client sends, formatting of what the server sends.

use bytes::Bytes;

use super::frame::{OpCode, ProtocolError, encode};

/// A close status code (RFC 6455 §7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL: CloseCode = CloseCode(1002);
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub const POLICY: CloseCode = CloseCode(1008);
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    pub const INTERNAL: CloseCode = CloseCode(1011);

    /// The code a connection is closed with for a protocol fault.
    pub fn for_error(e: ProtocolError) -> CloseCode {
        match e {
            ProtocolError::InvalidUtf8 | ProtocolError::BadDeflate => CloseCode::INVALID_PAYLOAD,
            ProtocolError::TooLarge => CloseCode::TOO_BIG,
            _ => CloseCode::PROTOCOL,
        }
    }

    /// May a peer send this code in a close frame? 1004-1006 and 1015 are
    /// reserved (§7.4.1), 1016-2999 belong to future revisions and extensions,
    /// 3000-4999 to libraries and applications (§7.4.2).
    pub fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Validates a client close frame's body: returns the code to echo back.
///
/// An empty body means "no status code" and is answered with 1000.
pub fn parse(body: &[u8]) -> Result<CloseCode, ProtocolError> {
    match body.len() {
        0 => Ok(CloseCode::NORMAL),
        // If there is a body, the first two bytes of the body MUST be a
        // 2-byte unsigned integer. (RFC 6455 §5.5.1)
        1 => Err(ProtocolError::BadClose),
        _ => {
            let code = CloseCode(u16::from_be_bytes([body[0], body[1]]));
            if !code.is_sendable() {
                return Err(ProtocolError::BadClose);
            }
            // The data MAY contain a UTF-8 encoded reason. (§5.5.1); invalid
            // UTF-8 there fails the connection like any text (§8.1).
            if simdutf8::basic::from_utf8(&body[2..]).is_err() {
                return Err(ProtocolError::InvalidUtf8);
            }
            Ok(code)
        }
    }
}

/// A server close frame with `code` and no reason.
pub fn frame(code: CloseCode) -> Bytes {
    encode(OpCode::Close, &code.0.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_codes_like_autobahn_7_7_and_7_9() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
            assert_eq!(parse(&u16::to_be_bytes(ok)), Ok(CloseCode(ok)));
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert_eq!(parse(&u16::to_be_bytes(bad)), Err(ProtocolError::BadClose), "{bad}");
        }
    }

    #[test]
    fn empty_body_one_byte_body_and_bad_reason() {
        assert_eq!(parse(b""), Ok(CloseCode::NORMAL));
        assert_eq!(parse(b"\x03"), Err(ProtocolError::BadClose));
        assert_eq!(parse(b"\x03\xe8\xff"), Err(ProtocolError::InvalidUtf8));
        assert_eq!(parse(b"\x03\xe8bye"), Ok(CloseCode::NORMAL));
        assert_eq!(&frame(CloseCode::GOING_AWAY)[..], &[0x88, 2, 0x03, 0xe9]);
    }
}
