//! Idempotency keys of `POST /api/publish` (PROTOCOL.md §12): a repeat
//! with the same `idempotency_key` and the same targets within
//! `TTL` of the first call's reply, on any node, is answered with that reply
//! (byte for byte) and delivers nothing.
//!
//! A call *claims* its key before it publishes (`Idempotency::claim`):
//!
//! - nobody has it: the call does the work (`Claimed::Go`), then keeps its
//!   reply under the key for `TTL` (`done` with the reply) or, if the
//!   backplane refused a target, drops the claim (`done` without one), so
//!   that a retry does the whole call again;
//! - a call with other targets has it: `Claimed::Conflict` (the route
//!   answers 409); the fingerprint is of the targets only (their kind,
//!   `room`/`user`/`rooms`/`users`, and the names in request order), not of
//!   `data`;
//! - a call with the same targets has it and is done: `Claimed::Replay`;
//! - it is still in flight: the claim is asked again every `POLL` for up to
//!   `IN_FLIGHT_WAIT`, and then `Claimed::InFlight` (409). A claim whose
//!   caller died (its node crashed) lapses after `PENDING_TTL`.
//!
//! Where the records live:
//!
//! - With Redis: one hash per key, `{<prefix>idem:<hex of K>}` (hex, so no
//!   `{`/`}` of the caller's key can move the hash tag), on the primary that
//!   owns its slot, written by the scripts in `scripts/` over the shard's
//!   publisher links (`history::redis_route::OwnerRoute`), so every
//!   topology routes them and every node sees the same record. Redis expires
//!   it (`PENDING_TTL` in flight, `TTL` once done); the node holds nothing.
//! - Standalone: one table for the whole process (`LOCAL`, a `Mutex` around
//!   a map), since an API call lands on any shard. The server API is off
//!   the hot path and each call holds the lock for a map lookup or two, so a
//!   lock is simpler than an owner shard reached through the inbox and
//!   costs nothing that matters. Bounded: at most `MAX_ENTRIES` records and
//!   `MAX_BYTES` of keys and replies; past either the oldest claim is
//!   evicted first (a repeat of an evicted key is then a new call).
//!
//! A stored reply is bounded by the call: at most 1000 results.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

use crate::bus::Bus;
use crate::history::redis_route::{OwnerRoute, Script};
use crate::protocol::Epoch;
use crate::rt::Oneshot;

/// A done call's reply answers repeats for this long.
pub const TTL: Duration = Duration::from_secs(300);
/// A claim still in flight lapses after this (its caller is gone): longer
/// than any call takes (its publishes are bounded by 5 s).
pub const PENDING_TTL: Duration = Duration::from_secs(30);
/// How long a repeat waits for a first call still in flight.
pub const IN_FLIGHT_WAIT: Duration = Duration::from_secs(10);
/// How often a waiting repeat asks again.
const POLL: Duration = Duration::from_millis(20);
/// How long a script's reply is waited for before the call is refused.
const REDIS_WAIT: Duration = Duration::from_secs(2);
/// Longest key: 64 bytes (§12).
pub const MAX_KEY: usize = 64;
/// Standalone caps: records, and bytes of keys and replies.
pub const MAX_ENTRIES: usize = 100_000;
pub const MAX_BYTES: usize = 64 << 20;

static BEGIN: Script = Script::new(include_str!("scripts/begin.lua"));
static FINISH: Script = Script::new(include_str!("scripts/finish.lua"));

/// What a call's targets are, for telling a repeat from another call:
/// SHA1 (hex) of the kind and the names in order.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn of<'a>(kind: &str, targets: impl Iterator<Item = &'a str>) -> Fingerprint {
        let mut h = sha1_smol::Sha1::new();
        h.update(kind.as_bytes());
        for t in targets {
            // Names never hold a newline (`is_valid_name`).
            h.update(b"\n");
            h.update(t.as_bytes());
        }
        Fingerprint(h.digest().to_string())
    }
}

/// The answer to a claim.
pub enum Claimed {
    /// This call does the work; `Idempotency::done` ends the claim.
    Go(Claim),
    /// The first call's reply.
    Replay(Bytes),
    /// The key was used with other targets.
    Conflict,
    /// The first call is still in flight after `IN_FLIGHT_WAIT`.
    InFlight,
    /// Redis did not answer: nothing was done.
    Unavailable,
}

