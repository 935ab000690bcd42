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
//! epoch) and follows epoch changes; while the room is *catching up* its live
//! messages are held at the room. A message that skips an offset of the
//! epoch (a hop lost one) starts a catch-up too: the hole is read from the
//! history before the message goes out.
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
//! In: calls from `conn::ops`, `http::routes`, `Shard::handle`. Out: frames to
//! connections; reads and publishes to the store (owner shard or Redis).

use std::cell::{Cell, RefCell, RefMut};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::debug;

use super::budget::ShardBudget;
use super::local::{self, Waiting};
use super::ring::Rings;
use super::types::Reply;
use super::{Entry, Query, ReadResult};
use crate::bus::Bus;
use crate::config::HistorySettings;
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

/// A live message (or a `gap`) on its way to a connection.
#[derive(Clone)]
struct Item {
    pos: Position,
    frame: Bytes,
}

enum Phase {
    /// Waiting for its read: live messages are kept here (and their bytes,
    /// held to `--outbound-queue-bytes` like an outbox).
    Buffering(Vec<Item>, usize),
    /// Got everything up to this position; drops what is not after it.
    Filtering(Position),
}

/// A member of the room whose live delivery is not plain yet.
struct ConnState {
    conn: Weak<Conn>,
    token: u64,
    phase: Phase,
}

/// One history room this shard has members in.
#[derive(Default)]
struct RoomState {
    /// The last position delivered on this shard (or known from a read).
    last: Option<Position>,
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
    conns: FxHashMap<ConnId, ConnState>,
    /// Tasks waiting for the room's SUBSCRIBE to be confirmed.
    waiters: Vec<Waker>,
}

/// One per shard, when history is on (`Shard::history`).
pub struct ShardHistory {
    pub settings: HistorySettings,
    rings: RefCell<Rings>,
    budget: ShardBudget,
    rooms: RefCell<FxHashMap<Arc<str>, RoomState>>,
    next_token: Cell<u64>,
    waiting: RefCell<FxHashMap<u64, Waiting>>,
}

