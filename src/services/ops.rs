//! Client ops on `/ws` (PROTOCOL.md §2): parse, act on the shard, reply.

use std::rc::Rc;

use super::Services;
use super::expiry;
use super::presence::Presence;
use crate::config::ClientPublish;
use crate::conn::{Conn, limits};
use crate::protocol::presence::Read;
use crate::protocol::{ClientOp, ErrorCode, Target, event};
use crate::shard::Shard;

/// One complete client message (the frame loop's `OnMessage`).
pub fn handle(svc: &Rc<Services>, conn: &Rc<Conn>, text: bool, payload: &[u8]) {
    let shard = svc.shard();
    // An expired token ends the connection whatever the op (`services::expiry`).
    if expiry::check_expiry(shard, conn) {
        return;
    }
    // Every frame counts against the rate, garbage too; a refused one is
    // parsed only to echo its id.
    let verdict = limits::take_op(shard, conn);
    if verdict != limits::Verdict::Allow {
        let id = if text { ClientOp::parse(payload).map_or_else(|e| e.id, |(_, id)| id) } else { None };
        return limits::refuse_op(shard, conn, verdict, id);
    }
    if !text {
        // Every frame is a UTF-8 JSON text frame (§2).
        return refuse(shard, conn, ErrorCode::BadRequest, "binary frames are not supported", None);
    }
    let (op, id) = match ClientOp::parse(payload) {
        Ok(parsed) => parsed,
        Err(e) => return refuse(shard, conn, e.code, e.message, e.id),
    };
    let Some(me) = conn.user() else { return };
    match op {
        ClientOp::Subscribe { room, since, token } => {
            // §13: a subscription token grants the room by itself.
            let room_token = match token {
                Some(t) => match expiry::check_room_token(svc, &me, &room, &t) {
                    Ok(exp) => Some(exp),
                    Err((code, why)) => return refuse(shard, conn, code, why, id),
                },
                None => None,
            };
            if room_token.is_none() && !expiry::may_subscribe(conn, &room) {
                return refuse(shard, conn, ErrorCode::Forbidden, "the token does not allow this room", id);
            }
            if limits::too_many_rooms(shard, conn, &room) {
                shard.m().room_limit_refusals_total.inc();
                return refuse(shard, conn, ErrorCode::TooLarge, "too many rooms on this connection", id);
            }
            if let Some(exp) = room_token {
                expiry::grant_room(svc, conn, &room, exp);
            }
            // §7: position and recovery in a history room (the reply after
            // the read); with Redis, the reply held until this node is
            // subscribed there.
            svc.subscribe(conn, &room, since, id);
        }
        ClientOp::History { room, limit, since } => {
            let Some((h, settings)) = svc.history_of(&room) else {
                return refuse(shard, conn, ErrorCode::BadRequest, "this room keeps no history", id);
            };
            if !expiry::may_subscribe(conn, &room) {
                return refuse(shard, conn, ErrorCode::Forbidden, "the token does not allow this room", id);
            }
            h.history_op(shard, conn, &room, settings, limit, since, id);
        }
        ClientOp::Unsubscribe { room } => {
            expiry::forget_room(conn, &room);
            svc.leave(conn, &room);
            conn.push(shard, event::membership("unsubscribed", &room, id));
        }
        ClientOp::Publish { room, data } => {
            if !conn.allows(&room) {
                return refuse(shard, conn, ErrorCode::Forbidden, "the token does not allow this room", id);
            }
            // §10: the namespace's `client_publish`.
            match shard.cfg.namespaces.of(&room).client_publish {
                ClientPublish::Any => {}
                ClientPublish::Members if conn.with_rooms(|rs| rs.iter().any(|r| **r == *room)) => {}
                ClientPublish::Members => {
                    return refuse(shard, conn, ErrorCode::Forbidden, "only the room's members may publish here", id);
                }
                ClientPublish::None => {
                    return refuse(
                        shard,
                        conn,
                        ErrorCode::Forbidden,
                        "this room takes publishes from the server only",
                        id,
                    );
                }
            }
            if !shard.cfg.namespaces.of(&room).deliver_to_publisher {
                // §10: this connection does not get its own message back.
                let prefix = event::message_prefix(&room, &me, data);
                conn.expect_own(shard, bytes::Bytes::copy_from_slice(prefix.json()));
            }
            // §7: in a history room, the room's authority assigns the offset.
            published(shard, conn, svc.publish_to_room(&room, &me, data), id);
        }
        ClientOp::Send { user, data } => {
            // §13: a token with `"dm": false` may not send.
            if !expiry::may_send(conn) {
                return refuse(shard, conn, ErrorCode::Forbidden, "the token does not allow direct messages", id);
            }
            let frame = event::direct(&me, data);
            published(shard, conn, svc.publish(Target::User(&user), frame), id);
        }
        ClientOp::Presence { room, after, limit } => presence_op(svc, conn, &room, after.map(Box::from), limit, id),
        ClientOp::PresenceStats { room } => presence_op(svc, conn, &room, None, 0, id),
        ClientOp::Ping => {
            conn.push(shard, event::reply("pong", id));
        }
        ClientOp::Refresh { token, room: Some(room) } => {
            if let Err((code, why)) = expiry::refresh_room(svc, conn, &me, &room, &token, id) {
                if code == ErrorCode::RateLimited {
                    shard.m().rate_limited_total.inc();
                }
                refuse(shard, conn, code, why, id)
            }
        }
        ClientOp::Refresh { token, room: None } => match expiry::refresh(svc, conn, &me, &token, id) {
            Ok(()) => {}
            Err(ErrorCode::BadRequest) => refuse(shard, conn, ErrorCode::BadRequest, "auth is not enabled", id),
            Err(ErrorCode::RateLimited) => {
                shard.m().rate_limited_total.inc();
                refuse(shard, conn, ErrorCode::RateLimited, "too many refreshes, slow down", id)
            }
            Err(code) => refuse(shard, conn, code, "the token is invalid, expired or for another user", id),
        },
    }
}

