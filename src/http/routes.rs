//! The plain HTTP routes: `/metrics`, the server API (PROTOCOL.md §1, §4,
//! §12; each call a function from its body to an `Answer`, shared with
//! `POST /api/batch` in `batch.rs`) and the demo page at `/` with the JS
//! client it imports at `/corecast.js`.

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
use crate::rt::Oneshot;
use crate::services::Services;
use crate::services::idempotency::{self, Claimed};
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

/// What a server API call answers: its status and its JSON body. The
/// route sends it as is; `POST /api/batch` (`batch.rs`) lists the body.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    fn fixed(status: u16, body: &'static str) -> Answer {
        Answer { status, body: Bytes::from_static(body.as_bytes()) }
    }

    fn reply(self) -> Reply {
        Reply::new(self.status, "application/json", self.body)
    }
}

/// A server API call that takes a JSON body, as `POST /api/batch` names it.
#[derive(Clone, Copy)]
pub enum Call {
    Publish,
    Disconnect,
    Subscribe,
    Unsubscribe,
}

impl Call {
    pub fn named(method: &str) -> Option<Call> {
        Some(match method {
            "publish" => Call::Publish,
            "disconnect" => Call::Disconnect,
            "subscribe" => Call::Subscribe,
            "unsubscribe" => Call::Unsubscribe,
            _ => return None,
        })
    }

    /// Runs the call on `params` (its body), already past `refused`.
    pub async fn run(self, svc: &Rc<Services>, params: &[u8]) -> Answer {
        match self {
            Call::Publish => publish_call(svc, params).await,
            Call::Disconnect => disconnect_call(svc, params).await,
            Call::Subscribe => membership_call(svc, params, true).await,
            Call::Unsubscribe => membership_call(svc, params, false).await,
        }
    }
}

/// `POST /api/publish`, `/api/disconnect`, `/api/subscribe`,
/// `/api/unsubscribe`: the rules of §4, then the call.
pub async fn call(svc: &Rc<Services>, head: &Parts, body: &[u8], call: Call) -> Reply {
    if let Some(r) = refused(svc, head) {
        return r;
    }
    call.run(svc, body).await.reply()
}

