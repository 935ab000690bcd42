//! A connection's outbound queue: complete frames waiting for the socket.
//!
//! Frames are shared `Bytes` (a fan-out frame is one allocation for every
//! recipient). `try_flush` hands as many queued frames as fit to one
//! `sendmsg(2)` with an iovec each, so frames that piled up between two
//! flushes leave in one system call.
//!
//! Every byte queued here counts in `queued`, whatever it is (data frames,
//! pongs, pings, the close frame, HTTP responses): `Conn::push` holds the
//! total to `--outbound-queue-bytes`. Pongs are kept to one not yet started
//! (`push_pong` replaces the payload of a waiting one), as RFC 6455 §5.5.3
//! allows, so a client that floods pings and never reads queues one pong.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use bytes::Bytes;

/// Frames one `sendmsg` takes at most (well under IOV_MAX = 1024).
pub const IOV_PER_SEND: usize = 64;

/// An iovec that points nowhere (to fill arrays).
pub const EMPTY_IOV: libc::iovec = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };

/// `sendmsg` flags for every send: never block (a full socket answers
/// EAGAIN, through io_uring too: MSG_DONTWAIT makes the request fail rather
/// than wait), never raise SIGPIPE.
pub const SEND_FLAGS: libc::c_int = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;

/// `Outbox::pong` when no pong is waiting.
const NO_PONG: u32 = u32::MAX;

pub struct Outbox {
    frames: VecDeque<Bytes>,
    /// Bytes queued and not yet written, counting only the unwritten part of
    /// the first frame. (u32: the queue limit is far below 4 GiB.)
    queued: u32,
    /// Bytes of `frames[0]` already written (a partial write).
    head_written: u32,
    /// Frames ever pushed (wrapping): with `frames.len()` it numbers every
    /// queued frame, so a waiting pong can be found without a scan.
    pushed: u32,
    /// The number (`pushed` at its push) of the pong that is queued and not
    /// started, or `NO_PONG`.
    pong: u32,
}

impl Default for Outbox {
    fn default() -> Outbox {
        Outbox { frames: VecDeque::new(), queued: 0, head_written: 0, pushed: 0, pong: NO_PONG }
    }
}

/// How far a flush got.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    /// Everything queued was written.
    Empty,
    /// The socket buffer is full: wait until it is writable.
    Blocked,
}

