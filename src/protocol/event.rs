//! Server → client events (PROTOCOL.md §2), encoded straight into a complete
//! WebSocket text frame.
//!
//! Each builder writes the JSON after `HEADROOM` spare bytes and then fills
//! the frame header in front of it, so an event costs one allocation and no
//! copy; a room message is built once and the same `Bytes` is queued to every
//! subscriber (and, on the Redis bus, its JSON part is what gets published).

use bytes::{BufMut, Bytes, BytesMut};

use super::ErrorCode;
use crate::protocol::Position;
use crate::ws::frame::{HEADROOM, OpCode, encode_with_headroom};

/// A JSON text being built behind room for its frame header.
struct Builder(BytesMut);

impl Builder {
    fn new(capacity: usize) -> Builder {
        let mut b = BytesMut::with_capacity(HEADROOM + capacity);
        b.put_bytes(0, HEADROOM);
        Builder(b)
    }
    fn raw(mut self, s: &str) -> Self {
        self.0.put_slice(s.as_bytes());
        self
    }
    /// A JSON string literal, escaped as JSON requires.
    fn string(mut self, s: &str) -> Self {
        // Writing into a BytesMut cannot fail.
        serde_json::to_writer((&mut self.0).writer(), s).expect("write to memory");
        self
    }
    fn id(self, id: Option<&str>) -> Self {
        match id {
            // A reply to the server API, not to an op (`SERVER_REPLY`).
            Some(SERVER_REPLY) => self.raw(",\"server\":true"),
            Some(id) => self.raw(",\"id\":").raw(id),
            None => self,
        }
    }
    fn frame(self) -> Bytes {
        encode_with_headroom(self.raw_close(), OpCode::Text)
    }
    fn raw_close(mut self) -> BytesMut {
        self.0.put_u8(b'}');
        self.0
    }
}

/// `{"ev":"message","room":R,"from":U,"data":D}` — `data` is raw JSON text.
pub fn message(room: &str, from: &str, data: &str) -> Bytes {
    Builder::new(40 + room.len() + from.len() + data.len())
        .raw("{\"ev\":\"message\",\"room\":")
        .string(room)
        .raw(",\"from\":")
        .string(from)
        .raw(",\"data\":")
        .raw(data)
        .frame()
}

/// A `message` event of a room with history, still open: everything up to
/// and including `data`, waiting for the `epoch` and `offset` that the
/// room's one authority assigns (the owner shard, or the Redis script). It
/// is built once where the op arrived; `data` is never re-encoded.
#[derive(Debug)]
pub struct MessagePrefix(BytesMut);

/// `{"ev":"message","room":R,"from":U,"data":D` — see `MessagePrefix`.
pub fn message_prefix(room: &str, from: &str, data: &str) -> MessagePrefix {
    let b = Builder::new(100 + room.len() + from.len() + data.len())
        .raw("{\"ev\":\"message\",\"room\":")
        .string(room)
        .raw(",\"from\":")
        .string(from)
        .raw(",\"data\":")
        .raw(data);
    MessagePrefix(b.0)
}

impl MessagePrefix {
    /// The JSON text so far (what the Redis script completes).
    pub fn json(&self) -> &[u8] {
        &self.0[HEADROOM..]
    }

    /// Closes it with `,"epoch":E,"offset":N}`: the complete frame.
    pub fn finish(self, pos: &Position) -> Bytes {
        Builder(self.0)
            .raw(",\"epoch\":")
            .string(pos.epoch.as_str())
            .raw(",\"offset\":")
            .raw(&pos.offset.to_string())
            .frame()
    }
}

/// `subscribed` of a room with history (§7): the position the subscription
/// took effect at, and with `since`, whether the history covered it.
pub fn subscribed(room: &str, id: Option<&str>, pos: &Position, recovered: Option<bool>) -> Bytes {
    let b = Builder::new(120 + room.len()).raw("{\"ev\":\"subscribed\",\"room\":").string(room).id(id);
    let b = match recovered {
        Some(r) => b.raw(if r { ",\"recovered\":true" } else { ",\"recovered\":false" }),
        None => b,
    };
    b.raw(",\"epoch\":").string(pos.epoch.as_str()).raw(",\"offset\":").raw(&pos.offset.to_string()).frame()
}

