//! The plain HTTP routes: `/metrics`, `POST /api/publish` (PROTOCOL.md §1, §4)
//! and the demo page at `/` with the JS client it imports at `/corecast.js`.

use std::borrow::Cow;
use std::rc::Rc;

use bytes::Bytes;
use http::request::Parts;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Reply, json, refused};
use crate::bus::redis::Readiness;
use crate::metrics::{self, NodeInfo};
use crate::protocol::{Position, Target, Unavailable, event, is_valid_name};
use crate::services::Services;
use crate::shard::Shard;

/// `GET /healthz`: 200 while every shard's runtime is turning; 503 naming
/// each shard whose liveness tick (`metrics::Liveness`) is older than
/// `metrics::STALL_LIMIT`, whichever shard answers.
pub fn healthz(shard: &Rc<Shard>) -> Reply {
    // The answering shard is turning: its own stamp may lag the timer by a
    // tick (say, right after a stall), so it stamps now.
    shard.metrics.liveness.beat(shard.id);
    let stalled = shard.metrics.liveness.stalled(metrics::STALL_LIMIT);
    if stalled.is_empty() {
        return Reply::text(200, "ok\n");
    }
    let mut body = String::from("stalled:");
    for (i, age) in stalled {
        body.push_str(&format!(" shard {i} ({} ms)", age.as_millis()));
    }
    body.push('\n');
    Reply::new(503, "text/plain; charset=utf-8", Bytes::from(body))
}

/// `GET /readyz`: can this node serve (`bus::redis::health`)? The client
/// listener's body is terse; the admin listener's names the Redis links,
/// addresses and errors.
pub fn readyz(svc: &Rc<Services>, admin: bool) -> Reply {
    if svc.shard().is_draining() {
        return Reply::text(503, "not ready: draining\n");
    }
    // `--jwt-jwks-url`: no token can be checked before the first fetch.
    if svc.shard().cfg.auth.as_ref().is_some_and(|a| !a.ready()) {
        return Reply::text(503, "not ready: the JWKS has not been fetched yet\n");
    }
    let text = |status, body: String| Reply::new(status, "text/plain; charset=utf-8", Bytes::from(body));
    match svc.readiness() {
        Readiness::Ready => Reply::text(200, "ready\n"),
        Readiness::Degraded { since, detail } if admin => {
            text(200, format!("ready, degraded for {:.1} s: {}\n", since.as_secs_f64(), detail.trim_end()))
        }
        Readiness::Degraded { .. } => Reply::text(200, "ready, degraded: redis\n"),
        Readiness::NotReady { why, detail: Some(detail) } if admin => {
            text(503, format!("not ready: {why}: {}\n", detail.trim_end()))
        }
        Readiness::NotReady { why, .. } => text(503, format!("not ready: {why}\n")),
    }
}

/// The user id that server-side publishes carry as `from` (§4).
const SERVER_USER: &str = "server";

/// The demo chat page (`--demo`, on by default): one self-contained file.
const DEMO_PAGE: &str = include_str!("demo.html");

pub fn demo() -> Reply {
    Reply::new(200, "text/html; charset=utf-8", Bytes::from_static(DEMO_PAGE.as_bytes()))
        .header("cache-control", "no-cache")
}

/// The JavaScript client library (`clients/js/corecast.js`) the demo page
/// imports; served with the page (`--demo`).
const CLIENT_JS: &str = include_str!("../../clients/js/corecast.js");

pub fn client_js() -> Reply {
    Reply::new(200, "text/javascript; charset=utf-8", Bytes::from_static(CLIENT_JS.as_bytes()))
        .header("cache-control", "no-cache")
}

