//! Presence in Redis: one shard's writer (`<node>.<shard>`), its lease, and
//! the scripts (`scripts/*.lua`), sent like the history's to the primary
//! that owns the room channel's slot over the shard's publisher links
//! (`history::redis_route`), so every topology routes them.
//!
//! Keys of room R, all tagged `{<prefix>room:R}` (the channel's slot):
//! `:pw:<writer>` (hash user → that writer's connections), `:pt` (hash
//! user → total), `:po` (zset of members, score 0, for paging by id),
//! `:pc` (connections), `:pp` (hash user → token of a leave owed after the
//! grace; expires `PENDING_TTL` after its last change, so a leave whose
//! writer died mid-grace cannot pin it: the reaper takes those over first).
//!
//! Keys of the writers, tagged `{<prefix>presence}` (one slot): `:leases`
//! (zset writer → lease expiry, Redis's clock), `:ns` (hash writer → digest
//! of its namespaces), `:rooms:<writer>` (set of the rooms it writes in),
//! `:reap:<writer>` (the claim of the one writer that reaps it).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use rustc_hash::FxHashSet;

use super::{Owed, Presence, Services};
use crate::bus::redis::RedisBus;
use crate::config::Namespaces;
use crate::history::redis_route::{OwnerRoute, Script};
use crate::protocol::presence::{Count, Page, Read};
use crate::protocol::{Epoch, Unavailable};
use crate::rt::Oneshot;

static SET: Script = Script::new(include_str!("scripts/set.lua"));
static LEAVE: Script = Script::new(include_str!("scripts/leave.lua"));
static READ: Script = Script::new(include_str!("scripts/read.lua"));
static REAP: Script = Script::new(include_str!("scripts/reap.lua"));
static LEASE: Script = Script::new(include_str!("scripts/lease.lua"));
static REAPED: Script = Script::new(include_str!("scripts/reaped.lua"));
static ROOMS: Script = Script::new(include_str!("scripts/rooms.lua"));

/// A writer renews its lease this often...
pub const LEASE_PERIOD: Duration = Duration::from_secs(5);
/// ...for this long: a writer silent this long is reaped (within one more
/// period by a live writer): a crashed node stops counting within 20 s.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// An owed-leave key outlives its last change by this (past any grace).
const PENDING_TTL: Duration = Duration::from_secs(600);

pub struct PresenceLink {
    route: Rc<OwnerRoute>,
    prefix: Arc<str>,
    /// `<node>.<shard>`.
    writer: Rc<str>,
    shard: usize,
    /// Digest of this node's namespaces (nodes compare them, §10).
    digest: String,
    /// Rooms in our room set (added before our first write in a room).
    registered: RefCell<FxHashSet<Rc<str>>>,
    next: Cell<u64>,
    /// Our lease is in Redis: writes wait for it, so that no writer ever
    /// leaves counts behind that no reaper would find.
    leased: Cell<bool>,
    /// Writes sent and not answered yet (`Presence::settle` waits for them).
    inflight: Rc<Cell<usize>>,
}

impl PresenceLink {
    pub fn new(bus: &RedisBus, ns: &Namespaces) -> Rc<PresenceLink> {
        Rc::new(PresenceLink {
            route: OwnerRoute::new(bus.publisher().clone()),
            prefix: bus.prefix().clone(),
            writer: Rc::from(format!("{}.{}", Epoch::node().as_str(), bus.shard())),
            shard: bus.shard(),
            digest: sha1_smol::Sha1::from(format!("{ns:?}")).digest().to_string(),
            registered: RefCell::default(),
            next: Cell::new(1),
            leased: Cell::new(false),
            inflight: Rc::default(),
        })
    }

    /// No write of ours is waiting for Redis.
    pub fn idle(&self) -> bool {
        self.inflight.get() == 0
    }

    fn token(&self) -> String {
        let n = self.next.get();
        self.next.set(n + 1);
        format!("{}:{n}", self.writer)
    }

