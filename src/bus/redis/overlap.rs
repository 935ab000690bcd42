//! ⑦ The copies two Redis servers deliver of one message when a channel
//! moves from one to the other: a reader's record of what each server
//! delivered, and the fence that drops a second copy after a move.
//!
//! The servers of a shard (Cluster: a primary and its replicas; Sentinel:
//! the primary and the replicas it streams to) each deliver every message
//! published to any of them, each at its own time: a Cluster node passes
//! an `SPUBLISH` to its shard over the cluster bus, Sentinel's primary in
//! its replication stream. When a failover moves a channel (or a stale slot
//! map, put right a moment later, moves it there and back), the reader
//! listens at one server and then at another, and the second may deliver
//! a message the first already did: seen in tests, the new primary
//! delivered two messages 40 ms after the old one, just after the reader
//! had subscribed there. Plain rooms carry no position that could tell the
//! copy, so the reader keeps a record of the last `RING` messages (a hash
//! of channel and payload, and which server brought each). When its view
//! moves channels, and again when a connection is made (the new server's
//! copies can only come once the reader listens there, however long the
//! reconnect took), it arms a fence for `FENCE_FOR`: a message that a
//! different server delivered within the last `KEEP` is a copy, dropped
//! once per earlier delivery (counted in `redis_duplicates_dropped_total`).
//!
//! A message published twice with the same bytes, once before the move and
//! once after, is also dropped: plain rooms are at-most-once, and may lose
//! what is published during a move anyway; history rooms' messages carry
//! their position, so their bytes never repeat. A record that has turned
//! over faster than the overlap lasted (more than `RING` messages in it)
//! lets a copy through: the bound is the record's memory, 16 bytes per
//! message, allocated as messages arrive.
//!
//! Only where a channel can move between servers that pass messages to
//! each other (Cluster, Sentinel); a node on one Redis or on several
//! independent ones has nothing to record (`Overlap::new(false)`).

use std::hash::Hasher;
use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap, FxHasher};

/// Messages remembered (the last ones, across every channel of the reader).
const RING: usize = 16 * 1024;
/// A delivery older than this at a move cannot be copied by the new server.
const KEEP: Duration = Duration::from_secs(5);
/// How long after a move a copy may still come.
const FENCE_FOR: Duration = Duration::from_secs(2);

/// One delivery: the message's key, and the server and time in one word
/// (`NODE_BITS` of server number, the rest milliseconds since `origin`).
#[derive(Clone, Copy)]
struct Seen {
    key: u64,
    node_at: u64,
}

const NODE_BITS: u32 = 16;

impl Seen {
    fn node(self) -> u16 {
        (self.node_at & ((1 << NODE_BITS) - 1)) as u16
    }
    fn at_ms(self) -> u64 {
        self.node_at >> NODE_BITS
    }
}

/// What the fence holds for one key: the server that delivered it, and
/// how many more copies from other servers to drop.
struct Held {
    node: u16,
    copies: u32,
}

pub struct Overlap {
    on: bool,
    origin: Instant,
    /// The last `RING` deliveries, oldest at `next` once full.
    ring: Vec<Seen>,
    next: usize,
    /// Server names, numbered by first sight (a handful per cluster).
    nodes: Vec<Box<str>>,
    fence: FxHashMap<u64, Held>,
    fence_until: Option<Instant>,
}

impl Overlap {
    pub fn new(on: bool) -> Overlap {
        Overlap {
            on,
            origin: Instant::now(),
            ring: Vec::new(),
            next: 0,
            nodes: Vec::new(),
            fence: FxHashMap::default(),
            fence_until: None,
        }
    }

    /// The number `admit` knows server `name` by.
    pub fn node_id(&mut self, name: &str) -> u16 {
        if let Some(i) = self.nodes.iter().position(|n| &**n == name) {
            return i as u16;
        }
        // Past 65,536 names (never, for a cluster's servers) they share the last number.
        if self.nodes.len() <= u16::MAX as usize {
            self.nodes.push(name.into());
        }
        (self.nodes.len() - 1) as u16
    }

