//! ④ The shard's flusher: the dirty list → the sockets, once per turn.
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
//! With `--write-delay-ms N` a connection the flusher wrote less than N ms
//! ago is held back instead (`hold_hot`), and written when the hold timer
//! (`run_held`) gives it back N ms later, with everything queued to it
//! meanwhile: a busy connection's frames go out several to a send — fewer,
//! larger packets — for at most N ms more latency, and a connection that
//! gets a frame now and then (a chat, a 50 msg/s room: 20 ms apart) is
//! written at once as without the option. The connection's queue limit
//! (`--outbound-queue-bytes`) holds as before.
//!
//! The ring is the flusher's own (monoio's ring carries the connections'
//! reads and readiness; its operations are futures, one per socket, which is
//! the per-connection cost this avoids). Frames stay owned by their queues
//! until completion: submission and completion happen in one synchronous
//! step, with no await in between, so nothing can touch a queue while the
//! kernel reads it.

use std::rc::Rc;

use io_uring::{IoUring, opcode, types};
use tracing::{debug, warn};

use super::Conn;
use super::outbox::{EMPTY_IOV, SEND_FLAGS};
use super::shard_io::ShardIo;
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
        let delay = self.write_delay_ms();
        loop {
            until(&self.flusher, || !self.dirty.borrow().is_empty()).await;
            std::mem::swap(&mut batch, &mut *self.dirty.borrow_mut());
            if delay > 0 {
                self.hold_hot(&mut batch, delay);
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
        }
    }

    /// The shard's clock for `Limits::wrote`: milliseconds since it started,
    /// wrapping at 65.5 s (only differences below the delay matter).
    fn ms(&self) -> u16 {
        self.started.elapsed().as_millis() as u16
    }

    /// `--write-delay-ms` on the `ms` clock (the config caps it at 1 s, far
    /// below its 65.5 s wrap).
    fn write_delay_ms(&self) -> u16 {
        self.cfg.write_delay.as_millis() as u16
    }

    /// `--write-delay-ms`: takes out of `batch` the connections written
    /// less than `delay` ms ago (they stay marked dirty, so what is queued
    /// to them meanwhile joins them) and hands them to the hold timer; the
    /// others are stamped as written now.
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

    /// The hold timer task (`--write-delay-ms`): `delay` after a connection
    /// was first held, gives every held connection back to the flusher,
    /// stamped so that it is written in that pass. A held frame therefore
    /// waits at most the delay (plus the timer's 1 ms resolution).
    pub async fn run_held(self: Rc<Self>) {
        let delay = self.cfg.write_delay;
        if delay.is_zero() {
            return;
        }
        let back = self.write_delay_ms();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

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
