//! ④ The read side of a connection: bytes in, frames out to `on_frame`.
//!
//! Reads `recv(2)` (waiting for readiness through the shard's poller when
//! nothing is there) into the shard's one scratch
//! buffer, so an idle connection parks no read buffer at all: only bytes of
//! an incomplete frame (or HTTP head) are kept, in a per-connection
//! `BytesMut` that is freed as soon as it empties. Every read is bounded:
//! by the caller's byte budget (the HTTP head and body limits are enforced
//! as bytes arrive, never after a large read) and by `READS_PER_WAKE` per
//! wake-up, after which the task yields so that one fast sender cannot hold
//! its shard.
//!
//! Control frames (ping, pong) count against the connection's op rate
//! (`limits::take_control`); a ping gets a pong through `Conn::pong`, which
//! keeps at most one waiting.

use std::io;
use std::rc::Rc;
use std::time::Instant;

use bytes::{Buf, BytesMut};

use super::poller::Want;
use super::shard_io::ShardIo;
use super::{CLOSE_SENT, Conn, ECHO, KILLED, Mode, POLLED, Stop, limits};
use crate::ws::deflate;
use crate::ws::message::Assembler;
use crate::ws::{CloseCode, FrameHeader, OpCode, ProtocolError, frame, mask};

/// Size of each shard's receive scratch buffer.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Full scratch buffers one wake-up may read before the task yields: one
/// (64 KiB, e.g. 512 pings) keeps a flooding client's turn to a few ms.
const READS_PER_WAKE: usize = 1;

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

impl Conn {
    /// Reads at most `budget` bytes of what the socket has (first waiting,
    /// through the shard's poller, until it has something or `deadline`
    /// passes), and runs `process` over every unconsumed byte (what was kept
    /// from before, then the new bytes). `process` returns how many bytes it
    /// consumed; the rest is kept in `kept` for the next call. Returns after
    /// the socket is drained for now, the budget is spent, or
    /// `READS_PER_WAKE` full reads (then it yields first). It reads before it
    /// waits: a request head is usually there as soon as the connection is.
    pub(crate) async fn read_some<F>(
        &self,
        shard: &ShardIo,
        kept: &mut BytesMut,
        deadline: Option<Instant>,
        budget: usize,
        mut process: F,
    ) -> Result<(), Stop>
    where
        F: FnMut(&mut [u8]) -> Result<usize, Stop>,
    {
        let mut left = budget;
        let mut reads = 0;
        while reads < READS_PER_WAKE {
            let want = left.min(SCRATCH_BYTES);
            if want == 0 {
                return Ok(());
            }
            let got = self.recv_once(shard, kept, want, &mut process)?;
            if got == 0 && reads == 0 {
                // Nothing there yet: wait for bytes (or the peer's FIN).
                let ready = self.ready(shard, Want::Read);
                match deadline {
                    None => ready.await.map_err(Stop::Io)?,
                    Some(d) => {
                        // Boxed: the timer is on the heap only while the
                        // wait lasts, not in the (larger) HTTP-phase future
                        // of every connection, whose allocations the idle
                        // connections' then sit between.
                        let left = d.saturating_duration_since(Instant::now());
                        Box::pin(monoio::time::timeout(left, ready))
                            .await
                            .map_err(|_| Stop::Timeout)?
                            .map_err(Stop::Io)?
                    }
                }
                continue;
            }
            reads += 1;
            left -= got;
            if got < want {
                return Ok(());
            }
        }
        // More may be waiting: let the shard's other tasks have a turn first.
        shard.yield_now().await;
        Ok(())
    }

    /// One `recv(2)` of at most `want` bytes (≤ `SCRATCH_BYTES`) into the
    /// shard's scratch buffer, without waiting, then `process` over every
    /// unconsumed byte; what it leaves is kept in `kept`. Returns the bytes
    /// read (0: nothing was there).
    fn recv_once<F>(&self, shard: &ShardIo, kept: &mut BytesMut, want: usize, process: &mut F) -> Result<usize, Stop>
    where
        F: FnMut(&mut [u8]) -> Result<usize, Stop>,
    {
        SCRATCH.with(|s| -> Result<usize, Stop> {
            let mut s = s.borrow_mut();
            // SAFETY: recv into a buffer we own exclusively for the call, at
            // most its length.
            let n = unsafe { libc::recv(self.fd, s.as_mut_ptr().cast(), want.min(SCRATCH_BYTES), libc::MSG_DONTWAIT) };
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
        })
    }
}

