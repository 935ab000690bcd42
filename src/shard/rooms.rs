//! ⑤ Who is where on this shard: room → local connections, and user id →
//! local connections (for direct messages). Plain single-threaded maps owned
//! by the shard; the first join and the last leave are reported so the bus
//! can follow membership (Redis SUBSCRIBE/UNSUBSCRIBE).

use std::rc::Rc;

use indexmap::IndexSet;
use rustc_hash::{FxBuildHasher, FxHashMap};

use super::ConnId;

/// Room → members. `IndexSet` gives O(1) join/leave and dense iteration for
/// fan-out.
#[derive(Default)]
pub struct RoomTable {
    rooms: FxHashMap<Rc<str>, Room>,
}

struct Room {
    /// The same `Rc` as the map key, handed to members' own room lists.
    name: Rc<str>,
    members: IndexSet<ConnId, FxBuildHasher>,
}

/// What a join or leave changed.
#[derive(Debug, PartialEq, Eq)]
pub struct Change {
    /// The connection's membership changed (it was not / was a member).
    pub changed: bool,
    /// The room gained its first or lost its last local member.
    pub edge: bool,
}

impl RoomTable {
    /// Adds `conn` to `room`; returns the shared key for the connection's own
    /// list of rooms when it was not a member yet.
    pub fn join(&mut self, room: &str, conn: ConnId) -> (Option<Rc<str>>, Change) {
        if let Some(r) = self.rooms.get_mut(room) {
            let changed = r.members.insert(conn);
            return (changed.then(|| r.name.clone()), Change { changed, edge: false });
        }
        let key: Rc<str> = Rc::from(room);
        let mut members = IndexSet::with_hasher(FxBuildHasher);
        members.insert(conn);
        self.rooms.insert(key.clone(), Room { name: key.clone(), members });
        (Some(key), Change { changed: true, edge: true })
    }

    /// Removes `conn` from `room`.
    pub fn leave(&mut self, room: &str, conn: ConnId) -> Change {
        let Some(r) = self.rooms.get_mut(room) else {
            return Change { changed: false, edge: false };
        };
        let changed = r.members.swap_remove(&conn);
        let edge = r.members.is_empty();
        if edge {
            self.rooms.remove(room);
        }
        Change { changed, edge }
    }

    pub fn members(&self, room: &str) -> Option<&IndexSet<ConnId, FxBuildHasher>> {
        self.rooms.get(room).map(|r| &r.members)
    }

    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &Rc<str>> {
        self.rooms.keys()
    }
}

/// User id → that user's connections on this shard (usually one or two, so a
/// plain `Vec`).
#[derive(Default)]
pub struct UserTable {
    /// Two connections inline: no allocation for most users.
    users: FxHashMap<Rc<str>, smallvec::SmallVec<[ConnId; 2]>>,
}

impl UserTable {
    /// Returns true when this is the user's first connection on the shard.
    pub fn add(&mut self, user: &Rc<str>, conn: ConnId) -> bool {
        let v = self.users.entry(user.clone()).or_default();
        v.push(conn);
        v.len() == 1
    }

    /// Returns true when that was the user's last connection on the shard.
    pub fn remove(&mut self, user: &str, conn: ConnId) -> bool {
        let Some(v) = self.users.get_mut(user) else { return false };
        v.retain(|c| *c != conn);
        let last = v.is_empty();
        if last {
            self.users.remove(user);
        }
        last
    }

    pub fn conns(&self, user: &str) -> &[ConnId] {
        self.users.get(user).map(|v| v.as_slice()).unwrap_or(&[])
    }

    pub fn names(&self) -> impl Iterator<Item = &Rc<str>> {
        self.users.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_join_and_last_leave_are_edges() {
        let mut t = RoomTable::default();
        let (k, c) = t.join("r", 1);
        assert!(k.is_some());
        assert_eq!(c, Change { changed: true, edge: true });
        let (k, c) = t.join("r", 2);
        assert!(k.is_some());
        assert_eq!(c, Change { changed: true, edge: false });
        let (k, c) = t.join("r", 2);
        assert!(k.is_none());
        assert_eq!(c, Change { changed: false, edge: false });
        assert_eq!(t.leave("r", 1), Change { changed: true, edge: false });
        assert_eq!(t.leave("r", 1), Change { changed: false, edge: false });
        assert_eq!(t.leave("r", 2), Change { changed: true, edge: true });
        assert!(t.is_empty());
        assert_eq!(t.leave("nope", 2), Change { changed: false, edge: false });
    }

    #[test]
    fn users_count_their_connections() {
        let mut u = UserTable::default();
        let bob: Rc<str> = "bob".into();
        assert!(u.add(&bob, 1));
        assert!(!u.add(&bob, 2));
        assert_eq!(u.conns("bob"), &[1, 2]);
        assert!(!u.remove("bob", 1));
        assert!(u.remove("bob", 2));
        assert!(u.conns("bob").is_empty());
    }
}
