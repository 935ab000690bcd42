//! One Redis subscription per room per node (issue 21): with Redis and
//! several shards, a room's channel is held by one shard of the node, the
//! room's *holder*, whatever shards its members are on. The holder's reader
//! hands each message to the holder, which delivers to its own members and
//! passes one copy to each other shard with members over the per-pair
//! queues, woken once per turn. Redis then writes each message once per
//! node, not once per shard with members.
//!
//! Who holds a room is decided by the room's *directory* shard
//! (`directory_of`, a hash of the name), which every shard tells when it
//! gets the room's first member or loses its last (`ShardMsg::Relay`, with
//! the join's number): the first shard with members becomes the holder, and
//! stays so while any shard of the node has members (or until it has let
//! the subscription go: `ShardMsg::Released`). The directory passes each
//! change on to the holder (`ShardMsg::Hold`), which subscribes when the
//! first shard is interested and unsubscribes when the last one is gone.
//! So a room whose members are all on one shard (a chat of two, a user's
//! own room) is held there and costs no hop, and a holder never changes
//! while it still relays: no shard hears a room from two holders. The
//! directory only sees joins and leaves, never a message.
//!
//! The holder treats its own members like any other shard's: each shard's
//! state of the room (`RedisBus::track`, relayed) follows the confirmations
//! the holder passes on for its join (`ShardMsg::Subscribed`), so a
//! member's `subscribed` still leaves only once Redis has the room, and the
//! holder's own subscription is apart from it (`RedisBus::hold`). Order:
//! one reader, one holder, one queue per pair of shards, so every member
//! sees a room's messages in the order Redis ran the PUBLISHes. A message
//! the shard's own reader still brings for a room it no longer holds (sent
//! before its UNSUBSCRIBE reached Redis) is dropped: its members hear the
//! room from the holder.
//!
//! Rooms that keep history (§7) go through the holder too, their messages
//! with their positions (each shard's live gate, `history::recover`, still
//! drops duplicates and reads holes). Their catch-up follows the *holder's*
//! subscriber link, not the shard's own: when it goes down (or blips, see
//! `bus::redis::reader`) the holder tells every shard it relays each room
//! to (`News::LinkDown`, in order with the room's messages, for that
//! shard's join), and that shard forgets the room's confirmation and starts
//! the room's catch-up, which reads once the holder's next confirmation is
//! passed on. A join while the holder's link is down is told so at once. A
//! history message a full queue did not take is followed by `News::Missed`
//! (never dropped): the shard reads what it missed, even when no later
//! message shows it the hole.
//!
//! Standalone (the local bus) has no subscriptions, one shard needs no
//! relay, and `--per-shard-subscriptions` (hidden, for benchmarks) turns it
//! off: each shard then subscribes for its own members.

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

#[derive(Default)]
pub struct Relay {
    /// As a directory: the rooms whose names hash here, with their holder.
    directory: RefCell<FxHashMap<Arc<str>, Entry>>,
    /// As a holder: the rooms this shard holds for the node, and which
    /// shards (this one too) have members there, each with the number of
    /// the join it has to confirm.
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

/// A room in its directory.
struct Entry {
    holder: usize,
    /// Shards with members (each tells `on`, then `off`, in turn).
    shards: usize,
    /// Times the holder was told its last shard left, not yet answered
    /// with `Released`: while any is out, the holder keeps the room.
    unreleased: usize,
}

/// How often a backlog of relay messages is offered to its queue again.
const PENDING_RETRY: Duration = Duration::from_millis(1);

impl Relay {
    /// Do rooms go through a holder on this node?
    fn relayed(svc: &Services) -> bool {
        matches!(&*svc.bus, Bus::Redis(_)) && svc.shard.peers().len() > 1 && !svc.shard.cfg.per_shard_subscriptions
    }

    /// The shard that keeps `room`'s directory on every node.
    pub fn directory_of(room: &str, shards: usize) -> usize {
        (FxBuildHasher.hash_one(room) % shards as u64) as usize
    }

