//! corecast: a shard-per-core WebSocket fan-out server.
//!
//! # Layout
//!
//! The stages one message passes through, in order:
//!
//! 1. `accept` — each shard's SO_REUSEPORT listener and accept loop.
//! 2. `http` — the request head, the routes, the WebSocket upgrade.
//! 3. `ws` — RFC 6455 frames: parse, unmask, validate, format;
//!    `ws::deflate`, permessage-deflate (RFC 7692): negotiation, bounded
//!    inflate, compressed frames.
//! 4. `conn` — one connection's task: reads frames, runs ops, owns its `Outbox`.
//! 5. `shard` — the shard's room and user tables (`shard::rooms`).
//! 6. `bus` — from the publishing shard to every shard with subscribers
//!    (`bus::local`; Redis across nodes).
//! 7. `bus::redis` — the Redis backplane: each shard's publisher and its
//!    `redis-NN` reader thread (RESP → inbox).
//! 8. `shard::inbox` — the queues (one per sender) + wake-up into another
//!    shard; `shard::peers` — the way out, woken once per turn.
//! 9. `Shard::deliver` — one encoded frame into every member's `Outbox`
//!    (and, built at most once per shard, its compressed form into the
//!    `Outbox` of every member that negotiated compression);
//!    the shard's flusher writes each connection's queue in one `sendmsg`.
//!
//! Around them: `config` (flags, env, TOML), `server` (threads, pinning,
//! signals, drain), `session` (one connection's task: the HTTP phase, then
//! the hand-off to the shard's poller), `protocol` (ops, events and the wire
//! values: positions, targets), `auth` (token checks, grants), `rt` (wait
//! until there is work, a value filled later, yielding), `metrics`,
//! `history` (PROTOCOL.md §7: offsets, epochs, recovery and catch-up; the
//! standalone rings, with Redis `history::redis`), `webhook` (§11: the
//! node's bounded queue and sender thread that POST presence events) and
//! `services` (per shard, the one owner of what clients and backends ask for).
//!
//! The modules form layers that import only downward; `tests/layers.rs`
//! declares the order and `docs/design.md` explains it.

pub mod accept;
pub mod auth;
pub mod bus;
pub mod config;
pub mod conn;
pub mod history;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod rt;
pub mod server;
pub mod services;
pub mod session;
pub mod shard;
pub mod webhook;
pub mod ws;
