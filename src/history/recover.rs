//! ⑨ History on one shard (PROTOCOL.md §7), the same for both buses:
//! subscribe-then-read-then-merge, the live gate, and the catch-up after the
//! Redis subscriber link comes back.
//!
//! # No gap, no duplicate at the seam
//!
//! A subscribe to a room with history joins the room *first* (with Redis,
//! and waits until this node's SUBSCRIBE is confirmed), so every message
//! published from then on reaches the shard. Meanwhile the connection is
//! *buffering*: live messages of the room meant for it are kept, not sent.
//! Then the history is read (position T, and with `since` the messages after
//! it). The reply goes out (`subscribed`), then the replay, then the buffered
//! messages above the last offset sent, in offset order; the connection is
//! then *filtering* (drops what is at or below what it got) until the room's
//! live stream has passed that point, because a message the read already
//! returned may still be on its way through the live path.
//!
//! # The live gate
//!
//! Every live message with a position goes through `on_live`: the room's
//! `last` position on this shard drops duplicates (offset at or below it, same
//! epoch) and follows epoch changes, keeping the last position of the epoch
//! it left (`Mark::left`) so that none of that epoch comes twice either;
//! while the room is *catching up* its live messages are held at the room. A
//! message that skips an offset of the epoch (a hop lost one) starts a
//! catch-up too: the hole is read from the history before the message goes
//! out.
//!
//! # Catch-up
//!
//! When the subscriber link drops, every history room on the shard starts
//! catching up. Once Redis confirms the room's SUBSCRIBE again, one read
//! (pipelined with the other rooms', bounded by the shard's budget) fetches
//! what came after `last`; it is delivered, then what was held, then live
//! delivery resumes. If the history no longer holds it (trimmed, or a new
//! epoch), every member gets `gap` with the room's current position.
//!
//! # Recovery streams
//!
//! Nothing a client asks to recover is pushed at once: a replay, and a
//! catch-up bigger than `INLINE_CATCH_UP` or than one page, is *fed* to each
//! member by a feeder (`feed`) as its outbound queue drains (below half of
//! `--outbound-queue-bytes`), one page (`Query::max_bytes`, half the queue)
//! read after another, so no client is cut off for the size of what it
//! recovers. Live messages meanwhile wait in the member's state, held to the
//! outbound limit; past it they are dropped and read again from the history
//! (never a kill). A member is still cut off (1008) when it is genuinely too
//! slow: its queue does not drain for `FEED_STALL`, or the history trimmed
//! past what it was fed.
//!
//! In: calls from `services` (subscribe, publish, the history op, the inbox
//! dispatch). Out: frames to connections; reads and publishes to the store
//! chosen when the shard started (`Store`: owner shard or Redis).

use std::cell::{Cell, RefCell, RefMut};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::debug;

use super::budget::ShardBudget;
use super::local::{self, Waiting};
use super::redis::HistLink;
use super::ring::Rings;
use super::types::Reply;
use super::types::{Entry, Query, ReadResult};
use crate::bus::Bus;
use crate::config::{Config, HistorySettings};
use crate::conn::Conn;
use crate::protocol::{Epoch, ErrorCode, Position, Since, Unavailable, event};
use crate::rt::Oneshot;
use crate::shard::{ConnId, Shard};

/// A catch-up read that failed is tried again after this.
const CATCH_UP_RETRY: Duration = Duration::from_millis(200);
/// ... this many times before the room gives up and sends `gap`.
const CATCH_UP_TRIES: u32 = 25;
/// How often the owner shard forgets expired standalone rooms.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// What one buffered message costs besides its frame (position, `Bytes`).
const ITEM_OVERHEAD: usize = std::mem::size_of::<Item>();
/// Bytes a catching-up room may hold; beyond, what it holds is dropped and
/// read again from the history once the current read is done.
const MAX_HELD_BYTES: usize = 16 << 20;
/// A catch-up whose page is complete and at most this big goes to the
/// room's members at once; a bigger one is fed to each (`feed`).
const INLINE_CATCH_UP: usize = 64 << 10;
/// A feeder waiting for its member's queue to drain looks again this often.
const FEED_POLL: Duration = Duration::from_millis(2);
/// A member whose queue does not drain for this long is cut off.
const FEED_STALL: Duration = Duration::from_secs(10);
/// A feeder lets the shard turn after this many frames.
const FEED_BATCH: usize = 256;

/// One page of history: half the outbound queue (`Query::max_bytes`).
pub fn page_bytes(cfg: &Config) -> usize {
    (cfg.outbound_queue_bytes / 2).max(1)
}

/// A live message (or a `gap`) on its way to a connection.
#[derive(Clone, Debug)]
struct Item {
    pos: Position,
    frame: Bytes,
}

enum Phase {
    /// Waiting for its read, or being fed (`feed`): live messages wait here.
    Feeding(Live),
    /// Got everything up to this position; drops what is not after it.
    Filtering(Position),
}

/// The live messages a member being fed has not had yet, in order.
#[derive(Default)]
struct Live {
    items: std::collections::VecDeque<Item>,
    /// Their bytes, held to `--outbound-queue-bytes`.
    bytes: usize,
    /// Some were dropped (the limit): the feeder reads them from the history.
    dropped: bool,
}

impl Live {
    fn keep(&mut self, item: Item, limit: usize) {
        if self.dropped {
            return;
        }
        self.bytes += item.frame.len() + ITEM_OVERHEAD;
        if self.bytes > limit {
            self.items.clear();
            self.bytes = 0;
            self.dropped = true;
            return;
        }
        self.items.push_back(item);
    }
}

/// A member of the room whose live delivery is not plain yet.
struct ConnState {
    conn: Weak<Conn>,
    token: u64,
    phase: Phase,
}

/// Where a room is on this shard: what the live gate and a catch-up
/// compare a message's position with.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Mark {
    /// The last position delivered on this shard (or known from a read).
    last: Option<Position>,
    /// The last position delivered in the epoch the room moved on from (by
    /// a `gap` or a new epoch). A message of that epoch may still come by
    /// the bus afterwards: at a failover the catch-up read finds the history
    /// untrusted and says the empty epoch, and a chaos run saw the old
    /// epoch's last message reach the node again 9 ms after that gap. What
    /// this shard already delivered of that epoch is never delivered twice.
    left: Option<Position>,
}

