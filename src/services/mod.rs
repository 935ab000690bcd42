//! The services over the fan-out core: per shard, the one owner of what a
//! client or a backend asks for. `Services` holds the shard (tables,
//! fan-out, inbox), the bus and the history, and is the only place that
//! turns a membership change into bus and history calls, decides "history
//! room or plain" and "local or Redis" for a publish or a subscribe, and
//! dispatches what arrives in the shard's inbox.
//!
//! - `mod.rs` — `Services`: publish, subscribe (join, recovery), leave,
//!   connections coming and going, the inbox dispatch, readiness.
//! - `ops.rs` — the client ops on `/ws` (PROTOCOL.md §2).
//! - `expiry.rs` — token expiry and the `refresh` op.
//! - `presence/` — who is in a room, join/leave (§11).
//! - `census.rs` — what every node has: `/api/rooms`, `/api/info` (§12).
//! - `idempotency/` — `POST /api/publish`'s idempotency keys (§12).
//! - `relay.rs` — one Redis subscription per room per node.
//!
//! In: client ops (`session` → `ops`), HTTP calls (`http`), inbox messages.
//! Out: `Shard` membership and fan-out, `Bus` publishes and interest,
//! `ShardHistory` recoveries.

pub mod census;
pub mod expiry;
pub mod idempotency;
pub mod ops;
pub mod presence;
pub mod relay;

use std::rc::Rc;

use bytes::Bytes;

use crate::bus::Bus;
use crate::config::HistorySettings;
use crate::conn::Conn;
use crate::history::{self, ShardHistory, Store};
use crate::protocol::{Epoch, ErrorCode, Since, Target, Unavailable, event};
use crate::shard::{Shard, ShardMsg};

/// Inbox messages handled before the inbox task yields to the others.
const INBOX_BATCH: usize = 256;

/// One per shard; lives on the shard's thread, shared by its tasks as `Rc`.
pub struct Services {
    shard: Rc<Shard>,
    bus: Rc<Bus>,
    /// Room history (PROTOCOL.md §7) when `--history-size` > 0, with its
    /// store chosen here, once: the owner shards' rings on the local bus, the
    /// Redis history link with Redis.
    history: Option<Rc<ShardHistory>>,
    /// Presence (§11) of the rooms whose namespace keeps it.
    presence: presence::Presence,
    /// The censuses in flight (`/api/rooms`, `/api/info`).
    census: census::Census,
    /// `POST /api/publish`'s idempotency keys (§12).
    idempotency: idempotency::Idempotency,
    /// The rooms this shard holds the node's subscription of.
    relay: relay::Relay,
}

impl Services {
    /// `hooks`: where presence's webhook transitions go (`--webhook-url`),
    /// and their debounce.
    pub fn new(shard: Rc<Shard>, bus: Bus, hooks: Option<(presence::Hooks, std::time::Duration)>) -> Rc<Services> {
        let bus = Rc::new(bus);
        // History state exists only where a namespace (or the default)
        // keeps history (PROTOCOL.md §10).
        let history = shard.cfg.namespaces.any_history().then(|| {
            let store = match &*bus {
                Bus::Local => Store::Local,
                Bus::Redis(r) => Store::Redis(history::redis::start(r)),
            };
            let share = shard.cfg.history_max_bytes / shard.cfg.shards();
            Rc::new(ShardHistory::new(Epoch::node(), store, bus.clone(), share))
        });
        let presence = presence::Presence::new(&shard, &bus, hooks);
        let census = census::Census::new(shard.id);
        let idempotency = idempotency::Idempotency::new(&bus);
        let svc = Rc::new(Services { shard, bus, history, presence, census, idempotency, relay: Default::default() });
        presence::Presence::start(&svc);
        census::Census::start(&svc);
        svc
    }

    pub fn shard(&self) -> &Rc<Shard> {
        &self.shard
    }

    /// Room history, when on.
    pub fn history(&self) -> Option<&Rc<ShardHistory>> {
        self.history.as_ref()
    }

