//! ④ Per-connection limits: the liveness stamp the heartbeat sweep reads
//! (`shard::heartbeat`), the inbound op rate (`--max-ops-per-sec`) and the
//! room count (`--max-rooms-per-connection`).
//!
//! Everything here is O(1) per op and lives in a few `Cell`s inside `Conn`
//! (16 bytes): coarse clocks, no timer and no task per connection.
//!
//! # The op rate
//!
//! A token bucket: `N` ops per second, up to `2N` in a burst. Tokens are kept
//! in thousandths so that a coarse millisecond clock (`CLOCK_MONOTONIC_COARSE`,
//! one vDSO read, a few ms resolution) refills fractions of a token. An op
//! beyond the bucket gets `error` `rate_limited`; a client that collects more
//! than `ABUSE_STRIKES` refusals without pausing long enough for the bucket to
//! fill up again is closed with 1008.

use std::cell::Cell;
use std::rc::Rc;

use super::Conn;
use super::shard_io::ShardIo;
use crate::protocol::{ErrorCode, event};
use crate::ws::CloseCode;

/// Refusals (`rate_limited`) without a full bucket in between before the
/// connection is closed with 1008.
pub const ABUSE_STRIKES: u16 = 50;

/// Reads (recovering subscribes and `history` ops) per second per connection.
pub const CONN_READS_PER_SEC: u32 = 20;
/// The largest burst, whatever `--max-rooms-per-connection` says.
pub const MAX_BURST: u32 = 1000;

/// The burst for a node with `max_rooms` rooms per connection (0 = unlimited).
pub fn burst(max_rooms: usize) -> u32 {
    let rooms = if max_rooms == 0 { MAX_BURST as usize } else { max_rooms.min(MAX_BURST as usize) };
    (2 * CONN_READS_PER_SEC).max(rooms as u32)
}
/// How many history reads (recovering subscribes and `history` ops) a
/// connection may have going (PROTOCOL.md §7 leaves the bound to the
/// implementation): a token bucket of `CONN_READS_PER_SEC` with a burst of
/// `burst` (the larger of twice the rate and `--max-rooms-per-connection`,
/// so that a client that reconnects can recover all its rooms at once), and
/// at most `burst` reads in flight. Beyond either, the op gets
/// `rate_limited` and nothing is read. Three `Cell`s inside `Conn`.
#[derive(Default)]
pub struct ReadBudget {
    in_flight: Cell<u32>,
    /// Tokens spent and not yet refilled, in thousandths (0 = full).
    spent: Cell<u32>,
    /// Coarse milliseconds of the last refill.
    refilled: Cell<u32>,
}

impl ReadBudget {
    /// Takes one read at `now_ms` from a bucket of `burst`; false: refuse it
    /// (`rate_limited`).
    pub fn take(&self, now_ms: u32, burst: u32) -> bool {
        if self.in_flight.get() >= burst {
            return false;
        }
        let rate = u64::from(CONN_READS_PER_SEC);
        let full = u64::from(burst) * 1000;
        let elapsed = u64::from(now_ms.wrapping_sub(self.refilled.get()));
        let spent = u64::from(self.spent.get()).saturating_sub(elapsed * rate);
        self.refilled.set(now_ms);
        if spent + 1000 > full {
            self.spent.set(spent as u32);
            return false;
        }
        self.spent.set((spent + 1000) as u32);
        self.in_flight.set(self.in_flight.get() + 1);
        true
    }

    /// A read taken with `take` is over.
    pub fn done(&self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
    }
}

#[derive(Default)]
pub(crate) struct Limits {
    /// Heartbeat tick (`ShardIo::tick`) of the last bytes
    /// received; 0 while the socket still speaks HTTP, so the sweep leaves it
    /// to the handshake timeout.
    last_seen: Cell<u32>,
    /// Op tokens taken and not yet refilled, in thousandths (0 = a full bucket).
    spent: Cell<u32>,
    /// Coarse milliseconds of the last refill.
    refilled: Cell<u32>,
    /// Ops refused since the bucket was last full.
    strikes: Cell<u16>,
    /// When the flusher last wrote this connection, in the shard's
    /// milliseconds (wrapping): `--write-delay-ms` holds the frames of a
    /// connection written less than the delay ago (`conn::flush`). Here,
    /// in what would be padding, so that `Conn` keeps its size.
    pub(crate) wrote: Cell<u16>,
}

/// What to do with one inbound op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allow,
    /// Over the rate: refuse it.
    Refuse,
    /// Over the rate for too long: refuse it and close with 1008.
    Abuse,
}

impl Limits {
    /// Stamps the connection as alive at heartbeat tick `tick` (never 0).
    #[inline]
    pub(crate) fn seen(&self, tick: u32) {
        self.last_seen.set(tick);
    }

    /// The tick of the last bytes received; 0 = not a WebSocket yet.
    #[inline]
    pub(crate) fn last_seen(&self) -> u32 {
        self.last_seen.get()
    }

    /// Takes one op token at `now_ms` from a bucket of `rate` ops per second.
    fn take(&self, rate: u32, now_ms: u32) -> Verdict {
        let full = (u64::from(rate) * 2000).min(u64::from(u32::MAX));
        // `rate` per second is `rate` thousandths per millisecond.
        let elapsed = u64::from(now_ms.wrapping_sub(self.refilled.get()));
        let spent = u64::from(self.spent.get()).saturating_sub(elapsed * u64::from(rate));
        self.refilled.set(now_ms);
        if spent == 0 {
            self.strikes.set(0);
        }
        if spent + 1000 <= full {
            self.spent.set((spent + 1000) as u32);
            return Verdict::Allow;
        }
        self.spent.set(spent as u32);
        let strikes = self.strikes.get().saturating_add(1);
        self.strikes.set(strikes);
        if strikes > ABUSE_STRIKES { Verdict::Abuse } else { Verdict::Refuse }
    }
}

