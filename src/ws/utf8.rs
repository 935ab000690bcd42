//! Incremental UTF-8 validation of a text message that arrives in fragments
//! (RFC 6455 §8.1: fail fast, as soon as the bytes so far cannot be valid).

/// The bytes can never become valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Tracks how much of a growing message buffer is known to be valid UTF-8.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Check {
    valid_up_to: usize,
}

impl Utf8Check {
    /// Checks the bytes of `buf` not yet checked. `Err` means no continuation
    /// can make the buffer valid; `Ok` may leave an incomplete code point at
    /// the end for the next fragment to finish.
    pub fn feed(&mut self, buf: &[u8]) -> Result<(), InvalidUtf8> {
        match simdutf8::compat::from_utf8(&buf[self.valid_up_to..]) {
            Ok(_) => {
                self.valid_up_to = buf.len();
                Ok(())
            }
            Err(e) => {
                // error_len() == None: the input ends in the middle of a code
                // point, which a later fragment may complete.
                if e.error_len().is_some() {
                    return Err(InvalidUtf8);
                }
                self.valid_up_to += e.valid_up_to();
                Ok(())
            }
        }
    }

    /// Is the whole of `buf` (already fed) complete, valid UTF-8?
    pub fn is_complete(&self, buf: &[u8]) -> bool {
        self.valid_up_to == buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_code_point_is_accepted_then_completed() {
        let text = "κόσμε".as_bytes();
        let mut c = Utf8Check::default();
        assert!(c.feed(&text[..1]).is_ok());
        assert!(!c.is_complete(&text[..1]));
        assert!(c.feed(text).is_ok());
        assert!(c.is_complete(text));
    }

    #[test]
    fn invalid_byte_fails_fast() {
        let mut c = Utf8Check::default();
        assert!(c.feed(b"ab\xff").is_err());
        let mut c = Utf8Check::default();
        // 0xF4 0x90 is past U+10FFFF: invalid however it continues.
        assert!(c.feed(b"\xf4\x90").is_err());
    }
}