    /// `room`'s history and its settings, if its namespace keeps history.
    pub fn history_of(&self, room: &str) -> Option<(&Rc<ShardHistory>, HistorySettings)> {
        Some((self.history.as_ref()?, self.shard.cfg.namespaces.history(room)?))
    }

    pub fn idempotency(&self) -> &idempotency::Idempotency {
        &self.idempotency
    }

    /// Can this node serve, as far as the backplane goes (`/readyz`,
    /// `corecast_redis_degraded`; draining is the shard's)?
    pub fn readiness(&self) -> crate::bus::redis::Readiness {
        self.bus.readiness(self.shard.cfg.ready_grace)
    }

    /// The shard drained (its connections are gone) and the node is about
    /// to exit: what the services still owe the backplane goes out first.
    pub async fn settle(self: &Rc<Self>) {
        presence::Presence::settle(self).await;
    }

    // ---- connections ------------------------------------------------------------

    /// The connection finished its WebSocket handshake as `user`.
    pub fn upgraded(self: &Rc<Self>, conn: &Rc<Conn>, user: Rc<str>) {
        if self.shard.upgraded(conn, user.clone()) {
            self.bus.interest(&self.shard, Target::User(&user), true);
        }
        presence::Presence::touch_user(self, &user);
    }

    /// The connection is gone: it leaves its rooms and its user entry, and
    /// the rooms and user it was the last member of leave the bus (and the
    /// history's per-room state).
    pub fn remove_conn(self: &Rc<Self>, conn: &Rc<Conn>) {
        // Its presence rooms, before the shard forgets them.
        let ns = &self.shard.cfg.namespaces;
        let presence: Vec<Rc<str>> =
            conn.with_rooms(|rooms| rooms.iter().filter(|r| ns.of(r).presence).cloned().collect());
        let left = self.shard.remove_conn(conn);
        if let Some(user) = conn.user() {
            for room in &presence {
                presence::Presence::touch(self, room, &user);
            }
            presence::Presence::touch_user(self, &user);
        }
        for room in &left.rooms {
            self.room_left(room);
        }
        if let Some(user) = left.user {
            self.bus.interest(&self.shard, Target::User(&user), false);
        }
    }

    // ---- membership ---------------------------------------------------------------

    /// `conn` joins `room`; the room's first member on this shard reaches the
    /// bus (interest bit, SUBSCRIBE) before any reply to the member is queued.
    fn join(self: &Rc<Self>, conn: &Rc<Conn>, room: &str) {
        if self.shard.subscribe(conn, room) {
            relay::Relay::interest(self, room, true);
        }
        if let Some(user) = conn.user() {
            presence::Presence::touch(self, room, &user);
        }
    }

    /// `conn` leaves `room`, however it came to (an `unsubscribe`, a
    /// `refresh` whose token no longer grants the room, a recovery whose read
    /// failed): a recovery still pending for it is dropped, a `subscribed`
    /// still held for it goes out first, and the room's last member here
    /// takes the room off the bus and out of the history's state.
    pub fn leave(self: &Rc<Self>, conn: &Rc<Conn>, room: &str) {
        if let Some(h) = &self.history {
            h.forget(conn, room);
        }
        self.bus.before_leave(&self.shard, conn, room);
        if self.shard.unsubscribe(conn, room) {
            self.room_left(room);
        }
        if let Some(user) = conn.user() {
            presence::Presence::touch(self, room, &user);
        }
    }

    /// This shard's last member of `room` left.
    fn room_left(self: &Rc<Self>, room: &str) {
        relay::Relay::interest(self, room, false);
        if let Some(h) = &self.history {
            h.room_gone(room);
        }
    }

