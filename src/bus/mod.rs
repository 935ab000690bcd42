//! ⑥ The bus: how a message published on one shard reaches every shard (on
//! this node and, with Redis, on every node) that has local subscribers.
//!
//! Standalone (`Bus::Local`), a publish is handed to the inbox of every
//! other shard that has members (`shard::interest`) and delivered to this
//! shard's own members directly. With Redis
//! (`bus::redis`), it goes to Redis and comes back through each shard's
//! reader thread. Either way the shard fans out from its own tables.

pub mod local;
pub mod redis;

use std::rc::Rc;

use bytes::Bytes;

use crate::conn::Conn;
use crate::protocol::{Target, Unavailable};
use crate::rt::Oneshot;
use crate::shard::Shard;

/// One per shard; lives on the shard's thread.
pub enum Bus {
    Local,
    Redis(redis::RedisBus),
}

impl Bus {
    /// Publishes a complete event frame to `target` on every shard (and node).
    pub fn publish(&self, shard: &Shard, target: Target<'_>, frame: Bytes) -> Result<(), Unavailable> {
        match self {
            Bus::Local => local::publish(shard, target, frame),
            Bus::Redis(r) => r.publish(target, frame),
        }
    }

    /// Publishes like `publish`, and resolves once the backplane took the
    /// message: at once on the local bus (it is queued to every shard or
    /// refused), after Redis's reply to the PUBLISH with Redis. An answer
    /// that waits for this orders sequential publishes across shards and
    /// nodes as Redis received them (`POST /api/publish`).
    pub async fn publish_confirmed(&self, shard: &Shard, target: Target<'_>, frame: Bytes) -> Result<(), Unavailable> {
        match self {
            Bus::Local => local::publish(shard, target, frame),
            Bus::Redis(r) => {
                let done = Oneshot::default();
                r.publish_confirmed(target, frame, done.clone())?;
                if done.wait().await { Ok(()) } else { Err(Unavailable) }
            }
        }
    }

    /// This shard gained its first (`on`) or lost its last local member of
    /// `target`: the local bus marks a room in the node's interest table
    /// (before any reply to the member leaves, see `shard::interest`; users
    /// are not routed by interest), the Redis bus follows with
    /// SUBSCRIBE/UNSUBSCRIBE.
    pub fn interest(&self, shard: &Shard, target: Target<'_>, on: bool) {
        match self {
            Bus::Local => {
                if let Target::Room(_) = target {
                    shard.set_interest(target, on)
                }
            }
            Bus::Redis(r) => r.interest(target, on),
        }
    }

    /// Sends `reply` (the `subscribed` event) to `conn`: at once, or with
    /// Redis, once this node is really subscribed to `room` there.
    pub fn reply_subscribed(&self, shard: &Shard, conn: &Rc<Conn>, room: &str, reply: Bytes) {
        match self {
            Bus::Local => {
                conn.push(shard, reply);
            }
            Bus::Redis(r) => r.reply_subscribed(shard, conn, room, reply),
        }
    }

    /// `conn` is about to leave `room`: a `subscribed` reply still held for
    /// it goes out first.
    pub fn before_leave(&self, shard: &Shard, conn: &Rc<Conn>, room: &str) {
        if let Bus::Redis(r) = self {
            r.before_leave(shard, conn, room);
        }
    }

    /// `ShardMsg::Subscribed` from the Redis reader (or the room's holder):
    /// true when it confirms (or releases) a subscription this shard holds
    /// for the node, which the relay then passes on (`services::relay`).
    pub fn on_subscribed(&self, shard: &Shard, room: &str, seq: u64, confirmed: bool) -> bool {
        match self {
            Bus::Redis(r) => r.on_subscribed(shard, room, seq, confirmed),
            Bus::Local => false,
        }
    }

    /// `ShardMsg::RedisLink` from the Redis reader.
    pub fn on_link(&self, shard: &Shard, up: bool) {
        if let Bus::Redis(r) = self {
            r.on_link(shard, up);
        }
    }

    /// Is the subscriber link up (always, on the local bus)?
    pub fn link_is_up(&self) -> bool {
        match self {
            Bus::Local => true,
            Bus::Redis(r) => r.link_is_up(),
        }
    }

    /// Can this node serve, as far as the backplane goes (always, on the
    /// local bus)? A Redis degradation is allowed for `grace`.
    pub fn readiness(&self, grace: std::time::Duration) -> redis::Readiness {
        match self {
            Bus::Local => redis::Readiness::Ready,
            Bus::Redis(r) => r.readiness(grace),
        }
    }
}
