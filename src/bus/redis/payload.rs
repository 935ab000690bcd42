//! The reader's check of what Redis hands it (PROTOCOL.md §3): a payload is
//! forwarded only if it is the JSON text of the event its channel carries,
//! parsed with simd-json (buffers kept from one message to the next), with
//! a room message's history position when it has one; anything else is
//! dropped, with a warning at most once a second (`DropLog`).

use std::time::{Duration, Instant};

use simd_json::prelude::*;
use tracing::warn;

use super::subs::Kind;

/// Why a message from Redis was dropped: whoever published it (a backend, a
/// misconfigured node) broke PROTOCOL.md §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    TooLarge,
    NotJson,
    NotAnObject,
    /// `ev` is not `message` (room channel) or `direct` (user channel).
    WrongEvent,
    /// A `message` whose `room` is not the channel's room.
    WrongRoom,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Malformed::TooLarge => "larger than --outbound-queue-bytes",
            Malformed::NotJson => "not JSON (or not UTF-8)",
            Malformed::NotAnObject => "not a JSON object",
            Malformed::WrongEvent => "`ev` is not `message` (room channel) or `direct` (user channel)",
            Malformed::WrongRoom => "`room` does not match the channel",
        })
    }
}

/// simd-json's parse, with its buffers kept from one message to the next.
#[derive(Default)]
pub struct JsonCheck {
    /// simd-json parses in place; the payload (shared, read-only) is copied here.
    scratch: Vec<u8>,
    buffers: simd_json::Buffers,
}

impl JsonCheck {
    /// Is `payload` the event a `kind` channel named `name` carries?
    pub fn check(&mut self, kind: Kind, name: &str, payload: &[u8], max: usize) -> Result<(), Malformed> {
        self.check_with_position(kind, name, payload, max).map(|_| ())
    }