    /// A client's `subscribe` (auth and limits already checked). In a history
    /// room: the position, and with `since` the recovery, with the reply
    /// after the read (§7). Otherwise the reply at once, or with Redis once
    /// this node is subscribed there.
    pub fn subscribe(self: &Rc<Self>, conn: &Rc<Conn>, room: &str, since: Option<Since>, id: Option<&str>) {
        let Some((h, settings)) = self.history_of(room) else {
            self.join(conn, room);
            // §7: `since` with history off is answered, never replayed.
            let reply = match since {
                Some(_) => event::subscribed_unrecovered(room, id),
                None => event::membership("subscribed", room, id),
            };
            self.bus.reply_subscribed(&self.shard, conn, room, reply);
            return;
        };
        if !h.take_budget(&self.shard, conn, since.is_some(), id) {
            return;
        }
        self.join(conn, room);
        let token = h.begin_subscribe(&self.shard, conn, room);
        let (svc, conn, room, id) = (self.clone(), conn.clone(), Rc::<str>::from(room), id.map(Box::<str>::from));
        monoio::spawn(async move {
            let Some(h) = &svc.history else { return };
            let r = h.recover(&svc.shard, &room, settings, since).await;
            if since.is_some() {
                conn.hist.done();
            }
            if h.finish_subscribe(&svc.shard, &conn, &room, settings, token, since, id.as_deref(), r).is_err() {
                // The read failed: the member leaves the room again.
                svc.leave(&conn, &room);
                svc.shard.m().client_errors_total.inc();
                let e = event::error(ErrorCode::Unavailable, "room history is unavailable, try again", id.as_deref());
                conn.push(&svc.shard, e);
            }
        });
    }

    // ---- the server API's memberships (§12) ---------------------------------------

    /// `POST /api/subscribe` / `/api/unsubscribe`: every connection of
    /// `user` on every node joins (leaves) the room. With Redis the order
    /// travels on the user's channel, so exactly the nodes that hold the
    /// user get it (this one too, back from Redis); standalone it goes to
    /// the other shards' inboxes and is applied here at once.
    pub async fn server_membership(
        self: &Rc<Self>,
        user: &str,
        m: &event::ServerMembership,
    ) -> Result<(), Unavailable> {
        let frame = event::server_membership(m);
        match &*self.bus {
            Bus::Redis(_) => self.publish_confirmed(Target::User(user), frame).await,
            Bus::Local => {
                let sent = std::time::Instant::now();
                let to: std::sync::Arc<str> = std::sync::Arc::from(user);
                self.shard.to_other_shards(|| ShardMsg::Direct { user: to.clone(), frame: frame.clone(), sent });
                self.apply_server_membership(user, m);
                Ok(())
            }
        }
    }

    /// This shard's connections of `user` act on a server membership, as
    /// if each had sent the op (no grant check; the room limit holds).
    fn apply_server_membership(self: &Rc<Self>, user: &str, m: &event::ServerMembership) {
        for conn in self.shard.user_conn_list(user) {
            if m.subscribe {
                if crate::conn::limits::too_many_rooms(&self.shard, &conn, &m.room) {
                    self.shard.m().room_limit_refusals_total.inc();
                    continue;
                }
                self.subscribe(&conn, &m.room, m.since, Some(event::SERVER_REPLY));
            } else {
                self.leave(&conn, &m.room);
                conn.push(&self.shard, event::membership("unsubscribed", &m.room, Some(event::SERVER_REPLY)));
            }
        }
    }

    // ---- publish ----------------------------------------------------------------

    /// A client's message into `room`: through the room's history (its
    /// authority assigns the offset) or straight to the bus.
    pub fn publish_to_room(&self, room: &str, from: &str, data: &str) -> Result<(), Unavailable> {
        match self.history_of(room) {
            Some((h, settings)) => h.publish(&self.shard, room, settings, from, data, None),
            None => self.publish(Target::Room(room), event::message(room, from, data)),
        }
    }

    /// Publishes an encoded event frame through the bus.
    pub fn publish(&self, target: Target<'_>, frame: Bytes) -> Result<(), Unavailable> {
        self.count_publish(self.bus.publish(&self.shard, target, frame))
    }

    /// Publishes like `publish`, resolving once the backplane took the
    /// message (`Bus::publish_confirmed`): for `POST /api/publish`.
    pub async fn publish_confirmed(&self, target: Target<'_>, frame: Bytes) -> Result<(), Unavailable> {
        self.count_publish(self.bus.publish_confirmed(&self.shard, target, frame).await)
    }

