//! Token expiry (PROTOCOL.md §2, corecast's `token_expired`) and the
//! `refresh` op: a per-shard heap of (expiry, conn id) swept once a second,
//! no timer per connection. Entries are deleted lazily: a refreshed or
//! closed connection's old entry is skipped when it comes up.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::Duration;

use crate::auth::Grant;
use crate::auth::grant::now_secs;
use crate::conn::Conn;
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

#[derive(Default)]
struct Expiries {
    heap: BinaryHeap<Reverse<(u64, ConnId)>>,
    sweeper: bool,
    compact_at: usize,
}

/// Gives an upgraded connection its grant and schedules its expiry check.
pub fn attach(shard: &Rc<Shard>, conn: &Rc<Conn>, grant: Grant) {
    track(shard, conn.id, grant.exp());
    conn.grant.set(Some(Box::new(grant)));
}

fn track(shard: &Rc<Shard>, id: ConnId, exp: u64) {
    EXPIRIES.with(|e| {
        let mut e = e.borrow_mut();
        e.heap.push(Reverse((exp, id)));
        if !e.sweeper {
            // Started by the shard's first authenticated connection: without
            // auth there is no sweeper at all.
            e.sweeper = true;
            e.compact_at = COMPACT_MIN_ENTRIES;
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
    let due: Vec<(u64, ConnId)> = EXPIRIES.with(|e| {
        let mut e = e.borrow_mut();
        let mut due = Vec::new();
        while let Some(&Reverse((exp, id))) = e.heap.peek()
            && exp <= now
        {
            e.heap.pop();
            due.push((exp, id));
        }
        if e.heap.len() > e.compact_at {
            e.heap.retain(|Reverse((exp, id))| current(*id, *exp).is_some());
            e.compact_at = (e.heap.len() * 2).max(COMPACT_MIN_ENTRIES);
        }
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
pub fn refresh(shard: &Rc<Shard>, conn: &Rc<Conn>, me: &str, token: &str, id: Option<&str>) -> Result<(), ErrorCode> {
    let Some(verifier) = shard.cfg.auth.as_deref() else {
        return Err(ErrorCode::BadRequest);
    };
    let v = verifier.verify(token).map_err(|_| ErrorCode::Forbidden)?;
    if v.user != me {
        return Err(ErrorCode::Forbidden);
    }
    let grant = Grant::new(&v);
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
        // Already off the connection's list; this leaves the room table.
        shard.unsubscribe(conn, &room);
        conn.push(shard, event::membership("unsubscribed", &room, None));
    }
    conn.push(shard, event::refreshed(v.exp, id));
    Ok(())
}
