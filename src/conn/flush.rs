//! ④ The shard's flusher: the dirty list → the sockets, once per turn
//! (busy connections held while the shard is behind).
//!
//! In: the connections that got frames since the last pass (`ShardIo::dirty`,
//! filled by `Conn::push` through `mark_dirty`). Out: their queued frames
//! written without blocking. On the io_uring driver a pass becomes one
//! `io_uring_enter` for up to `BATCH` connections: a `SENDMSG` request per
//! connection (its frames as iovecs, `MSG_DONTWAIT` so a full socket fails
//! with EAGAIN instead of waiting), submitted together, each completed inline
//! by the kernel and handed back to its connection (`Conn::sent`). The epoll
//! driver (or a ring that could not be made) writes one `sendmsg(2)` per
//! connection (`Conn::flush`). Either way the pass is bounded: after `BATCH`
//! connections the flusher yields, so a huge room or a recovery storm cannot
//! make the shard deaf to everything else.
//!
//! Holding busy connections (`--write-delay-ms`). A connection the flusher
//! wrote a moment ago can be held back instead (`hold_hot`) and written
//! when the hold timer (`run_held`) gives it back, with everything queued
//! to it meanwhile: a busy connection's frames go out several to a send —
//! fewer, larger packets, the kernel's work per delivery cut — for a little
//! more latency on that connection. A connection that gets a frame now and
//! then (a chat; a 50 msg/s room: 20 ms apart) is never held. The
//! connection's queue limit (`--outbound-queue-bytes`) holds as before.
//! Three modes:
//!
//! - `auto`, the default: held only while the shard is behind (`Behind`):
//!   its turns — from the first frame queued to the end of the pass that
//!   wrote it — filled `ENTER` (75%) of the last `WINDOW` (25 ms), so work
//!   is queued and every frame waits for a turn anyway. Then a connection
//!   written less than `AUTO_DELAY` (2 ms) ago (or in the last pass, when
//!   passes run back to back and take longer) is held for `AUTO_DELAY`.
//!   It leaves when the share the turns would fill without the holds (the
//!   measured share times the frames per write) falls below `LEAVE` (60%).
//!   At light load every frame leaves at the end of its turn, as with 0;
//!   under saturation several leave per send. `corecast_coalescing` says
//!   which.
//! - `N` ms: fixed, as before `auto` existed: a connection written less
//!   than N ms ago is always held, for N ms.
//! - `0`: never held; every dirty connection is written once per turn.
//!
//! Why these numbers. The hold pays off only where one frame per send is
//! the cost: at 100 subscribers x 3000 msg/s a fixed 1 or 2 ms gave 2.4x
//! and 2.9x the deliveries per CPU-second, at 1000 msg/s 1.2x and 1.9x
//! (bench/RESULTS.md, "--write-delay-ms 1 and 2"), but p50 rose by about
//! the delay at loads where the shard had CPU to spare (1000 msg/s: 100k
//! deliveries/s at 231k per CPU-second, about 43% of the core). 75% leaves the shard a quarter idle before it trades latency;
//! 2 ms rather than 1 because the timer's resolution is 1 ms anyway and
//! the saving was larger at both rates; 25 ms is about 75 passes at 3000
//! msg/s, steady enough, and short enough to follow a burst. The leave
//! estimate errs high (a frame's own work does not shrink with the sends),
//! so a shard that entered stays while its load lasts and flips back only
//! when the load has fallen well below what put it behind.
//!
//! The ring is the flusher's own (monoio's ring carries the connections'
//! reads and readiness; its operations are futures, one per socket, which is
//! the per-connection cost this avoids). Frames stay owned by their queues
//! until completion: submission and completion happen in one synchronous
//! step, with no await in between, so nothing can touch a queue while the
//! kernel reads it.

use std::rc::Rc;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};
use tracing::{debug, warn};

use super::Conn;
use super::outbox::{EMPTY_IOV, SEND_FLAGS};
use super::shard_io::ShardIo;
use crate::config::WriteDelay;
use crate::rt::until;

/// Connections per pass (and per `io_uring_enter`); a power of two (ring size).
const BATCH: usize = 512;
/// Frames one batched send takes; a connection with more gets the rest by
/// `sendmsg` right after (fan-out queues rarely hold more between turns).
const IOV_PER_SLOT: usize = 8;

