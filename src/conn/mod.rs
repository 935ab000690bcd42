//! ④ One client connection: its state (`Conn`, shared as `Rc<Conn>` between
//! the shard's tables, its poller and flusher, and whatever task serves it
//! for a while) and its tasks (`run` until the upgrade, `end` to close).
//!
//! A WebSocket connection has no task between reads: the shard's poller
//! (`conn::poller`) reports it readable and `reader::on_readable` reads
//! once and handles the frames; what a half-read message leaves is parked
//! in `Conn::parked`. Tasks exist only for what must wait: the HTTP phase,
//! a full socket (the writer task), and the closing.
//!
//! - `reader.rs` — the read side: `recv(2)` into the shard's one scratch
//!   buffer, bounded per turn; the WebSocket frame loop.
//! - `writer.rs` — the write side: `push` into the `Outbox` (`outbox.rs`),
//!   held to `--outbound-queue-bytes` for every byte; `flush`, the writer
//!   task for a full socket, `close` and `kill`.
//! - `ops.rs` — client ops on `/ws`; `limits.rs` — liveness stamp and rates.
//!
//! Flow: HTTP request head (`http`) → route → for `/ws` and `/echo`, the
//! WebSocket frame loop (`reader::start`, then `on_readable` per read) →
//! `end` → `finish`: flush, half-close, linger → `release`, after which
//! nothing waits on the socket and the last `Rc` closes it.
//!
//! # Every connection ends in bounded time
//!
//! Whatever the peer does, a connection is gone (descriptor closed, `Conn`
//! freed, `corecast_sockets` decremented in `Drop`) within a bounded time:
//! the HTTP phase has `--handshake-timeout-secs`; a connection we sent a
//! close frame to is killed by the shard's close reaper if it does not answer
//! within `CLOSE_TIMEOUT`; a killed one (slow consumer, heartbeat, write
//! error) has its read side shut, which makes the poller report it at once; `finish` is
//! bounded by `FLUSH_ON_CLOSE` and `LINGER`; and `release` resets a socket
//! that still holds unsent bytes, which also wakes a writer task parked on
//! "writable" (a shut socket polls writable), which then sees `GONE` and
//! ends. No task can wait on a socket that will never drain.

mod flush;
pub mod limits;
pub mod outbox;
pub mod poller;
mod reader;
pub mod shard_io;
mod writer;

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tracing::debug;

use crate::auth::Grant;
use crate::ws::{CloseCode, ProtocolError};
use outbox::Outbox;
use poller::{Ready, Want};
pub use shard_io::{ConnId, ShardIo};

/// How long a closing connection may take to flush what it has queued.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(2);
/// How long we wait for the client's answer after we close (half-close linger).
const LINGER: Duration = Duration::from_secs(2);
/// How long a client has to answer our close frame (RFC 6455 §7.1.2) before
/// the shard's close reaper cuts it off.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

// Conn::flags bits.
/// On the shard's dirty list.
const DIRTY: u16 = 1;
/// A task owns writing to the socket and waits for it to become writable
/// (the writer task, or `flush_for`); the flusher leaves the socket alone.
const WRITER: u16 = 2;
/// We sent (queued) a close frame: no more data frames go out.
const CLOSE_SENT: u16 = 4;
/// Cut off (slow consumer, write error): the reader stops at its next wake-up.
const KILLED: u16 = 8;
/// The connection's task has ended: nothing may write or wait on the socket.
const GONE: u16 = 16;
/// Accepted on the admin listener (`--admin-listen`).
const ADMIN: u16 = 32;
/// A batched send of the queue is with the kernel (`conn::flush`): the
/// queue must not be prepared again before its completion. (A connection
/// can be on the dirty list twice: a direct `flush`, e.g. for a waiting
/// pong, clears `DIRTY` and a new frame puts it back.)
const SENDING: u16 = 64;
/// The WebSocket serves `/echo` (`Mode::Echo`), not the corecast protocol.
const ECHO: u16 = 128;
/// In its frame loop: registered with the shard's poller for reads, which
/// hands it to `reader::on_readable` (`reader::start` .. the loop's end).
const POLLED: u16 = 256;
/// It published into a room whose namespace has `deliver_to_publisher =
/// false` and its message has not come back yet (`Conn::expect_own`).
const OWN: u16 = 512;
/// At most this many own messages are awaited at once (the oldest is
/// forgotten: its echo, should it still come, is delivered).
const OWN_MAX: usize = 32;

/// What the WebSocket loop serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/ws`: the corecast protocol.
    Client,
    /// `/echo`: every message back unchanged.
    Echo,
}

/// Which listener a socket came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `--listen`: WebSockets and, without `--admin-listen`, every route.
    Client,
    /// `--admin-listen`: `/metrics`, `/api/publish`, `/healthz`, `/readyz`.
    Admin,
}

