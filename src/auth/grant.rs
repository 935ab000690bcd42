//! What an authenticated connection keeps of its token: its expiry and its
//! room patterns, boxed behind one pointer-sized field of `Conn`.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::Verified;

/// Room patterns as in the `rooms` claim, shared by the shard's connections
/// whose tokens carry the same list.
pub type Rooms = Rc<[Box<str>]>;

/// What an authenticated connection keeps of its token (boxed in `Conn`).
#[derive(Debug)]
pub struct Grant {
    /// Unix seconds; the token is valid before this.
    exp: u64,
    /// `None`: the token had no `rooms` claim, any room is allowed.
    rooms: Option<Rooms>,
}

impl Grant {
    /// The grant of a verified token, its room list shared through this
    /// shard's intern table.
    pub fn new(v: &Verified) -> Grant {
        Grant { exp: v.exp, rooms: v.rooms.as_deref().map(intern) }
    }

    /// Unix seconds; the token is valid before this.
    pub fn exp(&self) -> u64 {
        self.exp
    }

    /// May this connection subscribe and publish to `room`?
    pub fn allows(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|ps| ps.iter().any(|p| matches(p, room)))
    }
}

/// Does `room` match `pattern` (exact, or prefix when it ends with `*`)?
fn matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

thread_local! {
    /// This shard's distinct `rooms` lists. An entry only the table still
    /// holds is dropped when the table has doubled since the last pruning.
    static INTERNED: RefCell<(HashSet<Rooms>, usize)> = RefCell::default();
}

fn intern(rooms: &[String]) -> Rooms {
    INTERNED.with(|t| {
        let (set, prune_at) = &mut *t.borrow_mut();
        let key: Rooms = rooms.iter().map(|r| Box::from(r.as_str())).collect();
        if let Some(shared) = set.get(&key) {
            return shared.clone();
        }
        if set.len() >= *prune_at {
            set.retain(|r| Rc::strong_count(r) > 1);
            *prune_at = (set.len() * 2).max(64);
        }
        set.insert(key.clone());
        key
    })
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::verify::is_valid_pattern;

    #[test]
    fn room_patterns_match_exactly_or_by_prefix() {
        let g = Grant { exp: 0, rooms: Some(intern(&["lobby".into(), "team:42:*".into()])) };
        assert!(g.allows("lobby"));
        assert!(!g.allows("lobby2"));
        assert!(g.allows("team:42:chat"));
        assert!(g.allows("team:42:"));
        assert!(!g.allows("team:43:chat"));
        assert!(Grant { exp: 0, rooms: Some(intern(&["*".into()])) }.allows("anything"));
        assert!(Grant { exp: 0, rooms: None }.allows("anything"));
        assert!(!Grant { exp: 0, rooms: Some(intern(&[])) }.allows("lobby"));
        assert!(is_valid_pattern("a*") && is_valid_pattern("*") && !is_valid_pattern("a*b") && !is_valid_pattern(""));
    }

    #[test]
    fn auth_off_costs_a_connection_one_pointer() {
        assert_eq!(std::mem::size_of::<std::cell::Cell<Option<Box<Grant>>>>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn identical_room_lists_share_one_allocation() {
        let a = intern(&["x".into(), "y:*".into()]);
        let b = intern(&["x".into(), "y:*".into()]);
        assert!(Rc::ptr_eq(&a, &b));
    }
}