/// One request's memory: the kernel reads `msg` and `iov` until completion.
struct Slot {
    iov: [libc::iovec; IOV_PER_SLOT],
    msg: libc::msghdr,
    want: usize,
}

/// The io_uring path's state: the ring and one slot per request.
struct Batcher {
    ring: IoUring,
    /// Never resized after creation: `msg.msg_iov` points into it.
    slots: Box<[Slot]>,
}

impl Batcher {
    fn new() -> std::io::Result<Batcher> {
        let ring = IoUring::new(BATCH as u32)?;
        let slots = (0..BATCH)
            .map(|_| Slot {
                iov: [EMPTY_IOV; IOV_PER_SLOT],
                // SAFETY: msghdr is plain data; all-zero is a valid empty header.
                msg: unsafe { std::mem::zeroed() },
                want: 0,
            })
            .collect();
        Ok(Batcher { ring, slots })
    }

    /// Writes out `conns` (at most `BATCH`) in one submission.
    fn flush(&mut self, shard: &Rc<ShardIo>, conns: &[Rc<Conn>]) {
        debug_assert!(conns.len() <= BATCH);
        let mut queued = 0usize;
        let mut sq = self.ring.submission();
        for (i, conn) in conns.iter().enumerate() {
            if !conn.take_turn() {
                continue;
            }
            if sq.is_full() {
                // Unreachable (BATCH entries, BATCH connections at most):
                // this one the plain way.
                conn.flush(shard);
                continue;
            }
            let slot = &mut self.slots[i];
            let (n, want) = conn.prepare_send(&mut slot.iov);
            slot.want = want;
            slot.msg.msg_iov = slot.iov.as_mut_ptr();
            slot.msg.msg_iovlen = n;
            let sqe = opcode::SendMsg::new(types::Fd(conn.fd), &slot.msg)
                .flags(SEND_FLAGS as u32)
                .build()
                .user_data(i as u64);
            // SAFETY: the slot (msghdr and iovecs) and the frames it points
            // into stay alive and unchanged until its completion is read in
            // `complete` below, before this function returns; at most BATCH
            // requests (the ring's size) are pushed between two submissions,
            // and the queue is not full (checked above).
            if unsafe { sq.push(&sqe) }.is_ok() {
                queued += 1;
            } else {
                // Cannot happen; if it did, the writer task takes over.
                conn.sent(shard, -libc::EAGAIN, 0);
            }
        }
        drop(sq);
        self.complete(shard, conns, queued);
    }

    /// Enters the kernel once for the `n` queued requests and hands every
    /// completion to its connection.
    fn complete(&mut self, shard: &Rc<ShardIo>, conns: &[Rc<Conn>], n: usize) {
        if n == 0 {
            return;
        }
        let mut done = 0;
        let mut warned = false;
        while done < n {
            // Every request completes inline (MSG_DONTWAIT: data queued, a
            // short count, or EAGAIN), so this returns without sleeping.
            if let Err(e) = self.ring.submit_and_wait(n - done) {
                // Not taken (EINTR, or the kernel short of memory): the
                // requests still point at live slots and frames, so they
                // must be submitted before anything here moves on.
                if e.raw_os_error() != Some(libc::EINTR) && !warned {
                    warn!(shard = shard.id, error = %e, "io_uring submit failed; retrying");
                    warned = true;
                }
                std::thread::yield_now();
                continue;
            }
            for cqe in self.ring.completion() {
                let i = cqe.user_data() as usize;
                conns[i].sent(shard, cqe.result(), self.slots[i].want);
                done += 1;
            }
        }
        shard.m().sends_batched_total.add(done as u64);
        shard.m().socket_writes_total.add(done as u64);
        shard.m().send_batches_total.inc();
    }
}