    /// Queues a publish like `publish_confirmed` without waiting for it,
    /// so that many can be in flight together (`POST /api/publish` to many
    /// targets): `Ok(None)` when the backplane took it at once (the local
    /// bus), else a slot filled with whether Redis took it.
    pub fn publish_queued(
        &self,
        target: Target<'_>,
        frame: Bytes,
    ) -> Result<Option<crate::rt::Oneshot<bool>>, Unavailable> {
        let r = match &*self.bus {
            Bus::Local => crate::bus::local::publish(&self.shard, target, frame).map(|()| None),
            Bus::Redis(r) => {
                let done = crate::rt::Oneshot::default();
                r.publish_confirmed(target, frame, done.clone()).map(|()| Some(done))
            }
        };
        self.shard.m().publishes_total.inc();
        if r.is_err() {
            self.shard.m().bus_unavailable_total.inc();
        }
        r
    }

    /// `corecast_publishes_total`, and `bus_unavailable_total` for a refusal.
    fn count_publish(&self, r: Result<(), Unavailable>) -> Result<(), Unavailable> {
        self.shard.m().publishes_total.inc();
        if r.is_err() {
            self.shard.m().bus_unavailable_total.inc();
        }
        r
    }

    // ---- the inbox ----------------------------------------------------------------

    /// The inbox task: handles what other shards and bus threads send.
    pub async fn run_inbox(self: Rc<Self>) {
        let inbox = self.shard.inbox();
        loop {
            inbox.ready().await;
            let mut n = 0;
            while let Some(msg) = inbox.try_recv() {
                self.on_msg(msg);
                n += 1;
                if n == INBOX_BATCH {
                    // Let the flusher and the connections run between batches.
                    self.shard.yield_now().await;
                    n = 0;
                }
            }
        }
    }

    fn on_msg(self: &Rc<Self>, msg: ShardMsg) {
        let shard = &self.shard;
        shard.m().inbox_messages_total.inc();
        match msg {
            ShardMsg::Room { room, frame, sent, pos, from_reader } => {
                if from_reader && !relay::Relay::pass_on(self, &room, &frame, sent, pos.as_deref()) {
                    return;
                }
                match (pos, &self.history) {
                    (Some(pos), Some(h)) => h.on_live(shard, &room, *pos, frame, sent),
                    _ => shard.deliver_timed(Target::Room(&room), &frame, sent),
                }
            }
            msg @ (ShardMsg::Relay { .. }
            | ShardMsg::Hold { .. }
            | ShardMsg::Released { .. }
            | ShardMsg::Relayed { .. }) => relay::Relay::handle(self, msg),
            ShardMsg::Direct { user, frame, .. } if census::Census::is_control(&user) => {
                census::Census::on_frame(self, &user, &frame)
            }
            ShardMsg::Direct { user, frame, sent } => match event::parse_server_membership(&frame) {
                Some(m) => self.apply_server_membership(&user, &m),
                None => shard.deliver_timed(Target::User(&user), &frame, sent),
            },
            ShardMsg::Drain => shard.start_drain(),
            ShardMsg::Subscribed { room, seq, confirmed } => {
                if self.bus.on_subscribed(shard, &room, seq, confirmed) {
                    relay::Relay::on_subscribed(self, &room, confirmed);
                }
            }
            ShardMsg::RedisLink { up } => {
                self.bus.on_link(shard, up);
                relay::Relay::on_link(self, up);
                if let Some(h) = &self.history {
                    h.on_link(shard, up);
                }
                if up {
                    // Whatever Redis lost meanwhile: our counts are absolute.
                    presence::Presence::resync(self);
                }
            }
            ShardMsg::Presence(msg) => presence::Presence::on_msg(self, *msg),
            ShardMsg::Census(msg) => census::Census::on_msg(self, *msg),
            ShardMsg::History(msg) => {
                if let Some(h) = &self.history {
                    crate::history::local::handle(shard, h, *msg);
                }
            }
        }
    }
}