    /// This shard got the first member of `room` (`on`) or lost its last:
    /// the bus hears of it, through the room's directory and holder when
    /// the node relays.
    pub fn interest(svc: &Rc<Services>, room: &str, on: bool) {
        let Bus::Redis(r) = &*svc.bus else {
            return svc.bus.interest(&svc.shard, Target::Room(room), on);
        };
        if !Self::relayed(svc) {
            return r.interest(Target::Room(room), on);
        }
        let room: Arc<str> = Arc::from(room);
        let seq = r.track(&room, on, true);
        let to = Self::directory_of(&room, svc.shard.peers().len());
        Self::tell(svc, to, ShardMsg::Relay { room, from: svc.shard.id, seq, on });
    }

    /// A relay message from another shard, or from this one to itself.
    pub fn handle(svc: &Rc<Services>, msg: ShardMsg) {
        match msg {
            ShardMsg::Relay { room, from, seq, on } => Self::on_relay(svc, room, from, seq, on),
            ShardMsg::Hold { room, from, seq, on } => Self::on_hold(svc, room, from, seq, on),
            ShardMsg::Released { room } => Self::on_released(svc, &room),
            ShardMsg::Relayed { room, seq, news } => Self::on_news(svc, &room, seq, news),
            ShardMsg::Subscribed { room, seq, confirmed } => {
                // A confirmation for this shard's own join, from itself as
                // the holder (`RedisBus::on_subscribed` returns false).
                svc.bus.on_subscribed(&svc.shard, &room, seq, confirmed);
            }
            _ => unreachable!("not a relay message"),
        }
    }

