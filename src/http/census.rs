//! `GET /api/rooms` and `GET /api/info` (PROTOCOL.md §12): what every live
//! node has, gathered by `services::census` within 2 s.

use std::rc::Rc;

use bytes::Bytes;
use http::request::Parts;
use serde::Serialize;

use super::{Reply, json, refused};
use crate::protocol::census::{self, Info, Query};
use crate::protocol::is_valid_name;
use crate::services::Services;
use crate::services::census::Census;

#[derive(Serialize)]
struct RoomsReply<'a> {
    rooms: Vec<RoomClients<'a>>,
    nodes: usize,
    /// More rooms follow the last one listed (pass it as `after`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    more: bool,
}

#[derive(Serialize)]
struct RoomClients<'a> {
    room: &'a str,
    clients: u64,
}

/// `GET /api/rooms?prefix=P&after=R&limit=K`: rooms with at least one
/// subscriber on the nodes that answered, in byte order of their names,
/// with their subscribers summed; at most `limit` (default and largest
/// 1000) per page, `"more":true` when more follow.
pub async fn rooms(svc: &Rc<Services>, head: &Parts) -> Reply {
    if let Some(r) = refused(svc, head) {
        return r;
    }
    let (mut prefix, mut after, mut limit) = (String::new(), None, Some(census::DEFAULT_ROOMS));
    for (k, v) in form_urlencoded::parse(head.uri.query().unwrap_or("").as_bytes()) {
        match &*k {
            "prefix" => prefix = v.into_owned(),
            "after" => after = Some(v.into_owned()),
            "limit" => limit = v.parse::<usize>().ok().filter(|n| (1..=census::MAX_ROOMS).contains(n)),
            _ => {}
        }
    }
    let Some(limit) = limit else {
        return json(400, r#"{"error":"bad_request","message":"limit must be an integer from 1 to 1000"}"#);
    };
    if prefix.len() > 128 || after.as_deref().is_some_and(|a| !is_valid_name(a)) {
        return json(400, r#"{"error":"bad_request","message":"prefix is at most 128 bytes; after is a room name"}"#);
    }
    // One more than the page: whether more follow is then known.
    let query = Query::Rooms { prefix: prefix.into(), after: after.map(Into::into), limit: limit + 1 };
    let Ok(answers) = Census::ask(svc, query).await else {
        return unavailable();
    };
    let nodes = answers.len();
    let (rooms, more) = census::merge_rooms(answers.into_iter().filter_map(|a| a.rooms), limit);
    let reply = RoomsReply {
        rooms: rooms.iter().map(|(room, clients)| RoomClients { room, clients: *clients }).collect(),
        nodes,
        more,
    };
    ok(&reply)
}

#[derive(Serialize)]
struct InfoReply {
    nodes: Vec<Info>,
}

/// `GET /api/info`: one entry per node that answered, in order of id.
pub async fn info(svc: &Rc<Services>, head: &Parts) -> Reply {
    if let Some(r) = refused(svc, head) {
        return r;
    }
    let Ok(answers) = Census::ask(svc, Query::Info).await else {
        return unavailable();
    };
    let mut nodes: Vec<Info> = answers.into_iter().filter_map(|a| a.info).collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    ok(&InfoReply { nodes })
}

fn ok(body: &impl Serialize) -> Reply {
    Reply::new(200, "application/json", Bytes::from(serde_json::to_vec(body).expect("serialize to memory")))
}

fn unavailable() -> Reply {
    json(503, r#"{"error":"unavailable","message":"the backplane is unavailable, try again"}"#)
}
