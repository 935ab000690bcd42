//! ⑦ The `redis-NN` thread: one per shard, pinned beside it, owning that
//! shard's Redis subscriber connections — one per primary (`subconn.rs`):
//! the one Redis, the Sentinel-named primary, or each cluster primary —
//! all blocking `std::net::TcpStream`s multiplexed with one `poll(2)`.
//!
//! Which primary a channel belongs to is the topology's `View`
//! (`topology.rs`); when it changes (failover, slot migration) the reader
//! moves each wanted channel to its new primary's connection. In a cluster
//! it uses sharded Pub/Sub (`SSUBSCRIBE`, one slot per command), follows
//! `MOVED`/`CLUSTERDOWN` refusals and Redis's own `sunsubscribe` (a slot
//! left the node) by asking for a fresh view and subscribing again there.
//! A message the new server delivers again after such a move, which the
//! old one already did, is dropped (`overlap.rs`).
//!
//! In: `Interest` changes from the shard (a crossbeam channel, plus a
//! self-pipe that wakes the thread's `poll(2)`), and pushed RESP2 frames from
//! Redis, decoded zero-copy with `decode_bytes_mut`. Out: SUBSCRIBE /
//! UNSUBSCRIBE commands (each batch of changes coalesced into one command by
//! `subs.rs`), and, into the reader's own queue of the shard's inbox,
//! `ShardMsg::Room` / `Direct` (a complete client frame built once from the
//! checked payload; a read buffer's messages are queued, then the shard is
//! woken once for all of them),
//! `ShardMsg::Subscribed` (Redis confirmed a room) and `ShardMsg::RedisLink`.
//!
//! A payload is forwarded only if it is the JSON text of the event the
//! channel carries (`message` with the channel's room, or `direct`: the
//! check is `payload.rs`); anything else is dropped, counted in
//! `bus_dropped_total` and logged at warn (at most once a second). The
//! thread never lets its shard's inbox grow without
//! bound: above `INBOX_HIGH_WATER` it stops reading until the shard has
//! caught up, and Redis buffers meanwhile (Redis cuts off a subscriber whose
//! buffer passes `client-output-buffer-limit pubsub`; we then reconnect).
//!
//! On any failure the connection is dropped, the shard is told
//! (`RedisLink { up: false }`: not every primary is reachable, so held
//! `subscribed` replies go out), the topology is asked to refresh, and the
//! thread reconnects with backoff and subscribes again to everything its
//! shard still needs there. The other primaries' connections go on
//! delivering meanwhile.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use simd_json::prelude::*;
use tracing::{debug, info, warn};

use super::health::Health;
use super::link::{DEAD_AFTER, Link, LinkError, PING_IDLE, Retry};
use super::overlap::Overlap;
use super::payload::{DropLog, JsonCheck};
use super::subconn::{self, Confirm, SubConn, is_timeout, read_more};
use super::subs::{Interest, Kind, channel_name};
use super::topology::{Mode, Node, Topology, View};
use super::{cluster, resp};
use crate::metrics::{Metrics, ShardMetrics};
use crate::protocol::event;
use crate::shard::{InboxSender, ShardMsg};

/// Above this many messages waiting in its queue into the shard's inbox the reader stops
/// reading from Redis ...
const INBOX_HIGH_WATER: usize = 8192;
/// ... until it is back down to this.
const INBOX_LOW_WATER: usize = 1024;
/// How long the reader naps while its shard catches up.
const BACKPRESSURE_NAP: Duration = Duration::from_micros(200);

/// The shard's end: batches of `Interest` changes to its reader. `Send`,
/// moved into the shard thread; dropping it (the shard stopped) stops the
/// reader.
pub struct SubHandle {
    tx: Sender<Vec<Interest>>,
    /// The write end of the wake-up pipe; closing it wakes the reader too.
    pipe: UnixStream,
    /// Set while a wake-up byte is unread: a burst of changes writes one byte.
    pending: Arc<AtomicBool>,
}

