//! Token expiry (PROTOCOL.md §2, corecast's `token_expired`) and the
//! `refresh` op: a per-shard heap of (expiry, conn id) swept once a second,
//! no timer per connection. Entries are deleted lazily: a refreshed or
//! closed connection's old entry is skipped when it comes up.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::Duration;

use super::Services;
use crate::auth::Grant;
use crate::auth::grant::now_secs;
use crate::conn::Conn;
use crate::conn::limits::coarse_ms;
use crate::protocol::{ErrorCode, event};
use crate::shard::{ConnId, Shard};
use crate::ws::CloseCode;

/// How often each shard's sweeper looks for expired tokens.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The expiry heap is compacted (dead entries dropped) when it grows past
/// this, and then past twice its size after the last compaction.
const COMPACT_MIN_ENTRIES: usize = 1024;

thread_local! {
    /// This shard's (expiry, conn id) heap and whether its sweeper runs.
    static EXPIRIES: RefCell<Expiries> = RefCell::default();
}

/// A shard's (expiry, conn id) entries, soonest first, deleted lazily: an
/// entry whose connection was refreshed or closed is skipped when it comes
/// up, and the heap is compacted once it has doubled since the last time.
struct Expiries {
    heap: BinaryHeap<Reverse<(u64, ConnId)>>,
    sweeper: bool,
    compact_at: usize,
}

impl Default for Expiries {
    fn default() -> Expiries {
        Expiries { heap: BinaryHeap::new(), sweeper: false, compact_at: COMPACT_MIN_ENTRIES }
    }
}

impl Expiries {
    fn push(&mut self, exp: u64, id: ConnId) {
        self.heap.push(Reverse((exp, id)));
    }

    /// Takes the entries due at `now` (soonest first); when the heap has
    /// grown past `compact_at`, drops the entries `current` says are stale.
    fn take_due(&mut self, now: u64, current: impl Fn(ConnId, u64) -> bool) -> Vec<(u64, ConnId)> {
        let mut due = Vec::new();
        while let Some(&Reverse((exp, id))) = self.heap.peek()
            && exp <= now
        {
            self.heap.pop();
            due.push((exp, id));
        }
        if self.heap.len() > self.compact_at {
            self.heap.retain(|Reverse((exp, id))| current(*id, *exp));
            self.compact_at = (self.heap.len() * 2).max(COMPACT_MIN_ENTRIES);
        }
        due
    }
}

/// Gives a connection its grant (at the upgrade, or a refreshed one) and
/// schedules its expiry check: one heap entry per connection and expiry, so
/// a refresh with the same expiry (the same token again) adds nothing.
pub fn attach(shard: &Rc<Shard>, conn: &Rc<Conn>, grant: Grant) {
    if !conn.with_grant(|g| g.is_some_and(|g| g.exp() == grant.exp())) {
        track(shard, conn.id, grant.exp());
    }
    conn.grant.set(Some(Box::new(grant)));
}

fn track(shard: &Rc<Shard>, id: ConnId, exp: u64) {
    EXPIRIES.with(|e| {
        let mut e = e.borrow_mut();
        e.push(exp, id);
        shard.m().token_expiries.inc();
        if !e.sweeper {
            // Started by the shard's first authenticated connection: without
            // auth there is no sweeper at all.
            e.sweeper = true;
            monoio::spawn(run_sweeper(shard.clone()));
        }
    })
}

/// Checked before each op: if the token has expired, sends `token_expired`,
/// closes with 1008 and returns true. Reads the clock only with auth on.
pub fn check_expiry(shard: &Shard, conn: &Rc<Conn>) -> bool {
    let due = conn.with_grant(|g| g.is_some_and(|g| now_secs() >= g.exp()));
    if due {
        expire(shard, conn);
    }
    due
}

/// The token is over: `token_expired`, then close with 1008. Once the close
/// is queued, further calls queue nothing.
fn expire(shard: &Shard, conn: &Rc<Conn>) {
    if conn.push(shard, event::error(ErrorCode::TokenExpired, "the token has expired; reconnect with a new one", None))
    {
        shard.m().client_errors_total.inc();
        tracing::debug!(shard = shard.id, conn = conn.id, "token expired: closing");
    }
    conn.close(shard, CloseCode::POLICY);
}

