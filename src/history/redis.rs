//! ⑦ Room history in Redis (PROTOCOL.md §7): one shard's history link, an
//! async task on the shard's own monoio runtime, like the publisher. On one
//! plain server it has a connection of its own (below); on every other
//! topology (Sentinel, Cluster, several servers) it sends the same scripts
//! to the primary owning the room channel's slot over the publisher's links
//! instead (`redis_route.rs`, which says why that keeps each room's order).
//!
//! The history of room R lives in Redis, shared by every node:
//!
//! - `{<prefix>room:R}:meta` — a hash: `epoch`, `offset` (the latest).
//! - `{<prefix>room:R}:log` — a stream of the last N messages, entry id
//!   `<offset>-0`, field `m` = the complete message JSON; so
//!   `XRANGE key <N+1> + COUNT k` reads by offset.
//!
//! Both keys carry the hash tag `{<prefix>room:R}`: they hash to the slot of
//! the room's channel `<prefix>room:R`, so the same scripts run on Redis
//! Cluster. Both expire `--history-ttl-secs` after the room's last publish.
//!
//! Two Lua scripts (`scripts/publish.lua`, `scripts/read.lua`), loaded with
//! SCRIPT LOAD when the connection is made and called with EVALSHA. A
//! publish is ONE atomic step in Redis: assign the offset (HINCRBY), XADD,
//! trim to N, refresh the TTLs, PUBLISH the message with its position. When
//! `meta` is missing (a new room, an expired or deleted key, a Redis that
//! restarted without persistence) the script makes a new epoch (the node's
//! random candidate + Redis's TIME) and starts again at offset 1: a position
//! held from before can never be taken for one of the new history.
//!
//! In: `publish` and `read` from the shard (`history::recover`). Out: EVALSHA
//! commands, pipelined: everything queued in one turn of the event loop goes
//! out in one `send(2)`. Replies come back in order and fill the slot of the
//! command they answer. A NOSCRIPT reply (someone ran SCRIPT FLUSH) queues
//! SCRIPT LOAD and the command again, once. Commands unanswered when the
//! connection drops fail (`Unavailable`); lost publishes are counted.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use monoio::net::TcpStream;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tracing::{info, warn};

use super::redis_route::{OwnerRoute, PUBLISH_LUA, READ_LUA, Script};
use super::types::{Entry, Query, ReadResult, offset_of_id};
use crate::bus::redis::RedisBus;
use crate::bus::redis::link::{CONNECT_TIMEOUT, DEAD_AFTER, HANDSHAKE_TIMEOUT, Link, LinkError, Retry};
use crate::bus::redis::net::{READ_CHUNK, connect_any, next_frame, try_recv, try_send, would_block, write_all};
use crate::bus::redis::topology::{Mode, Topology};
use crate::bus::redis::{RedisUrl, resp};
use crate::config::HistorySettings;
use crate::metrics::{Metrics, ShardMetrics};
use crate::protocol::event::{self, MessagePrefix};
use crate::protocol::{Epoch, Position, Unavailable};
use crate::rt::Oneshot;

/// Queued (not yet written) bytes beyond which publishes and reads are refused.
const MAX_QUEUED_BYTES: usize = 8 << 20;
/// Commands unanswered beyond which publishes and reads are refused.
const MAX_PENDING: usize = 65_536;
/// Oldest command unanswered this long: refuse new ones until Redis answers
/// (as the publisher does), so that a Redis slower than the publishers
/// sheds load with `unavailable` instead of queueing seconds of latency.
const STALL_AFTER: Duration = Duration::from_secs(1);
/// How often the watch task looks at the oldest unanswered command.
const WATCH_TICK: Duration = Duration::from_millis(100);

/// Which shards' history connections are up, for `/readyz`.
pub struct Shared {
    pub settings: HistorySettings,
    up: Box<[AtomicBool]>,
}

impl Shared {
    pub fn new(settings: HistorySettings, shards: usize) -> Arc<Shared> {
        Arc::new(Shared { settings, up: (0..shards).map(|_| AtomicBool::new(false)).collect() })
    }