/// `subscribed` with `"recovered":false` and no position: `since` given
/// while history is off.
pub fn subscribed_unrecovered(room: &str, id: Option<&str>) -> Bytes {
    Builder::new(64 + room.len())
        .raw("{\"ev\":\"subscribed\",\"room\":")
        .string(room)
        .id(id)
        .raw(",\"recovered\":false")
        .frame()
}

/// `{"ev":"gap","room":R,"epoch":E,"offset":T}` (§7 catch-up).
pub fn gap(room: &str, pos: &Position) -> Bytes {
    Builder::new(100 + room.len())
        .raw("{\"ev\":\"gap\",\"room\":")
        .string(room)
        .raw(",\"epoch\":")
        .string(pos.epoch.as_str())
        .raw(",\"offset\":")
        .raw(&pos.offset.to_string())
        .frame()
}

/// One message of a `history` reply: raw JSON `from` and `data`.
pub struct HistoryItem<'a> {
    pub offset: u64,
    pub from: &'a str,
    pub data: &'a str,
}

/// `{"ev":"history","room":R,"epoch":E,"offset":T,"messages":[{"offset":..,"from":..,"data":..},…],"id":..}`,
/// with `"more":true` when the reply was cut to a page (the client asks
/// again with `since` at the last offset listed).
pub fn history(room: &str, pos: &Position, items: &[HistoryItem<'_>], more: bool, id: Option<&str>) -> Bytes {
    let size: usize = items.iter().map(|i| 40 + i.from.len() + i.data.len()).sum();
    let mut b = Builder::new(120 + room.len() + size)
        .raw("{\"ev\":\"history\",\"room\":")
        .string(room)
        .raw(",\"epoch\":")
        .string(pos.epoch.as_str())
        .raw(",\"offset\":")
        .raw(&pos.offset.to_string())
        .raw(",\"messages\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            b = b.raw(",");
        }
        b = b
            .raw("{\"offset\":")
            .raw(&item.offset.to_string())
            .raw(",\"from\":")
            .raw(item.from)
            .raw(",\"data\":")
            .raw(item.data)
            .raw("}");
    }
    b = b.raw("]");
    if more {
        b = b.raw(",\"more\":true");
    }
    b.id(id).frame()
}

/// `{"ev":"direct","from":U,"data":D}` — `data` is raw JSON text.
pub fn direct(from: &str, data: &str) -> Bytes {
    Builder::new(32 + from.len() + data.len())
        .raw("{\"ev\":\"direct\",\"from\":")
        .string(from)
        .raw(",\"data\":")
        .raw(data)
        .frame()
}

/// `subscribed` / `unsubscribed` with their room.
pub fn membership(ev: &'static str, room: &str, id: Option<&str>) -> Bytes {
    Builder::new(48 + room.len()).raw("{\"ev\":\"").raw(ev).raw("\",\"room\":").string(room).id(id).frame()
}

/// `{"ev":"presence","room":R,"clients":C,"users":N,"members":[{"user":U,"clients":k},…],"next":U,"id":..}`
/// (§11); with `stats`, `presence_stats` without `members` and `next`.
pub fn presence(room: &str, page: &super::presence::Page, stats: bool, id: Option<&str>) -> Bytes {
    let size: usize = page.members.iter().map(|(u, _)| 32 + u.len()).sum();
    let mut b = Builder::new(120 + room.len() + size)
        .raw(if stats { "{\"ev\":\"presence_stats\",\"room\":" } else { "{\"ev\":\"presence\",\"room\":" })
        .string(room)
        .raw(",\"clients\":")
        .raw(&page.clients.to_string())
        .raw(",\"users\":")
        .raw(&page.users.to_string());
    if !stats {
        b = b.raw(",\"members\":[");
        for (i, (user, clients)) in page.members.iter().enumerate() {
            b = b.raw(if i == 0 { "{\"user\":" } else { ",{\"user\":" });
            b = b.string(user).raw(",\"clients\":").raw(&clients.to_string()).raw("}");
        }
        b = b.raw("]");
        if let Some(next) = &page.next {
            b = b.raw(",\"next\":").string(next);
        }
    }
    b.id(id).frame()
}