impl Mark {
    /// Was a message at `p` delivered here already?
    fn seen(&self, p: &Position) -> bool {
        self.last.is_some_and(|l| !after(p, &l))
            || self.left.is_some_and(|l| l.epoch == p.epoch && p.offset <= l.offset)
    }

    /// The room is at `p` now. Moving to another epoch keeps the old one's
    /// last position in `left` (the empty epoch, "no history yet", is a
    /// step between two epochs: it keeps the one before).
    fn advance(&mut self, p: Position) {
        if let Some(l) = self.last
            && l.epoch != p.epoch
            && !l.epoch.is_none()
        {
            self.left = Some(l);
        }
        self.last = Some(p);
    }
}

/// One history room this shard has members in.
#[derive(Default)]
struct RoomState {
    mark: Mark,
    /// Live messages held while catching up (`Some` = catching up).
    held: Option<Vec<Item>>,
    held_bytes: usize,
    /// `held` passed `MAX_HELD_BYTES` this round: live messages are dropped
    /// until the next round reads them from the history.
    overflowed: bool,
    /// A catch-up task runs for the room.
    catching_up: bool,
    /// The link dropped again while the catch-up task ran.
    again: bool,
    /// A catch-up gave up without a read and held nothing: what was missed
    /// is unknown, so the next live message is preceded by a `gap`.
    unsure: bool,
    conns: FxHashMap<ConnId, ConnState>,
}

/// Where a shard's history reads and publishes go, chosen once when the
/// shard starts.
pub enum Store {
    /// Standalone: each room's owner shard keeps its ring (`local.rs`).
    Local,
    /// Redis: the shard's history link (`history::redis`).
    Redis(Rc<HistLink>),
}

/// One per shard, when history is on for some rooms
/// (`services::Services::history`).
pub struct ShardHistory {
    store: Store,
    /// The backplane, for the state of its subscriptions: is the subscriber
    /// link up, has Redis confirmed a room.
    bus: Rc<Bus>,
    rings: RefCell<Rings>,
    budget: ShardBudget,
    rooms: RefCell<FxHashMap<Arc<str>, RoomState>>,
    next_token: Cell<u64>,
    waiting: RefCell<FxHashMap<u64, Waiting>>,
    /// Standalone owner: replies a full pair queue did not take yet
    /// (`local::reply`), in order, with the shard each goes to.
    unsent: RefCell<std::collections::VecDeque<(usize, crate::shard::ShardMsg)>>,
}

impl ShardHistory {
    /// `node`: this run's epoch base (one per process, shared by its
    /// shards); `max_bytes`: this shard's share of `--history-max-bytes`.
    pub fn new(node: Epoch, store: Store, bus: Rc<Bus>, max_bytes: usize) -> ShardHistory {
        ShardHistory {
            store,
            bus,
            rings: RefCell::new(Rings::new(node, max_bytes)),
            budget: ShardBudget::default(),
            rooms: RefCell::default(),
            next_token: Cell::new(1),
            waiting: RefCell::default(),
            unsent: RefCell::default(),
        }
    }

