//! Standalone history: the rings of the rooms one shard owns.
//!
//! Each room has exactly one owner shard on the node (`owner_of`: a stable
//! hash of the room name), and only that shard's thread touches the room's
//! ring: no lock, no shared map. The owner assigns offsets (1, 2, …) in the
//! order publishes reach it, keeps the last `size` complete `message` frames,
//! and forgets the whole room `ttl` after its last publish (the next access
//! starts a new epoch: offsets never restart within an epoch).
//!
//! In: publishes (a `message` event not yet closed, `event::MessagePrefix`)
//! and reads. Out: the finished frame (with `epoch` and `offset`) to fan out,
//! and `ReadResult`s.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxHashMap;

use super::types::{Entry, Query, ReadResult};
use crate::config::HistorySettings;
use crate::protocol::event::MessagePrefix;
use crate::protocol::{Epoch, Position};

/// The shard that owns `room`'s history on this node: FNV-1a of the name,
/// stable across runs and shards.
pub fn owner_of(room: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

struct Room {
    epoch: Epoch,
    /// The latest offset assigned.
    last: u64,
    entries: VecDeque<Entry>,
    /// Bytes of `entries`' frames.
    bytes: usize,
    /// This room's namespace settings (size, TTL), as of its last publish.
    settings: HistorySettings,
    /// Last publish (or creation): the room is forgotten `ttl` after it.
    touched: Instant,
}

/// Every room this shard owns.
pub struct Rings {
    /// This node's run: a new random one on every start (§7: a standalone
    /// node that restarts starts new epochs).
    node: Epoch,
    /// Rooms this shard has (re)created; makes each new epoch unique.
    generation: u64,
    rooms: FxHashMap<Arc<str>, Room>,
    /// The shard's share of `--history-max-bytes`: past it the oldest
    /// stored messages of the shard, whatever their room, are trimmed.
    max_bytes: usize,
    /// Bytes of every stored frame.
    bytes: usize,
    /// Every stored message in publish order (room, offset): the front is
    /// the shard's oldest, trimmed first when `bytes` passes `max_bytes`.
    /// Entries already gone (trimmed by size, expired) are skipped.
    order: VecDeque<(Arc<str>, u64)>,
}

impl Rings {
    pub fn new(node: Epoch, max_bytes: usize) -> Rings {
        Rings { node, generation: 0, rooms: FxHashMap::default(), max_bytes, bytes: 0, order: VecDeque::new() }
    }

    /// The room, if it has a history that has not expired.
    fn live(&mut self, name: &str, now: Instant) -> Option<&mut Room> {
        if self.rooms.get(name).is_some_and(|r| now.duration_since(r.touched) >= r.settings.ttl) {
            self.forget(name);
        }
        self.rooms.get_mut(name)
    }

    fn forget(&mut self, name: &str) {
        if let Some(r) = self.rooms.remove(name) {
            self.bytes -= r.bytes;
        }
    }

    /// Assigns the next offset to a message of `room` (creating its history
    /// with a new epoch if it has none), stores it and returns its position
    /// and complete frame.
    pub fn publish(
        &mut self,
        name: &str,
        settings: HistorySettings,
        msg: MessagePrefix,
        now: Instant,
    ) -> (Position, bytes::Bytes) {
        if self.live(name, now).is_none() {
            self.generation += 1;
            let epoch = Epoch::new(&format!("{}-{}", self.node.as_str(), self.generation))
                .expect("16 hex digits + a counter fit in 64 bytes");
            let room = Room { epoch, last: 0, entries: VecDeque::new(), bytes: 0, settings, touched: now };
            self.rooms.insert(Arc::from(name), room);
        }
        let key = self.rooms.get_key_value(name).map(|(k, _)| k.clone()).expect("just made");
        let room = self.rooms.get_mut(name).expect("just made");
        room.settings = settings;
        room.last += 1;
        room.touched = now;
        let pos = Position { epoch: room.epoch, offset: room.last };
        let frame = msg.finish(&pos);
        let mut freed = 0;
        while room.entries.len() >= settings.size.max(1) {
            freed += room.entries.pop_front().map_or(0, |e| e.frame.len());
        }
        room.entries.push_back(Entry { offset: pos.offset, frame: frame.clone() });
        room.bytes = room.bytes + frame.len() - freed;
        self.bytes = self.bytes + frame.len() - freed;
        self.order.push_back((key, pos.offset));
        self.trim_to_budget();
        (pos, frame)
    }

    /// Trims the shard's oldest messages until its rings fit `max_bytes`
    /// (the newest message of a room always stays).
    fn trim_to_budget(&mut self) {
        while self.bytes > self.max_bytes {
            let Some((name, offset)) = self.order.pop_front() else { return };
            let Some(room) = self.rooms.get_mut(&name) else { continue };
            if room.entries.len() > 1 && room.entries.front().is_some_and(|e| e.offset == offset) {
                let e = room.entries.pop_front().expect("checked");
                room.bytes -= e.frame.len();
                self.bytes -= e.frame.len();
            }
        }
        // The order list holds stale pairs too (trimmed by size, expired):
        // keep it from growing past what is stored.
        if self.order.len() > 2 * self.stored() + 1024 {
            let rooms = &self.rooms;
            self.order.retain(|(n, o)| rooms.get(n).is_some_and(|r| r.entries.front().is_some_and(|e| e.offset <= *o)));
        }
    }

    fn stored(&self) -> usize {
        self.rooms.values().map(|r| r.entries.len()).sum()
    }

    /// Reads `room`. A room without history (never published, or expired)
    /// is at `Epoch::NONE`, offset 0: a read creates nothing.
    pub fn read(&mut self, name: &str, q: Query, now: Instant) -> ReadResult {
        let Some(room) = self.live(name, now) else {
            return ReadResult::judge(Position { epoch: Epoch::NONE, offset: 0 }, q, Vec::new());
        };
        let pos = Position { epoch: room.epoch, offset: room.last };
        let limit = q.limit.min(room.entries.len());
        let entries: Vec<Entry> = match q.after {
            Some(a) if a.epoch == room.epoch => {
                room.entries.iter().skip_while(|e| e.offset <= a.offset).take(limit).cloned().collect()
            }
            Some(_) if !q.listing => Vec::new(),
            _ => room.entries.iter().skip(room.entries.len() - limit).cloned().collect(),
        };
        ReadResult::judge(pos, q, entries)
    }

    /// Forgets the rooms whose history has expired.
    pub fn sweep(&mut self, now: Instant) {
        let mut freed = 0;
        self.rooms.retain(|_, r| {
            let keep = now.duration_since(r.touched) < r.settings.ttl;
            if !keep {
                freed += r.bytes;
            }
            keep
        });
        self.bytes -= freed;
    }

    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// Bytes of stored frames (`corecast_history_bytes`).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::protocol::event;

    const MAX: usize = usize::MAX;

    fn settings(size: usize) -> HistorySettings {
        HistorySettings { size, ttl: Duration::from_secs(60) }
    }

    fn rings(_size: usize) -> Rings {
        Rings::new(Epoch::new("node").unwrap(), MAX)
    }

    fn publish(r: &mut Rings, room: &str, n: usize, now: Instant) -> Vec<Position> {
        (0..n).map(|i| r.publish(room, settings(10), event::message_prefix(room, "u", &i.to_string()), now).0).collect()
    }

    fn offsets(r: &ReadResult) -> Vec<u64> {
        r.entries.iter().map(|e| e.offset).collect()
    }

    #[test]
    fn offsets_count_from_one_per_room_and_frames_carry_them() {
        let mut r = rings(10);
        let now = Instant::now();
        let a = publish(&mut r, "a", 3, now);
        let b = publish(&mut r, "b", 1, now);
        assert_eq!(a.iter().map(|p| p.offset).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(b[0].offset, 1);
        assert_ne!(a[0].epoch, b[0].epoch, "each room has its own epoch");
        let got = r.read("a", Query::recover(None, 1, MAX), now);
        let json = event::json_of(&got.entries[0].frame);
        let epoch = a[0].epoch.as_str();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            format!(r#"{{"ev":"message","room":"a","from":"u","data":2,"epoch":"{epoch}","offset":3}}"#)
        );
    }

    #[test]
    fn recovery_replays_what_follows_and_refuses_what_was_trimmed() {
        let mut r = rings(10);
        let now = Instant::now();
        let p = publish(&mut r, "a", 20, now);
        let e = p[0].epoch;
        let got = r.read("a", Query::recover(Some(Position { epoch: e, offset: 12 }), 10, MAX), now);
        assert!(got.covered);
        assert_eq!(offsets(&got), (13..=20).collect::<Vec<_>>());
        assert_eq!(got.pos.offset, 20);
        let trimmed = r.read("a", Query::recover(Some(Position { epoch: e, offset: 5 }), 10, MAX), now);
        assert!(!trimmed.covered && trimmed.entries.is_empty());
        let other = Epoch::new("other").unwrap();
        let wrong = r.read("a", Query::recover(Some(Position { epoch: other, offset: 12 }), 10, MAX), now);
        assert!(!wrong.covered && wrong.entries.is_empty());
        assert_eq!(offsets(&r.read("a", Query::recover(None, 3, MAX), now)), [18, 19, 20]);
        let list = |after| Query::listing(Some(after), 3, MAX);
        assert_eq!(offsets(&r.read("a", list(Position { epoch: e, offset: 5 }), now)), [11, 12, 13], "what is left");
        assert_eq!(offsets(&r.read("a", list(Position { epoch: other, offset: 5 }), now)), [18, 19, 20], "the last K");
    }

    #[test]
    fn an_expired_room_starts_a_new_epoch_from_one() {
        let mut r = rings(10);
        let t0 = Instant::now();
        let old = publish(&mut r, "a", 5, t0)[0].epoch;
        let later = t0 + Duration::from_secs(61);
        let got = r.read("a", Query::recover(Some(Position { epoch: old, offset: 5 }), 10, MAX), later);
        assert!(!got.covered);
        assert_eq!(got.pos, Position { epoch: Epoch::NONE, offset: 0 }, "a read creates no history");
        assert!(r.is_empty());
        let new = publish(&mut r, "a", 1, later)[0];
        assert_eq!(new.offset, 1);
        assert_ne!(new.epoch, old);
        r.sweep(later + Duration::from_secs(61));
        assert!(r.is_empty());
    }

    #[test]
    fn the_byte_budget_trims_the_shards_oldest_messages_first() {
        let now = Instant::now();
        let mut r = Rings::new(Epoch::new("node").unwrap(), 0);
        r.max_bytes = 1000;
        let frame_len = |r: &mut Rings, room: &str| {
            r.read(room, Query::recover(None, 100, MAX), now).entries.iter().map(|e| e.frame.len()).sum::<usize>()
        };
        publish(&mut r, "a", 5, now);
        publish(&mut r, "b", 5, now);
        let one = frame_len(&mut r, "a") / 5;
        assert_eq!(r.bytes(), 10 * one, "under the budget nothing is trimmed");
        // Past the budget, the oldest go first: room a's, then b's.
        for i in 0..200 {
            r.publish("c", settings(1000), event::message_prefix("c", "u", &i.to_string()), now);
        }
        assert!(r.bytes() <= 1000 + one, "held to the budget: {} bytes", r.bytes());
        assert_eq!(r.read("a", Query::recover(None, 100, MAX), now).entries.len(), 1, "a keeps its newest");
        assert_eq!(r.read("a", Query::recover(None, 100, MAX), now).pos.offset, 5, "offsets are kept");
        assert!(r.order.len() <= 2 * r.stored() + 1024);
    }

    #[test]
    fn owners_are_stable_and_spread() {
        assert_eq!(owner_of("lobby", 4), owner_of("lobby", 4));
        let used: std::collections::HashSet<usize> = (0..100).map(|i| owner_of(&format!("r{i}"), 4)).collect();
        assert_eq!(used.len(), 4);
        assert_eq!(owner_of("x", 1), 0);
    }
}