impl SubHandle {
    /// Another write end of the wake-up pipe, for the topology thread.
    pub fn waker(&self) -> io::Result<UnixStream> {
        self.pipe.try_clone()
    }

    /// Hands over the changes of one turn of the shard's event loop.
    pub fn send(&self, batch: Vec<Interest>) {
        if self.tx.send(batch).is_err() {
            return; // The reader has stopped (shutdown).
        }
        if !self.pending.swap(true, Ordering::SeqCst) {
            // A full pipe already holds a wake-up byte; nothing else can fail here.
            let _ = (&self.pipe).write(&[1]);
        }
    }
}

/// The reader's end of the same.
pub struct ReaderInput {
    rx: Receiver<Vec<Interest>>,
    pipe: UnixStream,
    pending: Arc<AtomicBool>,
}

impl ReaderInput {
    /// Hands every waiting `Interest` to `f`. Fails once the shard has
    /// stopped (its `SubHandle` is gone).
    fn take(&self, mut f: impl FnMut(Interest)) -> Result<(), Shutdown> {
        // The order matters. Empty the pipe, *then* clear `pending`, *then*
        // empty the channel: a send whose swap saw `pending` still set is
        // picked up by the channel drain below; one that saw it clear wrote
        // a byte that is still in the pipe and wakes the next `poll`.
        // (Clearing before emptying the pipe could swallow that byte and
        // leave `pending` set with nothing to wake us: changes stuck.)
        let mut sink = [0u8; 64];
        while let Ok(n) = (&self.pipe).read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        self.pending.store(false, Ordering::SeqCst);
        loop {
            match self.rx.try_recv() {
                Ok(batch) => batch.into_iter().for_each(&mut f),
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => return Err(Shutdown),
            }
        }
    }
}

/// Makes a connected `SubHandle` / `ReaderInput` pair.
pub fn channel() -> io::Result<(SubHandle, ReaderInput)> {
    let (w, r) = UnixStream::pair()?;
    w.set_nonblocking(true)?;
    r.set_nonblocking(true)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let pending = Arc::new(AtomicBool::new(false));
    Ok((SubHandle { tx, pipe: w, pending: pending.clone() }, ReaderInput { rx, pipe: r, pending }))
}

/// Everything `start` hands a reader.
pub struct ReaderParts {
    pub shard: usize,
    pub core: usize,
    pub topo: Arc<Topology>,
    pub prefix: Arc<str>,
    pub inbox: InboxSender,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub input: ReaderInput,
    /// Larger payloads are dropped: they would cut off every receiver
    /// (`--outbound-queue-bytes`).
    pub max_payload: usize,
    /// Room history is on (`--history-size`): see `Reader::blip`.
    pub history: bool,
}

pub struct Reader {
    shard: usize,
    core: usize,
    topo: Arc<Topology>,
    view: Arc<View>,
    /// The topology version `view` is from.
    seen: u64,
    prefix: Arc<str>,
    /// One per primary, in `view.nodes` order.
    conns: Vec<SubConn>,
    /// Wanted channels whose slot no primary serves (yet).
    homeless: Vec<Interest>,
    /// When to look again at channels Redis refused or dropped.
    rehome_at: Option<Instant>,
    /// What the shard was last told (`ShardMsg::RedisLink`).
    link_up: bool,
    /// Room history is on.
    history: bool,
    /// Some channels may have missed messages while the link as a whole
    /// stayed up: a primary's connection came (back) up, the view moved
    /// channels to another primary, or Redis dropped a shard channel (slot
    /// moved). With history, the shard is told `RedisLink` down then up, so
    /// that every history room catches up (`history::recover`) once its
    /// SUBSCRIBE is confirmed again; the live gate drops what it already had.
    blip: bool,
    /// What each server delivered lately, to drop a second server's copy
    /// after a channel moves (Cluster, Sentinel).
    overlap: Overlap,
    inbox: InboxSender,
    /// Messages were queued to the shard without a wake yet: a read
    /// buffer's messages are queued, then the shard is woken once (`service`).
    unwoken: bool,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    input: ReaderInput,
    json: JsonCheck,
    max_payload: usize,
    drops: DropLog,
}

