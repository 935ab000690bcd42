//! ⑤ ⑧ ⑨ The fan-out core of one shard (a thread pinned to one core, with its
//! monoio runtime): its connection table, its room and user tables, fan-out,
//! drain and its inbox. It is built on the shard's connection runtime
//! (`conn::ShardIo`: clock, poller, dirty list, flusher), which it derefs to.
//!
//! `Shard` is `!Send`: it is shared between the shard's tasks as `Rc<Shard>`
//! with `RefCell`/`Cell` fields, never borrowed across an `.await`. The only
//! way in from another thread is the inbox (`inbox`: one queue per sending
//! shard, one for the Redis reader, one for control); the way out to other
//! shards is `peers` (only to the shards the `interest` table names, woken
//! once per turn).
//!
//! Fan-out (⑨) is `deliver`: one encoded frame, cloned (a reference count) into
//! every member's `Outbox`. Each connection that got a frame is put once on
//! the dirty list; the flusher task empties the list once per turn of the
//! event loop, so everything queued to a connection in that turn leaves in
//! one `sendmsg`.
//!
//! # The RefCell contract
//!
//! The tables (`conns`, `rooms`, `users`) are borrowed while the shard walks
//! them: fan-out in `deliver`, the heartbeat sweep, the token-expiry sweep,
//! drain planning. While one is borrowed, only these `Conn` calls may run:
//! `push`, `pong`, `close`, `kill` (and `flush`). They receive the shard's
//! `&ShardIo`, which has no table: they touch the connection's own cells,
//! the runtime's `dirty` and `closing` lists and the socket (a `kill` only
//! shuts the read side), and the types keep them from reaching a table. Everything that
//! changes membership — `add_conn`, `remove_conn`, `subscribe`,
//! `unsubscribe`, `upgraded` — borrows a table mutably and must never be
//! reached from inside such a walk: a connection that is cut off leaves the
//! tables later, outside any borrow — its shut read side makes the poller
//! (`conn::poller`) report it in its next round, and the task that closes it
//! (`session::end`) removes it. The poller's dispatch (`session::run_poller`)
//! calls into a connection (`conn::on_readable`, whose messages go to the
//! ops, which may subscribe, publish, deliver) holding no borrow: it clones
//! the `Rc<Conn>` out of the table first. `tests/hostile.rs` pins this by
//! killing connections from inside a fan-out and a heartbeat sweep (a broken
//! contract panics the shard).
//! No borrow is ever held across an `.await`.

pub mod census;
pub mod heartbeat;
pub mod inbox;
pub mod interest;
mod peers;
pub mod rooms;

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;
use tracing::{debug, info};

pub use inbox::{Inbox, InboxSender, RelayNews, ShardMsg};
pub use peers::Links;
use rooms::{RoomTable, UserTable};

use crate::conn::{Conn, Listener, ShardIo};
use crate::protocol::{Target, event};
use crate::rt::until;
use crate::ws::CloseCode;

pub use crate::conn::ConnId;

/// A drained shard looks this often whether the node's other shards are
/// drained too.
const NODE_DRAIN_POLL: Duration = Duration::from_millis(20);

/// What a closed connection leaves behind: the rooms and the user it was
/// this shard's last member of (`Shard::remove_conn`).
#[derive(Default)]
pub struct Left {
    pub rooms: crate::conn::Rooms,
    pub user: Option<Rc<str>>,
}

pub struct Shard {
    /// The connection runtime this shard's connections get (`conn::ShardIo`):
    /// id, config, counters, clock, poller, dirty list, close queue. `Shard`
    /// derefs to it.
    io: Rc<ShardIo>,
    /// Its queues into the other shards, the interest table, owed wakes.
    links: Links,
    conns: RefCell<Slab<Rc<Conn>>>,
    rooms: RefCell<RoomTable>,
    users: RefCell<UserTable>,
    draining: Cell<bool>,
    /// Wakes the shard's main future when draining starts and when the last
    /// WebSocket connection leaves during a drain.
    drain_waker: Cell<Option<Waker>>,
    /// The heartbeat cursor (`heartbeat::run`).
    sweep: heartbeat::Sweep,
    /// Every queue into this shard (`inbox.rs`), drained by the services'
    /// inbox task (`services::Services::run_inbox`).
    inbox: Inbox,
}

impl std::ops::Deref for Shard {
    type Target = ShardIo;

    /// The fan-out core is built on its connection runtime: a `&Shard` is
    /// accepted wherever a connection's `&ShardIo` is.
    fn deref(&self) -> &ShardIo {
        &self.io
    }
}

