//! ④ The write side of a connection: what may be queued, and how it leaves.
//!
//! In: frames from fan-out (`Shard::deliver`), replies from ops, pongs,
//! heartbeat pings, close frames and HTTP responses — all through `push` (or
//! `pong`), all counted against one limit, `--outbound-queue-bytes`: a client
//! that lets its queue pass it is cut off with 1008 (`kill`), whatever kind
//! of bytes it made us queue. Out: by the shard's flusher once per turn,
//! batched through io_uring (`prepare_send` / `sent`, see `conn::flush`) or
//! one `sendmsg(2)` each (`flush`); a socket that is full gets a writer task that waits
//! for it to become writable, and that task ends as soon as the connection is
//! `GONE` (see `Conn::release`).

use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::debug;

use super::outbox::Flush;
use super::poller::Want;
use super::shard_io::ShardIo;
use super::{CLOSE_SENT, Conn, DIRTY, GONE, KILLED, SENDING, WRITER};
use crate::ws::{self, CloseCode};

/// While another task owns the socket's writes, `flush_for` looks again
/// this often (only on the closing and HTTP paths).
const OWNER_POLL: Duration = Duration::from_millis(10);

impl Conn {
    /// Queues a frame (a delivery, a reply, a ping, an HTTP response). A
    /// client whose queue would pass the configured limit is cut off with
    /// 1008 instead: fan-out never waits on one client. Returns whether the
    /// frame was queued.
    pub fn push(self: &Rc<Self>, shard: &ShardIo, frame: Bytes) -> bool {
        if self.has(CLOSE_SENT | KILLED) || !self.fits(shard, frame.len()) {
            return false;
        }
        self.enqueue(shard, frame);
        true
    }

    /// Bytes queued and not sent yet (what `--outbound-queue-bytes` bounds).
    pub fn queued(&self) -> usize {
        self.outbox.borrow().queued()
    }

    /// Closing or cut off: nothing more is queued for it.
    pub fn is_closing(&self) -> bool {
        self.has(CLOSE_SENT | KILLED)
    }

    /// Would `len` more bytes stay within `--outbound-queue-bytes`? If not,
    /// the client is cut off (counted as a slow consumer).
    fn fits(self: &Rc<Self>, shard: &ShardIo, len: usize) -> bool {
        if self.outbox.borrow().queued() + len <= shard.cfg.outbound_queue_bytes {
            return true;
        }
        shard.m().slow_consumer_disconnects_total.inc();
        debug!(shard = shard.id, conn = self.id, "outbound queue full: cut off");
        self.kill(shard, CloseCode::POLICY);
        false
    }

    /// Queues the pong for a ping. At most one pong waits unsent: if one
    /// does, the socket gets a chance to take it first (a reading client gets
    /// a pong per ping), and if it still waits, this pong's payload replaces
    /// its own (RFC 6455 §5.5.3), so a ping flood queues 125 bytes at most.
    pub fn pong(self: &Rc<Self>, shard: &Rc<ShardIo>, frame: Bytes) {
        if self.has(CLOSE_SENT | KILLED) {
            return;
        }
        if self.outbox.borrow().has_pong() && !self.has(WRITER) {
            self.flush(shard);
        }
        if self.has(KILLED) {
            return;
        }
        let waiting = self.outbox.borrow().has_pong();
        if waiting {
            shard.m().pongs_coalesced_total.inc();
        } else if self.fits(shard, frame.len()) {
            shard.m().messages_out_total.inc();
        } else {
            return;
        }
        self.outbox.borrow_mut().push_pong(frame);
        self.mark_dirty(shard);
    }

    fn enqueue(self: &Rc<Self>, shard: &ShardIo, frame: Bytes) {
        shard.m().messages_out_total.inc();
        self.outbox.borrow_mut().push(frame);
        self.mark_dirty(shard);
    }

    fn mark_dirty(self: &Rc<Self>, shard: &ShardIo) {
        if !self.has(DIRTY) {
            self.set(DIRTY);
            shard.mark_dirty(self.clone());
        }
    }

    /// Starts the closing handshake from our side (§7.1.2): the close frame
    /// goes after what is queued; the reader waits for the client's answer,
    /// and the shard's close reaper cuts it off after `CLOSE_TIMEOUT`.
    pub fn close(self: &Rc<Self>, shard: &ShardIo, code: CloseCode) {
        if !self.has(CLOSE_SENT | KILLED) {
            // A close frame is at most 125 bytes: it is queued even past the
            // limit, so that the client learns why.
            self.enqueue(shard, ws::close::frame(code));
            self.set(CLOSE_SENT);
            shard.watch_close(self);
        }
    }

    /// Cuts the connection off now: drops what has not started to go out,
    /// queues a close frame, and wakes the reader (shutdown of the read side
    /// makes the socket readable) so that it ends the connection.
    pub fn kill(self: &Rc<Self>, shard: &ShardIo, code: CloseCode) {
        if self.has(KILLED) {
            return;
        }
        self.outbox.borrow_mut().truncate_unstarted();
        if !self.has(CLOSE_SENT) {
            self.enqueue(shard, ws::close::frame(code));
        }
        self.set(KILLED | CLOSE_SENT);
        // SAFETY: plain syscall on a descriptor this connection owns.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RD) };
    }

