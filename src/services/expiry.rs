//! Token expiry (PROTOCOL.md §2, corecast's `token_expired`) and the
//! `refresh` op: a per-shard heap of (expiry, conn id) swept once a second,
//! no timer per connection. Entries are deleted lazily: a refreshed or
//! closed connection's old entry is skipped when it comes up.
//!
//! Subscription tokens (§13) share the heap: an entry with a room is that
//! room's token on that connection; when it comes up current, the
//! connection leaves the room with `unsubscribed` `reason` `token_expired`.
//! Also here, as they read the grant: the `subs` claim's subscribes at
//! connect and the `dm` claim.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::Duration;

use super::Services;
use crate::auth::Grant;
use crate::auth::grant::now_secs;
use crate::conn::Conn;
use crate::conn::limits;
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

/// A heap entry: expiry, connection, and the room of a subscription token
/// (`None`: the connection's own token).
type Entry = (u64, ConnId, Option<Rc<str>>);

/// A shard's (expiry, conn id, room) entries, soonest first, deleted lazily: an
/// entry whose connection was refreshed or closed is skipped when it comes
/// up, and the heap is compacted once it has doubled since the last time.
struct Expiries {
    heap: BinaryHeap<Reverse<Entry>>,
    sweeper: bool,
    compact_at: usize,
}

impl Default for Expiries {
    fn default() -> Expiries {
        Expiries { heap: BinaryHeap::new(), sweeper: false, compact_at: COMPACT_MIN_ENTRIES }
    }
}

impl Expiries {
    fn push(&mut self, exp: u64, id: ConnId, room: Option<Rc<str>>) {
        self.heap.push(Reverse((exp, id, room)));
    }

    /// Takes the entries due at `now` (soonest first); when the heap has
    /// grown past `compact_at`, drops the entries `current` says are stale.
    fn take_due(&mut self, now: u64, current: impl Fn(&Entry) -> bool) -> Vec<Entry> {
        let mut due = Vec::new();
        while let Some(Reverse((exp, ..))) = self.heap.peek()
            && *exp <= now
        {
            let Some(Reverse(e)) = self.heap.pop() else { break };
            due.push(e);
        }
        if self.heap.len() > self.compact_at {
            self.heap.retain(|Reverse(e)| current(e));
            self.compact_at = (self.heap.len() * 2).max(COMPACT_MIN_ENTRIES);
        }
        due
    }
}

/// Gives a connection its grant (at the upgrade, or a refreshed one) and
/// schedules its expiry check: one heap entry per connection and expiry, so
/// a refresh with the same expiry (the same token again) adds nothing.
pub fn attach(svc: &Rc<Services>, conn: &Rc<Conn>, grant: Grant) {
    if !conn.with_grant(|g| g.is_some_and(|g| g.exp() == grant.exp())) {
        track(svc, conn.id, grant.exp(), None);
    }
    conn.grant.set(Some(Box::new(grant)));
}

