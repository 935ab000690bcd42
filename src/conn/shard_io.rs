//! ④ A shard's connection runtime (`ShardIo`): what a connection may use of
//! its shard, and nothing more. Its clock, configuration and counters; the
//! readiness poller; the dirty list the flusher empties once per turn and
//! the connections it holds back (`--write-delay-ms`) and when it last
//! found work (`dirty_since`); the queue of
//! connections whose closing handshake is timed; the yield queue.
//!
//! `ShardIo` has no table. Every `Conn` method that may run while the shard
//! walks a table (`push`, `pong`, `close`, `kill`, `flush`) receives only a
//! `&ShardIo`, so the RefCell contract of `shard/mod.rs` ("those calls never
//! touch a table") is a fact of the types. The shard (`shard::Shard`) holds
//! its `ShardIo` in an `Rc` and derefs to it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use super::Conn;
use super::poller::Poller;
use crate::config::Config;
use crate::metrics::{Metrics, ShardMetrics};
use crate::rt::Yielder;

/// A connection's key in its shard's table.
pub type ConnId = u32;

/// One per shard; lives on the shard's thread.
pub struct ShardIo {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Which monoio driver runs this shard ("io_uring" or "epoll").
    pub driver: &'static str,
    /// Connections with queued frames, each once (`Conn::mark_dirty`).
    pub(super) dirty: RefCell<Vec<Rc<Conn>>>,
    /// Dirty connections the flusher holds back (`--write-delay-ms`), still
    /// marked dirty; `flush::run_held` hands them back after the delay.
    pub(super) held: RefCell<Vec<Rc<Conn>>>,
    /// Wakes the hold timer task when `held` becomes non-empty.
    pub(super) held_waker: Cell<Option<Waker>>,
    /// Per connection with the `OWN` flag: the JSON prefixes of its own
    /// messages it must not get back (§10 `deliver_to_publisher = false`).
    /// Here, not in `Conn`, so that every other connection pays nothing.
    pub(super) own: RefCell<rustc_hash::FxHashMap<super::ConnId, Vec<bytes::Bytes>>>,
    /// The clock origin of the flusher's hold (`ShardIo::ms`).
    pub(super) started: Instant,
    /// Wakes the flusher task when `dirty` becomes non-empty.
    pub(super) flusher: Cell<Option<Waker>>,
    /// When `dirty` last became non-empty: the start of the flusher's next
    /// turn, for `--write-delay-ms auto`'s measure of how busy the shard is.
    pub(super) dirty_since: Cell<Option<Instant>>,
    /// The heartbeat clock in ticks, from 1 (0 marks "not a WebSocket"):
    /// the read path stamps it on a connection when bytes arrive; the
    /// shard's heartbeat sweep advances it.
    tick: Cell<u32>,
    /// Connections we sent a close frame to, oldest first, with the time by
    /// which their answer must have come (the shard's close reaper). One
    /// entry per close, and the timeout is the same for all, so the queue is
    /// in deadline order.
    closing: RefCell<VecDeque<(Instant, Weak<Conn>)>>,
    /// Wakes the close reaper when `closing` becomes non-empty.
    reaper: Cell<Option<Waker>>,
    /// Tasks that yielded (`yield_now`), woken by `run_yields`.
    yielder: Yielder,
    /// Readiness of every connection a task or the frame loop waits on.
    poller: Poller,
}

thread_local! {
    /// This thread's shard's `corecast_sockets` gauge, for `Conn`'s `Drop`
    /// (a `Conn` never leaves its shard's thread). Set by `ShardIo::new`.
    static SOCKETS: Cell<Option<&'static crate::metrics::Counter>> = const { Cell::new(None) };
}

/// A connection's socket was closed (`Conn`'s `Drop`): one fewer in
/// `corecast_sockets`.
pub(super) fn socket_closed() {
    let _ = SOCKETS.try_with(|g| {
        if let Some(g) = g.get() {
            g.sub(1)
        }
    });
}

