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
}

/// One parsed client op. Names are validated; `data` is raw JSON text.
/// `Refresh` (a fresh JWT for a long-lived connection) is a corecast
/// extension of §2.
#[derive(Debug, PartialEq)]
pub enum ClientOp<'a> {
    Subscribe { room: Cow<'a, str> },
    Unsubscribe { room: Cow<'a, str> },
    Publish { room: Cow<'a, str>, data: &'a str },
    Send { user: Cow<'a, str>, data: &'a str },
    Ping,
    Refresh { token: Cow<'a, str> },
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
        let op = match &*wire.op {
            "subscribe" => ClientOp::Subscribe { room: room(wire.room)? },
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
                Some(token) => ClientOp::Refresh { token },
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
        assert_eq!(op, ClientOp::Subscribe { room: "a:b".into() });
        assert_eq!(id, Some("\"x\""));
        assert_eq!(ClientOp::parse(br#"{"op":"ping"}"#).unwrap(), (ClientOp::Ping, None));
        let (op, _) = ClientOp::parse(br#"{"op":"send","user":"bob","data":"hi","extra":1}"#).unwrap();
        assert_eq!(op, ClientOp::Send { user: "bob".into(), data: "\"hi\"" });
        let (op, _) = ClientOp::parse(br#"{"op":"unsubscribe","room":"\u0041"}"#).unwrap();
        assert_eq!(op, ClientOp::Unsubscribe { room: "A".into() });
        let (op, id) = ClientOp::parse(br#"{"op":"refresh","token":"a.b.c","id":2}"#).unwrap();
        assert_eq!((op, id), (ClientOp::Refresh { token: "a.b.c".into() }, Some("2")));
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