fn track(svc: &Rc<Services>, id: ConnId, exp: u64, room: Option<Rc<str>>) {
    EXPIRIES.with(|e| {
        let mut e = e.borrow_mut();
        e.push(exp, id, room);
        svc.shard().m().token_expiries.inc();
        if !e.sweeper {
            // Started by the shard's first authenticated connection: without
            // auth there is no sweeper at all.
            e.sweeper = true;
            monoio::spawn(run_sweeper(svc.clone()));
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

/// The sweeper: once a second, expires the connections and the
/// subscription tokens that are due.
async fn run_sweeper(svc: Rc<Services>) {
    loop {
        monoio::time::sleep(SWEEP_EVERY).await;
        sweep(&svc, now_secs());
    }
}

fn sweep(svc: &Rc<Services>, now: u64) {
    let shard = svc.shard();
    // Current iff the connection is still there with that very expiry (of
    // its token, or of that room's token); the entries of refreshed or
    // closed connections are skipped (lazy deletion).
    let current = |(exp, id, room): &Entry| {
        shard.conn(*id).filter(|c| {
            c.with_grant(|g| {
                g.is_some_and(|g| match room {
                    None => g.exp() == *exp,
                    Some(r) => g.room_token(r) == Some(*exp),
                })
            })
        })
    };
    let due = EXPIRIES.with(|e| {
        let mut e = e.borrow_mut();
        let before = e.heap.len();
        let due = e.take_due(now, |entry| current(entry).is_some());
        shard.m().token_expiries.sub((before - e.heap.len()) as u64);
        due
    });
    for entry in due {
        let Some(c) = current(&entry) else { continue };
        match entry.2 {
            None => expire(shard, &c),
            Some(room) => room_expired(svc, &c, &room),
        }
    }
}

/// `room`'s subscription token is over: the connection leaves the room
/// (if it is still in it) with `unsubscribed` `token_expired`.
fn room_expired(svc: &Rc<Services>, conn: &Rc<Conn>, room: &str) {
    conn.with_grant(|g| g.map(|g| g.remove_room_token(room)));
    if conn.with_rooms(|rooms| rooms.iter().any(|r| &**r == room)) {
        svc.leave(conn, room);
        conn.push(svc.shard(), event::unsubscribed_because(room, "token_expired"));
        tracing::debug!(shard = svc.shard().id, conn = conn.id, room, "subscription token expired: left the room");
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
    // The rooms of subscription tokens stay granted (each by its own token).
    conn.with_grant(|old| old.map(|old| grant.keep_room_tokens(old)));
    let mut dropped = Vec::new();
    for room in conn.take_rooms() {
        if grant.allows_subscribe(&room) {
            conn.add_room(room);
        } else {
            dropped.push(room);
        }
    }
    attach(svc, conn, grant);
    for room in dropped {
        // Already off the connection's list; this leaves the room table, and
        // drops a recovery still pending for it (`Services::leave`).
        svc.leave(conn, &room);
        conn.push(shard, event::membership("unsubscribed", &room, None));
    }
    conn.push(shard, event::refreshed(v.exp, id));
    Ok(())
}

// ---- §13: subscription tokens, `subs`, `dm` -----------------------------------

/// Why a subscription-token op was refused: the `error` code and message.
pub type Refusal = (ErrorCode, &'static str);

/// May `conn` subscribe to `room` (and read its history) without a token?
/// Its `rooms` claim, its `subs` rooms, a room token still valid; always
/// with auth off.
pub fn may_subscribe(conn: &Conn, room: &str) -> bool {
    conn.with_grant(|g| g.is_none_or(|g| g.allows_subscribe(room)))
}

/// May `conn` send direct messages (the `dm` claim; always with auth off)?
pub fn may_send(conn: &Conn) -> bool {
    conn.with_grant(|g| g.is_none_or(Grant::dm))
}

/// Checks a `subscribe`'s subscription token for `room`; its expiry.
pub fn check_room_token(svc: &Services, me: &str, room: &str, token: &str) -> Result<u64, Refusal> {
    let Some(verifier) = svc.shard().cfg.auth.as_deref() else {
        return Err((ErrorCode::BadRequest, "auth is not enabled"));
    };
    verifier
        .verify_subscription(token, me, room)
        .map_err(|_| (ErrorCode::Forbidden, "the subscription token is invalid, expired, or for another room or user"))
}

/// `room` is granted to `conn` by a subscription token until `exp` (checked
/// by `check_room_token`), and leaves it then unless refreshed.
pub fn grant_room(svc: &Rc<Services>, conn: &Rc<Conn>, room: &str, exp: u64) {
    let room: Rc<str> = Rc::from(room);
    let replaced = conn.with_grant(|g| g.map(|g| g.set_room_token(room.clone(), exp)));
    if replaced != Some(Some(exp)) {
        track(svc, conn.id, exp, Some(room));
    }
}

/// `conn` left `room` (an `unsubscribe`): its room token, if any, goes too.
pub fn forget_room(conn: &Conn, room: &str) {
    conn.with_grant(|g| g.map(|g| g.remove_room_token(room)));
}

/// `{"op":"refresh","room":R,"token":T}`: a fresh subscription token for a
/// room the connection holds by one; takes from the same budget as the
/// connection's `refresh`.
pub fn refresh_room(
    svc: &Rc<Services>,
    conn: &Rc<Conn>,
    me: &str,
    room: &str,
    token: &str,
    id: Option<&str>,
) -> Result<(), Refusal> {
    let shard = svc.shard();
    if shard.cfg.auth.is_none() {
        return Err((ErrorCode::BadRequest, "auth is not enabled"));
    }
    let now = coarse_ms();
    if !conn.with_grant(|g| g.is_some_and(|g| g.take_refresh(now))) {
        return Err((ErrorCode::RateLimited, "too many refreshes, slow down"));
    }
    if conn.with_grant(|g| g.and_then(|g| g.room_token(room))).is_none() {
        return Err((ErrorCode::BadRequest, "no subscription token holds this room: subscribe with one"));
    }
    let exp = check_room_token(svc, me, room, token)?;
    grant_room(svc, conn, room, exp);
    conn.push(shard, event::refreshed_room(room, exp, id));
    Ok(())
}

/// §13 `subs`: joins the connection to each room as a client `subscribe`
/// would (history, bus), with `subscribed` events without `id`; a room past
/// `--max-rooms-per-connection` gets `error` `too_large` instead.
pub fn subscribe_claimed(svc: &Rc<Services>, conn: &Rc<Conn>, subs: &[String]) {
    let shard = svc.shard();
    for room in subs {
        if limits::too_many_rooms(shard, conn, room) {
            shard.m().room_limit_refusals_total.inc();
            shard.m().client_errors_total.inc();
            let why = format!("too many rooms on this connection: not subscribed to {room} (subs claim)");
            conn.push(shard, event::error(ErrorCode::TooLarge, &why, None));
            continue;
        }
        svc.subscribe(conn, room, None, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_entries_come_out_soonest_first_and_the_rest_stay() {
        let mut e = Expiries::default();
        for (exp, id) in [(30, 3), (10, 1), (20, 2), (40, 4)] {
            e.push(exp, id, None);
        }
        e.push(20, 2, Some("r".into()));
        assert_eq!(e.take_due(5, |_| true), []);
        assert_eq!(e.take_due(20, |_| true), [(10, 1, None), (20, 2, None), (20, 2, Some("r".into()))]);
        assert_eq!(e.take_due(100, |_| true), [(30, 3, None), (40, 4, None)]);
        assert!(e.heap.is_empty());
    }

    #[test]
    fn stale_entries_are_dropped_once_the_heap_has_doubled() {
        // One live connection refreshed again and again: each refresh leaves
        // an entry behind that only its latest expiry makes current.
        let mut e = Expiries::default();
        let n = COMPACT_MIN_ENTRIES as u64 + 1;
        for exp in 0..n {
            e.push(1_000 + exp, 7, None);
        }
        let latest = 1_000 + n - 1;
        assert_eq!(e.take_due(0, |(exp, id, _)| *id == 7 && *exp == latest), []);
        assert_eq!(e.heap.len(), 1, "only the current entry survives the compaction");
        assert_eq!(e.compact_at, COMPACT_MIN_ENTRIES);
        // Below the threshold nothing is compacted (no walk per sweep).
        e.push(5_000, 8, None);
        assert_eq!(e.take_due(0, |_| false), []);
        assert_eq!(e.heap.len(), 2);
    }
}