impl ShardIo {
    /// The flusher task (see the module docs).
    pub async fn run_flusher(self: Rc<Self>) {
        let mut batcher = if self.driver == "io_uring" && self.cfg.batched_sends {
            match Batcher::new() {
                Ok(b) => Some(b),
                Err(e) => {
                    debug!(shard = self.id, error = %e, "no io_uring for sends; one sendmsg each");
                    None
                }
            }
        } else {
            None
        };
        let mut batch: Vec<Rc<Conn>> = Vec::new();
        let auto = self.cfg.write_delay == WriteDelay::Auto;
        let fixed = match self.cfg.write_delay {
            WriteDelay::Fixed(d) => {
                // A fixed delay holds always: the gauge says so.
                self.m().coalescing.add(1);
                d.as_millis() as u16
            }
            _ => 0,
        };
        let mut behind = Behind::new(Instant::now());
        loop {
            let work = until(&self.flusher, || !self.dirty.borrow().is_empty());
            if behind.on {
                // While coalescing, judge again after a window even if no
                // work comes: a shard that went quiet is not behind.
                if monoio::time::timeout(WINDOW, work).await.is_err() {
                    self.judge(&mut behind, Instant::now());
                    continue;
                }
            } else {
                work.await;
            }
            let since = self.dirty_since.take();
            std::mem::swap(&mut batch, &mut *self.dirty.borrow_mut());
            let mut start = None;
            if fixed > 0 {
                self.hold_hot(&mut batch, fixed);
            } else if auto {
                let now = Instant::now();
                start = Some(since.unwrap_or(now));
                if self.judge(&mut behind, now) {
                    self.hold_hot(&mut batch, behind.hot(now));
                }
                behind.last_start = now;
            }
            let mut chunks = batch.chunks(BATCH).peekable();
            while let Some(chunk) = chunks.next() {
                match &mut batcher {
                    Some(b) => b.flush(&self, chunk),
                    None => chunk.iter().for_each(|c| c.flush(&self)),
                }
                if chunks.peek().is_some() {
                    self.yield_now().await;
                }
            }
            batch.clear();
            if let Some(start) = start {
                behind.turn(start, Instant::now());
            }
        }
    }

    /// `--write-delay-ms auto`: closes `behind`'s window if it is due,
    /// keeps the gauge in step, and says whether the shard is behind.
    fn judge(&self, behind: &mut Behind, now: Instant) -> bool {
        let m = self.m();
        if let Some(on) = behind.update(now, m.messages_out_total.get(), m.socket_writes_total.get()) {
            if on {
                m.coalescing.add(1);
                m.coalescing_entries_total.inc();
            } else {
                m.coalescing.sub(1);
            }
            debug!(shard = self.id, coalescing = on, "the shard is {}", if on { "behind" } else { "keeping up" });
        }
        behind.on
    }

    /// The shard's clock for `Limits::wrote`: milliseconds since it started,
    /// wrapping at 65.5 s (only differences below the delay matter).
    fn ms(&self) -> u16 {
        self.started.elapsed().as_millis() as u16
    }

    /// How long a held connection waits: `None` if the flusher never holds
    /// (the config caps a fixed delay at 1 s, far below the `ms` clock's
    /// 65.5 s wrap).
    fn hold_delay(&self) -> Option<Duration> {
        match self.cfg.write_delay {
            WriteDelay::Off => None,
            WriteDelay::Fixed(d) => Some(d),
            WriteDelay::Auto => Some(AUTO_DELAY),
        }
    }

    /// Takes out of `batch` the connections written less than `delay` ms
    /// ago (they stay marked dirty, so what is queued to them meanwhile
    /// joins them) and hands them to the hold timer; the others are stamped
    /// as written now.
    fn hold_hot(&self, batch: &mut Vec<Rc<Conn>>, delay: u16) {
        let now = self.ms();
        let mut held = self.held.borrow_mut();
        let before = held.len();
        batch.retain(|c| {
            if now.wrapping_sub(c.limits.wrote.get()) < delay {
                held.push(c.clone());
                false
            } else {
                c.limits.wrote.set(now);
                true
            }
        });
        self.m().writes_held_total.add((held.len() - before) as u64);
        if before == 0
            && !held.is_empty()
            && let Some(w) = self.held_waker.take()
        {
            w.wake();
        }
    }

