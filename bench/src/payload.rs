//! What the generator sends and how it reads replies without parsing JSON.
//!
//! Out: a [`StampedFrame`] is a whole masked client frame, encoded once, whose
//! JSON payload has fixed-width number slots (`"t"` send time, `"s"` sequence,
//! `"id"`). [`StampedFrame::stamp`] rewrites the slots in place, already
//! masked, so a send costs a few digit writes and one `write(2)`.
//!
//! In: [`Scanner`] finds the event kind (`"ev":"...`), the send time (`"t":`)
//! and the op id (`"id":`) with memmem, whatever the server's field order or
//! whitespace. The payload `data` is `{"t":<ns>,"s":<seq>,"p":"xxx…"}`; the
//! server's own fields (`ev`, `room`, `from`, `data`, `id`) never contain a
//! key named `t`.

use memchr::memmem::Finder;

use crate::ws;

/// Digits of `u64::MAX`: every number slot is this wide; unused digits are
/// spaces, which JSON allows between a value and the next `,` or `}`.
const SLOT_WIDTH: usize = 20;

/// A masked text frame with number slots to fill before each send.
pub struct StampedFrame {
    frame: Vec<u8>,
    /// Where the payload starts in `frame`: slot offsets are payload offsets,
    /// which is what the mask key cycles over.
    payload_at: usize,
    mask: [u8; 4],
    t_at: usize,
    s_at: usize,
    id_at: Option<usize>,
}

/// Builds a JSON payload and records where the number slots are.
struct PayloadBuilder {
    json: Vec<u8>,
}

impl PayloadBuilder {
    fn text(&mut self, s: &str) -> &mut Self {
        self.json.extend_from_slice(s.as_bytes());
        self
    }

    fn slot(&mut self) -> usize {
        let at = self.json.len();
        self.json.extend_from_slice(&[b' '; SLOT_WIDTH]);
        at
    }