impl ShardIo {
    /// Must be made on the shard's thread, inside its runtime.
    pub fn new(id: usize, cfg: Arc<Config>, metrics: Arc<Metrics>, driver: &'static str) -> std::io::Result<ShardIo> {
        let poller = Poller::new()?;
        // Leaked once per shard thread so that `Conn`'s `Drop` reaches the
        // gauge without a pointer in every connection.
        let leaked: &'static Arc<Metrics> = Box::leak(Box::new(metrics.clone()));
        SOCKETS.with(|g| g.set(Some(&leaked.shard(id).sockets)));
        // Alive from the start, before the liveness timer's first turn.
        metrics.liveness.beat(id);
        Ok(ShardIo {
            id,
            cfg,
            metrics,
            driver,
            dirty: RefCell::default(),
            held: RefCell::default(),
            held_waker: Cell::new(None),
            own: RefCell::default(),
            started: Instant::now(),
            flusher: Cell::new(None),
            dirty_since: Cell::new(None),
            tick: Cell::new(1),
            closing: RefCell::default(),
            reaper: Cell::new(None),
            yielder: Yielder::default(),
            poller,
        })
    }

    /// This shard's counters.
    #[inline]
    pub fn m(&self) -> &ShardMetrics {
        self.metrics.shard(self.id)
    }

    /// The current heartbeat tick, stamped on a connection when bytes arrive.
    #[inline]
    pub fn tick(&self) -> u32 {
        self.tick.get()
    }

    /// The heartbeat sweep's clock moves on one tick.
    pub fn advance_tick(&self) -> u32 {
        let t = self.tick.get().wrapping_add(1).max(1);
        self.tick.set(t);
        t
    }

    /// The readiness poller of this shard's connections.
    pub fn poller(&self) -> &Poller {
        &self.poller
    }

    /// Called by `Conn` when it gets its first frame since the last flush.
    pub(super) fn mark_dirty(&self, conn: Rc<Conn>) {
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() {
            // Once per pass of the flusher, not once per frame.
            self.dirty_since.set(Some(Instant::now()));
            if let Some(w) = self.flusher.take() {
                w.wake();
            }
        }
        dirty.push(conn);
    }

    /// `conn` was sent a close frame: if it has not answered (and gone) by
    /// `CLOSE_TIMEOUT` from now, the close reaper cuts it off.
    pub(super) fn watch_close(&self, conn: &Rc<Conn>) {
        let mut closing = self.closing.borrow_mut();
        if closing.is_empty()
            && let Some(w) = self.reaper.take()
        {
            w.wake();
        }
        closing.push_back((Instant::now() + super::CLOSE_TIMEOUT, Rc::downgrade(conn)));
    }

    /// Resolves once a closing handshake is being timed.
    pub async fn closes_pending(&self) {
        crate::rt::until(&self.reaper, || !self.closing.borrow().is_empty()).await
    }

    /// The deadline of the oldest timed close, if any.
    pub fn next_close_due(&self) -> Option<Instant> {
        self.closing.borrow().front().map(|(at, _)| *at)
    }

    /// Takes the oldest timed close if it is due at `now`.
    pub fn take_due_close(&self, now: Instant) -> Option<Weak<Conn>> {
        let mut closing = self.closing.borrow_mut();
        match closing.front() {
            Some((at, _)) if *at <= now => closing.pop_front().map(|(_, c)| c),
            _ => None,
        }
    }

    /// Lets every other ready task on this shard run first (`rt::Yielder`).
    pub async fn yield_now(&self) {
        self.yielder.yield_now().await
    }

    /// The liveness tick: stamps this shard's `metrics::Liveness` every
    /// `LIVENESS_TICK` from a timer on the shard's own runtime, so the stamp
    /// ages exactly when the runtime stops turning. `/healthz`, answered by
    /// any shard, checks every shard's stamp.
    pub async fn run_liveness(self: Rc<Self>) {
        loop {
            self.metrics.liveness.beat(self.id);
            monoio::time::sleep(crate::metrics::LIVENESS_TICK).await;
        }
    }

    /// The yield task (`rt::Yielder::run`).
    pub async fn run_yields(self: Rc<Self>) {
        self.yielder.run().await
    }
}