    pub(super) fn unsent(&self) -> RefMut<'_, std::collections::VecDeque<(usize, crate::shard::ShardMsg)>> {
        self.unsent.borrow_mut()
    }

    pub(super) fn rings(&self) -> RefMut<'_, Rings> {
        self.rings.borrow_mut()
    }

    fn token(&self) -> u64 {
        self.next_token.replace(self.next_token.get() + 1)
    }

    pub(super) fn wait_for(&self, w: Waiting) -> u64 {
        let t = self.token();
        self.waiting.borrow_mut().insert(t, w);
        t
    }

    pub(super) fn forget_token(&self, token: u64) {
        self.waiting.borrow_mut().remove(&token);
    }

    pub(super) fn answer(&self, token: u64, reply: Reply) {
        let w = self.waiting.borrow_mut().remove(&token);
        match (w, reply) {
            (Some(Waiting::Published(s)), Reply::Published(p)) => s.fill(Ok(p)),
            (Some(Waiting::Read(s)), Reply::Read(r)) => s.fill(Ok(r)),
            _ => {}
        }
    }

    /// The owner's sweep of expired standalone rooms (a task per shard).
    pub async fn run_sweep(self: Rc<Self>, shard: Rc<Shard>) {
        loop {
            monoio::time::sleep(SWEEP_EVERY).await;
            self.with_rings(&shard, |r| r.sweep(Instant::now()));
        }
    }

    /// Runs `f` on this shard's rings, keeping `corecast_history_ring_bytes`.
    pub(super) fn with_rings<T>(&self, shard: &Shard, f: impl FnOnce(&mut Rings) -> T) -> T {
        let mut rings = self.rings.borrow_mut();
        let before = rings.bytes();
        let out = f(&mut rings);
        let after = rings.bytes();
        let g = &shard.m().history_ring_bytes;
        if after >= before {
            g.add((after - before) as u64)
        } else {
            g.sub((before - after) as u64)
        }
        out
    }

    // ---- publish -------------------------------------------------------------

    /// Publishes a client's (or the API's) message in a history room. With
    /// `want`, the slot gets its position once the authority assigned it.
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        room: &str,
        settings: HistorySettings,
        from: &str,
        data: &str,
        want: Option<Oneshot<Result<Position, Unavailable>>>,
    ) -> Result<(), Unavailable> {
        shard.m().publishes_total.inc();
        let msg = event::message_prefix(room, from, data);
        let r = match &self.store {
            Store::Local => local::publish(shard, self, room, settings, msg, want),
            Store::Redis(link) => link.publish(room, settings, msg, want),
        };
        if r.is_err() {
            shard.m().bus_unavailable_total.inc();
        }
        r
    }

    async fn read(
        &self,
        shard: &Shard,
        room: &str,
        q: Query,
        settings: HistorySettings,
    ) -> Result<ReadResult, Unavailable> {
        let _permit = self.budget.acquire().await;
        match &self.store {
            Store::Local => local::read(shard, self, room, q).await,
            Store::Redis(link) => bounded(link.read(room, q, settings)).await,
        }
    }

    /// Does the budget allow one more read for `conn`? Refuses with
    /// `rate_limited` if not. A `true` with `asked` (the client asked for
    /// history: `since` or the `history` op) must be paired with
    /// `conn.hist.done()`; a plain subscribe only needs the shard's room.
    pub fn take_budget(&self, shard: &Shard, conn: &Rc<Conn>, asked: bool, id: Option<&str>) -> bool {
        let burst = crate::conn::limits::burst(shard.cfg.max_rooms_per_connection);
        if self.budget.has_room() && (!asked || conn.hist.take(crate::conn::limits::coarse_ms(), burst)) {
            return true;
        }
        shard.m().client_errors_total.inc();
        shard.m().rate_limited_total.inc();
        conn.push(shard, event::error(ErrorCode::RateLimited, "too many history reads, slow down", id));
        false
    }

    // ---- subscribe, recovery -------------------------------------------------

    /// The start of a `subscribe` (with or without `since`) of a room with
    /// history, after the member joined the room (`services`): the member is
    /// buffering from now on. Returns the token `finish_subscribe` checks.
    pub fn begin_subscribe(self: &Rc<Self>, shard: &Rc<Shard>, conn: &Rc<Conn>, room: &str) -> u64 {
        let token = self.token();
        let link_down = !self.link_up(room);
        let start_catch_up = {
            let mut rooms = self.rooms.borrow_mut();
            let st = rooms.entry(Arc::from(room)).or_default();
            // A second subscribe replaces a recovery still under way.
            st.conns.insert(
                conn.id,
                ConnState { conn: Rc::downgrade(conn), token, phase: Phase::Feeding(Live::default()) },
            );
            // A room that joins while the subscriber link is down catches up
            // once it is back.
            if link_down && st.held.is_none() && !st.catching_up {
                st.held = Some(Vec::new());
                st.catching_up = true;
                true
            } else {
                false
            }
        };
        if start_catch_up {
            monoio::spawn(catch_up(self.clone(), shard.clone(), Arc::from(room)));
        }
        token
    }

    /// The read of a subscribe: once the room is subscribed at Redis (or the
    /// link is down), the position, and with `since` what came after it.
    pub async fn recover(
        &self,
        shard: &Shard,
        room: &str,
        settings: HistorySettings,
        since: Option<Since>,
    ) -> Result<ReadResult, Unavailable> {
        self.room_ready(room, false).await;
        let q = Query::recover(since, if since.is_some() { settings.size } else { 0 }, page_bytes(&shard.cfg));
        self.read(shard, room, q, settings).await
    }

    /// The read is back: the reply, then the replay and the buffered
    /// messages, fed as the member's queue drains (`feed`; at once when they
    /// fit), then filtering until the live stream has passed. `Err`: the
    /// read failed and the member must leave the room again (`services`
    /// does, with an error).
    #[allow(clippy::too_many_arguments)]
    pub fn finish_subscribe(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        conn: &Rc<Conn>,
        room: &str,
        settings: HistorySettings,
        token: u64,
        since: Option<Since>,
        id: Option<&str>,
        r: Result<ReadResult, Unavailable>,
    ) -> Result<(), Unavailable> {
        let mut rooms = self.rooms.borrow_mut();
        let Some(st) = rooms.get_mut(room) else { return Ok(()) };
        if st.conns.get(&conn.id).is_none_or(|c| c.token != token) {
            return Ok(()); // Unsubscribed, or subscribed again, meanwhile.
        }
        if !shard.has_conn(conn) {
            st.conns.remove(&conn.id);
            return Ok(());
        }
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                st.conns.remove(&conn.id);
                return Err(e);
            }
        };
        if st.mark.last.is_none() {
            st.mark.advance(r.pos);
        }
        conn.push(shard, event::subscribed(room, id, &r.pos, since.map(|_| r.covered)));
        if since.is_some() {
            if r.covered {
                shard.m().history_recovered_total.inc();
            } else {
                shard.m().history_unrecovered_total.inc();
            }
        }
        drop(rooms);
        // Fed from the position asked (recovered) or the room's (not).
        let cursor = match since {
            Some(s) if r.covered => s,
            _ => r.pos,
        };
        let page = page_of(&r);
        let f = Feed { conn: conn.clone(), room: Arc::from(room), token, settings, cursor, top: r.pos, page, at: 0 };
        self.start_feed(shard, f);
        Ok(())
    }

    /// Feeds `f` as far as the member's queue allows now; the rest in a
    /// task (`feed`).
    fn start_feed(self: &Rc<Self>, shard: &Rc<Shard>, mut f: Feed) {
        let next = self.pump(shard, &mut f);
        if !matches!(next, Pump::Done | Pump::Gone) {
            shard.m().history_feeds_total.inc();
            monoio::spawn(feed(self.clone(), shard.clone(), f, next));
        }
    }

    /// Publishes into a history room and resolves to the message's position
    /// once its store assigned one (`POST /api/publish`, §4 + §7).
    pub async fn publish_positioned(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        room: &str,
        settings: HistorySettings,
        from: &str,
        data: &str,
    ) -> Result<Position, Unavailable> {
        let slot = Oneshot::default();
        self.publish(shard, room, settings, from, data, Some(slot.clone()))?;
        bounded(slot.wait()).await
    }

    /// `conn` left `room` (`services::Services::leave`): its pending recovery
    /// is dropped.
    pub fn forget(&self, conn: &Conn, room: &str) {
        if let Some(st) = self.rooms.borrow_mut().get_mut(room) {
            st.conns.remove(&conn.id);
        }
    }

    /// The shard's last member of `room` left.
    pub fn room_gone(&self, room: &str) {
        // A catch-up task still running finds the room gone and ends (its
        // wait for the room's SUBSCRIBE ended with the room's interest).
        self.rooms.borrow_mut().remove(room);
    }

    // ---- the history op -------------------------------------------------------

    /// `{"op":"history",...}`: reads and replies; does not subscribe.
    #[allow(clippy::too_many_arguments)]
    pub fn history_op(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        conn: &Rc<Conn>,
        room: &str,
        settings: HistorySettings,
        limit: usize,
        since: Option<Since>,
        id: Option<&str>,
    ) {
        if !self.take_budget(shard, conn, true, id) {
            return;
        }
        let limit = limit.min(settings.size);
        let (h, shard, conn, room, id) =
            (self.clone(), shard.clone(), conn.clone(), Arc::<str>::from(room), id.map(Box::<str>::from));
        monoio::spawn(async move {
            // A page: what fits in half the outbound queue, with `more`
            // when the client should ask again from the last offset.
            let q = Query::listing(since, limit, page_bytes(&shard.cfg));
            let r = h.read(&shard, &room, q, settings).await;
            conn.hist.done();
            if !shard.has_conn(&conn) {
                return;
            }
            let frame = match r {
                Ok(r) => history_reply(&room, &r, id.as_deref()),
                Err(Unavailable) => {
                    event::error(ErrorCode::Unavailable, "room history is unavailable, try again", id.as_deref())
                }
            };
            conn.push(&shard, frame);
        });
    }

    /// `GET /api/history` (§12): what the `history` op answers (its first
    /// page), without an `id`.
    pub async fn history_page(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        room: &str,
        settings: HistorySettings,
        limit: usize,
    ) -> Result<Bytes, Unavailable> {
        let q = Query::listing(None, limit.min(settings.size), page_bytes(&shard.cfg));
        let r = self.read(shard, room, q, settings).await?;
        Ok(history_reply(room, &r, None))
    }

    // ---- live messages ---------------------------------------------------------

    /// A live message with a position, from the owner shard or Redis.
    pub fn on_live(self: &Rc<Self>, shard: &Rc<Shard>, room: &str, pos: Position, frame: Bytes, sent: Instant) {
        let mut rooms = self.rooms.borrow_mut();
        let Some(st) = rooms.get_mut(room) else {
            // No member here (with the local bus: a collision in the interest
            // table, or the last member left while the message was queued).
            drop(rooms);
            shard.deliver_timed(crate::protocol::Target::Room(room), &frame, sent);
            return;
        };
        let item = Item { pos, frame };
        if let Some(held) = &mut st.held {
            st.held_bytes += item.frame.len() + ITEM_OVERHEAD;
            if st.overflowed || st.held_bytes > MAX_HELD_BYTES {
                // The history has them: the next round reads them.
                held.clear();
                st.overflowed = true;
                st.again = true;
                return;
            }
            held.push(item);
            return;
        }
        let verdict = gate(&st.mark, pos);
        if verdict == Gate::Duplicate {
            shard.m().history_duplicates_dropped_total.inc();
            return;
        }
        if verdict == Gate::Hole {
            // A message of this epoch never reached the shard (it cannot
            // happen on an ordered, lossless path; if a hop ever drops one,
            // the history has it): hold this one and read what is missing.
            debug!(
                shard = shard.id,
                room,
                after = st.mark.last.map(|l| l.offset),
                got = pos.offset,
                "hole in a live stream"
            );
            st.held = Some(vec![item]);
            st.catching_up = true;
            drop(rooms);
            monoio::spawn(catch_up(self.clone(), shard.clone(), Arc::from(room)));
            return;
        }
        if std::mem::take(&mut st.unsure) {
            send_gap(shard, room, st, Position { epoch: pos.epoch, offset: pos.offset.saturating_sub(1) });
        }
        st.mark.advance(pos);
        fan_out(shard, room, st, item, Some(sent));
    }

    // ---- the Redis subscriber link ---------------------------------------------

    /// `ShardMsg::RedisLink`: down starts the catch-up of every history room
    /// whose subscription is this shard's own (a relayed room follows its
    /// relay's link: `catch_up_room`).
    pub fn on_link(self: &Rc<Self>, shard: &Rc<Shard>, up: bool) {
        if up {
            return;
        }
        let mut start = Vec::new();
        {
            let mut rooms = self.rooms.borrow_mut();
            for (name, st) in rooms.iter_mut() {
                if self.is_relayed(name) {
                    continue;
                }
                if Self::start_round(st) {
                    start.push(name.clone());
                }
            }
        }
        for room in start {
            monoio::spawn(catch_up(self.clone(), shard.clone(), room));
        }
    }

    /// One room catches up, as on `on_link` down: its relay's subscriber
    /// link went down, or the relay could not pass a message on
    /// (`services::relay`). Reads once the room is confirmed again.
    pub fn catch_up_room(self: &Rc<Self>, shard: &Rc<Shard>, room: &str) {
        let start = match self.rooms.borrow_mut().get_mut(room) {
            Some(st) => Self::start_round(st),
            None => false,
        };
        if start {
            monoio::spawn(catch_up(self.clone(), shard.clone(), Arc::from(room)));
        }
    }

    /// Marks a catch-up round due for the room; true when a task must start
    /// (else the running one goes round again).
    fn start_round(st: &mut RoomState) -> bool {
        if st.catching_up {
            st.again = true;
            false
        } else {
            st.held = Some(Vec::new());
            st.catching_up = true;
            true
        }
    }

    /// Does another shard's subscription bring `room` here (`services::relay`)?
    fn is_relayed(&self, room: &str) -> bool {
        matches!(&*self.bus, Bus::Redis(r) if r.is_relayed(room))
    }

    /// Is the subscriber link `room`'s messages come by up (the relay's for
    /// a relayed room; always, standalone)?
    fn link_up(&self, room: &str) -> bool {
        match &*self.bus {
            Bus::Redis(r) => r.room_link_up(room),
            Bus::Local => true,
        }
    }

    /// Resolves once `room` is subscribed at Redis (standalone: at once).
    /// `strict`: the link must be up; else a down link also resolves it (the
    /// catch-up covers what the read cannot).
    async fn room_ready(&self, room: &str, strict: bool) {
        if let Bus::Redis(r) = &*self.bus {
            r.confirmed(room, strict).await;
        }
    }
}

