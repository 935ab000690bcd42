//! One Redis subscription per room per node (issue 21): with Redis and
//! several shards, a plain room's channel is held by one shard of the node,
//! the room's *relay* (`relay_of`, a hash of the name), whatever shards its
//! members are on. The relay's reader hands each message to the relay, which
//! delivers to its own members and passes one copy to each other shard with
//! members over the per-pair queues (`Shard::send_room_to`), woken once per
//! turn; a room whose members are all on the relay shard costs no hop.
//! Redis then writes each message once per node, not once per shard with
//! members.
//!
//! A shard that gets a room's first member tells the relay
//! (`ShardMsg::Relay` with the join's number); the relay subscribes when the
//! first shard is interested and unsubscribes when the last one is gone,
//! and passes each confirmation (or release) of its subscription on, so
//! that a member's `subscribed` still leaves only once Redis has the room
//! (`RedisBus::track`, `relayed`). Order: one reader, one relay, one queue
//! per pair of shards, so every member sees a room's messages in the order
//! Redis ran the PUBLISHes, as before.
//!
//! Rooms that keep history (§7) keep one subscription per shard: their
//! catch-up after a subscriber link comes back reads per shard, from the
//! shard's own link's state. Standalone (the local bus) has no subscriptions.
//! `--per-shard-subscriptions` (hidden, for benchmarks) turns the relay off.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rustc_hash::{FxBuildHasher, FxHashMap};

use super::Services;
use crate::bus::Bus;
use crate::protocol::Target;
use crate::shard::ShardMsg;

/// The relay's side: rooms it holds for the node, and which shards have
/// members there, each with the number of the join it has to confirm.
#[derive(Default)]
pub struct Relay {
    rooms: RefCell<FxHashMap<Arc<str>, FxHashMap<usize, u64>>>,
}

impl Relay {
    /// Does `room` go through a relay on this node?
    fn relayed(svc: &Services, room: &str) -> bool {
        matches!(&*svc.bus, Bus::Redis(_))
            && svc.shard.peers().len() > 1
            && !svc.shard.cfg.per_shard_subscriptions
            && svc.shard.cfg.namespaces.history(room).is_none()
    }

    /// The shard that holds `room`'s subscription on every node.
    pub fn relay_of(room: &str, shards: usize) -> usize {
        (FxBuildHasher.hash_one(room) % shards as u64) as usize
    }

    /// This shard got the first member of `room` (`on`) or lost its last:
    /// the bus hears of it, through the relay when the room has one.
    pub fn interest(svc: &Rc<Services>, room: &str, on: bool) {
        let Bus::Redis(r) = &*svc.bus else {
            return svc.bus.interest(&svc.shard, Target::Room(room), on);
        };
        if !Self::relayed(svc, room) {
            return r.interest(Target::Room(room), on);
        }
        let relay = Self::relay_of(room, svc.shard.peers().len());
        let me = svc.shard.id;
        let room: Arc<str> = Arc::from(room);
        if relay == me {
            return Self::on_relay(svc, room, me, 0, on);
        }
        let seq = r.track(&room, on, true);
        if let Err(ShardMsg::Relay { .. }) = svc.shard.send_to(relay, ShardMsg::Relay { room, from: me, seq, on }) {
            // The relay's queue is full (it is far behind): this member's
            // reply is not held for it, and the room stays unserved here
            // until the next edge. Counted like any dropped inbox message.
            svc.shard.m().inbox_dropped_total.inc();
        }
    }

    /// On the relay: shard `from` has members of `room` now (`on`, for its
    /// join `seq`) or has none any more.
    pub fn on_relay(svc: &Rc<Services>, room: Arc<str>, from: usize, seq: u64, on: bool) {
        let Bus::Redis(r) = &*svc.bus else { return };
        let me = svc.shard.id;
        let mut rooms = svc.relay.rooms.borrow_mut();
        if on {
            let shards = rooms.entry(room.clone()).or_default();
            let first = shards.is_empty();
            shards.insert(from, seq);
            drop(rooms);
            if first {
                r.interest(Target::Room(&room), true);
            } else if from != me && r.is_confirmed(&room) {
                let _ = svc.shard.send_to(from, ShardMsg::Subscribed { room, seq, confirmed: true });
            }
        } else if let Some(shards) = rooms.get_mut(&room) {
            shards.remove(&from);
            if shards.is_empty() {
                rooms.remove(&room);
                drop(rooms);
                r.interest(Target::Room(&room), false);
            }
        }
    }

    /// On the relay: Redis confirmed (or the reader released) its
    /// subscription to `room`; the shards it relays to hear it for their
    /// own joins.
    pub fn on_subscribed(svc: &Rc<Services>, room: &str, confirmed: bool) {
        let me = svc.shard.id;
        let Some(shards) = svc.relay.rooms.borrow().get(room).cloned() else { return };
        let room: Arc<str> = Arc::from(room);
        for (i, seq) in shards.into_iter().filter(|(i, _)| *i != me) {
            let _ = svc.shard.send_to(i, ShardMsg::Subscribed { room: room.clone(), seq, confirmed });
        }
    }

    /// On the relay: its subscriber link went down: every relayed room is
    /// released (the reader subscribes again, and confirms, once it is back).
    pub fn on_link(svc: &Rc<Services>, up: bool) {
        if up {
            return;
        }
        let rooms: Vec<Arc<str>> = svc.relay.rooms.borrow().keys().cloned().collect();
        for room in rooms {
            Self::on_subscribed(svc, &room, false);
        }
    }

    /// On the relay: a message of `room` from its reader goes to every
    /// other shard with members, one copy each (`Shard::fan_out_to_shards`
    /// explains the copy).
    pub fn pass_on(svc: &Rc<Services>, room: &str, frame: &Bytes, sent: Instant) {
        let me = svc.shard.id;
        let rooms = svc.relay.rooms.borrow();
        let Some(shards) = rooms.get(room) else { return };
        if shards.len() == 1 && shards.contains_key(&me) {
            return;
        }
        for &i in shards.keys().filter(|i| **i != me) {
            svc.shard.send_room_to(i, Arc::from(room), Bytes::copy_from_slice(frame), sent);
        }
    }
}