pub struct Conn {
    pub id: ConnId,
    /// The socket; owned (closed in `Drop`). A task that must wait on it
    /// waits through the shard's poller (`Conn::ready`).
    pub(crate) fd: RawFd,
    flags: Cell<u16>,
    /// permessage-deflate as agreed in the upgrade (`ws::deflate::Agreed`;
    /// 0: not negotiated). Two bytes; the inflater, when a connection needs
    /// one, lives in its reader task (`reader::Rx`), not here.
    deflate: Cell<u16>,
    outbox: RefCell<Outbox>,
    /// The frame loop's state between reads (`reader::Parked`: an incomplete
    /// frame, a fragmented message, a lent inflater); `None` when idle.
    parked: Cell<Option<Box<reader::Parked>>>,
    /// Set by the upgrade; unset while the socket speaks HTTP.
    user: std::cell::OnceCell<Rc<str>>,
    /// Rooms this connection is in; the keys are shared with the room table.
    /// One inline (no allocation for the usual one room). A `Cell`: taken
    /// and put back by the few calls below (`with_rooms`), never borrowed.
    rooms: Cell<Rooms>,
    /// What the connection keeps of its JWT (expiry, room patterns), boxed so
    /// that a server without auth pays one pointer (`auth::grant`). A `Cell`: it is
    /// only ever taken and put back (`Conn::with_grant`).
    pub(crate) grant: Cell<Option<Box<Grant>>>,
    /// Liveness stamp and op rate (`limits.rs`).
    pub(crate) limits: limits::Limits,
    /// History reads in flight and their rate (`history::budget`).
    pub(crate) hist: limits::ReadBudget,
}

impl Conn {
    /// Takes ownership of the socket `fd`.
    pub fn new(id: ConnId, fd: RawFd, listener: Listener) -> Conn {
        Conn {
            id,
            fd,
            flags: Cell::new(if listener == Listener::Admin { ADMIN } else { 0 }),
            deflate: Cell::new(0),
            outbox: RefCell::default(),
            parked: Cell::new(None),
            user: std::cell::OnceCell::new(),
            rooms: Cell::default(),
            grant: Cell::new(None),
            limits: limits::Limits::default(),
            hist: Default::default(),
        }
    }

    fn has(&self, f: u16) -> bool {
        self.flags.get() & f != 0
    }
    fn set(&self, f: u16) {
        self.flags.set(self.flags.get() | f)
    }
    fn clear(&self, f: u16) {
        self.flags.set(self.flags.get() & !f)
    }

    /// Came in on the admin listener.
    pub fn is_admin(&self) -> bool {
        self.has(ADMIN)
    }

    /// What permessage-deflate the upgrade agreed (`Agreed::OFF`: none).
    pub fn deflate(&self) -> crate::ws::deflate::Agreed {
        crate::ws::deflate::Agreed::from_bits(self.deflate.get())
    }
    pub(crate) fn set_deflate(&self, a: crate::ws::deflate::Agreed) {
        self.deflate.set(a.bits())
    }

    /// Runs `f` on the connection's grant (`None`: auth is off).
    pub(crate) fn with_grant<R>(&self, f: impl FnOnce(Option<&Grant>) -> R) -> R {
        let g = self.grant.take();
        let r = f(g.as_deref());
        self.grant.set(g);
        r
    }

    /// May this connection subscribe and publish to `room`? Always, with
    /// auth off.
    pub fn allows(&self, room: &str) -> bool {
        self.with_grant(|g| g.is_none_or(|g| g.allows(room)))
    }

    /// Its next message whose JSON starts with `prefix` (the message event
    /// up to its `data`, before any position) is not delivered to it.
    pub(crate) fn expect_own(&self, io: &ShardIo, prefix: bytes::Bytes) {
        let mut own = io.own.borrow_mut();
        let list = own.entry(self.id).or_default();
        if list.len() == OWN_MAX {
            list.remove(0);
        }
        list.push(prefix);
        self.set(OWN);
    }

    /// Is `frame` (a plain server frame) one of its own awaited messages?
    /// Then it is taken off the list: the caller skips it.
    #[inline]
    pub(crate) fn is_own(&self, io: &ShardIo, frame: &bytes::Bytes) -> bool {
        if !self.has(OWN) {
            return false;
        }
        let mut own = io.own.borrow_mut();
        let Some(list) = own.get_mut(&self.id) else { return false };
        let json = crate::protocol::event::json_in(frame);
        let hit = list.iter().position(|p| json.starts_with(p));
        if let Some(i) = hit {
            list.remove(i);
        }
        if list.is_empty() {
            own.remove(&self.id);
            self.clear(OWN);
        }
        hit.is_some()
    }

    /// Forgets its own-message list (the connection is gone).
    pub(crate) fn forget_own(&self, io: &ShardIo) {
        if self.has(OWN) {
            io.own.borrow_mut().remove(&self.id);
            self.clear(OWN);
        }
    }

