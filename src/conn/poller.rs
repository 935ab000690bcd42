//! ④ The shard's readiness poller: which connections have bytes to read or
//! room to write, for all of them at once.
//!
//! In: every upgraded WebSocket connection's descriptor, registered once by
//! `conn::reader::start` (`add`) and removed when its frame loop ends
//! (`remove`); and, for as long as a task waits on a socket (the HTTP phase,
//! a full socket's writer, the closing flush and linger), that wait
//! (`Poller::ready`). Out: each connection in its frame loop the kernel
//! reports readable, handed to the caller of `run` (`session::run_poller`,
//! which looks it up and calls `conn::reader::on_readable`: one read of at
//! most one scratch buffer, then the frames); and a wake-up for each waiting
//! task whose socket became ready.
//!
//! A WebSocket connection therefore has no task of its own: between reads it
//! is its `Conn` in the shard's table and nothing else in user space (no
//! future, no pending operation, no read buffer), and every connection is
//! one descriptor whatever it waits for (no `dup` for a task to wait on).
//! The readiness of every connection is one epoll instance per shard —
//! level-triggered, so a connection whose bytes were not all read in its
//! turn (the per-turn bound) is simply reported again in the next round —
//! and the shard waits on that one descriptor through its monoio driver
//! (io_uring: one poll request; epoll driver: a nested epoll). One
//! `epoll_wait` hands over up to `EVENTS` ready connections; after each
//! batch the poller yields, so a shard with busy readers still runs its
//! flusher, inbox and timers between batches.
//!
//! A descriptor's epoll mask is what is waited for now: `EPOLLIN` while the
//! connection is in its frame loop or a task waits to read, `EPOLLOUT` only
//! while a task waits to write (a level-triggered `EPOLLOUT` on a socket with
//! room would otherwise be reported every round). A task's wait is taken
//! off the mask when it fires, so a woken task that has not run yet is not
//! reported again; none registered, the descriptor leaves the set.
//!
//! monoio has no "wait until any descriptor is readable" type: the epoll
//! descriptor is wrapped as a `monoio::net::UnixStream` only to call
//! `readable()` on it (both drivers poll any pollable descriptor); nothing
//! is ever read from or written to it.
//!
//! An event carries the connection's slab key and its descriptor; the
//! dispatch (`session::run_poller`) checks both against the table, so an event can never reach a
//! different connection that reused the key. Waits are keyed by the
//! descriptor, which stays open (and so unique) while a task waits on it:
//! the waiting task holds the `Conn` that owns it.
//!
//! # RefCell contract
//!
//! `Poller::waits` is borrowed only inside one synchronous method of this
//! module (`ready`'s poll and drop, `fire`, `add`, `remove`), never across an
//! await, and wakers are woken only after the borrow is released. Nothing
//! called while it is borrowed (`epoll_ctl`) can reach back into the poller.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use super::shard_io::ShardIo;
use super::{Conn, ConnId};

/// Ready connections one `epoll_wait` returns at most (then the poller yields).
const EVENTS: usize = 256;

/// Entries the wait table keeps room for however empty it gets.
const SHRINK_ABOVE: usize = 1024;

/// The mask of a connection in its frame loop, and of a wait to read.
const READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
/// The mask of a wait to write.
const WRITE: u32 = libc::EPOLLOUT as u32;
/// Events that end a wait to read: bytes, the peer's FIN, an error, a hang-up.
const READ_READY: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32;
/// Events that end a wait to write: room, an error, a hang-up (a reset or
/// shut socket polls writable: `Conn::release` relies on it).
const WRITE_READY: u32 = (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32;

/// What a task waits for on a connection's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Read,
    Write,
}

/// One direction of a wait.
#[derive(Default)]
enum Slot {
    #[default]
    Idle,
    /// A task waits; its mask bit is registered.
    Waiting(Waker),
    /// The kernel reported it ready; the task has not seen it yet.
    Fired,
}

impl Slot {
    fn waiting(&self) -> bool {
        matches!(self, Slot::Waiting(_))
    }
}

/// The waits on one descriptor, and what epoll holds for it.
struct Wait {
    id: ConnId,
    /// In its frame loop (`add` .. `remove`): `READ` stays registered.
    polled: bool,
    /// The mask epoll holds for the descriptor now (0: not in the set).
    mask: u32,
    read: Slot,
    write: Slot,
}

impl Wait {
    fn wanted(&self) -> u32 {
        let mut m = if self.polled || self.read.waiting() { READ } else { 0 };
        if self.write.waiting() {
            m |= WRITE;
        }
        m
    }

    fn slot(&mut self, want: Want) -> &mut Slot {
        match want {
            Want::Read => &mut self.read,
            Want::Write => &mut self.write,
        }
    }

