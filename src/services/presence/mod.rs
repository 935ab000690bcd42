//! Presence (PROTOCOL.md §11): who is in a room across the cluster, and
//! the join/leave events of rooms whose namespace asks for them.
//!
//! # The model
//!
//! A *writer* is one shard (standalone: the shard index; with Redis: the
//! node's random id and the shard index, `<node>.<shard>`). A writer only
//! ever states its *absolute* count of a user's connections in a room
//! (`Table::set`, `scripts/set.lua`): idempotent, so writing everything
//! again after the backplane came back (`resync`) is always right, and the
//! room's authority turns those counts into totals, a member order and the
//! join/leave transitions, once for the whole cluster:
//!
//! - standalone, the authority of room R is one shard of the node
//!   (`history::ring::owner_of`), reached through the inboxes;
//! - with Redis, the room's keys (hash tag `{<prefix>room:R}`, the room
//!   channel's own slot, so every topology routes them like the history),
//!   changed only by the scripts.
//!
//! # What it costs
//!
//! Changes are batched per turn of the shard's event loop: every (room,
//! user) touched in a turn is written in one script call per room. Nothing
//! is refreshed periodically per connection or per room: a writer's only
//! periodic command is its lease (`LEASE_PERIOD`), whatever it holds. A
//! writer whose lease lapses (its node crashed, or was cut off from Redis
//! for `LEASE_TTL`) is *reaped* by the first live writer that sees it: its
//! counts are taken out of every room it wrote in (its room set), and the
//! leaves it owed become the reaper's. A writer back after being reaped
//! finds its lease absent and writes everything again.
//!
//! # Join and leave
//!
//! A total going 0 → n is a `join`, published into the room by whoever's
//! write caused it; n → 0 owes a `leave` after the namespace's grace: that
//! writer waits, then asks the authority (`leave_due`) whether it is still
//! owed (nobody came back meanwhile) and publishes it if so. A user back
//! within the grace takes the owed leave and causes no join: for one user
//! in one room, joins and leaves alternate.
//!
//! In: `touch` from `Services` (a presence room's membership changed on
//! this shard), reads from the ops and the HTTP API, `Msg`s from the inbox,
//! the link coming back. Out: the store (owner shard or Redis), join/leave
//! frames through `Services::publish`.

mod redis;
pub mod table;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};

use self::table::{Change, Flags, Table};
use super::Services;
use crate::history::ring::owner_of;
use crate::protocol::presence::{Count, Msg, Page, Read};
use crate::protocol::{Target, Unavailable, event};
use crate::rt::Oneshot;
use crate::shard::ShardMsg;

/// A read waits this long for the owner shard or Redis (`unavailable`
/// after; §12 bounds cluster-wide calls at 2 s too).
const READ_WAIT: Duration = Duration::from_secs(2);
/// A batch a full inbox did not take is tried again after this.
const RETRY: Duration = Duration::from_millis(10);
/// A lost or refused presence write is tried again after this (while Redis
/// is away, every this often).
const LOST_RETRY: Duration = Duration::from_millis(300);
/// With Redis, writes of one shard are at least this far apart: the first change after
/// a quiet spell is written in its own turn; during a storm the changes of
/// the next `LINGER` join one batch (one call per room), so a steady stream
/// of joins costs Redis a call per room per `LINGER`, not one per turn.
const LINGER: Duration = Duration::from_millis(2);
/// How long a drained node waits for its last presence writes.
const SETTLE: Duration = Duration::from_secs(1);
/// At most this many users per script call (a join storm of one room is a
/// few calls, each short enough not to stall Redis).
const BATCH_USERS: usize = 500;

/// A user's pseudo-room: `#U` counts U's connections (any room), for the
/// `user_online`/`user_offline` webhooks. `#` is no room-name character.
const USER_ROOM: &str = "#";

/// What the webhooks hear (PROTOCOL.md §11), each once per transition for
/// the cluster, debounced where the protocol says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    UserOnline,
    UserOffline,
    RoomOccupied,
    RoomVacated,
}

/// Where the hooks go (`server` wires the node's webhook sender).
pub type Hooks = Rc<dyn Fn(Hook, &str)>;

/// The token of a leave or vacated owed after a wait.
pub(crate) enum Owed {
    Local(u64),
    Redis(String),
}