/// A key this call holds.
pub struct Claim {
    key: Box<str>,
    token: u64,
}

/// Claims' tokens, unique in the process (with Redis, with the node's epoch).
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// One per shard.
pub enum Idempotency {
    Local,
    Redis { route: Rc<OwnerRoute>, prefix: Arc<str> },
}

enum Begin {
    New,
    Conflict,
    Pending,
    Done(Bytes),
    Unavailable,
}

impl Idempotency {
    pub fn new(bus: &Bus) -> Idempotency {
        match bus {
            Bus::Local => Idempotency::Local,
            Bus::Redis(r) => {
                Idempotency::Redis { route: OwnerRoute::new(r.publisher().clone()), prefix: r.prefix().clone() }
            }
        }
    }

    /// Claims `key` for a call with targets `fp` (see the module doc).
    pub async fn claim(&self, key: &str, fp: &Fingerprint) -> Claimed {
        let end = Instant::now() + IN_FLIGHT_WAIT;
        loop {
            let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
            match self.begin(key, fp, token).await {
                Begin::New => return Claimed::Go(Claim { key: Box::from(key), token }),
                Begin::Conflict => return Claimed::Conflict,
                Begin::Done(reply) => return Claimed::Replay(reply),
                Begin::Unavailable => return Claimed::Unavailable,
                Begin::Pending if Instant::now() + POLL < end => monoio::time::sleep(POLL).await,
                Begin::Pending => return Claimed::InFlight,
            }
        }
    }

    /// Ends a claim: `Some(reply)` keeps the reply for `TTL`, `None` (the
    /// call failed) drops the claim. Waits (bounded) for Redis, so that a
    /// repeat sent after the reply finds the record done.
    pub async fn done(&self, claim: Claim, reply: Option<&Bytes>) {
        match self {
            Idempotency::Local => LOCAL.lock().unwrap_or_else(|p| p.into_inner()).finish(&claim, reply, Instant::now()),
            Idempotency::Redis { route, prefix } => {
                let (channel, rkey) = redis_key(prefix, &claim.key);
                let token = redis_token(claim.token);
                let ttl = TTL.as_millis().to_string();
                let (sign, body): (&[u8], &[u8]) = match reply {
                    Some(r) => (b"+", r),
                    None => (b"-", b""),
                };
                let args: [&[u8]; 6] = [b"1", &rkey, token.as_bytes(), sign, body, ttl.as_bytes()];
                let slot: Oneshot<()> = Oneshot::default();
                let fill = slot.clone();
                if route.run(channel, &FINISH, &args, Box::new(move |_| fill.fill(()))).is_ok() {
                    let _ = monoio::time::timeout(REDIS_WAIT, slot.wait()).await;
                }
            }
        }
    }

    async fn begin(&self, key: &str, fp: &Fingerprint, token: u64) -> Begin {
        match self {
            Idempotency::Local => LOCAL.lock().unwrap_or_else(|p| p.into_inner()).begin(key, fp, token, Instant::now()),
            Idempotency::Redis { route, prefix } => {
                let (channel, rkey) = redis_key(prefix, key);
                let token = redis_token(token);
                let ttl = PENDING_TTL.as_millis().to_string();
                let args: [&[u8]; 5] = [b"1", &rkey, fp.0.as_bytes(), token.as_bytes(), ttl.as_bytes()];
                let slot: Oneshot<Begin> = Oneshot::default();
                let fill = slot.clone();
                let done =
                    Box::new(move |r: Result<BytesFrame, _>| fill.fill(r.map_or(Begin::Unavailable, parse_begin)));
                if route.run(channel, &BEGIN, &args, done).is_err() {
                    return Begin::Unavailable;
                }
                monoio::time::timeout(REDIS_WAIT, slot.wait()).await.unwrap_or(Begin::Unavailable)
            }
        }
    }
}