pub fn metrics(svc: &Rc<Services>) -> Reply {
    let shard = svc.shard();
    // As in `healthz`: the answering shard is turning.
    shard.metrics.liveness.beat(shard.id);
    let node = NodeInfo {
        shards: shard.peers().len(),
        draining: shard.is_draining(),
        driver: shard.driver,
        inbox_backlog: shard.inbox_backlogs(),
        // One stat(2), no walk over the descriptors (see `metrics::open_fds`).
        open_fds: metrics::open_fds(),
        redis_degraded: shard.cfg.redis.is_some().then(|| svc.readiness() != Readiness::Ready),
    };
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

/// `GET /api/presence?room=R[&after=U&limit=K]` and (`stats`)
/// `GET /api/presence_stats?room=R` (§11): the ops' replies without `id`.
pub async fn presence(svc: &Rc<Services>, head: &Parts, stats: bool) -> Reply {
    if let Some(r) = refused(svc, head) {
        return r;
    }
    let (mut room, mut after, mut limit) = (None, None, Some(crate::protocol::presence::DEFAULT_LIMIT));
    for (k, v) in form_urlencoded::parse(head.uri.query().unwrap_or("").as_bytes()) {
        match &*k {
            "room" => room = Some(v.into_owned()),
            "after" => after = Some(v.into_owned()),
            "limit" => limit = v.parse::<usize>().ok().filter(|n| *n >= 1),
            _ => {}
        }
    }
    let Some(room) = room.filter(|r| is_valid_name(r)) else {
        return json(400, r#"{"error":"bad_room","message":"give ?room= with a valid room name"}"#);
    };
    let Some(limit) = limit else {
        return json(400, r#"{"error":"bad_request","message":"limit must be an integer from 1"}"#);
    };
    if after.as_deref().is_some_and(|a| !is_valid_name(a)) {
        return json(400, r#"{"error":"bad_request","message":"after must be a valid user id"}"#);
    }
    if !svc.shard().cfg.namespaces.of(&room).presence {
        return json(400, r#"{"error":"bad_request","message":"this room keeps no presence"}"#);
    }
    let read = crate::protocol::presence::Read {
        after: after.map(Box::from),
        limit: if stats { 0 } else { limit.min(crate::protocol::presence::MAX_LIMIT) },
    };
    match crate::services::presence::Presence::read(svc, &room, read).await {
        Ok(page) => Reply::new(200, "application/json", event::json_of(&event::presence(&room, &page, stats, None))),
        Err(_) => json(503, r#"{"error":"unavailable","message":"presence is unavailable, try again"}"#),
    }
}

/// `GET /api/history?room=R[&limit=K]` (§12): the `history` op's reply
/// (§7), without `id`.
pub async fn history(svc: &Rc<Services>, head: &Parts) -> Reply {
    if let Some(r) = refused(svc, head) {
        return r;
    }
    let (mut room, mut limit) = (None, Some(usize::MAX));
    for (k, v) in form_urlencoded::parse(head.uri.query().unwrap_or("").as_bytes()) {
        match &*k {
            "room" => room = Some(v.into_owned()),
            "limit" => limit = v.parse::<usize>().ok(),
            _ => {}
        }
    }
    let Some(room) = room.filter(|r| is_valid_name(r)) else {
        return json(400, r#"{"error":"bad_room","message":"give ?room= with a valid room name"}"#);
    };
    let Some(limit) = limit else {
        return json(400, r#"{"error":"bad_request","message":"limit must be an unsigned integer"}"#);
    };
    let Some((h, settings)) = svc.history_of(&room) else {
        return json(400, r#"{"error":"bad_request","message":"this room keeps no history"}"#);
    };
    match h.history_page(svc.shard(), &room, settings, limit).await {
        Ok(frame) => Reply::new(200, "application/json", event::json_of(&frame)),
        Err(_) => json(503, r#"{"error":"unavailable","message":"room history is unavailable, try again"}"#),
    }
}

#[derive(Deserialize)]
struct DisconnectBody<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
    #[serde(default)]
    code: Option<u16>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
}

/// `POST /api/disconnect` `{"user":U,"code":C,"reason":S}` (§12): every
/// connection of U on every node gets `{"ev":"disconnect",..}` and is
/// closed with C (default 4500), through the user's own channel, so it
/// reaches exactly the nodes that have U, on every topology.
pub async fn disconnect(svc: &Rc<Services>, head: &Parts, body: &[u8]) -> Reply {
    if let Some(r) = refused(svc, head) {
        return r;
    }
    let Ok(req) = serde_json::from_slice::<DisconnectBody>(body) else {
        return json(400, r#"{"error":"bad_request","message":"expected {\"user\":U,\"code\":C,\"reason\":S}"}"#);
    };
    let code = req.code.unwrap_or(4500);
    let reason = req.reason.as_deref().unwrap_or("");
    if !is_valid_name(&req.user) {
        return json(400, r#"{"error":"bad_request","message":"user must be a valid user id"}"#);
    }
    if !(4000..=4999).contains(&code) {
        return json(400, r#"{"error":"bad_request","message":"code must be 4000-4999"}"#);
    }
    if reason.len() > 120 {
        return json(400, r#"{"error":"bad_request","message":"reason is at most 120 bytes"}"#);
    }
    match svc.publish_confirmed(Target::User(&req.user), event::disconnect(code, reason)).await {
        Ok(()) => json(200, r#"{"ok":true}"#),
        Err(_) => json(503, r#"{"error":"unavailable","message":"the backplane is unavailable, try again"}"#),
    }
}

#[derive(Deserialize)]
struct MembershipBody<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(default)]
    since: Option<SinceBody>,
}

#[derive(Deserialize)]
struct SinceBody {
    epoch: String,
    offset: u64,
}

/// `POST /api/subscribe` `{"user":U,"room":R}` (optional `since`) and
/// `POST /api/unsubscribe` `{"user":U,"room":R}` (§12): every connection
/// of U on every node joins (leaves) R as if it had sent the op, without a
/// grant check, and gets `subscribed` (`unsubscribed`) with `"server":true`.
pub async fn membership(svc: &Rc<Services>, head: &Parts, body: &[u8], subscribe: bool) -> Reply {
    if let Some(r) = refused(svc, head) {
        return r;
    }
    let Ok(req) = serde_json::from_slice::<MembershipBody>(body) else {
        return json(400, r#"{"error":"bad_request","message":"expected {\"user\":U,\"room\":R}"}"#);
    };
    if !is_valid_name(&req.user) {
        return json(400, r#"{"error":"bad_request","message":"user must be a valid user id"}"#);
    }
    if !is_valid_name(&req.room) {
        return json(400, r#"{"error":"bad_room","message":"room must be a valid room name"}"#);
    }
    let since = match req.since {
        None => None,
        Some(s) if subscribe => match crate::protocol::Epoch::new(&s.epoch) {
            Some(epoch) => Some(Position { epoch, offset: s.offset }),
            None => return json(400, r#"{"error":"bad_request","message":"since.epoch is at most 64 bytes"}"#),
        },
        Some(_) => return json(400, r#"{"error":"bad_request","message":"since goes with subscribe only"}"#),
    };
    let m = event::ServerMembership { subscribe, room: req.room.into_owned(), since };
    match svc.server_membership(&req.user, &m).await {
        Ok(()) => json(200, r#"{"ok":true}"#),
        Err(_) => json(503, r#"{"error":"unavailable","message":"the backplane is unavailable, try again"}"#),
    }
}

pub async fn publish(svc: &Rc<Services>, head: &Parts, body: &[u8]) -> Reply {
    let shard = svc.shard();
    // Server-side publish is never open on an authenticated node (§4): with
    // client auth on, it needs an API key.
    if let Some(r) = refused(svc, head) {
        return r;
    }
    let Ok(req) = serde_json::from_slice::<PublishBody>(body) else {
        return json(400, r#"{"ok":false,"error":"expected {\"room\":R,\"data\":D} or {\"user\":U,\"data\":D}"}"#);
    };
    let data = req.data.get();
    // An event no subscriber's queue could take is refused, not published
    // to cut every subscriber off (or be dropped by every node's reader).
    if !shard.cfg.deliverable(data.len()) {
        return json(413, r#"{"ok":false,"error":"too_large"}"#);
    }
    let result = match (&req.room, &req.user) {
        (Some(room), None) if is_valid_name(room) => match svc.history_of(room) {
            // §4 + §7: the reply carries the message's position.
            Some((h, settings)) => {
                return match h.publish_positioned(shard, room, settings, SERVER_USER, data).await {
                    Ok(pos) => positioned(pos),
                    Err(Unavailable) => json(503, r#"{"ok":false,"error":"unavailable"}"#),
                };
            }
            // The answer waits until the backplane took the message (with
            // Redis: its reply to the PUBLISH), so that a backend's next
            // call, wherever it lands, comes after it.
            None => svc.publish_confirmed(Target::Room(room), event::message(room, SERVER_USER, data)).await,
        },
        (Some(_), None) => return json(400, r#"{"ok":false,"error":"bad_room"}"#),
        (None, Some(user)) if is_valid_name(user) => {
            svc.publish_confirmed(Target::User(user), event::direct(SERVER_USER, data)).await
        }
        _ => return json(400, r#"{"ok":false,"error":"give exactly one of room or user"}"#),
    };
    match result {
        Ok(()) => json(200, r#"{"ok":true}"#),
        Err(_) => json(503, r#"{"ok":false,"error":"unavailable"}"#),
    }
}

/// `{"ok":true,"epoch":E,"offset":N}`: a publish into a history room.
fn positioned(pos: Position) -> Reply {
    let mut body = br#"{"ok":true,"epoch":"#.to_vec();
    // An epoch is a JSON-safe string once encoded.
    serde_json::to_writer(&mut body, pos.epoch.as_str()).expect("write to memory");
    body.extend_from_slice(format!(",\"offset\":{}}}", pos.offset).as_bytes());
    Reply::new(200, "application/json", Bytes::from(body))
}

/// `--debug-hooks` (test-only): `/debug/shard` names the shard answering;
/// `/debug/stall?ms=N` blocks this shard's thread for N ms (at most 10 s)
/// before answering, as a shard stuck in a long computation would;
/// `/debug/panic` panics inside this connection's task (the node closes
/// that connection and goes on), `/debug/panic?in=task` inside a task of
/// the shard that is no connection's and `?in=thread` on a thread of its
/// own (either ends the node: docs/operations.md, Panic policy).
pub fn debug(shard: &Rc<Shard>, path: &str, query: Option<&str>) -> Reply {
    if path == "/debug/panic" {
        let place = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == "in")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        tracing::warn!(shard = shard.id, place, "debug hook: panicking");
        match place.as_str() {
            "task" => {
                monoio::spawn(async { panic!("debug hook: panic in a shard task") });
            }
            "thread" => {
                let _ = std::thread::Builder::new()
                    .name("debug-panic".into())
                    .spawn(|| panic!("debug hook: panic on a thread of its own"));
            }
            _ => panic!("debug hook: panic in a connection's task"),
        }
        return Reply::text(200, "panicking elsewhere\n");
    }
    if path == "/debug/stall" {
        let ms = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == "ms")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(0)
            .min(10_000);
        tracing::warn!(shard = shard.id, ms, "debug hook: stalling this shard's thread");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    Reply::new(200, "text/plain; charset=utf-8", Bytes::from(format!("{}\n", shard.id)))
}
