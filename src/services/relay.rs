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
//! Rooms that keep history (§7) go through the relay too, their messages
//! with their positions (each shard's live gate, `history::recover`, still
//! drops duplicates and reads holes). Their catch-up follows the *relay's*
//! subscriber link, not the shard's own: when it goes down (or blips, see
//! `bus::redis::reader`) the relay tells every shard it relays each room
//! to (`News::LinkDown`, in order with the room's messages), and that shard
//! forgets the room's confirmation and starts the room's catch-up, which
//! reads once the relay's next confirmation is passed on, as it does for
//! its own link on `RedisLink`. A join while the relay's link is down is
//! told so at once. A history message a full queue did not take is
//! followed by `News::Missed` (never dropped): the shard reads what it
//! missed, even when no later message shows it the hole.
//!
//! Standalone (the local bus) has no subscriptions.
//! `--per-shard-subscriptions` (hidden, for benchmarks) turns the relay off.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::{FxBuildHasher, FxHashMap};

use super::Services;
use crate::bus::Bus;
use crate::protocol::{Position, Target};
pub use crate::shard::RelayNews as News;
use crate::shard::ShardMsg;

/// The relay's side: rooms it holds for the node, and which shards have
/// members there, each with the number of the join it has to confirm.
#[derive(Default)]
pub struct Relay {
    rooms: RefCell<FxHashMap<Arc<str>, FxHashMap<usize, u64>>>,
    /// Relay messages and confirmations a full queue did not take, by
    /// shard, in order: they are never dropped (a lost confirmation would
    /// hold a member's `subscribed` for good, a lost edge would leave a
    /// shard's members unserved), and room messages to that shard are
    /// dropped (counted) until they are through, so that none overtakes
    /// the confirmation of its room.
    pending: RefCell<FxHashMap<usize, VecDeque<ShardMsg>>>,
    /// (shard, history room) pairs told `News::Missed` since the last
    /// message of the room that reached the shard: one at a time each, so
    /// `pending` stays bounded by the rooms.
    missed: RefCell<rustc_hash::FxHashSet<(usize, Arc<str>)>>,
}

/// How often a backlog of relay messages is offered to its queue again.
const PENDING_RETRY: Duration = Duration::from_millis(1);

impl Relay {
    /// Does `room` go through a relay on this node?
    fn relayed(svc: &Services) -> bool {
        matches!(&*svc.bus, Bus::Redis(_)) && svc.shard.peers().len() > 1 && !svc.shard.cfg.per_shard_subscriptions
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
        if !Self::relayed(svc) {
            return r.interest(Target::Room(room), on);
        }
        let relay = Self::relay_of(room, svc.shard.peers().len());
        let me = svc.shard.id;
        let room: Arc<str> = Arc::from(room);
        if relay == me {
            return Self::on_relay(svc, room, me, 0, on);
        }
        let seq = r.track(&room, on, true);
        Self::send(svc, relay, ShardMsg::Relay { room, from: me, seq, on });
    }

