//! ⑧ A shard's ways out to the other shards of the node: its queue into
//! each one's inbox (`inbox::Door`, one single-producer queue per ordered
//! pair), the node's interest table (`interest`), and the wakes it owes.
//!
//! Sending (`Shard::to_interested`, `to_other_shards`, `send_to`) queues
//! without waking and marks the receiving shard; the wake task
//! (`Shard::run_peer_wakes`) wakes every marked shard once. Marking the
//! first peer of a turn wakes that task, which the runtime runs after the
//! tasks already ready — at the end of the turn — so a shard that sends 300
//! messages to another while handling one read buffer wakes it once, and a
//! queued message can never sit without a wake coming after it: the mark
//! and the task's wake happen in the same call as the send.
//!
//! In: messages from this shard's tasks, interest edges from
//! `Shard::subscribe`/`unsubscribe`/`upgraded`/`remove_conn` (through the
//! local bus). Out: messages in the other shards' pair queues, their wakes.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use bytes::Bytes;

use super::Shard;
use super::inbox::{self, Door, InboxSender, PushError, ShardMsg};
use super::interest;
use crate::protocol::{Position, Target};
use crate::rt::until;

/// One shard's ends of the node's queues (see the module docs).
pub struct Links {
    /// This shard's queue into shard `i`, by `i`. The shard's own entry is
    /// its control queue: it is there so that the slice is indexed by shard,
    /// and nothing sends to itself on it.
    out: Box<[InboxSender]>,
    /// Every shard's inbox, for the backlog gauge.
    doors: Arc<[Door]>,
    interest: interest::Local,
    /// Shards queued to since their last wake, each once.
    marked: RefCell<Vec<usize>>,
    is_marked: Box<[Cell<bool>]>,
    /// Wakes the wake task when `marked` becomes non-empty.
    waker: Cell<Option<Waker>>,
    /// `inbox::pair_publish_limit` for this node.
    publish_limit: usize,
}

impl Links {
    /// Shard `id`'s links on a node wired as `doors`, sharing `table`.
    pub fn new(id: usize, doors: Arc<[Door]>, table: Arc<interest::Table>) -> Links {
        let n = doors.len();
        let out = doors.iter().map(|d| d.from_shard(id).cloned().unwrap_or_else(|| d.control.clone())).collect();
        Links {
            out,
            doors,
            interest: interest::Local::new(table, id),
            marked: RefCell::new(Vec::with_capacity(n)),
            is_marked: (0..n).map(|_| Cell::new(false)).collect(),
            waker: Cell::new(None),
            publish_limit: inbox::pair_publish_limit(n),
        }
    }
}

impl Shard {
    /// This shard's queue into each shard, by shard (`len()` is the number of
    /// shards). Sending on one directly wakes at once; `send_to` wakes at
    /// the end of the turn.
    pub fn peers(&self) -> &[InboxSender] {
        &self.links.out
    }

    /// Every shard's inbox depth (all its queues), in shard order.
    pub fn inbox_backlogs(&self) -> Vec<usize> {
        self.links.doors.iter().map(Door::backlog).collect()
    }

    /// The local bus's side of `Bus::interest`: this shard gained its first
    /// (`on`) or lost its last member of `target` (see `interest`).
    pub(crate) fn set_interest(&self, target: Target<'_>, on: bool) {
        self.links.interest.set(target, on);
    }

    /// ⑧ The one way a message published on this shard reaches the other
    /// shards of the node: a room message to those that may have members
    /// (the interest table), a direct message to all, each its own copy of
    /// the frame and the name (the shards' deliveries clone and drop them
    /// once per member, and a reference count shared across cores would
    /// bounce its cache line between them on every one: one memcpy per
    /// shard is cheaper). Then this shard's own members: true when the
    /// caller delivers to them now; false when there are none, or when older
    /// messages from other shards are still queued here and this one is
    /// held behind them (`inbox`, "Order across shards"), to be handed out
    /// by the inbox task in order. `pos`: the room history position, if the
    /// room has one.
    #[must_use = "true: the caller delivers to this shard's own members now"]
    pub fn fan_out_to_shards(&self, target: Target<'_>, frame: &Bytes, sent: Instant, pos: Option<Position>) -> bool {
        let msg = |frame: Bytes| match target {
            Target::Room(room) => {
                ShardMsg::Room { room: Arc::from(room), frame, sent, pos: pos.map(Box::new), from_reader: false }
            }
            Target::User(user) => ShardMsg::Direct { user: Arc::from(user), frame, sent },
        };
        if self.links.out.len() > 1 {
            let copy = || msg(Bytes::copy_from_slice(frame));
            match target {
                Target::Room(_) => self.to_interested(target, copy),
                Target::User(_) => self.to_other_shards(copy),
            }
        }
        if !self.has_members(target) {
            return false;
        }
        if self.inbox().must_hold() {
            self.inbox().hold_local(msg(frame.clone()));
            return false;
        }
        true
    }

