//! The embedded local bus: a room message goes straight into the inbox of
//! every other shard that has members of the room, a direct message into
//! every other shard's, each its own copy of the frame and name, and is delivered to this shard's
//! own members without a hop (Seastar's `invoke_on` vs `local()`).
//!
//! Which shards have members is the node's interest table
//! (`shard::interest`): each shard sets its bit for a room when its first
//! member joins and clears it when its last leaves, before the member's
//! `subscribed` reply is sent, so a message published after that reply
//! reaches the member's shard. A shard without members gets nothing (a
//! hash collision in the table may still send it one it drops after one
//! lookup, as every shard did before). Direct messages are not routed by
//! interest (a filter selective for users would cost megabytes, see
//! `shard::interest`): every shard gets them. The sends are queued on per-pair queues and each receiving shard
//! is woken once at the end of the publishing shard's turn (`shard::peers`).
//!
//! Order: what this shard delivers itself waits behind what other shards
//! queued to it before (`shard::inbox`, "Order across shards"), so a publish
//! accepted before another began is delivered first on every shard.
//!
//! While the queue to a shard the message would go to is congested (past
//! `inbox::pair_publish_limit`), publishes are refused with `unavailable`:
//! back-pressure to the client rather than a silent drop (the inbox policy
//! is in `shard::inbox`).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{Target, Unavailable};
use crate::shard::{Shard, ShardMsg};

pub fn publish(shard: &Shard, target: Target<'_>, frame: Bytes) -> Result<(), Unavailable> {
    let sent = Instant::now();
    let msg = |frame: Bytes| match target {
        Target::Room(room) => ShardMsg::Room { room: Arc::from(room), frame, sent, pos: None },
        Target::User(user) => ShardMsg::Direct { user: Arc::from(user), frame, sent },
    };
    if shard.peers().len() > 1 {
        // Each shard gets its own copy of the frame and the name: the
        // shards' deliveries clone and drop them once per member, and a
        // reference count shared across cores would bounce its cache line
        // between them on every one. One memcpy per shard is cheaper.
        let copy = || msg(Bytes::copy_from_slice(&frame));
        match target {
            Target::Room(_) => {
                if shard.interested_congested(target) {
                    return Err(Unavailable);
                }
                shard.to_interested(target, copy);
            }
            Target::User(_) => {
                if shard.peers_congested() {
                    return Err(Unavailable);
                }
                shard.to_other_shards(copy);
            }
        }
    }
    // Older messages from other shards are waiting here: this one goes
    // after them (`shard::inbox`, "Order across shards").
    if shard.inbox().must_hold() {
        shard.inbox().hold_local(msg(frame));
        return Ok(());
    }
    shard.deliver_timed(target, &frame, sent);
    Ok(())
}
