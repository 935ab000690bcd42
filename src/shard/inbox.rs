//! ⑧ The shard's inbox: the only way into a shard from another thread.
//!
//! An inbox is several queues, each with one producer, drained by the
//! shard's inbox task (`services::Services::run_inbox`):
//!
//! - one per other shard (shard → shard, single producer, single consumer:
//!   each ordered pair of shards has its own queue, so producers never
//!   contend on a queue's tail and every pair keeps FIFO order — standalone
//!   history relies on it, see `history::local`);
//! - one for the shard's Redis reader thread (`redis-NN`);
//! - one for control (the signal thread, `Node::drain`).
//!
//! Each queue is a bounded crossbeam channel used by one producer (the
//! control queue by the few threads that stop the node). Every producer
//! shares the inbox's one `AtomicWaker`. A shard sending to another does not
//! wake it per message: it queues with `push` and marks the peer, and the
//! shard's wake task (`peers::Links`) wakes every marked peer once at the end
//! of the turn. Threads wake per send (`send`, `send_wait`), or, like the
//! Redis reader, queue a read buffer's messages with `push_wait` and wake
//! once for all of them (`wake`). The runtime parked in io_uring (or epoll) is
//! woken from another thread only because monoio's `sync` feature is on:
//! without it a cross-thread wake would be lost and the shard would sleep
//! until its next I/O event.
//!
//! # Order across shards
//!
//! A room or direct message carries the instant it was published (`sent`).
//! The inbox hands out what the other shards sent merged by that instant
//! (each pair queue's head is looked at, the oldest is taken; a message
//! without one, a history request or answer, goes first), and a shard's own
//! publish waits behind what is already queued to it (`must_hold`). So if a
//! publish was accepted before another one began (a backend's sequential
//! `/api/publish` calls, which may land on different shards), every shard
//! delivers them in that order, as Redis does for the Redis bus. Each pair
//! still keeps FIFO order (only a queue's head is ever taken). Concurrent
//! publishes may come in either order, the same on every shard only if they
//! were stamped apart. Why the merge is right: a head found empty is looked
//! at again after every other head was (`take_merged`), so a message queued
//! before one that was seen is seen too.
//!
//! A wake may come late (end of the sender's turn) but never not at all:
//! every queued message is followed by a wake of the inbox's `AtomicWaker`,
//! and the inbox task registers before it checks that every queue is empty
//! (`Inbox::ready`), so a message is either seen by that check or wakes it.
//!
//! # The bound, and what happens at it
//!
//! A shard's inbox holds at most about `INBOX_CAPACITY` messages from the
//! other shards: each pair queue takes `pair_capacity(n)`, `INBOX_CAPACITY`
//! split over the `n - 1` senders (at least `MIN_PAIR_CAPACITY`), so a
//! node's queues take no more memory than one inbox per shard did (a bounded
//! crossbeam channel allocates its slots up front). The Redis reader's queue
//! takes `INBOX_CAPACITY` on its own (frames are shared `Bytes`, so a
//! message is a few dozen bytes plus its share of one frame).
//! At the bound the policy depends on whether the sender can wait:
//!
//! - Threads that can wait (the Redis reader, the signal thread) use
//!   `send_wait`/`push_wait`. The Redis reader also stops reading from Redis
//!   well before (`INBOX_HIGH_WATER` in `bus::redis::reader`), so Redis
//!   buffers and the shard catches up: back-pressure, nothing lost.
//! - Shards never wait on one another (two shards waiting on each other's
//!   full inbox would deadlock), so they use `push`, which fails at once when
//!   the pair queue is full: the message is dropped and counted in
//!   `corecast_inbox_dropped_total{shard}` (the receiving shard). Before it
//!   comes to that, the local bus refuses new publishes with `unavailable`
//!   while the queue to any shard the message would go to is past
//!   `pair_publish_limit(n)` (half of it; `bus::local`), which pushes back on
//!   the publishing clients and leaves the rest of the queue for control
//!   messages and history replies.
//!
//! `corecast_inbox_backlog{shard}` shows each inbox's depth (all its queues)
//! at scrape time.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};

/// What a room's relay shard tells a shard it relays the room to,
/// besides confirmations (`ShardMsg::Relayed`, `services::relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayNews {
    /// The relay's subscriber link went down: the room's confirmation is
    /// gone, and a history room catches up once it comes again.
    LinkDown,
    /// The relay's subscriber link is back (the confirmation follows).
    LinkUp,
    /// A message of the (history) room could not be passed on.
    Missed,
}