/// The frame loop's state between reads, kept in `Conn::parked` (boxed)
/// only while it holds something: an idle connection keeps `None` there.
#[derive(Default)]
pub(super) struct Parked {
    /// Bytes of an incomplete frame.
    kept: BytesMut,
    rx: Assembler,
}

impl Parked {
    fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.rx.is_idle()
    }
}

/// What a client's complete message is handed to: the connection, whether it
/// was text, the payload (mutable: the op parser may decode in place).
pub trait OnMessage: FnMut(&Rc<Conn>, bool, &mut [u8]) {}
impl<F: FnMut(&Rc<Conn>, bool, &mut [u8])> OnMessage for F {}

/// The connection became a WebSocket serving `mode`: handles the frames
/// that came in with the upgrade request (now, not when the next bytes
/// arrive) and hands the connection to the shard's poller
/// (`conn::poller`), which has `on_readable` called from then on. `Err`: the
/// frame loop is over already. Each complete client message goes to
/// `on_msg` (the ops, above this layer); echo mode answers here.
pub(crate) fn start<H: OnMessage>(
    shard: &Rc<ShardIo>,
    conn: &Rc<Conn>,
    mode: Mode,
    kept: BytesMut,
    on_msg: &mut H,
) -> Result<(), Stop> {
    if mode == Mode::Echo {
        conn.set(ECHO);
    }
    let mut p = Parked { kept, rx: Assembler::default() };
    if !p.kept.is_empty() {
        conn.limits.seen(shard.tick());
        let used = frames(shard, conn, mode, &mut p.rx, &mut p.kept[..], on_msg)?;
        p.kept.advance(used);
        if p.kept.is_empty() {
            p.kept = BytesMut::new();
        }
    }
    if conn.has(KILLED) {
        return Err(Stop::Eof);
    }
    conn.park(p);
    shard.poller().add(conn.fd, conn.id).map_err(Stop::Io)?;
    conn.set(POLLED);
    Ok(())
}

/// The poller saw `conn` readable: one read (at most one scratch buffer;
/// level-triggered readiness brings the rest in the next round), every
/// complete frame handled, each message to `on_msg`. `Err`: the frame loop
/// ended here; the connection has left the poller and the caller closes it
/// (`session::end`).
pub(crate) fn on_readable<H: OnMessage>(shard: &Rc<ShardIo>, conn: &Rc<Conn>, on_msg: &mut H) -> Result<(), Stop> {
    let r = if conn.has(KILLED) {
        Err(Stop::Eof)
    } else {
        let mode = if conn.has(ECHO) { Mode::Echo } else { Mode::Client };
        let mut p = conn.unpark();
        let Parked { kept, rx } = &mut p;
        let r = conn.recv_once(shard, kept, SCRATCH_BYTES, &mut |buf: &mut [u8]| {
            // Alive (`shard::heartbeat`): one store per read.
            conn.limits.seen(shard.tick());
            frames(shard, conn, mode, rx, buf, on_msg)
        });
        conn.park(p);
        r
    };
    if let Err(stop) = r {
        conn.clear(POLLED);
        shard.poller().remove(conn.fd);
        // What a message left half-read no longer matters.
        drop(conn.unpark());
        return Err(stop);
    }
    Ok(())
}

impl Conn {
    /// Keeps the frame loop's state until the next read (nothing if empty).
    fn park(&self, p: Parked) {
        if !p.is_empty() {
            self.parked.set(Some(Box::new(p)));
        }
    }

    /// Takes the frame loop's state (empty if nothing was kept).
    fn unpark(&self) -> Parked {
        self.parked.take().map_or_else(Parked::default, |b| *b)
    }
}