    /// The hold timer task: the delay after a connection was first held,
    /// gives every held connection back to the flusher, stamped so that it
    /// is written in that pass (as written `RELEASED` ms ago, longer than
    /// any hold's threshold). A held frame therefore waits at most the
    /// delay (plus the timer's 1 ms resolution; with `auto`, plus the rest
    /// of the pass under way when it is given back).
    pub async fn run_held(self: Rc<Self>) {
        let Some(delay) = self.hold_delay() else {
            return;
        };
        let back = RELEASED;
        loop {
            until(&self.held_waker, || !self.held.borrow().is_empty()).await;
            monoio::time::sleep(delay).await;
            let now = self.ms();
            let held = std::mem::take(&mut *self.held.borrow_mut());
            for c in held {
                c.limits.wrote.set(now.wrapping_sub(back));
                self.mark_dirty(c);
            }
        }
    }
}

/// `--write-delay-ms auto`: how long a busy connection is held while its
/// shard is behind. At 3000 frames/s a connection gets about six (2 ms of
/// them) per send; one quieter than a frame per 2 ms is held only when the
/// shard's passes take longer than that (`Behind::hot`).
pub const AUTO_DELAY: Duration = Duration::from_millis(2);

/// While behind, a connection written less than this ago at most is held
/// (`Behind::hot`); and `hold_hot`'s thresholds stay below `RELEASED`.
const MAX_HOT_MS: u16 = 100;

/// How long ago a connection given back by the hold timer counts as
/// written: beyond any threshold (fixed delays are at most 1000 ms, auto's
/// `MAX_HOT_MS`), within the `ms` clock's 65.5 s wrap.
const RELEASED: u16 = 30_000;
const _: () = assert!(MAX_HOT_MS < RELEASED && 1000 < RELEASED, "a connection given back is never held again at once");

/// The window over which `Behind` measures the shard (about 75 passes at
/// 3000 msg/s, and short enough to follow a burst).
const WINDOW: Duration = Duration::from_millis(25);

/// A window whose turns fill at least this share of it puts the shard
/// behind. A shard that is idle a quarter of the time or more still sends
/// every frame at once.
const ENTER: f64 = 0.75;

/// A behind shard keeps holding until the share its turns would have
/// filled without the holds falls below this (an estimate, see `Behind`).
/// Below `ENTER`, so that noise in the estimate does not flip it back and
/// forth; the estimate errs high, so in practice the shard leaves only
/// when the load has fallen well below what put it behind.
const LEAVE: f64 = 0.6;

/// Frames per write above which the estimate stops growing (a flood whose
/// reads bring many messages a turn batches without any hold).
const MAX_FRAMES_PER_WRITE: f64 = 16.0;

/// `--write-delay-ms auto`'s judge: is the shard behind? It measures the
/// share of each `WINDOW` spent in turns: from the moment a frame made the
/// dirty list non-empty (`ShardIo::dirty_since`) to the end of the pass
/// that wrote it, overlaps counted once. A shard that keeps up has idle time
/// between turns; a saturated one starts its next turn as soon as the last
/// ends (the work is queued: in the socket, the inbox, the dirty list).
///
/// Hysteresis: it enters at `ENTER` of a window. Once behind, the holds cut
/// the share (the writes they save are most of a pass's cost), so it leaves
/// on an estimate of the share *without* the holds: the measured share
/// times the window's frames per write (`corecast_messages_out_total` over
/// `corecast_socket_writes_total`, at most `MAX_FRAMES_PER_WRITE`), as if
/// every frame had cost a write of its own, below `LEAVE`. That errs high
/// (a frame's own work does not shrink with the writes, and some frames
/// share a write without holds), so a shard that entered at `ENTER` stays
/// while the load lasts. A window is judged at the first pass after it
/// ends (or after one idle window while behind), so it takes one window to
/// enter and one to leave.
struct Behind {
    on: bool,
    /// When the last pass started (`hot`).
    last_start: Instant,
    /// Start of the current window.
    from: Instant,
    /// Time in turns in the current window.
    busy: Duration,
    /// End of the last pass: a turn counts from no earlier than this.
    last_end: Instant,
    /// The shard's frames queued and socket writes when the window began.
    frames: u64,
    writes: u64,
}

impl Behind {
    fn new(now: Instant) -> Behind {
        Behind { on: false, last_start: now, from: now, busy: Duration::ZERO, last_end: now, frames: 0, writes: 0 }
    }