    fn idle(&self) -> bool {
        matches!((&self.read, &self.write), (Slot::Idle, Slot::Idle))
    }
}

pub struct Poller {
    /// The epoll descriptor, as something monoio can wait on (owns it).
    waiter: monoio::net::UnixStream,
    /// The descriptors a task waits on, and only those (an idle WebSocket
    /// has no entry). See the module's RefCell contract.
    waits: RefCell<HashMap<RawFd, Wait>>,
}

impl Poller {
    /// Must be called on the shard's thread, inside its runtime.
    pub fn new() -> io::Result<Poller> {
        // SAFETY: plain syscall; the result is checked.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epfd` is a fresh descriptor nothing else owns; the
        // UnixStream takes ownership and closes it on drop.
        let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(epfd) };
        Ok(Poller { waiter: monoio::net::UnixStream::from_std(std)?, waits: RefCell::default() })
    }

    fn epfd(&self) -> RawFd {
        self.waiter.as_raw_fd()
    }

    /// Moves `fd` from mask `old` to mask `new` (0: not in the set).
    fn ctl(&self, fd: RawFd, id: ConnId, old: u32, new: u32) -> io::Result<()> {
        let op = match (old, new) {
            _ if old == new => return Ok(()),
            (0, _) => libc::EPOLL_CTL_ADD,
            (_, 0) => libc::EPOLL_CTL_DEL,
            _ => libc::EPOLL_CTL_MOD,
        };
        let mut ev = libc::epoll_event { events: new, u64: (u64::from(fd as u32) << 32) | u64::from(id) };
        // SAFETY: plain syscall; `ev` outlives it.
        if unsafe { libc::epoll_ctl(self.epfd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Brings epoll's mask for `fd` to what `w` now waits for.
    fn sync(&self, fd: RawFd, w: &mut Wait) -> io::Result<()> {
        let new = w.wanted();
        self.ctl(fd, w.id, w.mask, new)?;
        w.mask = new;
        Ok(())
    }

    /// `fd`'s frame loop begins: the poller watches it for bytes to read,
    /// the peer's FIN and errors until `remove`.
    pub fn add(&self, fd: RawFd, id: ConnId) -> io::Result<()> {
        let mut waits = self.waits.borrow_mut();
        let Some(w) = waits.get_mut(&fd) else {
            return self.ctl(fd, id, 0, READ);
        };
        w.polled = true;
        w.id = id;
        self.sync(fd, w)
    }

    /// `fd`'s frame loop ended (closing the descriptor would take it out of
    /// the set too, but the connection may linger a while first); a task
    /// still waiting on it keeps its wait.
    pub fn remove(&self, fd: RawFd) {
        let mut waits = self.waits.borrow_mut();
        let Some(w) = waits.get_mut(&fd) else {
            // ENOENT (not registered) is fine.
            let _ = self.ctl(fd, 0, READ, 0);
            return;
        };
        w.polled = false;
        if let Err(e) = self.sync(fd, w) {
            crate::warn_throttled!(fd, error = %e, "poller: epoll_ctl failed");
        }
    }

    /// Resolves once `conn`'s socket is ready for `want`, or with the
    /// `epoll_ctl` error that kept it from being watched. Level-triggered:
    /// ready now resolves at the next round. Dropping it (a timeout)
    /// withdraws the wait. At most one task waits per socket and direction.
    pub fn ready<'a>(&'a self, conn: &'a Conn, want: Want) -> Ready<'a> {
        Ready { poller: self, conn, want, armed: false }
    }

    /// The kernel reported `events` on `fd`: the waits they end fire;
    /// returns their wakers, for the caller to wake once the table is no
    /// longer borrowed.
    fn fire(&self, fd: RawFd, events: u32) -> [Option<Waker>; 2] {
        let mut waits = self.waits.borrow_mut();
        let Some(w) = waits.get_mut(&fd) else { return [None, None] };
        let fire = |slot: &mut Slot, ready: u32| match slot {
            Slot::Waiting(_) if events & ready != 0 => match std::mem::replace(slot, Slot::Fired) {
                Slot::Waiting(k) => Some(k),
                _ => None,
            },
            _ => None,
        };
        let woken = [fire(&mut w.read, READ_READY), fire(&mut w.write, WRITE_READY)];
        if let Err(e) = self.sync(fd, w) {
            crate::warn_throttled!(fd, error = %e, "poller: epoll_ctl failed");
        }
        woken
    }

    /// `want` of the wait on `fd` goes back to idle (it fired and was seen,
    /// or it was withdrawn): the mask follows, and an entry with nothing
    /// left to wait for is dropped.
    fn settle(&self, fd: RawFd, want: Want) -> io::Result<()> {
        let mut waits = self.waits.borrow_mut();
        let Some(w) = waits.get_mut(&fd) else { return Ok(()) };
        *w.slot(want) = Slot::Idle;
        let r = self.sync(fd, w);
        if w.idle() {
            waits.remove(&fd);
            // A storm's peak (every socket of a big room full at once) is
            // not kept: the table shrinks once it is mostly empty.
            if waits.capacity() > SHRINK_ABOVE && waits.len() < waits.capacity() / 8 {
                let keep = waits.len() * 2;
                waits.shrink_to(keep);
            }
        }
        r
    }
}

/// A task's wait for a socket to be ready (`Poller::ready`).
pub struct Ready<'a> {
    poller: &'a Poller,
    conn: &'a Conn,
    want: Want,
    /// Its slot is `Waiting` or `Fired`: dropping it must settle.
    armed: bool,
}

impl Future for Ready<'_> {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let fd = this.conn.fd;
        let mut waits = this.poller.waits.borrow_mut();
        // A new entry takes the connection's frame-loop state as it is now
        // (`add` and `remove` keep an existing one's up to date).
        let w = waits.entry(fd).or_insert_with(|| {
            let polled = this.conn.polled();
            Wait { id: this.conn.id, polled, mask: if polled { READ } else { 0 }, read: Slot::Idle, write: Slot::Idle }
        });
        let slot = w.slot(this.want);
        // One task per direction: the writer's `WRITER` flag and the read
        // side's one task (HTTP phase or closing linger) see to it.
        debug_assert!(this.armed || matches!(slot, Slot::Idle), "two tasks wait on one socket for {:?}", this.want);
        match slot {
            Slot::Fired => {
                drop(waits);
                this.armed = false;
                Poll::Ready(this.poller.settle(fd, this.want))
            }
            Slot::Waiting(k) => {
                if !k.will_wake(cx.waker()) {
                    *k = cx.waker().clone();
                }
                Poll::Pending
            }
            slot @ Slot::Idle => {
                *slot = Slot::Waiting(cx.waker().clone());
                match this.poller.sync(fd, w) {
                    Ok(()) => {
                        this.armed = true;
                        Poll::Pending
                    }
                    Err(e) => {
                        drop(waits);
                        let _ = this.poller.settle(fd, this.want);
                        Poll::Ready(Err(e))
                    }
                }
            }
        }
    }
}