    /// Sends a message built by `make` to every other shard that may have
    /// members of `target` (the interest table), without waiting. A full
    /// queue drops it, counted in the receiver's
    /// `corecast_inbox_dropped_total` (the policy is in `inbox.rs`).
    pub fn to_interested(&self, target: Target<'_>, mut make: impl FnMut() -> ShardMsg) {
        self.links.interest.peers(target, |i| self.send_counted(i, make()));
    }

    /// Is this shard's queue into any shard that may have members of
    /// `target` past `inbox::pair_publish_limit`?
    pub fn interested_congested(&self, target: Target<'_>) -> bool {
        let mut congested = false;
        self.links.interest.peers(target, |i| congested |= self.links.out[i].backlog() >= self.links.publish_limit);
        congested
    }

    /// Sends a message built by `make` to every shard but this one
    /// (Seastar's `invoke_on_all` minus `local()`), like `to_interested`.
    pub fn to_other_shards(&self, mut make: impl FnMut() -> ShardMsg) {
        for i in 0..self.links.out.len() {
            if i != self.id {
                self.send_counted(i, make());
            }
        }
    }

    /// Queues `msg` to shard `i` (not this one), woken at the end of the
    /// turn. A full queue or a stopped shard returns the message.
    pub fn send_to(&self, i: usize, msg: ShardMsg) -> Result<(), ShardMsg> {
        debug_assert_ne!(i, self.id);
        match self.links.out[i].push(msg) {
            Ok(()) => {
                self.mark(i);
                Ok(())
            }
            Err(PushError::Full(m) | PushError::Gone(m)) => Err(m),
        }
    }

    /// `send_to` that tells a full queue (`Err(Some(msg))`: try again) from
    /// a stopped shard (`Err(None)`: nobody will take it).
    pub fn send_or_full(&self, i: usize, msg: ShardMsg) -> Result<(), Option<ShardMsg>> {
        debug_assert_ne!(i, self.id);
        match self.links.out[i].push(msg) {
            Ok(()) => {
                self.mark(i);
                Ok(())
            }
            Err(PushError::Full(m)) => Err(Some(m)),
            Err(PushError::Gone(_)) => Err(None),
        }
    }

    /// `send_to`, counting a full queue's drop at the receiver. A peer that
    /// stopped (only during shutdown) just misses it.
    fn send_counted(&self, i: usize, msg: ShardMsg) {
        match self.links.out[i].push(msg) {
            Ok(()) => self.mark(i),
            Err(PushError::Full(_)) => self.metrics.shard(i).inbox_dropped_total.add_shared(1),
            Err(PushError::Gone(_)) => {}
        }
    }

    /// Is this shard's queue into any other shard so deep that new
    /// publishes should wait (`inbox::pair_publish_limit`)?
    pub fn peers_congested(&self) -> bool {
        let limit = self.links.publish_limit;
        self.links.out.iter().enumerate().any(|(i, p)| i != self.id && p.backlog() >= limit)
    }

    /// `peers_congested`, or is `owner`'s queue into any other shard past
    /// the limit (standalone history: the owner fans out what we send it)?
    pub fn peers_congested_via(&self, owner: usize) -> bool {
        let limit = self.links.publish_limit;
        self.peers_congested()
            || self.links.doors.iter().filter_map(|d| d.from_shard(owner)).any(|q| q.backlog() >= limit)
    }

    /// Shard `i` has a message from us that it has not been woken for.
    fn mark(&self, i: usize) {
        let l = &self.links;
        if l.is_marked[i].replace(true) {
            return;
        }
        let mut marked = l.marked.borrow_mut();
        if marked.is_empty()
            && let Some(w) = l.waker.take()
        {
            w.wake();
        }
        marked.push(i);
    }

    /// The wake task: once per turn in which this shard queued anything to
    /// other shards, wakes each of them once (see the module docs).
    pub async fn run_peer_wakes(self: std::rc::Rc<Self>) {
        let l = &self.links;
        let mut batch: Vec<usize> = Vec::new();
        loop {
            until(&l.waker, || !l.marked.borrow().is_empty()).await;
            std::mem::swap(&mut batch, &mut *l.marked.borrow_mut());
            for i in batch.drain(..) {
                // Unmark before waking: a send after this line marks again.
                l.is_marked[i].set(false);
                l.out[i].wake();
                self.m().peer_wakes_total.inc();
            }
        }
    }
}
