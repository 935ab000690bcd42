//! ⑦ The Redis backplane (PROTOCOL.md §3, §8): how a message published on
//! one node reaches every node's subscribers.
//!
//! Where a channel lives is the topology's business (`topology.rs`: one
//! Redis, several by jump hash, the primary Sentinel names, or the Redis
//! Cluster primary owning the channel's slot — `sentinel.rs`, `cluster.rs`).
//! Each shard has two Redis connections of its own *per primary*:
//!
//! - **subscriber** — owned by the shard's `redis-NN` thread (`reader.rs`,
//!   one `subconn.rs` per primary), a plain OS thread pinned beside its
//!   shard. It SUBSCRIBEs (SSUBSCRIBEs in a cluster) to the channels its
//!   shard has members for (`subs.rs` reconciles), decodes each pushed
//!   message, checks it, builds the client frame once, and hands it to its
//!   shard's inbox as `ShardMsg::Room` / `ShardMsg::Direct`.
//! - **publisher** — async, on the shard's own monoio runtime
//!   (`publisher.rs` routes, one `publink.rs` per primary): commands are
//!   appended to the owning primary's buffer and written together once per
//!   turn of the event loop, so a busy shard pipelines hundreds of publishes
//!   per `send(2)` with no thread hop.
//!
//! - **history** — with `--history-size`, the Lua scripts that publish into
//!   and read a room's history (PROTOCOL.md §7; they live in `history::redis`,
//!   above the bus); publishes into history rooms go there instead of a
//!   plain PUBLISH, over the publisher's link to the room channel's owner
//!   (`history::redis_route`).
//!
//! With Redis, *every* delivery goes through Redis, even to the publisher's
//! own shard: then every subscriber on every node sees one room's messages in
//! the order Redis ran the PUBLISHes, and nothing arrives twice (a room's
//! channel is at one primary at a time, in every topology).
//!
//! This file holds the shard's side (`RedisBus`: publish, interest, the
//! `subscribed` replies held until Redis confirms), the node-wide link
//! `Health` behind `/readyz`, the timings, and `start`, which finds the
//! topology and spawns the readers. In: `Bus` calls from the shard; `ShardMsg::Subscribed` and
//! `ShardMsg::RedisLink` from the reader. Out: `Interest` changes to the
//! reader (one batch per turn of the event loop), PUBLISH to Redis.
//!
//! # Why the publisher is not a thread
//!
//! A `redis-pub-NN` thread would put a channel send and a cross-thread
//! wake-up on every publish and two more threads per shard on the cores the
//! shards need. Publishing is a write of bytes the shard already has; the
//! shard's runtime does it with the same readiness + non-blocking `send`
//! the client connections use, and the bounded queue in front of it means it
//! never waits on Redis. Reading is different: a message from Redis fans out
//! to many clients, so its decode and check run beside the shard, not on it.

pub mod cluster;
pub mod health;
pub mod link;
pub(crate) mod net;
mod overlap;
pub mod payload;
pub mod publink;
pub mod publisher;
pub mod reader;
pub(crate) mod resp;
pub mod sentinel;
mod subconn;
pub mod subs;
pub mod topology;
pub mod url;

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::thread;

use anyhow::Context;
use bytes::Bytes;
use rustc_hash::FxHashMap;

use super::{Target, Unavailable};
use crate::config::Config;
use crate::conn::Conn;
use crate::metrics::Metrics;
use crate::protocol::event;
use crate::shard::{InboxSender, Shard};
pub use health::{Health, Readiness};
pub use link::{Link, LinkError};
use publisher::Publisher;
use reader::SubHandle;
use subs::{Interest, Kind};
use topology::Topology;
pub use url::{RedisUrl, Spec};

/// What a shard thread takes with it to run its side of the backplane.
pub struct ShardLink {
    shard: usize,
    subs: SubHandle,
    topo: Arc<Topology>,
    prefix: Arc<str>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl ShardLink {
    /// The node's link health (the shard's liveness timer observes it).
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }
}