    /// While behind, which connections a pass starting `now` holds: those
    /// written less than this many ms ago. `AUTO_DELAY`; or, when this
    /// pass follows the last one closely (less than `AUTO_DELAY` after it
    /// ended), since the last one started if that is longer: a connection
    /// that got frames in two passes running is busy at the shard's own
    /// pace, even when a pass takes longer than the delay (a large room, a
    /// slow or shared core). Not after a gap: a room that gets a message
    /// every 20 ms is not held because each takes a long pass. In ms on the
    /// `ms` clock, rounded up; at most `MAX_HOT_MS`.
    fn hot(&self, now: Instant) -> u16 {
        let delay = AUTO_DELAY.as_millis() as u64;
        let close = now.saturating_duration_since(self.last_end) < AUTO_DELAY;
        let since = if close { now.saturating_duration_since(self.last_start).as_millis() as u64 + 1 } else { 0 };
        since.clamp(delay, MAX_HOT_MS as u64) as u16
    }

    /// Closes the window if it has lasted `WINDOW` by `now`, given the
    /// shard's frames queued and socket writes so far; returns the new
    /// state if it changed.
    fn update(&mut self, now: Instant, frames: u64, writes: u64) -> Option<bool> {
        let span = now.saturating_duration_since(self.from);
        if span < WINDOW {
            return None;
        }
        let share = self.busy.as_secs_f64() / span.as_secs_f64();
        let was = self.on;
        if !self.on {
            self.on = share >= ENTER;
        } else {
            let (f, w) = (frames.wrapping_sub(self.frames), writes.wrapping_sub(self.writes));
            let per_write = if w == 0 { 1.0 } else { (f as f64 / w as f64).clamp(1.0, MAX_FRAMES_PER_WRITE) };
            self.on = share * per_write >= LEAVE;
        }
        (self.from, self.busy, self.frames, self.writes) = (now, Duration::ZERO, frames, writes);
        (self.on != was).then_some(self.on)
    }