/// Handles every complete frame at the start of `buf`; returns the bytes
/// consumed (an incomplete frame is left for the next read).
fn frames<H: OnMessage>(
    shard: &Rc<ShardIo>,
    conn: &Rc<Conn>,
    mode: Mode,
    rx: &mut Assembler,
    buf: &mut [u8],
    on_msg: &mut H,
) -> Result<usize, Stop> {
    let max = shard.cfg.max_message_bytes;
    let deflate = conn.deflate().is_on();
    let mut pos = 0;
    loop {
        // Cut off: whatever else arrived is not looked at.
        if conn.has(KILLED) {
            return Ok(buf.len());
        }
        let Some((h, hl)) = FrameHeader::parse_with(&buf[pos..], deflate).map_err(Stop::Protocol)? else {
            return Ok(pos);
        };
        let in_progress = rx.in_progress() as u64;
        // Checked on the header, before the payload is waited for: an
        // oversized message is never buffered. (A compressed frame is held
        // to the same limit before inflating, and its inflated size after.)
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
        on_frame(shard, conn, mode, rx, h, payload, on_msg)?;
    }
}

/// Handles one complete, unmasked frame.
fn on_frame<H: OnMessage>(
    shard: &Rc<ShardIo>,
    conn: &Rc<Conn>,
    mode: Mode,
    rx: &mut Assembler,
    h: FrameHeader,
    payload: &mut [u8],
    on_msg: &mut H,
) -> Result<(), Stop> {
    let max = shard.cfg.max_message_bytes;
    match h.opcode {
        OpCode::Ping | OpCode::Pong => {
            // Control frames cost us work (and a ping, a reply): they count
            // against the connection's rate like ops do.
            match limits::take_control(shard, conn) {
                limits::Verdict::Allow => {}
                limits::Verdict::Refuse => return Ok(()),
                limits::Verdict::Abuse => {
                    conn.kill(shard, CloseCode::POLICY);
                    return Ok(());
                }
            }
            if h.opcode == OpCode::Ping {
                // Upon receipt of a Ping frame, an endpoint MUST send a Pong
                // frame in response ... with identical Application data.
                // (RFC 6455 §5.5.2)
                conn.pong(shard, frame::encode(OpCode::Pong, payload));
            }
            Ok(())
        }
        OpCode::Close => {
            let code = crate::ws::close::parse(payload).map_err(Stop::Protocol)?;
            // If an endpoint receives a Close frame and did not previously
            // send a Close frame, the endpoint MUST send a Close frame in
            // response. (RFC 6455 §5.5.1)
            if !conn.has(CLOSE_SENT) {
                conn.close(shard, code);
            }
            Err(Stop::Closed)
        }
        OpCode::Text | OpCode::Binary | OpCode::Continue => {
            let message = rx.on_data(&h, payload, conn.deflate(), max).map_err(Stop::Protocol)?;
            // RSV1 marks the first frame of a compressed message (RFC 7692 §6.1).
            if h.rsv1 && h.opcode != OpCode::Continue {
                shard.m().deflate_messages_in_total.inc();
            }
            if let Some(mut m) = message {
                let text = m.text();
                on_message(shard, conn, mode, text, m.payload(), on_msg);
            }
            Ok(())
        }
    }
}

/// One complete message from the client.
fn on_message<H: OnMessage>(
    shard: &Rc<ShardIo>,
    conn: &Rc<Conn>,
    mode: Mode,
    text: bool,
    payload: &mut [u8],
    on_msg: &mut H,
) {
    shard.m().messages_in_total.inc();
    // After sending a Close frame, the endpoint MUST NOT send any more data
    // frames (RFC 6455 §5.5.1): what arrives meanwhile is dropped.
    if conn.has(CLOSE_SENT) {
        return;
    }
    match mode {
        Mode::Echo => {
            let op = if text { OpCode::Text } else { OpCode::Binary };
            // Echo replies are compressed per connection (no fan-out to share).
            let agreed = conn.deflate();
            let z = (agreed.is_on()
                && payload.len() >= shard.cfg.compression_min_bytes
                && payload.len() <= agreed.max_compressed_payload())
            .then(|| deflate::compress(op, payload))
            .flatten();
            match z {
                Some(z) => {
                    shard.m().deflate_compressions_total.inc();
                    shard.m().deflate_frames_out_total.inc();
                    conn.push(shard, z);
                }
                None => {
                    conn.push(shard, frame::encode(op, payload));
                }
            }
        }
        Mode::Client => on_msg(conn, text, payload),
    }
}