/// The record's route (a channel name hashing like the key) and its key.
fn redis_key(prefix: &str, key: &str) -> (Bytes, Vec<u8>) {
    let mut channel = format!("{prefix}idem:");
    for b in key.bytes() {
        channel.push_str(&format!("{b:02x}"));
    }
    let rkey = format!("{{{channel}}}").into_bytes();
    (Bytes::from(channel), rkey)
}

fn redis_token(n: u64) -> String {
    format!("{}.{n}", Epoch::node().as_str())
}

fn parse_begin(f: BytesFrame) -> Begin {
    let BytesFrame::Array(a) = f else {
        if let BytesFrame::Error(e) = &f {
            tracing::warn!("idempotency script refused: {e}");
        }
        return Begin::Unavailable;
    };
    match (a.first(), a.get(1)) {
        (Some(BytesFrame::BulkString(k)), _) if &k[..] == b"new" => Begin::New,
        (Some(BytesFrame::BulkString(k)), _) if &k[..] == b"conflict" => Begin::Conflict,
        (Some(BytesFrame::BulkString(k)), _) if &k[..] == b"pending" => Begin::Pending,
        (Some(BytesFrame::BulkString(k)), Some(BytesFrame::BulkString(r))) if &k[..] == b"done" => {
            Begin::Done(r.clone())
        }
        _ => Begin::Unavailable,
    }
}

// ---- standalone ------------------------------------------------------------------

/// The process's records (standalone: one node, one process).
static LOCAL: Mutex<Table> = Mutex::new(Table::new());

/// What a record costs beyond its key and reply (the entry, its
/// fingerprint, the map's and the order's slots), rounded up.
const ENTRY_OVERHEAD: usize = 256;

struct Table {
    map: Option<HashMap<Box<str>, Entry>>,
    /// Claims, oldest first: `(key, token)`; one whose record is gone or
    /// was claimed again is stale and skipped.
    order: VecDeque<(Box<str>, u64)>,
    /// Keys and replies held, with `ENTRY_OVERHEAD` each.
    bytes: usize,
}

struct Entry {
    fp: Fingerprint,
    token: u64,
    expires: Instant,
    reply: Option<Bytes>,
}

impl Entry {
    fn cost(&self, key: &str) -> usize {
        2 * key.len() + self.reply.as_ref().map_or(0, Bytes::len) + ENTRY_OVERHEAD
    }
}

impl Table {
    const fn new() -> Table {
        Table { map: None, order: VecDeque::new(), bytes: 0 }
    }

    fn begin(&mut self, key: &str, fp: &Fingerprint, token: u64, now: Instant) -> Begin {
        self.sweep(now);
        let map = self.map.get_or_insert_with(HashMap::default);
        if let Some(e) = map.get(key).filter(|e| e.expires > now) {
            return match &e.reply {
                _ if e.fp != *fp => Begin::Conflict,
                Some(reply) => Begin::Done(reply.clone()),
                None => Begin::Pending,
            };
        }
        self.remove(key);
        let e = Entry { fp: fp.clone(), token, expires: now + PENDING_TTL, reply: None };
        self.make_room(e.cost(key));
        self.bytes += e.cost(key);
        self.map.get_or_insert_with(HashMap::default).insert(Box::from(key), e);
        self.order.push_back((Box::from(key), token));
        Begin::New
    }

    fn finish(&mut self, claim: &Claim, reply: Option<&Bytes>, now: Instant) {
        if self.live(&claim.key, claim.token).is_none() {
            return;
        }
        let Some(reply) = reply else {
            self.remove(&claim.key);
            return;
        };
        let Some(e) = self.map.as_mut().and_then(|m| m.get_mut(&claim.key)) else { return };
        e.reply = Some(reply.clone());
        e.expires = now + TTL;
        self.bytes += reply.len();
        self.make_room(0);
    }

    fn remove(&mut self, key: &str) {
        if let Some(e) = self.map.as_mut().and_then(|m| m.remove(key)) {
            self.bytes -= e.cost(key);
        }
    }

    /// Is the claim `(key, token)` still the record's?
    fn live(&self, key: &str, token: u64) -> Option<&Entry> {
        self.map.as_ref()?.get(key).filter(|e| e.token == token)
    }