/// How serving one connection ended.
enum End {
    /// The shard stopped: the thread ends.
    Shutdown,
    /// The connection failed: reconnect.
    Lost(LinkError),
}

impl From<LinkError> for End {
    fn from(e: LinkError) -> End {
        End::Lost(e)
    }
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> End {
        End::Lost(e.into())
    }
}

/// The shard's `SubHandle` is gone.
struct Shutdown;

/// A refused or dropped channel is looked at again this long after, by
/// when the topology thread has usually answered the refresh it asked for.
const REHOME_DELAY: Duration = Duration::from_millis(300);

impl Reader {
    pub fn new(p: ReaderParts) -> Reader {
        let view = p.topo.view();
        let seen = p.topo.version();
        // Channels move between servers that pass messages to each other.
        let moves = matches!(p.topo.mode, Mode::Cluster | Mode::Sentinel);
        let mut r = Reader {
            shard: p.shard,
            core: p.core,
            topo: p.topo,
            view: view.clone(),
            seen,
            prefix: p.prefix,
            conns: Vec::new(),
            homeless: Vec::new(),
            rehome_at: None,
            link_up: false,
            history: p.history,
            blip: false,
            overlap: Overlap::new(moves),
            inbox: p.inbox,
            unwoken: false,
            metrics: p.metrics,
            health: p.health,
            input: p.input,
            json: JsonCheck::default(),
            max_payload: p.max_payload,
            drops: DropLog::default(),
        };
        r.conns = view.nodes.iter().map(|n| r.new_conn(n.clone())).collect();
        r
    }

    fn new_conn(&mut self, node: Arc<Node>) -> SubConn {
        let origin = self.overlap.node_id(&node.name);
        SubConn::new(node, origin, &self.prefix, Retry::new(self.shard, Link::Subscriber), self.metrics.clone())
    }

    fn m(&self) -> &ShardMetrics {
        self.metrics.shard(self.shard)
    }