/// Is `p` a message the holder of `got` has not had yet?
fn after(p: &Position, got: &Position) -> bool {
    p.epoch != got.epoch || p.offset > got.offset
}

/// What the live gate does with a room's message at `pos`, given where the
/// room is on this shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// At or below what was delivered, in the same epoch: dropped.
    Duplicate,
    /// An offset of the epoch was skipped: held, and the hole read first.
    Hole,
    /// The next message, or the first of another epoch.
    Deliver,
}

fn gate(mark: &Mark, pos: Position) -> Gate {
    if mark.seen(&pos) {
        return Gate::Duplicate;
    }
    match mark.last {
        Some(l) if l.epoch == pos.epoch && pos.offset > l.offset + 1 => Gate::Hole,
        // A new epoch seen past its first message: its start never reached
        // this shard. The read tells (a `gap`, the history moved on).
        Some(l) if l.epoch != pos.epoch && pos.offset > 1 && !l.epoch.is_none() => Gate::Hole,
        _ => Gate::Deliver,
    }
}

/// How long a task waits for its store (the owner shard, Redis) before the
/// operation ends `unavailable`: no wait is unbounded.
pub const STORE_WAIT: Duration = Duration::from_secs(5);

/// `fut` within `STORE_WAIT`, else `Unavailable`.
pub async fn bounded<T>(fut: impl std::future::Future<Output = Result<T, Unavailable>>) -> Result<T, Unavailable> {
    monoio::time::timeout(STORE_WAIT, fut).await.unwrap_or(Err(Unavailable))
}

