//! The embedded local bus: a publish goes straight into every other shard's
//! inbox (each its own copy of the frame and room name) and is delivered to this
//! shard's own members without a hop (Seastar's `invoke_on` vs `local()`).
//!
//! Every shard gets every message; a shard with no member of the room drops
//! it after one hash lookup. With one shard per core that is a handful of
//! channel sends per publish, cheaper than keeping remote interest in sync.
//!
//! While another shard's inbox is congested (past `INBOX_PUBLISH_LIMIT`),
//! publishes are refused with `unavailable`: back-pressure to the client
//! rather than a silent drop (the inbox policy is in `shard::inbox`).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{Target, Unavailable};
use crate::shard::{Shard, ShardMsg};

pub fn publish(shard: &Shard, target: Target<'_>, frame: Bytes) -> Result<(), Unavailable> {
    let sent = Instant::now();
    if shard.peers().len() > 1 {
        if shard.peers_congested() {
            return Err(Unavailable);
        }
        // Each shard gets its own copy of the frame and the name: the
        // shards' deliveries clone and drop them once per member, and a
        // reference count shared across cores would bounce its cache line
        // between them on every one. One memcpy per shard is cheaper.
        let (name, room) = match target {
            Target::Room(r) => (r, true),
            Target::User(u) => (u, false),
        };
        shard.to_other_shards(|| {
            let (name, frame): (Arc<str>, Bytes) = (Arc::from(name), Bytes::copy_from_slice(&frame));
            if room {
                ShardMsg::Room { room: name, frame, sent, pos: None }
            } else {
                ShardMsg::Direct { user: name, frame, sent }
            }
        });
    }
    shard.deliver_timed(target, &frame, sent);
    Ok(())
}