    pub fn user(&self) -> Option<Rc<str>> {
        self.user.get().cloned()
    }
    /// Once, at the upgrade.
    pub(crate) fn set_user(&self, user: Rc<str>) {
        let _ = self.user.set(user);
    }
    /// Runs `f` on the connection's room list (which must not call back here).
    pub(crate) fn with_rooms<T>(&self, f: impl FnOnce(&mut Rooms) -> T) -> T {
        let mut rooms = self.rooms.take();
        let r = f(&mut rooms);
        self.rooms.set(rooms);
        r
    }
    pub(crate) fn add_room(&self, room: Rc<str>) {
        self.with_rooms(|r| r.push(room))
    }
    pub(crate) fn remove_room(&self, room: &str) {
        self.with_rooms(|rooms| {
            if let Some(i) = rooms.iter().position(|r| &**r == room) {
                rooms.swap_remove(i);
            }
        })
    }
    pub(crate) fn take_rooms(&self) -> Rooms {
        self.rooms.take()
    }

    /// The connection's task is over: marks it `GONE`, frees what is queued,
    /// and, if bytes are still unsent or a writer task waits on the socket,
    /// resets it (SO_LINGER 0; RFC 793 abort): nothing more will be written,
    /// a peer with a zero window would otherwise keep the kernel's buffers,
    /// and shutting both directions makes the socket poll readable and
    /// writable, which wakes a parked writer so that it ends.
    pub(crate) fn release(&self) {
        self.set(GONE);
        let unsent = !self.outbox.borrow().is_empty();
        if unsent || self.has(WRITER) {
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: plain syscalls on a descriptor this connection owns;
            // `linger` outlives the call.
            unsafe {
                libc::setsockopt(
                    self.fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
                libc::shutdown(self.fd, libc::SHUT_RDWR);
            }
        }
        *self.outbox.borrow_mut() = Outbox::default();
    }
}

impl Conn {
    /// In its frame loop (the shard's poller reads it).
    pub(crate) fn polled(&self) -> bool {
        self.has(POLLED)
    }

    /// Resolves once the socket is ready for `want` (through the shard's
    /// poller: the connection keeps its one descriptor, and a task that
    /// waits on it holds nothing but this future). Dropping it withdraws
    /// the wait.
    pub(crate) fn ready<'a>(&'a self, shard: &'a ShardIo, want: Want) -> Ready<'a> {
        shard.poller().ready(self, want)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: the connection owns the descriptor; nothing uses it after.
        unsafe { libc::close(self.fd) };
        shard_io::socket_closed();
    }
}

/// A connection's rooms: the keys of the room table it is in.
pub type Rooms = smallvec::SmallVec<[Rc<str>; 1]>;

/// Why a connection's loop ended.
#[derive(Debug)]
pub enum Stop {
    /// The client closed the TCP connection (or we shut its read side).
    Eof,
    /// The client broke RFC 6455: close with the error's code.
    Protocol(ProtocolError),
    /// The closing handshake finished (either side began it).
    Closed,
    /// An HTTP exchange is over and the connection is not kept alive.
    HttpDone,
    /// The HTTP request head did not arrive in time.
    Timeout,
    Io(io::Error),
}

pub(crate) use reader::{on_readable, start};

/// Ends the connection politely: a protocol error gets its close frame, what
/// is queued is flushed (briefly), the write side is shut so the client sees
/// our FIN first, and we linger for its answer before the socket is dropped.
pub(crate) async fn finish(shard: &ShardIo, conn: &Rc<Conn>, stop: Stop) {
    match &stop {
        Stop::Protocol(e) => {
            shard.m().protocol_closes_total.inc();
            debug!(shard = shard.id, conn = conn.id, error = ?e, "protocol error");
            conn.close(shard, CloseCode::for_error(*e));
        }
        Stop::Io(_) => return,
        _ => {}
    }
    let killed = conn.has(KILLED);
    let limit = if killed { Duration::from_millis(100) } else { FLUSH_ON_CLOSE };
    if !conn.flush_for(shard, Instant::now() + limit).await || killed {
        return;
    }
    // SAFETY: plain syscall on a descriptor this connection owns.
    unsafe { libc::shutdown(conn.fd, libc::SHUT_WR) };
    if matches!(stop, Stop::Eof) {
        return;
    }
    // Read and discard until the client closes too, so that unread bytes in
    // our receive buffer cannot turn our close into a reset that destroys
    // the close frame in flight.
    let deadline = Instant::now() + LINGER;
    let mut sink = BytesMut::new();
    while conn.read_some(shard, &mut sink, Some(deadline), usize::MAX, |b| Ok(b.len())).await.is_ok() {}
}

#[cfg(test)]
mod tests {
    /// An idle WebSocket connection is its `Conn` (in an `Rc`) and its table
    /// entries, nothing else (no task, no runtime state): this keeps the
    /// struct in glibc's 176-byte chunk class (152 + the `Rc`'s 16 + the
    /// chunk header's 8), which `bench/RESULTS-archive.md` "Idle connections without
    /// a task" measures. Growing it costs 16 bytes per idle connection.
    #[test]
    fn an_idle_connection_fits_in_152_bytes() {
        assert!(std::mem::size_of::<super::Conn>() <= 152, "Conn is {} bytes", std::mem::size_of::<super::Conn>());
    }
}
