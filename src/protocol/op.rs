//! Client → server ops (PROTOCOL.md §2), parsed without copying.
//!
//! `data` and `id` are kept as raw JSON text borrowed from the frame
//! (`serde_json::value::RawValue`): validated while parsing, never decoded into
//! values and never re-encoded, so `data` reaches subscribers byte for byte.
//! (simd-json has no raw-value pass-through, so the op parser uses serde_json;
//! simd-json validates payloads that arrive from the Redis backplane.)

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ErrorCode, is_valid_name};
use crate::protocol::{Epoch, Since};

/// The fields any op may carry; unknown fields are ignored so that newer
/// clients keep working.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    /// §7: `{"epoch":E,"offset":N}` on `subscribe` and `history`.
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    /// §7: how many messages a `history` op wants.
    #[serde(borrow, default)]
    limit: Option<&'a RawValue>,
    /// §11: the member id a `presence` page starts after.
    #[serde(borrow, default)]
    after: Option<Cow<'a, str>>,
}

/// `since` as it must be: an object with a string `epoch` and an unsigned
/// integer `offset` (other fields are ignored, like everywhere in an op).
#[derive(Deserialize)]
struct SinceWire<'a> {
    #[serde(borrow)]
    epoch: Cow<'a, str>,
    offset: u64,
}

/// Parses `since` (§7); `None` when it is not what §7 says.
fn parse_since(raw: &RawValue) -> Option<Since> {
    let w: SinceWire = serde_json::from_str(raw.get()).ok()?;
    Some(Since { epoch: Epoch::new(&w.epoch)?, offset: w.offset })
}

/// One parsed client op. Names are validated; `data` is raw JSON text.
/// `Refresh` (a fresh JWT for a long-lived connection) is a corecast
/// extension of §2.
#[derive(Debug, PartialEq)]
pub enum ClientOp<'a> {
    /// `since`: recover from this position (§7); `token`: a subscription
    /// token that grants the room (§13).
    Subscribe {
        room: Cow<'a, str>,
        since: Option<Since>,
        token: Option<Cow<'a, str>>,
    },
    Unsubscribe {
        room: Cow<'a, str>,
    },
    Publish {
        room: Cow<'a, str>,
        data: &'a str,
    },
    Send {
        user: Cow<'a, str>,
        data: &'a str,
    },
    Ping,
    /// With `room`: a fresh subscription token for that room (§13);
    /// without: a fresh connection token.
    Refresh {
        token: Cow<'a, str>,
        room: Option<Cow<'a, str>>,
    },
    /// §7: `limit` defaults to the whole history (`usize::MAX`, capped by
    /// the server at `--history-size`).
    History {
        room: Cow<'a, str>,
        limit: usize,
        since: Option<Since>,
    },
    /// §11: a page of the room's members (`limit` 1..=10000, default 1000).
    Presence {
        room: Cow<'a, str>,
        after: Option<Cow<'a, str>>,
        limit: usize,
    },
    /// §11: the room's counts.
    PresenceStats {
        room: Cow<'a, str>,
    },
}

/// Why an op was refused, with the `id` to echo when the frame had a usable one.
#[derive(Debug, PartialEq)]
pub struct OpError<'a> {
    pub code: ErrorCode,
    pub message: &'static str,
    pub id: Option<&'a str>,
}

/// A parsed op plus its raw `id` (JSON integer or string) if it had one.
pub type Parsed<'a> = (ClientOp<'a>, Option<&'a str>);