/// Parses `--redis`, then spawns and pins one `redis-NN` reader thread per
/// shard. A reader that panics reports on `exits`, so `server::run` fails
/// naming it. Returns each shard's `ShardLink`, in shard order.
pub fn start(
    cfg: &Config,
    url: &str,
    peers: &[InboxSender],
    metrics: &Arc<Metrics>,
    exits: &crossbeam_channel::Sender<(String, anyhow::Result<()>)>,
) -> anyhow::Result<Vec<ShardLink>> {
    let spec = Spec::parse(url).map_err(|e| anyhow::anyhow!("--redis: cannot parse the URL: {e}"))?;
    let prefix: Arc<str> = Arc::from(cfg.channel_prefix.as_str());
    let health = Arc::new(Health::new(metrics.clone(), peers.len()));
    let shown = spec.to_string();
    // Sentinel and Cluster: asks now, and fails start-up if nobody answers.
    let topo = Topology::start(spec, metrics.clone())?;
    tracing::info!(redis = %shown, prefix = %prefix, "redis backplane");
    let _ = health.topo.set(topo.clone());
    let mut links = Vec::with_capacity(peers.len());
    for (i, inbox) in peers.iter().enumerate() {
        let (subs, input) = reader::channel().context("redis: make the reader's wake-up pipe")?;
        topo.add_waker(subs.waker().context("redis: share the reader's wake-up pipe")?);
        let r = reader::Reader::new(reader::ReaderParts {
            shard: i,
            core: cfg.cores[i],
            topo: topo.clone(),
            prefix: prefix.clone(),
            inbox: inbox.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            input,
            max_payload: cfg.outbound_queue_bytes,
            history: cfg.namespaces.any_history(),
        });
        let name = format!("redis-{i:02}");
        let (exit_tx, thread_name) = (exits.clone(), name.clone());
        thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.run()));
                if r.is_err() {
                    let _ = exit_tx.send((thread_name.clone(), Err(anyhow::anyhow!("{thread_name} panicked"))));
                }
            })
            .with_context(|| format!("spawn {name}"))?;
        links.push(ShardLink {
            shard: i,
            subs,
            topo: topo.clone(),
            prefix: prefix.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
        });
    }
    Ok(links)
}

/// A room this shard has members in, as far as the `subscribed` replies go.
struct RoomSub {
    /// The `seq` of the latest join that made the room non-empty here.
    seq: u64,
    /// Redis confirmed the subscription for that join.
    confirmed: bool,
    /// The reader stopped waiting for that confirmation on this link
    /// (primary unreachable, connection lost): replies are not held, a
    /// non-strict wait ends, but a strict one (a catch-up) still waits.
    released: bool,
    /// `subscribed` replies held until then.
    waiting: Vec<(Weak<Conn>, Bytes)>,
    /// Tasks waiting for it (`RedisBus::confirmed`: a history read).
    wakers: Vec<Waker>,
    /// Another shard of this node holds the room's subscription and relays
    /// its messages here (`services::relay`): `confirmed`/`released` come
    /// from it, and this shard's own subscriber link does not bear on them.
    relayed: bool,
    /// For a relayed room: the relay's subscriber link, as the relay last
    /// told this shard (`on_relay_link`); it stands for `RedisBus::link_up`.
    relay_up: bool,
}

/// A subscription this shard holds for the node (`RedisBus::hold`).
struct Held {
    seq: u64,
    confirmed: bool,
}

impl RoomSub {
    /// The link that bears on this room: the relay's for a relayed room,
    /// else this shard's own (`up`).
    fn up(&self, up: bool) -> bool {
        if self.relayed { self.relay_up } else { up }
    }

    fn wake(&mut self) {
        self.wakers.drain(..).for_each(Waker::wake);
    }
}

/// Interest changes made during one turn of the shard's event loop, handed
/// to the reader together (one channel send, one wake-up) by a task that
/// runs once the turn's other tasks have had their go: a burst of joins
/// reaches Redis as one SUBSCRIBE however the threads are scheduled.
struct InterestQueue {
    batch: RefCell<Vec<Interest>>,
    /// Wakes the hand-off task when `batch` becomes non-empty.
    waker: Cell<Option<Waker>>,
    subs: SubHandle,
}

impl InterestQueue {
    fn push(&self, i: Interest) {
        let mut batch = self.batch.borrow_mut();
        if batch.is_empty()
            && let Some(w) = self.waker.take()
        {
            w.wake();
        }
        batch.push(i);
    }

    async fn run(self: Rc<Self>) {
        loop {
            crate::rt::until(&self.waker, || !self.batch.borrow().is_empty()).await;
            let batch = std::mem::take(&mut *self.batch.borrow_mut());
            self.subs.send(batch);
        }
    }
}