fn set_gauge(g: &crate::metrics::Counter, v: usize) {
    g.sub(g.get());
    g.add(v as u64);
}

/// With Redis: this shard's (room, user) members in presence rooms, the
/// pairs it writes counts for (`corecast_presence_members`; taken at each
/// lease, O(this shard's memberships)).
pub(crate) fn count_members(svc: &Services) {
    let ns = &svc.shard.cfg.namespaces;
    let pairs: FxHashSet<(Rc<str>, Rc<str>)> = svc.shard.room_users(|r| ns.of(r).presence).into_iter().collect();
    set_gauge(&svc.shard.m().presence_members, pairs.len());
}

/// One per shard, in `Services`.
pub struct Presence {
    /// (room, user) whose count on this shard changed since the last flush.
    dirty: RefCell<FxHashSet<(Rc<str>, Rc<str>)>>,
    flushing: Cell<bool>,
    /// When the last flush ran (`LINGER`).
    flushed: Cell<std::time::Instant>,
    next_token: Cell<u64>,
    /// Changes of rooms whose Redis subscription is not confirmed yet
    /// (`when_settled`), and the rooms waited for.
    held: RefCell<FxHashSet<(Rc<str>, Rc<str>)>>,
    settling: RefCell<FxHashSet<Rc<str>>>,
    /// Rooms where this shard waits out a grace (leaves it may owe): kept
    /// in its Redis room set until they are over.
    timers: RefCell<FxHashMap<Rc<str>, u32>>,
    store: Store,
    /// With `--webhook-url`: users' online/offline and presence rooms'
    /// occupied/vacated go here, after `debounce` for the "gone" ones.
    hooks: Option<Hooks>,
    debounce: Duration,
}

enum Store {
    /// Standalone: this shard's share of the rooms (it is their owner), and
    /// the reads it waits for from other owners.
    Local {
        table: RefCell<Table>,
        waiting: RefCell<FxHashMap<u64, Oneshot<Page>>>,
    },
    Redis(Rc<redis::PresenceLink>),
}

impl Presence {
    /// `hooks`: where the webhook transitions go, and their debounce.
    pub fn new(shard: &crate::shard::Shard, bus: &crate::bus::Bus, hooks: Option<(Hooks, Duration)>) -> Presence {
        let store = match bus {
            crate::bus::Bus::Local => Store::Local { table: RefCell::default(), waiting: RefCell::default() },
            crate::bus::Bus::Redis(r) => Store::Redis(redis::PresenceLink::new(r, &shard.cfg.namespaces)),
        };
        Presence {
            dirty: RefCell::default(),
            flushing: Cell::new(false),
            flushed: Cell::new(std::time::Instant::now() - LINGER),
            next_token: Cell::new(1),
            timers: RefCell::default(),
            held: RefCell::default(),
            settling: RefCell::default(),
            store,
            debounce: hooks.as_ref().map_or(Duration::ZERO, |h| h.1),
            hooks: hooks.map(|h| h.0),
        }
    }

    /// Starts the writer's lease (with Redis).
    pub fn start(svc: &Rc<Services>) {
        if let Store::Redis(link) = &svc.presence.store {
            redis::run_lease(svc.clone(), link.clone());
        }
    }

    fn token(&self) -> u64 {
        let t = self.next_token.get();
        self.next_token.set(t + 1);
        t
    }

    /// A connection of `user` opened or closed on this shard (the
    /// `user_online`/`user_offline` hooks count them, when on).
    pub fn touch_user(svc: &Rc<Services>, user: &Rc<str>) {
        if svc.presence.hooks.is_some() {
            svc.presence.dirty.borrow_mut().insert((Rc::from(format!("{USER_ROOM}{user}")), user.clone()));
            Self::schedule(svc, Duration::ZERO);
        }
    }

    /// `user`'s connections on this shard in `room` may have changed.
    pub fn touch(svc: &Rc<Services>, room: &str, user: &Rc<str>) {
        if !svc.shard.cfg.namespaces.of(room).presence {
            return;
        }
        svc.presence.dirty.borrow_mut().insert((Rc::from(room), user.clone()));
        Self::schedule(svc, Duration::ZERO);
    }

