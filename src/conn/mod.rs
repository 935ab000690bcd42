//! ④ One client connection: its state (`Conn`, shared as `Rc<Conn>` between
//! its reader task, the shard's tables and the flusher) and its task (`run`).
//!
//! The task reads with readiness + `recv(2)` into the shard's one scratch
//! buffer, so an idle connection parks no read buffer at all: only bytes of
//! an incomplete frame are kept, in a per-connection `BytesMut` that is freed
//! as soon as it empties. Writes go through the `Outbox` (see `outbox.rs`):
//! frames are queued, the shard's flusher writes them out, and only a
//! connection whose socket buffer is full gets a writer task that waits for
//! the socket to become writable.
//!
//! Flow: HTTP request head (`http`) → route → for `/ws` and `/echo`, the
//! WebSocket loop (`ws_loop`) → `finish`: flush, half-close, linger, forget.

pub mod limits;
mod ops;
pub mod outbox;

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::net::TcpStream;
use tracing::debug;

use crate::http;
use crate::shard::{ConnId, Shard};
use crate::ws::{self, CloseCode, FrameHeader, OpCode, ProtocolError, frame, mask, utf8::Utf8Check};
use outbox::{Flush, Outbox};

/// Size of each shard's receive scratch buffer.
const SCRATCH_BYTES: usize = 64 * 1024;
/// How long a closing connection may take to flush what it has queued.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(2);
/// How long we wait for the client's answer after we close (half-close linger).
const LINGER: Duration = Duration::from_secs(2);

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

// Conn::flags bits.
/// On the shard's dirty list.
const DIRTY: u8 = 1;
/// A writer task is waiting for the socket to become writable.
const WRITER: u8 = 2;
/// We sent (queued) a close frame: no more data frames go out.
const CLOSE_SENT: u8 = 4;
/// Cut off (slow consumer, write error): the reader stops at its next wake-up.
const KILLED: u8 = 8;

/// What the WebSocket loop serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/ws`: the corecast protocol.
    Client,
    /// `/echo`: every message back unchanged.
    Echo,
}

pub struct Conn {
    pub id: ConnId,
    stream: TcpStream,
    fd: RawFd,
    flags: Cell<u8>,
    outbox: RefCell<Outbox>,
    /// Set by the upgrade; `None` while the socket speaks HTTP.
    user: RefCell<Option<Rc<str>>>,
    /// Rooms this connection is in; the keys are shared with the room table.
    rooms: RefCell<Vec<Rc<str>>>,
    /// What the connection keeps of its JWT (expiry, room patterns), boxed so
    /// that a server without auth pays one pointer (`auth.rs`). A `Cell`: it is
    /// only ever taken and put back (`auth::with_grant`).
    pub(crate) grant: Cell<Option<Box<crate::auth::Grant>>>,
    /// Liveness stamp and op rate (`limits.rs`).
    pub(crate) limits: limits::Limits,
    /// History reads in flight and their rate (`history::budget`).
    pub(crate) hist: crate::history::budget::ConnBudget,
}

impl Conn {
    pub fn new(id: ConnId, stream: TcpStream) -> Conn {
        let fd = stream.as_raw_fd();
        Conn {
            id,
            stream,
            fd,
            flags: Cell::new(0),
            outbox: RefCell::default(),
            user: RefCell::new(None),
            rooms: RefCell::default(),
            grant: Cell::new(None),
            limits: limits::Limits::default(),
            hist: Default::default(),
        }
    }

    fn has(&self, f: u8) -> bool {
        self.flags.get() & f != 0
    }
    fn set(&self, f: u8) {
        self.flags.set(self.flags.get() | f)
    }
    fn clear(&self, f: u8) {
        self.flags.set(self.flags.get() & !f)
    }

    pub fn user(&self) -> Option<Rc<str>> {
        self.user.borrow().clone()
    }
    pub(crate) fn set_user(&self, user: Rc<str>) {
        *self.user.borrow_mut() = Some(user);
    }
    pub(crate) fn add_room(&self, room: Rc<str>) {
        self.rooms.borrow_mut().push(room);
    }
    pub(crate) fn remove_room(&self, room: &str) {
        let mut rooms = self.rooms.borrow_mut();
        if let Some(i) = rooms.iter().position(|r| &**r == room) {
            rooms.swap_remove(i);
        }
    }
    pub(crate) fn take_rooms(&self) -> Vec<Rc<str>> {
        std::mem::take(&mut *self.rooms.borrow_mut())
    }

