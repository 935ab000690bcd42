//! ⑥ The bus: how a message published on one shard reaches every shard (on
//! this node and, with Redis, on every node) that has local subscribers.
//!
//! Standalone (`Bus::Local`), a publish is handed to every other shard's
//! inbox and delivered to this shard's own members directly. With Redis
//! (`bus::redis`), it goes to Redis and comes back through each shard's
//! reader thread. Either way the shard fans out from its own tables.

pub mod local;

use bytes::Bytes;

use crate::shard::Shard;

/// Where a message goes: a room, or every connection of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Room(&'a str),
    User(&'a str),
}

/// The backplane could not take a publish now (PROTOCOL.md `unavailable`).
#[derive(Debug, PartialEq, Eq)]
pub struct Unavailable;

/// One per shard; lives on the shard's thread.
pub enum Bus {
    Local,
}

impl Bus {
    /// Publishes a complete event frame to `target` on every shard (and node).
    pub fn publish(&self, shard: &Shard, target: Target<'_>, frame: Bytes) -> Result<(), Unavailable> {
        match self {
            Bus::Local => {
                local::publish(shard, target, frame);
                Ok(())
            }
        }
    }

    /// This shard gained its first (`on`) or lost its last local member of
    /// `target`; the Redis bus follows with SUBSCRIBE/UNSUBSCRIBE.
    pub fn interest(&self, _shard: &Shard, _target: Target<'_>, _on: bool) {
        match self {
            Bus::Local => {}
        }
    }
}