/// `{"ev":"join","room":R,"user":U}` or `leave` (§11).
pub fn join_leave(ev: &'static str, room: &str, user: &str) -> Bytes {
    Builder::new(48 + room.len() + user.len())
        .raw("{\"ev\":\"")
        .raw(ev)
        .raw("\",\"room\":")
        .string(room)
        .raw(",\"user\":")
        .string(user)
        .frame()
}

/// Passed where a reply takes an op's `id`, it writes `"server":true`
/// instead: the `subscribed`/`unsubscribed` of `POST /api/subscribe` and
/// `/api/unsubscribe` (§12). An op's id is JSON text, which never holds a
/// raw NUL, so no client id can be taken for it.
pub const SERVER_REPLY: &str = "\0server";

/// What `POST /api/subscribe` and `/api/unsubscribe` send on the user's
/// channel, for every node that holds the user to act on (never delivered
/// to a client as such).
#[derive(Debug, PartialEq, Eq)]
pub struct ServerMembership {
    pub subscribe: bool,
    pub room: String,
    pub since: Option<Position>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ControlWire {
    ev: String,
    room: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<SinceWire>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SinceWire {
    epoch: String,
    offset: u64,
}

const SERVER_SUBSCRIBE: &str = "server_subscribe";
const SERVER_UNSUBSCRIBE: &str = "server_unsubscribe";

/// The frame of a `ServerMembership`.
pub fn server_membership(m: &ServerMembership) -> Bytes {
    let w = ControlWire {
        ev: if m.subscribe { SERVER_SUBSCRIBE } else { SERVER_UNSUBSCRIBE }.to_string(),
        room: m.room.clone(),
        since: m.since.map(|p| SinceWire { epoch: p.epoch.as_str().to_string(), offset: p.offset }),
    };
    frame_json(&serde_json::to_vec(&w).expect("serialize to memory"))
}

/// A `ServerMembership` frame, read back; `None` for any other event.
pub fn parse_server_membership(frame: &[u8]) -> Option<ServerMembership> {
    let json = json_in(frame);
    if !json.starts_with(b"{\"ev\":\"server_") {
        return None;
    }
    let w: ControlWire = serde_json::from_slice(json).ok()?;
    let subscribe = match w.ev.as_str() {
        SERVER_SUBSCRIBE => true,
        SERVER_UNSUBSCRIBE => false,
        _ => return None,
    };
    if !super::is_valid_name(&w.room) {
        return None;
    }
    let since = match w.since {
        Some(s) => Some(Position { epoch: crate::protocol::Epoch::new(&s.epoch)?, offset: s.offset }),
        None => None,
    };
    Some(ServerMembership { subscribe, room: w.room, since })
}

/// `{"ev":"disconnect","code":C,"reason":S}` (§12): sent to every
/// connection of a user, each then closed with status C.
pub fn disconnect(code: u16, reason: &str) -> Bytes {
    Builder::new(64 + reason.len()).raw(DISCONNECT).raw(&code.to_string()).raw(",\"reason\":").string(reason).frame()
}

const DISCONNECT: &str = "{\"ev\":\"disconnect\",\"code\":";

/// The close status of a frame built by `disconnect` (or arrived from the
/// backplane as one): `None` for any other event.
pub fn disconnect_code(frame: &[u8]) -> Option<u16> {
    let rest = json_in(frame).strip_prefix(DISCONNECT.as_bytes())?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok().filter(|c| (4000..=4999).contains(c))
}

/// `{"ev":"ack","id":..}` or `{"ev":"pong","id":..}`.
pub fn reply(ev: &'static str, id: Option<&str>) -> Bytes {
    Builder::new(32).raw("{\"ev\":\"").raw(ev).raw("\"").id(id).frame()
}

/// `{"ev":"error","code":C,"message":M,"id":..}`.
pub fn error(code: ErrorCode, message: &str, id: Option<&str>) -> Bytes {
    Builder::new(48 + message.len())
        .raw("{\"ev\":\"error\",\"code\":\"")
        .raw(code.as_str())
        .raw("\",\"message\":")
        .string(message)
        .id(id)
        .frame()
}

/// `{"ev":"refreshed","exp":N,"id":..}`: a `refresh` op's new token is in
/// force until `exp` (Unix seconds).
pub fn refreshed(exp: u64, id: Option<&str>) -> Bytes {
    Builder::new(48).raw("{\"ev\":\"refreshed\",\"exp\":").raw(&exp.to_string()).id(id).frame()
}

/// `{"ev":"refreshed","room":R,"exp":N,"id":..}`: a subscription token's
/// `refresh` (§13).
pub fn refreshed_room(room: &str, exp: u64, id: Option<&str>) -> Bytes {
    Builder::new(64 + room.len())
        .raw("{\"ev\":\"refreshed\",\"room\":")
        .string(room)
        .raw(",\"exp\":")
        .raw(&exp.to_string())
        .id(id)
        .frame()
}

/// `{"ev":"unsubscribed","room":R,"reason":W}`: the server took the
/// connection out of R (§13: `token_expired`).
pub fn unsubscribed_because(room: &str, reason: &str) -> Bytes {
    Builder::new(64 + room.len() + reason.len())
        .raw("{\"ev\":\"unsubscribed\",\"room\":")
        .string(room)
        .raw(",\"reason\":")
        .string(reason)
        .frame()
}

/// `{"ev":"maintenance","reconnect_in_ms":N}`.
pub fn maintenance(reconnect_in_ms: u64) -> Bytes {
    Builder::new(48).raw("{\"ev\":\"maintenance\",\"reconnect_in_ms\":").raw(&reconnect_in_ms.to_string()).frame()
}

/// The JSON text inside a frame built here (what the Redis bus publishes).
pub fn json_of(frame: &Bytes) -> Bytes {
    frame.slice(frame.len() - json_in(frame).len()..)
}

/// The JSON text inside a frame built here, borrowed: for a look at it on
/// a delivery path (no reference count taken).
pub fn json_in(frame: &[u8]) -> &[u8] {
    let h = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    &frame[h.min(frame.len())..]
}

/// A text frame carrying `json` (an event that arrived already encoded, e.g.
/// from Redis): one allocation, one copy.
pub fn frame_json(json: &[u8]) -> Bytes {
    crate::ws::frame::encode(OpCode::Text, json)
}

#[cfg(test)]
mod disconnect_tests {
    #[test]
    fn a_disconnect_event_names_its_close_status() {
        let f = super::disconnect(4501, "banned \"x\"");
        assert_eq!(super::disconnect_code(&f), Some(4501));
        assert_eq!(&super::json_of(&f)[..], br#"{"ev":"disconnect","code":4501,"reason":"banned \"x\""}"#);
        assert_eq!(super::disconnect_code(&super::direct("u", "1")), None);
        assert_eq!(super::disconnect_code(&super::frame_json(br#"{"ev":"disconnect","code":1000,"reason":""}"#)), None);
    }

    #[test]
    fn server_memberships_travel_and_replies_say_server() {
        let pos = crate::protocol::Position { epoch: crate::protocol::Epoch::new("e1").unwrap(), offset: 7 };
        for m in [
            super::ServerMembership { subscribe: true, room: "r".into(), since: Some(pos) },
            super::ServerMembership { subscribe: false, room: "a:b".into(), since: None },
        ] {
            assert_eq!(super::parse_server_membership(&super::server_membership(&m)), Some(m));
        }
        assert_eq!(super::parse_server_membership(&super::direct("u", "1")), None);
        let bad = super::frame_json(br#"{"ev":"server_subscribe","room":"a b"}"#);
        assert_eq!(super::parse_server_membership(&bad), None);
        let f = super::membership("subscribed", "r", Some(super::SERVER_REPLY));
        assert_eq!(&super::json_of(&f)[..], br#"{"ev":"subscribed","room":"r","server":true}"#);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(frame: &Bytes) -> String {
        String::from_utf8(json_of(frame).to_vec()).unwrap()
    }

    #[test]
    fn events_are_byte_exact() {
        assert_eq!(text(&message("r", "u1", "{\"a\":1}")), r#"{"ev":"message","room":"r","from":"u1","data":{"a":1}}"#);
        assert_eq!(text(&direct("u\"q", "2")), r#"{"ev":"direct","from":"u\"q","data":2}"#);
        assert_eq!(text(&refreshed_room("r", 9, Some("1"))), r#"{"ev":"refreshed","room":"r","exp":9,"id":1}"#);
        let gone = text(&unsubscribed_because("r", "token_expired"));
        assert_eq!(gone, r#"{"ev":"unsubscribed","room":"r","reason":"token_expired"}"#);
        assert_eq!(text(&membership("subscribed", "r", Some("5"))), r#"{"ev":"subscribed","room":"r","id":5}"#);
        assert_eq!(text(&reply("pong", None)), r#"{"ev":"pong"}"#);
        assert_eq!(text(&reply("ack", Some("\"a\""))), r#"{"ev":"ack","id":"a"}"#);
        assert_eq!(
            text(&error(ErrorCode::BadRoom, "no", Some("1"))),
            r#"{"ev":"error","code":"bad_room","message":"no","id":1}"#
        );
        assert_eq!(text(&maintenance(1500)), r#"{"ev":"maintenance","reconnect_in_ms":1500}"#);
        assert_eq!(text(&refreshed(1700000000, Some("3"))), r#"{"ev":"refreshed","exp":1700000000,"id":3}"#);
    }

    #[test]
    fn history_events_are_byte_exact_and_data_is_not_re_encoded() {
        let pos = Position { epoch: crate::protocol::Epoch::new("e1").unwrap(), offset: 7 };
        let m = message_prefix("r", "u1", "{\"a\": [1, 2.50]}");
        assert_eq!(m.json(), br#"{"ev":"message","room":"r","from":"u1","data":{"a": [1, 2.50]}"#);
        assert_eq!(
            text(&m.finish(&pos)),
            r#"{"ev":"message","room":"r","from":"u1","data":{"a": [1, 2.50]},"epoch":"e1","offset":7}"#
        );
        assert_eq!(
            text(&subscribed("r", Some("5"), &pos, Some(true))),
            r#"{"ev":"subscribed","room":"r","id":5,"recovered":true,"epoch":"e1","offset":7}"#
        );
        assert_eq!(
            text(&subscribed("r", None, &pos, None)),
            r#"{"ev":"subscribed","room":"r","epoch":"e1","offset":7}"#
        );
        assert_eq!(text(&subscribed_unrecovered("r", None)), r#"{"ev":"subscribed","room":"r","recovered":false}"#);
        assert_eq!(text(&gap("r", &pos)), r#"{"ev":"gap","room":"r","epoch":"e1","offset":7}"#);
        let items = [
            HistoryItem { offset: 6, from: "\"a\"", data: "1" },
            HistoryItem { offset: 7, from: "\"b\"", data: "[2]" },
        ];
        assert_eq!(
            text(&history("r", &pos, &items, false, Some("\"q\""))),
            r#"{"ev":"history","room":"r","epoch":"e1","offset":7,"messages":[{"offset":6,"from":"a","data":1},{"offset":7,"from":"b","data":[2]}],"id":"q"}"#
        );
        assert_eq!(
            text(&history("r", &pos, &[], false, None)),
            r#"{"ev":"history","room":"r","epoch":"e1","offset":7,"messages":[]}"#
        );
        assert_eq!(
            text(&history("r", &pos, &items[..1], true, None)),
            r#"{"ev":"history","room":"r","epoch":"e1","offset":7,"messages":[{"offset":6,"from":"a","data":1}],"more":true}"#
        );
    }

    #[test]
    fn frames_are_complete_text_frames() {
        let big = "x".repeat(300);
        let data = format!("\"{big}\"");
        let f = message("room", "me", &data);
        assert_eq!(f[0], 0x81);
        assert_eq!(f[1], 126);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]) as usize, f.len() - 4);
        assert_eq!(frame_json(&json_of(&f)), f);
    }
}