    /// Drops the expired records at the front, and the stale claims.
    fn sweep(&mut self, now: Instant) {
        while let Some((key, token)) = self.order.front() {
            match self.live(key, *token) {
                Some(e) if e.expires > now => break,
                Some(_) => {
                    let key = key.clone();
                    self.remove(&key);
                }
                None => {}
            }
            self.order.pop_front();
        }
        // Stale claims behind a live one (a failed call's, a re-claimed
        // key's): compacted before they outnumber the records.
        if self.order.len() > 2 * MAX_ENTRIES {
            let order = std::mem::take(&mut self.order);
            self.order = order.into_iter().filter(|(k, t)| self.live(k, *t).is_some()).collect();
        }
    }

    /// Evicts the oldest records until one more of `cost` fits.
    fn make_room(&mut self, cost: usize) {
        let len = |t: &Table| t.map.as_ref().map_or(0, HashMap::len);
        while (len(self) + usize::from(cost > 0) > MAX_ENTRIES || self.bytes + cost > MAX_BYTES)
            && let Some((key, token)) = self.order.pop_front()
        {
            if self.live(&key, token).is_some() {
                self.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(t: &str) -> Fingerprint {
        Fingerprint::of("users", [t].into_iter())
    }

    #[test]
    fn a_key_is_claimed_once_replayed_and_conflicts_with_other_targets() {
        let mut t = Table::new();
        let now = Instant::now();
        assert!(matches!(t.begin("k", &fp("a"), 1, now), Begin::New));
        assert!(matches!(t.begin("k", &fp("a"), 2, now), Begin::Pending));
        assert!(matches!(t.begin("k", &fp("b"), 3, now), Begin::Conflict));
        t.finish(&Claim { key: "k".into(), token: 1 }, Some(&Bytes::from_static(b"r")), now);
        assert!(matches!(t.begin("k", &fp("a"), 4, now), Begin::Done(r) if &r[..] == b"r"));
        // Expired: a new call.
        assert!(matches!(t.begin("k", &fp("a"), 5, now + TTL + Duration::from_secs(1)), Begin::New));
    }

    #[test]
    fn a_failed_call_drops_its_claim_and_a_lapsed_claim_is_taken_again() {
        let mut t = Table::new();
        let now = Instant::now();
        assert!(matches!(t.begin("k", &fp("a"), 1, now), Begin::New));
        t.finish(&Claim { key: "k".into(), token: 1 }, None, now);
        assert!(matches!(t.begin("k", &fp("a"), 2, now), Begin::New));
        let later = now + PENDING_TTL + Duration::from_secs(1);
        assert!(matches!(t.begin("k", &fp("a"), 3, later), Begin::New));
        // The lapsed claim's finish stores nothing.
        t.finish(&Claim { key: "k".into(), token: 2 }, Some(&Bytes::from_static(b"old")), later);
        assert!(matches!(t.begin("k", &fp("a"), 4, later), Begin::Pending));
        assert_eq!(t.bytes, 2 + ENTRY_OVERHEAD);
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_oldest() {
        let mut t = Table::new();
        let now = Instant::now();
        let big = Bytes::from(vec![b'x'; 1 << 20]);
        for i in 0..100u64 {
            let key = format!("k{i}");
            assert!(matches!(t.begin(&key, &fp("a"), i + 1, now), Begin::New));
            t.finish(&Claim { key: key.into(), token: i + 1 }, Some(&big), now);
            assert!(t.bytes <= MAX_BYTES);
        }
        assert!(matches!(t.begin("k0", &fp("a"), 1000, now), Begin::New), "the oldest went first");
        assert!(matches!(t.begin("k99", &fp("a"), 1001, now), Begin::Done(_)));
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            t.begin(&format!("n{i}"), &fp("a"), 2000 + i, now);
        }
        assert!(t.map.as_ref().unwrap().len() <= MAX_ENTRIES);
        assert!(t.order.len() <= 2 * MAX_ENTRIES + 1);
    }

    #[test]
    fn redis_keys_hash_like_their_route() {
        let (channel, key) = redis_key("cc:", "a}{b");
        assert_eq!(&channel[..], b"cc:idem:617d7b62");
        assert_eq!(key, b"{cc:idem:617d7b62}");
    }
}
