//! Room history and recovery (PROTOCOL.md §7): the types every stage shares
//! and the per-shard state that keeps delivery exactly-once across a
//! reconnect or a backplane outage.
//!
//! - `types.rs` — what crosses stages and shards: `Entry`, `Query`,
//!   `ReadResult`, and the owner-shard messages (`Msg`, `Reply`); `Epoch`,
//!   `Position` and `Since` are wire values in `protocol::position`.
//! - `ring.rs` — standalone: the owner shard's in-memory ring per room.
//! - `local.rs` — standalone: reaching a room's owner shard through the
//!   inboxes (`ShardMsg::History*`).
//! - `recover.rs` — `ShardHistory`, one per shard, and its `Store`, chosen
//!   once: subscribe, then read, then merge by offset; the live gate
//!   (duplicates, epochs) and the node-level catch-up after the Redis
//!   subscriber link comes back. Shared by both buses.
//! - `redis.rs`, `redis_route.rs` — with Redis: the scripts, sent to the room
//!   channel's owner over the shard's publisher links.
//! - `budget.rs` — how many reads a connection and a shard may have going.
//!
//! In: history ops from `services`, live room messages carrying a position
//! (`ShardMsg::Room { pos: Some(..) }`), link and subscription changes from the
//! bus. Out: frames to connections (`subscribed`, replays, `history`, `gap`).

pub mod budget;
pub mod local;
pub mod recover;
pub mod redis;
pub mod redis_route;
pub mod ring;
pub mod types;

pub use recover::{ShardHistory, Store};
pub use types::{Entry, Query, ReadResult, offset_of_id};