    /// The first shard whose history connection is down, if any.
    pub fn down(&self) -> Option<usize> {
        self.up.iter().position(|u| !u.load(Ordering::Relaxed))
    }
}

/// What a reply answers.
enum Pending {
    /// A SCRIPT LOAD (after NOSCRIPT).
    Load,
    Publish {
        cmd: Bytes,
        retried: bool,
        want: Option<Oneshot<Result<Position, Unavailable>>>,
        at: Instant,
    },
    Read {
        cmd: Bytes,
        retried: bool,
        q: Query,
        slot: Oneshot<Result<ReadResult, Unavailable>>,
        at: Instant,
    },
}

impl Pending {
    fn at(&self) -> Option<Instant> {
        match self {
            Pending::Load => None,
            Pending::Publish { at, .. } | Pending::Read { at, .. } => Some(*at),
        }
    }
    fn fail(self, m: &ShardMetrics) {
        match self {
            Pending::Load => {}
            Pending::Publish { want, .. } => {
                m.history_publish_lost_total.inc();
                if let Some(s) = want {
                    s.fill(Err(Unavailable));
                }
            }
            Pending::Read { slot, .. } => slot.fill(Err(Unavailable)),
        }
    }
}

pub struct HistLink {
    shard: usize,
    /// Where Redis is: the history lives on the (one) primary of the view.
    topo: Arc<Topology>,
    /// The primary last connected to (for logs).
    url: RefCell<RedisUrl>,
    metrics: Arc<Metrics>,
    prefix: Arc<str>,
    shared: Arc<Shared>,
    up: Cell<bool>,
    /// Redis has left a command unanswered for `STALL_AFTER`.
    stalled: Cell<bool>,
    /// The node's epoch candidate, new for every connection.
    candidate: Cell<Epoch>,
    /// SHA1s of publish.lua and read.lua, as SCRIPT LOAD answered.
    sha_publish: RefCell<String>,
    sha_read: RefCell<String>,
    /// Commands not yet written.
    out: RefCell<BytesMut>,
    /// Every command queued or written and not yet answered, in order.
    pending: RefCell<VecDeque<Pending>>,
    writer: Cell<Option<Waker>>,
    /// `--history-size` and `--history-ttl-secs` as script arguments.
    size_arg: String,
    ttl_arg: String,
    /// Every topology but one plain server: the scripts go to the owner of
    /// the room channel's slot over the publisher's links
    /// (`redis_route.rs`), not over a connection of this link's own.
    route: Option<Rc<OwnerRoute>>,
}

/// Starts the shard's history link on the Redis bus: its own connection on
/// one plain server; with Sentinel, Cluster or several servers, each room's
/// channel owner over the publisher's links (`redis_route`).
pub fn start(bus: &RedisBus, shared: Arc<Shared>) -> Rc<HistLink> {
    let route = (bus.topo().mode != Mode::Single).then(|| OwnerRoute::new(bus.publisher().clone()));
    let h = HistLink::new(bus.shard(), bus.topo().clone(), bus.metrics().clone(), bus.prefix().clone(), shared, route);
    monoio::spawn(h.clone().run());
    h
}

impl HistLink {
    /// The first shard of the node whose history link is down, if any.
    pub fn node_down(&self) -> Option<usize> {
        self.shared.down()
    }

    pub fn new(
        shard: usize,
        topo: Arc<Topology>,
        metrics: Arc<Metrics>,
        prefix: Arc<str>,
        shared: Arc<Shared>,
        route: Option<Rc<OwnerRoute>>,
    ) -> Rc<HistLink> {
        // For the logs of the own connection (one plain server: its one node).
        let url = RefCell::new(match topo.view().nodes.first() {
            Some(n) => n.url.clone(),
            None => RedisUrl { host: String::new(), port: 0, user: None, password: None, db: 0 },
        });
        Rc::new(HistLink {
            shard,
            topo,
            url,
            metrics,
            prefix,
            up: Cell::new(false),
            stalled: Cell::new(false),
            candidate: Cell::new(Epoch::random()),
            sha_publish: RefCell::default(),
            sha_read: RefCell::default(),
            out: RefCell::default(),
            pending: RefCell::default(),
            writer: Cell::new(None),
            size_arg: shared.settings.size.to_string(),
            ttl_arg: shared.settings.ttl.as_secs().to_string(),
            shared,
            route,
        })
    }