    /// A pass whose first frame was queued at `since` ended at `end`.
    fn turn(&mut self, since: Instant, end: Instant) {
        let from = since.max(self.last_end).max(self.from);
        self.busy += end.saturating_duration_since(from);
        self.last_end = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A shard's clock and counters as `Behind` sees them.
    struct Sim {
        t: Instant,
        frames: u64,
        writes: u64,
    }

    impl Sim {
        fn new() -> Sim {
            Sim { t: Instant::now(), frames: 0, writes: 0 }
        }

        /// Runs `n` passes of the flusher through `b`, one every `period`,
        /// each a turn of `busy` that queues `frames` frames and writes
        /// `writes` times, judging at each pass's start as the flusher does;
        /// returns every change of state.
        fn passes(
            &mut self,
            b: &mut Behind,
            n: usize,
            (period, busy): (Duration, Duration),
            (frames, writes): (u64, u64),
        ) -> Vec<bool> {
            let mut changes = Vec::new();
            for _ in 0..n {
                changes.extend(b.update(self.t, self.frames, self.writes));
                b.turn(self.t, self.t + busy);
                (self.frames, self.writes) = (self.frames + frames, self.writes + writes);
                self.t += period;
            }
            changes
        }
    }

    const MS: Duration = Duration::from_millis(1);
    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_shard_idle_a_quarter_of_the_time_is_not_behind() {
        let mut sim = Sim::new();
        let mut b = Behind::new(sim.t);
        // 100 x 1000 msg/s: a 0.35 ms pass every ms; then 70%.
        let changes = sim.passes(&mut b, 200, (MS, 350 * US), (100, 100));
        assert!(changes.is_empty() && !b.on, "{changes:?}");
        let changes = sim.passes(&mut b, 200, (MS, 700 * US), (100, 100));
        assert!(changes.is_empty() && !b.on, "{changes:?}");
    }

    #[test]
    fn a_saturated_shard_is_behind_within_two_windows_and_stays_while_holds_save_the_work() {
        let mut sim = Sim::new();
        let mut b = Behind::new(sim.t);
        // Back to back: a 330 us pass every 333 us, a write per frame.
        let changes = sim.passes(&mut b, 160, (333 * US, 330 * US), (100, 100));
        assert_eq!(changes, [true]);
        // Holding: three frames per write, the passes take a third of the
        // time; without the holds the shard would still be full.
        let changes = sim.passes(&mut b, 300, (333 * US, 110 * US), (100, 33));
        assert!(changes.is_empty() && b.on, "{changes:?}");
        // The load falls to a tenth: short passes, few frames per write.
        let changes = sim.passes(&mut b, 60, (MS, 100 * US), (100, 90));
        assert_eq!(changes, [false]);
        // And does not come back at that load.
        let changes = sim.passes(&mut b, 200, (MS, 100 * US), (100, 100));
        assert!(changes.is_empty() && !b.on, "{changes:?}");
    }

    #[test]
    fn a_burst_then_silence_leaves_at_the_first_judgement() {
        let t = Instant::now();
        let mut b = Behind::new(t);
        // One 30 ms pass (a room of 10k): the window it ends in is full.
        b.turn(t, t + 30 * MS);
        assert_eq!(b.update(t + 30 * MS, 10_000, 10_000), Some(true));
        // Nothing for a second: the next judgement (a pass, or the
        // flusher's idle timeout) finds the window empty.
        assert_eq!(b.update(t + 1030 * MS, 10_000, 10_000), Some(false));
    }

    #[test]
    fn behind_the_hold_covers_the_delay_or_the_last_pass_if_longer_and_just_over() {
        let t = Instant::now();
        let mut b = Behind::new(t);
        (b.last_start, b.last_end) = (t, t + 200 * US);
        assert_eq!(b.hot(t + 300 * US), 2, "AUTO_DELAY");
        // A pass that took 5.5 ms, the next right after it: what the first
        // wrote is held in the next.
        b.last_end = t + 5500 * US;
        assert_eq!(b.hot(t + 5600 * US), 6);
        b.last_end = t + 20 * Duration::from_secs(1);
        assert_eq!(b.hot(t + 20 * Duration::from_secs(1)), MAX_HOT_MS);
        // The same pass, then 3 ms idle: only the last 2 ms count.
        b.last_end = t + 5500 * US;
        assert_eq!(b.hot(t + 8500 * US), 2);
    }

    #[test]
    fn overlapping_turns_count_once() {
        let t = Instant::now();
        let mut b = Behind::new(t);
        // A pass from 0 to 10 ms; the next turn's first frame was queued
        // at 5 ms (during the first pass's yield) and it ends at 12 ms.
        b.turn(t, t + 10 * MS);
        b.turn(t + 5 * MS, t + 12 * MS);
        assert_eq!(b.busy, 12 * MS);
        // 12 ms busy of 25: not behind.
        assert_eq!(b.update(t + WINDOW, 2, 2), None);
        assert!(!b.on);
    }

    /// The property the batching rests on: a send to a full socket completes
    /// at once with EAGAIN (MSG_DONTWAIT), it never waits in the kernel.
    #[test]
    fn a_send_to_a_full_socket_completes_with_eagain_inline() {
        // TCP over loopback, the socket left blocking (as io_uring-driven
        // sockets are): only the flag may keep the request from waiting.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _b = l.accept().unwrap();
        let chunk = vec![0u8; 65536];
        // SAFETY: plain syscall on an owned socket, buffer alive.
        while unsafe { libc::send(a.as_raw_fd(), chunk.as_ptr() as *const _, chunk.len(), SEND_FLAGS) } > 0 {}
        let (tx, rx) = std::sync::mpsc::channel();
        let fd = a.as_raw_fd();
        std::thread::spawn(move || {
            let mut ring = IoUring::new(8).unwrap();
            let iov = [libc::iovec { iov_base: chunk.as_ptr() as *mut _, iov_len: chunk.len() }];
            // SAFETY: all-zero msghdr, then pointed at `iov`, alive below.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr() as *mut _;
            msg.msg_iovlen = 1;
            let sqe = opcode::SendMsg::new(types::Fd(fd), &msg).flags(SEND_FLAGS as u32).build();
            // SAFETY: msg, iov and chunk outlive the wait.
            unsafe { ring.submission().push(&sqe).unwrap() };
            ring.submit_and_wait(1).unwrap();
            let r = ring.completion().next().unwrap().result();
            tx.send(r).unwrap();
        });
        let r = rx.recv_timeout(Duration::from_secs(5)).expect("the send waited in the kernel");
        assert_eq!(r, -libc::EAGAIN);
    }
}