impl ShardHistory {
    /// `node`: this run's epoch base (one per process, shared by its shards).
    pub fn new(settings: HistorySettings, node: Epoch) -> ShardHistory {
        ShardHistory {
            settings,
            rings: RefCell::new(Rings::new(settings, node)),
            budget: ShardBudget::default(),
            rooms: RefCell::default(),
            next_token: Cell::new(1),
            waiting: RefCell::default(),
        }
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
    pub async fn run_sweep(shard: Rc<Shard>) {
        loop {
            monoio::time::sleep(SWEEP_EVERY).await;
            if let Some(h) = shard.history() {
                h.rings().sweep(Instant::now());
            }
        }
    }

    // ---- publish -------------------------------------------------------------

    /// Publishes a client's (or the API's) message in a history room. With
    /// `want`, the slot gets its position once the authority assigned it.
    pub fn publish(
        &self,
        shard: &Rc<Shard>,
        room: &str,
        from: &str,
        data: &str,
        want: Option<Oneshot<Result<Position, Unavailable>>>,
    ) -> Result<(), Unavailable> {
        shard.m().publishes_total.inc();
        let msg = event::message_prefix(room, from, data);
        let r = match shard.bus() {
            Bus::Local => local::publish(shard, room, msg, want),
            Bus::Redis(r) => match r.history() {
                Some(link) => link.publish(room, msg, want),
                None => Err(Unavailable),
            },
        };
        if r.is_err() {
            shard.m().bus_unavailable_total.inc();
        }
        r
    }

    async fn read(&self, shard: &Shard, room: &str, q: Query) -> Result<ReadResult, Unavailable> {
        let _permit = self.budget.acquire().await;
        match shard.bus() {
            Bus::Local => local::read(shard, room, q).await,
            Bus::Redis(r) => match r.history() {
                Some(link) => link.read(room, q).await,
                None => Err(Unavailable),
            },
        }
    }

    /// Does the budget allow one more read for `conn`? Refuses with
    /// `rate_limited` if not. A `true` with `asked` (the client asked for
    /// history: `since` or the `history` op) must be paired with
    /// `conn.hist.done()`; a plain subscribe only needs the shard's room.
    fn take_budget(&self, shard: &Shard, conn: &Rc<Conn>, asked: bool, id: Option<&str>) -> bool {
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

    /// `subscribe` (with or without `since`) of a room with history.
    pub fn subscribe(&self, shard: &Rc<Shard>, conn: &Rc<Conn>, room: &str, since: Option<Since>, id: Option<&str>) {
        if !self.take_budget(shard, conn, since.is_some(), id) {
            return;
        }
        shard.subscribe(conn, room);
        let token = self.token();
        let link_down = !link_up(shard);
        let start_catch_up = {
            let mut rooms = self.rooms.borrow_mut();
            let st = rooms.entry(Arc::from(room)).or_default();
            // A second subscribe replaces a recovery still under way.
            st.conns.insert(
                conn.id,
                ConnState { conn: Rc::downgrade(conn), token, phase: Phase::Buffering(Vec::new(), 0) },
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
            monoio::spawn(catch_up(shard.clone(), Arc::from(room)));
        }
        let (shard, conn, room, id) = (shard.clone(), conn.clone(), Arc::<str>::from(room), id.map(Box::<str>::from));
        monoio::spawn(async move {
            let Some(h) = shard.history() else { return };
            h.room_ready(&shard, &room, false).await;
            let q = Query::recover(since, if since.is_some() { h.settings.size } else { 0 });
            let r = h.read(&shard, &room, q).await;
            if since.is_some() {
                conn.hist.done();
            }
            h.finish_subscribe(&shard, &conn, &room, token, since, id.as_deref(), r);
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_subscribe(
        &self,
        shard: &Shard,
        conn: &Rc<Conn>,
        room: &str,
        token: u64,
        since: Option<Since>,
        id: Option<&str>,
        r: Result<ReadResult, Unavailable>,
    ) {
        let mut rooms = self.rooms.borrow_mut();
        let Some(st) = rooms.get_mut(room) else { return };
        if st.conns.get(&conn.id).is_none_or(|c| c.token != token) {
            return; // Unsubscribed, or subscribed again, meanwhile.
        }
        let Some(state) = st.conns.remove(&conn.id) else { return };
        if !shard.has_conn(conn) {
            return;
        }
        let r = match r {
            Ok(r) => r,
            Err(Unavailable) => {
                drop(rooms);
                shard.unsubscribe(conn, room);
                shard.m().client_errors_total.inc();
                conn.push(shard, event::error(ErrorCode::Unavailable, "room history is unavailable, try again", id));
                return;
            }
        };
        if st.last.is_none() {
            st.last = Some(r.pos);
        }
        conn.push(shard, event::subscribed(room, id, &r.pos, since.map(|_| r.covered)));
        if since.is_some() {
            if r.covered {
                shard.m().history_recovered_total.inc();
            } else {
                shard.m().history_unrecovered_total.inc();
            }
        }
        let mut got = r.pos;
        for e in &r.entries {
            conn.push(shard, e.frame.clone());
        }
        if let Some(last) = r.entries.last() {
            got.offset = last.offset.max(got.offset);
        }
        if let Phase::Buffering(items, _) = state.phase {
            for item in items {
                if after(&item.pos, &got) {
                    conn.push(shard, item.frame);
                    got = item.pos;
                }
            }
        }
        // Still on its way through the live path? Keep filtering until passed.
        let passed = st.last.is_some_and(|l| l.epoch == got.epoch && l.offset >= got.offset);
        if !passed {
            st.conns.insert(conn.id, ConnState { conn: state.conn, token, phase: Phase::Filtering(got) });
        }
    }

    /// `conn` left `room` (unsubscribe): its pending recovery is dropped.
    pub fn forget(&self, conn: &Conn, room: &str) {
        if let Some(st) = self.rooms.borrow_mut().get_mut(room) {
            st.conns.remove(&conn.id);
        }
    }

    /// The shard's last member of `room` left.
    pub fn room_gone(&self, room: &str) {
        let mut rooms = self.rooms.borrow_mut();
        if let Some(st) = rooms.get_mut(room) {
            // A catch-up task still running finds the room gone and ends.
            for w in st.waiters.drain(..) {
                w.wake();
            }
        }
        rooms.remove(room);
    }

    // ---- the history op -------------------------------------------------------

    /// `{"op":"history",...}`: reads and replies; does not subscribe.
    pub fn history_op(
        &self,
        shard: &Rc<Shard>,
        conn: &Rc<Conn>,
        room: &str,
        limit: usize,
        since: Option<Since>,
        id: Option<&str>,
    ) {
        if !self.take_budget(shard, conn, true, id) {
            return;
        }
        let limit = limit.min(self.settings.size);
        let (shard, conn, room, id) = (shard.clone(), conn.clone(), Arc::<str>::from(room), id.map(Box::<str>::from));
        monoio::spawn(async move {
            let Some(h) = shard.history() else { return };
            let q = Query { after: since, limit, listing: true, fence: false };
            let r = h.read(&shard, &room, q).await;
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

    // ---- live messages ---------------------------------------------------------

    /// A live message with a position, from the owner shard or Redis.
    pub fn on_live(&self, shard: &Rc<Shard>, room: &str, pos: Position, frame: Bytes, sent: Instant) {
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
        if st.last.is_some_and(|l| !after(&pos, &l)) {
            shard.m().history_duplicates_dropped_total.inc();
            return;
        }
        if st.last.is_some_and(|l| l.epoch == pos.epoch && pos.offset > l.offset + 1) {
            // A message of this epoch never reached the shard (it cannot
            // happen on an ordered, lossless path; if a hop ever drops one,
            // the history has it): hold this one and read what is missing.
            debug!(
                shard = shard.id,
                room,
                after = st.last.map(|l| l.offset),
                got = pos.offset,
                "hole in a live stream"
            );
            st.held = Some(vec![item]);
            st.catching_up = true;
            drop(rooms);
            monoio::spawn(catch_up(shard.clone(), Arc::from(room)));
            return;
        }
        st.last = Some(pos);
        fan_out(shard, room, st, item, Some(sent));
    }

    // ---- the Redis subscriber link ---------------------------------------------

    /// `ShardMsg::RedisLink`: down starts the catch-up of every history room.
    pub fn on_link(&self, shard: &Rc<Shard>, up: bool) {
        let mut start = Vec::new();
        {
            let mut rooms = self.rooms.borrow_mut();
            for (name, st) in rooms.iter_mut() {
                for w in st.waiters.drain(..) {
                    w.wake();
                }
                if up {
                    continue;
                }
                if st.catching_up {
                    st.again = true;
                } else {
                    st.held = Some(Vec::new());
                    st.catching_up = true;
                    start.push(name.clone());
                }
            }
        }
        for room in start {
            monoio::spawn(catch_up(shard.clone(), room));
        }
    }

    /// `ShardMsg::Subscribed`: Redis confirmed `room`.
    pub fn on_subscribed(&self, room: &str) {
        if let Some(st) = self.rooms.borrow_mut().get_mut(room) {
            for w in st.waiters.drain(..) {
                w.wake();
            }
        }
    }

    /// Resolves once `room` is subscribed at Redis (standalone: at once).
    /// `strict`: the link must be up; else a down link also resolves it (the
    /// catch-up covers what the read cannot).
    async fn room_ready(&self, shard: &Shard, room: &str, strict: bool) {
        std::future::poll_fn(|cx| {
            let Bus::Redis(r) = shard.bus() else { return std::task::Poll::Ready(()) };
            let up = r.link_is_up();
            let mut rooms = self.rooms.borrow_mut();
            let Some(st) = rooms.get_mut(room) else { return std::task::Poll::Ready(()) };
            if (up && r.is_confirmed(room)) || (!strict && !up) {
                return std::task::Poll::Ready(());
            }
            st.waiters.push(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }
}

/// Is `p` a message the holder of `got` has not had yet?
fn after(p: &Position, got: &Position) -> bool {
    p.epoch != got.epoch || p.offset > got.offset
}

fn link_up(shard: &Shard) -> bool {
    match shard.bus() {
        Bus::Local => true,
        Bus::Redis(r) => r.link_is_up(),
    }
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
            Phase::Buffering(items, bytes) => {
                *bytes += item.frame.len() + ITEM_OVERHEAD;
                if *bytes > shard.cfg.outbound_queue_bytes {
                    // As a slow consumer's outbox would (`Conn::push`).
                    shard.m().slow_consumer_disconnects_total.inc();
                    conn.kill(shard, crate::ws::CloseCode::POLICY);
                    return false;
                }
                items.push(item.clone());
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
async fn catch_up(shard: Rc<Shard>, room: Arc<str>) {
    let Some(h) = shard.history() else { return };
    loop {
        h.room_ready(&shard, &room, true).await;
        let last = match h.rooms.borrow().get(&room) {
            None => return,
            Some(st) => st.last,
        };
        let mut got = None;
        if let Some(last) = last {
            for _ in 0..CATCH_UP_TRIES {
                match h.read(&shard, &room, Query::catch_up(last, h.settings.size)).await {
                    Ok(r) => {
                        got = Some(r);
                        break;
                    }
                    Err(Unavailable) => monoio::time::sleep(CATCH_UP_RETRY).await,
                }
            }
        }
        let mut rooms = h.rooms.borrow_mut();
        let Some(st) = rooms.get_mut(&room) else { return };
        let held = st.held.take().unwrap_or_default();
        st.held_bytes = 0;
        st.overflowed = false;
        match got {
            Some(r) if r.covered => {
                let n = r.entries.len();
                for e in r.entries {
                    let pos = Position { epoch: r.pos.epoch, offset: e.offset };
                    if st.last.is_none_or(|l| after(&pos, &l)) {
                        st.last = Some(pos);
                        fan_out(&shard, &room, st, Item { pos, frame: e.frame }, None);
                    }
                }
                shard.m().history_caught_up_total.add(n as u64);
                debug!(shard = shard.id, room = %room, messages = n, "caught up");
            }
            Some(r) => {
                st.last = Some(r.pos);
                send_gap(&shard, &room, st, r.pos);
            }
            // No read possible (the store stayed down, or nothing known):
            // what comes next is live, what was before may be missing.
            None => {
                if let Some(first) = held.first() {
                    let pos = Position { epoch: first.pos.epoch, offset: first.pos.offset.saturating_sub(1) };
                    st.last = Some(pos);
                    send_gap(&shard, &room, st, pos);
                }
            }
        }
        // The room's epoch changed under us (history lost, or fenced by the
        // read above): what was held from the old epoch is gone with it.
        let stale = last.filter(|l| st.last.is_some_and(|n| n.epoch != l.epoch)).map(|l| l.epoch);
        for item in held {
            if stale.is_some_and(|e| item.pos.epoch == e) {
                continue;
            }
            if st.last.is_none_or(|l| after(&item.pos, &l)) {
                st.last = Some(item.pos);
                fan_out(&shard, &room, st, item, None);
            }
        }
        if !std::mem::take(&mut st.again) {
            st.catching_up = false;
            return;
        }
        st.held = Some(Vec::new());
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
    event::history(room, &r.pos, &items, id)
}

/// Publishes into a history room and resolves to the message's position
/// once its store assigned one (`POST /api/publish`, §4 + §7).
pub async fn publish_positioned(
    shard: &Rc<Shard>,
    h: &ShardHistory,
    room: &str,
    from: &str,
    data: &str,
) -> Result<Position, Unavailable> {
    let slot = Oneshot::default();
    h.publish(shard, room, from, data, Some(slot.clone()))?;
    slot.wait().await
}
