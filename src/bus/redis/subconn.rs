//! ⑦ One subscriber connection of a `redis-NN` reader: to one primary (the
//! single Redis, the Sentinel-named primary, or one cluster primary).
//!
//! Owns the socket (connected and logged in without blocking, driven by the
//! reader's `poll`, so that a primary that does not answer holds up no
//! other; then read after `poll` says so), its read buffer, the heartbeat,
//! the reconnect backoff, the channels wanted *at this primary*
//! (`Subscriptions`), and the commands written but not yet answered, so that
//! an error reply (`MOVED`, `CLUSTERDOWN`) is matched to the channels of the
//! command it refuses, and an `sunsubscribe` that answers no command of ours
//! is known for what it is: Redis dropping a channel whose slot moved.
//!
//! In: connect/plan calls from the reader, bytes from Redis. Out: commands
//! to Redis and `Confirm`s (what a confirmation frame meant) to the reader,
//! which alone talks to the shard.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use socket2::{Domain, Protocol, Socket, Type};

use super::link::{DEAD_AFTER, HANDSHAKE_TIMEOUT, LinkError, PING_IDLE, Retry};
use super::subs::{Settled, Subscriptions};
use super::topology::Node;
use super::{cluster, resp};
use crate::metrics::Metrics;

/// Bytes read from Redis per `read(2)`.
pub const READ_CHUNK: usize = 32 * 1024;
/// Channels per SUBSCRIBE/UNSUBSCRIBE command; a larger batch is split.
const MAX_CHANNELS_PER_COMMAND: usize = 4096;
/// TCP keepalive: probe after this much silence, so that a vanished host is
/// noticed even when both sides are idle.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);

/// A command written, waiting for one confirmation per channel.
struct Pending {
    unsubscribe: bool,
    left: usize,
    channels: Vec<Box<[u8]>>,
}

pub struct Live {
    pub sock: TcpStream,
    pub buf: BytesMut,
    pub last_rx: Instant,
    pub ping_sent: Option<Instant>,
}

/// A connection being made: a non-blocking connect, then the log-in.
pub struct Attempt {
    sock: TcpStream,
    /// Connect, then log-in, must be done by then.
    deadline: Instant,
    connected: bool,
    /// Handshake bytes not yet written.
    out: BytesMut,
    buf: BytesMut,
    /// The handshake replies still to come, in order.
    steps: VecDeque<resp::Step>,
}