    /// The room channel (the route) and the room's keys.
    /// The channel whose slot holds `room`'s keys: the room's, or for a
    /// user's pseudo-room `#U` the user's (`<prefix>user:U`).
    fn channel(&self, room: &str) -> String {
        match room.strip_prefix(super::USER_ROOM) {
            Some(user) => format!("{}user:{user}", self.prefix),
            None => format!("{}room:{room}", self.prefix),
        }
    }

    fn room_keys(&self, room: &str) -> (Bytes, [Vec<u8>; 4]) {
        let c = self.channel(room);
        let k = |s: &str| format!("{{{c}}}:{s}").into_bytes();
        (Bytes::from(c.clone()), [k("pt"), k("po"), k("pc"), k("pp")])
    }

    fn writer_key(&self, room: &str, writer: &str) -> Vec<u8> {
        format!("{{{}}}:pw:{writer}", self.channel(room)).into_bytes()
    }

    /// The writers' keys' prefix, and their route.
    fn meta(&self) -> (String, Bytes) {
        let base = format!("{{{}presence}}:", self.prefix);
        let route = Bytes::from(base.clone());
        (base, route)
    }

    pub fn leased(&self) -> bool {
        self.leased.get()
    }

    pub fn forget_registered(&self, svc: &Services) {
        self.registered.borrow_mut().clear();
        self.count_registered(svc);
    }

    /// Sends a script; `Err` when the link refused it at once (down):
    /// `resync` writes everything again when it comes back.
    fn run(
        &self,
        svc: &Rc<Services>,
        route: Bytes,
        script: &'static Script,
        args: &[&[u8]],
        done: Done,
    ) -> Result<(), Unavailable> {
        svc.shard.m().presence_commands_total.inc();
        self.route.run(route, script, args, done)
    }

    /// Writes this shard's counts in `room` (registering the room first).
    pub fn set(self: &Rc<Self>, svc: &Rc<Services>, room: &Rc<str>, counts: Vec<Count>) {
        if self.registered.borrow_mut().insert(room.clone()) {
            self.count_registered(svc);
            // Not registered after all (lost with its link, refused): the
            // next write registers it again.
            let (svc2, room2) = (svc.clone(), room.clone());
            let forget: Done = Box::new(move |r| {
                if !matches!(r, Ok(BytesFrame::Integer(_)))
                    && let super::Store::Redis(link) = &svc2.presence.store
                {
                    link.unregistered(&svc2, &room2);
                }
            });
            if self.room_set(svc, b"+", room, forget).is_err() {
                self.unregistered(svc, room);
            }
        }
        let jl = flags_arg(svc.presence.flags(&svc.shard.cfg.namespaces, room));
        let jl = jl.as_bytes();
        let (route, [pt, po, pc, pp]) = self.room_keys(room);
        let pw = self.writer_key(room, &self.writer);
        let token = self.token();
        let ttl = PENDING_TTL.as_millis().to_string();
        let n = counts.len().to_string();
        let nums: Vec<String> = counts.iter().map(|(_, c)| c.to_string()).collect();
        let mut args: Vec<&[u8]> =
            vec![b"5", &pw, &pt, &po, &pc, &pp, token.as_bytes(), jl, ttl.as_bytes(), n.as_bytes()];
        for ((user, _), c) in counts.iter().zip(&nums) {
            args.push(user.as_bytes());
            args.push(c.as_bytes());
        }
        let (svc2, room2, token2) = (svc.clone(), room.clone(), token.clone());
        let empty = counts.iter().all(|(_, c)| *c == 0);
        let users: Vec<Rc<str>> = counts.iter().map(|(u, _)| Rc::from(&**u)).collect();
        let again = users.clone();
        let inflight = self.inflight.clone();
        inflight.set(inflight.get() + 1);
        let sent = self.run(
            svc,
            route,
            &SET,
            &args,
            Box::new(move |r| match (inflight.set(inflight.get() - 1), r).1 {
                Ok(f @ BytesFrame::Array(_)) => {
                    on_changes(&svc2, &room2, &f, &token2);
                    if empty && let super::Store::Redis(link) = &svc2.presence.store {
                        link.unregister_if_idle(&svc2, &room2);
                    }
                }
                // Lost with its link, or refused (a demoted primary's
                // READONLY): written again, fresh, a little later. Counts
                // are absolute, so a write that did land is not doubled.
                r => {
                    if let Ok(f) = &r {
                        on_changes(&svc2, &room2, f, &token2);
                    }
                    Presence::write_again(&svc2, &room2, users);
                }
            }),
        );
        if sent.is_err() {
            // Refused at once: the callback was dropped, not called.
            self.inflight.set(self.inflight.get().saturating_sub(1));
            Presence::write_again(svc, room, again);
        }
    }

