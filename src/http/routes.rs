//! The plain HTTP routes: `/metrics`, `POST /api/publish` (PROTOCOL.md §1, §4)
//! and the demo page at `/`.

use std::borrow::Cow;
use std::rc::Rc;

use bytes::Bytes;
use http::request::Parts;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Reply;
use crate::bus::Target;
use crate::metrics::{self, NodeInfo};
use crate::protocol::{event, is_valid_name};
use crate::shard::Shard;

/// The user id that server-side publishes carry as `from` (§4).
const SERVER_USER: &str = "server";

/// The demo chat page (`--demo`, on by default): one self-contained file.
const DEMO_PAGE: &str = include_str!("demo.html");

pub fn demo() -> Reply {
    Reply::new(200, "text/html; charset=utf-8", Bytes::from_static(DEMO_PAGE.as_bytes()))
        .header("cache-control", "no-cache")
}

pub fn metrics(shard: &Rc<Shard>) -> Reply {
    let node = NodeInfo { shards: shard.peers().len(), draining: shard.is_draining(), driver: shard.driver };
    let body = shard.metrics.render(node);
    Reply::new(200, metrics::CONTENT_TYPE, Bytes::from(body))
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
}

pub async fn publish(shard: &Rc<Shard>, head: &Parts, body: &[u8]) -> Reply {
    if let Some(key) = &shard.cfg.api_key {
        let given = head
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return Reply::text(401, "bad or missing API key\n").header("www-authenticate", "Bearer");
        }
    }
    let Ok(req) = serde_json::from_slice::<PublishBody>(body) else {
        return json(400, r#"{"ok":false,"error":"expected {\"room\":R,\"data\":D} or {\"user\":U,\"data\":D}"}"#);
    };
    let data = req.data.get();
    let result = match (&req.room, &req.user) {
        (Some(room), None) if is_valid_name(room) => match shard.history() {
            // §4 + §7: the reply carries the message's position.
            Some(h) => return crate::history::recover::api_publish(shard, h, room, SERVER_USER, data).await,
            None => shard.publish(Target::Room(room), event::message(room, SERVER_USER, data)),
        },
        (Some(_), None) => return json(400, r#"{"ok":false,"error":"bad_room"}"#),
        (None, Some(user)) if is_valid_name(user) => {
            shard.publish(Target::User(user), event::direct(SERVER_USER, data))
        }
        _ => return json(400, r#"{"ok":false,"error":"give exactly one of room or user"}"#),
    };
    match result {
        Ok(()) => json(200, r#"{"ok":true}"#),
        Err(_) => json(503, r#"{"ok":false,"error":"unavailable"}"#),
    }
}

fn json(status: u16, body: &'static str) -> Reply {
    Reply::new(status, "application/json", Bytes::from_static(body.as_bytes()))
}

/// Compares without an early exit, so the time taken does not reveal how much
/// of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
