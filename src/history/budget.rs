//! How much history reading a connection and a shard may have going
//! (PROTOCOL.md §7 leaves the bound to the implementation; docs/history.md says
//! what it is).
//!
//! - Per connection: `conn::limits::ReadBudget`, kept inside `Conn`.
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

/// Reads one shard has at the store at once (Redis pipelines them).
pub const SHARD_IN_FLIGHT: usize = 128;
/// Reads waiting for a place beyond which a shard refuses new ones.
pub const SHARD_WAITING: usize = 50_000;

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