/// A read's entries as items of its epoch.
fn page_of(r: &ReadResult) -> Rc<[Item]> {
    r.entries
        .iter()
        .map(|e| Item { pos: Position { epoch: r.pos.epoch, offset: e.offset }, frame: e.frame.clone() })
        .collect()
}

/// A member being fed what it recovers (see the module doc).
struct Feed {
    conn: Rc<Conn>,
    room: Arc<str>,
    /// The `ConnState` it feeds (a newer subscribe replaces it).
    token: u64,
    settings: HistorySettings,
    /// The last position the member was sent.
    cursor: Position,
    /// The store's position at the last read: the feeder reads until the
    /// cursor reaches it.
    top: Position,
    /// Read, or taken from the live list, and not sent yet from `at`.
    page: Rc<[Item]>,
    at: usize,
}

/// What a feeder does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pump {
    /// Fed: the member filters or is plain now.
    Done,
    /// The member left, was cut off, or subscribed again.
    Gone,
    /// Its queue is above the low-water mark.
    Wait,
    /// Let the shard turn.
    Yield,
    /// Read the next page after the cursor.
    Read,
}

impl ShardHistory {
    /// Sends `f`'s member what its queue takes now (see `Pump`). Never
    /// awaits: the room's state is borrowed throughout.
    fn pump(&self, shard: &Shard, f: &mut Feed) -> Pump {
        let mut rooms = self.rooms.borrow_mut();
        let Some(st) = rooms.get_mut(&*f.room) else { return Pump::Gone };
        if st.conns.get(&f.conn.id).is_none_or(|c| c.token != f.token) {
            return Pump::Gone;
        }
        if !shard.has_conn(&f.conn) || f.conn.is_closing() {
            st.conns.remove(&f.conn.id);
            return Pump::Gone;
        }
        let limit = shard.cfg.outbound_queue_bytes;
        let mut sent = 0;
        loop {
            if f.at == f.page.len() {
                let Some(ConnState { phase: Phase::Feeding(live), .. }) = st.conns.get_mut(&f.conn.id) else {
                    return Pump::Gone;
                };
                let behind = f.cursor.epoch == f.top.epoch && f.cursor.offset < f.top.offset;
                if std::mem::take(&mut live.dropped) || behind {
                    // Messages dropped from the live list arrived before
                    // this read is made, so the read has them.
                    return Pump::Read;
                }
                if live.items.is_empty() {
                    // Fed. Still on its way through the live path? Filter
                    // until passed.
                    let passed = st.mark.last.is_some_and(|l| l.epoch == f.cursor.epoch && l.offset >= f.cursor.offset);
                    if passed {
                        st.conns.remove(&f.conn.id);
                    } else if let Some(c) = st.conns.get_mut(&f.conn.id) {
                        c.phase = Phase::Filtering(f.cursor);
                    }
                    return Pump::Done;
                }
                live.bytes = 0;
                f.page = Vec::from(std::mem::take(&mut live.items)).into();
                f.at = 0;
            }
            let item = &f.page[f.at];
            if !after(&item.pos, &f.cursor) {
                f.at += 1;
                continue;
            }
            if item.pos.epoch == f.cursor.epoch && item.pos.offset > f.cursor.offset + 1 {
                // A hole: the rest is read from the history, which has it.
                f.at = f.page.len();
                return Pump::Read;
            }
            let queued = f.conn.queued();
            if queued > 0 && (queued >= limit / 2 || queued + item.frame.len() > limit) {
                return Pump::Wait;
            }
            if sent == FEED_BATCH {
                return Pump::Yield;
            }
            f.conn.push(shard, item.frame.clone());
            f.cursor = item.pos;
            f.at += 1;
            sent += 1;
        }
    }

    /// `f`'s member is too slow (or its history is gone): cut off.
    fn cut_off(&self, shard: &Shard, f: &Feed, code: crate::ws::CloseCode) {
        if let Some(st) = self.rooms.borrow_mut().get_mut(&*f.room)
            && st.conns.get(&f.conn.id).is_some_and(|c| c.token == f.token)
        {
            st.conns.remove(&f.conn.id);
            if code == crate::ws::CloseCode::POLICY {
                shard.m().slow_consumer_disconnects_total.inc();
            }
            f.conn.kill(shard, code);
        }
    }

    /// Is `f` still the member's current feed?
    fn feeds(&self, f: &Feed) -> bool {
        self.rooms.borrow().get(&*f.room).and_then(|st| st.conns.get(&f.conn.id)).is_some_and(|c| c.token == f.token)
    }
}

