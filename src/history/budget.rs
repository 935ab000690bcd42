//! How much history reading a connection and a shard may have going
//! (PROTOCOL.md §7 leaves the bound to the implementation; README.md says
//! what it is).
//!
//! - Per connection (`ConnBudget`, three `Cell`s inside `Conn`): at most
//!   `CONN_IN_FLIGHT` reads at once, and a token bucket of
//!   `CONN_READS_PER_SEC` (burst twice that). Beyond either, the op gets
//!   `rate_limited` and nothing is read.
//! - Per shard (`ShardBudget`): at most `SHARD_IN_FLIGHT` reads sent to the
//!   store at once; the others wait in FIFO order (a recovery storm is served
//!   in turn, never all at once); beyond `SHARD_WAITING` waiting, new ones
//!   get `rate_limited`.
//!
//! Nothing here blocks: a read that has to wait is a parked task.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Reads one connection may have going at once.
pub const CONN_IN_FLIGHT: u8 = 4;
/// Reads (recovering subscribes and `history` ops) per second per connection.
pub const CONN_READS_PER_SEC: u32 = 10;
/// Reads one shard has at the store at once (Redis pipelines them).
pub const SHARD_IN_FLIGHT: usize = 128;
/// Reads waiting for a place beyond which a shard refuses new ones.
pub const SHARD_WAITING: usize = 50_000;

/// Per connection; lives in `Conn`.
#[derive(Default)]
pub struct ConnBudget {
    in_flight: Cell<u8>,
    /// Tokens spent and not yet refilled, in thousandths (0 = full).
    spent: Cell<u32>,
    /// Coarse milliseconds of the last refill.
    refilled: Cell<u32>,
}

impl ConnBudget {
    /// Takes one read at `now_ms`; false: refuse it (`rate_limited`).
    pub fn take(&self, now_ms: u32) -> bool {
        if self.in_flight.get() >= CONN_IN_FLIGHT {
            return false;
        }
        let rate = u64::from(CONN_READS_PER_SEC);
        let full = rate * 2000;
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

/// Per shard: a FIFO semaphore without locks (single-threaded).
#[derive(Default)]
pub struct ShardBudget {
    in_flight: Cell<usize>,
    waiting: RefCell<VecDeque<(u64, Option<Waker>)>>,
    next_ticket: Cell<u64>,
    /// The ticket whose turn it is to take a freed place.
    granted: RefCell<Vec<u64>>,
}

/// A place taken from a `ShardBudget`; gives it back when dropped.
pub struct Permit<'a>(&'a ShardBudget);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let b = self.0;
        let next = b.waiting.borrow_mut().pop_front();
        match next {
            // The place passes straight to the next in line.
            Some((ticket, waker)) => {
                b.granted.borrow_mut().push(ticket);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            None => b.in_flight.set(b.in_flight.get() - 1),
        }
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

    /// Waits for a place (FIFO).
    pub async fn acquire(&self) -> Permit<'_> {
        if self.in_flight.get() < SHARD_IN_FLIGHT && self.waiting.borrow().is_empty() {
            self.in_flight.set(self.in_flight.get() + 1);
            return Permit(self);
        }
        let ticket = self.next_ticket.replace(self.next_ticket.get() + 1);
        self.waiting.borrow_mut().push_back((ticket, None));
        let mut guard = Waiting { budget: self, ticket, done: false };
        poll_fn(|cx| {
            let mut granted = self.granted.borrow_mut();
            if let Some(i) = granted.iter().position(|&t| t == ticket) {
                granted.swap_remove(i);
                return Poll::Ready(());
            }
            if let Some(w) = self.waiting.borrow_mut().iter_mut().find(|(t, _)| *t == ticket) {
                w.1 = Some(cx.waker().clone());
            }
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
    ticket: u64,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let b = self.budget;
        let mut waiting = b.waiting.borrow_mut();
        if let Some(i) = waiting.iter().position(|(t, _)| *t == self.ticket) {
            waiting.remove(i);
            return;
        }
        drop(waiting);
        let mut granted = b.granted.borrow_mut();
        if let Some(i) = granted.iter().position(|&t| t == self.ticket) {
            granted.swap_remove(i);
            drop(granted);
            drop(Permit(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_gets_a_burst_then_the_rate_and_never_too_many_at_once() {
        let b = ConnBudget::default();
        for _ in 0..CONN_IN_FLIGHT {
            assert!(b.take(1000));
        }
        assert!(!b.take(1000), "in flight");
        for _ in 0..CONN_IN_FLIGHT {
            b.done();
        }
        let mut taken = CONN_IN_FLIGHT as u32;
        while b.take(1000) {
            b.done();
            taken += 1;
        }
        assert_eq!(taken, 2 * CONN_READS_PER_SEC, "burst of twice the rate");
        assert!(!b.take(1050));
        assert!(b.take(1100), "one token per 100 ms at 10/s");
    }
}
