//! What an authenticated connection keeps of its token: its expiry and its
//! room patterns, boxed behind one pointer-sized field of `Conn`.

use std::cell::{Cell, RefCell};
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
    /// The connection's `refresh` budget, carried from grant to grant.
    refresh: Cell<RefreshBudget>,
}

/// `refresh` ops a connection may send: `REFRESH_BURST` at once, then one
/// every `REFRESH_EVERY_MS`, accepted or not, so a client cannot make its
/// shard check signatures faster than that. Times are coarse milliseconds
/// (`conn::limits::coarse_ms`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefreshBudget {
    last_ms: u32,
    /// Milliseconds of budget spent and not yet given back.
    spent: u32,
}

/// Refreshes a connection may send at once.
pub const REFRESH_BURST: u32 = 4;
/// Then one every this many milliseconds.
pub const REFRESH_EVERY_MS: u32 = 1_000;

impl RefreshBudget {
    /// Takes one refresh at `now_ms`; false: refuse it (`rate_limited`).
    pub fn take(&mut self, now_ms: u32) -> bool {
        let spent = self.spent.saturating_sub(now_ms.wrapping_sub(self.last_ms));
        self.last_ms = now_ms;
        if spent + REFRESH_EVERY_MS > REFRESH_BURST * REFRESH_EVERY_MS {
            self.spent = spent;
            return false;
        }
        self.spent = spent + REFRESH_EVERY_MS;
        true
    }
}

impl Grant {
    /// The grant of a verified token, its room list shared through this
    /// shard's intern table.
    pub fn new(v: &Verified) -> Grant {
        Grant { exp: v.exp, rooms: v.rooms.as_deref().map(intern), refresh: Cell::default() }
    }

    /// Unix seconds; the token is valid before this.
    pub fn exp(&self) -> u64 {
        self.exp
    }

    /// Takes one `refresh` from the connection's budget at `now_ms`.
    pub fn take_refresh(&self, now_ms: u32) -> bool {
        let mut b = self.refresh.get();
        let ok = b.take(now_ms);
        self.refresh.set(b);
        ok
    }

    /// The budget as it stands (to carry into the next grant).
    pub fn refresh_budget(&self) -> RefreshBudget {
        self.refresh.get()
    }

    /// Continues `b` (the previous grant's budget).
    pub fn keep_refresh_budget(&self, b: RefreshBudget) {
        self.refresh.set(b);
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
        let g = Grant { exp: 0, rooms: Some(intern(&["lobby".into(), "team:42:*".into()])), refresh: Cell::default() };
        assert!(g.allows("lobby"));
        assert!(!g.allows("lobby2"));
        assert!(g.allows("team:42:chat"));
        assert!(g.allows("team:42:"));
        assert!(!g.allows("team:43:chat"));
        assert!(Grant { exp: 0, rooms: Some(intern(&["*".into()])), refresh: Cell::default() }.allows("anything"));
        assert!(Grant { exp: 0, rooms: None, refresh: Cell::default() }.allows("anything"));
        assert!(!Grant { exp: 0, rooms: Some(intern(&[])), refresh: Cell::default() }.allows("lobby"));
        assert!(is_valid_pattern("a*") && is_valid_pattern("*") && !is_valid_pattern("a*b") && !is_valid_pattern(""));
    }

    #[test]
    fn refreshes_come_in_a_burst_then_one_a_second() {
        let mut b = RefreshBudget::default();
        let t0 = 50_000;
        assert_eq!((0..10).filter(|_| b.take(t0)).count(), REFRESH_BURST as usize);
        assert!(!b.take(t0 + 999), "a refused one still waits its turn");
        assert!(b.take(t0 + 1_000));
        assert!(!b.take(t0 + 1_500));
        // A quiet minute gives the whole burst back, no more.
        let later = t0 + 61_000;
        assert_eq!((0..10).filter(|_| b.take(later)).count(), REFRESH_BURST as usize);
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