/// What crosses into a shard. Frames are complete WebSocket frames, built once
/// by whoever encoded the event and shared by every shard that delivers them.
/// `sent` is when the publish was accepted (local bus) or read from Redis
/// (reader thread), for `corecast_delivery_latency_seconds`.
#[derive(Debug)]
pub enum ShardMsg {
    /// Deliver `frame` to every local member of `room`. `pos`: the message's
    /// place in the room's history (§7), when it has one (`history::recover`
    /// then gates it: in order, once). `from_reader`: this shard's own Redis
    /// reader read it (not another shard: a publish on the local bus, or a
    /// room's holder passing it on, `services::relay`).
    Room { room: Arc<str>, frame: Bytes, sent: Instant, pos: Option<Box<crate::protocol::Position>>, from_reader: bool },
    /// Deliver `frame` to every local connection of `user`.
    Direct { user: Arc<str>, frame: Bytes, sent: Instant },
    /// SIGTERM/SIGINT: stop accepting and drain (PROTOCOL.md §5).
    Drain,
    /// From the shard's Redis reader: Redis confirmed this node's
    /// subscription to `room` for the join numbered `seq` (`confirmed`), or
    /// the reader gave up waiting for it (its primary unreachable, its
    /// connection lost): held replies go out, but nothing is confirmed
    /// (`bus::redis`).
    Subscribed { room: Arc<str>, seq: u64, confirmed: bool },
    /// From the shard's Redis reader: its connection came up or went down.
    RedisLink { up: bool },
    /// Standalone history: a request to the room's owner shard, or its
    /// answer (`history::local`).
    History(Box<crate::history::types::Msg>),
    /// Standalone presence: a request to the room's presence owner shard,
    /// or its answer (`services::presence`).
    Presence(Box<crate::protocol::presence::Msg>),
    /// To a room's directory shard (`services::relay`): shard `from` has
    /// members of `room` now (`on`, for its join `seq`), or none any more.
    Relay { room: Arc<str>, from: usize, seq: u64, on: bool },
    /// From a room's directory to the shard that holds the room's
    /// subscription for the node (`services::relay`): `Relay` passed on.
    Hold { room: Arc<str>, from: usize, seq: u64, on: bool },
    /// From the holder to the room's directory: the shards it relayed
    /// `room` to are all gone, and it let the subscription go.
    Released { room: Arc<str> },
    /// From a room's holder to a shard it relays the room to, for that
    /// shard's join `seq` (`services::relay`): news of the holder's
    /// subscriber link, or of a message it could not pass on.
    Relayed { room: Arc<str>, seq: u64, news: RelayNews },
    /// A census question to another shard of this node, or its part of
    /// the answer (`services::census`).
    Census(Box<crate::protocol::census::Msg>),
}

/// The sending end of one queue into one shard; `Clone + Send`.
#[derive(Clone)]
pub struct InboxSender {
    tx: Sender<ShardMsg>,
    waker: Arc<AtomicWaker>,
}

/// The receiving half: every queue into one shard, owned by that shard.
pub struct Inbox {
    /// From each other shard (merged by `sent`, see the module docs).
    pairs: Box<[Receiver<ShardMsg>]>,
    /// The Redis reader's queue, then the control queue.
    others: Box<[Receiver<ShardMsg>]>,
    /// Each pair queue's head, taken out to be compared. Borrowed only
    /// inside one call of this type, never across an await.
    heads: RefCell<Box<[Option<ShardMsg>]>>,
    /// This shard's own publishes that wait behind older messages
    /// (`hold_local`); borrowed like `heads`.
    local: RefCell<VecDeque<ShardMsg>>,
    waker: Arc<AtomicWaker>,
    /// The source `try_recv` takes from next (0: the merged pairs and local
    /// publishes; 1 + i: `others[i]`), and how many it took from it in a row.
    at: Cell<(usize, usize)>,
}

/// Every queue into one shard, for the senders and for the backlog gauge.
pub struct Door {
    /// By sending shard; `None` at the shard's own index.
    from_shard: Box<[Option<InboxSender>]>,
    /// The shard's Redis reader thread.
    pub thread: InboxSender,
    /// The signal thread and `Node::drain`.
    pub control: InboxSender,
}