/// The shard's side of the Redis bus; lives on the shard's thread.
pub struct RedisBus {
    prefix: Arc<str>,
    interest: Rc<InterestQueue>,
    publisher: Rc<Publisher>,
    health: Arc<Health>,
    /// The subscriber link as last reported by the reader
    /// (`ShardMsg::RedisLink`), in order with its `Subscribed` messages.
    link_up: Cell<bool>,
    next_seq: Cell<u64>,
    rooms: RefCell<FxHashMap<Arc<str>, RoomSub>>,
    /// Rooms whose subscription this shard holds for the whole node
    /// (`services::relay`): the number of the SUBSCRIBE and whether Redis
    /// confirmed it. Its own members' state is in `rooms`, relayed like
    /// any other shard's.
    held: RefCell<FxHashMap<Arc<str>, Held>>,
    shard: usize,
    topo: Arc<Topology>,
    metrics: Arc<Metrics>,
}

impl RedisBus {
    /// Takes the shard's link and starts its publisher on the current
    /// (the shard's) runtime.
    pub fn start(link: ShardLink) -> RedisBus {
        let publisher = Publisher::start(link.shard, link.topo.clone(), link.health.clone(), link.metrics.clone());
        monoio::spawn(publisher.clone().follow());
        let interest = Rc::new(InterestQueue { batch: RefCell::default(), waker: Cell::new(None), subs: link.subs });
        monoio::spawn(interest.clone().run());
        RedisBus {
            prefix: link.prefix,
            interest,
            publisher,
            health: link.health,
            link_up: Cell::new(false),
            next_seq: Cell::new(1),
            rooms: RefCell::default(),
            held: RefCell::default(),
            shard: link.shard,
            topo: link.topo,
            metrics: link.metrics,
        }
    }

    // ---- what the Redis history store is built from (`history::redis`) ----

    /// This shard's publisher (its links to every primary).
    pub fn publisher(&self) -> &Rc<Publisher> {
        &self.publisher
    }

    /// The node's view of the Redis topology.
    pub fn topo(&self) -> &Arc<Topology> {
        &self.topo
    }

