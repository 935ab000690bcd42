//! Runtime helpers every per-shard task uses: waiting until there is work
//! (`until`), a value filled in later (`Oneshot`) and yielding to the back
//! of the run queue (`Yielder`). Single-threaded (`Rc`, `Cell`): each lives
//! on one shard's thread. Also the log throttle (`Throttle`,
//! `warn_throttled!`), which any thread may use. A leaf: imports nothing
//! from the crate.

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

/// At most one line per log site per this interval (`warn_throttled!`).
pub const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A log site's throttle: lets one line through per interval and counts the
/// ones it held back, reported with the next line. Shared by every thread
/// that reaches the site (two atomics, no lock).
pub struct Throttle {
    /// When the last line went out, in ms since `origin()` plus one (0: never).
    last: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new()
    }
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle { last: std::sync::atomic::AtomicU64::new(0), suppressed: std::sync::atomic::AtomicU64::new(0) }
    }

    /// `Some(n)`: write the line now, `n` lines were held back since the
    /// last one; `None`: hold this one back (counted).
    pub fn allow(&self, every: std::time::Duration) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = u64::try_from(ORIGIN.get_or_init(std::time::Instant::now).elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let last = self.last.load(Relaxed);
        let every = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        if (last != 0 && now.saturating_sub(last) < every)
            || self.last.compare_exchange(last, now, Relaxed, Relaxed).is_err()
        {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}

/// `tracing::warn!` for a site that can fire per command, message or
/// connection: at most one line per `rt::LOG_EVERY` at this site (all
/// threads together), each carrying `suppressed`, the lines held back since
/// the last one.
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::rt::Throttle = $crate::rt::Throttle::new();
        if let Some(suppressed) = THROTTLE.allow($crate::rt::LOG_EVERY) {
            ::tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::Throttle;
    use std::time::Duration;

    #[test]
    fn the_throttle_lets_one_line_per_interval_through_and_counts_the_rest() {
        let t = Throttle::new();
        let every = Duration::from_millis(200);
        assert_eq!(t.allow(every), Some(0), "the first line goes out");
        for _ in 0..1000 {
            assert_eq!(t.allow(every), None, "held back within the interval");
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.allow(every), Some(1000), "the next line reports what was held back");
        assert_eq!(t.allow(every), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.allow(every), Some(1));
    }

    #[test]
    fn the_throttle_holds_across_threads() {
        static T: Throttle = Throttle::new();
        let every = Duration::from_secs(60);
        let passed: usize = (0..4)
            .map(|_| std::thread::spawn(move || (0..10_000).filter(|_| T.allow(every).is_some()).count()))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(passed, 1, "one line in the interval, whichever thread");
    }
}
