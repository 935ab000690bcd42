//! Runtime helpers every per-shard task uses: waiting until there is work
//! (`until`), a value filled in later (`Oneshot`) and yielding to the back
//! of the run queue (`Yielder`). Single-threaded (`Rc`, `Cell`): each lives
//! on one shard's thread. A leaf: imports nothing from the crate.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Resolves once `ready()` holds. Whoever makes it hold wakes the task
/// through `slot` (`slot.take()` then `wake()`): the single-threaded
/// "wait until there is work" used by the shard's long-lived tasks.
pub async fn until(slot: &Cell<Option<Waker>>, ready: impl Fn() -> bool) {
    poll_fn(|cx| {
        if ready() {
            Poll::Ready(())
        } else {
            slot.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    })
    .await
}

/// A value that another task (or, through the inbox, another shard) fills
/// in later; `wait` resolves once it is there. Single-threaded (`Rc`).
pub struct Oneshot<T>(Rc<OneshotInner<T>>);

struct OneshotInner<T> {
    value: RefCell<Option<T>>,
    waker: Cell<Option<Waker>>,
}

impl<T> Clone for Oneshot<T> {
    fn clone(&self) -> Self {
        Oneshot(self.0.clone())
    }
}

impl<T> Default for Oneshot<T> {
    fn default() -> Self {
        Oneshot(Rc::new(OneshotInner { value: RefCell::new(None), waker: Cell::new(None) }))
    }
}

impl<T> Oneshot<T> {
    pub fn fill(&self, v: T) {
        *self.0.value.borrow_mut() = Some(v);
        if let Some(w) = self.0.waker.take() {
            w.wake();
        }
    }

    pub async fn wait(&self) -> T {
        poll_fn(|cx| match self.0.value.borrow_mut().take() {
            Some(v) => Poll::Ready(v),
            None => {
                self.0.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// Lets every other ready task run before the caller continues.
///
/// Not `wake_by_ref` + `Pending`: monoio puts a task that wakes itself
/// during its own poll at the *front* of the run queue, so it would run
/// again at once and, on the epoll driver (where readiness is answered
/// without waiting), one busy connection would starve every other task
/// on the shard. Instead the waker is parked here and woken by the yield
/// task (`run`): a wake from another task goes to the back of the queue,
/// behind everything that became ready meanwhile.
#[derive(Default)]
pub struct Yielder {
    /// Tasks that yielded, woken by `run`.
    parked: RefCell<Vec<Waker>>,
    /// Wakes the yield task when `parked` becomes non-empty.
    waker: Cell<Option<Waker>>,
}

impl Yielder {
    pub async fn yield_now(&self) {
        let mut parked = false;
        poll_fn(|cx| {
            if parked {
                return Poll::Ready(());
            }
            parked = true;
            let mut waiting = self.parked.borrow_mut();
            if waiting.is_empty()
                && let Some(w) = self.waker.take()
            {
                w.wake();
            }
            waiting.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The yield task: wakes, from the back of the run queue, the tasks
    /// that yielded.
    pub async fn run(&self) {
        let mut batch: Vec<Waker> = Vec::new();
        loop {
            until(&self.waker, || !self.parked.borrow().is_empty()).await;
            std::mem::swap(&mut batch, &mut *self.parked.borrow_mut());
            batch.drain(..).for_each(Waker::wake);
        }
    }
}