impl Outbox {
    pub fn queued(&self) -> usize {
        self.queued as usize
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn push(&mut self, frame: Bytes) {
        self.queued += frame.len() as u32;
        self.frames.push_back(frame);
        self.pushed = self.pushed.wrapping_add(1);
    }

    /// Is a pong queued that has not started to go out?
    pub fn has_pong(&self) -> bool {
        self.pong != NO_PONG
    }

    /// Queues a pong, or, when one is already waiting, puts this one's
    /// payload in its place ("an endpoint MAY elect to send a Pong frame for
    /// only the most recently processed Ping frame", RFC 6455 §5.5.3).
    pub fn push_pong(&mut self, frame: Bytes) {
        if self.pong != NO_PONG {
            // Frames in the queue are numbered pushed-len+1 ..= pushed.
            let back = self.pushed.wrapping_sub(self.pong) as usize;
            let i = self.frames.len() - 1 - back;
            let old = std::mem::replace(&mut self.frames[i], frame);
            self.queued = self.queued - old.len() as u32 + self.frames[i].len() as u32;
            return;
        }
        self.push(frame);
        self.pong = self.pushed;
    }

    /// Drops every frame not yet started, keeping a partly written first
    /// frame so the stream stays well framed. Used before a final close frame.
    pub fn truncate_unstarted(&mut self) {
        let keep = usize::from(self.head_written > 0);
        self.frames.truncate(keep);
        self.queued = self.frames.front().map_or(0, |f| f.len() as u32 - self.head_written);
        // `pushed` stays: only differences to it matter, and no pong waits.
        self.pong = NO_PONG;
    }

    /// Writes queued frames to `fd` without blocking. Returns the bytes
    /// written and the `sendmsg` calls that wrote them, with how far it got.
    pub fn try_flush(&mut self, fd: RawFd) -> io::Result<(usize, usize, Flush)> {
        let mut written = 0;
        let mut calls = 0;
        while !self.frames.is_empty() {
            let mut iov = [EMPTY_IOV; IOV_PER_SEND];
            let (n, want) = self.prepare(&mut iov);
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n;
            // SAFETY: every iovec points into a `Bytes` owned by `self.frames`,
            // which is not touched until the call returns.
            let r = unsafe { libc::sendmsg(fd, &msg, SEND_FLAGS) };
            calls += 1;
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok((written, calls, Flush::Blocked)),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            written += r as usize;
            if self.complete(r as usize, want) == Flush::Blocked {
                return Ok((written, calls, Flush::Blocked));
            }
        }
        Ok((written, calls, Flush::Empty))
    }

    /// Points `iov` at the queued bytes, as many frames as it has room for (the
    /// first from where a partial write left it). Returns the iovecs filled
    /// and the bytes they cover. The frames must not change until the send
    /// that uses `iov` has completed (`complete`).
    pub fn prepare(&self, iov: &mut [libc::iovec]) -> (usize, usize) {
        let (mut n, mut want) = (0, 0);
        for (i, f) in self.frames.iter().take(iov.len()).enumerate() {
            let part = if i == 0 { &f[self.head_written as usize..] } else { &f[..] };
            iov[i] = libc::iovec { iov_base: part.as_ptr() as *mut _, iov_len: part.len() };
            want += part.len();
            n += 1;
        }
        (n, want)
    }

    /// A send of `want` prepared bytes wrote `r` of them: drops what went
    /// out. `Blocked` if the socket took less (it is full).
    pub fn complete(&mut self, r: usize, want: usize) -> Flush {
        self.advance(r);
        if r < want {
            return Flush::Blocked;
        }
        if self.frames.is_empty() {
            // An idle connection keeps no queue at all (a 4-frame queue is
            // 144 bytes of heap, the largest part of an idle connection
            // otherwise); the next push allocates one again, a malloc and
            // a free per flush that are small next to the `sendmsg`.
            self.frames = VecDeque::new();
        }
        Flush::Empty
    }

    fn advance(&mut self, mut n: usize) {
        self.queued -= n as u32;
        while n > 0 {
            let Some(front) = self.frames.front() else { break };
            // The front frame's number; once it starts, a pong is no longer waiting.
            let front_no = self.pushed.wrapping_sub(self.frames.len() as u32 - 1);
            if front_no == self.pong {
                self.pong = NO_PONG;
            }
            let left = front.len() - self.head_written as usize;
            if n >= left {
                n -= left;
                self.head_written = 0;
                self.frames.pop_front();
            } else {
                self.head_written += n as u32;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn flushes_many_frames_in_order_and_resumes_after_a_full_socket() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut ob = Outbox::default();
        let mut expect = Vec::new();
        for i in 0..2000u32 {
            let f = Bytes::from(vec![(i % 251) as u8; 1 + (i as usize * 37) % 1500]);
            expect.extend_from_slice(&f);
            ob.push(f);
        }
        assert_eq!(ob.queued(), expect.len());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let (_, _, st) = ob.try_flush(a.as_raw_fd()).unwrap();
            if st == Flush::Empty {
                break;
            }
            let n = b.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        drop(a);
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, expect);
        assert_eq!(ob.queued(), 0);
    }

    #[test]
    fn one_waiting_pong_takes_the_newest_payload() {
        let mut ob = Outbox::default();
        ob.push(Bytes::from_static(b"data1"));
        ob.push_pong(Bytes::from_static(b"P1"));
        ob.push(Bytes::from_static(b"data2"));
        for p in [&b"P22"[..], b"P333", b"P4"] {
            ob.push_pong(Bytes::copy_from_slice(p));
        }
        assert_eq!(ob.frames.len(), 3, "one pong queued however many pings");
        assert_eq!(&ob.frames[1][..], b"P4");
        assert_eq!(ob.queued(), 5 + 2 + 5);
        // Once the pong has started to go out, the next one queues anew.
        ob.advance(5 + 1);
        assert!(!ob.has_pong());
        ob.push_pong(Bytes::from_static(b"P5"));
        assert_eq!(ob.frames.len(), 3);
        assert!(ob.has_pong());
        assert_eq!(ob.queued(), 1 + 5 + 2);
        ob.advance(1 + 5);
        assert!(ob.has_pong(), "P5 is waiting: not started");
        ob.advance(2);
        assert!(!ob.has_pong());
        assert!(ob.is_empty());
    }

    #[test]
    fn truncate_keeps_a_partly_written_head() {
        let mut ob = Outbox::default();
        ob.push(Bytes::from_static(b"abcdef"));
        ob.push(Bytes::from_static(b"ghi"));
        ob.advance(2);
        ob.truncate_unstarted();
        assert_eq!(ob.queued(), 4);
        ob.push(Bytes::from_static(b"XY"));
        assert_eq!(ob.queued(), 6);
        ob.advance(4);
        ob.truncate_unstarted();
        assert_eq!(ob.queued(), 0);
        assert!(ob.is_empty());
    }
}
