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

/// A transition of one user in one room, or of the room itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Join(Arc<str>),
    /// The user's last connection left; the leave is owed after the grace
    /// unless `leave_due(token)` finds them back.
    Zero(Arc<str>, u64),
    /// (With `Flags::rooms`.) The room got its first connection, and no
    /// vacated was owed.
    Occupied,
    /// (With `Flags::rooms`.) Its last connection left: vacated is owed
    /// after the debounce unless `vacate_due(token)` finds it occupied.
    Vacant(u64),
}

/// What transitions a room reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// Users' joins and leaves.
    pub users: bool,
    /// The room's occupied and vacated (webhooks).
    pub rooms: bool,
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
    /// The token of the vacated owed after the debounce.
    vacant: Option<u64>,
}

/// Every room this authority holds.
#[derive(Default)]
pub struct Table {
    rooms: FxHashMap<Arc<str>, Room>,
    /// (room, user) members over every room (a metric).
    members: usize,
}

impl Table {
    /// Writer `writer` has `count` connections of `user` in `room` now.
    /// `token`: the one a `Zero` or `Vacant` carries. Transitions go to
    /// `out` as `flags` asks (without `users`, no leave is ever owed and no
    /// join said).
    pub fn set(
        &mut self,
        room: &Arc<str>,
        writer: u32,
        user: &Arc<str>,
        count: u32,
        (flags, token): (Flags, u64),
        out: &mut Vec<Change>,
    ) {
        let old = self.rooms.get(room).and_then(|r| r.writers.get(&writer)?.get(user).copied()).unwrap_or(0);
        if old == count {
            return;
        }
        let r = self.rooms.entry(room.clone()).or_default();
        let clients_before = r.clients;
        let w = r.writers.entry(writer).or_default();
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
        let join_leave = flags.users;
        if was == 0 {
            self.members += 1;
            if join_leave && r.pending.remove(user).is_none() {
                out.push(Change::Join(user.clone()));
            }
        } else if *total == 0 {
            self.members -= 1;
            r.totals.remove(user);
            if join_leave {
                r.pending.insert(user.clone(), token);
                out.push(Change::Zero(user.clone(), token));
            }
        }
        if flags.rooms {
            if clients_before == 0 && r.clients > 0 && r.vacant.take().is_none() {
                out.push(Change::Occupied);
            } else if clients_before > 0 && r.clients == 0 {
                r.vacant = Some(token);
                out.push(Change::Vacant(token));
            }
        }
        self.drop_if_empty(room);
    }

    /// The debounce of `Vacant(token)` is over: is vacated still owed?
    pub fn vacate_due(&mut self, room: &str, token: u64) -> bool {
        let Some(r) = self.rooms.get_mut(room) else { return false };
        let due = r.vacant == Some(token) && r.clients == 0;
        if due {
            r.vacant = None;
        }
        self.drop_if_empty(room);
        due
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

    /// (room, user) members held (a metric).
    pub fn members(&self) -> usize {
        self.members
    }

    /// Rooms held (a metric).
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn drop_if_empty(&mut self, room: &str) {
        if self.rooms.get(room).is_some_and(|r| r.clients == 0 && r.pending.is_empty() && r.vacant.is_none()) {
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

    const JL: Flags = Flags { users: true, rooms: false };

    /// One `set`, its transitions.
    fn set(t: &mut Table, room: &Arc<str>, w: u32, user: &str, n: u32, flags: Flags, token: u64) -> Vec<Change> {
        let mut out = Vec::new();
        t.set(room, w, &a(user), n, (flags, token), &mut out);
        out
    }

    #[test]
    fn tabs_count_once_and_joins_and_leaves_alternate() {
        let (mut t, r) = (Table::default(), a("r"));
        let t = &mut t;
        assert_eq!(set(t, &r, 0, "u", 1, JL, 1), [Change::Join(a("u"))]);
        assert_eq!(set(t, &r, 1, "u", 2, JL, 2), [], "another shard's tabs: no second join");
        assert_eq!(t.read("r", &Read { after: None, limit: 10 }).clients, 3);
        assert_eq!(set(t, &r, 0, "u", 0, JL, 3), [], "tabs left elsewhere: no leave");
        assert_eq!(set(t, &r, 1, "u", 0, JL, 4), [Change::Zero(a("u"), 4)]);
        assert_eq!(t.read("r", &Read::default()), Page::default(), "counts follow at once");
        // Back within the grace: no join, and the owed leave is off.
        assert_eq!(set(t, &r, 1, "u", 1, JL, 5), []);
        assert!(!t.leave_due("r", "u", 4));
        assert_eq!(set(t, &r, 1, "u", 0, JL, 6), [Change::Zero(a("u"), 6)]);
        assert!(t.leave_due("r", "u", 6));
        assert!(!t.leave_due("r", "u", 6), "said once");
        assert_eq!(t.rooms(), 0, "an empty room is forgotten");
        assert_eq!(t.members(), 0);
        assert_eq!(set(t, &r, 1, "u", 1, JL, 7), [Change::Join(a("u"))]);
        assert_eq!(set(t, &a("r2"), 0, "u", 2, JL, 8), [Change::Join(a("u"))]);
        assert_eq!(t.members(), 2, "one user in two rooms");
    }

    #[test]
    fn occupied_and_vacated_are_debounced() {
        let (mut t, r) = (Table::default(), a("r"));
        let t = &mut t;
        let f = Flags { users: false, rooms: true };
        assert_eq!(set(t, &r, 0, "u", 1, f, 1), [Change::Occupied]);
        assert_eq!(set(t, &r, 1, "v", 1, f, 2), []);
        assert_eq!(set(t, &r, 0, "u", 0, f, 3), []);
        assert_eq!(set(t, &r, 1, "v", 0, f, 4), [Change::Vacant(4)]);
        // Back within the debounce: nothing, and vacated is off.
        assert_eq!(set(t, &r, 1, "v", 1, f, 5), []);
        assert!(!t.vacate_due("r", 4));
        assert_eq!(set(t, &r, 1, "v", 0, f, 6), [Change::Vacant(6)]);
        assert!(t.vacate_due("r", 6));
        assert!(!t.vacate_due("r", 6), "said once");
        assert_eq!(t.rooms(), 0);
        assert_eq!(set(t, &r, 0, "w", 2, f, 7), [Change::Occupied]);
    }

    #[test]
    fn pages_list_every_member_once_in_byte_order() {
        let (mut t, r) = (Table::default(), a("r"));
        for (i, u) in ["b", "a", "d", "c", "e"].iter().enumerate() {
            set(&mut t, &r, i as u32 % 2, u, 1, Flags::default(), 0);
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
