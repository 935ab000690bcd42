//! Socket helpers every Redis link uses, below the links themselves:
//! blocking ones for the topology and Sentinel threads (`connect`,
//! `oneshot`, `read_frame`) and non-blocking ones for the shard's links on
//! its runtime (`connect_any`, `next_frame`, `try_send`, `try_recv`,
//! `write_all`), and `ReplyFn`, what a queued command calls with its reply.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use bytes::BytesMut;
use monoio::net::TcpStream;
use redis_protocol::resp2::types::BytesFrame;

use super::link::LinkError;
use super::resp;
use super::url::RedisUrl;
use crate::protocol::Unavailable;

/// How long a blocking ask (topology, Sentinel) waits to connect, write or read.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes read from a link's socket at a time.
pub const READ_CHUNK: usize = 16 * 1024;

/// Told the reply to one command: the reply frame (an error reply too), or
/// `Unavailable` when the command was lost with its connection.
pub type ReplyFn = Box<dyn FnOnce(Result<BytesFrame, Unavailable>)>;

// ---- blocking: topology and Sentinel threads -------------------------------------

pub fn resolve(host: &str, port: u16) -> Vec<SocketAddr> {
    (host, port).to_socket_addrs().map(|a| a.collect()).unwrap_or_default()
}

/// One command on a fresh connection (logged in when `login`); its reply.
pub fn oneshot(url: &RedisUrl, login: bool, cmd: &[&[u8]]) -> Result<BytesFrame, LinkError> {
    let mut sock = connect(url)?;
    let mut out = BytesMut::new();
    let mut steps = Vec::new();
    if login {
        let (hs, s) = resp::handshake(url, "corecast-topology", false);
        out = hs;
        steps = s;
    }
    resp::put_command(&mut out, cmd);
    sock.write_all(&out)?;
    let mut buf = BytesMut::with_capacity(4096);
    for step in steps {
        let reply = read_frame(&mut sock, &mut buf)?;
        resp::check(step, &reply)?;
    }
    read_frame(&mut sock, &mut buf)
}

/// A blocking connection with the handshake timeouts set.
pub fn connect(url: &RedisUrl) -> Result<StdTcpStream, LinkError> {
    let addrs = resolve(&url.host, url.port);
    let mut last = LinkError::Io(std::io::Error::new(std::io::ErrorKind::NotFound, "the host has no address"));
    for a in &addrs {
        match StdTcpStream::connect_timeout(a, ASK_TIMEOUT) {
            Ok(s) => {
                s.set_read_timeout(Some(ASK_TIMEOUT))?;
                s.set_write_timeout(Some(ASK_TIMEOUT))?;
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e.into(),
        }
    }
    Err(last)
}

/// Reads until one whole frame is in `buf`; takes it.
pub fn read_frame(sock: &mut StdTcpStream, buf: &mut BytesMut) -> Result<BytesFrame, LinkError> {
    loop {
        if let Some(f) = resp::take_frame(buf)? {
            return Ok(f);
        }
        let start = buf.len();
        buf.resize(start + 4096, 0);
        let r = sock.read(&mut buf[start..]);
        buf.truncate(start + *r.as_ref().unwrap_or(&0));
        match r {
            Ok(0) => return Err(LinkError::Closed),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

// ---- non-blocking: a shard's links on its runtime ---------------------------------

/// Connects to the first of `addrs` that answers, with the socket options
/// every Redis link of a shard uses (no Nagle; keepalive probes after 5 s of
/// silence, so a vanished host is noticed even when both sides are idle).
pub async fn connect_any(addrs: &[std::net::SocketAddr]) -> Result<TcpStream, LinkError> {
    let mut last = LinkError::Io(io::Error::new(io::ErrorKind::NotFound, "the Redis host has no address"));
    for &addr in addrs {
        match TcpStream::connect_addr(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                stream.set_tcp_keepalive(Some(Duration::from_secs(5)), Some(Duration::from_secs(1)), Some(3))?;
                return Ok(stream);
            }
            Err(e) => last = e.into(),
        }
    }
    Err(last)
}

/// Reads until one whole reply is in `buf`, and takes it.
pub async fn next_frame(stream: &TcpStream, buf: &mut BytesMut) -> Result<BytesFrame, LinkError> {
    loop {
        if let Some(frame) = resp::take_frame(buf)? {
            return Ok(frame);
        }
        stream.readable(false).await?;
        match try_recv(stream.as_raw_fd(), buf) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(_) => {}
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

pub fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

pub fn try_send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: plain syscall on a descriptor the stream owns, reading from a
    // slice we borrow for the call.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Reads once into the end of `buf`.
pub fn try_recv(fd: RawFd, buf: &mut BytesMut) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    // SAFETY: plain syscall on a descriptor the stream owns, writing into
    // initialised memory we borrow exclusively for the call.
    let n = unsafe { libc::recv(fd, buf[start..].as_mut_ptr().cast(), READ_CHUNK, libc::MSG_DONTWAIT) };
    let r = if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) };
    buf.truncate(start + *r.as_ref().unwrap_or(&0));
    r
}

pub async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match try_send(stream.as_raw_fd(), data) {
            Ok(n) => data = &data[n..],
            Err(e) if would_block(&e) => stream.writable(false).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
