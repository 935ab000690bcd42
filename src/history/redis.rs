//! ⑦ Room history in Redis (PROTOCOL.md §7): one shard's history link. It
//! has no connection of its own: on every topology (one server, Sentinel,
//! Cluster, several servers) it sends the scripts to the primary owning the
//! room channel's slot over the shard's publisher links (`redis_route.rs`,
//! which says why that keeps each room's order), so the node has one
//! pipelined Redis link implementation (`bus::redis::publink`).
//!
//! The history of room R lives in Redis, shared by every node:
//!
//! - `{<prefix>room:R}:meta` — a hash: `epoch`, `offset` (the latest).
//! - `{<prefix>room:R}:log` — a stream of the last N messages, entry id
//!   `<offset>-0`, field `m` = the complete message JSON; so
//!   `XRANGE key <N+1> + COUNT k` reads by offset.
//!
//! Both keys carry the hash tag `{<prefix>room:R}`: they hash to the slot of
//! the room's channel `<prefix>room:R`, so the same scripts run on Redis
//! Cluster. Both expire `--history-ttl-secs` after the room's last publish.
//!
//! Two Lua scripts (`scripts/publish.lua`, `scripts/read.lua`), called with
//! EVALSHA (and loaded where Redis answers NOSCRIPT, `redis_route.rs`). A
//! publish is ONE atomic step in Redis: assign the offset (HINCRBY), XADD,
//! trim to N, refresh the TTLs, PUBLISH the message with its position.
//!
//! # An epoch is bound to the Redis process that wrote it
//!
//! `meta` also holds `run`: the `run_id` of the Redis process that drew the
//! epoch (new on every process start). Both scripts get the run id of the
//! process they run on as their last ARGV and compare: when `meta` is
//! missing or names another process (a restart that loaded an older RDB or
//! AOF, a promoted replica that may lack the last writes, a `MIGRATE`d slot)
//! the history cannot be trusted to hold every offset already delivered.
//! publish.lua then makes a new epoch (the node's random candidate + Redis's
//! TIME, log dropped) and starts again at offset 1, so no offset is ever
//! given to two messages, whoever holds positions; read.lua answers
//! `{'', 0}` (empty epoch: "no history yet") and writes nothing — no read
//! ever creates a history. Cost: one `recovered:false` per room after each
//! Redis restart, failover, flush or slot migration (docs/history.md).
//!
//! How a script learns the run id: choice (a) of issue 18, read once per
//! link connection, not (b) `INFO server` inside every script. Measured on
//! the 2-core dev box (2026-12-07, Redis 7.0.15, `redis-benchmark -c 1 -P
//! 32 EVALSHA` of the publish script before this change with a 60-byte
//! message, `usec_per_call` of `INFO commandstats`, 100k calls per run, 5
//! rounds alternating the variants): the script alone 13.7, 14.4, 18.4,
//! 15.9, 13.4 µs (median 14.4); plus `INFO server`, `string.match` of the
//! run id and an `HGET` 22.9, 23.5, 31.8, 23.4, 23.5 (median 23.5); the
//! same with a plain `string.find` 21.1, 23.4, 22.9, 18.7, 19.9 (median
//! 21.1). `INFO` alone was 3.9-4.5 µs per call. So (b) costs about +7 to
//! +9 µs, +45 to +65 % of Redis CPU per history publish (and read), on the
//! one thread of each primary; the box was shared, so only the order of
//! magnitude is solid. With (a) the run id
//! costs nothing per command: `bus::redis::publink` asks `INFO server` in
//! each connection's handshake, before the link takes any command (it
//! refuses commands while down, and a Redis process cannot change under a
//! live TCP connection), and appends the id to every command queued with
//! `queue_stamped`; a command sent on after `MOVED`/`ASK` has it replaced by
//! the run id of the link that sends it (`requeue`), and the `NOSCRIPT`
//! retry (`redis_route.rs`) is queued afresh, so it is stamped by its own
//! link. A link that got no run id (an ACL without `INFO`) sends `''`, and
//! the scripts then ask `INFO server` themselves (choice (b), as a fallback).
//!
//! read.lua keeps one write: the catch-up fence (`Query::fence`, ARGV[7]),
//! on a trusted history only. The binding does not make it redundant: a
//! failover from A to B and back to A, where A resynced from B (losing what
//! B lacked) and nobody published in the room while B was primary, leaves
//! `meta` naming A, so only a node that delivered the lost offsets can tell.
//!
//! In: `publish` and `read` from the shard (`history::recover`). Out: the
//! scripts, queued on the publisher's link to the channel's owner: what one
//! turn of the event loop queues goes out in one `send(2)`, and its replies
//! fill the slot of the command they answer. A command unanswered when the
//! link drops fails (`Unavailable`); a lost publish is counted
//! (`corecast_history_publish_lost_total`). The link's health is the
//! publisher's (`/readyz`).

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

