//! ⑦ One shard's Redis publisher: an async task on the shard's own monoio
//! runtime that owns the shard's PUBLISH connection.
//!
//! In: `publish` calls from the shard (client `publish`/`send` ops and
//! `POST /api/publish`), each appending one `PUBLISH` command to `out`.
//! Out: those commands, written together once per turn of the event loop
//! (readiness + non-blocking `send(2)`, like the client connections), so a
//! busy shard pipelines as many PUBLISHes per write as it produced in the
//! turn. Redis's replies (subscriber counts) are read and only counted.
//!
//! A publish never waits. It is refused (`Unavailable`, the client gets
//! `error` `unavailable`) when the connection is down, when Redis has left
//! the oldest command unanswered for `STALL_AFTER` (stopped or overloaded),
//! or when the queue is full. After `DEAD_AFTER` without an answer the
//! connection is dropped and re-made with backoff. Commands queued or
//! unanswered when a connection drops are lost (at-most-once) and counted in
//! `redis_publish_lost_total`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use monoio::net::TcpStream;
use tracing::{info, warn};

use super::{CONNECT_TIMEOUT, DEAD_AFTER, HANDSHAKE_TIMEOUT, Health, Link, LinkError, RedisUrl, Retry, resp};
use crate::bus::{Target, Unavailable};
use crate::metrics::{Metrics, ShardMetrics};

/// Oldest command unanswered this long: refuse publishes until Redis answers.
const STALL_AFTER: Duration = Duration::from_secs(1);
/// How often the watch task looks at the oldest unanswered command.
const WATCH_TICK: Duration = Duration::from_millis(100);
/// Queued (not yet written) bytes beyond which publishes are refused.
const MAX_QUEUED_BYTES: usize = 8 << 20;
/// Commands queued or unanswered beyond which publishes are refused.
const MAX_UNANSWERED: usize = 65_536;
/// Bytes read per `recv(2)`.
const READ_CHUNK: usize = 16 * 1024;

/// Commands written in one go, and when.
struct Batch {
    left: u32,
    at: Instant,
}

pub struct Publisher {
    shard: usize,
    url: Arc<RedisUrl>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Connected and logged in.
    up: Cell<bool>,
    /// Redis has not answered for `STALL_AFTER`.
    stalled: Cell<bool>,
    /// PUBLISH commands not yet written.
    out: RefCell<BytesMut>,
    out_cmds: Cell<u32>,
    /// Written batches whose replies have not all come back, oldest first.
    unanswered: RefCell<VecDeque<Batch>>,
    unanswered_cmds: Cell<usize>,
    /// Wakes the writer task when `out` becomes non-empty.
    writer: Cell<Option<Waker>>,
}

impl Publisher {
    pub fn new(shard: usize, url: Arc<RedisUrl>, health: Arc<Health>, metrics: Arc<Metrics>) -> Rc<Publisher> {
        Rc::new(Publisher {
            shard,
            url,
            health,
            metrics,
            up: Cell::new(false),
            stalled: Cell::new(false),
            out: RefCell::default(),
            out_cmds: Cell::new(0),
            unanswered: RefCell::default(),
            unanswered_cmds: Cell::new(0),
            writer: Cell::new(None),
        })
    }

    fn m(&self) -> &ShardMetrics {
        self.metrics.shard(self.shard)
    }

    /// Queues `PUBLISH <prefix><room:R|user:U> json`, or refuses at once.
    pub fn publish(&self, prefix: &str, target: Target<'_>, json: &[u8]) -> Result<(), Unavailable> {
        if !self.up.get() || self.stalled.get() {
            return Err(Unavailable);
        }
        {
            let mut out = self.out.borrow_mut();
            let queued = self.out_cmds.get() as usize + self.unanswered_cmds.get();
            if out.len() >= MAX_QUEUED_BYTES || queued >= MAX_UNANSWERED {
                return Err(Unavailable);
            }
            resp::put_publish(&mut out, prefix, target, json);
        }
        self.out_cmds.set(self.out_cmds.get() + 1);
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        Ok(())
    }

    /// The task: connect, serve, reconnect with backoff, for the shard's life.
    pub async fn run(self: Rc<Self>) {
        let mut retry = Retry::new(self.shard, Link::Publisher);
        loop {
            let attempt = monoio::time::timeout(CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT, self.connect()).await;
            match attempt.unwrap_or(Err(LinkError::Timeout("connect + AUTH/SELECT"))) {
                Ok((stream, buf)) => {
                    retry.connected(self.m());
                    info!(shard = self.shard, redis = %self.url, "redis publisher connected");
                    self.up.set(true);
                    self.set_stalled(false);
                    let e = self.serve(&stream, buf).await;
                    self.up.set(false);
                    self.health.set(self.shard, Link::Publisher, false);
                    self.drop_queued();
                    self.health.failed(self.shard, Link::Publisher, &e);
                    retry.failed(&self.url, &e);
                }
                Err(e) => {
                    self.m().redis_connect_failures_total.add_shared(1);
                    self.health.failed(self.shard, Link::Publisher, &e);
                    retry.failed(&self.url, &e);
                }
            }
            monoio::time::sleep(retry.next_delay()).await;
        }
    }