    /// A page (or, `limit` 0, the counts) of `room`'s presence.
    pub async fn read(&self, room: &str, read: &Read) -> Result<Page, Unavailable> {
        let (route, [pt, po, pc, _]) = self.room_keys(room);
        let after = read.after.as_deref().unwrap_or("");
        let limit = read.limit.to_string();
        let slot: Oneshot<Result<Page, Unavailable>> = Oneshot::default();
        let fill = slot.clone();
        let done: crate::bus::redis::net::ReplyFn =
            Box::new(move |r| fill.fill(r.ok().and_then(|f| parse_page(&f)).ok_or(Unavailable)));
        let args: [&[u8]; 6] = [b"3", &pt, &po, &pc, after.as_bytes(), limit.as_bytes()];
        self.route.run(route, &READ, &args, done)?;
        monoio::time::timeout(super::READ_WAIT, slot.wait()).await.map_err(|_| Unavailable)?
    }
}

type Done = crate::bus::redis::net::ReplyFn;

/// The transitions a set or reap script returned: joins (and occupied)
/// now, leaves (and vacated) owed after the wait.
fn on_changes(svc: &Rc<Services>, room: &Rc<str>, f: &BytesFrame, token: &str) {
    let BytesFrame::Array(a) = f else {
        if let BytesFrame::Error(e) = f {
            crate::warn_throttled!(svc.shard.id, "presence script refused: {e}");
        }
        return;
    };
    for pair in a.chunks(2) {
        let [BytesFrame::BulkString(kind), BytesFrame::BulkString(user)] = pair else { continue };
        let Ok(user) = std::str::from_utf8(user) else { continue };
        let user: Rc<str> = Rc::from(user);
        match &kind[..] {
            b"j" => Presence::react(svc, room, Some(&user), true),
            b"o" => Presence::react(svc, room, None, true),
            b"z" => Presence::owe(svc, room.clone(), Some(user), Owed::Redis(token.to_string())),
            b"v" => Presence::owe(svc, room.clone(), None, Owed::Redis(token.to_string())),
            _ => {}
        }
    }
}

impl PresenceLink {
    /// Is the leave of `user` (None: the room's vacated) under `token`
    /// still owed? Taken if so. Not knowing (Redis away) says no: the
    /// next writer to find it owed (a reaper) says it.
    pub async fn still_owed(&self, svc: &Rc<Services>, room: &str, user: Option<&str>, token: &str) -> bool {
        let (route, [pt, _, pc, pp]) = self.room_keys(room);
        let slot: Oneshot<bool> = Oneshot::default();
        let fill = slot.clone();
        let args: [&[u8]; 6] = [b"3", &pp, &pt, &pc, user.unwrap_or("").as_bytes(), token.as_bytes()];
        let done: Done = Box::new(move |r| fill.fill(matches!(r, Ok(BytesFrame::Integer(1)))));
        if self.run(svc, route, &LEAVE, &args, done).is_err() {
            return false;
        }
        monoio::time::timeout(super::READ_WAIT, slot.wait()).await.unwrap_or(false)
    }