/// The feeder task of one member (see the module doc and `Pump`), from
/// what the first `pump` said to do (`next`: a pump's verdict is acted on,
/// never dropped: a `Read` took the live list's `dropped` mark with it).
async fn feed(h: Rc<ShardHistory>, shard: Rc<Shard>, mut f: Feed, mut next: Pump) {
    // Since when the member's queue has not gone down, and from what.
    let mut stuck: Option<(Instant, usize)> = None;
    loop {
        match std::mem::replace(&mut next, Pump::Gone) {
            Pump::Done | Pump::Gone => return,
            Pump::Yield => {
                stuck = None;
                shard.yield_now().await;
            }
            Pump::Wait => {
                let queued = f.conn.queued();
                match stuck {
                    Some((_, was)) if queued < was => stuck = Some((Instant::now(), queued)),
                    Some((since, _)) if since.elapsed() >= FEED_STALL => {
                        debug!(shard = shard.id, conn = f.conn.id, room = %f.room, "recovery: queue not draining, cut off");
                        h.cut_off(&shard, &f, crate::ws::CloseCode::POLICY);
                        return;
                    }
                    Some(_) => {}
                    None => stuck = Some((Instant::now(), queued)),
                }
                monoio::time::sleep(FEED_POLL).await;
            }
            Pump::Read => {
                stuck = None;
                let q = Query::recover(Some(f.cursor), f.settings.size, page_bytes(&shard.cfg));
                let mut got = Err(Unavailable);
                for _ in 0..CATCH_UP_TRIES {
                    got = h.read(&shard, &f.room, q, f.settings).await;
                    if got.is_ok() || !h.feeds(&f) {
                        break;
                    }
                    monoio::time::sleep(CATCH_UP_RETRY).await;
                }
                if !h.feeds(&f) {
                    return;
                }
                match got {
                    Ok(r) if r.covered => {
                        f.top = r.pos;
                        f.page = page_of(&r);
                        f.at = 0;
                    }
                    // Nothing was ever stored: nothing to read.
                    Ok(r) if r.pos.epoch.is_none() && f.cursor.epoch.is_none() => {}
                    Ok(r) if r.pos.epoch != f.cursor.epoch => {
                        // The history is another epoch now: the member is
                        // told, and goes on from its position.
                        shard.m().history_gaps_total.inc();
                        f.conn.push(&shard, event::gap(&f.room, &r.pos));
                        f.cursor = r.pos;
                        f.top = r.pos;
                        f.page = Rc::new([]);
                        f.at = 0;
                    }
                    Ok(_) => {
                        // The history trimmed past what the member was fed:
                        // it is too slow for this room.
                        debug!(shard = shard.id, conn = f.conn.id, room = %f.room, "recovery: trimmed past, cut off");
                        h.cut_off(&shard, &f, crate::ws::CloseCode::POLICY);
                        return;
                    }
                    Err(Unavailable) => {
                        // The rest cannot be read: closed, so that the client
                        // recovers from its position when it reconnects.
                        h.cut_off(&shard, &f, crate::ws::CloseCode::INTERNAL);
                        return;
                    }
                }
            }
        }
        next = h.pump(&shard, &mut f);
    }
}

/// One step of a room's catch-up, in order.
#[derive(Debug)]
enum Step {
    Deliver(Item),
    Gap(Position),
}

/// One catch-up round of a room (see the module doc): `before` is the room's
/// last position when the round started, `mark` where it is now, `got` the
/// read (`None`: none could be made), `held` the live messages held
/// meanwhile. Returns what to send, in order, and where the room is after
/// it. Never a message twice, never one the mark has seen; a hole the read
/// cannot fill is announced with a gap.
fn plan_catch_up(
    before: Option<Position>,
    mut mark: Mark,
    got: Option<ReadResult>,
    held: Vec<Item>,
) -> (Vec<Step>, Mark) {
    let mut steps = Vec::new();
    match got {
        Some(r) if r.covered => {
            for e in r.entries {
                let pos = Position { epoch: r.pos.epoch, offset: e.offset };
                if !mark.seen(&pos) {
                    mark.advance(pos);
                    steps.push(Step::Deliver(Item { pos, frame: e.frame }));
                }
            }
        }
        // Not covered, but where the room already is (the empty epoch read
        // again: nothing was published since): nothing to announce twice.
        Some(r) if mark.last == Some(r.pos) => {}
        Some(r) => {
            mark.advance(r.pos);
            steps.push(Step::Gap(r.pos));
        }
        // No read possible (the store stayed down, or nothing known):
        // what comes next is live, what was before may be missing.
        None => {
            if let Some(first) = held.first() {
                let pos = Position { epoch: first.pos.epoch, offset: first.pos.offset.saturating_sub(1) };
                mark.advance(pos);
                steps.push(Step::Gap(pos));
            }
        }
    }
    // The room's epoch changed under us (history lost, or fenced by the
    // read above): what was held from the old epoch is gone with it.
    let stale = before.filter(|b| mark.last.is_some_and(|n| n.epoch != b.epoch)).map(|b| b.epoch);
    for item in held {
        if stale.is_some_and(|e| item.pos.epoch == e) {
            continue;
        }
        if !mark.seen(&item.pos) {
            mark.advance(item.pos);
            steps.push(Step::Deliver(item));
        }
    }
    (steps, mark)
}

/// Delivers `item` to the room's members on this shard: plain members at
/// once, the ones recovering through their state.
fn fan_out(shard: &Shard, room: &str, st: &mut RoomState, item: Item, sent: Option<Instant>) {
    if st.conns.is_empty() {
        match sent {
            Some(t) => shard.deliver_timed(crate::protocol::Target::Room(room), &item.frame, t),
            None => {
                shard.deliver(crate::protocol::Target::Room(room), &item.frame);
            }
        }
        return;
    }
    shard.deliver_except(room, &item.frame, |id| st.conns.contains_key(&id));
    st.conns.retain(|_, c| {
        let Some(conn) = c.conn.upgrade().filter(|conn| shard.has_conn(conn)) else { return false };
        match &mut c.phase {
            Phase::Feeding(live) => {
                live.keep(item.clone(), shard.cfg.outbound_queue_bytes);
                true
            }
            Phase::Filtering(got) => {
                if after(&item.pos, got) {
                    conn.push(shard, item.frame.clone());
                    false
                } else {
                    true
                }
            }
        }
    });
}