/// `POST /api/batch` (`batch.rs`): the rules of §4 once, then each
/// command through `Call::run`.
pub async fn batch(svc: &Rc<Services>, head: &Parts, body: &[u8]) -> Reply {
    if let Some(r) = refused(svc, head) {
        return r;
    }
    let run = |method: &str, params| Call::named(method).map(|c| async move { c.run(svc, params).await.body });
    match super::batch::run(body, run).await {
        Ok(replies) => Reply::new(200, "application/json", replies),
        Err(bad) => json(400, bad),
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
async fn disconnect_call(svc: &Rc<Services>, body: &[u8]) -> Answer {
    let Ok(req) = serde_json::from_slice::<DisconnectBody>(body) else {
        return Answer::fixed(
            400,
            r#"{"error":"bad_request","message":"expected {\"user\":U,\"code\":C,\"reason\":S}"}"#,
        );
    };
    let code = req.code.unwrap_or(4500);
    let reason = req.reason.as_deref().unwrap_or("");
    if !is_valid_name(&req.user) {
        return Answer::fixed(400, r#"{"error":"bad_request","message":"user must be a valid user id"}"#);
    }
    if !(4000..=4999).contains(&code) {
        return Answer::fixed(400, r#"{"error":"bad_request","message":"code must be 4000-4999"}"#);
    }
    if reason.len() > 120 {
        return Answer::fixed(400, r#"{"error":"bad_request","message":"reason is at most 120 bytes"}"#);
    }
    match svc.publish_confirmed(Target::User(&req.user), event::disconnect(code, reason)).await {
        Ok(()) => Answer::fixed(200, r#"{"ok":true}"#),
        Err(_) => Answer::fixed(503, r#"{"error":"unavailable","message":"the backplane is unavailable, try again"}"#),
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
async fn membership_call(svc: &Rc<Services>, body: &[u8], subscribe: bool) -> Answer {
    let Ok(req) = serde_json::from_slice::<MembershipBody>(body) else {
        return Answer::fixed(400, r#"{"error":"bad_request","message":"expected {\"user\":U,\"room\":R}"}"#);
    };
    if !is_valid_name(&req.user) {
        return Answer::fixed(400, r#"{"error":"bad_request","message":"user must be a valid user id"}"#);
    }
    if !is_valid_name(&req.room) {
        return Answer::fixed(400, r#"{"error":"bad_room","message":"room must be a valid room name"}"#);
    }
    let since = match req.since {
        None => None,
        Some(s) if subscribe => match crate::protocol::Epoch::new(&s.epoch) {
            Some(epoch) => Some(Position { epoch, offset: s.offset }),
            None => {
                return Answer::fixed(400, r#"{"error":"bad_request","message":"since.epoch is at most 64 bytes"}"#);
            }
        },
        Some(_) => return Answer::fixed(400, r#"{"error":"bad_request","message":"since goes with subscribe only"}"#),
    };
    let m = event::ServerMembership { subscribe, room: req.room.into_owned(), since };
    match svc.server_membership(&req.user, &m).await {
        Ok(()) => Answer::fixed(200, r#"{"ok":true}"#),
        Err(_) => Answer::fixed(503, r#"{"error":"unavailable","message":"the backplane is unavailable, try again"}"#),
    }
}

/// Most targets of one `POST /api/publish` (§12).
pub const MAX_TARGETS: usize = 1000;

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    rooms: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    users: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
}

/// Whom a publish goes to: one room or user (the reply of §4), or a list
/// (the reply with `results`, §12).
struct Targets<'a> {
    rooms: bool,
    list: bool,
    names: Vec<Cow<'a, str>>,
}

impl Targets<'_> {
    fn kind(&self) -> &'static str {
        match (self.rooms, self.list) {
            (true, false) => "room",
            (false, false) => "user",
            (true, true) => "rooms",
            (false, true) => "users",
        }
    }
}

/// `POST /api/publish` (§4, §12): to `room`, `user`, `rooms` or `users`
/// (exactly one), optionally under an `idempotency_key`.
///
/// The publishes to a list's targets are all queued first and then
/// awaited, so they travel together (one pipeline per Redis link) rather
/// than one round trip after another. A list repeating a name publishes to
/// it once per occurrence, each with its entry in `results`.
async fn publish_call(svc: &Rc<Services>, body: &[u8]) -> Answer {
    let shard = svc.shard();
    let Ok(req) = serde_json::from_slice::<PublishBody>(body) else {
        return Answer::fixed(
            400,
            r#"{"ok":false,"error":"expected {\"room\":R,\"data\":D} or {\"user\":U,\"data\":D}"}"#,
        );
    };
    let data = req.data.get();
    // An event no subscriber's queue could take is refused, not published
    // to cut every subscriber off (or be dropped by every node's reader).
    if !shard.cfg.deliverable(data.len()) {
        return Answer::fixed(413, r#"{"ok":false,"error":"too_large"}"#);
    }
    let targets = match (req.room, req.user, req.rooms, req.users) {
        (Some(room), None, None, None) if is_valid_name(&room) => {
            Targets { rooms: true, list: false, names: vec![room] }
        }
        (Some(_), None, None, None) => return Answer::fixed(400, r#"{"ok":false,"error":"bad_room"}"#),
        (None, Some(user), None, None) if is_valid_name(&user) => {
            Targets { rooms: false, list: false, names: vec![user] }
        }
        (None, None, Some(names), None) => Targets { rooms: true, list: true, names },
        (None, None, None, Some(names)) => Targets { rooms: false, list: true, names },
        (None, None, None, None) | (None, Some(_), None, None) => {
            return Answer::fixed(400, r#"{"ok":false,"error":"give exactly one of room or user"}"#);
        }
        _ => {
            return Answer::fixed(
                400,
                r#"{"ok":false,"error":"bad_request","message":"give exactly one of room, user, rooms or users"}"#,
            );
        }
    };
    if targets.list {
        if targets.names.is_empty() || targets.names.len() > MAX_TARGETS {
            return Answer::fixed(
                400,
                r#"{"ok":false,"error":"bad_request","message":"rooms and users list 1 to 1000 names"}"#,
            );
        }
        if let Some(i) = targets.names.iter().position(|n| !is_valid_name(n)) {
            let (error, what) = if targets.rooms { ("bad_room", "room name") } else { ("bad_request", "user id") };
            let body = format!(
                r#"{{"ok":false,"error":"{error}","message":"{}[{i}] is not a valid {what}"}}"#,
                targets.kind()
            );
            return Answer { status: 400, body: Bytes::from(body) };
        }
    }
    let Some(key) = req.idempotency_key else {
        return publish_to(svc, &targets, data).await;
    };
    if key.is_empty() || key.len() > idempotency::MAX_KEY {
        return Answer::fixed(
            400,
            r#"{"ok":false,"error":"bad_request","message":"idempotency_key is 1 to 64 bytes"}"#,
        );
    }
    let fp = idempotency::Fingerprint::of(targets.kind(), targets.names.iter().map(|n| &**n));
    let claim = match svc.idempotency().claim(&key, &fp).await {
        Claimed::Go(claim) => claim,
        Claimed::Replay(body) => return Answer { status: 200, body },
        Claimed::Conflict => {
            return Answer::fixed(
                409,
                r#"{"ok":false,"error":"conflict","message":"this idempotency_key was used with other targets"}"#,
            );
        }
        Claimed::InFlight => {
            return Answer::fixed(
                409,
                r#"{"ok":false,"error":"in_progress","message":"a call with this idempotency_key is still in flight, try again"}"#,
            );
        }
        Claimed::Unavailable => return Answer::fixed(503, r#"{"ok":false,"error":"unavailable"}"#),
    };
    let answer = publish_to(svc, &targets, data).await;
    let kept = (answer.status == 200).then_some(&answer.body);
    svc.idempotency().done(claim, kept).await;
    answer
}

/// How long a list's publishes wait for a congested local bus.
const CONGESTED_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// One target's publish, queued; `wait` resolves to its outcome.
enum Queued {
    Now(Result<Option<Position>, Unavailable>),
    Bus(Oneshot<bool>),
    History(Oneshot<Result<Position, Unavailable>>),
}

impl Queued {
    async fn wait(self, shard: &Shard) -> Result<Option<Position>, Unavailable> {
        match self {
            Queued::Now(r) => r,
            Queued::History(slot) => crate::history::recover::bounded(slot.wait()).await.map(Some),
            // The link answers or gives up within its own limit (a PUBLISH
            // unanswered past `DEAD_AFTER` is lost).
            Queued::Bus(slot) => match slot.wait().await {
                true => Ok(None),
                false => {
                    shard.m().bus_unavailable_total.inc();
                    Err(Unavailable)
                }
            },
        }
    }
}

/// Queues the publish to one target: into a history room through its
/// history (the reply carries the position, §4 + §7), else to the bus. The
/// answer waits until the backplane took each (with Redis: its reply to the
/// PUBLISH), so that a backend's next call, wherever it lands, comes after.
fn queue(svc: &Rc<Services>, room: bool, name: &str, data: &str) -> Queued {
    let shard = svc.shard();
    if !room {
        return match svc.publish_queued(Target::User(name), event::direct(SERVER_USER, data)) {
            Ok(Some(slot)) => Queued::Bus(slot),
            Ok(None) => Queued::Now(Ok(None)),
            Err(u) => Queued::Now(Err(u)),
        };
    }
    match svc.history_of(name) {
        Some((h, settings)) => {
            let slot = Oneshot::default();
            match h.publish(shard, name, settings, SERVER_USER, data, Some(slot.clone())) {
                Ok(()) => Queued::History(slot),
                Err(u) => Queued::Now(Err(u)),
            }
        }
        None => match svc.publish_queued(Target::Room(name), event::message(name, SERVER_USER, data)) {
            Ok(Some(slot)) => Queued::Bus(slot),
            Ok(None) => Queued::Now(Ok(None)),
            Err(u) => Queued::Now(Err(u)),
        },
    }
}

/// Publishes `data` to every target (all queued, then awaited) and answers.
/// One target: §4's reply. A list: `{"ok":true,"results":[..]}` in request
/// order, or if the backplane refused any, 503 with the same list where
/// each refused target's entry says `"error":"unavailable"` (the others
/// were published).
///
/// On the local bus a list's publishes all go into the shards' queues in
/// one turn, and past `inbox::pair_publish_limit` (about 8000 with 2
/// shards, 130 with 64) the bus refuses them as congested until the other
/// shards drain: a list waits for that (up to `CONGESTED_WAIT`) instead of
/// failing targets a moment later would take.
async fn publish_to(svc: &Rc<Services>, targets: &Targets<'_>, data: &str) -> Answer {
    let standalone = svc.shard().cfg.redis.is_none();
    let mut queued: Vec<Queued> = Vec::with_capacity(targets.names.len());
    let end = std::time::Instant::now() + CONGESTED_WAIT;
    for n in &targets.names {
        let mut q = queue(svc, targets.rooms, n, data);
        while targets.list && standalone && matches!(q, Queued::Now(Err(_))) && std::time::Instant::now() < end {
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            q = queue(svc, targets.rooms, n, data);
        }
        queued.push(q);
    }
    let mut outcomes = Vec::with_capacity(queued.len());
    for q in queued {
        outcomes.push(q.wait(svc.shard()).await);
    }
    if !targets.list {
        return match outcomes.pop() {
            Some(Ok(Some(pos))) => positioned(pos),
            Some(Ok(None)) => Answer::fixed(200, r#"{"ok":true}"#),
            _ => Answer::fixed(503, r#"{"ok":false,"error":"unavailable"}"#),
        };
    }
    let failed = outcomes.iter().any(Result::is_err);
    let mut body = Vec::with_capacity(32 + outcomes.len() * 40);
    body.extend_from_slice(if failed {
        br#"{"ok":false,"error":"unavailable","results":["#
    } else {
        br#"{"ok":true,"results":["#
    });
    for (i, (name, outcome)) in targets.names.iter().zip(&outcomes).enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(if targets.rooms { br#"{"room":"# } else { br#"{"user":"# });
        // A valid name needs no escaping; written through serde all the same.
        serde_json::to_writer(&mut body, &**name).expect("write to memory");
        match outcome {
            Ok(Some(pos)) => put_position(&mut body, pos),
            Ok(None) => {}
            Err(Unavailable) => body.extend_from_slice(br#","error":"unavailable""#),
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    Answer { status: if failed { 503 } else { 200 }, body: Bytes::from(body) }
}

/// `,"epoch":E,"offset":N`.
fn put_position(body: &mut Vec<u8>, pos: &Position) {
    body.extend_from_slice(br#","epoch":"#);
    // An epoch is a JSON-safe string once encoded.
    serde_json::to_writer(&mut *body, pos.epoch.as_str()).expect("write to memory");
    body.extend_from_slice(format!(",\"offset\":{}", pos.offset).as_bytes());
}

/// `{"ok":true,"epoch":E,"offset":N}`: a publish into a history room.
fn positioned(pos: Position) -> Answer {
    let mut body = br#"{"ok":true"#.to_vec();
    put_position(&mut body, &pos);
    body.push(b'}');
    Answer { status: 200, body: Bytes::from(body) }
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