    /// The thread's body: serve every primary's connection until the shard stops.
    pub fn run(mut self) {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: self.core }) {
            warn!(shard = self.shard, core = self.core, "redis reader: could not pin to core");
        }
        let _ = self.serve();
        for c in &mut self.conns {
            c.set_live(None);
        }
    }

    // ---- the topology ----------------------------------------------------------

    /// Adopts a new view: a connection per primary (kept where the primary
    /// stays), and every wanted channel at the primary now serving it.
    fn apply_view(&mut self) {
        self.view = self.topo.view();
        self.seen = self.topo.version();
        // Channels may move to another primary's connection.
        self.blip = true;
        self.overlap.arm(Instant::now());
        let mut old = std::mem::take(&mut self.conns);
        let mut moving = Vec::new();
        let view = self.view.clone();
        let mut conns = Vec::with_capacity(view.nodes.len());
        for n in &view.nodes {
            let found = old.iter().position(|c| c.node.name == n.name);
            match found {
                Some(i) => {
                    let mut c = old.swap_remove(i);
                    if c.node.addrs != n.addrs {
                        // Same name, new address: connect again there.
                        for w in c.subs.waiting() {
                            let _ = self.to_shard(ShardMsg::Subscribed { room: w.room, seq: w.seq, confirmed: false });
                        }
                        c.lose(Duration::ZERO);
                    }
                    c.node = n.clone();
                    conns.push(c);
                }
                None => conns.push(self.new_conn(n.clone())),
            }
        }
        for mut c in old {
            info!(shard = self.shard, redis = %c.node.name, "no longer a primary: closing its subscriber connection");
            moving.extend(c.subs.drain_wanted());
        }
        self.conns = conns;
        self.rehome(moving);
    }

    /// Puts every wanted channel (and `moving`) at the primary serving it,
    /// and makes those refused or dropped be subscribed again.
    fn rehome(&mut self, mut moving: Vec<Interest>) {
        moving.append(&mut self.homeless);
        for i in 0..self.conns.len() {
            for key in self.conns[i].subs.wanted_keys() {
                if self.view.owner(&key) == Some(i) {
                    self.conns[i].subs.touch(&key);
                } else if let Some(interest) = self.conns[i].subs.forget(&key) {
                    moving.push(interest);
                }
            }
        }
        for i in moving {
            self.route(i);
        }
    }

    /// Hands one interest change to the connection of the primary serving it.
    ///
    /// A room joined while its primary is unreachable (or its slot has no
    /// primary) is confirmed to the shard at once, as the whole link did
    /// before there were several: the shard answers `subscribed` now, and the
    /// subscription is made when the primary is back. Rooms on the other
    /// primaries still wait for Redis.
    fn route(&mut self, i: Interest) {
        self.homeless.retain(|h| !(h.kind == i.kind && h.name == i.name));
        let channel = channel_name(&self.prefix, i.kind, &i.name);
        let answer_now = i.on && i.kind == Kind::Room;
        let (room, seq) = (i.name.clone(), i.seq);
        let reachable = match self.view.owner(&channel) {
            Some(o) => {
                self.conns[o].subs.apply(i);
                self.conns[o].live.is_some()
            }
            None if i.on => {
                self.homeless.push(i);
                false
            }
            None => true,
        };
        if answer_now && !reachable {
            let _ = self.to_shard(ShardMsg::Subscribed { room, seq, confirmed: false });
        }
    }

    /// Every primary's connection is up and every channel has a home:
    /// what `/readyz` shows.
    fn all_up(&self) -> bool {
        !self.conns.is_empty() && self.homeless.is_empty() && self.conns.iter().all(|c| c.live.is_some())
    }

    /// Tells the shard whether `subscribed` replies may be held (some
    /// primary is reachable: its rooms are confirmed as Redis answers, the
    /// others at once), then `/readyz` (every primary reachable): a node
    /// reports ready only once its shards are told. Back up, every room is
    /// confirmed again (the shard forgot on the way down).
    fn update_link(&mut self) {
        let up = self.conns.iter().any(|c| c.live.is_some());
        if std::mem::take(&mut self.blip) && self.history && up && self.link_up {
            // Down then up (below): see `blip`.
            self.link_up = false;
            let _ = self.inbox.send_wait(ShardMsg::RedisLink { up: false });
        }
        if up != self.link_up {
            self.link_up = up;
            let _ = self.inbox.send_wait(ShardMsg::RedisLink { up });
            if up {
                for i in 0..self.conns.len() {
                    self.conns[i].subs.renotify();
                    // Rooms of a primary still unreachable are answered at once (see `route`).
                    if self.conns[i].live.is_none() {
                        self.release_waiting(i);
                    }
                }
                let homeless: Vec<(Arc<str>, u64)> =
                    self.homeless.iter().filter(|h| h.kind == Kind::Room).map(|h| (h.name.clone(), h.seq)).collect();
                for (room, seq) in homeless {
                    let _ = self.to_shard(ShardMsg::Subscribed { room, seq, confirmed: false });
                }
            }
        }
        self.health.set(self.shard, Link::Subscriber, self.all_up());
    }

    /// Connection `i` is going down: the replies the shard holds for its
    /// rooms go out now.
    fn release_waiting(&mut self, i: usize) {
        for s in self.conns[i].subs.waiting() {
            let _ = self.to_shard(ShardMsg::Subscribed { room: s.room, seq: s.seq, confirmed: false });
        }
    }

    // ---- serving ---------------------------------------------------------------

    fn serve(&mut self) -> Result<(), Shutdown> {
        self.take_interest()?;
        let wake_fd = self.input.pipe.as_raw_fd();
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut polled: Vec<usize> = Vec::new();
        loop {
            if self.topo.version() != self.seen {
                self.apply_view();
            }
            if self.rehome_at.is_some_and(|t| Instant::now() >= t) {
                self.rehome_at = None;
                self.rehome(Vec::new());
            }
            for i in 0..self.conns.len() {
                let c = &self.conns[i];
                if c.live.is_some() {
                    continue;
                }
                if c.attempt.is_none() && Instant::now() >= c.retry_at {
                    self.start_connect(i);
                }
                // Progress comes with readiness (below); here only the deadline.
                let c = &self.conns[i];
                if c.attempt.is_some() && Instant::now() >= subconn::deadline(c) {
                    self.advance_connect(i);
                }
            }
            self.update_link();
            for i in 0..self.conns.len() {
                if let Err(end) = self.service(i) {
                    match end {
                        End::Shutdown => return Err(Shutdown),
                        End::Lost(e) => self.lost(i, e),
                    }
                }
            }
            self.update_link();

            let now = Instant::now();
            let mut next = now + PING_IDLE;
            for c in &self.conns {
                next = next.min(subconn::deadline(c));
            }
            if let Some(t) = self.rehome_at {
                next = next.min(t);
            }
            fds.clear();
            polled.clear();
            fds.push(pollfd(wake_fd));
            for (i, c) in self.conns.iter().enumerate() {
                if let Some(l) = &c.live {
                    fds.push(pollfd(l.sock.as_raw_fd()));
                    polled.push(i);
                } else if let Some((fd, events)) = c.attempt_poll() {
                    fds.push(libc::pollfd { fd, events, revents: 0 });
                    polled.push(i);
                }
            }
            if let Err(e) = poll(&mut fds, next.saturating_duration_since(now)) {
                crate::warn_throttled!(shard = self.shard, error = %e, "redis reader: poll failed");
                thread::sleep(Duration::from_millis(10));
            }
            // Also on a timeout: the topology holds a write end of the pipe,
            // so a stopped shard is noticed by the channel, not by EOF.
            if is_ready(&fds[0]) || fds.iter().all(|f| !is_ready(f)) {
                self.take_interest()?;
            }
            for (k, &i) in polled.iter().enumerate() {
                let f = &fds[k + 1];
                if f.revents & (f.events | libc::POLLHUP | libc::POLLERR) == 0 {
                    continue;
                }
                if self.conns[i].live.is_none() {
                    self.advance_connect(i);
                    continue;
                }
                let Some(l) = &mut self.conns[i].live else { continue };
                match read_more(&mut l.sock, &mut l.buf) {
                    Ok(0) => self.lost(i, LinkError::Closed),
                    Ok(_) => {
                        l.last_rx = Instant::now();
                        l.ping_sent = None;
                    }
                    Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => self.lost(i, e.into()),
                }
            }
        }
    }

    /// Starts a connect to primary `i` (non-blocking; see `SubConn::start_attempt`).
    fn start_connect(&mut self, i: usize) {
        let name = format!("corecast-sub-{:02}", self.shard);
        let check_role = self.topo.mode.check_role();
        if let Err(e) = self.conns[i].start_attempt(&name, check_role) {
            self.attempt_failed(i, &e);
        }
    }

    /// Moves primary `i`'s connect on; handles its success or failure.
    fn advance_connect(&mut self, i: usize) {
        match self.conns[i].advance() {
            Ok(false) => {}
            Ok(true) => {
                let m = self.metrics.clone();
                self.conns[i].retry.connected(m.shard(self.shard));
                info!(shard = self.shard, redis = %self.conns[i].node.name, "redis subscriber connected");
                self.blip = true;
                // Channels moved here may bring copies from now on.
                self.overlap.arm(Instant::now());
                if self.topo.mode == Mode::Sentinel {
                    // Sentinel: ask again on every (re)connect; `ROLE` was checked meanwhile.
                    self.topo.request_refresh();
                }
            }
            Err(e) => self.attempt_failed(i, &e),
        }
    }

    fn attempt_failed(&mut self, i: usize, e: &LinkError) {
        self.m().redis_connect_failures_total.add_shared(1);
        self.fail(i, e);
        let d = self.conns[i].retry.next_delay();
        self.conns[i].retry_at = Instant::now() + d;
    }

    fn fail(&mut self, i: usize, e: &LinkError) {
        let c = &mut self.conns[i];
        self.health.failed(self.shard, Link::Subscriber, &c.node.name, e);
        c.retry.failed(&c.node.url, e);
        // Maybe a failover: ask where the primary is now.
        self.topo.request_refresh();
    }

    fn lost(&mut self, i: usize, e: LinkError) {
        self.fail(i, &e);
        self.release_waiting(i);
        let d = self.conns[i].retry.next_delay();
        self.conns[i].lose(d);
    }

    /// Writes connection `i`'s plan, handles its buffered frames, and keeps
    /// its heartbeat.
    fn service(&mut self, i: usize) -> Result<(), End> {
        if self.conns[i].live.is_none() {
            return Ok(());
        }
        let sharded = self.topo.mode.sharded();
        let commands = self.conns[i].write_plan(sharded)?;
        if commands > 0 {
            self.m().redis_sub_commands_total.add_shared(commands);
            debug!(shard = self.shard, redis = %self.conns[i].node.name, commands, wanted = self.conns[i].subs.wanted(), "redis subscriptions changed");
        }
        for s in self.conns[i].subs.settled() {
            self.to_shard(ShardMsg::Subscribed { room: s.room, seq: s.seq, confirmed: true })?;
        }
        // Every frame of the read buffer, then one wake for the messages
        // they queued (also when decoding failed half-way).
        let decoded = self.decode_buffered(i);
        self.wake_shard();
        decoded?;
        // Heartbeat: a silent connection gets a PING; an unanswered one is dead.
        let Some(l) = &mut self.conns[i].live else { return Ok(()) };
        let now = Instant::now();
        match l.ping_sent {
            Some(at) if now - at >= DEAD_AFTER => return Err(End::Lost(LinkError::Timeout("PING"))),
            None if now - l.last_rx >= PING_IDLE => {
                l.sock.write_all(resp::PING)?;
                l.ping_sent = Some(now);
            }
            _ => {}
        }
        Ok(())
    }

    /// Handles every complete frame in connection `i`'s read buffer.
    fn decode_buffered(&mut self, i: usize) -> Result<(), End> {
        loop {
            let Some(l) = &mut self.conns[i].live else { return Ok(()) };
            match decode_bytes_mut(&mut l.buf) {
                Ok(Some((frame, _, _))) => self.on_frame(i, frame)?,
                Ok(None) => return Ok(()),
                Err(_) => return Err(End::Lost(LinkError::Protocol)),
            }
        }
    }

    /// Wakes the shard for the messages `queue` put in its inbox, if any.
    fn wake_shard(&mut self) {
        if std::mem::take(&mut self.unwoken) {
            self.inbox.wake();
        }
    }

    fn on_frame(&mut self, i: usize, frame: BytesFrame) -> Result<(), End> {
        use BytesFrame::{Array, BulkString};
        match frame {
            Array(parts) => match parts.as_slice() {
                [BulkString(kind), BulkString(channel), BulkString(payload)]
                    if kind == "message" || kind == "smessage" =>
                {
                    self.on_message(i, channel, payload)
                }
                [BulkString(kind), BulkString(channel), _] => {
                    let unsubscribe = match &kind[..] {
                        b"subscribe" | b"ssubscribe" => false,
                        b"unsubscribe" | b"sunsubscribe" => true,
                        _ => return Ok(()),
                    };
                    match self.conns[i].confirm(unsubscribe, channel) {
                        Confirm::Answer(Some(s)) => {
                            self.to_shard(ShardMsg::Subscribed { room: s.room, seq: s.seq, confirmed: true })
                        }
                        Confirm::Answer(None) => Ok(()),
                        Confirm::Unsolicited(wanted) => {
                            self.m().redis_unsolicited_unsubscribes_total.add_shared(1);
                            if !wanted {
                                return Ok(());
                            }
                            // The slot left this node: a migration, or a
                            // failover that made it a replica. A replica
                            // takes `SSUBSCRIBE` for its primary's slots, and
                            // gets the shard's messages there, the ones
                            // published at it (by a node whose slot map is
                            // not refreshed yet) before its primary: moving
                            // from it to the new primary then brings such a
                            // message twice (seen in tests at about one
                            // failover in ten). So the channel is not made
                            // again on this connection: it is dropped, and
                            // made again only after `ROLE` says master
                            // (`Mode::check_role`), or at the owner the
                            // refreshed map names. History rooms catch up
                            // after the blip; plain rooms may miss what is
                            // published meanwhile (at-most-once).
                            self.blip = true;
                            debug!(shard = self.shard, redis = %self.conns[i].node.name, channel = %String::from_utf8_lossy(channel), "redis dropped a shard channel (slot moved); reconnecting to check its role");
                            Err(End::Lost(LinkError::Refused {
                                step: "SSUBSCRIBE",
                                reply: "the channel's slot left this node (sunsubscribe)".into(),
                            }))
                        }
                    }
                }
                // ["pong", ""] and anything else Redis may push.
                _ => Ok(()),
            },
            BytesFrame::Error(e) => {
                let text: &str = &e;
                let movable = cluster::Redirect::parse(text).is_some()
                    || text.starts_with("CLUSTERDOWN")
                    || text.starts_with("TRYAGAIN");
                if self.topo.mode.sharded() && movable {
                    // The slot is elsewhere (or nowhere yet): subscribe there once the map says where.
                    let refused = self.conns[i].refused();
                    self.m().redis_redirects_total.add_shared(1);
                    debug!(shard = self.shard, redis = %self.conns[i].node.name, channels = refused.len(), reply = text, "redis refused a subscription; following the slot");
                    self.topo.request_refresh();
                    self.rehome_soon();
                    Ok(())
                } else {
                    // E.g. NOPERM on SUBSCRIBE (an ACL without the channel): reconnect and retry.
                    Err(End::Lost(LinkError::Refused { step: "SUBSCRIBE", reply: text.to_string() }))
                }
            }
            _ => Ok(()),
        }
    }

    fn rehome_soon(&mut self) {
        let at = Instant::now() + REHOME_DELAY;
        self.rehome_at = Some(self.rehome_at.map_or(at, |t| t.min(at)));
    }

    fn on_message(&mut self, i: usize, channel: &Bytes, payload: &Bytes) -> Result<(), End> {
        // Usually wanted at this connection; during a slot move, maybe
        // already at the new owner's (the message is still ours, once).
        let found = self.conns[i].subs.lookup(channel).or_else(|| {
            let o = self.view.owner(channel)?;
            self.conns.get(o)?.subs.lookup(channel)
        });
        let Some((kind, name)) = found else {
            // Sent before our UNSUBSCRIBE reached Redis: nobody here wants it.
            return Ok(());
        };
        let name = name.clone();
        // The delivery-latency clock starts here: the payload is the exact
        // event JSON, with no room for the publisher's timestamp.
        let sent = Instant::now();
        if !self.overlap.admit(self.conns[i].origin, channel, payload, sent) {
            self.m().redis_duplicates_dropped_total.add_shared(1);
            return Ok(());
        }
        let pos = match self.json.check_with_position(kind, &name, payload, self.max_payload) {
            Ok(pos) => pos,
            Err(why) => {
                self.m().bus_dropped_total.add_shared(1);
                self.drops.dropped(self.shard, channel, why);
                return Ok(());
            }
        };
        let frame = event::frame_json(payload);
        let msg = match kind {
            Kind::Room => ShardMsg::Room { room: name, frame, sent, pos: pos.map(Box::new), from_reader: true },
            Kind::User => ShardMsg::Direct { user: name, frame, sent },
        };
        if self.inbox.backlog() >= INBOX_HIGH_WATER {
            self.m().redis_reader_waits_total.add_shared(1);
            // It must be awake to drain what we wait on.
            self.wake_shard();
            while self.inbox.backlog() > INBOX_LOW_WATER {
                thread::sleep(BACKPRESSURE_NAP);
                if self.take_interest().is_err() {
                    return Err(End::Shutdown);
                }
            }
        }
        self.queue(msg)
    }

    /// Queues `msg` without waking the shard: `service` wakes it once per
    /// read buffer (a full queue wakes it at once, `push_wait`).
    fn queue(&mut self, msg: ShardMsg) -> Result<(), End> {
        self.inbox.push_wait(msg).map_err(|_| End::Shutdown)?;
        self.unwoken = true;
        Ok(())
    }

    fn to_shard(&self, msg: ShardMsg) -> Result<(), End> {
        self.inbox.send_wait(msg).map_err(|_| End::Shutdown)
    }

    // ---- the shard's side ----------------------------------------------------

    /// Applies every `Interest` waiting. Fails once the shard has stopped.
    fn take_interest(&mut self) -> Result<(), Shutdown> {
        let mut batch = Vec::new();
        self.input.take(|i| batch.push(i))?;
        for i in batch {
            self.route(i);
        }
        Ok(())
    }
}

