//! A room's presence as one authority keeps it: what the standalone owner
//! shard holds in memory, and what the Redis scripts (`scripts/*.lua`) keep
//! in the room's keys, step for step. Writers (a shard, or a node's shard
//! on Redis) set their absolute count of a user's connections; the room
//! keeps each user's total, the member order and a pending leave per user.
//!
//! Transitions, decided here and only here (so once for the cluster):
//! - a user's total goes 0 → n: `Join`, unless a leave of theirs is still
//!   pending (a reconnect within the grace): the pending leave is dropped
//!   and nothing is said;
//! - a total goes n → 0: `Zero` with a token; the caller waits the grace
//!   and then calls `leave_due` with it, which says whether the leave is
//!   still owed (nobody came back meanwhile).

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::protocol::presence::{Page, Read};

/// A transition of one user in one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Join(Arc<str>),
    /// The user's last connection left; the leave is owed after the grace
    /// unless `leave_due(token)` finds them back.
    Zero(Arc<str>, u64),
}

#[derive(Default)]
struct Room {
    /// Writer → user → that writer's connections of the user.
    writers: FxHashMap<u32, FxHashMap<Arc<str>, u32>>,
    /// User → connections, summed over the writers; ordered for paging.
    totals: BTreeMap<Arc<str>, u64>,
    clients: u64,
    /// User → token of the leave owed after the grace (join_leave only).
    pending: FxHashMap<Arc<str>, u64>,
}

/// Every room this authority holds.
#[derive(Default)]
pub struct Table {
    rooms: FxHashMap<Arc<str>, Room>,
}

impl Table {
    /// Writer `writer` has `count` connections of `user` in `room` now.
    /// `token`: the one a `Zero` carries (with `join_leave`; without,
    /// no leave is ever owed and no join said).
    pub fn set(
        &mut self,
        room: &Arc<str>,
        writer: u32,
        user: &Arc<str>,
        count: u32,
        join_leave: bool,
        token: u64,
    ) -> Option<Change> {
        let r = self.rooms.entry(room.clone()).or_default();
        let w = r.writers.entry(writer).or_default();
        let old = w.get(user).copied().unwrap_or(0);
        if old == count {
            return None;
        }
        if count == 0 {
            w.remove(user);
            if w.is_empty() {
                r.writers.remove(&writer);
            }
        } else {
            w.insert(user.clone(), count);
        }
        r.clients = r.clients + u64::from(count) - u64::from(old);
        let total = r.totals.entry(user.clone()).or_insert(0);
        let was = *total;
        *total = *total + u64::from(count) - u64::from(old);
        let change = if was == 0 {
            (join_leave && r.pending.remove(user).is_none()).then(|| Change::Join(user.clone()))
        } else if *total == 0 {
            r.totals.remove(user);
            join_leave.then(|| {
                r.pending.insert(user.clone(), token);
                Change::Zero(user.clone(), token)
            })
        } else {
            None
        };
        self.drop_if_empty(room);
        change
    }

    /// The grace of `Zero(user, token)` is over: is the leave still owed?
    /// (It is taken: a second call says no.)
    pub fn leave_due(&mut self, room: &str, user: &str, token: u64) -> bool {
        let Some(r) = self.rooms.get_mut(room) else { return false };
        let due = r.pending.get(user) == Some(&token) && !r.totals.contains_key(user);
        if due {
            r.pending.remove(user);
        }
        self.drop_if_empty(room);
        due
    }

    /// A page of `room`'s members (`limit` 0: the counts only).
    pub fn read(&self, room: &str, read: &Read) -> Page {
        let Some(r) = self.rooms.get(room) else { return Page::default() };
        let mut page = Page { clients: r.clients, users: r.totals.len() as u64, ..Page::default() };
        if read.limit == 0 {
            return page;
        }
        let from = match &read.after {
            Some(a) => std::ops::Bound::Excluded(&**a),
            None => std::ops::Bound::Unbounded,
        };
        let mut it = r.totals.range::<str, _>((from, std::ops::Bound::Unbounded));
        for (user, n) in it.by_ref().take(read.limit) {
            page.members.push((Box::from(&**user), *n));
        }
        if it.next().is_some() {
            page.next = page.members.last().map(|(u, _)| u.clone());
        }
        page
    }

    /// Rooms held (a metric).
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn drop_if_empty(&mut self, room: &str) {
        if self.rooms.get(room).is_some_and(|r| r.clients == 0 && r.pending.is_empty()) {
            self.rooms.remove(room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn tabs_count_once_and_joins_and_leaves_alternate() {
        let (mut t, r) = (Table::default(), a("r"));
        assert_eq!(t.set(&r, 0, &a("u"), 1, true, 1), Some(Change::Join(a("u"))));
        assert_eq!(t.set(&r, 1, &a("u"), 2, true, 2), None, "another shard's tabs: no second join");
        assert_eq!(t.read("r", &Read { after: None, limit: 10 }).clients, 3);
        assert_eq!(t.set(&r, 0, &a("u"), 0, true, 3), None, "tabs left elsewhere: no leave");
        assert_eq!(t.set(&r, 1, &a("u"), 0, true, 4), Some(Change::Zero(a("u"), 4)));
        assert_eq!(t.read("r", &Read::default()), Page::default(), "counts follow at once");
        // Back within the grace: no join, and the owed leave is off.
        assert_eq!(t.set(&r, 1, &a("u"), 1, true, 5), None);
        assert!(!t.leave_due("r", "u", 4));
        assert_eq!(t.set(&r, 1, &a("u"), 0, true, 6), Some(Change::Zero(a("u"), 6)));
        assert!(t.leave_due("r", "u", 6));
        assert!(!t.leave_due("r", "u", 6), "said once");
        assert_eq!(t.rooms(), 0, "an empty room is forgotten");
        assert_eq!(t.set(&r, 1, &a("u"), 1, true, 7), Some(Change::Join(a("u"))));
    }

    #[test]
    fn pages_list_every_member_once_in_byte_order() {
        let (mut t, r) = (Table::default(), a("r"));
        for (i, u) in ["b", "a", "d", "c", "e"].iter().enumerate() {
            t.set(&r, i as u32 % 2, &a(u), 1, false, 0);
        }
        let p = t.read("r", &Read { after: None, limit: 2 });
        assert_eq!((p.clients, p.users), (5, 5));
        assert_eq!(p.members, vec![("a".into(), 1), ("b".into(), 1)]);
        assert_eq!(p.next.as_deref(), Some("b"));
        let p = t.read("r", &Read { after: Some("b".into()), limit: 3 });
        assert_eq!(p.members.iter().map(|m| &*m.0).collect::<Vec<_>>(), ["c", "d", "e"]);
        assert_eq!(p.next, None);
        assert!(t.read("r", &Read { after: None, limit: 0 }).members.is_empty());
    }
}
