//! Standalone history: reaching a room's owner shard (`ring::owner_of`)
//! through the inboxes, and the owner's side.
//!
//! A publish in a room with history goes to the room's owner, which assigns
//! the offset, stores the frame in its ring and fans it out to every shard
//! with members (itself included; `shard::interest`) as
//! `ShardMsg::Room { pos: Some(..) }`. A read goes to the owner too and its
//! answer comes back as `Msg::Reply`. The owner's fan-out and its replies to
//! a shard travel on one queue (one per ordered pair of shards, FIFO), so a
//! shard receives the owner's fan-out of every message up to T before the
//! answer of a read that found T: the merge in `recover.rs` then never sees
//! a gap. A shard without members gets no fan-out; one that subscribes sets
//! its interest bit before it sends its read, so the owner either sees the
//! bit when it publishes (live) or has the message in its ring when it
//! answers the read (the read is handled after the publish), and the merge
//! drops the one it gets twice.
//!
//! In: `Msg` from other shards' inboxes, local calls. Out: `ShardMsg`s to
//! other shards, slots filled for the task that asked.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::recover::{STORE_WAIT, ShardHistory};
use super::ring::owner_of;
use super::types::{Msg, Query, ReadResult, Reply};
use crate::config::HistorySettings;
use crate::protocol::event::MessagePrefix;
use crate::protocol::{Position, Target, Unavailable};
use crate::rt::Oneshot;
use crate::shard::{Shard, ShardMsg};

/// What a task on this shard waits for.
pub(super) enum Waiting {
    Published(Oneshot<Result<Position, Unavailable>>),
    Read(Oneshot<Result<ReadResult, Unavailable>>),
}

/// Publishes in `room` through its owner. With `want`, the slot gets the
/// message's position.
pub fn publish(
    shard: &Rc<Shard>,
    h: &Rc<ShardHistory>,
    room: &str,
    settings: HistorySettings,
    msg: MessagePrefix,
    want: Option<Oneshot<Result<Position, Unavailable>>>,
) -> Result<(), Unavailable> {
    // The owner fans out to the shards with members: refused while our
    // queue to the owner or the owner's to any shard is congested, like
    // every local-bus publish (`shard::inbox` policy), which keeps the other
    // half of each queue for replies and control messages.
    let owner = owner_of(room, shard.peers().len());
    if shard.peers().len() > 1 && shard.peers_congested_via(owner) {
        return Err(Unavailable);
    }
    if owner == shard.id {
        let pos = own_publish(shard, h, room, settings, msg);
        if let Some(slot) = want {
            slot.fill(Ok(pos));
        }
        return Ok(());
    }
    let token = match want {
        Some(slot) => h.wait_for(Waiting::Published(slot)),
        None => 0,
    };
    let msg = Msg::Publish { room: Arc::from(room), settings, msg, reply_to: shard.id, token };
    if shard.send_to(owner, ShardMsg::History(Box::new(msg))).is_err() {
        h.forget_token(token);
        return Err(Unavailable);
    }
    Ok(())
}

/// Reads `room`'s history from its owner.
pub async fn read(shard: &Shard, h: &ShardHistory, room: &str, q: Query) -> Result<ReadResult, Unavailable> {
    let owner = owner_of(room, shard.peers().len());
    if owner == shard.id {
        return Ok(h.rings().read(room, q, Instant::now()));
    }
    let slot = Oneshot::default();
    let token = h.wait_for(Waiting::Read(slot.clone()));
    let msg = Msg::Read { room: Arc::from(room), q, reply_to: shard.id, token };
    if shard.send_to(owner, ShardMsg::History(Box::new(msg))).is_err() {
        h.forget_token(token);
        return Err(Unavailable);
    }
    // A stalled owner: `unavailable` after `STORE_WAIT`, never a hang (a
    // reply that comes later finds no one waiting and is dropped).
    match monoio::time::timeout(STORE_WAIT, slot.wait()).await {
        Ok(r) => r,
        Err(_) => {
            h.forget_token(token);
            Err(Unavailable)
        }
    }
}

/// The owner: assigns, stores, fans out to every shard with members (this
/// one directly).
fn own_publish(
    shard: &Rc<Shard>,
    h: &Rc<ShardHistory>,
    room: &str,
    settings: HistorySettings,
    msg: MessagePrefix,
) -> Position {
    let sent = Instant::now();
    let (pos, frame) = h.with_rings(shard, |r| r.publish(room, settings, msg, sent));
    // The one cross-shard path (copies, order behind older queued messages);
    // this shard's own members through the live gate, now or when the inbox
    // hands the held message out.
    if shard.fan_out_to_shards(Target::Room(room), &frame, sent, Some(pos)) {
        h.on_live(shard, room, pos, frame, sent);
    }
    pos
}

/// A `ShardMsg::History` arrived.
pub fn handle(shard: &Rc<Shard>, h: &Rc<ShardHistory>, msg: Msg) {
    match msg {
        Msg::Publish { room, settings, msg, reply_to, token } => {
            let pos = own_publish(shard, h, &room, settings, msg);
            if token != 0 {
                reply(shard, h, reply_to, token, Reply::Published(pos));
            }
        }
        Msg::Read { room, q, reply_to, token } => {
            let r = h.rings().read(&room, q, Instant::now());
            reply(shard, h, reply_to, token, Reply::Read(r));
        }
        Msg::Reply { token, reply } => h.answer(token, reply),
    }
}

/// Sends a reply to shard `to`. A full pair queue never drops it: it waits
/// in the owner's list of unsent replies (behind the ones already there,
/// in order) and is sent again every `RETRY` until the queue takes it. A
/// shard that stopped (shutdown) no longer waits for it.
fn reply(shard: &Rc<Shard>, h: &Rc<ShardHistory>, to: usize, token: u64, reply: Reply) {
    let msg = ShardMsg::History(Box::new(Msg::Reply { token, reply }));
    let mut unsent = h.unsent();
    if unsent.is_empty() {
        match shard.send_or_full(to, msg) {
            Ok(()) | Err(None) => return,
            Err(Some(msg)) => unsent.push_back((to, msg)),
        }
    } else {
        unsent.push_back((to, msg));
    }
    if unsent.len() == 1 {
        drop(unsent);
        monoio::spawn(resend(shard.clone(), h.clone()));
    }
}

/// How often the owner tries again to send its unsent replies.
const RETRY: Duration = Duration::from_millis(1);

/// Sends the unsent replies as the queues take them; ends when none is left.
async fn resend(shard: Rc<Shard>, h: Rc<ShardHistory>) {
    loop {
        monoio::time::sleep(RETRY).await;
        let mut unsent = h.unsent();
        while let Some((to, msg)) = unsent.pop_front() {
            if let Err(Some(msg)) = shard.send_or_full(to, msg) {
                shard.m().history_replies_retried_total.inc();
                unsent.push_front((to, msg));
                break;
            }
        }
        if unsent.is_empty() {
            return;
        }
    }
}
