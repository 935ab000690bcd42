//! Presence values (PROTOCOL.md §11) that cross shards: a page of a room's
//! members, and the standalone (local bus) messages to and from a room's
//! presence owner shard (`services::presence`).

use std::sync::Arc;

/// Default and largest `limit` of a member page (§11).
pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 10_000;

/// What a `presence` (or, with `limit` 0, `presence_stats`) read answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Connections subscribed to the room, cluster-wide.
    pub clients: u64,
    /// Distinct user ids among them.
    pub users: u64,
    /// `(user, its connections)`, ascending byte order of the id.
    pub members: Vec<(Box<str>, u64)>,
    /// More members follow: the last id listed (pass it as `after`).
    pub next: Option<Box<str>>,
}

/// A presence read: members after `after` (exclusive), at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Read {
    pub after: Option<Box<str>>,
    pub limit: usize,
}

/// One shard's connections of `user` in a room (absolute: idempotent).
pub type Count = (Arc<str>, u32);

/// Standalone presence: requests to a room's owner shard and its answers.
#[derive(Debug)]
pub enum Msg {
    /// To the owner: shard `writer` now has these counts in `room`.
    Set { room: Arc<str>, writer: u32, counts: Vec<Count> },
    /// To the owner: read `room`'s presence; the answer goes to `reply_to`.
    Read { room: Arc<str>, read: Read, reply_to: usize, token: u64 },
    /// From the owner: the answer to `token`.
    Reply { token: u64, page: Page },
}