use super::redis_route::{OwnerRoute, PUBLISH, READ};
use super::types::{Entry, Query, ReadResult, offset_of_id};
use crate::bus::redis::RedisBus;
use crate::config::HistorySettings;
use crate::metrics::Metrics;
use crate::protocol::event::{self, MessagePrefix};
use crate::protocol::{Epoch, Position, Unavailable};
use crate::rt::Oneshot;

pub struct HistLink {
    shard: usize,
    /// Sharded Pub/Sub (a cluster): the scripts publish with SPUBLISH.
    sharded: bool,
    metrics: Arc<Metrics>,
    prefix: Arc<str>,
    /// The node's epoch candidate, for a room whose history is new.
    candidate: Epoch,
    /// The scripts go to the owner of the room channel's slot over the
    /// publisher's links (`redis_route.rs`).
    route: Rc<OwnerRoute>,
}

/// The shard's history link on the Redis bus, on any topology.
pub fn start(bus: &RedisBus) -> Rc<HistLink> {
    Rc::new(HistLink {
        shard: bus.shard(),
        sharded: bus.topo().mode.sharded(),
        metrics: bus.metrics().clone(),
        prefix: bus.prefix().clone(),
        candidate: Epoch::random(),
        route: OwnerRoute::new(bus.publisher().clone()),
    })
}

impl HistLink {
    fn keys(&self, room: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let p = &*self.prefix;
        (
            format!("{{{p}room:{room}}}:meta").into_bytes(),
            format!("{{{p}room:{room}}}:log").into_bytes(),
            format!("{p}room:{room}").into_bytes(),
        )
    }

    /// Queues the atomic publish of `msg` in `room` at the owner of the
    /// room's channel (`SPUBLISH` in a cluster, where the readers
    /// `SSUBSCRIBE`); never waits. With `want`, the slot gets the position.
    pub fn publish(
        &self,
        room: &str,
        settings: HistorySettings,
        msg: MessagePrefix,
        want: Option<Oneshot<Result<Position, Unavailable>>>,
    ) -> Result<(), Unavailable> {
        let (meta, log, chan) = self.keys(room);
        let verb: &[u8] = if self.sharded { b"SPUBLISH" } else { b"PUBLISH" };
        let (metrics, shard) = (self.metrics.clone(), self.shard);
        let done = Box::new(move |r: Result<BytesFrame, Unavailable>| {
            let pos = match r {
                Ok(f) => {
                    let pos = parse_position(&f);
                    if pos.is_none() && !matches!(f, BytesFrame::Error(_)) {
                        crate::warn_throttled!(shard, "unexpected reply to the history publish script");
                    }
                    pos
                }
                Err(Unavailable) => {
                    metrics.shard(shard).history_publish_lost_total.inc();
                    None
                }
            };
            if let Some(s) = want {
                s.fill(pos.ok_or(Unavailable));
            }
        });
        let (size, ttl) = (settings.size.to_string(), settings.ttl.as_secs().to_string());
        let args: [&[u8]; 9] = [
            b"3",
            &meta,
            &log,
            &chan,
            msg.json(),
            self.candidate.as_str().as_bytes(),
            size.as_bytes(),
            ttl.as_bytes(),
            verb,
        ];
        self.route.run(Bytes::copy_from_slice(&chan), &PUBLISH, &args, done).map_err(|_| Unavailable)
    }

