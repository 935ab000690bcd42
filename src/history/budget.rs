//! How much history reading a connection and a shard may have going
//! (PROTOCOL.md §7 leaves the bound to the implementation; README.md says
//! what it is).
//!
//! - Per connection (`ConnBudget`, three `Cell`s inside `Conn`), for the
//!   reads a client asks for (`subscribe` with `since`, `history`): a token
//!   bucket of `CONN_READS_PER_SEC` with a burst of `burst` (the larger of
//!   twice the rate and `--max-rooms-per-connection`, so that a client that
//!   reconnects can recover all its rooms at once), and at most `burst`
//!   reads in flight. Beyond either, the op gets `rate_limited` and nothing
//!   is read.
//! - Per shard (`ShardBudget`): at most `SHARD_IN_FLIGHT` reads sent to the
//!   store at once; the others wait in FIFO order (a recovery storm is served
//!   in turn, never all at once); beyond `SHARD_WAITING` waiting, new ones
//!   get `rate_limited`.
//!
//! Nothing here blocks: a read that has to wait is a parked task.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Reads (recovering subscribes and `history` ops) per second per connection.
pub const CONN_READS_PER_SEC: u32 = 20;
/// The largest burst, whatever `--max-rooms-per-connection` says.
pub const MAX_BURST: u32 = 1000;

/// The burst for a node with `max_rooms` rooms per connection (0 = unlimited).
pub fn burst(max_rooms: usize) -> u32 {
    let rooms = if max_rooms == 0 { MAX_BURST as usize } else { max_rooms.min(MAX_BURST as usize) };
    (2 * CONN_READS_PER_SEC).max(rooms as u32)
}
/// Reads one shard has at the store at once (Redis pipelines them).
pub const SHARD_IN_FLIGHT: usize = 128;
/// Reads waiting for a place beyond which a shard refuses new ones.
pub const SHARD_WAITING: usize = 50_000;

/// Per connection; lives in `Conn`.
#[derive(Default)]
pub struct ConnBudget {
    in_flight: Cell<u32>,
    /// Tokens spent and not yet refilled, in thousandths (0 = full).
    spent: Cell<u32>,
    /// Coarse milliseconds of the last refill.
    refilled: Cell<u32>,
}

impl ConnBudget {
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

/// Per shard: a FIFO semaphore without locks (single-threaded), O(1) per
/// wait and per release.
#[derive(Default)]
pub struct ShardBudget {
    in_flight: Cell<usize>,
    waiting: RefCell<VecDeque<Rc<Waiter>>>,
}

#[derive(Default)]
struct Waiter {
    /// A released place was handed to this waiter.
    granted: Cell<bool>,
    /// The waiting task was dropped: skip it.
    gone: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

/// A place taken from a `ShardBudget`; gives it back when dropped.
pub struct Permit<'a>(&'a ShardBudget);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl ShardBudget {
    /// Can one more read queue here? (Checked before anything is changed.)
    pub fn has_room(&self) -> bool {
        self.waiting.borrow().len() < SHARD_WAITING
    }

    /// Reads waiting for a place.
    pub fn waiting(&self) -> usize {
        self.waiting.borrow().len()
    }

    /// A place is free: it passes straight to the next one in line, if any.
    fn release(&self) {
        loop {
            let next = self.waiting.borrow_mut().pop_front();
            match next {
                Some(w) if w.gone.get() => continue,
                Some(w) => {
                    w.granted.set(true);
                    if let Some(k) = w.waker.take() {
                        k.wake();
                    }
                    return;
                }
                None => {
                    self.in_flight.set(self.in_flight.get() - 1);
                    return;
                }
            }
        }
    }

    /// Waits for a place (FIFO).
    pub async fn acquire(&self) -> Permit<'_> {
        if self.in_flight.get() < SHARD_IN_FLIGHT && self.waiting.borrow().is_empty() {
            self.in_flight.set(self.in_flight.get() + 1);
            return Permit(self);
        }
        let w = Rc::new(Waiter::default());
        self.waiting.borrow_mut().push_back(w.clone());
        let mut guard = Waiting { budget: self, w, done: false };
        poll_fn(|cx| {
            if guard.w.granted.get() {
                return Poll::Ready(());
            }
            guard.w.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        guard.done = true;
        Permit(self)
    }
}

/// Takes a waiter that gave up (its task was dropped) out of the line, or
/// passes on a place it was granted but never used.
struct Waiting<'a> {
    budget: &'a ShardBudget,
    w: Rc<Waiter>,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.w.granted.get() {
            self.budget.release();
        } else {
            self.w.gone.set(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_gets_a_burst_then_the_rate_and_never_too_many_at_once() {
        let b = ConnBudget::default();
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
        let b = ConnBudget::default();
        let small = 3;
        for _ in 0..small {
            assert!(b.take(1000, small));
        }
        assert!(!b.take(100_000, small), "in flight");
        b.done();
        assert!(b.take(100_000, small));
        assert_eq!((burst(0), burst(5)), (MAX_BURST, 2 * CONN_READS_PER_SEC));
    }

    #[test]
    fn the_shard_budget_serves_waiters_in_order_and_passes_on_places() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().unwrap();
        rt.block_on(async {
            let b: &'static ShardBudget = Box::leak(Box::default());
            let held: Vec<Permit<'static>> = futures_lite_join(b, SHARD_IN_FLIGHT).await;
            let order = Rc::new(RefCell::new(Vec::new()));
            let tasks: Vec<_> = (0..3)
                .map(|i| {
                    let order = order.clone();
                    monoio::spawn(async move {
                        let _p = b.acquire().await;
                        order.borrow_mut().push(i);
                    })
                })
                .collect();
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            assert_eq!(b.waiting(), 3);
            assert!(order.borrow().is_empty(), "all places are taken");
            drop(held);
            for t in tasks {
                t.await;
            }
            assert_eq!(*order.borrow(), [0, 1, 2]);
            assert_eq!(b.in_flight.get(), 0, "every place came back");
        });
    }

    async fn futures_lite_join(b: &'static ShardBudget, n: usize) -> Vec<Permit<'static>> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(b.acquire().await);
        }
        v
    }
}