/// Messages one shard's inbox holds at most from the other shards (split
/// over the pair queues), and the Redis reader's queue on its own.
pub const INBOX_CAPACITY: usize = 16_384;
/// The smallest pair queue, however many shards (reached past 65 shards).
pub const MIN_PAIR_CAPACITY: usize = 256;
/// The control queue (a drain per shard, a few at most).
const CONTROL_CAPACITY: usize = 64;
/// Messages `try_recv` takes from one queue before it turns to the next.
const BURST: usize = 64;

/// Each shard → shard queue's bound on a node of `shards` shards.
pub fn pair_capacity(shards: usize) -> usize {
    (INBOX_CAPACITY / shards.saturating_sub(1).max(1)).max(MIN_PAIR_CAPACITY)
}

/// Above this depth of its queue into a shard, a shard refuses local-bus
/// publishes that would go there (see the module docs).
pub fn pair_publish_limit(shards: usize) -> usize {
    pair_capacity(shards) / 2
}

/// Why `push` did not queue a message.
#[derive(Debug)]
pub enum PushError {
    /// The queue is at its bound.
    Full(ShardMsg),
    /// The receiving shard has stopped (shutdown).
    Gone(ShardMsg),
}

/// A node's inboxes: `inboxes[i]` is shard i's receiving half and
/// `doors[i]` every queue into it.
pub struct Wiring {
    pub inboxes: Vec<Inbox>,
    pub doors: Arc<[Door]>,
}

/// Makes every queue of a node of `shards` shards; `readers`: each shard has
/// a Redis reader thread (else its queue is left small: nobody sends on it).
/// Wire every inbox before spawning any thread.
pub fn wire(shards: usize, readers: bool) -> Wiring {
    let pair = pair_capacity(shards);
    let mut inboxes = Vec::with_capacity(shards);
    let mut doors = Vec::with_capacity(shards);
    for to in 0..shards {
        let waker = Arc::new(AtomicWaker::new());
        let open = |cap: usize, queues: &mut Vec<Receiver<ShardMsg>>| {
            let (tx, rx) = crossbeam_channel::bounded(cap);
            queues.push(rx);
            InboxSender { tx, waker: waker.clone() }
        };
        let (mut pairs, mut others) = (Vec::with_capacity(shards), Vec::with_capacity(2));
        let from_shard = (0..shards).map(|from| (from != to).then(|| open(pair, &mut pairs))).collect();
        let thread = open(if readers { INBOX_CAPACITY } else { CONTROL_CAPACITY }, &mut others);
        let control = open(CONTROL_CAPACITY, &mut others);
        doors.push(Door { from_shard, thread, control });
        inboxes.push(Inbox {
            heads: RefCell::new(pairs.iter().map(|_| None).collect()),
            pairs: pairs.into(),
            others: others.into(),
            local: RefCell::default(),
            waker,
            at: Cell::new((0, 0)),
        });
    }
    Wiring { inboxes, doors: doors.into() }
}

impl Door {
    /// The queue shard `from` sends on, or `None` for the shard itself.
    pub fn from_shard(&self, from: usize) -> Option<&InboxSender> {
        self.from_shard.get(from)?.as_ref()
    }

    /// Messages waiting in the whole inbox (every queue).
    pub fn backlog(&self) -> usize {
        self.from_shard.iter().flatten().chain([&self.thread, &self.control]).map(InboxSender::backlog).sum()
    }
}

impl InboxSender {
    /// Queues `msg` and wakes the shard, without waiting: a full queue, or a
    /// shard that has stopped, returns the message.
    pub fn send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.tx.try_send(msg).map_err(|e| e.into_inner())?;
        self.wake();
        Ok(())
    }

    /// Queues `msg` and wakes the shard, waiting while the queue is full
    /// (for threads that may wait: the Redis reader, the signal thread). A
    /// shard that has stopped returns the message.
    pub fn send_wait(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.push_wait(msg)?;
        self.wake();
        Ok(())
    }

    /// Queues `msg` without waiting and WITHOUT waking the shard: the
    /// caller must `wake` it afterwards (shards do it once per turn).
    pub fn push(&self, msg: ShardMsg) -> Result<(), PushError> {
        self.tx.try_send(msg).map_err(|e| match e {
            TrySendError::Full(m) => PushError::Full(m),
            TrySendError::Disconnected(m) => PushError::Gone(m),
        })
    }

    /// Queues `msg`, waiting while the queue is full, WITHOUT waking the
    /// shard (the caller must `wake` it afterwards) — except that a full
    /// queue wakes it first, so that it drains what it is waited on for.
    pub fn push_wait(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(m)) => Err(m),
            Err(TrySendError::Full(m)) => {
                self.wake();
                self.tx.send(m).map_err(|e| e.0)
            }
        }
    }

    /// Wakes the shard's inbox task (cheap when it is awake already).
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// Messages waiting in this queue (for metrics and back-pressure).
    pub fn backlog(&self) -> usize {
        self.tx.len()
    }
}