    fn m(&self) -> &ShardMetrics {
        self.metrics.shard(self.shard)
    }

    fn settings(&self) -> HistorySettings {
        self.shared.settings
    }

    fn can_take(&self) -> bool {
        self.up.get()
            && !self.stalled.get()
            && self.out.borrow().len() < MAX_QUEUED_BYTES
            && self.pending.borrow().len() < MAX_PENDING
    }

    fn keys(&self, room: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let p = &*self.prefix;
        (
            format!("{{{p}room:{room}}}:meta").into_bytes(),
            format!("{{{p}room:{room}}}:log").into_bytes(),
            format!("{p}room:{room}").into_bytes(),
        )
    }

    /// Queues the atomic publish of `msg` in `room`; never waits.
    pub fn publish(
        &self,
        room: &str,
        msg: MessagePrefix,
        want: Option<Oneshot<Result<Position, Unavailable>>>,
    ) -> Result<(), Unavailable> {
        if let Some(route) = &self.route {
            return self.publish_at_owner(route, room, msg, want);
        }
        if !self.can_take() {
            return Err(Unavailable);
        }
        let (meta, log, chan) = self.keys(room);
        let (size, ttl) = (&self.size_arg, &self.ttl_arg);
        let sha = self.sha_publish.borrow();
        let cand = self.candidate.get();
        let cmd = command(&[
            b"EVALSHA",
            sha.as_bytes(),
            b"3",
            &meta,
            &log,
            &chan,
            msg.json(),
            cand.as_str().as_bytes(),
            size.as_bytes(),
            ttl.as_bytes(),
            b"PUBLISH",
        ]);
        drop(sha);
        self.queue(cmd.clone(), Pending::Publish { cmd, retried: false, want, at: Instant::now() });
        Ok(())
    }

    /// `publish` at the owner of the room's channel (`redis_route.rs`):
    /// `SPUBLISH` in a cluster, where the readers `SSUBSCRIBE`.
    fn publish_at_owner(
        &self,
        route: &Rc<OwnerRoute>,
        room: &str,
        msg: MessagePrefix,
        want: Option<Oneshot<Result<Position, Unavailable>>>,
    ) -> Result<(), Unavailable> {
        let (meta, log, chan) = self.keys(room);
        let verb: &[u8] = if self.topo.mode.sharded() { b"SPUBLISH" } else { b"PUBLISH" };
        let cand = self.candidate.get();
        let (metrics, shard) = (self.metrics.clone(), self.shard);
        let done = Box::new(move |r: Result<BytesFrame, crate::protocol::Unavailable>| {
            let pos = match r {
                Ok(f) => {
                    let pos = parse_position(&f);
                    if pos.is_none() && !matches!(f, BytesFrame::Error(_)) {
                        warn!(shard, "unexpected reply to the history publish script");
                    }
                    pos
                }
                Err(crate::protocol::Unavailable) => {
                    metrics.shard(shard).history_publish_lost_total.inc();
                    None
                }
            };
            if let Some(s) = want {
                s.fill(pos.ok_or(Unavailable));
            }
        });
        let args: [&[u8]; 9] = [
            b"3",
            &meta,
            &log,
            &chan,
            msg.json(),
            cand.as_str().as_bytes(),
            self.size_arg.as_bytes(),
            self.ttl_arg.as_bytes(),
            verb,
        ];
        route.run(Bytes::copy_from_slice(&chan), Script::Publish, &args, done).map_err(|_| Unavailable)
    }

