//! ⑧ The shard's inbox: the only way into a shard from another thread.
//!
//! A crossbeam channel carries `ShardMsg`s; after each send the sender wakes
//! the shard's inbox task through an `AtomicWaker`. The runtime parked in
//! io_uring (or epoll) is woken from another thread only because monoio's
//! `sync` feature is on: without it a cross-thread wake would be lost and the
//! shard would sleep until its next I/O event.
//!
//! # The bound, and what happens at it
//!
//! Each inbox holds at most `INBOX_CAPACITY` messages (frames are shared
//! `Bytes`, so a message is a few dozen bytes plus its share of one frame).
//! At the bound the policy depends on whether the sender can wait:
//!
//! - Threads that can wait (the Redis reader, the signal thread) use
//!   `send_wait`. The Redis reader also stops reading from Redis well before
//!   (`INBOX_HIGH_WATER` in `bus::redis::reader`), so Redis buffers and the
//!   shard catches up: back-pressure, nothing lost.
//! - Shards never wait on one another (two shards waiting on each other's
//!   full inbox would deadlock), so they use `send`, which fails at once when
//!   the inbox is full: the message is dropped and counted in
//!   `corecast_inbox_dropped_total{shard}` (the receiving shard). Before it
//!   comes to that, the local bus refuses new publishes with `unavailable`
//!   while any inbox is past `INBOX_PUBLISH_LIMIT` (`bus::local`), which
//!   pushes back on the publishing clients and leaves the rest of the room
//!   for control messages.
//!
//! `corecast_inbox_backlog{shard}` shows each inbox's depth at scrape time.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

/// What crosses into a shard. Frames are complete WebSocket frames, built once
/// by whoever encoded the event and shared by every shard that delivers them.
/// `sent` is when the publish was accepted (local bus) or read from Redis
/// (reader thread), for `corecast_delivery_latency_seconds`.
#[derive(Debug)]
pub enum ShardMsg {
    /// Deliver `frame` to every local member of `room`. `pos`: the message's
    /// place in the room's history (§7), when it has one (`history::recover`
    /// then gates it: in order, once).
    Room { room: Arc<str>, frame: Bytes, sent: Instant, pos: Option<Box<crate::history::Position>> },
    /// Deliver `frame` to every local connection of `user`.
    Direct { user: Arc<str>, frame: Bytes, sent: Instant },
    /// SIGTERM/SIGINT: stop accepting and drain (PROTOCOL.md §5).
    Drain,
    /// From the shard's Redis reader: Redis confirmed this node's
    /// subscription to `room` for the join numbered `seq` (`bus::redis`).
    Subscribed { room: Arc<str>, seq: u64 },
    /// From the shard's Redis reader: its connection came up or went down.
    RedisLink { up: bool },
    /// Standalone history: a request to the room's owner shard, or its
    /// answer (`history::local`).
    History(Box<crate::history::local::Msg>),
}

/// The sending half; `Clone + Send`, handed to other shards and bus threads.
#[derive(Clone)]
pub struct InboxSender {
    tx: Sender<ShardMsg>,
    waker: Arc<AtomicWaker>,
}

/// The receiving half, owned by its shard.
pub struct Inbox {
    rx: Receiver<ShardMsg>,
    waker: Arc<AtomicWaker>,
}

/// Messages one inbox holds at most.
pub const INBOX_CAPACITY: usize = 16_384;
/// Above this backlog in any shard's inbox, local-bus publishes are refused
/// with `unavailable` (see the module docs).
pub const INBOX_PUBLISH_LIMIT: usize = INBOX_CAPACITY / 2;

/// Makes a connected pair. Wire every inbox before spawning any thread.
pub fn inbox() -> (InboxSender, Inbox) {
    let (tx, rx) = crossbeam_channel::bounded(INBOX_CAPACITY);
    let waker = Arc::new(AtomicWaker::new());
    (InboxSender { tx, waker: waker.clone() }, Inbox { rx, waker })
}

impl InboxSender {
    /// Queues `msg` and wakes the shard, without waiting: a full inbox, or a
    /// shard that has stopped, returns the message (for shards, which must
    /// never wait on each other).
    pub fn send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.tx.try_send(msg).map_err(|e| e.into_inner())?;
        self.waker.wake();
        Ok(())
    }

    /// Queues `msg` and wakes the shard, waiting while the inbox is full
    /// (for threads that may wait: the Redis reader, the signal thread). A
    /// shard that has stopped returns the message.
    pub fn send_wait(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.tx.send(msg).map_err(|e| e.0)?;
        self.waker.wake();
        Ok(())
    }

    /// Messages waiting in this inbox (for metrics and back-pressure).
    pub fn backlog(&self) -> usize {
        self.tx.len()
    }
}

impl Inbox {
    /// Takes the next message without waiting.
    pub fn try_recv(&self) -> Option<ShardMsg> {
        self.rx.try_recv().ok()
    }

    /// Resolves once at least one message is waiting.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            // Register first, then look: a send between the two still wakes us.
            self.waker.register(cx.waker());
            if self.rx.is_empty() { Poll::Pending } else { Poll::Ready(()) }
        })
        .await
    }
}