    /// Whether to deliver this message, which server `node` brought on
    /// `channel`: `false` for a copy of one another server delivered
    /// before a move (see the module doc). Admitted messages are recorded.
    pub fn admit(&mut self, node: u16, channel: &[u8], payload: &[u8], now: Instant) -> bool {
        if !self.on {
            return true;
        }
        let key = key(channel, payload);
        if let Some(until) = self.fence_until {
            if now < until {
                if let Some(h) = self.fence.get_mut(&key)
                    && h.node != node
                    && h.copies > 0
                {
                    h.copies -= 1;
                    return false;
                }
            } else {
                self.fence_until = None;
                self.fence = FxHashMap::default();
            }
        }
        let at = now.saturating_duration_since(self.origin).as_millis() as u64;
        let seen = Seen { key, node_at: (at << NODE_BITS) | u64::from(node) };
        if self.ring.len() < RING {
            self.ring.push(seen);
        } else {
            self.ring[self.next] = seen;
            self.next = (self.next + 1) % RING;
        }
        true
    }

    /// Channels may have moved to another server (the view changed, or a
    /// connection was made): for `FENCE_FOR`, copies of what was delivered
    /// in the last `KEEP` are dropped when another server brings them.
    pub fn arm(&mut self, now: Instant) {
        if !self.on || self.ring.is_empty() {
            return;
        }
        let now_ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        let keep = KEEP.as_millis() as u64;
        let mut fence: FxHashMap<u64, Held> = FxHashMap::default();
        // Oldest first (`next` is the oldest once the ring has turned over).
        let (newer, older) = self.ring.split_at(self.next);
        for s in older.iter().chain(newer).filter(|s| now_ms.saturating_sub(s.at_ms()) <= keep) {
            let h = fence.entry(s.key).or_insert(Held { node: s.node(), copies: 0 });
            // The same bytes from two servers already: keep the later's number.
            h.node = s.node();
            h.copies += 1;
        }
        self.fence = fence;
        self.fence_until = Some(now + FENCE_FOR);
    }
}