    /// Reads `room`'s history.
    pub async fn read(&self, room: &str, q: Query, settings: HistorySettings) -> Result<ReadResult, Unavailable> {
        let (meta, log, chan) = self.keys(room);
        let (epoch, after) = match &q.after {
            Some(p) => (p.epoch.as_str().as_bytes().to_vec(), p.offset.to_string()),
            None => (Vec::new(), "0".to_string()),
        };
        let limit = q.limit.min(settings.size).to_string();
        let ttl = settings.ttl.as_secs().to_string();
        let max_bytes = q.max_bytes.to_string();
        // KEYS and ARGV of read.lua (the run id is stamped on by the link).
        let args: [&[u8]; 11] = [
            b"2",
            &meta,
            &log,
            self.candidate.as_str().as_bytes(),
            ttl.as_bytes(),
            &epoch,
            after.as_bytes(),
            limit.as_bytes(),
            if q.listing { b"1" } else { b"0" },
            if q.fence { b"1" } else { b"0" },
            max_bytes.as_bytes(),
        ];
        let slot = Oneshot::default();
        let fill = slot.clone();
        let done = Box::new(move |r: Result<BytesFrame, Unavailable>| {
            fill.fill(r.ok().and_then(|f| parse_read(&f, q)).ok_or(Unavailable));
        });
        self.route.run(Bytes::from(chan), &READ, &args, done).map_err(|_| Unavailable)?;
        slot.wait().await
    }
}

fn epoch_of(f: &BytesFrame) -> Option<Epoch> {
    match f {
        BytesFrame::BulkString(s) => Epoch::new(std::str::from_utf8(s).ok()?),
        _ => None,
    }
}

fn offset_of(f: &BytesFrame) -> Option<u64> {
    match f {
        BytesFrame::Integer(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// `{epoch, offset}` from publish.lua.
fn parse_position(f: &BytesFrame) -> Option<Position> {
    match f {
        BytesFrame::Array(a) if a.len() == 2 => Some(Position { epoch: epoch_of(&a[0])?, offset: offset_of(&a[1])? }),
        _ => None,
    }
}

/// `{epoch, T, id, msg, ...}` from read.lua.
fn parse_read(f: &BytesFrame, q: Query) -> Option<ReadResult> {
    let BytesFrame::Array(a) = f else { return None };
    let pos = Position { epoch: epoch_of(a.first()?)?, offset: offset_of(a.get(1)?)? };
    let mut entries = Vec::with_capacity(a.len().saturating_sub(2) / 2);
    for pair in a[2..].chunks(2) {
        let [BytesFrame::BulkString(id), BytesFrame::BulkString(msg)] = pair else { return None };
        entries.push(Entry { offset: offset_of_id(id)?, frame: event::frame_json(msg) });
    }
    Some(ReadResult::judge(pos, q, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_of_the_scripts_parse_into_positions_and_entries() {
        let bulk = |s: &str| BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()));
        let p = parse_position(&BytesFrame::Array(vec![bulk("e1"), BytesFrame::Integer(7)])).unwrap();
        assert_eq!((p.epoch.as_str(), p.offset), ("e1", 7));
        assert!(parse_position(&BytesFrame::Array(vec![bulk("e1"), BytesFrame::Integer(-1)])).is_none());
        let e1 = Epoch::new("e1").unwrap();
        let q = Query::recover(Some(Position { epoch: e1, offset: 5 }), 10, usize::MAX);
        let reply = BytesFrame::Array(vec![
            bulk("e1"),
            BytesFrame::Integer(7),
            bulk("6-0"),
            bulk("{}"),
            bulk("7-0"),
            bulk("[]"),
        ]);
        let r = parse_read(&reply, q).unwrap();
        assert!(r.covered);
        assert_eq!(r.entries.iter().map(|e| e.offset).collect::<Vec<_>>(), [6, 7]);
        assert_eq!(&event::json_of(&r.entries[1].frame)[..], b"[]");
        assert!(parse_read(&BytesFrame::Array(vec![bulk("e1")]), q).is_none());
    }
}