    /// `check`, and for a room message with history (PROTOCOL.md §7) its
    /// `epoch` and `offset`. A message without them (a backend's raw
    /// PUBLISH) has no position and is delivered as before; one with an
    /// `offset` that is not an unsigned integer or an `epoch` that is not a
    /// string of at most 64 bytes is treated as having none.
    pub fn check_with_position(
        &mut self,
        kind: Kind,
        name: &str,
        payload: &[u8],
        max: usize,
    ) -> Result<Option<crate::protocol::Position>, Malformed> {
        // The frame the shard would queue (payload + WebSocket header), as
        // `--outbound-queue-bytes` counts it.
        if crate::ws::frame::header_len(payload.len()) + payload.len() > max {
            return Err(Malformed::TooLarge);
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        let tape =
            simd_json::to_tape_with_buffers(&mut self.scratch, &mut self.buffers).map_err(|_| Malformed::NotJson)?;
        let value = tape.as_value();
        let obj = value.as_object().ok_or(Malformed::NotAnObject)?;
        let is = |key: &str, want: &str| obj.get(key).is_some_and(|v| v.as_str() == Some(want));
        match kind {
            // A room carries messages, and the presence events of §11.
            Kind::Room if !(is("ev", "message") || is("ev", "join") || is("ev", "leave")) => Err(Malformed::WrongEvent),
            Kind::Room if !is("room", name) => Err(Malformed::WrongRoom),
            Kind::Room if !is("ev", "message") => Ok(None),
            // A user gets direct messages, and the server's disconnect (§12).
            // The census's control channels (`services::census`) are
            // pseudo-users no client can be ('#' is not in a user id).
            Kind::User if name.starts_with('#') && (is("ev", "census") || is("ev", "census_reply")) => Ok(None),
            Kind::User
                if !(is("ev", "direct")
                    || is("ev", "disconnect")
                    || is("ev", "server_subscribe")
                    || is("ev", "server_unsubscribe")) =>
            {
                Err(Malformed::WrongEvent)
            }
            Kind::User => Ok(None),
            Kind::Room => {
                let offset = obj.get("offset").and_then(|v| v.as_u64());
                let epoch = obj.get("epoch").and_then(|v| v.as_str().and_then(crate::protocol::Epoch::new));
                Ok(offset.zip(epoch).map(|(offset, epoch)| crate::protocol::Position { epoch, offset }))
            }
        }
    }
}

/// Warns about dropped messages at most once a second, with a count of the
/// ones not logged in between.
#[derive(Default)]
pub(super) struct DropLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl DropLog {
    pub(super) fn dropped(&mut self, shard: usize, channel: &[u8], why: Malformed) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < Duration::from_secs(1)) {
            self.suppressed += 1;
            return;
        }
        warn!(
            shard,
            channel = %String::from_utf8_lossy(channel),
            reason = %why,
            not_logged_since_last = self.suppressed,
            "dropping a malformed message from Redis"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_checked_against_their_channel() {
        let mut j = JsonCheck::default();
        let ok = br#"{"ev":"message","room":"lobby","from":"backend","data":1}"#;
        assert_eq!(j.check(Kind::Room, "lobby", ok, 1 << 20), Ok(()));
        assert_eq!(j.check(Kind::Room, "other", ok, 1 << 20), Err(Malformed::WrongRoom));
        assert_eq!(j.check(Kind::User, "u1", ok, 1 << 20), Err(Malformed::WrongEvent));
        assert_eq!(j.check(Kind::User, "u1", br#"{"ev":"direct","from":"a","data":[1]}"#, 1 << 20), Ok(()));
        let join = br#"{"ev":"join","room":"lobby","user":"u","offset":3,"epoch":"e"}"#;
        assert_eq!(j.check_with_position(Kind::Room, "lobby", join, 1 << 20), Ok(None), "presence: no position");
        let bad = br#"{"ev":"join","room":"other","user":"u"}"#;
        assert_eq!(j.check(Kind::Room, "lobby", bad, 1 << 20), Err(Malformed::WrongRoom));
        assert_eq!(j.check(Kind::Room, "lobby", b"{\"ev\":\"message\",", 1 << 20), Err(Malformed::NotJson));
        assert_eq!(j.check(Kind::Room, "lobby", b"not json", 1 << 20), Err(Malformed::NotJson));
        assert_eq!(j.check(Kind::Room, "lobby", b"[1,2]", 1 << 20), Err(Malformed::NotAnObject));
        assert_eq!(
            j.check(Kind::Room, "lobby", b"{\"ev\":\"message\",\"room\":\"lobby\",\"x\":\"\xff\"}", 1 << 20),
            Err(Malformed::NotJson)
        );
        assert_eq!(j.check(Kind::Room, "lobby", ok, 10), Err(Malformed::TooLarge));
        // The buffers are reused: a valid one after invalid ones still passes.
        assert_eq!(j.check(Kind::Room, "lobby", ok, 1 << 20), Ok(()));
    }

    #[test]
    fn history_messages_pass_their_position_and_raw_ones_have_none() {
        let mut j = JsonCheck::default();
        let raw = br#"{"ev":"message","room":"r","from":"backend","data":1}"#;
        assert_eq!(j.check_with_position(Kind::Room, "r", raw, 1 << 20), Ok(None));
        let hist = br#"{"ev":"message","room":"r","from":"u","data":{"offset":1},"epoch":"e1","offset":42}"#;
        let pos = j.check_with_position(Kind::Room, "r", hist, 1 << 20).unwrap().unwrap();
        assert_eq!((pos.epoch.as_str(), pos.offset), ("e1", 42));
        let bad = br#"{"ev":"message","room":"r","from":"u","data":1,"epoch":"e1","offset":-3}"#;
        assert_eq!(j.check_with_position(Kind::Room, "r", bad, 1 << 20), Ok(None));
    }

    /// The same check with serde_json (borrowed fields, the rest skipped
    /// and validated by `IgnoredAny`), for the measurement below.
    fn serde_check(kind: Kind, name: &str, payload: &[u8]) -> Result<Option<(String, u64)>, Malformed> {
        #[derive(serde::Deserialize)]
        struct Probe<'a> {
            #[serde(borrow)]
            ev: Option<std::borrow::Cow<'a, str>>,
            #[serde(borrow)]
            room: Option<std::borrow::Cow<'a, str>>,
            #[serde(borrow)]
            epoch: Option<std::borrow::Cow<'a, str>>,
            offset: Option<serde_json::Value>,
        }
        let p: Probe<'_> = serde_json::from_slice(payload).map_err(|_| Malformed::NotJson)?;
        let want = if kind == Kind::Room { "message" } else { "direct" };
        if p.ev.as_deref() != Some(want) {
            return Err(Malformed::WrongEvent);
        }
        if kind == Kind::Room && p.room.as_deref() != Some(name) {
            return Err(Malformed::WrongRoom);
        }
        Ok(p.epoch.zip(p.offset.and_then(|o| o.as_u64())).map(|(e, o)| (e.into_owned(), o)))
    }

    /// A room message of about `size` bytes: a chat/ticker-like `data`
    /// object with strings, numbers and a nested array, as backends publish.
    fn payload(size: usize) -> Vec<u8> {
        let mut items = Vec::new();
        let mut i = 0;
        loop {
            items.push(serde_json::json!({"id": i, "sym": format!("S{i:04}"), "px": 101.25 + i as f64,
                "qty": i * 7, "text": "the quick brown fox jumps", "tags": ["a", "b", i]}));
            let v = serde_json::json!({"ev":"message","room":"lobby","from":"backend","data":{"items":items},
                "epoch":"abc-1796124832349700","offset":12345});
            let out = serde_json::to_vec(&v).unwrap();
            if out.len() >= size || i > 10_000 {
                return out;
            }
            i += 1;
        }
    }

    /// A chat-like room message of about `size` bytes: mostly text.
    fn text_payload(size: usize) -> Vec<u8> {
        let words = "the quick brown fox jumps over the lazy dog, \"quoted\" and caf\u{e9} ";
        let mut text = String::new();
        loop {
            let v = serde_json::json!({"ev":"message","room":"lobby","from":"backend",
                "data":{"user":"alice","ts":1796124832,"text":text},"epoch":"abc-1796124832349700","offset":12345});
            let out = serde_json::to_vec(&v).unwrap();
            if out.len() >= size {
                return out;
            }
            text.push_str(words);
        }
    }

    /// Measurement (bench/RESULTS.md), not run by default: simd-json (what
    /// the reader uses) vs serde_json for the reader's per-message check,
    /// on number-heavy (ticker) and text-heavy (chat) payloads.
    /// `cargo test --release --lib -- --ignored --nocapture json_check_simd_vs_serde`
    #[test]
    #[ignore]
    fn json_check_simd_vs_serde() {
        let mut j = JsonCheck::default();
        type Shape = (&'static str, fn(usize) -> Vec<u8>);
        let shapes: [Shape; 2] = [("ticker", payload), ("chat", text_payload)];
        for (shape, size) in
            shapes.iter().flat_map(|s| [100, 300, 600, 1024, 4096, 16 * 1024, 64 * 1024].map(|n| (s, n)))
        {
            let p = (shape.1)(size);
            assert_eq!(
                j.check_with_position(Kind::Room, "lobby", &p, usize::MAX).unwrap().map(|x| x.offset),
                serde_check(Kind::Room, "lobby", &p).unwrap().map(|x| x.1),
                "same answer"
            );
            let iters = (64 << 20) / p.len();
            let time = |f: &mut dyn FnMut()| {
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = Instant::now();
                    for _ in 0..iters {
                        f();
                    }
                    best = best.min(t.elapsed().as_secs_f64() / iters as f64);
                }
                best
            };
            let simd = time(&mut || {
                std::hint::black_box(j.check_with_position(Kind::Room, "lobby", std::hint::black_box(&p), usize::MAX))
                    .unwrap();
            });
            let serde = time(&mut || {
                std::hint::black_box(serde_check(Kind::Room, "lobby", std::hint::black_box(&p))).unwrap();
            });
            println!(
                "FIGURE json check {} {} B: simd-json {:.0} ns ({:.2} GB/s), serde_json {:.0} ns ({:.2} GB/s), serde/simd {:.2}",
                shape.0,
                p.len(),
                simd * 1e9,
                p.len() as f64 / simd / 1e9,
                serde * 1e9,
                p.len() as f64 / serde / 1e9,
                serde / simd
            );
        }
    }
}