    /// Queues a relay message or confirmation to shard `to`, behind any
    /// that wait for room there (`pending`).
    fn send(svc: &Rc<Services>, to: usize, msg: ShardMsg) {
        let mut pending = svc.relay.pending.borrow_mut();
        if let Some(q) = pending.get_mut(&to) {
            return q.push_back(msg);
        }
        if let Err(Some(msg)) = svc.shard.send_or_full(to, msg) {
            pending.insert(to, VecDeque::from([msg]));
            drop(pending);
            let svc = svc.clone();
            monoio::spawn(async move {
                loop {
                    monoio::time::sleep(PENDING_RETRY).await;
                    let mut pending = svc.relay.pending.borrow_mut();
                    let Some(q) = pending.get_mut(&to) else { return };
                    while let Some(msg) = q.pop_front() {
                        if let Err(Some(msg)) = svc.shard.send_or_full(to, msg) {
                            q.push_front(msg);
                            break;
                        }
                    }
                    if q.is_empty() {
                        pending.remove(&to);
                        return;
                    }
                }
            });
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
            }
            if from == me {
                return;
            }
            if !r.link_is_up() {
                // As its own link would: the join is answered now, and a
                // history room catches up once the relay's link is back.
                Self::send(svc, from, ShardMsg::Relayed { room, news: News::LinkDown });
            } else if !first && r.is_confirmed(&room) {
                Self::send(svc, from, ShardMsg::Subscribed { room, seq, confirmed: true });
            }
        } else if let Some(shards) = rooms.get_mut(&room) {
            shards.remove(&from);
            svc.relay.missed.borrow_mut().remove(&(from, room.clone()));
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
            Self::send(svc, i, ShardMsg::Subscribed { room: room.clone(), seq, confirmed });
        }
    }

    /// On the relay: its subscriber link went down or came back: every
    /// shard it relays a room to hears it for that room (down: held
    /// replies go out, the confirmation is gone, a history room catches
    /// up; the reader subscribes again, and confirms, once it is back).
    pub fn on_link(svc: &Rc<Services>, up: bool) {
        let me = svc.shard.id;
        let news = if up { News::LinkUp } else { News::LinkDown };
        let to: Vec<(usize, Arc<str>)> = svc
            .relay
            .rooms
            .borrow()
            .iter()
            .flat_map(|(room, shards)| shards.keys().filter(|i| **i != me).map(|i| (*i, room.clone())))
            .collect();
        for (i, room) in to {
            Self::send(svc, i, ShardMsg::Relayed { room, news });
        }
    }

    /// On a shard the relay relays `room` to: news from the relay.
    pub fn on_news(svc: &Rc<Services>, room: &str, news: News) {
        let Bus::Redis(r) = &*svc.bus else { return };
        let known = match news {
            News::LinkDown => r.on_relay_link(&svc.shard, room, false),
            News::LinkUp => r.on_relay_link(&svc.shard, room, true),
            News::Missed => r.is_relayed(room),
        };
        if known
            && news != News::LinkUp
            && let Some(h) = &svc.history
        {
            h.catch_up_room(&svc.shard, room);
        }
    }

    /// On the relay: a message of `room` from its reader (with its
    /// position in a history room) goes to every other shard with members,
    /// one copy each (`Shard::fan_out_to_shards` explains the copy).
    pub fn pass_on(svc: &Rc<Services>, room: &str, frame: &Bytes, sent: Instant, pos: Option<&Position>) {
        let rooms = svc.relay.rooms.borrow();
        if rooms.is_empty() {
            // Not a relay (or standalone): no hash per message.
            return;
        }
        let me = svc.shard.id;
        let Some(shards) = rooms.get(room) else { return };
        if shards.len() == 1 && shards.contains_key(&me) {
            return;
        }
        let room: Arc<str> = Arc::from(room);
        // (`rooms` stays borrowed: nothing below touches it.)
        for &i in shards.keys().filter(|i| **i != me) {
            let lost = if svc.relay.pending.borrow().contains_key(&i) {
                // Its queue was full a moment ago; a confirmation waits.
                true
            } else {
                let msg = ShardMsg::Room {
                    room: room.clone(),
                    frame: Bytes::copy_from_slice(frame),
                    sent,
                    pos: pos.map(|p| Box::new(*p)),
                };
                match svc.shard.send_or_full(i, msg) {
                    Ok(()) => false,
                    Err(full) => full.is_some(),
                }
            };
            if !lost {
                if pos.is_some() && !svc.relay.missed.borrow().is_empty() {
                    // It reached the shard: a later loss is news again.
                    svc.relay.missed.borrow_mut().remove(&(i, room.clone()));
                }
                continue;
            }
            svc.shard.metrics.shard(i).inbox_dropped_total.add_shared(1);
            if pos.is_some() && svc.relay.missed.borrow_mut().insert((i, room.clone())) {
                // The history has it; the shard reads it even if no later
                // message shows it the hole.
                Self::send(svc, i, ShardMsg::Relayed { room: room.clone(), news: News::Missed });
            }
        }
    }
}
