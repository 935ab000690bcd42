//! The checker: every (client, room) stream over the whole run, across
//! reconnects, against PROTOCOL.md §7.
//!
//! Per stream (owned by its client thread, no lock):
//! 1. each (epoch, offset) at most once (`duplicate`);
//! 2. within an epoch, offsets strictly increasing and contiguous
//!    (next = last + 1), unless a `gap` or a `subscribed` with
//!    `recovered:false` came in between, which moves the position to the
//!    announced one (`silent_loss` for a skip, `out_of_order` for a step
//!    back to an offset not seen before);
//! 3. an epoch change in a message without an announcement is kept as a
//!    claim and judged at the end against the ground truth (the highest
//!    offset of the old epoch seen by any client, acked to the publisher, or
//!    announced by the server): a `silent_loss` unless the stream had
//!    reached it and the new epoch starts at offset 1;
//! 4. `lie`: one (room, epoch, offset) carrying two different payloads
//!    (across all clients and the publisher's acks), a `recovered:true`
//!    whose epoch is not the one asked for or whose position is below it,
//!    or a replay after `recovered:true` that skips;
//! 5. `not_caught_up`: after the run, each stream must reach its room's
//!    final position (checked by the orchestrator with `Stream::shared`).
//!
//! Shared: the ground truth per room (payload of each position, highest
//! offset per epoch), the violations, the counters.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    SilentLoss,
    Duplicate,
    OutOfOrder,
    Lie,
    NotCaughtUp,
    /// Something §7 does not allow that is none of the above (a message
    /// before its room's `subscribed`, a reply without a position).
    Protocol,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::SilentLoss => "silent_loss",
            Kind::Duplicate => "duplicate",
            Kind::OutOfOrder => "out_of_order",
            Kind::Lie => "lie",
            Kind::NotCaughtUp => "not_caught_up",
            Kind::Protocol => "protocol",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: Kind,
    /// Client index; `usize::MAX` for the publisher.
    pub client: usize,
    pub room: String,
    /// Seconds since the run began.
    pub at: f64,
    pub detail: String,
    pub last_fault: String,
    /// The stream's last events, oldest first.
    pub recent: Vec<String>,
}

#[derive(Default)]
pub struct Stats {
    pub messages: AtomicU64,
    pub recovered_true: AtomicU64,
    pub recovered_false: AtomicU64,
    pub gaps: AtomicU64,
    /// Gaps announcing a position behind the stream's own in the same
    /// epoch: the room's offsets went back (they will be reused).
    pub gaps_backward: AtomicU64,
    pub subscribes: AtomicU64,
    pub subscribe_errors: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub disconnects: AtomicU64,
    pub maintenance: AtomicU64,
    pub stale_drops: AtomicU64,
    /// Connections the server closed with 1008 (policy: a slow consumer).
    pub policy_closes: AtomicU64,
    pub pauses: AtomicU64,
    pub other_errors: AtomicU64,
    pub published_acked: AtomicU64,
    pub published_refused: AtomicU64,
    pub published_unknown: AtomicU64,
    pub publisher_lag_resets: AtomicU64,
}

/// Who first put a payload at a position.
#[derive(Debug, Clone, Copy)]
pub enum Origin {
    Ack,
    // Read through Debug, in the report of a lie.
    #[allow(dead_code)]
    Client(usize),
}

#[derive(Default)]
struct RoomTruth {
    names: Vec<String>,
    ids: HashMap<String, u32>,
    data: HashMap<(u32, u64), (u64, Origin)>,
    /// Where each payload was first seen: one publish at two positions is a duplicate.
    at: HashMap<u64, (u32, u64)>,
    max: HashMap<u32, u64>,
    conflicts: HashSet<(u32, u64)>,
}

impl RoomTruth {
    fn id(&mut self, epoch: &str) -> u32 {
        if let Some(&i) = self.ids.get(epoch) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(epoch.to_string());
        self.ids.insert(epoch.to_string(), i);
        i
    }
    fn bump(&mut self, e: u32, o: u64) {
        let m = self.max.entry(e).or_default();
        *m = (*m).max(o);
    }
}