    /// Connects to the addresses a reader resolved (no DNS on the shard).
    async fn connect(&self) -> Result<(TcpStream, BytesMut), LinkError> {
        let mut last = LinkError::Io(io::Error::new(io::ErrorKind::NotFound, "Redis's address is not resolved yet"));
        for addr in self.health.addrs() {
            match TcpStream::connect_addr(addr).await {
                Ok(stream) => return self.handshake(stream).await,
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }

    async fn handshake(&self, stream: TcpStream) -> Result<(TcpStream, BytesMut), LinkError> {
        stream.set_nodelay(true)?;
        stream.set_tcp_keepalive(Some(Duration::from_secs(5)), Some(Duration::from_secs(1)), Some(3))?;
        let (out, steps) = resp::handshake(&self.url, &format!("corecast-pub-{:02}", self.shard));
        write_all(&stream, &out).await?;
        let mut buf = BytesMut::new();
        for step in steps {
            let reply = loop {
                if let Some(reply) = resp::take_reply(&mut buf)? {
                    break reply;
                }
                stream.readable(false).await?;
                match try_recv(stream.as_raw_fd(), &mut buf) {
                    Ok(0) => return Err(LinkError::Closed),
                    Ok(_) => {}
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(e.into()),
                }
            };
            resp::check(step, reply.as_ref().map(|_| ()).map_err(String::as_str))?;
        }
        Ok((stream, buf))
    }

    /// Runs the connection until it fails; returns why.
    async fn serve(&self, stream: &TcpStream, buf: BytesMut) -> LinkError {
        monoio::select! {
            e = self.write_loop(stream) => e,
            e = self.read_loop(stream, buf) => e,
            e = self.watch() => e,
        }
    }

    /// Writes everything queued, one batch per wake-up.
    async fn write_loop(&self, stream: &TcpStream) -> LinkError {
        let fd = stream.as_raw_fd();
        loop {
            crate::shard::until(&self.writer, || !self.out.borrow().is_empty()).await;
            let mut batch = self.out.borrow_mut().split().freeze();
            let n = self.out_cmds.replace(0);
            self.unanswered.borrow_mut().push_back(Batch { left: n, at: Instant::now() });
            self.unanswered_cmds.set(self.unanswered_cmds.get() + n as usize);
            self.m().redis_publish_writes_total.inc();
            while !batch.is_empty() {
                match try_send(fd, &batch) {
                    Ok(k) => batch.advance(k),
                    Err(e) if would_block(&e) => {
                        if let Err(e) = stream.writable(false).await {
                            return e.into();
                        }
                    }
                    Err(e) => return e.into(),
                }
            }
        }
    }

    /// Reads replies; each answers the oldest unanswered command.
    async fn read_loop(&self, stream: &TcpStream, mut buf: BytesMut) -> LinkError {
        let fd = stream.as_raw_fd();
        let mut refusals = 0u64;
        loop {
            loop {
                match resp::take_reply(&mut buf) {
                    Ok(Some(reply)) => {
                        self.answered();
                        if let Err(text) = reply {
                            // E.g. NOPERM: an ACL that does not allow PUBLISH on the channel.
                            if refusals.is_power_of_two() || refusals == 0 {
                                warn!(shard = self.shard, reply = %text, refused_so_far = refusals + 1, "redis refused a PUBLISH");
                            }
                            refusals += 1;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return e,
                }
            }
            if let Err(e) = stream.readable(false).await {
                return e.into();
            }
            loop {
                match try_recv(fd, &mut buf) {
                    Ok(0) => return LinkError::Closed,
                    Ok(n) if n < READ_CHUNK => break,
                    Ok(_) => {}
                    Err(e) if would_block(&e) => break,
                    Err(e) => return e.into(),
                }
            }
        }
    }

    fn answered(&self) {
        let mut q = self.unanswered.borrow_mut();
        if let Some(front) = q.front_mut() {
            front.left -= 1;
            if front.left == 0 {
                q.pop_front();
            }
            self.unanswered_cmds.set(self.unanswered_cmds.get().saturating_sub(1));
        }
    }

    /// Watches how long the oldest command has waited for its answer.
    async fn watch(&self) -> LinkError {
        loop {
            monoio::time::sleep(WATCH_TICK).await;
            let age = self.unanswered.borrow().front().map(|b| b.at.elapsed());
            match age {
                Some(age) if age >= DEAD_AFTER => return LinkError::Timeout("replies to PUBLISH"),
                Some(age) => self.set_stalled(age >= STALL_AFTER),
                None => self.set_stalled(false),
            }
        }
    }

    fn set_stalled(&self, stalled: bool) {
        if self.stalled.replace(stalled) != stalled && stalled {
            warn!(
                shard = self.shard,
                "redis publisher: no answer for {STALL_AFTER:?}; refusing publishes until Redis answers"
            );
        }
        self.health.set(self.shard, Link::Publisher, self.up.get() && !stalled);
    }

    /// The connection is gone and with it whatever it had not delivered.
    fn drop_queued(&self) {
        let lost = self.out_cmds.replace(0) as usize + self.unanswered_cmds.replace(0);
        self.out.borrow_mut().clear();
        self.unanswered.borrow_mut().clear();
        self.stalled.set(false);
        if lost > 0 {
            self.m().redis_publish_lost_total.add(lost as u64);
            warn!(shard = self.shard, lost, "publishes lost with the redis connection (delivery is at-most-once)");
        }
    }
}

// ---- non-blocking I/O on the shard's runtime ------------------------------------

pub(super) fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

pub(super) fn try_send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: plain syscall on a descriptor the stream owns, reading from a
    // slice we borrow for the call.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Reads once into the end of `buf`.
pub(super) fn try_recv(fd: RawFd, buf: &mut BytesMut) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    // SAFETY: plain syscall on a descriptor the stream owns, writing into
    // initialised memory we borrow exclusively for the call.
    let n = unsafe { libc::recv(fd, buf[start..].as_mut_ptr().cast(), READ_CHUNK, libc::MSG_DONTWAIT) };
    let r = if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) };
    buf.truncate(start + *r.as_ref().unwrap_or(&0));
    r
}

pub(super) async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match try_send(stream.as_raw_fd(), data) {
            Ok(n) => data = &data[n..],
            Err(e) if would_block(&e) => stream.writable(false).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