/// A message's place in the merge: when it was published; `None` (history
/// requests and answers, which only need their pair's FIFO order) first.
fn stamp(m: &ShardMsg) -> Option<Instant> {
    match m {
        ShardMsg::Room { sent, .. } | ShardMsg::Direct { sent, .. } => Some(*sent),
        _ => None,
    }
}

/// This shard's own publishes held behind older messages at most (past it,
/// `must_hold` says no and a publish is delivered at once).
const LOCAL_CAPACITY: usize = INBOX_CAPACITY;

impl Inbox {
    /// Takes the next message without waiting: up to `BURST` from one
    /// source (the other shards' queues and this shard's held publishes,
    /// merged by publish time; the Redis reader's queue; the control queue),
    /// then the next source's turn, so no source starves the others.
    pub fn try_recv(&self) -> Option<ShardMsg> {
        let sources = 1 + self.others.len();
        let (mut q, mut taken) = self.at.get();
        for _ in 0..=sources {
            if taken < BURST {
                let msg = if q == 0 { self.take_merged() } else { self.others[q - 1].try_recv().ok() };
                if let Some(msg) = msg {
                    self.at.set((q, taken + 1));
                    return Some(msg);
                }
            }
            q = (q + 1) % sources;
            taken = 0;
        }
        self.at.set((q, 0));
        None
    }

    /// The oldest of the pair queues' heads and the held local publishes.
    /// Every empty head is looked at twice, the second time after every
    /// other head: a message queued before one seen in the first look (a
    /// publish accepted before another began) is then seen too.
    fn take_merged(&self) -> Option<ShardMsg> {
        let mut heads = self.heads.borrow_mut();
        for _ in 0..2 {
            for (head, rx) in heads.iter_mut().zip(self.pairs.iter()) {
                if head.is_none() {
                    *head = rx.try_recv().ok();
                }
            }
        }
        let mut local = self.local.borrow_mut();
        let mut best: Option<(Option<Instant>, Option<usize>)> = local.front().map(|m| (stamp(m), None));
        for (i, head) in heads.iter().enumerate() {
            if let Some(m) = head {
                let k = stamp(m);
                if best.is_none_or(|(b, _)| k < b) {
                    best = Some((k, Some(i)));
                }
            }
        }
        match best? {
            (_, Some(i)) => heads[i].take(),
            (_, None) => local.pop_front(),
        }
    }

    /// Whether a publish on this shard now must wait behind messages other
    /// shards already queued to it (or its own held ones): then it goes
    /// through `hold_local` instead of being delivered at once. Past
    /// `LOCAL_CAPACITY` held publishes, no (delivered at once, out of order).
    pub fn must_hold(&self) -> bool {
        let local = self.local.borrow();
        local.len() < LOCAL_CAPACITY
            && (!local.is_empty()
                || self.heads.borrow().iter().any(Option::is_some)
                || self.pairs.iter().any(|rx| !rx.is_empty()))
    }

    /// Holds this shard's own publish `msg` (`must_hold`) to be handed out in
    /// order with what is queued, and wakes the inbox task.
    pub fn hold_local(&self, msg: ShardMsg) {
        self.local.borrow_mut().push_back(msg);
        self.waker.wake();
    }

    /// Resolves once at least one message is waiting.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            // Register first, then look: a message queued before the look is
            // seen; one queued after it is followed by a wake, which finds
            // the waker registered.
            self.waker.register(cx.waker());
            let empty = self.pairs.iter().chain(self.others.iter()).all(Receiver::is_empty)
                && self.heads.borrow().iter().all(Option::is_none)
                && self.local.borrow().is_empty();
            if empty { Poll::Pending } else { Poll::Ready(()) }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(m: &str) -> ShardMsg {
        ShardMsg::Direct { user: Arc::from(m), frame: Bytes::new(), sent: Instant::now() }
    }

