//! ⑥ Which shards of this node have members of a room: the local bus sends
//! a room message only to those (`bus::local`).
//!
//! One table per node, shared by every shard: a fixed array of slots, each
//! an `AtomicU64` mask per 64 shards. A room name hashes to one slot; shard
//! `s` owns bit `s` of every slot and is the only one to write it, and keeps
//! to itself how many of its rooms fall into each slot (`Local::counts`):
//! the bit is set while that count is above zero. So a set bit means
//! "maybe" (another room in the same slot may be the one with members; the
//! receiver then finds nobody, which is what every message cost before),
//! and a clear bit means "certainly not": a message is never kept from a
//! shard with a member.
//!
//! The table has a fixed size (`SLOT_BITS`: 2^18 slots, 2 MiB of address
//! space per 64 shards, allocated zeroed so that only written pages are
//! resident: a room touches one 4 KiB page of 512 slots). It is a filter
//! whose false positives grow with the rooms per shard (about rooms /
//! 2^18) and fall back to the old broadcast, never to a loss; 2^18 keeps
//! it selective for a node where every user has a room of their own, at
//! 2 MiB per node at most. Users are not in it: every connection has a
//! user (anonymous ones too), so routing them touched the whole table even
//! for idle nodes with few rooms (18000 connections: 116 bytes each), and
//! a direct message goes to every shard as before.
//!
//! Nothing on the message path locks or allocates: a publish hashes the name
//! and loads one word (`Local::peers`). Only a shard's first member of a
//! room joining and its last leaving (`Shard::subscribe`, `unsubscribe`,
//! `remove_conn`) write: one `fetch_or` or `fetch_and` when the slot's count
//! crosses zero.
//!
//! # Why a message published after `subscribed` is not missed
//!
//! The subscriber's shard sets its bit inside `Shard::subscribe`, before it
//! queues the `subscribed` reply; the reply leaves at the earliest in the
//! flusher's pass, later in the same turn. The bit is written with a locked
//! read-modify-write (`fetch_or`, `Release`), so it is visible to every core
//! before the reply's bytes are handed to the kernel. A publish that follows
//! the reply — the subscriber told someone, who published on any shard —
//! reaches its shard through the kernel (a socket read), after that point,
//! and its `Acquire` load sees the bit. Clearing at the last leave can race
//! only with messages for a shard that no longer has members: they arrive
//! and find nobody, as before.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::protocol::Target;

/// log2 of the slots: 2^18 slots, 2 MiB per 64 shards of address space,
/// resident only where written (see `Table::new` and the module docs).
const SLOT_BITS: u32 = 18;

/// The node's table (see the module docs). `Send + Sync`.
pub struct Table {
    /// `AtomicU64`s per slot: one per 64 shards.
    words: usize,
    masks: Box<[AtomicU64]>,
}

impl Table {
    pub fn new(shards: usize) -> Table {
        let words = shards.div_ceil(64).max(1);
        // Zeroed by the allocator (fresh pages from the kernel), so the
        // table costs memory only where a shard has set a bit.
        // SAFETY: all-zero bytes are a valid `AtomicU64` (0).
        let masks = unsafe { Box::<[AtomicU64]>::new_zeroed_slice(words << SLOT_BITS).assume_init() };
        Table { words, masks }
    }

    /// The slot of a room or user name (rooms and users hash apart).
    pub fn slot(target: Target<'_>) -> usize {
        let h = match target {
            Target::Room(r) => FxBuildHasher.hash_one((0u8, r)),
            Target::User(u) => FxBuildHasher.hash_one((1u8, u)),
        };
        // Fibonacci multiply-shift: the top bits, well mixed.
        (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLOT_BITS)) as usize
    }

    fn word(&self, slot: usize, shard: usize) -> (&AtomicU64, u64) {
        (&self.masks[slot * self.words + shard / 64], 1u64 << (shard % 64))
    }

    /// Calls `f` with every shard whose bit is set in `slot`, but `except`.
    #[inline]
    pub fn each(&self, slot: usize, except: usize, mut f: impl FnMut(usize)) {
        for w in 0..self.words {
            let mut bits = self.masks[slot * self.words + w].load(Ordering::Acquire);
            if w == except / 64 {
                bits &= !(1u64 << (except % 64));
            }
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                f(w * 64 + b);
            }
        }
    }
}