impl Shard {
    pub fn new(io: Rc<ShardIo>, links: Links, inbox: Inbox) -> Rc<Shard> {
        Rc::new(Shard {
            io,
            links,
            conns: RefCell::new(Slab::new()),
            rooms: RefCell::default(),
            users: RefCell::default(),
            draining: Cell::new(false),
            drain_waker: Cell::new(None),
            sweep: heartbeat::Sweep::default(),
            inbox,
        })
    }

    /// The connection runtime, for the tasks that keep it (`Rc`).
    pub fn io(&self) -> &Rc<ShardIo> {
        &self.io
    }

    /// This shard's inbox (for `bus::local`'s ordering of its own publishes,
    /// and the services' inbox task).
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// This shard drains, or the node has started to (`Node::drain`).
    pub fn is_draining(&self) -> bool {
        self.draining.get() || self.metrics.node_draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Is `conn` still this shard's open connection (not closed and replaced)?
    pub(crate) fn has_conn(&self, conn: &Rc<Conn>) -> bool {
        self.conns.borrow().get(conn.id as usize).is_some_and(|c| Rc::ptr_eq(c, conn))
    }

    /// This shard's connection `id`, if it is open.
    pub(crate) fn conn(&self, id: ConnId) -> Option<Rc<Conn>> {
        self.conns.borrow().get(id as usize).cloned()
    }

    // ---- connections -------------------------------------------------------

    /// Takes ownership of an accepted socket. `corecast_sockets` counts it
    /// until the `Conn` (and with it the descriptor) is dropped.
    pub fn add_conn(&self, fd: std::os::fd::RawFd, listener: Listener) -> Rc<Conn> {
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let conn = Rc::new(Conn::new(entry.key() as ConnId, fd, listener));
        entry.insert(conn.clone());
        self.m().sockets.inc();
        conn
    }

    /// Takes one of the node's `--max-connections` places, if one is free.
    /// A place taken here is given back by `remove_conn` once the connection
    /// has a user (`upgraded`), so call this right before `upgraded`.
    pub fn try_admit(&self) -> bool {
        let max = self.cfg.max_connections;
        if max == usize::MAX {
            return true;
        }
        let open = &self.metrics.node_connections;
        if open.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= max {
            open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.m().max_connections_refused_total.inc();
            return false;
        }
        true
    }

    /// The connection finished its WebSocket handshake as `user`. True: it
    /// is the user's first connection on this shard (an edge for the bus).
    #[must_use = "a user's first connection must reach the bus (services)"]
    pub fn upgraded(&self, conn: &Rc<Conn>, user: Rc<str>) -> bool {
        conn.limits.seen(self.tick());
        let first = self.users.borrow_mut().add(&user, conn.id);
        conn.set_user(user);
        self.m().connections.inc();
        self.m().connections_total.inc();
        first
    }

    /// Forgets a connection: leaves its rooms and its user entry. Returns
    /// the rooms and the user it was this shard's last member of.
    #[must_use = "the rooms and the user left empty must reach the bus and the history (services)"]
    pub fn remove_conn(&self, conn: &Rc<Conn>) -> Left {
        let mut left = Left::default();
        for room in conn.take_rooms() {
            if self.rooms.borrow_mut().leave(&room, conn.id).edge {
                left.rooms.push(room);
            }
        }
        if let Some(user) = conn.user() {
            if self.users.borrow_mut().remove(&user, conn.id) {
                left.user = Some(user);
            }
            self.m().connections.sub(1);
            if self.cfg.max_connections != usize::MAX {
                self.metrics.node_connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        conn.forget_own(&self.io);
        self.conns.borrow_mut().try_remove(conn.id as usize);
        if self.draining.get()
            && self.m().connections.get() == 0
            && let Some(w) = self.drain_waker.take()
        {
            w.wake();
        }
        left
    }

    /// `conn` joins `room`. True: its first member on this shard (an edge
    /// for the bus, which must hear of it before any reply to the member).
    #[must_use = "a room's first member must reach the bus (services)"]
    pub fn subscribe(&self, conn: &Rc<Conn>, room: &str) -> bool {
        let (key, change) = self.rooms.borrow_mut().join(room, conn.id);
        if let Some(key) = key {
            conn.add_room(key);
        }
        change.edge
    }

    /// `conn` leaves `room`. True: it was the room's last member here (an
    /// edge for the bus and the history).
    #[must_use = "a room's last member leaving must reach the bus and the history (services)"]
    pub fn unsubscribe(&self, conn: &Rc<Conn>, room: &str) -> bool {
        let change = self.rooms.borrow_mut().leave(room, conn.id);
        if change.changed {
            conn.remove_room(room);
        }
        change.edge
    }

    /// How many of `user`'s connections on this shard are in `room`
    /// (presence counts it per shard; usually one or two connections).
    pub fn user_conns_in(&self, user: &str, room: &str) -> u32 {
        let conns = self.conns.borrow();
        let users = self.users.borrow();
        let in_room = |c: &Rc<Conn>| c.with_rooms(|rs| rs.iter().any(|r| &**r == room));
        users.conns(user).iter().filter(|id| conns.get(**id as usize).is_some_and(in_room)).count() as u32
    }

    /// `user`'s connections on this shard.
    pub fn user_conn_list(&self, user: &str) -> Vec<Rc<Conn>> {
        let conns = self.conns.borrow();
        self.users.borrow().conns(user).iter().filter_map(|id| conns.get(*id as usize).cloned()).collect()
    }

    /// How many connections `user` has on this shard.
    pub fn user_conns(&self, user: &str) -> u32 {
        self.users.borrow().conns(user).len() as u32
    }

    /// Every user with a connection on this shard.
    pub fn users(&self) -> Vec<Rc<str>> {
        self.users.borrow().names().cloned().collect()
    }

    /// Every (room, user) with a connection on this shard, for rooms `keep`
    /// picks: what presence writes again after the backplane came back.
    pub fn room_users(&self, keep: impl Fn(&str) -> bool) -> Vec<(Rc<str>, Rc<str>)> {
        let conns = self.conns.borrow();
        let rooms = self.rooms.borrow();
        let mut out = Vec::new();
        for name in rooms.names().filter(|n| keep(n)) {
            for id in rooms.members(name).into_iter().flatten() {
                if let Some(user) = conns.get(*id as usize).and_then(|c| c.user()) {
                    out.push((name.clone(), user));
                }
            }
        }
        out
    }

    // ---- fan-out ---------------------------------------------------------------

    /// Like `deliver`, and if any local member got the frame, records the
    /// time since `sent` in `corecast_delivery_latency_seconds` (once per
    /// message per shard, not per recipient).
    pub fn deliver_timed(&self, target: Target<'_>, frame: &Bytes, sent: Instant) {
        if self.deliver(target, frame) > 0 {
            self.m().delivery_latency.observe(sent.elapsed());
        }
    }

    /// Has this shard a member of `target`?
    pub fn has_members(&self, target: Target<'_>) -> bool {
        match target {
            Target::Room(room) => self.rooms.borrow().members(room).is_some_and(|m| !m.is_empty()),
            Target::User(user) => !self.users.borrow().conns(user).is_empty(),
        }
    }

    /// ⑨ Queues `frame` to every local member of `target`; returns how many
    /// connections it was queued to.
    ///
    /// Members that negotiated permessage-deflate get the message's one
    /// compressed frame, built here the first time one of them needs it
    /// (`ws::deflate::Lazy`): at most one deflate per message per shard.
    pub fn deliver(&self, target: Target<'_>, frame: &Bytes) -> usize {
        let conns = self.conns.borrow();
        // The runtime once per message, not through `Deref` per recipient.
        let io: &ShardIo = &self.io;
        let mut n = 0;
        let mut z = crate::ws::deflate::Lazy::new(frame, io.cfg.compression_min_bytes);
        let mut push = |id: &ConnId| {
            if let Some(c) = conns.get(*id as usize) {
                push_maybe_compressed(io, c, &mut z);
                n += 1;
            }
        };
        match target {
            Target::Room(room) => {
                if let Some(members) = self.rooms.borrow().members(room) {
                    members.iter().for_each(&mut push);
                }
            }
            Target::User(user) => match event::disconnect_code(frame) {
                // §12 `POST /api/disconnect`: the event, then the close.
                Some(code) => {
                    for id in self.users.borrow().conns(user) {
                        if let Some(c) = conns.get(*id as usize) {
                            c.push(io, frame.clone());
                            c.close(io, CloseCode(code));
                            n += 1;
                        }
                    }
                }
                None => self.users.borrow().conns(user).iter().for_each(&mut push),
            },
        }
        n
    }

    /// The room's members on this shard (a catch-up that feeds each one).
    pub(crate) fn room_members(&self, room: &str) -> Vec<Rc<Conn>> {
        let conns = self.conns.borrow();
        let rooms = self.rooms.borrow();
        rooms
            .members(room)
            .map_or_else(Vec::new, |m| m.iter().filter_map(|id| conns.get(*id as usize).cloned()).collect())
    }

    /// Like `deliver` to a room, but skips the members `except` picks (the ones
    /// `history::recover` serves itself).
    pub(crate) fn deliver_except(&self, room: &str, frame: &Bytes, except: impl Fn(ConnId) -> bool) {
        let conns = self.conns.borrow();
        let io: &ShardIo = &self.io;
        let mut z = crate::ws::deflate::Lazy::new(frame, io.cfg.compression_min_bytes);
        if let Some(members) = self.rooms.borrow().members(room) {
            for id in members.iter().filter(|id| !except(**id)) {
                if let Some(c) = conns.get(*id as usize) {
                    push_maybe_compressed(io, c, &mut z);
                }
            }
        }
    }

    // ---- closing handshakes ----------------------------------------------------

    /// The close reaper: kills each connection whose closing handshake is
    /// overdue (a client that keeps sending but never answers our close),
    /// so that it is gone in bounded time whatever the peer does.
    pub async fn run_close_reaper(self: Rc<Self>) {
        loop {
            self.io.closes_pending().await;
            if let Some(at) = self.io.next_close_due() {
                let now = Instant::now();
                if at > now {
                    monoio::time::sleep(at - now).await;
                }
            }
            let now = Instant::now();
            while let Some(conn) = self.io.take_due_close(now) {
                if let Some(conn) = conn.upgrade()
                    && self.has_conn(&conn)
                {
                    self.m().close_timeouts_total.inc();
                    debug!(shard = self.id, conn = conn.id, "close not answered in time: cut off");
                    conn.kill(&self, CloseCode::POLICY);
                }
            }
        }
    }

    // ---- draining (PROTOCOL.md §5) -------------------------------------------

    /// Turns `/readyz` to 503, refuses new upgrades, tells every client to
    /// reconnect after a jittered delay spread over the drain window, and
    /// closes each with 1001 when its delay is up.
    pub fn start_drain(self: &Rc<Self>) {
        if self.draining.replace(true) {
            return;
        }
        let window_ms = self.cfg.drain.as_millis() as u64;
        // Leave the last fifth of the window for close handshakes.
        let spread = window_ms * 4 / 5;
        let mut plan: Vec<(u64, Weak<Conn>)> = self
            .conns
            .borrow()
            .iter()
            .filter(|(_, c)| c.user().is_some())
            .map(|(_, c)| (fastrand::u64(0..=spread), Rc::downgrade(c)))
            .collect();
        info!(shard = self.id, connections = plan.len(), window_ms, "draining");
        for (delay, c) in &plan {
            if let Some(c) = c.upgrade() {
                c.push(self, event::maintenance(*delay));
            }
        }
        plan.sort_by_key(|(d, _)| *d);
        let shard = self.clone();
        monoio::spawn(async move {
            let start = Instant::now();
            for (delay, c) in plan {
                let at = start + Duration::from_millis(delay);
                let now = Instant::now();
                if at > now {
                    monoio::time::sleep(at - now).await;
                }
                if let Some(c) = c.upgrade()
                    && shard.has_conn(&c)
                {
                    c.close(&shard, CloseCode::GOING_AWAY);
                }
            }
        });
        if let Some(w) = self.drain_waker.take() {
            w.wake();
        }
    }

    /// Resolves when the node's drain has finished: every WebSocket
    /// connection of every shard is gone, or the drain window (plus a second
    /// for close handshakes) has passed. A shard whose own connections are
    /// gone keeps serving (`/readyz` 503, `/healthz`) until then: its
    /// SO_REUSEPORT listener is still handed connections by the kernel.
    pub async fn drained(&self) {
        until(&self.drain_waker, || self.draining.get()).await;
        let all_gone = async {
            until(&self.drain_waker, || self.m().connections.get() == 0).await;
            while self.metrics.total(|m| &m.connections) > 0 {
                monoio::time::sleep(NODE_DRAIN_POLL).await;
            }
        };
        let limit = self.cfg.drain + Duration::from_secs(1);
        if monoio::time::timeout(limit, all_gone).await.is_err() {
            debug!(shard = self.id, left = self.m().connections.get(), "drain window over");
        }
    }
}

/// Queues one fan-out frame to `c`: compressed if `c` negotiated it and the
/// message has a compressed form.
#[inline]
fn push_maybe_compressed(io: &ShardIo, c: &Rc<Conn>, z: &mut crate::ws::deflate::Lazy<'_>) {
    // Its own message, in a room that does not deliver to the publisher (§10).
    if c.is_own(io, z.plain()) {
        return;
    }
    let agreed = c.deflate();
    let f = z.frame_for(agreed, || io.m().deflate_compressions_total.inc());
    if agreed.is_on() && f[0] & 0x40 != 0 {
        io.m().deflate_frames_out_total.inc();
    }
    c.push(io, f.clone());
}
