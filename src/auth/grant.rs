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
    /// §13 `subs`: rooms joined at connect; they may be subscribed (not
    /// published to) while this grant lasts, as if in `rooms`.
    subs: Option<Rooms>,
    /// §13 `dm`: may the connection `send`?
    dm: bool,
    /// Rooms granted by subscription tokens, each with its token's expiry
    /// (Unix seconds); carried from grant to grant.
    tokens: RefCell<Vec<(Rc<str>, u64)>>,
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
        Grant {
            exp: v.exp,
            rooms: v.rooms.as_deref().map(intern),
            refresh: Cell::default(),
            subs: (!v.subs.is_empty()).then(|| intern(&v.subs)),
            dm: v.dm,
            tokens: RefCell::default(),
        }
    }

    /// May the connection send direct messages (the `dm` claim)?
    pub fn dm(&self) -> bool {
        self.dm
    }

    /// May this connection subscribe to `room` (and read its history)? What
    /// `allows` allows, the `subs` rooms, and the rooms of its subscription
    /// tokens that have not expired.
    pub fn allows_subscribe(&self, room: &str) -> bool {
        self.allows(room)
            || self.subs.as_ref().is_some_and(|s| s.iter().any(|r| &**r == room))
            || self.room_token(room).is_some_and(|exp| now_secs() < exp)
    }

    /// The expiry of the subscription token that granted `room`, if any.
    pub fn room_token(&self, room: &str) -> Option<u64> {
        self.tokens.borrow().iter().find(|(r, _)| &**r == room).map(|(_, exp)| *exp)
    }

    /// `room` is granted by a subscription token until `exp`; returns the
    /// expiry it replaced, if any.
    pub fn set_room_token(&self, room: Rc<str>, exp: u64) -> Option<u64> {
        let mut t = self.tokens.borrow_mut();
        match t.iter_mut().find(|(r, _)| *r == room) {
            Some(e) => Some(std::mem::replace(&mut e.1, exp)),
            None => {
                t.push((room, exp));
                None
            }
        }
    }

    /// Forgets `room`'s subscription token; returns whether there was one.
    pub fn remove_room_token(&self, room: &str) -> bool {
        let mut t = self.tokens.borrow_mut();
        let before = t.len();
        t.retain(|(r, _)| &**r != room);
        t.len() != before
    }

    /// Moves the subscription-token grants of `old` into this grant.
    pub fn keep_room_tokens(&self, old: &Grant) {
        *self.tokens.borrow_mut() = std::mem::take(&mut *old.tokens.borrow_mut());
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

    fn grant(rooms: Option<Rooms>) -> Grant {
        Grant { exp: 0, rooms, refresh: Cell::default(), subs: None, dm: true, tokens: RefCell::default() }
    }

    #[test]
    fn room_patterns_match_exactly_or_by_prefix() {
        let g = grant(Some(intern(&["lobby".into(), "team:42:*".into()])));
        assert!(g.allows("lobby"));
        assert!(!g.allows("lobby2"));
        assert!(g.allows("team:42:chat"));
        assert!(g.allows("team:42:"));
        assert!(!g.allows("team:43:chat"));
        assert!(grant(Some(intern(&["*".into()]))).allows("anything"));
        assert!(grant(None).allows("anything"));
        assert!(!grant(Some(intern(&[]))).allows("lobby"));
        assert!(is_valid_pattern("a*") && is_valid_pattern("*") && !is_valid_pattern("a*b") && !is_valid_pattern(""));
    }

    #[test]
    fn subs_and_room_tokens_grant_subscribing_not_publishing() {
        let v = Verified { user: "u".into(), exp: 0, rooms: Some(vec!["a".into()]), subs: vec!["s".into()], dm: false };
        let g = Grant::new(&v);
        assert!(!g.dm());
        assert!(g.allows_subscribe("a") && g.allows_subscribe("s") && !g.allows("s"));
        assert!(!g.allows_subscribe("t"));
        assert_eq!(g.set_room_token("t".into(), now_secs() + 60), None);
        assert!(g.allows_subscribe("t") && !g.allows("t"));
        assert_eq!(g.set_room_token("x".into(), now_secs() - 1), None);
        assert!(!g.allows_subscribe("x"), "an expired room token grants nothing");
        let next = Grant::new(&v);
        next.keep_room_tokens(&g);
        assert!(next.allows_subscribe("t") && !g.allows_subscribe("t"));
        assert!(next.remove_room_token("t") && !next.allows_subscribe("t") && !next.remove_room_token("t"));
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
