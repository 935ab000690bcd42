//! ④ The read side of a connection: bytes in, frames out to `on_frame`.
//!
//! Reads wait for readiness and then `recv(2)` into the shard's one scratch
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

use super::{CLOSE_SENT, Conn, KILLED, Mode, Stop, limits, ops};
use crate::shard::Shard;
use crate::ws::{CloseCode, FrameHeader, OpCode, ProtocolError, frame, mask, utf8::Utf8Check};

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
    /// Waits until the socket is readable (or `deadline` passes), reads at
    /// most `budget` bytes of what is there, and runs `process` over every
    /// unconsumed byte (what was kept from before, then the new bytes).
    /// `process` returns how many bytes it consumed; the rest is kept in
    /// `kept` for the next call. Returns after the socket is drained for now,
    /// the budget is spent, or `READS_PER_WAKE` full reads (then it yields
    /// first).
    pub(crate) async fn read_some<F>(
        &self,
        shard: &Shard,
        kept: &mut BytesMut,
        deadline: Option<Instant>,
        budget: usize,
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
        let mut left = budget;
        for _ in 0..READS_PER_WAKE {
            let want = left.min(SCRATCH_BYTES);
            if want == 0 {
                return Ok(());
            }
            let got = SCRATCH.with(|s| -> Result<usize, Stop> {
                let mut s = s.borrow_mut();
                // SAFETY: recv into a buffer we own exclusively for the call,
                // at most its length.
                let n = unsafe { libc::recv(self.fd, s.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
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
            left -= got;
            if got < want {
                return Ok(());
            }
        }
        // More may be waiting: let the shard's other tasks have a turn first.
        shard.yield_now().await;
        Ok(())
    }
}

/// A text or binary message being reassembled from fragments.
struct Fragmented {
    text: bool,
    buf: Vec<u8>,
    utf8: Utf8Check,
}

/// Bytes one wake-up of the frame loop may read (`READS_PER_WAKE` scratch
/// buffers).
const WS_READ_BUDGET: usize = READS_PER_WAKE * SCRATCH_BYTES;

/// Reads frames until the connection ends.
pub(super) async fn ws_loop(shard: &Rc<Shard>, conn: &Rc<Conn>, mode: Mode, kept: &mut BytesMut) -> Stop {
    let mut frag: Option<Box<Fragmented>> = None;
    // Bytes that came in with the upgrade request are frames already: they
    // are handled now, not when the next bytes arrive.
    if !kept.is_empty() {
        conn.limits.seen(shard.tick());
        match frames(shard, conn, mode, &mut frag, &mut kept[..]) {
            Ok(used) => kept.advance(used),
            Err(stop) => return stop,
        }
        if kept.is_empty() {
            *kept = BytesMut::new();
        }
    }
    loop {
        if conn.has(KILLED) {
            return Stop::Eof;
        }
        let r = conn
            .read_some(shard, kept, None, WS_READ_BUDGET, |buf| {
                // Alive (`shard::heartbeat`): one store per read.
                conn.limits.seen(shard.tick());
                frames(shard, conn, mode, &mut frag, buf)
            })
            .await;
        if let Err(stop) = r {
            return stop;
        }
    }
}

/// Handles every complete frame at the start of `buf`; returns the bytes
/// consumed (an incomplete frame is left for the next read).
fn frames(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    mode: Mode,
    frag: &mut Option<Box<Fragmented>>,
    buf: &mut [u8],
) -> Result<usize, Stop> {
    let max = shard.cfg.max_message_bytes;
    let mut pos = 0;
    loop {
        // Cut off: whatever else arrived is not looked at.
        if conn.has(KILLED) {
            return Ok(buf.len());
        }
        let Some((h, hl)) = FrameHeader::parse(&buf[pos..]).map_err(Stop::Protocol)? else {
            return Ok(pos);
        };
        let in_progress = frag.as_ref().map_or(0, |f| f.buf.len()) as u64;
        // Checked on the header, before the payload is waited for: an
        // oversized message is never buffered.
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
        on_frame(shard, conn, mode, frag, h, payload)?;
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