    // ---- the write side ------------------------------------------------------

    /// Queues a data frame (a delivery or a reply). A client whose queue would
    /// pass the configured limit is cut off with 1008 instead: fan-out never
    /// waits on one client. Returns whether the frame was queued.
    pub fn push(self: &Rc<Self>, shard: &Shard, frame: Bytes) -> bool {
        if self.has(CLOSE_SENT | KILLED) {
            return false;
        }
        let over = self.outbox.borrow().queued() + frame.len() > shard.cfg.outbound_queue_bytes;
        if over {
            shard.m().slow_consumer_disconnects_total.inc();
            debug!(shard = shard.id, conn = self.id, "slow consumer cut off");
            self.kill(shard, CloseCode::POLICY);
            return false;
        }
        self.enqueue(shard, frame);
        true
    }

    /// Queues a control frame or an HTTP response: not subject to the limit.
    pub fn push_control(self: &Rc<Self>, shard: &Shard, frame: Bytes) {
        if !self.has(CLOSE_SENT | KILLED) {
            self.enqueue(shard, frame);
        }
    }

    fn enqueue(self: &Rc<Self>, shard: &Shard, frame: Bytes) {
        shard.m().messages_out_total.inc();
        self.outbox.borrow_mut().push(frame);
        if !self.has(DIRTY) {
            self.set(DIRTY);
            shard.mark_dirty(self.clone());
        }
    }

    /// Starts the closing handshake from our side (§7.1.2): the close frame
    /// goes after what is queued; the reader waits for the client's answer.
    pub fn close(self: &Rc<Self>, shard: &Shard, code: CloseCode) {
        if !self.has(CLOSE_SENT | KILLED) {
            self.enqueue(shard, ws::close::frame(code));
            self.set(CLOSE_SENT);
        }
    }

