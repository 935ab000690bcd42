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
    /// Last publish (or creation): the room is forgotten `ttl` after it.
    touched: Instant,
}

/// Every room this shard owns.
pub struct Rings {
    settings: HistorySettings,
    /// This node's run: a new random one on every start (§7: a standalone
    /// node that restarts starts new epochs).
    node: Epoch,
    /// Rooms this shard has (re)created; makes each new epoch unique.
    generation: u64,
    rooms: FxHashMap<Arc<str>, Room>,
}

impl Rings {
    pub fn new(settings: HistorySettings, node: Epoch) -> Rings {
        Rings { settings, node, generation: 0, rooms: FxHashMap::default() }
    }

    fn room(&mut self, name: &str, now: Instant) -> &mut Room {
        let ttl = self.settings.ttl;
        if self.rooms.get(name).is_some_and(|r| now.duration_since(r.touched) >= ttl) {
            self.rooms.remove(name);
        }
        if !self.rooms.contains_key(name) {
            self.generation += 1;
            let epoch = Epoch::new(&format!("{}-{}", self.node.as_str(), self.generation))
                .expect("16 hex digits + a counter fit in 64 bytes");
            let room = Room { epoch, last: 0, entries: VecDeque::new(), touched: now };
            self.rooms.insert(Arc::from(name), room);
        }
        self.rooms.get_mut(name).expect("just inserted")
    }

    /// Assigns the next offset to a message of `room`, stores it and returns
    /// its position and complete frame.
    pub fn publish(&mut self, name: &str, msg: MessagePrefix, now: Instant) -> (Position, bytes::Bytes) {
        let size = self.settings.size;
        let room = self.room(name, now);
        room.last += 1;
        room.touched = now;
        let pos = Position { epoch: room.epoch, offset: room.last };
        let frame = msg.finish(&pos);
        if room.entries.len() == size {
            room.entries.pop_front();
        }
        room.entries.push_back(Entry { offset: pos.offset, frame: frame.clone() });
        (pos, frame)
    }

    /// Reads `room` (creating its epoch if it has none yet).
    pub fn read(&mut self, name: &str, q: Query, now: Instant) -> ReadResult {
        let room = self.room(name, now);
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
        let ttl = self.settings.ttl;
        self.rooms.retain(|_, r| now.duration_since(r.touched) < ttl);
    }

    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::protocol::event;

    fn rings(size: usize) -> Rings {
        Rings::new(HistorySettings { size, ttl: Duration::from_secs(60) }, Epoch::new("node").unwrap())
    }

    fn publish(r: &mut Rings, room: &str, n: usize, now: Instant) -> Vec<Position> {
        (0..n).map(|i| r.publish(room, event::message_prefix(room, "u", &i.to_string()), now).0).collect()
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
        let got = r.read("a", Query::recover(None, 1), now);
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
        let got = r.read("a", Query::recover(Some(Position { epoch: e, offset: 12 }), 10), now);
        assert!(got.covered);
        assert_eq!(offsets(&got), (13..=20).collect::<Vec<_>>());
        assert_eq!(got.pos.offset, 20);
        let trimmed = r.read("a", Query::recover(Some(Position { epoch: e, offset: 5 }), 10), now);
        assert!(!trimmed.covered && trimmed.entries.is_empty());
        let other = Epoch::new("other").unwrap();
        let wrong = r.read("a", Query::recover(Some(Position { epoch: other, offset: 12 }), 10), now);
        assert!(!wrong.covered && wrong.entries.is_empty());
        assert_eq!(offsets(&r.read("a", Query::recover(None, 3), now)), [18, 19, 20]);
        let list = |after| Query { after: Some(after), limit: 3, listing: true, fence: false };
        assert_eq!(offsets(&r.read("a", list(Position { epoch: e, offset: 5 }), now)), [11, 12, 13], "what is left");
        assert_eq!(offsets(&r.read("a", list(Position { epoch: other, offset: 5 }), now)), [18, 19, 20], "the last K");
    }

    #[test]
    fn an_expired_room_starts_a_new_epoch_from_one() {
        let mut r = rings(10);
        let t0 = Instant::now();
        let old = publish(&mut r, "a", 5, t0)[0].epoch;
        let later = t0 + Duration::from_secs(61);
        let got = r.read("a", Query::recover(Some(Position { epoch: old, offset: 5 }), 10), later);
        assert!(!got.covered);
        assert_ne!(got.pos.epoch, old);
        assert_eq!(got.pos.offset, 0);
        assert_eq!(publish(&mut r, "a", 1, later)[0].offset, 1);
        r.sweep(later + Duration::from_secs(61));
        assert!(r.is_empty());
    }

    #[test]
    fn owners_are_stable_and_spread() {
        assert_eq!(owner_of("lobby", 4), owner_of("lobby", 4));
        let used: std::collections::HashSet<usize> = (0..100).map(|i| owner_of(&format!("r{i}"), 4)).collect();
        assert_eq!(used.len(), 4);
        assert_eq!(owner_of("x", 1), 0);
    }
}