/// `presence` and (`limit` 0) `presence_stats` (§11): the grant of
/// `subscribe`, not a subscription; the reply when the store answered.
fn presence_op(
    svc: &Rc<Services>,
    conn: &Rc<Conn>,
    room: &str,
    after: Option<Box<str>>,
    limit: usize,
    id: Option<&str>,
) {
    let shard = svc.shard();
    if !shard.cfg.namespaces.of(room).presence {
        return refuse(shard, conn, ErrorCode::BadRequest, "this room keeps no presence", id);
    }
    if !expiry::may_subscribe(conn, room) {
        return refuse(shard, conn, ErrorCode::Forbidden, "the token does not allow this room", id);
    }
    let (svc, conn, room, id) = (svc.clone(), conn.clone(), Box::<str>::from(room), id.map(Box::<str>::from));
    monoio::spawn(async move {
        let r = Presence::read(&svc, &room, Read { after, limit }).await;
        let shard = svc.shard();
        match r {
            Ok(page) => {
                conn.push(shard, event::presence(&room, &page, limit == 0, id.as_deref()));
            }
            Err(_) => refuse(shard, &conn, ErrorCode::Unavailable, "presence is unavailable, try again", id.as_deref()),
        }
    });
}

fn published(shard: &Shard, conn: &Rc<Conn>, r: Result<(), crate::protocol::Unavailable>, id: Option<&str>) {
    match (r, id) {
        (Ok(()), Some(id)) => {
            conn.push(shard, event::reply("ack", Some(id)));
        }
        (Ok(()), None) => {}
        // Ops without an id are not answered; the refusal is counted.
        (Err(_), None) => {}
        (Err(_), Some(id)) => {
            refuse(shard, conn, ErrorCode::Unavailable, "the backplane is unavailable, try again", Some(id))
        }
    }
}

fn refuse(shard: &Shard, conn: &Rc<Conn>, code: ErrorCode, message: &str, id: Option<&str>) {
    shard.m().client_errors_total.inc();
    conn.push(shard, event::error(code, message, id));
}