    /// Writes every presence (room, user) of this shard again: the
    /// backplane came back, or our lease was found gone (reaped).
    pub fn resync(svc: &Rc<Services>) {
        let ns = &svc.shard.cfg.namespaces;
        let mut all = svc.shard.room_users(|room| ns.of(room).presence);
        if svc.presence.hooks.is_some() {
            all.extend(svc.shard.users().into_iter().map(|u| (Rc::from(format!("{USER_ROOM}{u}")), u)));
        }
        if let Store::Redis(link) = &svc.presence.store {
            link.forget_registered(svc);
        }
        if all.is_empty() {
            return;
        }
        svc.presence.dirty.borrow_mut().extend(all);
        Self::schedule(svc, Duration::ZERO);
    }

    fn schedule(svc: &Rc<Services>, after: Duration) {
        if svc.presence.flushing.replace(true) {
            return;
        }
        let svc = svc.clone();
        // With Redis, within `LINGER` of the last flush: the changes until
        // then join (standalone a write is an inbox message, not a script).
        let after = match svc.presence.store {
            Store::Redis(_) => after.max(LINGER.saturating_sub(svc.presence.flushed.get().elapsed())),
            Store::Local { .. } => after,
        };
        monoio::spawn(async move {
            if after.is_zero() {
                // The rest of this turn's changes join the batch.
                svc.shard.yield_now().await;
            } else {
                monoio::time::sleep(after).await;
            }
            svc.presence.flushing.set(false);
            svc.presence.flushed.set(std::time::Instant::now());
            Self::flush(&svc);
        });
    }