    fn name(m: ShardMsg) -> String {
        match m {
            ShardMsg::Direct { user, .. } => user.to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_pair_has_its_own_queue_and_order_is_kept_per_sender() {
        let w = wire(3, false);
        let d = &w.doors[0];
        assert!(d.from_shard(0).is_none());
        for i in 0..3 {
            d.from_shard(1).unwrap().push(msg(&format!("a{i}"))).unwrap();
            d.from_shard(2).unwrap().push(msg(&format!("b{i}"))).unwrap();
        }
        d.thread.send(msg("t0")).unwrap();
        assert_eq!(d.backlog(), 7);
        let got: Vec<String> = std::iter::from_fn(|| w.inboxes[0].try_recv()).map(name).collect();
        assert_eq!(got.len(), 7);
        let of = |p: char| got.iter().filter(|s| s.starts_with(p)).cloned().collect::<Vec<_>>();
        assert_eq!(of('a'), ["a0", "a1", "a2"]);
        assert_eq!(of('b'), ["b0", "b1", "b2"]);
        assert_eq!(of('t'), ["t0"]);
        assert_eq!(d.backlog(), 0);
    }

    #[test]
    fn a_busy_sender_does_not_starve_the_others() {
        let w = wire(2, true);
        let d = &w.doors[0];
        for i in 0..(BURST * 3) {
            d.from_shard(1).unwrap().push(msg(&format!("a{i}"))).unwrap();
        }
        d.control.send(msg("c")).unwrap();
        let first: Vec<String> = (0..=BURST).filter_map(|_| w.inboxes[0].try_recv()).map(name).collect();
        assert!(first.contains(&"c".to_string()), "{first:?}");
    }

    #[test]
    fn the_other_shards_messages_come_out_oldest_first_each_pair_in_its_order() {
        let w = wire(3, false);
        let d = &w.doors[0];
        // Published in this order, queued from shard 2 first.
        let (b0, a0, b1, a1) = (msg("b0"), msg("a0"), msg("b1"), msg("a1"));
        d.from_shard(2).unwrap().push(b0).unwrap();
        d.from_shard(2).unwrap().push(b1).unwrap();
        d.from_shard(1).unwrap().push(a0).unwrap();
        d.from_shard(1).unwrap().push(a1).unwrap();
        let got: Vec<String> = std::iter::from_fn(|| w.inboxes[0].try_recv()).map(name).collect();
        assert_eq!(got, ["b0", "a0", "b1", "a1"]);
    }

    #[test]
    fn a_local_publish_waits_behind_what_is_queued_and_only_then() {
        let w = wire(2, false);
        let inbox = &w.inboxes[0];
        assert!(!inbox.must_hold(), "nothing queued: deliver at once");
        w.doors[0].from_shard(1).unwrap().push(msg("remote")).unwrap();
        assert!(inbox.must_hold());
        inbox.hold_local(msg("local"));
        let got: Vec<String> = std::iter::from_fn(|| inbox.try_recv()).map(name).collect();
        assert_eq!(got, ["remote", "local"]);
        assert!(!inbox.must_hold());
    }

    #[test]
    fn a_full_pair_queue_refuses_at_once() {
        let w = wire(2, true);
        let q = w.doors[1].from_shard(0).unwrap();
        for _ in 0..pair_capacity(2) {
            q.push(msg("x")).unwrap();
        }
        assert!(matches!(q.push(msg("x")), Err(PushError::Full(_))));
        drop(w.inboxes);
        // Still full of messages nobody will take; a gone shard is `Gone`.
        assert!(matches!(q.push(msg("x")), Err(PushError::Full(_)) | Err(PushError::Gone(_))));
    }

    #[test]
    fn pair_queues_split_the_inbox_bound() {
        assert_eq!(pair_capacity(1), INBOX_CAPACITY);
        assert_eq!(pair_capacity(2), INBOX_CAPACITY);
        assert_eq!(pair_capacity(5), INBOX_CAPACITY / 4);
        assert_eq!(pair_capacity(64), INBOX_CAPACITY / 63);
        assert_eq!(pair_capacity(200), MIN_PAIR_CAPACITY);
        assert_eq!(pair_publish_limit(2), INBOX_CAPACITY / 2);
    }
}