    /// The channel prefix (`--channel-prefix`).
    pub fn prefix(&self) -> &Arc<str> {
        &self.prefix
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The subscriber link as last reported by the reader.
    pub fn link_is_up(&self) -> bool {
        self.link_up.get()
    }

    /// Queues `PUBLISH` of the frame's JSON; never waits.
    pub fn publish(&self, target: Target<'_>, frame: Bytes) -> Result<(), Unavailable> {
        self.publisher.publish(&self.prefix, target, &event::json_of(&frame), None)
    }

    /// Like `publish`, and `done` is filled with whether Redis took it: its
    /// reply to the PUBLISH was not an error (`false` also for a PUBLISH
    /// lost with its connection, or left unanswered past `DEAD_AFTER`).
    pub fn publish_confirmed(
        &self,
        target: Target<'_>,
        frame: Bytes,
        done: crate::rt::Oneshot<bool>,
    ) -> Result<(), Unavailable> {
        let on_reply: net::ReplyFn = Box::new(move |r| {
            done.fill(matches!(r, Ok(f) if !matches!(f, redis_protocol::resp2::types::BytesFrame::Error(_))))
        });
        self.publisher.publish(&self.prefix, target, &event::json_of(&frame), Some(on_reply))
    }

    /// Queues `PUBLISH` of `json` as it is (a control message, not a
    /// client event); `done` gets how many subscribers Redis handed it to
    /// (PUBLISH's reply; SPUBLISH's counts the owner's own subscribers,
    /// which are all of a sharded channel's), or `None` if it was lost.
    pub fn publish_counted(
        &self,
        target: Target<'_>,
        json: &[u8],
        done: crate::rt::Oneshot<Option<u64>>,
    ) -> Result<(), Unavailable> {
        let on_reply: net::ReplyFn = Box::new(move |r| {
            done.fill(match r {
                Ok(redis_protocol::resp2::types::BytesFrame::Integer(n)) => u64::try_from(n).ok(),
                _ => None,
            })
        });
        self.publisher.publish(&self.prefix, target, json, Some(on_reply))
    }

    /// `<prefix>room:R` or `<prefix>user:U`: the Redis channel of `target`.
    pub fn channel(&self, target: Target<'_>) -> Vec<u8> {
        let mut c = Vec::new();
        resp::channel_of(&mut c, &self.prefix, target);
        c
    }

    /// Queues one command (written by `put`) at the primary that owns
    /// `channel` (its slot, in a cluster), e.g. a script whose keys are
    /// tagged `{<channel>}`; `on_reply` gets its reply. See
    /// `Publisher::send_to_owner`.
    pub fn send_to_owner(
        &self,
        channel: &[u8],
        put: impl FnOnce(&mut bytes::BytesMut),
        on_reply: Option<net::ReplyFn>,
    ) -> Result<(), Unavailable> {
        self.publisher.send_to_owner(channel, put, on_reply)
    }

    /// Tells the reader to (un)subscribe; for a room turning on, starts
    /// holding `subscribed` replies until Redis confirms.
    pub fn interest(&self, target: Target<'_>, on: bool) {
        let (kind, name) = match target {
            Target::Room(r) => (Kind::Room, r),
            Target::User(u) => (Kind::User, u),
        };
        let name: Arc<str> = Arc::from(name);
        let seq = match kind {
            Kind::Room => self.track(&name, on, false),
            Kind::User => 0,
        };
        self.interest.push(Interest { kind, name, on, seq });
    }

    /// The room's state here (held replies, confirmation) for a join that
    /// made it non-empty (`on`) or a leave that emptied it; `relayed`: its
    /// subscription is another shard's (`services::relay`), this shard's
    /// reader is not told. Returns the join's number (0 for a leave).
    pub fn track(&self, room: &Arc<str>, on: bool, relayed: bool) -> u64 {
        let mut rooms = self.rooms.borrow_mut();
        if on {
            let seq = self.next_seq.replace(self.next_seq.get() + 1);
            // A relayed room starts as if the relay's link were up: the relay
            // answers the join with a confirmation, or tells it is down.
            let sub = RoomSub {
                seq,
                confirmed: false,
                released: false,
                waiting: Vec::new(),
                wakers: Vec::new(),
                relayed,
                relay_up: true,
            };
            if let Some(mut old) = rooms.insert(room.clone(), sub) {
                old.wake();
            }
            seq
        } else {
            if let Some(mut r) = rooms.remove(&**room) {
                // Members that left were answered (`before_leave`); closed
                // ones need nothing; a task waiting for the room ends.
                r.wake();
            }
            0
        }
    }

    /// Takes (`on`) or lets go of `room`'s subscription for the node
    /// (`services::relay`): the reader (un)subscribes, and confirms the
    /// SUBSCRIBE to `on_subscribed`, which then returns true.
    pub fn hold(&self, room: &Arc<str>, on: bool) {
        let seq = if on {
            let seq = self.next_seq.replace(self.next_seq.get() + 1);
            self.held.borrow_mut().insert(room.clone(), Held { seq, confirmed: false });
            seq
        } else {
            self.held.borrow_mut().remove(&**room);
            0
        };
        self.interest.push(Interest { kind: Kind::Room, name: room.clone(), on, seq });
    }

    /// Is the subscription this shard holds for `room` confirmed by Redis
    /// (and its link up)? The holder answers a new relay with it.
    pub fn is_confirmed(&self, room: &str) -> bool {
        self.link_up.get() && self.held.borrow().get(room).is_some_and(|h| h.confirmed)
    }

    /// Sends `reply` (a `subscribed` event) to `conn` now if this node is
    /// subscribed to `room` at Redis (or Redis is down: the membership is
    /// restored with the link), else once Redis confirms.
    pub fn reply_subscribed(&self, shard: &Shard, conn: &Rc<Conn>, room: &str, reply: Bytes) {
        if let Some(r) = self.rooms.borrow_mut().get_mut(room)
            && r.up(self.link_up.get())
            && !r.confirmed
            && !r.released
        {
            r.waiting.push((Rc::downgrade(conn), reply));
            return;
        }
        conn.push(shard, reply);
    }

    /// `conn` leaves `room`: its held `subscribed` goes first, so the client
    /// sees `subscribed` before `unsubscribed`.
    pub fn before_leave(&self, shard: &Shard, conn: &Rc<Conn>, room: &str) {
        let held: Vec<Bytes> = match self.rooms.borrow_mut().get_mut(room) {
            Some(r) if !r.waiting.is_empty() => {
                let mut held = Vec::new();
                r.waiting.retain(|(w, reply)| {
                    let mine = w.as_ptr() == Rc::as_ptr(conn);
                    if mine {
                        held.push(reply.clone());
                    }
                    !mine
                });
                held
            }
            _ => return,
        };
        for reply in held {
            conn.push(shard, reply);
        }
    }

    /// The reader confirmed `room` for the join numbered `seq` (or, not
    /// `confirmed`, released what waits for it), or the room's holder
    /// passed its confirmation on for that join. True when it was the
    /// reader's for the subscription this shard holds for the node
    /// (`hold`): the relay passes it on.
    pub fn on_subscribed(&self, shard: &Shard, room: &str, seq: u64, confirmed: bool) -> bool {
        if let Some(h) = self.held.borrow_mut().get_mut(room)
            && h.seq == seq
        {
            h.confirmed = confirmed;
            return true;
        }
        let waiting = match self.rooms.borrow_mut().get_mut(room) {
            Some(r) if r.seq == seq => {
                if confirmed {
                    r.confirmed = true;
                    // The relay confirms only with its link up (its news
                    // of a later drop comes after, in order).
                    r.relay_up = true;
                } else {
                    r.released = true;
                }
                r.wake();
                std::mem::take(&mut r.waiting)
            }
            // A confirmation for an earlier join of the room: a newer one is on its way.
            _ => return false,
        };
        send_held(shard, waiting);
        false
    }

    /// The subscriber link went up or down. Down: nothing is confirmed any
    /// more, and every held reply goes out (the reader re-subscribes and
    /// confirms again once Redis is back).
    pub fn on_link(&self, shard: &Shard, up: bool) {
        self.link_up.set(up);
        if !up {
            self.held.borrow_mut().values_mut().for_each(|h| h.confirmed = false);
        }
        let mut held = Vec::new();
        // A relayed room follows its relaying shard's link, not ours.
        for r in self.rooms.borrow_mut().values_mut().filter(|r| !r.relayed) {
            r.wake();
            // A release was for the link before this change.
            r.released = false;
            if !up {
                r.confirmed = false;
                held.append(&mut r.waiting);
            }
        }
        send_held(shard, held);
    }

    /// A relayed room's holder tells this shard of its subscriber link
    /// (`services::relay`): for the room, what `on_link` does for this
    /// shard's own link.
    pub fn on_relay_link(&self, shard: &Shard, room: &str, up: bool) {
        let held = match self.rooms.borrow_mut().get_mut(room) {
            Some(r) if r.relayed => {
                r.relay_up = up;
                r.wake();
                r.released = false;
                if up {
                    return;
                }
                r.confirmed = false;
                std::mem::take(&mut r.waiting)
            }
            _ => return,
        };
        send_held(shard, held);
    }

    /// Is `room` relayed here for the join numbered `seq` (its latest)?
    /// News from the holder for an earlier join is stale.
    pub fn is_relayed_join(&self, room: &str, seq: u64) -> bool {
        self.rooms.borrow().get(room).is_some_and(|r| r.relayed && r.seq == seq)
    }

    /// Does another shard of this node hold `room`'s subscription here?
    pub fn is_relayed(&self, room: &str) -> bool {
        self.rooms.borrow().get(room).is_some_and(|r| r.relayed)
    }

    /// Is the subscriber link that bears on `room` up: the relay's for a
    /// relayed room, else this shard's own?
    pub fn room_link_up(&self, room: &str) -> bool {
        let up = self.link_up.get();
        self.rooms.borrow().get(room).map_or(up, |r| r.up(up))
    }

    /// Resolves once this node is subscribed to `room` at Redis (confirmed
    /// for its latest join), or the room has no member here any more.
    /// `strict`: the subscriber link must be up; else a down link resolves
    /// it too. The one wait for a SUBSCRIBE confirmation: held `subscribed`
    /// replies and history reads both follow `RoomSub::confirmed`.
    /// Would `confirmed(room, false)` be ready now? (Presence writes a
    /// room's join only then, so that the joiner's node hears it.)
    pub fn settled(&self, room: &str) -> bool {
        let up = self.link_up.get();
        self.rooms.borrow().get(room).is_none_or(|r| r.confirmed || !r.up(up) || r.released)
    }

    pub async fn confirmed(&self, room: &str, strict: bool) {
        std::future::poll_fn(|cx| {
            let up = self.link_up.get();
            let mut rooms = self.rooms.borrow_mut();
            let Some(r) = rooms.get_mut(room) else { return Poll::Ready(()) };
            let up = r.up(up);
            // A release is not a confirmation: a catch-up (strict) reads only
            // once Redis confirmed the room again, or it would miss what is
            // published between its read and the SUBSCRIBE.
            if (up && r.confirmed) || (!strict && (!up || r.released)) {
                return Poll::Ready(());
            }
            r.wakers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Can this node serve (`health::Readiness`)?
    pub fn readiness(&self, grace: std::time::Duration) -> health::Readiness {
        self.health.readiness(grace)
    }
}

/// Sends held replies to the connections that are still open.
fn send_held(shard: &Shard, held: Vec<(Weak<Conn>, Bytes)>) {
    for (w, reply) in held {
        if let Some(conn) = w.upgrade()
            && shard.has_conn(&conn)
        {
            conn.push(shard, reply);
        }
    }
}