/// A coarse monotonic clock in milliseconds (wraps every 49 days; only
/// differences are used).
pub(crate) fn coarse_ms() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1000).wrapping_add(ts.tv_nsec as u64 / 1_000_000) as u32
}

/// Counts one inbound op against the connection's rate (`--max-ops-per-sec`).
pub(crate) fn take_op(shard: &ShardIo, conn: &Conn) -> Verdict {
    match shard.cfg.max_ops_per_sec {
        0 => Verdict::Allow,
        rate => conn.limits.take(rate, coarse_ms()),
    }
}

/// Counts one inbound control frame (ping or pong) against the same rate:
/// over it, a ping goes unanswered; sustained, the connection is cut off.
pub(crate) fn take_control(shard: &ShardIo, conn: &Conn) -> Verdict {
    let v = take_op(shard, conn);
    match v {
        Verdict::Allow => {}
        Verdict::Refuse => shard.m().control_rate_limited_total.inc(),
        Verdict::Abuse => {
            shard.m().control_rate_limited_total.inc();
            shard.m().rate_limit_disconnects_total.inc();
            tracing::debug!(shard = shard.id, conn = conn.id, "control frame flood: cutting off");
        }
    }
    v
}

/// Answers an op refused by `take_op`: `rate_limited` with the op's id, then
/// for `Verdict::Abuse` a close with 1008 (what the client sends after that
/// is dropped unread, RFC 6455 §5.5.1).
pub(crate) fn refuse_op(shard: &ShardIo, conn: &Rc<Conn>, verdict: Verdict, id: Option<&str>) {
    shard.m().client_errors_total.inc();
    shard.m().rate_limited_total.inc();
    conn.push(shard, event::error(ErrorCode::RateLimited, "too many ops, slow down", id));
    if verdict == Verdict::Abuse {
        shard.m().rate_limit_disconnects_total.inc();
        tracing::debug!(shard = shard.id, conn = conn.id, "rate limit abuse: closing");
        conn.close(shard, CloseCode::POLICY);
    }
}

/// Would subscribing `conn` to `room` pass `--max-rooms-per-connection`?
/// (Subscribing again to a room it is in is not refused.)
pub(crate) fn too_many_rooms(shard: &ShardIo, conn: &Conn, room: &str) -> bool {
    let max = shard.cfg.max_rooms_per_connection;
    max != 0 && conn.with_rooms(|rooms| rooms.len() >= max && !rooms.iter().any(|r| &**r == room))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_of_twice_the_rate_then_refills() {
        let l = Limits::default();
        let t0 = 1000;
        for _ in 0..20 {
            assert_eq!(l.take(10, t0), Verdict::Allow);
        }
        assert_eq!(l.take(10, t0), Verdict::Refuse);
        // 10 ops/s: one token per 100 ms, fractions kept.
        assert_eq!(l.take(10, t0 + 50), Verdict::Refuse);
        assert_eq!(l.take(10, t0 + 100), Verdict::Allow);
        assert_eq!(l.take(10, t0 + 100), Verdict::Refuse);
    }

    #[test]
    fn sustained_refusals_become_abuse_and_a_pause_forgives() {
        let l = Limits::default();
        let t0 = 5;
        for _ in 0..4 {
            assert_eq!(l.take(2, t0), Verdict::Allow);
        }
        for _ in 0..ABUSE_STRIKES {
            assert_eq!(l.take(2, t0), Verdict::Refuse);
        }
        assert_eq!(l.take(2, t0), Verdict::Abuse);
        // A pause that fills the bucket (2 s at 2/s) clears the strikes.
        assert_eq!(l.take(2, t0 + 2000), Verdict::Allow);
        for _ in 0..3 {
            assert_eq!(l.take(2, t0 + 2000), Verdict::Allow);
        }
        assert_eq!(l.take(2, t0 + 2000), Verdict::Refuse);
    }

    #[test]
    fn clock_wrap_is_harmless() {
        let l = Limits::default();
        assert_eq!(l.take(1, u32::MAX - 10), Verdict::Allow);
        assert_eq!(l.take(1, u32::MAX - 10), Verdict::Allow);
        assert_eq!(l.take(1, u32::MAX - 10), Verdict::Refuse);
        assert_eq!(l.take(1, 1000), Verdict::Allow);
    }

    #[test]
    fn a_connection_gets_a_burst_then_the_rate_and_never_too_many_at_once() {
        let b = ReadBudget::default();
        let full = burst(100);
        assert_eq!(full, 100);
        let mut taken = 0;
        while b.take(1000, full) {
            b.done();
            taken += 1;
        }
        assert_eq!(taken, full, "the whole burst at once");
        assert!(!b.take(1020, full));
        assert!(b.take(1050, full), "one token per 50 ms at 20/s");
        // In flight: never more than the burst, even with tokens to spare.
        let b = ReadBudget::default();
        let small = 3;
        for _ in 0..small {
            assert!(b.take(1000, small));
        }
        assert!(!b.take(100_000, small), "in flight");
        b.done();
        assert!(b.take(100_000, small));
        assert_eq!((burst(0), burst(5)), (MAX_BURST, 2 * CONN_READS_PER_SEC));
    }
}