impl Attempt {
    fn advance(&mut self) -> Result<bool, LinkError> {
        if !self.connected {
            if let Some(e) = self.sock.take_error()? {
                return Err(e.into());
            }
            // Writable with no error: connected (else not ready yet).
            if self.sock.peer_addr().is_err() {
                return Ok(false);
            }
            self.connected = true;
            self.deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        }
        while !self.out.is_empty() {
            match (&self.sock).write(&self.out) {
                Ok(n) => {
                    let _ = self.out.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        loop {
            while let Some(frame) = resp::take_frame(&mut self.buf)? {
                let Some(step) = self.steps.pop_front() else { break };
                resp::check(step, &frame)?;
            }
            if self.steps.is_empty() {
                return Ok(true);
            }
            match read_more(&mut self.sock, &mut self.buf) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

pub struct SubConn {
    pub node: Arc<Node>,
    /// The node's number in the reader's record of deliveries (`overlap.rs`).
    pub origin: u16,
    /// The connect under way, while down.
    pub attempt: Option<Attempt>,
    /// Which of the node's addresses the next attempt uses.
    next_addr: usize,
    pub subs: Subscriptions,
    /// The connection, while up; set only through `set_live` (it keeps
    /// `corecast_redis_node_links_up` in step).
    pub live: Option<Live>,
    metrics: Arc<Metrics>,
    pub retry: Retry,
    /// While down: when to try again.
    pub retry_at: Instant,
    pending: VecDeque<Pending>,
}

/// What one confirmation frame (`subscribe`, `sunsubscribe`, ...) meant.
pub enum Confirm {
    /// Answers a command of ours; maybe settles a room.
    Answer(Option<Settled>),
    /// Redis unsubscribed a channel by itself; `true` if still wanted.
    Unsolicited(bool),
}

impl SubConn {
    pub fn new(node: Arc<Node>, origin: u16, prefix: &str, retry: Retry, metrics: Arc<Metrics>) -> SubConn {
        SubConn {
            node,
            origin,
            attempt: None,
            next_addr: 0,
            subs: Subscriptions::new(prefix),
            live: None,
            metrics,
            retry,
            retry_at: Instant::now(),
            pending: VecDeque::new(),
        }
    }

    /// Starts connecting (non-blocking) to the node's next address. The
    /// connect and the log-in (AUTH, SELECT, CLIENT SETNAME, with Sentinel
    /// `ROLE`) then advance as `poll` says the socket is ready (`advance`),
    /// so a host that does not answer holds up nothing but itself.
    pub fn start_attempt(&mut self, client_name: &str, check_role: bool) -> Result<(), LinkError> {
        let addrs = &self.node.addrs;
        if addrs.is_empty() {
            return Err(LinkError::Io(io::Error::new(io::ErrorKind::NotFound, "the Redis host has no address")));
        }
        let addr = addrs[self.next_addr % addrs.len()];
        self.next_addr = self.next_addr.wrapping_add(1);
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(Duration::from_secs(1))
            .with_retries(3);
        sock.set_tcp_keepalive(&keepalive)?;
        match sock.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        let (out, steps) = resp::handshake(&self.node.url, client_name, check_role);
        self.attempt = Some(Attempt {
            sock: sock.into(),
            deadline: Instant::now() + super::link::CONNECT_TIMEOUT,
            connected: false,
            out,
            buf: BytesMut::with_capacity(READ_CHUNK),
            steps: steps.into(),
        });
        Ok(())
    }

    /// What the attempt under way waits for: its socket and `poll` events.
    pub fn attempt_poll(&self) -> Option<(RawFd, libc::c_short)> {
        let a = self.attempt.as_ref()?;
        let events = if !a.connected || !a.out.is_empty() { libc::POLLOUT } else { libc::POLLIN };
        Some((a.sock.as_raw_fd(), events))
    }

    /// Moves the attempt on as far as the socket allows (or fails it at its
    /// deadline). `Ok(true)`: logged in, the connection is live.
    pub fn advance(&mut self) -> Result<bool, LinkError> {
        let Some(a) = &mut self.attempt else { return Ok(false) };
        let r = a.advance();
        match r {
            Ok(true) => {
                let Some(a) = self.attempt.take() else { return Ok(false) };
                a.sock.set_nonblocking(false)?;
                a.sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
                a.sock.set_write_timeout(Some(DEAD_AFTER))?;
                self.pending.clear();
                self.set_live(Some(Live { sock: a.sock, buf: a.buf, last_rx: Instant::now(), ping_sent: None }));
                Ok(true)
            }
            Ok(false) if Instant::now() >= a.deadline => {
                let what = if a.connected { "AUTH/SELECT/ROLE" } else { "connect" };
                self.attempt = None;
                Err(LinkError::Timeout(what))
            }
            Ok(false) => Ok(false),
            Err(e) => {
                self.attempt = None;
                Err(e)
            }
        }
    }

    pub fn set_live(&mut self, live: Option<Live>) {
        let (was, is) = (self.live.is_some(), live.is_some());
        self.live = live;
        if was != is {
            self.metrics.redis_nodes.link(&self.node.name, false, is);
        }
    }

    /// The connection is gone: Redis has nothing of ours any more.
    pub fn lose(&mut self, delay: Duration) {
        self.set_live(None);
        self.attempt = None;
        self.subs.reset();
        self.pending.clear();
        self.retry_at = Instant::now() + delay;
    }

    /// Writes what brings this primary to the wanted subscriptions; returns
    /// how many commands. In a cluster (`sharded`) each command names the
    /// channels of one slot only.
    pub fn write_plan(&mut self, sharded: bool) -> io::Result<u64> {
        let Some(live) = &mut self.live else { return Ok(0) };
        let plan = self.subs.plan();
        if plan.is_empty() {
            return Ok(0);
        }
        let (sub, unsub): (&[u8], &[u8]) =
            if sharded { (b"SSUBSCRIBE", b"SUNSUBSCRIBE") } else { (b"SUBSCRIBE", b"UNSUBSCRIBE") };
        let mut out = BytesMut::new();
        let mut commands = 0;
        for (unsubscribe, list) in [(true, plan.unsubscribe), (false, plan.subscribe)] {
            let cmd = if unsubscribe { unsub } else { sub };
            let groups = if sharded { cluster::group_by_slot(list) } else { vec![(0, list)] };
            for (_, group) in groups {
                for chunk in group.chunks(MAX_CHANNELS_PER_COMMAND) {
                    resp::put_channels(&mut out, cmd, chunk);
                    self.pending.push_back(Pending { unsubscribe, left: chunk.len(), channels: chunk.to_vec() });
                    commands += 1;
                }
            }
        }
        live.sock.write_all(&out)?;
        Ok(commands)
    }

    /// A `subscribe`/`unsubscribe` (or sharded) frame for `channel`.
    pub fn confirm(&mut self, unsubscribe: bool, channel: &[u8]) -> Confirm {
        match self.pending.front_mut() {
            Some(p) if p.unsubscribe == unsubscribe => {
                p.left -= 1;
                if p.left == 0 {
                    self.pending.pop_front();
                }
                Confirm::Answer(self.subs.confirm(channel))
            }
            _ if unsubscribe => Confirm::Unsolicited(self.subs.lost(channel)),
            // A confirmation of nothing we sent: ignore it.
            _ => Confirm::Answer(None),
        }
    }

    /// Redis refused the oldest unanswered command: none of its channels is
    /// subscribed here. Returns them.
    pub fn refused(&mut self) -> Vec<Box<[u8]>> {
        let Some(p) = self.pending.pop_front() else { return Vec::new() };
        for c in &p.channels {
            self.subs.refused(c);
        }
        p.channels
    }
}

impl Drop for SubConn {
    fn drop(&mut self) {
        self.set_live(None);
    }
}

/// Reads once into the end of `buf`.
pub fn read_more(sock: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let r = sock.read(&mut buf[start..]);
    buf.truncate(start + *r.as_ref().unwrap_or(&0));
    r
}

pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// When this connection next needs attention without any input: its
/// heartbeat (up) or its next attempt (down).
pub fn deadline(c: &SubConn) -> Instant {
    match (&c.live, &c.attempt) {
        (Some(l), _) => match l.ping_sent {
            Some(at) => at + DEAD_AFTER,
            None => l.last_rx + PING_IDLE,
        },
        (None, Some(a)) => a.deadline,
        (None, None) => c.retry_at,
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use redis_protocol::resp2::decode::decode_bytes_mut;
    use redis_protocol::resp2::types::BytesFrame;

    use super::*;
    use crate::bus::redis::Link;
    use crate::bus::redis::subs::{Interest, Kind};

    /// A `SubConn` whose socket is one end of a loopback pair; returns the other end.
    fn conn() -> (SubConn, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (theirs, _) = l.accept().unwrap();
        let url = super::super::RedisUrl::parse("redis://127.0.0.1:1").unwrap();
        let node = Arc::new(Node { name: "127.0.0.1:1".into(), url, addrs: vec![] });
        let metrics = Arc::new(Metrics::new(1));
        let mut c = SubConn::new(node, 0, "cc:", Retry::new(0, Link::Subscriber), metrics);
        c.set_live(Some(Live { sock: ours, buf: BytesMut::new(), last_rx: Instant::now(), ping_sent: None }));
        (c, theirs)
    }

    fn room(name: &str, seq: u64) -> Interest {
        Interest { kind: Kind::Room, name: name.into(), on: true, seq }
    }

    /// The commands written to `sock` so far, as lists of strings.
    fn commands(sock: &mut TcpStream, n: usize) -> Vec<Vec<String>> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        while out.len() < n {
            read_more(sock, &mut buf).unwrap();
            while let Some((BytesFrame::Array(parts), _, _)) = decode_bytes_mut(&mut buf).unwrap() {
                out.push(parts.iter().map(|p| cluster::text(p).unwrap().to_string()).collect());
            }
        }
        out
    }

    #[test]
    fn a_cluster_plan_sends_one_ssubscribe_per_slot() {
        let (mut c, mut redis) = conn();
        // {a} tags share a slot; "b" is elsewhere.
        for (i, r) in ["{a}1", "b", "{a}2"].iter().enumerate() {
            c.subs.apply(room(r, i as u64));
        }
        assert_eq!(c.write_plan(true).unwrap(), 2);
        let mut cmds = commands(&mut redis, 2);
        cmds.sort();
        assert_eq!(cmds, [vec!["SSUBSCRIBE", "cc:room:b"], vec!["SSUBSCRIBE", "cc:room:{a}1", "cc:room:{a}2"]]);
        // Outside a cluster: one SUBSCRIBE for everything.
        let (mut plain, mut redis) = conn();
        for (i, r) in ["{a}1", "b"].iter().enumerate() {
            plain.subs.apply(room(r, i as u64));
        }
        assert_eq!(plain.write_plan(false).unwrap(), 1);
        assert_eq!(commands(&mut redis, 1)[0][0], "SUBSCRIBE");
    }

    #[test]
    fn an_error_refuses_the_oldest_command_and_an_unasked_sunsubscribe_is_told_apart() {
        let (mut c, mut redis) = conn();
        c.subs.apply(room("x", 1));
        c.write_plan(true).unwrap();
        c.subs.apply(room("y", 2));
        c.write_plan(true).unwrap();
        commands(&mut redis, 2);
        // MOVED for the first command: only "x" is refused.
        assert_eq!(c.refused(), vec![Box::<[u8]>::from(&b"cc:room:x"[..])]);
        match c.confirm(false, b"cc:room:y") {
            Confirm::Answer(Some(s)) => assert_eq!((&*s.room, s.seq), ("y", 2)),
            _ => panic!("y is confirmed"),
        }
        // Nothing of ours is outstanding: Redis dropped "y" by itself.
        assert!(matches!(c.confirm(true, b"cc:room:y"), Confirm::Unsolicited(true)));
        assert!(matches!(c.confirm(true, b"cc:room:zz"), Confirm::Unsolicited(false)));
        // Both are subscribed again once looked at (`touch`, as the reader's rehome does).
        for ch in [&b"cc:room:x"[..], b"cc:room:y"] {
            c.subs.touch(ch);
        }
        assert_eq!(c.write_plan(true).unwrap(), 2);
    }
}