    /// Reads `room`'s history.
    pub async fn read(&self, room: &str, q: Query) -> Result<ReadResult, Unavailable> {
        if self.route.is_none() && !self.can_take() {
            return Err(Unavailable);
        }
        let s = self.settings();
        let (meta, log, chan) = self.keys(room);
        let ttl = &self.ttl_arg;
        let (epoch, after) = match &q.after {
            Some(p) => (p.epoch.as_str().as_bytes().to_vec(), p.offset.to_string()),
            None => (Vec::new(), "0".to_string()),
        };
        let limit = q.limit.min(s.size).to_string();
        let cand = self.candidate.get();
        // KEYS and ARGV of read.lua, the same on either route.
        let args: [&[u8]; 10] = [
            b"2",
            &meta,
            &log,
            cand.as_str().as_bytes(),
            ttl.as_bytes(),
            &epoch,
            after.as_bytes(),
            limit.as_bytes(),
            if q.listing { b"1" } else { b"0" },
            if q.fence { b"1" } else { b"0" },
        ];
        if let Some(route) = &self.route {
            let slot = Oneshot::default();
            let fill = slot.clone();
            let done = Box::new(move |r: Result<BytesFrame, crate::protocol::Unavailable>| {
                fill.fill(r.ok().and_then(|f| parse_read(&f, q)).ok_or(Unavailable));
            });
            route.run(Bytes::from(chan), Script::Read, &args, done).map_err(|_| Unavailable)?;
            return slot.wait().await;
        }
        let sha = self.sha_read.borrow().clone();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 + args.len());
        parts.extend_from_slice(&[b"EVALSHA", sha.as_bytes()]);
        parts.extend_from_slice(&args);
        let cmd = command(&parts);
        let slot = Oneshot::default();
        self.queue(cmd.clone(), Pending::Read { cmd, retried: false, q, slot: slot.clone(), at: Instant::now() });
        slot.wait().await
    }

    fn queue(&self, cmd: Bytes, p: Pending) {
        self.out.borrow_mut().extend_from_slice(&cmd);
        self.pending.borrow_mut().push_back(p);
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    /// The task: connect, serve, reconnect with backoff, for the shard's life.
    pub async fn run(self: Rc<Self>) {
        if self.route.is_some() {
            // No connection of its own: the publisher's links carry the
            // scripts, and their health is the publisher's (`/readyz`).
            self.set_up(true);
            return;
        }
        let mut retry = Retry::new(self.shard, Link::History);
        loop {
            let attempt = monoio::time::timeout(CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT, self.connect()).await;
            match attempt.unwrap_or(Err(LinkError::Timeout("connect + AUTH/SELECT + SCRIPT LOAD"))) {
                Ok((stream, buf)) => {
                    retry.connected(self.m());
                    info!(shard = self.shard, redis = %self.url.borrow(), "redis history connection up");
                    self.candidate.set(Epoch::random());
                    self.set_up(true);
                    let e = self.serve(&stream, buf).await;
                    self.set_up(false);
                    self.fail_all();
                    retry.failed(&self.url.borrow(), &e);
                }
                Err(e) => {
                    self.m().redis_connect_failures_total.add_shared(1);
                    retry.failed(&self.url.borrow(), &e);
                }
            }
            monoio::time::sleep(retry.next_delay()).await;
        }
    }

    fn set_up(&self, up: bool) {
        if self.up.replace(up) != up {
            let g = &self.m().redis_history_connected;
            if up { g.inc() } else { g.sub(1) }
        }
        self.stalled.set(false);
        self.shared.up[self.shard].store(up, Ordering::Relaxed);
    }

    async fn connect(&self) -> Result<(TcpStream, BytesMut), LinkError> {
        // The one server (routed topologies use the publisher's links).
        let view = self.topo.view();
        let Some(node) = view.nodes.first() else {
            return Err(LinkError::Io(io::Error::new(io::ErrorKind::NotFound, "no Redis server in the view")));
        };
        *self.url.borrow_mut() = node.url.clone();
        self.handshake(connect_any(&node.addrs).await?).await
    }

    /// AUTH/SELECT/SETNAME, then SCRIPT LOAD of both scripts, pipelined.
    async fn handshake(&self, stream: TcpStream) -> Result<(TcpStream, BytesMut), LinkError> {
        let name = format!("corecast-hist-{:02}", self.shard);
        let (mut out, steps) = resp::handshake(&self.url.borrow(), &name, self.topo.mode.check_role());
        out.extend_from_slice(&command(&[b"SCRIPT", b"LOAD", PUBLISH_LUA.as_bytes()]));
        out.extend_from_slice(&command(&[b"SCRIPT", b"LOAD", READ_LUA.as_bytes()]));
        write_all(&stream, &out).await?;
        let mut buf = BytesMut::new();
        for step in steps {
            let reply = next_frame(&stream, &mut buf).await?;
            resp::check(step, &reply)?;
        }
        for sha in [&self.sha_publish, &self.sha_read] {
            match next_frame(&stream, &mut buf).await? {
                BytesFrame::BulkString(s) => *sha.borrow_mut() = String::from_utf8_lossy(&s).into_owned(),
                BytesFrame::Error(e) => {
                    return Err(LinkError::Refused { step: "SCRIPT LOAD", reply: e.to_string() });
                }
                _ => return Err(LinkError::Protocol),
            }
        }
        Ok((stream, buf))
    }

    async fn serve(&self, stream: &TcpStream, buf: BytesMut) -> LinkError {
        monoio::select! {
            e = self.write_loop(stream) => e,
            e = self.read_loop(stream, buf) => e,
            e = self.watch() => e,
        }
    }

    async fn write_loop(&self, stream: &TcpStream) -> LinkError {
        let fd = stream.as_raw_fd();
        loop {
            crate::rt::until(&self.writer, || !self.out.borrow().is_empty()).await;
            let mut batch = self.out.borrow_mut().split().freeze();
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

    async fn read_loop(&self, stream: &TcpStream, mut buf: BytesMut) -> LinkError {
        let fd = stream.as_raw_fd();
        loop {
            loop {
                match decode_bytes_mut(&mut buf) {
                    Ok(Some((frame, _, _))) => self.answer(frame),
                    Ok(None) => break,
                    Err(_) => return LinkError::Protocol,
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

    /// One reply: it answers the oldest pending command.
    fn answer(&self, frame: BytesFrame) {
        let Some(p) = self.pending.borrow_mut().pop_front() else { return };
        if let BytesFrame::Error(e) = &frame {
            let noscript = e.starts_with("NOSCRIPT");
            match p {
                Pending::Publish { cmd, retried: false, want, at } if noscript => {
                    self.reload();
                    self.queue(cmd.clone(), Pending::Publish { cmd, retried: true, want, at });
                }
                Pending::Read { cmd, retried: false, q, slot, at } if noscript => {
                    self.reload();
                    self.queue(cmd.clone(), Pending::Read { cmd, retried: true, q, slot, at });
                }
                p => {
                    warn!(shard = self.shard, reply = %e, "redis refused a history command");
                    p.fail(self.m());
                }
            }
            return;
        }
        match p {
            Pending::Load => {}
            Pending::Publish { want, .. } => {
                let pos = parse_position(&frame);
                if pos.is_none() {
                    warn!(shard = self.shard, "unexpected reply to the history publish script");
                }
                if let Some(s) = want {
                    s.fill(pos.ok_or(Unavailable));
                }
            }
            Pending::Read { q, slot, .. } => slot.fill(parse_read(&frame, q).ok_or(Unavailable)),
        }
    }

    /// NOSCRIPT: load both scripts again before the retried command.
    fn reload(&self) {
        for script in [PUBLISH_LUA, READ_LUA] {
            self.out.borrow_mut().extend_from_slice(&command(&[b"SCRIPT", b"LOAD", script.as_bytes()]));
            self.pending.borrow_mut().push_back(Pending::Load);
        }
    }

    async fn watch(&self) -> LinkError {
        loop {
            monoio::time::sleep(WATCH_TICK).await;
            let age = self.pending.borrow().iter().find_map(Pending::at).map(|at| at.elapsed());
            if age.is_some_and(|a| a >= DEAD_AFTER) {
                return LinkError::Timeout("replies to history scripts");
            }
            let stalled = age.is_some_and(|a| a >= STALL_AFTER);
            if self.stalled.replace(stalled) != stalled && stalled {
                warn!(shard = self.shard, "redis history: no answer for {STALL_AFTER:?}; refusing until Redis answers");
            }
        }
    }

    fn fail_all(&self) {
        self.out.borrow_mut().clear();
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        let lost = pending.iter().filter(|p| matches!(p, Pending::Publish { .. })).count();
        for p in pending {
            p.fail(self.m());
        }
        if lost > 0 {
            warn!(shard = self.shard, lost, "history publishes lost with the redis connection");
        }
    }
}

/// A RESP2 command: an array of bulk strings.
fn command(args: &[&[u8]]) -> Bytes {
    use std::fmt::Write;
    let mut b = BytesMut::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    // Writing into a BytesMut cannot fail.
    let _ = write!(b, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(b, "${}\r\n", a.len());
        b.put_slice(a);
        b.put_slice(b"\r\n");
    }
    b.freeze()
}

fn epoch_of(f: &BytesFrame) -> Option<Epoch> {
    match f {
        BytesFrame::BulkString(s) => Epoch::new(std::str::from_utf8(s).ok()?),
        _ => None,
    }
}

fn offset_of(f: &BytesFrame) -> Option<u64> {
    match f {
        BytesFrame::Integer(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// `{epoch, offset}` from publish.lua.
fn parse_position(f: &BytesFrame) -> Option<Position> {
    match f {
        BytesFrame::Array(a) if a.len() == 2 => Some(Position { epoch: epoch_of(&a[0])?, offset: offset_of(&a[1])? }),
        _ => None,
    }
}

/// `{epoch, T, id, msg, ...}` from read.lua.
fn parse_read(f: &BytesFrame, q: Query) -> Option<ReadResult> {
    let BytesFrame::Array(a) = f else { return None };
    let pos = Position { epoch: epoch_of(a.first()?)?, offset: offset_of(a.get(1)?)? };
    let mut entries = Vec::with_capacity(a.len().saturating_sub(2) / 2);
    for pair in a[2..].chunks(2) {
        let [BytesFrame::BulkString(id), BytesFrame::BulkString(msg)] = pair else { return None };
        entries.push(Entry { offset: offset_of_id(id)?, frame: event::frame_json(msg) });
    }
    Some(ReadResult::judge(pos, q, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_of_the_scripts_parse_into_positions_and_entries() {
        let bulk = |s: &str| BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()));
        let p = parse_position(&BytesFrame::Array(vec![bulk("e1"), BytesFrame::Integer(7)])).unwrap();
        assert_eq!((p.epoch.as_str(), p.offset), ("e1", 7));
        assert!(parse_position(&BytesFrame::Array(vec![bulk("e1"), BytesFrame::Integer(-1)])).is_none());
        let e1 = Epoch::new("e1").unwrap();
        let q = Query::recover(Some(Position { epoch: e1, offset: 5 }), 10);
        let reply = BytesFrame::Array(vec![
            bulk("e1"),
            BytesFrame::Integer(7),
            bulk("6-0"),
            bulk("{}"),
            bulk("7-0"),
            bulk("[]"),
        ]);
        let r = parse_read(&reply, q).unwrap();
        assert!(r.covered);
        assert_eq!(r.entries.iter().map(|e| e.offset).collect::<Vec<_>>(), [6, 7]);
        assert_eq!(&event::json_of(&r.entries[1].frame)[..], b"[]");
        assert!(parse_read(&BytesFrame::Array(vec![bulk("e1")]), q).is_none());
    }

    #[test]
    fn commands_are_resp_arrays_of_bulk_strings() {
        assert_eq!(
            &command(&[b"SCRIPT", b"LOAD", b"return 1"])[..],
            b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$8\r\nreturn 1\r\n"
        );
    }
}