    /// Cuts the connection off now: drops what has not started to go out,
    /// queues a close frame, and wakes the reader (shutdown of the read side
    /// makes the socket readable) so that it ends the connection.
    pub fn kill(self: &Rc<Self>, shard: &Shard, code: CloseCode) {
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
    pub fn flush(self: &Rc<Self>, shard: &Rc<Shard>) {
        self.clear(DIRTY);
        if self.has(WRITER) {
            return;
        }
        match self.try_write(shard) {
            Ok(Flush::Empty) => {}
            Ok(Flush::Blocked) => {
                self.set(WRITER);
                monoio::spawn(Conn::run_writer(self.clone(), shard.clone()));
            }
            Err(_) => self.kill(shard, CloseCode::INTERNAL),
        }
    }

    fn try_write(&self, shard: &Shard) -> io::Result<Flush> {
        let (n, st) = self.outbox.borrow_mut().try_flush(self.fd)?;
        shard.m().bytes_out_total.add(n as u64);
        Ok(st)
    }

    /// Waits for a full socket to drain, then writes the rest.
    async fn run_writer(self: Rc<Self>, shard: Rc<Shard>) {
        loop {
            if self.stream.writable(false).await.is_err() {
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
    }

    /// Flushes for at most `limit`; returns whether everything went out.
    async fn flush_for(&self, shard: &Shard, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match self.try_write(shard) {
                Ok(Flush::Empty) => return true,
                Ok(Flush::Blocked) => {}
                Err(_) => return false,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || monoio::time::timeout(left, self.stream.writable(false)).await.is_err() {
                return false;
            }
        }
    }

    // ---- the read side ---------------------------------------------------------

    /// Waits until the socket is readable (or `deadline` passes), reads what
    /// is there, and runs `process` over every unconsumed byte (what was kept
    /// from before, then the new bytes). `process` returns how many bytes it
    /// consumed; the rest is kept in `kept` for the next call.
    pub(crate) async fn read_some<F>(
        &self,
        shard: &Shard,
        kept: &mut BytesMut,
        deadline: Option<Instant>,
        mut process: F,
    ) -> Result<(), Stop>
    where
        F: FnMut(&mut [u8]) -> Result<usize, Stop>,
    {
        match deadline {
            None => self.stream.readable(false).await.map_err(Stop::Io)?,
            Some(d) => {
                // Boxed: the timer lives on the heap only while a deadline
                // applies (HTTP, linger), not in every idle connection's task.
                let left = d.saturating_duration_since(Instant::now());
                Box::pin(monoio::time::timeout(left, self.stream.readable(false)))
                    .await
                    .map_err(|_| Stop::Timeout)?
                    .map_err(Stop::Io)?
            }
        }
        loop {
            let got = SCRATCH.with(|s| -> Result<usize, Stop> {
                let mut s = s.borrow_mut();
                // SAFETY: recv into a buffer we own exclusively for the call.
                let n = unsafe { libc::recv(self.fd, s.as_mut_ptr().cast(), s.len(), libc::MSG_DONTWAIT) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    return match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                        _ => Err(Stop::Io(e)),
                    };
                }
                let n = n as usize;
                if n == 0 {
                    return Err(Stop::Eof);
                }
                shard.m().bytes_in_total.add(n as u64);
                if kept.is_empty() {
                    let used = process(&mut s[..n])?;
                    if used < n {
                        kept.extend_from_slice(&s[used..n]);
                    }
                } else {
                    kept.extend_from_slice(&s[..n]);
                    let used = process(&mut kept[..])?;
                    kept.advance(used);
                    if kept.is_empty() {
                        // Don't park a read buffer on an idle connection.
                        *kept = BytesMut::new();
                    }
                }
                Ok(n)
            })?;
            if got < SCRATCH_BYTES {
                return Ok(());
            }
        }
    }
}

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

/// A text or binary message being reassembled from fragments.
struct Fragmented {
    text: bool,
    buf: Vec<u8>,
    utf8: Utf8Check,
}

/// The connection task: from the first byte of HTTP to the closed socket.
pub async fn run(shard: Rc<Shard>, stream: TcpStream) {
    let conn = shard.add_conn(stream);
    let mut kept = BytesMut::new();
    // The HTTP phase and the closing phase are boxed so that their larger
    // state (request head, timers) is on the heap only while they run: the
    // task of an idle WebSocket keeps just the frame loop's small state.
    let stop = match Box::pin(http::serve(&shard, &conn, &mut kept)).await {
        Ok(mode) => ws_loop(&shard, &conn, mode, &mut kept).await,
        Err(stop) => stop,
    };
    debug!(shard = shard.id, conn = conn.id, ?stop, "connection ends");
    Box::pin(finish(&shard, &conn, stop)).await;
    shard.remove_conn(&conn);
}

/// Reads frames until the connection ends.
async fn ws_loop(shard: &Rc<Shard>, conn: &Rc<Conn>, mode: Mode, kept: &mut BytesMut) -> Stop {
    let max = shard.cfg.max_message_bytes;
    let mut frag: Option<Box<Fragmented>> = None;
    loop {
        if conn.has(KILLED) {
            return Stop::Eof;
        }
        let r = conn
            .read_some(shard, kept, None, |buf| {
                // Alive (`shard::heartbeat`): one store per read.
                conn.limits.seen(shard.tick());
                let mut pos = 0;
                loop {
                    let Some((h, hl)) = FrameHeader::parse(&buf[pos..]).map_err(Stop::Protocol)? else {
                        return Ok(pos);
                    };
                    let in_progress = frag.as_ref().map_or(0, |f| f.buf.len()) as u64;
                    if !h.opcode.is_control() && h.len + in_progress > max as u64 {
                        return Err(Stop::Protocol(ProtocolError::TooLarge));
                    }
                    let end = pos + hl + h.len as usize;
                    if buf.len() < end {
                        return Ok(pos);
                    }
                    let payload = &mut buf[pos + hl..end];
                    mask::unmask(payload, h.mask);
                    pos = end;
                    on_frame(shard, conn, mode, &mut frag, h, payload)?;
                }
            })
            .await;
        if let Err(stop) = r {
            return stop;
        }
    }
}

/// Handles one complete, unmasked frame.
fn on_frame(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    mode: Mode,
    frag: &mut Option<Box<Fragmented>>,
    h: FrameHeader,
    payload: &mut [u8],
) -> Result<(), Stop> {
    use ProtocolError::*;
    match h.opcode {
        OpCode::Ping => {
            // Upon receipt of a Ping frame, an endpoint MUST send a Pong frame
            // in response ... with identical Application data. (RFC 6455 §5.5.2)
            conn.push_control(shard, frame::encode(OpCode::Pong, payload));
            Ok(())
        }
        OpCode::Pong => Ok(()),
        OpCode::Close => {
            let code = ws::close::parse(payload).map_err(Stop::Protocol)?;
            // If an endpoint receives a Close frame and did not previously
            // send a Close frame, the endpoint MUST send a Close frame in
            // response. (RFC 6455 §5.5.1)
            if !conn.has(CLOSE_SENT) {
                conn.close(shard, code);
            }
            Err(Stop::Closed)
        }
        OpCode::Text | OpCode::Binary => {
            if frag.is_some() {
                return Err(Stop::Protocol(BadFragmentation));
            }
            let text = h.opcode == OpCode::Text;
            if h.fin {
                if text && simdutf8::basic::from_utf8(payload).is_err() {
                    return Err(Stop::Protocol(InvalidUtf8));
                }
                on_message(shard, conn, mode, text, payload);
            } else {
                let mut f = Box::new(Fragmented { text, buf: payload.to_vec(), utf8: Utf8Check::default() });
                if text && f.utf8.feed(&f.buf).is_err() {
                    return Err(Stop::Protocol(InvalidUtf8));
                }
                *frag = Some(f);
            }
            Ok(())
        }
        OpCode::Continue => {
            let Some(f) = frag.as_mut() else {
                return Err(Stop::Protocol(BadFragmentation));
            };
            f.buf.extend_from_slice(payload);
            if f.text && f.utf8.feed(&f.buf).is_err() {
                return Err(Stop::Protocol(InvalidUtf8));
            }
            if h.fin {
                let mut f = frag.take().expect("checked above");
                if f.text && !f.utf8.is_complete(&f.buf) {
                    return Err(Stop::Protocol(InvalidUtf8));
                }
                on_message(shard, conn, mode, f.text, &mut f.buf);
            }
            Ok(())
        }
    }
}

/// One complete message from the client.
fn on_message(shard: &Rc<Shard>, conn: &Rc<Conn>, mode: Mode, text: bool, payload: &mut [u8]) {
    shard.m().messages_in_total.inc();
    // After sending a Close frame, the endpoint MUST NOT send any more data
    // frames (RFC 6455 §5.5.1): what arrives meanwhile is dropped.
    if conn.has(CLOSE_SENT) {
        return;
    }
    match mode {
        Mode::Echo => {
            let op = if text { OpCode::Text } else { OpCode::Binary };
            conn.push(shard, frame::encode(op, payload));
        }
        Mode::Client => ops::handle(shard, conn, text, payload),
    }
}

/// Ends the connection politely: a protocol error gets its close frame, what
/// is queued is flushed (briefly), the write side is shut so the client sees
/// our FIN first, and we linger for its answer before the socket is dropped.
async fn finish(shard: &Rc<Shard>, conn: &Rc<Conn>, stop: Stop) {
    match &stop {
        Stop::Protocol(e) => {
            shard.m().protocol_closes_total.inc();
            debug!(shard = shard.id, conn = conn.id, error = ?e, "protocol error");
            conn.close(shard, e.close_code());
        }
        Stop::Io(_) => return,
        _ => {}
    }
    let killed = conn.has(KILLED);
    let limit = if killed { Duration::from_millis(100) } else { FLUSH_ON_CLOSE };
    if !conn.flush_for(shard, limit).await || killed {
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
    while conn.read_some(shard, &mut sink, Some(deadline), |b| Ok(b.len())).await.is_ok() {}
}
