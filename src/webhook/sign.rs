//! The webhook signature (PROTOCOL.md §11): `X-Corecast-Signature:
//! t=<unix secs>,v1=<lowercase hex HMAC-SHA256 of "<t>.<body>">`, keyed with
//! `--webhook-secret`. The receiver recomputes it over the body bytes it
//! got and compares in constant time; `t` lets it refuse old replays.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header's name.
pub const SIGNATURE_HEADER: &str = "X-Corecast-Signature";

/// The header's value for `body` sent at `t` (Unix seconds).
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // HMAC takes a key of any length (longer ones are hashed first).
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    let t = t.to_string();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(8 + t.len() + 2 * tag.len());
    out.push_str("t=");
    out.push_str(&t);
    out.push_str(",v1=");
    for b in tag {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value Python's `hmac.new(b"s3cret", b"1700000000." + body,
    /// hashlib.sha256).hexdigest()` gives for this body.
    #[test]
    fn matches_an_independent_computation() {
        let body = br#"{"events":[{"event":"user_online","user":"u1","at_ms":1700000000123}]}"#;
        assert_eq!(
            signature(b"s3cret", 1_700_000_000, body),
            "t=1700000000,v1=12c71018758d34aa5a017b3cbda9ac6e1497dad26f19c73107a74abc3f661809"
        );
        assert_ne!(signature(b"other", 1_700_000_000, body), signature(b"s3cret", 1_700_000_000, body));
        assert_ne!(signature(b"s3cret", 1_700_000_001, body), signature(b"s3cret", 1_700_000_000, body));
    }
}