impl Drop for Ready<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = self.poller.settle(self.conn.fd, self.want)
        {
            crate::warn_throttled!(fd = self.conn.fd, error = %e, "poller: epoll_ctl failed");
        }
    }
}

/// The poller task: waits until some connection is ready, then wakes every
/// task whose wait the events end and hands every ready connection in its
/// frame loop its turn, `EVENTS` at a time.
/// The poller task: waits for readiness, wakes the tasks that wait on a
/// socket, and hands each connection in its frame loop that the kernel
/// reports readable (its descriptor and slab key) to `on_readable`, which
/// belongs to the layer that owns the table (`session::run_poller`).
pub async fn run(io: &ShardIo, mut on_readable: impl FnMut(RawFd, ConnId)) {
    let poller = io.poller();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    loop {
        if let Err(e) = poller.waiter.readable(false).await {
            // Not expected on a live epoll descriptor; don't spin.
            crate::warn_throttled!(shard = io.id, error = %e, "poller: waiting for readiness failed");
            monoio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        }
        loop {
            // SAFETY: `events` holds `EVENTS` entries for the kernel to fill;
            // timeout 0: never blocks the shard.
            let n = unsafe { libc::epoll_wait(poller.epfd(), events.as_mut_ptr(), EVENTS as i32, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    crate::warn_throttled!(shard = io.id, error = %e, "poller: epoll_wait failed");
                    break;
                }
                continue;
            }
            let n = n as usize;
            let any_waits = !poller.waits.borrow().is_empty();
            for ev in &events[..n] {
                let (bits, data) = (ev.events, ev.u64);
                let (fd, id) = ((data >> 32) as u32 as RawFd, data as u32 as ConnId);
                if any_waits {
                    poller.fire(fd, bits).into_iter().flatten().for_each(Waker::wake);
                }
                if bits & READ_READY != 0 {
                    on_readable(fd, id);
                }
            }
            if n == 0 {
                break;
            }
            // The flusher, the inbox and the other tasks run between two
            // rounds. (The epoll driver answers `readable` at once while
            // the descriptor is ready, so without this a flood on one
            // connection would keep them from ever running.)
            io.yield_now().await;
            if n < EVENTS {
                break;
            }
        }
    }
}
