//! ⑤ The shard's readiness poller: which WebSocket connections have bytes to
//! read, for all of them at once.
//!
//! In: every upgraded WebSocket connection's descriptor, registered once by
//! `conn::reader::start` (`add`) and removed when its frame loop ends
//! (`remove`). Out: `conn::reader::on_readable` for each connection the
//! kernel reports readable, which reads once (at most one scratch buffer)
//! and handles the frames.
//!
//! A WebSocket connection therefore has no task of its own: between reads it
//! is its `Conn` in the shard's table and nothing else in user space (no
//! future, no pending operation, no read buffer). The readiness of every
//! connection is one epoll instance per shard — level-triggered, so a
//! connection whose bytes were not all read in its turn (the per-turn bound)
//! is simply reported again in the next round — and the shard waits on that
//! one descriptor through its monoio driver (io_uring: one poll request;
//! epoll driver: a nested epoll). One `epoll_wait` hands over up to `EVENTS`
//! ready connections; after each batch the poller yields, so a shard with
//! busy readers still runs its flusher, inbox and timers between batches.
//!
//! monoio has no "wait until any descriptor is readable" type: the epoll
//! descriptor is wrapped as a `monoio::net::UnixStream` only to call
//! `readable()` on it (both drivers poll any pollable descriptor); nothing
//! is ever read from or written to it.
//!
//! An event carries the connection's slab key and its descriptor; the
//! poller checks both against the table, so an event can never reach a
//! different connection that reused the key.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::rc::Rc;

use tracing::warn;

use super::{ConnId, Shard};

/// Ready connections one `epoll_wait` returns at most (then the poller yields).
const EVENTS: usize = 256;

pub struct Poller {
    /// The epoll descriptor, as something monoio can wait on (owns it).
    waiter: monoio::net::UnixStream,
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
        Ok(Poller { waiter: monoio::net::UnixStream::from_std(std)? })
    }

    fn epfd(&self) -> RawFd {
        self.waiter.as_raw_fd()
    }

    /// Watches `fd` (connection `id`) for bytes to read, hang-up and errors.
    pub fn add(&self, fd: RawFd, id: ConnId) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: (u64::from(fd as u32) << 32) | u64::from(id),
        };
        // SAFETY: plain syscall; `ev` outlives it.
        if unsafe { libc::epoll_ctl(self.epfd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (the frame loop ended; closing the descriptor
    /// would do it too, but the connection may linger a while first).
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: plain syscall; a descriptor that is not registered fails
        // with ENOENT, which is fine.
        unsafe { libc::epoll_ctl(self.epfd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }
}

/// The poller task: waits until some connection is readable, then hands
/// every ready one its turn, `EVENTS` at a time.
pub async fn run(shard: Rc<Shard>) {
    let poller = shard.poller();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    loop {
        if let Err(e) = poller.waiter.readable(false).await {
            // Not expected on a live epoll descriptor; don't spin.
            warn!(shard = shard.id, error = %e, "poller: waiting for readiness failed");
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
                    warn!(shard = shard.id, error = %e, "poller: epoll_wait failed");
                    break;
                }
                continue;
            }
            let n = n as usize;
            for ev in &events[..n] {
                let data = ev.u64;
                let (fd, id) = ((data >> 32) as u32 as RawFd, data as u32 as ConnId);
                if let Some(conn) = shard.conn(id)
                    && conn.fd == fd
                {
                    crate::conn::on_readable(&shard, &conn);
                }
            }
            if n == 0 {
                break;
            }
            // The flusher, the inbox and the other tasks run between two
            // rounds. (The epoll driver answers `readable` at once while
            // the descriptor is ready, so without this a flood on one
            // connection would keep them from ever running.)
            shard.yield_now().await;
            if n < EVENTS {
                break;
            }
        }
    }
}