/// One shard's side of the table: its counts, and the bit it owns. Lives on
/// the shard's thread.
pub struct Local {
    table: std::sync::Arc<Table>,
    shard: usize,
    /// Slot → how many of this shard's rooms and users with members hash there.
    counts: RefCell<FxHashMap<u32, u32>>,
}

impl Local {
    pub fn new(table: std::sync::Arc<Table>, shard: usize) -> Local {
        Local { table, shard, counts: RefCell::default() }
    }

    /// This shard gained its first member of `target` (`on`) or lost its
    /// last. Call at the edge only, once each way.
    pub fn set(&self, target: Target<'_>, on: bool) {
        let slot = Table::slot(target);
        let mut counts = self.counts.borrow_mut();
        let (word, bit) = self.table.word(slot, self.shard);
        if on {
            let c = counts.entry(slot as u32).or_insert(0);
            *c += 1;
            if *c == 1 {
                word.fetch_or(bit, Ordering::Release);
            }
        } else if let Some(c) = counts.get_mut(&(slot as u32)) {
            *c -= 1;
            if *c == 0 {
                counts.remove(&(slot as u32));
                word.fetch_and(!bit, Ordering::Release);
            }
        }
    }

    /// Calls `f` with every other shard that may have members of `target`.
    #[inline]
    pub fn peers(&self, target: Target<'_>, f: impl FnMut(usize)) {
        self.table.each(Table::slot(target), self.shard, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn peers(l: &Local, t: Target<'_>) -> Vec<usize> {
        let mut v = Vec::new();
        l.peers(t, |s| v.push(s));
        v
    }

    #[test]
    fn a_shard_sees_the_others_interest_but_not_its_own() {
        let t = Arc::new(Table::new(3));
        let (a, b, c) = (Local::new(t.clone(), 0), Local::new(t.clone(), 1), Local::new(t, 2));
        b.set(Target::Room("r"), true);
        c.set(Target::Room("r"), true);
        a.set(Target::Room("r"), true);
        assert_eq!(peers(&a, Target::Room("r")), [1, 2]);
        assert_eq!(peers(&b, Target::Room("r")), [0, 2]);
        c.set(Target::Room("r"), false);
        assert_eq!(peers(&a, Target::Room("r")), [1]);
    }

    #[test]
    fn a_bit_stays_while_another_name_in_the_slot_has_members() {
        // Two names in one slot: find a pair by brute force.
        let s = Table::slot(Target::Room("base"));
        let other = (0..).map(|i| format!("n{i}")).find(|n| Table::slot(Target::Room(n)) == s).unwrap();
        let t = Arc::new(Table::new(2));
        let (a, b) = (Local::new(t.clone(), 0), Local::new(t, 1));
        b.set(Target::Room("base"), true);
        b.set(Target::Room(&other), true);
        b.set(Target::Room("base"), false);
        assert_eq!(peers(&a, Target::Room(&other)), [1], "other still has members on shard 1");
        b.set(Target::Room(&other), false);
        assert!(peers(&a, Target::Room(&other)).is_empty());
    }

    #[test]
    fn rooms_and_users_are_apart_and_shards_past_64_have_bits() {
        let t = Arc::new(Table::new(130));
        let (a, z) = (Local::new(t.clone(), 0), Local::new(t, 129));
        z.set(Target::User("u"), true);
        assert_eq!(peers(&a, Target::User("u")), [129]);
        if Table::slot(Target::Room("u")) != Table::slot(Target::User("u")) {
            assert!(peers(&a, Target::Room("u")).is_empty());
        }
    }
}
