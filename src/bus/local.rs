//! The embedded local bus: a room message goes straight into the inbox of
//! every other shard that has members of the room, a direct message into
//! every other shard's, each its own copy of the frame and name
//! (`Shard::fan_out_to_shards`, the one cross-shard path, which standalone
//! history uses too), and is delivered to this shard's own members without
//! a hop (Seastar's `invoke_on` vs `local()`).
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

use std::time::Instant;

use bytes::Bytes;

use super::{Target, Unavailable};
use crate::shard::Shard;

pub fn publish(shard: &Shard, target: Target<'_>, frame: Bytes) -> Result<(), Unavailable> {
    if shard.peers().len() > 1 {
        let congested = match target {
            Target::Room(_) => shard.interested_congested(target),
            Target::User(_) => shard.peers_congested(),
        };
        if congested {
            return Err(Unavailable);
        }
    }
    let sent = Instant::now();
    if shard.fan_out_to_shards(target, &frame, sent, None) {
        shard.deliver_timed(target, &frame, sent);
    }
    Ok(())
}