    /// Takes `room` out of our room set once this shard has no presence
    /// member there and owes nothing in it.
    pub fn unregister_if_idle(&self, svc: &Rc<Services>, room: &Rc<str>) {
        let busy = match room.strip_prefix(super::USER_ROOM) {
            Some(user) => svc.shard.user_conns(user) > 0,
            None => svc.shard.has_members(crate::protocol::Target::Room(room)),
        };
        if busy || svc.presence.timers.borrow().contains_key(room) {
            return;
        }
        if self.unregistered(svc, room) {
            let _ = self.room_set(svc, b"-", room, Box::new(|_| {}));
        }
    }

    /// Adds (`+`) or removes (`-`) `room` in our room set in Redis.
    fn room_set(&self, svc: &Rc<Services>, sign: &[u8], room: &str, done: Done) -> Result<(), Unavailable> {
        let (base, route) = self.meta();
        let set = format!("{base}rooms:{}", self.writer);
        self.run(svc, route, &ROOMS, &[b"1", set.as_bytes(), sign, room.as_bytes()], done)
    }

    /// Takes `room` out of `registered`; true if it was there.
    fn unregistered(&self, svc: &Services, room: &str) -> bool {
        let was = self.registered.borrow_mut().remove(room);
        self.count_registered(svc);
        was
    }

    /// `corecast_presence_rooms`: the rooms in `registered`.
    fn count_registered(&self, svc: &Services) {
        super::set_gauge(&svc.shard.m().presence_rooms, self.registered.borrow().len());
    }
}

/// ARGV[2] of set.lua and reap.lua.
fn flags_arg(f: super::table::Flags) -> &'static str {
    match (f.users, f.rooms) {
        (true, true) => "jr",
        (true, false) => "j",
        (false, true) => "r",
        (false, false) => "-",
    }
}

