//! A connection's outbound queue: complete frames waiting for the socket.
//!
//! Frames are shared `Bytes` (a fan-out frame is one allocation for every
//! recipient). `try_flush` hands as many queued frames as fit to one
//! `sendmsg(2)` with an iovec each, so frames that piled up between two
//! flushes leave in one system call.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use bytes::Bytes;

/// Frames one `sendmsg` takes at most (well under IOV_MAX = 1024).
const IOV_PER_SEND: usize = 64;

#[derive(Default)]
pub struct Outbox {
    frames: VecDeque<Bytes>,
    /// Bytes queued and not yet written, counting only the unwritten part of
    /// the first frame.
    queued: usize,
    /// Bytes of `frames[0]` already written (a partial write).
    head_written: usize,
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
        self.queued
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn push(&mut self, frame: Bytes) {
        self.queued += frame.len();
        self.frames.push_back(frame);
    }

    /// Drops every frame not yet started, keeping a partly written first
    /// frame so the stream stays well framed. Used before a final close frame.
    pub fn truncate_unstarted(&mut self) {
        let keep = usize::from(self.head_written > 0);
        self.frames.truncate(keep);
        self.queued = self.frames.front().map_or(0, |f| f.len() - self.head_written);
    }

    /// Writes queued frames to `fd` without blocking. Returns the bytes
    /// written with how far it got.
    pub fn try_flush(&mut self, fd: RawFd) -> io::Result<(usize, Flush)> {
        let mut written = 0;
        while !self.frames.is_empty() {
            let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; IOV_PER_SEND];
            let mut n = 0;
            let mut want = 0;
            for (i, f) in self.frames.iter().take(IOV_PER_SEND).enumerate() {
                let part = if i == 0 { &f[self.head_written..] } else { &f[..] };
                iov[i] = libc::iovec { iov_base: part.as_ptr() as *mut _, iov_len: part.len() };
                want += part.len();
                n += 1;
            }
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n;
            // SAFETY: every iovec points into a `Bytes` owned by `self.frames`,
            // which is not touched until the call returns.
            let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok((written, Flush::Blocked)),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            let r = r as usize;
            written += r;
            self.advance(r);
            if r < want {
                return Ok((written, Flush::Blocked));
            }
        }
        // An idle connection should not keep a grown queue around.
        if self.frames.capacity() > 16 {
            self.frames = VecDeque::new();
        }
        Ok((written, Flush::Empty))
    }

    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.frames.front() else { break };
            let left = front.len() - self.head_written;
            if n >= left {
                n -= left;
                self.head_written = 0;
                self.frames.pop_front();
            } else {
                self.head_written += n;
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
            let (_, st) = ob.try_flush(a.as_raw_fd()).unwrap();
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