/// The room's catch-up after the subscriber link came back (see the module doc).
async fn catch_up(h: Rc<ShardHistory>, shard: Rc<Shard>, room: Arc<str>) {
    let Some(settings) = shard.cfg.namespaces.history(&room) else { return };
    loop {
        h.room_ready(&room, true).await;
        let last = match h.rooms.borrow().get(&room) {
            None => return,
            Some(st) => st.mark.last,
        };
        let mut got = None;
        if let Some(last) = last {
            for _ in 0..CATCH_UP_TRIES {
                match h
                    .read(&shard, &room, Query::catch_up(last, settings.size, page_bytes(&shard.cfg)), settings)
                    .await
                {
                    Ok(r) => {
                        got = Some(r);
                        break;
                    }
                    Err(Unavailable) => monoio::time::sleep(CATCH_UP_RETRY).await,
                }
            }
        }
        let mut feeds = Vec::new();
        {
            let mut rooms = h.rooms.borrow_mut();
            let Some(st) = rooms.get_mut(&room) else { return };
            let held = st.held.take().unwrap_or_default();
            st.held_bytes = 0;
            st.overflowed = false;
            if let Some(r) = got.as_ref().filter(|r| r.covered) {
                let n = r.entries.len();
                shard.m().history_caught_up_total.add(n as u64);
                debug!(shard = shard.id, room = %room, messages = n, "caught up");
            }
            let big = got.as_ref().is_some_and(|r| {
                r.covered && (r.more || r.entries.iter().map(|e| e.frame.len()).sum::<usize>() > INLINE_CATCH_UP)
            });
            match (big, last, got) {
                (true, Some(last), Some(r)) => {
                    // Too much to push at once: each member is fed the
                    // page and what was held, from where it is.
                    let mut items = page_of(&r).to_vec();
                    items.extend(held.iter().cloned());
                    let page: Rc<[Item]> = items.into();
                    let (_, mark) = plan_catch_up(Some(last), st.mark, Some(r.clone()), held);
                    st.mark = mark;
                    for conn in shard.room_members(&room) {
                        let cursor = match st.conns.get_mut(&conn.id) {
                            Some(ConnState { phase: Phase::Feeding(live), .. }) => {
                                // Its own recovery runs: these are live
                                // messages to it.
                                for item in page.iter() {
                                    live.keep(item.clone(), shard.cfg.outbound_queue_bytes);
                                }
                                continue;
                            }
                            Some(ConnState { phase: Phase::Filtering(got), .. }) if after(got, &last) => *got,
                            _ => last,
                        };
                        let token = h.token();
                        let phase = Phase::Feeding(Live::default());
                        st.conns.insert(conn.id, ConnState { conn: Rc::downgrade(&conn), token, phase });
                        let room = room.clone();
                        feeds.push(Feed { conn, room, token, settings, cursor, top: r.pos, page: page.clone(), at: 0 });
                    }
                }
                (_, _, got) => {
                    st.unsure = last.is_some() && got.is_none() && held.is_empty();
                    let (steps, mark) = plan_catch_up(last, st.mark, got, held);
                    st.mark = mark;
                    for step in steps {
                        match step {
                            Step::Deliver(item) => fan_out(&shard, &room, st, item, None),
                            Step::Gap(pos) => send_gap(&shard, &room, st, pos),
                        }
                    }
                }
            }
            if !std::mem::take(&mut st.again) {
                st.catching_up = false;
            } else {
                st.held = Some(Vec::new());
            }
        }
        let again = h.rooms.borrow().get(&room).is_some_and(|st| st.catching_up);
        for f in feeds {
            h.start_feed(&shard, f);
        }
        if !again {
            return;
        }
    }
}

fn send_gap(shard: &Shard, room: &str, st: &mut RoomState, pos: Position) {
    shard.m().history_gaps_total.inc();
    let item = Item { pos, frame: event::gap(room, &pos) };
    // Recovering members see it in order with their messages; once their own
    // read is done it tells them where they are.
    fan_out(shard, room, st, item, None);
}

/// What the `history` reply lists of each stored message.
#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(borrow)]
    from: &'a RawValue,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// The `history` event for a read (`from` and `data` as they were published).