/// `{clients, users, more, user, count, ...}` from read.lua.
fn parse_page(f: &BytesFrame) -> Option<Page> {
    let BytesFrame::Array(a) = f else { return None };
    let int = |f: &BytesFrame| match f {
        BytesFrame::Integer(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    let mut page = Page { clients: int(a.first()?)?, users: int(a.get(1)?)?, ..Page::default() };
    let more = int(a.get(2)?)? == 1;
    for pair in a[3..].chunks(2) {
        let [BytesFrame::BulkString(u), n] = pair else { return None };
        page.members.push((Box::from(std::str::from_utf8(u).ok()?), int(n)?));
    }
    if more {
        page.next = page.members.last().map(|(u, _)| u.clone());
    }
    Some(page)
}

/// The writer's lease, every `LEASE_PERIOD`: renews it, compares the
/// nodes' namespaces, and reaps the lapsed writers it claimed.
pub fn run_lease(svc: Rc<Services>, link: Rc<PresenceLink>) {
    monoio::spawn(async move {
        let mut first = true;
        loop {
            let (base, route) = link.meta();
            let (leases, ns) = (format!("{base}leases"), format!("{base}ns"));
            let ttl = LEASE_TTL.as_millis().to_string();
            let args: [&[u8]; 7] = [
                b"2",
                leases.as_bytes(),
                ns.as_bytes(),
                link.writer.as_bytes(),
                ttl.as_bytes(),
                link.digest.as_bytes(),
                base.as_bytes(),
            ];
            let slot: Oneshot<Option<BytesFrame>> = Oneshot::default();
            let fill = slot.clone();
            let sent = link.run(&svc, route, &LEASE, &args, Box::new(move |r| fill.fill(r.ok())));
            if sent.is_err() {
                // The link is not up (yet): soon again; writes wait for the lease.
                monoio::time::sleep(Duration::from_millis(if first { 50 } else { 1000 })).await;
                continue;
            }
            match monoio::time::timeout(LEASE_PERIOD, slot.wait()).await {
                Ok(Some(BytesFrame::Array(a))) => {
                    link.leased.set(true);
                    on_lease(&svc, &link, &a, first);
                    first = false;
                    monoio::time::sleep(LEASE_PERIOD).await;
                }
                // Not leased yet (the link is still coming up): soon again,
                // writes wait for it.
                _ if first => monoio::time::sleep(Duration::from_millis(100)).await,
                _ => monoio::time::sleep(LEASE_PERIOD).await,
            }
        }
    });
}

fn on_lease(svc: &Rc<Services>, link: &Rc<PresenceLink>, a: &[BytesFrame], first: bool) {
    let int = |f: Option<&BytesFrame>| match f {
        Some(BytesFrame::Integer(n)) => *n,
        _ => 0,
    };
    super::count_members(svc);
    // Our lease was absent: first start, or we were reaped while away.
    if int(a.first()) == 1 && !first {
        svc.shard.m().presence_resyncs_total.inc();
        Presence::resync(svc);
    }
    let digests = int(a.get(1)).max(0) as u64;
    let m = svc.shard.m();
    if digests != m.namespace_digests.get() {
        if digests > 1 {
            tracing::warn!(
                shard = link.shard,
                digests,
                "nodes on this Redis have different [[namespace]] tables (PROTOCOL.md §10): give every node the same"
            );
        }
        m.namespace_digests.sub(m.namespace_digests.get());
        m.namespace_digests.add(digests);
    }
    // The claimed writers: name, its rooms..., ''.
    let mut it = a[2..].iter();
    while let Some(BytesFrame::BulkString(dead)) = it.next() {
        let Ok(dead) = std::str::from_utf8(dead).map(str::to_owned) else { break };
        let mut rooms = Vec::new();
        for f in it.by_ref() {
            match f {
                BytesFrame::BulkString(r) if r.is_empty() => break,
                BytesFrame::BulkString(r) => rooms.extend(std::str::from_utf8(r).ok().map(Rc::<str>::from)),
                _ => break,
            }
        }
        reap(svc, link, &dead, rooms);
    }
}

/// Takes a lapsed writer's counts out of each of its rooms, then forgets it.
fn reap(svc: &Rc<Services>, link: &Rc<PresenceLink>, dead: &str, rooms: Vec<Rc<str>>) {
    tracing::info!(
        shard = link.shard,
        writer = dead,
        rooms = rooms.len(),
        "presence: reaping a writer whose lease lapsed"
    );
    svc.shard.m().presence_reaped_total.inc();
    // The leaves it owed carry its tokens, `<writer>:<n>`.
    let node_prefix = format!("{dead}:");
    let ttl = PENDING_TTL.as_millis().to_string();
    let left = Rc::new(Cell::new(rooms.len()));
    let (base, meta_route) = link.meta();
    let finish = {
        let (svc, link, dead, base) = (svc.clone(), link.clone(), dead.to_string(), base.clone());
        Rc::new(move || {
            let (leases, ns, set) = (format!("{base}leases"), format!("{base}ns"), format!("{base}rooms:{dead}"));
            let args: [&[u8]; 5] = [b"3", leases.as_bytes(), ns.as_bytes(), set.as_bytes(), dead.as_bytes()];
            let _ = link.run(&svc, meta_route.clone(), &REAPED, &args, Box::new(|_| {}));
        })
    };
    if rooms.is_empty() {
        return finish();
    }
    for room in rooms {
        let jl = flags_arg(svc.presence.flags(&svc.shard.cfg.namespaces, &room));
        let jl = jl.as_bytes();
        let (route, [pt, po, pc, pp]) = link.room_keys(&room);
        let pw = link.writer_key(&room, dead);
        let token = link.token();
        let args: [&[u8]; 10] =
            [b"5", &pw, &pt, &po, &pc, &pp, token.as_bytes(), jl, ttl.as_bytes(), node_prefix.as_bytes()];
        let (svc2, left, finish, token2) = (svc.clone(), left.clone(), finish.clone(), token.clone());
        let _ = link.run(
            svc,
            route,
            &REAP,
            &args,
            Box::new(move |r| {
                if let Ok(f) = r {
                    on_changes(&svc2, &room, &f, &token2);
                }
                left.set(left.get() - 1);
                if left.get() == 0 {
                    finish();
                }
            }),
        );
    }
}