// ---- small I/O helpers ----------------------------------------------------------

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

fn is_ready(p: &libc::pollfd) -> bool {
    p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

/// `poll(2)` for up to `timeout` (rounded up to a millisecond).
fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `pollfd` for the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_interest_is_left_waiting_without_a_wake_up() {
        // A sender racing the reader: every change must be taken within one
        // wake-up of being sent, never left behind with no byte in the pipe.
        const N: u64 = 200_000;
        let (h, input) = channel().unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let sender = thread::spawn(move || {
            for i in 0..N {
                h.send(vec![Interest { kind: Kind::User, name: "u".into(), on: true, seq: i }]);
                if i % 64 == 0 {
                    thread::yield_now();
                }
            }
            // Keep the pipe open: closing it would wake the reader anyway.
            let _ = done_rx.recv();
        });
        let mut got = 0;
        while got < N {
            let mut fds = [pollfd(input.pipe.as_raw_fd())];
            poll(&mut fds, Duration::from_secs(2)).unwrap();
            assert!(is_ready(&fds[0]), "stuck: {got} of {N} taken, {} waiting with no wake-up", input.rx.len());
            assert!(input.take(|_| got += 1).is_ok());
        }
        done_tx.send(()).unwrap();
        sender.join().unwrap();
    }

    #[test]
    fn a_burst_of_interest_writes_one_wake_up_byte() {
        let (h, input) = channel().unwrap();
        for i in 0..100 {
            h.send(vec![Interest { kind: Kind::Room, name: format!("r{i}").into(), on: true, seq: i }]);
        }
        let mut buf = [0u8; 16];
        assert_eq!((&input.pipe).read(&mut buf).unwrap(), 1);
        assert_eq!(input.rx.len(), 100);
        input.pending.store(false, Ordering::SeqCst);
        drop(h);
        // EOF once no write end is left. (Another test thread's fork may hold
        // a copy of it for the moment before its exec closes it: wait.)
        let end = std::time::Instant::now() + Duration::from_secs(2);
        let got = loop {
            match (&input.pipe).read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                other => break other.unwrap(),
            }
        };
        assert_eq!(got, 0, "a stopped shard closes the pipe");
    }
}