    /// Writes what is queued; called by the flusher. A full socket gets a
    /// writer task; a broken one gets killed.
    pub fn flush(self: &Rc<Self>, shard: &Rc<ShardIo>) {
        self.clear(DIRTY);
        if self.has(WRITER | GONE) {
            return;
        }
        match self.try_write(shard) {
            Ok(Flush::Empty) => {}
            Ok(Flush::Blocked) => self.wait_writable(shard),
            Err(_) => self.kill(shard, CloseCode::INTERNAL),
        }
    }

    fn wait_writable(self: &Rc<Self>, shard: &Rc<ShardIo>) {
        self.set(WRITER);
        shard.m().full_sockets.inc();
        monoio::spawn(Conn::run_writer(self.clone(), shard.clone()));
    }

    // ---- the batched path (`conn::flush`, io_uring driver) ----------------
    //
    // `prepare_send` points iovecs at the queue; the flusher submits many
    // connections' sends in one `io_uring_enter` and hands each result to
    // `sent`. Between the two nothing touches the queue: the flusher does
    // both in one synchronous step, with no await in between.

    /// Takes this connection's turn in a flush pass: whether it has bytes
    /// for a batched send now (not while a writer task owns the socket).
    pub(crate) fn take_turn(&self) -> bool {
        self.clear(DIRTY);
        !self.has(WRITER | GONE | SENDING) && !self.outbox.borrow().is_empty()
    }

    /// Fills `iov` for one `sendmsg`; returns (iovecs used, bytes covered).
    /// The queue is the kernel's to read until `sent`.
    pub(crate) fn prepare_send(&self, iov: &mut [libc::iovec]) -> (usize, usize) {
        self.set(SENDING);
        self.outbox.borrow().prepare(iov)
    }

    /// The result of a batched send prepared by `prepare_send`: bytes
    /// written, or a negated errno.
    pub(crate) fn sent(self: &Rc<Self>, shard: &Rc<ShardIo>, res: i32, want: usize) {
        self.clear(SENDING);
        if res >= 0 {
            shard.m().bytes_out_total.add(res as u64);
            let st = self.outbox.borrow_mut().complete(res as usize, want);
            match st {
                Flush::Blocked => self.wait_writable(shard),
                // More frames than one send took: the rest at once.
                Flush::Empty if !self.outbox.borrow().is_empty() => self.flush(shard),
                Flush::Empty => {}
            }
        } else if res == -libc::EAGAIN {
            self.wait_writable(shard);
        } else if res == -libc::EINTR {
            self.flush(shard);
        } else {
            self.kill(shard, CloseCode::INTERNAL);
        }
    }

    fn try_write(&self, shard: &ShardIo) -> io::Result<Flush> {
        let (n, calls, st) = self.outbox.borrow_mut().try_flush(self.fd)?;
        shard.m().bytes_out_total.add(n as u64);
        shard.m().socket_writes_total.add(calls as u64);
        Ok(st)
    }

    /// Waits for a full socket to drain, then writes the rest. Ends when
    /// everything is written, on a write error, or once the connection is
    /// `GONE` (`Conn::release` resets the socket, which wakes this wait).
    async fn run_writer(self: Rc<Self>, shard: Rc<ShardIo>) {
        loop {
            if self.ready(&shard, Want::Write).await.is_err() {
                // The socket could not be watched (epoll_ctl: ENOMEM,
                // ENOSPC): it would never be written again.
                self.kill(&shard, CloseCode::INTERNAL);
                break;
            }
            if self.has(GONE) {
                break;
            }
            match self.try_write(&shard) {
                Ok(Flush::Empty) => break,
                Ok(Flush::Blocked) => continue,
                Err(_) => {
                    self.kill(&shard, CloseCode::INTERNAL);
                    break;
                }
            }
        }
        self.clear(WRITER);
        shard.m().full_sockets.sub(1);
    }

    /// Writes what is queued until `deadline`; returns whether everything
    /// went out. Takes the socket's writes for itself (`WRITER`) while it
    /// waits; if a writer task already has them, lets it work and watches.
    pub(crate) async fn flush_for(self: &Rc<Self>, shard: &ShardIo, deadline: Instant) -> bool {
        loop {
            if self.outbox.borrow().is_empty() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.has(GONE) {
                return false;
            }
            if self.has(WRITER) {
                monoio::time::sleep(left.min(OWNER_POLL)).await;
                continue;
            }
            match self.try_write(shard) {
                Ok(Flush::Empty) => return true,
                Ok(Flush::Blocked) => {}
                Err(_) => return false,
            }
            self.set(WRITER);
            let ready = monoio::time::timeout(left, self.ready(shard, Want::Write)).await;
            self.clear(WRITER);
            if !matches!(ready, Ok(Ok(()))) {
                return false;
            }
        }
    }
}