/// An epoch change seen in a message with no announcement before it.
#[derive(Debug, Clone)]
pub struct EpochSwitch {
    pub client: usize,
    pub room: usize,
    pub from: (u32, u64),
    pub to: (u32, u64),
    pub at: f64,
    pub last_fault: String,
    pub recent: Vec<String>,
}

pub struct Ctx {
    pub t0: Instant,
    pub rooms: Vec<String>,
    truth: Vec<Mutex<RoomTruth>>,
    pub violations: Mutex<Vec<Violation>>,
    pub switches: Mutex<Vec<EpochSwitch>>,
    pub stats: Stats,
    pub last_fault: Mutex<String>,
    /// Per client: stay away until this many ms after `t0` (`client_pause`).
    pub pause_until: Vec<AtomicU64>,
}

impl Ctx {
    pub fn new(rooms: Vec<String>) -> Ctx {
        Ctx::with_clients(rooms, 0)
    }

    pub fn with_clients(rooms: Vec<String>, clients: usize) -> Ctx {
        let truth = rooms.iter().map(|_| Mutex::default()).collect();
        Ctx {
            t0: Instant::now(),
            rooms,
            truth,
            violations: Mutex::default(),
            switches: Mutex::default(),
            stats: Stats::default(),
            last_fault: Mutex::new("none yet".into()),
            pause_until: (0..clients).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Whether client `i` is to stay away now.
    pub fn paused(&self, i: usize) -> bool {
        self.pause_until.get(i).is_some_and(|p| p.load(Ordering::Relaxed) > self.now_ms())
    }

    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    pub fn epoch_id(&self, room: usize, epoch: &str) -> u32 {
        self.truth[room].lock().unwrap().id(epoch)
    }

    pub fn epoch_name(&self, room: usize, id: u32) -> String {
        self.truth[room].lock().unwrap().names[id as usize].clone()
    }

    /// The payload first seen at a position.
    pub fn seq_at(&self, room: usize, id: u32, offset: u64) -> Option<u64> {
        self.truth[room].lock().unwrap().data.get(&(id, offset)).map(|d| d.0)
    }

    pub fn max_offset(&self, room: usize, id: u32) -> u64 {
        self.truth[room].lock().unwrap().max.get(&id).copied().unwrap_or(0)
    }

    /// Records that `seq` is at (epoch, offset) of `room`. Returns the
    /// epoch's id and, when a different payload is already there (first
    /// time for this position), the description of that lie (rule 4); or,
    /// when this payload was already seen at another position (one publish
    /// stored twice), a duplicate.
    pub fn record(&self, room: usize, epoch: &str, offset: u64, seq: u64, by: Origin) -> (u32, Option<(Kind, String)>) {
        let mut guard = self.truth[room].lock().unwrap();
        let t = &mut *guard;
        let id = t.id(epoch);
        t.bump(id, offset);
        let conflict = match t.data.get(&(id, offset)).copied() {
            None => {
                t.data.insert((id, offset), (seq, by));
                None
            }
            Some((s, first)) if s != seq && t.conflicts.insert((id, offset)) => Some((
                Kind::Lie,
                format!(
                    "position {}:{offset} carries seq {seq} here ({by:?}) but seq {s} for {first:?}: an offset reused",
                    short(epoch)
                ),
            )),
            Some(_) => None,
        };
        if seq == u64::MAX {
            return (id, conflict);
        }
        let twice = match t.at.get(&seq).copied() {
            None => {
                t.at.insert(seq, (id, offset));
                None
            }
            Some((e2, o2)) if (e2, o2) != (id, offset) && t.conflicts.insert((u32::MAX, seq)) => {
                let other = t.names[e2 as usize].clone();
                Some((
                    Kind::Duplicate,
                    format!(
                        "seq {seq} (one publish) at {}:{offset} ({by:?}) and before at {}:{o2}",
                        short(epoch),
                        short(&other)
                    ),
                ))
            }
            Some(_) => None,
        };
        (id, conflict.or(twice))
    }

    /// A position the server announced (subscribed, gap): it exists.
    pub fn note_position(&self, room: usize, epoch: &str, offset: u64) -> u32 {
        let mut t = self.truth[room].lock().unwrap();
        let id = t.id(epoch);
        t.bump(id, offset);
        id
    }

    pub fn violation(&self, kind: Kind, client: usize, room: usize, detail: String, recent: Vec<String>) {
        let v = Violation {
            kind,
            client,
            room: self.rooms[room].clone(),
            at: self.now(),
            detail,
            last_fault: self.last_fault.lock().unwrap().clone(),
            recent,
        };
        let mut all = self.violations.lock().unwrap();
        if all.len() < 20 {
            let who = if client == usize::MAX { "publisher".to_string() } else { format!("client {client}") };
            eprintln!("VIOLATION {} {who} room {} at {:.1}s: {}", kind.name(), v.room, v.at, v.detail);
        }
        all.push(v);
    }

    /// Judges the epoch changes met without an announcement (rule 3), now
    /// that the ground truth is complete.
    pub fn judge_switches(&self) {
        let switches = std::mem::take(&mut *self.switches.lock().unwrap());
        for s in switches {
            let old_max = self.max_offset(s.room, s.from.0);
            let (old, new) = (self.epoch_name(s.room, s.from.0), self.epoch_name(s.room, s.to.0));
            if old_max > s.from.1 || s.to.1 != 1 {
                let v = Violation {
                    kind: Kind::SilentLoss,
                    client: s.client,
                    room: self.rooms[s.room].clone(),
                    at: s.at,
                    detail: format!(
                        "epoch changed {}:{} -> {}:{} without gap or recovered:false; the old epoch went up to {} \
                         (lost {} of the old epoch, {} of the new)",
                        short(&old),
                        s.from.1,
                        short(&new),
                        s.to.1,
                        old_max,
                        old_max.saturating_sub(s.from.1),
                        s.to.1 - 1
                    ),
                    last_fault: s.last_fault,
                    recent: s.recent,
                };
                self.violations.lock().unwrap().push(v);
            }
        }
    }

    pub fn counts(&self) -> Vec<(Kind, usize)> {
        let mut m: HashMap<Kind, usize> = HashMap::new();
        for v in self.violations.lock().unwrap().iter() {
            *m.entry(v.kind).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort();
        v
    }
}

pub fn short(epoch: &str) -> &str {
    &epoch[..epoch.len().min(10)]
}

/// Offsets seen in one epoch, as sorted disjoint inclusive ranges.
#[derive(Default, Debug)]
struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    fn contains(&self, o: u64) -> bool {
        let i = self.0.partition_point(|&(_, b)| b < o);
        i < self.0.len() && self.0[i].0 <= o
    }
    fn insert(&mut self, o: u64) {
        if let Some(last) = self.0.last_mut()
            && last.1 + 1 == o
        {
            last.1 = o;
            return;
        }
        let i = self.0.partition_point(|&(_, b)| b < o);
        if i < self.0.len() && self.0[i].0 <= o {
            return;
        }
        self.0.insert(i, (o, o));
        // Merge with the neighbours.
        if i + 1 < self.0.len() && self.0[i + 1].0 == o + 1 {
            self.0[i].1 = self.0[i + 1].1;
            self.0.remove(i + 1);
        }
        if i > 0 && self.0[i - 1].1 + 1 == o {
            self.0[i - 1].1 = self.0[i].1;
            self.0.remove(i);
        }
    }
}

/// One event of a stream, kept for the report of a violation.
#[derive(Clone, Copy)]
struct Ev {
    t: f32,
    conn: u32,
    node: u8,
    what: &'static str,
    epoch: u32,
    offset: u64,
    extra: u64,
}

/// One client's view of one room over every connection.
pub struct Stream {
    pub client: usize,
    pub room: usize,
    /// The position: last offset delivered (or announced) in its epoch.
    pub last: Option<(u32, u64)>,
    seen: HashMap<u32, RangeSet>,
    /// After `recovered:true`: the replay runs up to this position.
    replay_until: Option<(u32, u64)>,
    recent: VecDeque<Ev>,
    /// The position, for the orchestrator's catch-up check.
    pub shared: Arc<Mutex<Option<(u32, u64)>>>,
    pub delivered: u64,
    /// Whether this connection has had its `subscribed` for the room.
    pub live: bool,
    pub conn: u32,
    pub node: u8,
}

impl Stream {
    pub fn new(client: usize, room: usize) -> Stream {
        Stream {
            client,
            room,
            last: None,
            seen: HashMap::new(),
            replay_until: None,
            recent: VecDeque::with_capacity(24),
            shared: Arc::default(),
            delivered: 0,
            live: false,
            conn: 0,
            node: 0,
        }
    }

    fn push(&mut self, ctx: &Ctx, what: &'static str, epoch: u32, offset: u64, extra: u64) {
        if self.recent.len() == 24 {
            self.recent.pop_front();
        }
        self.recent.push_back(Ev { t: ctx.now() as f32, conn: self.conn, node: self.node, what, epoch, offset, extra });
    }

    pub fn recent(&self, ctx: &Ctx) -> Vec<String> {
        let mut names: HashMap<u32, String> = HashMap::new();
        self.recent
            .iter()
            .map(|e| {
                let name = names.entry(e.epoch).or_insert_with(|| {
                    if e.epoch == u32::MAX {
                        "-".into()
                    } else {
                        short(&ctx.epoch_name(self.room, e.epoch)).to_string()
                    }
                });
                let mut s = format!("t={:.3} conn#{} node{} {} {}:{}", e.t, e.conn, e.node, e.what, name, e.offset);
                if e.extra != u64::MAX {
                    let _ = write!(s, " ({})", e.extra);
                }
                s
            })
            .collect()
    }

    fn set_last(&mut self, p: (u32, u64)) {
        self.last = Some(p);
        *self.shared.lock().unwrap() = Some(p);
    }

    fn violate(&self, ctx: &Ctx, kind: Kind, detail: String) {
        ctx.violation(kind, self.client, self.room, detail, self.recent(ctx));
    }

    /// The `since` to send: the stream's position.
    pub fn since(&self, ctx: &Ctx) -> Option<(String, u64)> {
        self.last.map(|(e, o)| (ctx.epoch_name(self.room, e), o))
    }

    /// A new connection: nothing subscribed on it yet.
    pub fn new_connection(&mut self, conn: u32, node: u8) {
        self.conn = conn;
        self.node = node;
        self.live = false;
        // A replay cut short by the connection's end is not a skip.
        self.replay_until = None;
    }

    /// A `subscribed` reply to a subscribe sent with `since`.
    pub fn on_subscribed(&mut self, ctx: &Ctx, v: &Value, since: Option<(u32, u64)>) {
        ctx.stats.subscribes.fetch_add(1, Ordering::Relaxed);
        self.live = true;
        let (Some(epoch), Some(offset)) = (v["epoch"].as_str(), v["offset"].as_u64()) else {
            self.violate(ctx, Kind::Protocol, format!("subscribed without a position in a history room: {v}"));
            return;
        };
        let e = ctx.note_position(self.room, epoch, offset);
        let Some(since) = since else {
            self.push(ctx, "subscribed", e, offset, u64::MAX);
            self.set_last((e, offset));
            return;
        };
        match v.get("recovered").and_then(Value::as_bool) {
            Some(true) => {
                ctx.stats.recovered_true.fetch_add(1, Ordering::Relaxed);
                self.push(ctx, "recovered:true", e, offset, since.1);
                if e != since.0 || offset < since.1 {
                    let se = ctx.epoch_name(self.room, since.0);
                    self.violate(
                        ctx,
                        Kind::Lie,
                        format!(
                            "recovered:true at {}:{offset} for since {}:{}: not the epoch asked for or below it",
                            short(epoch),
                            short(&se),
                            since.1
                        ),
                    );
                    self.set_last((e, offset));
                } else {
                    // The stream's position stays `since`; the replay follows.
                    self.set_last(since);
                    self.replay_until = (offset > since.1).then_some((e, offset));
                }
            }
            r => {
                if r.is_none() {
                    self.violate(ctx, Kind::Protocol, format!("subscribe with since got no `recovered`: {v}"));
                }
                ctx.stats.recovered_false.fetch_add(1, Ordering::Relaxed);
                self.push(ctx, "recovered:false", e, offset, since.1);
                self.replay_until = None;
                self.set_last((e, offset));
            }
        }
    }

    pub fn on_gap(&mut self, ctx: &Ctx, v: &Value) {
        ctx.stats.gaps.fetch_add(1, Ordering::Relaxed);
        let (Some(epoch), Some(offset)) = (v["epoch"].as_str(), v["offset"].as_u64()) else {
            self.violate(ctx, Kind::Protocol, format!("gap without a position: {v}"));
            return;
        };
        let e = ctx.note_position(self.room, epoch, offset);
        self.push(ctx, "gap", e, offset, u64::MAX);
        self.replay_until = None;
        // A gap at or behind where the stream already is moves nothing.
        match self.last {
            Some((le, lo)) if le == e && lo >= offset => {
                if lo > offset {
                    ctx.stats.gaps_backward.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => self.set_last((e, offset)),
        }
    }

    pub fn on_message(&mut self, ctx: &Ctx, v: &Value) {
        ctx.stats.messages.fetch_add(1, Ordering::Relaxed);
        self.delivered += 1;
        let (Some(epoch), Some(o)) = (v["epoch"].as_str(), v["offset"].as_u64()) else {
            self.violate(ctx, Kind::Protocol, format!("message without a position in a history room: {v}"));
            return;
        };
        let seq = v["data"]["s"].as_u64().unwrap_or(u64::MAX);
        let (e, lie) = ctx.record(self.room, epoch, o, seq, Origin::Client(self.client));
        self.push(ctx, "msg", e, o, seq);
        if let Some((kind, what)) = lie {
            self.violate(ctx, kind, what);
        }
        if !self.live {
            self.violate(
                ctx,
                Kind::Protocol,
                format!("message {}:{o} before this connection's `subscribed`", short(epoch)),
            );
        }
        if self.seen.get(&e).is_some_and(|r| r.contains(o)) {
            let first = ctx.seq_at(self.room, e, o);
            let what = if first == Some(seq) {
                "the same payload".to_string()
            } else {
                format!("another payload (the position's first: seq {first:?})")
            };
            self.violate(ctx, Kind::Duplicate, format!("{}:{o} (seq {seq}) delivered again, {what}", short(epoch)));
            return;
        }
        self.seen.entry(e).or_default().insert(o);
        match self.last {
            None => self.set_last((e, o)),
            Some((le, lo)) if le == e => {
                if o == lo + 1 {
                    self.set_last((e, o));
                } else if o > lo + 1 {
                    let in_replay = self.replay_until.is_some_and(|(re, ro)| re == e && lo < ro);
                    let kind = if in_replay { Kind::Lie } else { Kind::SilentLoss };
                    self.violate(
                        ctx,
                        kind,
                        format!(
                            "skipped {}:{}..={} (next was {o}, seq {seq}){}",
                            short(epoch),
                            lo + 1,
                            o - 1,
                            if in_replay { " inside a replay promised by recovered:true" } else { "" }
                        ),
                    );
                    self.set_last((e, o));
                } else {
                    self.violate(
                        ctx,
                        Kind::OutOfOrder,
                        format!("{}:{o} (seq {seq}) after {}:{lo}", short(epoch), short(epoch)),
                    );
                }
            }
            Some((le, lo)) => {
                ctx.switches.lock().unwrap().push(EpochSwitch {
                    client: self.client,
                    room: self.room,
                    from: (le, lo),
                    to: (e, o),
                    at: ctx.now(),
                    last_fault: ctx.last_fault.lock().unwrap().clone(),
                    recent: self.recent(ctx),
                });
                self.set_last((e, o));
            }
        }
        if self.replay_until.is_some_and(|(re, ro)| re != e || o >= ro) {
            self.replay_until = None;
        }
    }
}