impl<'a> ClientOp<'a> {
    /// Parses one text message. Every failure names its `error` code.
    pub fn parse(text: &'a [u8]) -> Result<Parsed<'a>, OpError<'a>> {
        let wire: Wire<'a> = serde_json::from_slice(text).map_err(|_| OpError {
            code: ErrorCode::BadRequest,
            message: "expected a JSON object with a string \"op\"",
            id: None,
        })?;
        let err = |code, message, id| Err(OpError { code, message, id });
        let id = match wire.id {
            None => None,
            Some(raw) => {
                let s = raw.get();
                // An id is an integer or a string (§2): anything else is refused.
                let ok = s.starts_with('"') || (!s.contains(['.', 'e', 'E']) && s.parse::<i128>().is_ok());
                if !ok {
                    return err(ErrorCode::BadRequest, "\"id\" must be an integer or a string", None);
                }
                Some(s)
            }
        };
        let room = |r: Option<Cow<'a, str>>| match r {
            None => Err(OpError { code: ErrorCode::BadRoom, message: "missing \"room\"", id }),
            Some(r) if !is_valid_name(&r) => Err(OpError {
                code: ErrorCode::BadRoom,
                message: "room names are 1-128 bytes of A-Z a-z 0-9 _ - . : @ /",
                id,
            }),
            Some(r) => Ok(r),
        };
        let data = |d: Option<&'a RawValue>| {
            d.map(RawValue::get).ok_or(OpError { code: ErrorCode::BadRequest, message: "missing \"data\"", id })
        };
        let since = match wire.since {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => match parse_since(raw) {
                Some(s) => Some(s),
                None => {
                    return err(
                        ErrorCode::BadRequest,
                        "\"since\" must be {\"epoch\":string of at most 64 bytes,\"offset\":unsigned integer}",
                        id,
                    );
                }
            },
        };
        let op = match &*wire.op {
            "subscribe" => ClientOp::Subscribe { room: room(wire.room)?, since, token: wire.token },
            "history" => {
                let limit = match wire.limit {
                    None => usize::MAX,
                    Some(raw) => match raw.get().parse::<u64>() {
                        Ok(n) => usize::try_from(n).unwrap_or(usize::MAX),
                        Err(_) => {
                            return err(ErrorCode::BadRequest, "\"limit\" must be an unsigned integer", id);
                        }
                    },
                };
                ClientOp::History { room: room(wire.room)?, limit, since }
            }
            "presence" => {
                let limit = match wire.limit {
                    None => super::presence::DEFAULT_LIMIT,
                    Some(raw) => match raw.get().parse::<u64>() {
                        Ok(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX).min(super::presence::MAX_LIMIT),
                        _ => return err(ErrorCode::BadRequest, "\"limit\" must be an integer from 1", id),
                    },
                };
                let after = match wire.after {
                    Some(a) if !is_valid_name(&a) => {
                        return err(ErrorCode::BadRequest, "\"after\" must be a valid user id", id);
                    }
                    a => a,
                };
                ClientOp::Presence { room: room(wire.room)?, after, limit }
            }
            "presence_stats" => ClientOp::PresenceStats { room: room(wire.room)? },
            "unsubscribe" => ClientOp::Unsubscribe { room: room(wire.room)? },
            "publish" => ClientOp::Publish { room: room(wire.room)?, data: data(wire.data)? },
            "send" => {
                let user = match wire.user {
                    Some(u) if is_valid_name(&u) => u,
                    _ => return err(ErrorCode::BadRequest, "\"user\" must be a valid user id", id),
                };
                ClientOp::Send { user, data: data(wire.data)? }
            }
            "ping" => ClientOp::Ping,
            "refresh" => match wire.token {
                Some(token) => {
                    let room = match wire.room {
                        Some(r) => Some(room(Some(r))?),
                        None => None,
                    };
                    ClientOp::Refresh { token, room }
                }
                None => return err(ErrorCode::BadRequest, "missing \"token\"", id),
            },
            _ => return err(ErrorCode::BadRequest, "unknown \"op\"", id),
        };
        Ok((op, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_op_and_keeps_data_raw() {
        let (op, id) = ClientOp::parse(br#"{"op":"publish","room":"r","data":{"a": [1, 2.50]},"id":7}"#).unwrap();
        assert_eq!(op, ClientOp::Publish { room: "r".into(), data: r#"{"a": [1, 2.50]}"# });
        assert_eq!(id, Some("7"));
        let (op, id) = ClientOp::parse(br#"{"op":"subscribe","room":"a:b","id":"x"}"#).unwrap();
        assert_eq!(op, ClientOp::Subscribe { room: "a:b".into(), since: None, token: None });
        assert_eq!(id, Some("\"x\""));
        assert_eq!(ClientOp::parse(br#"{"op":"ping"}"#).unwrap(), (ClientOp::Ping, None));
        let (op, _) = ClientOp::parse(br#"{"op":"send","user":"bob","data":"hi","extra":1}"#).unwrap();
        assert_eq!(op, ClientOp::Send { user: "bob".into(), data: "\"hi\"" });
        let (op, _) = ClientOp::parse(br#"{"op":"unsubscribe","room":"\u0041"}"#).unwrap();
        assert_eq!(op, ClientOp::Unsubscribe { room: "A".into() });
        let (op, id) = ClientOp::parse(br#"{"op":"refresh","token":"a.b.c","id":2}"#).unwrap();
        assert_eq!((op, id), (ClientOp::Refresh { token: "a.b.c".into(), room: None }, Some("2")));
        let (op, _) = ClientOp::parse(br#"{"op":"refresh","token":"t","room":"r"}"#).unwrap();
        assert_eq!(op, ClientOp::Refresh { token: "t".into(), room: Some("r".into()) });
        let (op, _) = ClientOp::parse(br#"{"op":"subscribe","room":"r","token":"t"}"#).unwrap();
        assert_eq!(op, ClientOp::Subscribe { room: "r".into(), since: None, token: Some("t".into()) });
        assert_eq!(
            ClientOp::parse(br#"{"op":"refresh","token":"t","room":"a b"}"#).unwrap_err().code,
            ErrorCode::BadRoom
        );
    }

    #[test]
    fn presence_ops_parse_as_section_11_says() {
        let (op, id) = ClientOp::parse(br#"{"op":"presence","room":"r","id":3}"#).unwrap();
        assert_eq!(op, ClientOp::Presence { room: "r".into(), after: None, limit: 1000 });
        assert_eq!(id, Some("3"));
        let (op, _) = ClientOp::parse(br#"{"op":"presence","room":"r","after":"bob","limit":50000}"#).unwrap();
        assert_eq!(op, ClientOp::Presence { room: "r".into(), after: Some("bob".into()), limit: 10_000 });
        let (op, _) = ClientOp::parse(br#"{"op":"presence_stats","room":"r"}"#).unwrap();
        assert_eq!(op, ClientOp::PresenceStats { room: "r".into() });
        let code = |s: &[u8]| ClientOp::parse(s).unwrap_err().code;
        assert_eq!(code(br#"{"op":"presence","room":"r","limit":0}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"presence","room":"r","limit":"x"}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"presence","room":"r","after":"a b"}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"presence_stats"}"#), ErrorCode::BadRoom);
    }

    #[test]
    fn names_the_error_of_each_bad_input() {
        let code = |s: &[u8]| ClientOp::parse(s).unwrap_err().code;
        assert_eq!(code(b"not json"), ErrorCode::BadRequest);
        assert_eq!(code(b"[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(b"{}"), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"dance","id":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"subscribe"}"#), ErrorCode::BadRoom);
        assert_eq!(code(br#"{"op":"subscribe","room":"a b"}"#), ErrorCode::BadRoom);
        assert_eq!(code(br#"{"op":"publish","room":"r"}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"publish","room":"r","data":}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"ping","id":1.5}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"ping","id":{}}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"send","data":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"refresh"}"#), ErrorCode::BadRequest);
        let e = ClientOp::parse(br#"{"op":"subscribe","room":"","id":"q"}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRoom, Some("\"q\"")));
    }

    #[test]
    fn since_and_history_parse_as_section_7_says() {
        let e = |s: &str| Epoch::new(s).unwrap();
        let (op, id) =
            ClientOp::parse(br#"{"op":"subscribe","room":"r","since":{"epoch":"ab","offset":12},"id":1}"#).unwrap();
        assert_eq!(
            op,
            ClientOp::Subscribe { room: "r".into(), since: Some(Since { epoch: e("ab"), offset: 12 }), token: None }
        );
        assert_eq!(id, Some("1"));
        let (op, _) = ClientOp::parse(br#"{"op":"subscribe","room":"r","since":null}"#).unwrap();
        assert_eq!(op, ClientOp::Subscribe { room: "r".into(), since: None, token: None });
        let (op, _) = ClientOp::parse(br#"{"op":"history","room":"r","limit":5}"#).unwrap();
        assert_eq!(op, ClientOp::History { room: "r".into(), limit: 5, since: None });
        let (op, _) = ClientOp::parse(br#"{"op":"history","room":"r","since":{"offset":0,"epoch":"x"}}"#).unwrap();
        assert_eq!(
            op,
            ClientOp::History { room: "r".into(), limit: usize::MAX, since: Some(Since { epoch: e("x"), offset: 0 }) }
        );
    }

    #[test]
    fn bad_since_and_limit_values_are_bad_requests_with_their_id() {
        let bad = |s: String| {
            let e = ClientOp::parse(s.as_bytes()).unwrap_err();
            assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some("9")), "{s}");
        };
        let long = "e".repeat(65);
        for since in [
            "1".to_string(),
            "\"x\"".into(),
            "[]".into(),
            "{}".into(),
            r#"{"epoch":"a"}"#.into(),
            r#"{"offset":1}"#.into(),
            r#"{"epoch":"a","offset":-1}"#.into(),
            r#"{"epoch":"a","offset":1.5}"#.into(),
            r#"{"epoch":"a","offset":"1"}"#.into(),
            r#"{"epoch":1,"offset":1}"#.into(),
            format!(r#"{{"epoch":"{long}","offset":1}}"#),
        ] {
            bad(format!(r#"{{"op":"subscribe","room":"r","since":{since},"id":9}}"#));
            bad(format!(r#"{{"op":"history","room":"r","since":{since},"id":9}}"#));
        }
        for limit in ["-1", "1.5", "\"3\"", "{}"] {
            bad(format!(r#"{{"op":"history","room":"r","limit":{limit},"id":9}}"#));
        }
        let ok = format!(r#"{{"op":"subscribe","room":"r","since":{{"epoch":"{}","offset":1}}}}"#, "e".repeat(64));
        assert!(ClientOp::parse(ok.as_bytes()).is_ok(), "64 bytes is allowed");
        assert_eq!(ClientOp::parse(br#"{"op":"history"}"#).unwrap_err().code, ErrorCode::BadRoom);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes never panic the op parser: they parse or get a code.
        #[test]
        fn parse_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ClientOp::parse(&buf);
        }

        /// Any JSON value published comes back as the same raw text.
        #[test]
        fn data_passes_through_byte_for_byte(v in any::<(i64, String, bool, Vec<u8>)>()) {
            let data = serde_json::to_string(&v).unwrap();
            let text = format!(r#"{{"op":"publish","room":"r","data":{data},"id":1}}"#);
            let (op, id) = ClientOp::parse(text.as_bytes()).unwrap();
            prop_assert_eq!(op, ClientOp::Publish { room: "r".into(), data: &data });
            prop_assert_eq!(id, Some("1"));
        }
    }
}