/// A message's identity for the fence: its channel and payload, hashed.
fn key(channel: &[u8], payload: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(channel);
    h.write(payload);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH: &[u8] = b"cc:room:r";

    #[test]
    fn after_a_move_a_copy_from_the_new_server_is_dropped_once_per_delivery() {
        let t = Instant::now();
        let mut o = Overlap::new(true);
        let (a, b) = (o.node_id("127.0.0.1:7000"), o.node_id("127.0.0.1:7001"));
        assert_ne!(a, b);
        assert_eq!(o.node_id("127.0.0.1:7000"), a, "a name keeps its number");
        assert!(o.admit(a, CH, b"m1", t));
        assert!(o.admit(a, CH, b"m2", t));
        assert!(o.admit(a, CH, b"m2", t), "the same bytes twice from one server are two messages");
        o.arm(t);
        assert!(!o.admit(b, CH, b"m1", t), "m1 again, from the new server: a copy");
        assert!(o.admit(b, CH, b"m1", t), "a third m1 was never delivered");
        assert!(!o.admit(b, CH, b"m2", t));
        assert!(!o.admit(b, CH, b"m2", t));
        assert!(o.admit(b, CH, b"m2", t));
        assert!(o.admit(b, CH, b"m3", t), "a new message passes");
        assert!(o.admit(b, b"cc:room:other", b"m1", t), "the same payload on another channel is another message");
    }

    #[test]
    fn the_same_server_again_is_not_a_copy_nor_is_anything_without_a_move() {
        let t = Instant::now();
        let mut o = Overlap::new(true);
        let (a, b) = (o.node_id("a"), o.node_id("b"));
        assert!(o.admit(a, CH, b"m1", t));
        assert!(o.admit(b, CH, b"m1", t), "no move, no fence: delivered");
        o.arm(t);
        assert!(o.admit(b, CH, b"m1", t), "b itself brought m1 last: not a copy of a's");
        let mut o = Overlap::new(true);
        let a = o.node_id("a");
        assert!(o.admit(a, CH, b"m1", t));
        o.arm(t);
        assert!(o.admit(a, CH, b"m1", t), "the server that delivered it, again");
    }

    #[test]
    fn the_fence_ends_and_old_deliveries_are_not_fenced() {
        let t = Instant::now();
        let mut o = Overlap::new(true);
        let (a, b) = (o.node_id("a"), o.node_id("b"));
        assert!(o.admit(a, CH, b"old", t));
        assert!(o.admit(a, CH, b"new", t + KEEP + Duration::from_millis(500)));
        o.arm(t + KEEP + Duration::from_millis(600));
        assert!(o.admit(b, CH, b"old", t + KEEP + Duration::from_millis(700)), "delivered before KEEP");
        assert!(!o.admit(b, CH, b"new", t + KEEP + Duration::from_millis(700)));
        assert!(o.admit(a, CH, b"x", t + KEEP + Duration::from_millis(700)));
        let later = t + KEEP + Duration::from_millis(600) + FENCE_FOR;
        assert!(o.admit(b, CH, b"x", later), "the fence is over");
    }

    #[test]
    fn after_the_record_turned_over_the_later_server_of_two_still_counts() {
        let t = Instant::now();
        let mut o = Overlap::new(true);
        let (a, b) = (o.node_id("a"), o.node_id("b"));
        for i in 0..RING - 1 {
            assert!(o.admit(a, CH, format!("f{i}").as_bytes(), t));
        }
        assert!(o.admit(a, CH, b"dup", t), "the ring's last slot");
        assert!(o.admit(a, CH, b"f-next", t), "turns the ring over");
        assert!(o.admit(b, CH, b"dup", t), "no fence yet: b delivers the same bytes later");
        o.arm(t);
        assert!(o.admit(b, CH, b"dup", t), "b brought it last: not a copy");
        assert!(!o.admit(a, CH, b"dup", t), "a, the other server: a copy");
    }

    /// What the record costs per message (the reader's hot path in a
    /// Cluster or Sentinel), outside a fence and inside one:
    /// `cargo test --release --lib -- --ignored --nocapture overlap_cost_figure`.
    #[test]
    #[ignore = "a figure, not a check"]
    fn overlap_cost_figure() {
        let payloads: Vec<Vec<u8>> = (0..4096)
            .map(|i| {
                format!(
                    r#"{{"ev":"message","room":"r","from":"server","data":{{"seq":{i},"text":"{}"}}}}"#,
                    "x".repeat(100)
                )
                .into_bytes()
            })
            .collect();
        let mut o = Overlap::new(true);
        let (a, b) = (o.node_id("a"), o.node_id("b"));
        const N: usize = 2_000_000;
        let t = Instant::now();
        for i in 0..N {
            std::hint::black_box(o.admit(a, CH, &payloads[i % payloads.len()], t));
        }
        let plain = t.elapsed();
        o.arm(t);
        let armed = Instant::now();
        for i in 0..N {
            std::hint::black_box(o.admit(b, CH, &payloads[(i + 7) % payloads.len()], t));
        }
        let fenced = armed.elapsed();
        let ns = |d: Duration| d.as_nanos() as f64 / N as f64;
        eprintln!(
            "{}-byte payloads: {:.1} ns per message recorded, {:.1} ns in a fence",
            payloads[0].len(),
            ns(plain),
            ns(fenced)
        );
    }

    #[test]
    fn the_record_is_bounded_and_off_records_nothing() {
        let t = Instant::now();
        let mut o = Overlap::new(true);
        let (a, b) = (o.node_id("a"), o.node_id("b"));
        for i in 0..RING + 10 {
            assert!(o.admit(a, CH, format!("m{i}").as_bytes(), t));
        }
        assert_eq!(o.ring.len(), RING);
        o.arm(t);
        assert!(o.admit(b, CH, b"m5", t), "turned over: the record no longer has it");
        assert!(!o.admit(b, CH, format!("m{}", RING + 9).as_bytes(), t));
        let mut off = Overlap::new(false);
        let (a, b) = (off.node_id("a"), off.node_id("b"));
        assert!(off.admit(a, CH, b"m1", t));
        off.arm(t);
        assert!(off.admit(b, CH, b"m1", t));
        assert!(off.ring.is_empty());
    }
}