    /// `{"t":T,"s":S,"p":"xx…"}`, padded so that it is about `size` bytes.
    fn data(&mut self, size: usize) -> (usize, usize) {
        self.text(r#"{"t":"#);
        let t = self.slot();
        self.text(r#","s":"#);
        let s = self.slot();
        self.text(r#","p":""#);
        let fixed = 2 * SLOT_WIDTH + 18;
        self.json.extend(std::iter::repeat_n(b'x', size.saturating_sub(fixed)));
        self.text(r#""}"#);
        (t, s)
    }
}

impl StampedFrame {
    /// `{"op":"publish","room":ROOM,"data":{...},"id":ID}` with `data` of
    /// about `data_size` bytes. `room` must need no JSON escaping.
    pub fn publish(room: &str, data_size: usize, mask: [u8; 4]) -> Self {
        let mut b = PayloadBuilder { json: Vec::new() };
        b.text(r#"{"op":"publish","room":""#).text(room).text(r#"","data":"#);
        let (t, s) = b.data(data_size);
        b.text(r#","id":"#);
        let id = b.slot();
        b.text("}");
        Self::new(b.json, mask, t, s, Some(id))
    }

    /// `prefix` + `{"t":T,"s":S,"k":K,"p":"xx…"}` + `suffix`, the data about
    /// `data_size` bytes: a peer's publish (see `proto`), whose `k` names the
    /// sender so that it knows its own copy. `stamp(t, seq, sender)` fills it.
    pub fn wrapped(prefix: &str, suffix: &str, data_size: usize, mask: [u8; 4]) -> Self {
        let mut b = PayloadBuilder { json: Vec::new() };
        b.text(prefix).text(r#"{"t":"#);
        let t = b.slot();
        b.text(r#","s":"#);
        let s = b.slot();
        b.text(r#","k":"#);
        let k = b.slot();
        b.text(r#","p":""#);
        let fixed = 3 * SLOT_WIDTH + 23;
        b.json.extend(std::iter::repeat_n(b'x', data_size.saturating_sub(fixed)));
        b.text(r#""}"#).text(suffix);
        Self::new(b.json, mask, t, s, Some(k))
    }

    /// The bare `data` object, for `/echo`, which returns it unchanged.
    pub fn echo(data_size: usize, mask: [u8; 4]) -> Self {
        let mut b = PayloadBuilder { json: Vec::new() };
        let (t, s) = b.data(data_size);
        Self::new(b.json, mask, t, s, None)
    }

    fn new(payload: Vec<u8>, mask: [u8; 4], t_at: usize, s_at: usize, id_at: Option<usize>) -> Self {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        ws::format_frame(ws::OP_TEXT, &payload, Some(mask), &mut frame);
        let payload_at = frame.len() - payload.len();
        StampedFrame { frame, payload_at, mask, t_at, s_at, id_at }
    }

    /// Fills the slots and returns the frame, ready to write.
    pub fn stamp(&mut self, t: u64, seq: u64, id: u64) -> &[u8] {
        self.fill(self.t_at, t);
        self.fill(self.s_at, seq);
        if let Some(at) = self.id_at {
            self.fill(at, id);
        }
        &self.frame
    }

    /// Writes `value` left-aligned, space-padded, masked, at payload offset `at`.
    fn fill(&mut self, at: usize, value: u64) {
        let mut slot = [b' '; SLOT_WIDTH];
        let mut digits = [0u8; SLOT_WIDTH];
        let (mut n, mut v) = (0, value);
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for i in 0..n {
            slot[i] = digits[n - 1 - i];
        }
        ws::apply_mask(&mut slot, self.mask, at);
        let start = self.payload_at + at;
        self.frame[start..start + SLOT_WIDTH].copy_from_slice(&slot);
    }
}

/// The server event a text frame carries, from the value of `"ev"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Message,
    Ack,
    Subscribed,
    Pong,
    Error,
    Maintenance,
    /// No `"ev"`, or one this generator does not know (e.g. `direct`).
    Other,
}

/// Precompiled searchers for the few keys the receive path looks at.
pub struct Scanner {
    ev: Finder<'static>,
    t: Finder<'static>,
    id: Finder<'static>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner { ev: Finder::new(br#""ev""#), t: Finder::new(br#""t""#), id: Finder::new(br#""id""#) }
    }
}

impl Scanner {
    pub fn event(&self, json: &[u8]) -> Event {
        let Some(value) = after_key(&self.ev, json) else {
            return Event::Other;
        };
        let word = |w: &[u8]| value.len() > w.len() && value[0] == b'"' && value[1..].starts_with(w);
        if word(b"message\"") {
            Event::Message
        } else if word(b"ack\"") {
            Event::Ack
        } else if word(b"subscribed\"") {
            Event::Subscribed
        } else if word(b"pong\"") {
            Event::Pong
        } else if word(b"error\"") {
            Event::Error
        } else if word(b"maintenance\"") {
            Event::Maintenance
        } else {
            Event::Other
        }
    }

    /// The send timestamp of a delivered payload, if it has one.
    pub fn timestamp(&self, json: &[u8]) -> Option<u64> {
        parse_u64(after_key(&self.t, json)?)
    }

    /// The numeric `"id"` of a reply, if it has one.
    pub fn id(&self, json: &[u8]) -> Option<u64> {
        parse_u64(after_key(&self.id, json)?)
    }
}

/// The value after the first `"key"` that is followed by a colon (so a
/// string value `"t"` is skipped), whitespace around the colon skipped.
pub(crate) fn after_key<'a>(key: &Finder<'_>, json: &'a [u8]) -> Option<&'a [u8]> {
    let skip_ws = |s: &'a [u8]| &s[s.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
    key.find_iter(json).find_map(|at| {
        let rest = skip_ws(&json[at + key.needle().len()..]);
        rest.strip_prefix(b":").map(skip_ws)
    })
}

/// Leading decimal digits as a u64; `None` without digits or on overflow.
pub(crate) fn parse_u64(bytes: &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    let mut digits = 0;
    for &b in bytes.iter().take_while(|b| b.is_ascii_digit()) {
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0xA1, 0x5B, 0x3C, 0xD7];

    /// Unmasks a frame made by `format_frame` and returns its payload.
    fn payload_of(frame: &[u8]) -> Vec<u8> {
        let (h, n) = ws::FrameHeader::parse(frame).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.mask), (true, ws::OP_TEXT, Some(MASK)));
        assert_eq!(h.payload_len as usize, frame.len() - n);
        let mut p = frame[n..].to_vec();
        ws::apply_mask(&mut p, MASK, 0);
        p
    }

    #[test]
    fn stamped_publish_is_valid_json_with_the_stamped_values() {
        let mut f = StampedFrame::publish("room-7", 200, MASK);
        for (t, s, id) in [(0, 0, 0), (1_700_000_000_123_456_789, 42, 7), (u64::MAX, u64::MAX, 99)] {
            let json = payload_of(f.stamp(t, s, id));
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            assert_eq!(v["op"], "publish");
            assert_eq!(v["room"], "room-7");
            assert_eq!(v["data"]["t"], t);
            assert_eq!(v["data"]["s"], s);
            assert_eq!(v["id"], id);
        }
    }

    #[test]
    fn data_is_padded_to_the_requested_size() {
        assert_eq!(payload_of(StampedFrame::echo(200, MASK).stamp(1, 2, 3)).len(), 200);
        assert_eq!(payload_of(StampedFrame::echo(4096, MASK).stamp(1, 2, 3)).len(), 4096);
        // Below the fixed part (two 20-byte slots and the keys) nothing is cut.
        assert_eq!(payload_of(StampedFrame::echo(10, MASK).stamp(1, 2, 3)).len(), 58);
    }

    #[test]
    fn restamping_a_shorter_number_leaves_no_old_digits() {
        let mut f = StampedFrame::echo(64, MASK);
        f.stamp(123_456_789, 555, 0);
        let json = payload_of(f.stamp(5, 6, 0));
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!((v["t"].as_u64(), v["s"].as_u64()), (Some(5), Some(6)));
    }

    #[test]
    fn scanner_reads_a_delivery_in_any_layout() {
        let sc = Scanner::default();
        let compact = br#"{"ev":"message","room":"r1","from":"u1","data":{"t":123456,"s":1,"p":"xx"}}"#;
        let spaced = br#"{ "room" : "r1", "data" : { "s" : 1, "t" :  987 }, "ev" : "message" }"#;
        let padded = br#"{"ev":"message","data":{"t":42                  ,"s":0}}"#;
        let t_as_value = br#"{"ev":"message","from":"t","data":{"t":7}}"#;
        assert_eq!(sc.timestamp(t_as_value), Some(7));
        assert_eq!((sc.event(compact), sc.timestamp(compact)), (Event::Message, Some(123456)));
        assert_eq!((sc.event(spaced), sc.timestamp(spaced)), (Event::Message, Some(987)));
        assert_eq!(sc.timestamp(padded), Some(42));
    }

    #[test]
    fn scanner_classifies_replies_and_reads_ids() {
        let sc = Scanner::default();
        let ack = br#"{"ev":"ack","id":17}"#;
        assert_eq!((sc.event(ack), sc.id(ack)), (Event::Ack, Some(17)));
        assert_eq!(sc.event(br#"{"ev":"subscribed","room":"r","id":1}"#), Event::Subscribed);
        assert_eq!(sc.event(br#"{"ev":"pong","id":3}"#), Event::Pong);
        assert_eq!(sc.event(br#"{"ev":"error","code":"bad_room"}"#), Event::Error);
        assert_eq!(sc.event(br#"{"ev":"maintenance","reconnect_in_ms":5}"#), Event::Maintenance);
        assert_eq!(sc.event(br#"{"ev":"direct","from":"x"}"#), Event::Other);
        assert_eq!(sc.event(br#"{"ev":"ack"#), Event::Other);
    }

    #[test]
    fn scanner_returns_none_for_missing_or_broken_numbers() {
        let sc = Scanner::default();
        assert_eq!(sc.timestamp(br#"{"ev":"message","data":1}"#), None);
        assert_eq!(sc.timestamp(br#"{"t":"text"}"#), None);
        assert_eq!(sc.timestamp(br#"{"t":"#), None);
        assert_eq!(sc.timestamp(br#"{"t":99999999999999999999999}"#), None);
        assert_eq!(sc.id(br#"{"ev":"ack","id":"abc"}"#), None);
    }
}