/// The sweeper: once a second, expires the connections whose tokens are due.
async fn run_sweeper(shard: Rc<Shard>) {
    loop {
        monoio::time::sleep(SWEEP_EVERY).await;
        sweep(&shard, now_secs());
    }
}

fn sweep(shard: &Rc<Shard>, now: u64) {
    // Current iff the connection is still there with that very expiry; the
    // entries of refreshed or closed connections are skipped (lazy deletion).
    let current = |id: ConnId, exp: u64| shard.conn(id).filter(|c| c.with_grant(|g| g.is_some_and(|g| g.exp() == exp)));
    let due = EXPIRIES.with(|e| {
        let mut e = e.borrow_mut();
        let before = e.heap.len();
        let due = e.take_due(now, |id, exp| current(id, exp).is_some());
        shard.m().token_expiries.sub((before - e.heap.len()) as u64);
        due
    });
    for (exp, id) in due {
        if let Some(c) = current(id, exp) {
            expire(shard, &c);
        }
    }
}

/// The `refresh` op: a fresh token for the same user replaces the grant
/// (expiry and rooms). Subscriptions the new `rooms` claim no longer allows
/// are left, each with an `unsubscribed` event (no `id`).
pub fn refresh(svc: &Rc<Services>, conn: &Rc<Conn>, me: &str, token: &str, id: Option<&str>) -> Result<(), ErrorCode> {
    let shard = svc.shard();
    let Some(verifier) = shard.cfg.auth.as_deref() else {
        return Err(ErrorCode::BadRequest);
    };
    // Its own rate limit (`auth::grant::RefreshBudget`), before any
    // signature check.
    let now = coarse_ms();
    let Some(budget) = conn.with_grant(|g| g.filter(|g| g.take_refresh(now)).map(Grant::refresh_budget)) else {
        return Err(ErrorCode::RateLimited);
    };
    let v = verifier.verify(token).map_err(|_| ErrorCode::Forbidden)?;
    if v.user != me {
        return Err(ErrorCode::Forbidden);
    }
    let grant = Grant::new(&v);
    grant.keep_refresh_budget(budget);
    let mut dropped = Vec::new();
    for room in conn.take_rooms() {
        if grant.allows(&room) {
            conn.add_room(room);
        } else {
            dropped.push(room);
        }
    }
    attach(shard, conn, grant);
    for room in dropped {
        // Already off the connection's list; this leaves the room table, and
        // drops a recovery still pending for it (`Services::leave`).
        svc.leave(conn, &room);
        conn.push(shard, event::membership("unsubscribed", &room, None));
    }
    conn.push(shard, event::refreshed(v.exp, id));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_entries_come_out_soonest_first_and_the_rest_stay() {
        let mut e = Expiries::default();
        for (exp, id) in [(30, 3), (10, 1), (20, 2), (40, 4)] {
            e.push(exp, id);
        }
        assert_eq!(e.take_due(5, |_, _| true), []);
        assert_eq!(e.take_due(20, |_, _| true), [(10, 1), (20, 2)]);
        assert_eq!(e.take_due(100, |_, _| true), [(30, 3), (40, 4)]);
        assert!(e.heap.is_empty());
    }

    #[test]
    fn stale_entries_are_dropped_once_the_heap_has_doubled() {
        // One live connection refreshed again and again: each refresh leaves
        // an entry behind that only its latest expiry makes current.
        let mut e = Expiries::default();
        let n = COMPACT_MIN_ENTRIES as u64 + 1;
        for exp in 0..n {
            e.push(1_000 + exp, 7);
        }
        let latest = 1_000 + n - 1;
        assert_eq!(e.take_due(0, |id, exp| id == 7 && exp == latest), []);
        assert_eq!(e.heap.len(), 1, "only the current entry survives the compaction");
        assert_eq!(e.compact_at, COMPACT_MIN_ENTRIES);
        // Below the threshold nothing is compacted (no walk per sweep).
        e.push(5_000, 8);
        assert_eq!(e.take_due(0, |_, _| false), []);
        assert_eq!(e.heap.len(), 2);
    }
}