    /// Sends `msg` to shard `to`, or handles it here when `to` is this
    /// shard.
    fn tell(svc: &Rc<Services>, to: usize, msg: ShardMsg) {
        if to == svc.shard.id { Self::handle(svc, msg) } else { Self::send(svc, to, msg) }
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

    /// On the directory: shard `from` has members of `room` now (`on`, for
    /// its join `seq`) or has none any more. The first such shard becomes
    /// the holder; the holder hears every change.
    fn on_relay(svc: &Rc<Services>, room: Arc<str>, from: usize, seq: u64, on: bool) {
        let holder = {
            let mut directory = svc.relay.directory.borrow_mut();
            if on {
                let e = directory.entry(room.clone()).or_insert(Entry { holder: from, shards: 0, unreleased: 0 });
                e.shards += 1;
                e.holder
            } else {
                let Some(e) = directory.get_mut(&room) else { return };
                e.shards = e.shards.saturating_sub(1);
                if e.shards == 0 {
                    e.unreleased += 1;
                }
                e.holder
            }
        };
        Self::tell(svc, holder, ShardMsg::Hold { room, from, seq, on });
    }

    /// On the directory: the holder let `room` go once more.
    fn on_released(svc: &Rc<Services>, room: &str) {
        let mut directory = svc.relay.directory.borrow_mut();
        if let Some(e) = directory.get_mut(room) {
            e.unreleased = e.unreleased.saturating_sub(1);
            if e.unreleased == 0 && e.shards == 0 {
                directory.remove(room);
            }
        }
    }

    /// On the holder: shard `from` has members of `room` now (`on`, for its
    /// join `seq`) or has none any more.
    fn on_hold(svc: &Rc<Services>, room: Arc<str>, from: usize, seq: u64, on: bool) {
        let Bus::Redis(r) = &*svc.bus else { return };
        let mut rooms = svc.relay.rooms.borrow_mut();
        if on {
            let shards = rooms.entry(room.clone()).or_default();
            let first = shards.is_empty();
            shards.insert(from, seq);
            drop(rooms);
            if first {
                r.hold(&room, true);
                svc.shard.m().relay_rooms.inc();
            }
            if !r.link_is_up() {
                // As its own link would: the join is answered now, and a
                // history room catches up once the holder's link is back.
                Self::tell(svc, from, ShardMsg::Relayed { room, seq, news: News::LinkDown });
            } else if !first && r.is_confirmed(&room) {
                Self::tell(svc, from, ShardMsg::Subscribed { room, seq, confirmed: true });
            }
        } else {
            let gone = rooms.get_mut(&room).is_none_or(|shards| {
                shards.remove(&from);
                shards.is_empty()
            });
            svc.relay.missed.borrow_mut().remove(&(from, room.clone()));
            if gone {
                if rooms.remove(&room).is_some() {
                    svc.shard.m().relay_rooms.sub(1);
                }
                drop(rooms);
                r.hold(&room, false);
                let to = Self::directory_of(&room, svc.shard.peers().len());
                Self::tell(svc, to, ShardMsg::Released { room });
            }
        }
    }

    /// On the holder: Redis confirmed (or the reader released) its
    /// subscription to `room`; each shard it relays to (this one too)
    /// hears it for its own join.
    pub fn on_subscribed(svc: &Rc<Services>, room: &str, confirmed: bool) {
        let Some(shards) = svc.relay.rooms.borrow().get(room).cloned() else { return };
        let room: Arc<str> = Arc::from(room);
        for (i, seq) in shards {
            Self::tell(svc, i, ShardMsg::Subscribed { room: room.clone(), seq, confirmed });
        }
    }

    /// On a holder: its subscriber link went down or came back: every
    /// shard it relays a room to (this one too) hears it for that room
    /// (down: held replies go out, the confirmation is gone, a history room
    /// catches up; the reader subscribes again, and confirms, once it is
    /// back).
    pub fn on_link(svc: &Rc<Services>, up: bool) {
        let news = if up { News::LinkUp } else { News::LinkDown };
        let to: Vec<(usize, u64, Arc<str>)> = svc
            .relay
            .rooms
            .borrow()
            .iter()
            .flat_map(|(room, shards)| shards.iter().map(|(i, seq)| (*i, *seq, room.clone())))
            .collect();
        for (i, seq, room) in to {
            Self::tell(svc, i, ShardMsg::Relayed { room, seq, news });
        }
    }

    /// On a shard the holder relays `room` to: news from the holder, for
    /// the join `seq` (older news, for a join since undone, is dropped).
    fn on_news(svc: &Rc<Services>, room: &str, seq: u64, news: News) {
        let Bus::Redis(r) = &*svc.bus else { return };
        if !r.is_relayed_join(room, seq) {
            return;
        }
        match news {
            News::LinkDown => r.on_relay_link(&svc.shard, room, false),
            News::LinkUp => return r.on_relay_link(&svc.shard, room, true),
            News::Missed => {}
        };
        if let Some(h) = &svc.history {
            h.catch_up_room(&svc.shard, room);
        }
    }

    /// A message of `room` from this shard's reader (with its position in
    /// a history room): on the holder it goes to every other shard with
    /// members, one copy each (`Shard::fan_out_to_shards` explains the
    /// copy). False when this shard's members must not get it from here: a
    /// node that relays, and this shard no longer holds the room (its
    /// UNSUBSCRIBE had not reached Redis yet; its members hear the room
    /// from the holder).
    pub fn pass_on(svc: &Rc<Services>, room: &str, frame: &Bytes, sent: Instant, pos: Option<&Position>) -> bool {
        let rooms = svc.relay.rooms.borrow();
        if rooms.is_empty() {
            // Holds nothing (or standalone): no hash per message.
            return !Self::relayed(svc);
        }
        let me = svc.shard.id;
        let Some(shards) = rooms.get(room) else { return !Self::relayed(svc) };
        if shards.len() == 1 && shards.contains_key(&me) {
            return true;
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
                    from_reader: false,
                };
                match svc.shard.send_or_full(i, msg) {
                    Ok(()) => false,
                    Err(full) => full.is_some(),
                }
            };
            if !lost {
                svc.shard.m().relay_passed_total.inc();
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
                let seq = shards[&i];
                Self::send(svc, i, ShardMsg::Relayed { room: room.clone(), seq, news: News::Missed });
            }
        }
        true
    }
}