fn history_reply(room: &str, r: &ReadResult, id: Option<&str>) -> Bytes {
    let texts: Vec<(u64, Bytes)> = r.entries.iter().map(|e: &Entry| (e.offset, event::json_of(&e.frame))).collect();
    let items: Vec<event::HistoryItem<'_>> = texts
        .iter()
        .filter_map(|(offset, json)| {
            let s: Stored<'_> = serde_json::from_slice(json).ok()?;
            Some(event::HistoryItem { offset: *offset, from: s.from.get(), data: s.data.get() })
        })
        .collect();
    event::history(room, &r.pos, &items, r.more, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Mark {
        fn at(pos: Position) -> Mark {
            Mark { last: Some(pos), left: None }
        }
    }

    fn pos(e: &str, n: u64) -> Position {
        Position { epoch: Epoch::new(e).unwrap(), offset: n }
    }

    /// A message whose frame names its position, so a test reads the order.
    fn item(e: &str, n: u64) -> Item {
        Item { pos: pos(e, n), frame: Bytes::from(format!("{e}{n}")) }
    }

    fn read(e: &str, top: u64, entries: &[u64], covered: bool) -> ReadResult {
        let entries =
            entries.iter().copied().map(|n| Entry { offset: n, frame: Bytes::from(format!("{e}{n}")) }).collect();
        ReadResult { pos: pos(e, top), covered, entries, more: false }
    }

    fn steps(s: &[Step]) -> Vec<String> {
        s.iter()
            .map(|s| match s {
                Step::Deliver(i) => String::from_utf8_lossy(&i.frame).into_owned(),
                Step::Gap(p) => format!("gap {}{}", p.epoch.as_str(), p.offset),
            })
            .collect()
    }

    #[test]
    fn the_live_gate_drops_duplicates_holds_for_holes_and_follows_epochs() {
        assert_eq!(gate(&Mark::default(), pos("a", 7)), Gate::Deliver);
        assert_eq!(gate(&Mark::at(pos("a", 7)), pos("a", 8)), Gate::Deliver);
        assert_eq!(gate(&Mark::at(pos("a", 7)), pos("a", 7)), Gate::Duplicate);
        assert_eq!(gate(&Mark::at(pos("a", 7)), pos("a", 3)), Gate::Duplicate);
        assert_eq!(gate(&Mark::at(pos("a", 7)), pos("a", 9)), Gate::Hole);
        assert_eq!(gate(&Mark::at(pos("a", 7)), pos("b", 1)), Gate::Deliver, "a new epoch starts at 1");
        assert_eq!(gate(&Mark::at(pos("a", 7)), pos("b", 40)), Gate::Hole, "its start never came: read first");
        assert_eq!(
            gate(&Mark::at(pos("", 0)), pos("b", 40)),
            Gate::Deliver,
            "from the empty epoch: what follows the read"
        );
    }

    #[test]
    fn what_was_delivered_of_an_epoch_left_behind_is_never_delivered_again() {
        // a:36 delivered; a failover's read found the history untrusted: the
        // empty epoch, announced with a gap. a:36 then came again by the bus.
        let mut m = Mark::at(pos("a", 36));
        m.advance(pos("", 0));
        assert_eq!(gate(&m, pos("a", 36)), Gate::Duplicate, "the same position again");
        assert_eq!(gate(&m, pos("a", 12)), Gate::Duplicate);
        assert_eq!(gate(&m, pos("a", 37)), Gate::Deliver, "one this shard never had: live, as before");
        assert_eq!(gate(&m, pos("b", 1)), Gate::Deliver);
        // The empty epoch is a step between two: a's mark outlives it.
        m.advance(pos("b", 1));
        assert_eq!(gate(&m, pos("a", 36)), Gate::Duplicate);
        assert_eq!(m.left, Some(pos("a", 36)));
        // A catch-up round that held it meanwhile does not send it either.
        let none = Position { epoch: Epoch::NONE, offset: 0 };
        let mut m = Mark::at(pos("a", 36));
        m.advance(none);
        let empty = ReadResult { pos: none, covered: false, entries: vec![], more: false };
        let (s, after) = plan_catch_up(Some(none), m, Some(empty), vec![item("a", 35), item("a", 36), item("b", 1)]);
        assert_eq!(steps(&s), ["b1"]);
        assert_eq!(after, Mark { last: Some(pos("b", 1)), left: Some(pos("a", 36)) });
        // And the round whose read found the empty epoch: its gap, nothing held from before it.
        let empty = ReadResult { pos: none, covered: false, entries: vec![], more: false };
        let (s, after) = plan_catch_up(Some(pos("a", 36)), Mark::at(pos("a", 36)), Some(empty), vec![item("a", 36)]);
        assert_eq!(steps(&s), ["gap 0"]);
        assert_eq!(after, Mark { last: Some(none), left: Some(pos("a", 36)) });
    }

    #[test]
    fn a_member_being_fed_keeps_live_messages_up_to_the_limit_then_drops_them_for_a_read() {
        let mut live = Live::default();
        let size = item("a", 1).frame.len() + ITEM_OVERHEAD;
        live.keep(item("a", 1), 2 * size);
        live.keep(item("a", 2), 2 * size);
        assert_eq!(live.items.len(), 2);
        assert!(!live.dropped);
        live.keep(item("a", 3), 2 * size);
        assert!(live.dropped && live.items.is_empty() && live.bytes == 0, "past the limit: all dropped, none kept");
        live.keep(item("a", 4), 2 * size);
        assert!(live.items.is_empty(), "after a drop nothing is kept until the feeder reads: no hole inside");
    }

    #[test]
    fn a_covered_catch_up_sends_what_was_missed_then_what_was_held_each_once() {
        // Last delivered 10; the read has &[11, 12, 13, 14]; &[13, 14, 15, 16] were held.
        let held = vec![item("a", 13), item("a", 14), item("a", 15), item("a", 16)];
        let (s, last) = plan_catch_up(
            Some(pos("a", 10)),
            Mark::at(pos("a", 10)),
            Some(read("a", 14, &[11, 12, 13, 14], true)),
            held,
        );
        assert_eq!(steps(&s), ["a11", "a12", "a13", "a14", "a15", "a16"]);
        assert_eq!(last.last, Some(pos("a", 16)));
    }

    #[test]
    fn a_catch_up_the_history_cannot_cover_announces_a_gap() {
        // Trimmed past what was delivered: a gap at the room's position,
        // then what was held after it.
        let held = vec![item("a", 30), item("a", 31)];
        let (s, last) =
            plan_catch_up(Some(pos("a", 10)), Mark::at(pos("a", 10)), Some(read("a", 30, &[], false)), held);
        assert_eq!(steps(&s), ["gap a30", "a31"]);
        assert_eq!(last.last, Some(pos("a", 31)));
        // No read at all (the store stayed down): a gap just before the
        // first held message, then the held ones.
        let (s, last) =
            plan_catch_up(Some(pos("a", 10)), Mark::at(pos("a", 10)), None, vec![item("a", 20), item("a", 21)]);
        assert_eq!(steps(&s), ["gap a19", "a20", "a21"]);
        assert_eq!(last.last, Some(pos("a", 21)));
        // Nothing held and no read: nothing to say.
        let (s, last) = plan_catch_up(Some(pos("a", 10)), Mark::at(pos("a", 10)), None, vec![]);
        assert!(s.is_empty() && last.last == Some(pos("a", 10)));
    }

    #[test]
    fn a_second_round_that_finds_the_same_empty_history_sends_no_second_gap() {
        // Round one announced the history gone (the empty epoch); round two
        // reads it again, unchanged: no gap twice, the held message goes out.
        let none = Position { epoch: Epoch::NONE, offset: 0 };
        let empty = ReadResult { pos: none, covered: false, entries: vec![], more: false };
        let (s, last) = plan_catch_up(Some(none), Mark::at(none), Some(empty.clone()), vec![]);
        assert!(s.is_empty() && last.last == Some(none));
        let (s, last) = plan_catch_up(Some(none), Mark::at(none), Some(empty), vec![item("b", 1)]);
        assert_eq!(steps(&s), ["b1"]);
        assert_eq!(last.last, Some(pos("b", 1)));
    }

    #[test]
    fn a_catch_up_that_finds_a_new_epoch_drops_what_was_held_from_the_old_one() {
        // The store lost history (or the read fenced it): epoch b now. What
        // was held from epoch a is gone with it; b's messages go out.
        let held = vec![item("a", 11), item("b", 4)];
        let (s, last) = plan_catch_up(Some(pos("a", 10)), Mark::at(pos("a", 10)), Some(read("b", 3, &[], false)), held);
        assert_eq!(steps(&s), ["gap b3", "b4"]);
        assert_eq!(last.last, Some(pos("b", 4)));
    }
}