    /// The node drained and is about to exit: what changed is written now
    /// (not after `LINGER`), and the writes in flight are waited for, at
    /// most `SETTLE`, so that other nodes do not see this node's last
    /// members until the reaper takes them (about 20 s).
    pub async fn settle(svc: &Rc<Services>) {
        let Store::Redis(link) = &svc.presence.store else { return };
        let end = std::time::Instant::now() + SETTLE;
        loop {
            if !svc.presence.dirty.borrow().is_empty() && link.leased() {
                Self::flush(svc);
            }
            if (link.idle() && svc.presence.dirty.borrow().is_empty()) || std::time::Instant::now() >= end {
                return;
            }
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes what changed, one call per room.
    fn flush(svc: &Rc<Services>) {
        if let Store::Redis(link) = &svc.presence.store
            && !link.leased()
        {
            return Self::schedule(svc, RETRY * 10);
        }
        let dirty = std::mem::take(&mut *svc.presence.dirty.borrow_mut());
        let mut by_room: FxHashMap<Rc<str>, Vec<Count>> = FxHashMap::default();
        let mut unsettled: FxHashSet<Rc<str>> = FxHashSet::default();
        for (room, user) in dirty {
            // With Redis, a room this node has just subscribed to is written
            // once Redis confirmed the subscription: the join it may cause is
            // published into the room, and this node's members (the joiner)
            // must hear it. The counts are taken when it is written.
            if let crate::bus::Bus::Redis(bus) = &*svc.bus
                && !room.starts_with(USER_ROOM)
                && !bus.settled(&room)
            {
                unsettled.insert(room.clone());
                svc.presence.held.borrow_mut().insert((room, user));
                continue;
            }
            let n = match room.starts_with(USER_ROOM) {
                true => svc.shard.user_conns(&user),
                false => svc.shard.user_conns_in(&user, &room),
            };
            by_room.entry(room).or_default().push((Arc::from(&*user), n));
        }
        for room in unsettled {
            Self::when_settled(svc, room);
        }
        for (room, counts) in by_room {
            for chunk in counts.chunks(BATCH_USERS) {
                match &svc.presence.store {
                    Store::Local { .. } => Self::send_local(svc, &room, chunk.to_vec()),
                    Store::Redis(link) => link.set(svc, &room, chunk.to_vec()),
                }
            }
        }
    }

    /// A write of `users` in `room` was lost or refused: they are written
    /// again (their counts as they are then) after `LOST_RETRY`.
    pub(crate) fn write_again(svc: &Rc<Services>, room: &Rc<str>, users: Vec<Rc<str>>) {
        svc.shard.m().presence_rewrites_total.inc();
        svc.presence.dirty.borrow_mut().extend(users.into_iter().map(|u| (room.clone(), u)));
        Self::schedule(svc, LOST_RETRY);
    }

    /// Writes `room`'s held changes once this node's subscription to it is
    /// confirmed (or given up on: then they go anyway).
    fn when_settled(svc: &Rc<Services>, room: Rc<str>) {
        if !svc.presence.settling.borrow_mut().insert(room.clone()) {
            return;
        }
        let svc = svc.clone();
        monoio::spawn(async move {
            if let crate::bus::Bus::Redis(bus) = &*svc.bus {
                bus.confirmed(&room, false).await;
            }
            svc.presence.settling.borrow_mut().remove(&room);
            let held: Vec<_> = {
                let mut held = svc.presence.held.borrow_mut();
                let mine: Vec<_> = held.iter().filter(|(r, _)| *r == room).cloned().collect();
                mine.iter().for_each(|k| {
                    held.remove(k);
                });
                mine
            };
            svc.presence.dirty.borrow_mut().extend(held);
            Self::schedule(&svc, Duration::ZERO);
        });
    }

    /// Standalone: to the room's owner (maybe this shard).
    fn send_local(svc: &Rc<Services>, room: &Rc<str>, counts: Vec<Count>) {
        let shard = &svc.shard;
        let owner = owner_of(room, shard.peers().len());
        let writer = shard.id as u32;
        if owner == shard.id {
            return Self::apply(svc, Arc::from(&**room), writer, counts);
        }
        let msg = Msg::Set { room: Arc::from(&**room), writer, counts };
        if let Err(ShardMsg::Presence(msg)) = shard.send_to(owner, ShardMsg::Presence(Box::new(msg))) {
            // The queue is full: the counts are taken again, fresh, later.
            if let Msg::Set { counts, .. } = *msg {
                let mut dirty = svc.presence.dirty.borrow_mut();
                dirty.extend(counts.into_iter().map(|(u, _)| (room.clone(), Rc::from(&*u))));
            }
            Self::schedule(svc, RETRY);
        }
    }

    /// Standalone owner: applies a writer's counts.
    fn apply(svc: &Rc<Services>, room: Arc<str>, writer: u32, counts: Vec<Count>) {
        let Store::Local { table, .. } = &svc.presence.store else { return };
        let flags = svc.presence.flags(&svc.shard.cfg.namespaces, &room);
        let mut changes = Vec::new();
        {
            let mut t = table.borrow_mut();
            for (user, n) in &counts {
                let mut out = Vec::new();
                t.set(&room, writer, user, *n, (flags, svc.presence.token()), &mut out);
                changes.extend(out.into_iter().map(|c| (user.clone(), c)));
            }
            let m = svc.shard.m();
            set_gauge(&m.presence_rooms_owned, t.rooms());
            set_gauge(&m.presence_members, t.members());
        }
        let room: Rc<str> = Rc::from(&*room);
        for (user, c) in changes {
            let user: Rc<str> = Rc::from(&*user);
            match c {
                Change::Join(_) => Self::react(svc, &room, Some(&user), true),
                Change::Occupied => Self::react(svc, &room, None, true),
                Change::Zero(_, token) => Self::owe(svc, room.clone(), Some(user), Owed::Local(token)),
                Change::Vacant(token) => Self::owe(svc, room.clone(), None, Owed::Local(token)),
            }
        }
    }

    /// What a room (or a user's pseudo-room) reports, as `flags`.
    fn flags(&self, ns: &crate::config::Namespaces, room: &str) -> Flags {
        if room.starts_with(USER_ROOM) {
            return Flags { users: true, rooms: false };
        }
        Flags { users: ns.of(room).join_leave, rooms: self.hooks.is_some() }
    }

    /// A transition took effect: `user` (None: the room itself) came (`on`)
    /// or went for good. Joins and leaves are published into the room;
    /// users' online/offline and rooms' occupied/vacated go to the hooks.
    fn react(svc: &Rc<Services>, room: &Rc<str>, user: Option<&Rc<str>>, on: bool) {
        let hook = |kind: Hook, subject: &str| {
            if let Some(h) = &svc.presence.hooks {
                h(kind, subject);
            }
        };
        match (room.strip_prefix(USER_ROOM), user) {
            (Some(u), _) => hook(if on { Hook::UserOnline } else { Hook::UserOffline }, u),
            (None, Some(user)) => Self::say(svc, if on { "join" } else { "leave" }, room, user),
            (None, None) => hook(if on { Hook::RoomOccupied } else { Hook::RoomVacated }, room),
        }
    }

    /// A leave (or vacated, `user` None) is owed after the grace (the
    /// debounce): waits it out, asks the authority whether it still is, and
    /// says it if so. The room stays in the writer's room set meanwhile, so
    /// a reaper can take it over if this node dies.
    fn owe(svc: &Rc<Services>, room: Rc<str>, user: Option<Rc<str>>, owed: Owed) {
        let wait = match (room.starts_with(USER_ROOM), &user) {
            (false, Some(_)) => svc.shard.cfg.namespaces.of(&room).presence_grace,
            _ => svc.presence.debounce,
        };
        *svc.presence.timers.borrow_mut().entry(room.clone()).or_insert(0) += 1;
        let svc = svc.clone();
        monoio::spawn(async move {
            monoio::time::sleep(wait).await;
            let due = match (&svc.presence.store, owed) {
                (Store::Local { table, .. }, Owed::Local(token)) => {
                    let mut t = table.borrow_mut();
                    match &user {
                        Some(u) => t.leave_due(&room, u, token),
                        None => t.vacate_due(&room, token),
                    }
                }
                (Store::Redis(link), Owed::Redis(token)) => link.still_owed(&svc, &room, user.as_deref(), &token).await,
                _ => false,
            };
            if due {
                Self::react(&svc, &room, user.as_ref(), false);
            }
            let mut timers = svc.presence.timers.borrow_mut();
            if let Some(n) = timers.get_mut(&room) {
                *n -= 1;
                if *n == 0 {
                    timers.remove(&room);
                }
            }
            drop(timers);
            if let Store::Redis(link) = &svc.presence.store {
                link.unregister_if_idle(&svc, &room);
            }
        });
    }

    /// Publishes a join or leave into the room, for every node's members.
    fn say(svc: &Rc<Services>, ev: &'static str, room: &str, user: &str) {
        svc.shard.m().presence_events_total.inc();
        if svc.publish(Target::Room(room), event::join_leave(ev, room, user)).is_err() {
            crate::warn_throttled!(svc.shard.id, "a presence {ev} could not be published: the backplane refused it");
        }
    }

    /// The room's presence, cluster-wide (`limit` 0: the counts only).
    pub async fn read(svc: &Rc<Services>, room: &str, read: Read) -> Result<Page, Unavailable> {
        match &svc.presence.store {
            Store::Redis(link) => link.read(room, &read).await,
            Store::Local { table, waiting } => {
                let shard = &svc.shard;
                let owner = owner_of(room, shard.peers().len());
                if owner == shard.id {
                    return Ok(table.borrow().read(room, &read));
                }
                let token = svc.presence.token();
                let slot = Oneshot::default();
                waiting.borrow_mut().insert(token, slot.clone());
                let msg = Msg::Read { room: Arc::from(room), read, reply_to: shard.id, token };
                let sent = shard.send_to(owner, ShardMsg::Presence(Box::new(msg))).is_ok();
                let r = match sent {
                    true => monoio::time::timeout(READ_WAIT, slot.wait()).await.map_err(|_| Unavailable),
                    false => Err(Unavailable),
                };
                waiting.borrow_mut().remove(&token);
                r
            }
        }
    }

    /// A `ShardMsg::Presence` arrived (standalone).
    pub fn on_msg(svc: &Rc<Services>, msg: Msg) {
        match msg {
            Msg::Set { room, writer, counts } => Self::apply(svc, room, writer, counts),
            Msg::Read { room, read, reply_to, token } => {
                let Store::Local { table, .. } = &svc.presence.store else { return };
                let page = table.borrow().read(&room, &read);
                // A full queue: the asker times out (`READ_WAIT`), says
                // `unavailable`, and may ask again.
                let _ = svc.shard.send_to(reply_to, ShardMsg::Presence(Box::new(Msg::Reply { token, page })));
            }
            Msg::Reply { token, page } => {
                if let Store::Local { waiting, .. } = &svc.presence.store
                    && let Some(slot) = waiting.borrow_mut().remove(&token)
                {
                    slot.fill(page);
                }
            }
        }
    }
}
