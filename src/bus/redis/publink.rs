//! ⑦ One publisher connection of a shard, to one primary: an async task on
//! the shard's own monoio runtime (`NodeLink::run`).
//!
//! In: commands queued by the shard's `Publisher` (`queue`), each appended
//! to `out`. Out: those commands, written together once per turn of the
//! event loop (readiness + non-blocking `send(2)`, like the client
//! connections), so a busy shard pipelines as many commands per write as it
//! produced in the turn. Each reply answers the oldest command written: it
//! is counted, handed to the command's reply callback if it has one, and in
//! a cluster a `MOVED`/`ASK` reply sends the command on to the node named
//! (through the `Publisher`, which knows every link).
//!
//! A command is refused (`Unavailable`) when the connection is down, when
//! Redis has left the oldest command unanswered for `STALL_AFTER` (stopped
//! or overloaded), or when the queue is full. After `DEAD_AFTER` without an
//! answer the connection is dropped and re-made with backoff. Commands
//! queued or unanswered when a connection drops are lost (at-most-once),
//! counted in `redis_publish_lost_total`, and their callbacks told.
//! A `READONLY` reply (the server became a replica) drops the connection
//! and asks the topology where the primary went: publishes never go on to
//! a replica.
//!
//! Every connection asks `INFO server` after logging in, before anything is
//! queued on it, and keeps the server's `run_id` (new on every start of a
//! Redis process) while it lasts. A command queued "stamped"
//! (`queue_stamped`) gets that run id appended as its last argument, and a
//! stamped command sent on elsewhere (`requeue`: `MOVED`/`ASK`) has it
//! replaced by the run id of the link that sends it, so a stamped command
//! always names the instance that runs it. The history scripts use it to
//! tell a history written by this very Redis process from one it loaded
//! from an older snapshot or got from a replica (`history::redis`). A server
//! that refuses `INFO` (an ACL without it) gives an empty run id.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use monoio::net::TcpStream;
use redis_protocol::resp2::types::BytesFrame;
use tracing::{debug, info, warn};

use super::cluster::Redirect;
use super::health::Health;
use super::link::{CONNECT_TIMEOUT, DEAD_AFTER, HANDSHAKE_TIMEOUT, Link, LinkError, Retry};
use super::net::{READ_CHUNK, ReplyFn, connect_any, next_frame, try_recv, would_block, write_all};
use super::resp;
use super::topology::{Mode, Node, Topology};
use crate::metrics::{Metrics, ShardMetrics};
use crate::protocol::Unavailable;

/// Oldest command unanswered this long: refuse publishes until Redis answers.
const STALL_AFTER: Duration = Duration::from_secs(1);
/// How often the watch task looks at the oldest unanswered command.
const WATCH_TICK: Duration = Duration::from_millis(100);
/// Queued (not yet written) bytes beyond which publishes are refused.
const MAX_QUEUED_BYTES: usize = 8 << 20;
/// Commands queued or unanswered beyond which publishes are refused.
const MAX_UNANSWERED: usize = 65_536;
/// A command redirected more often than this is given up (lost).
pub const MAX_HOPS: u8 = 5;

/// A command in `out`, not yet written.
struct Queued {
    len: usize,
    hops: u8,
    /// Bytes of the run id bulk at the command's end (0: not stamped).
    stamp: u8,
    on_reply: Option<ReplyFn>,
}

/// A command written, waiting for its reply.
struct InFlight {
    /// The command's bytes, kept in a cluster to be sent on after `MOVED`/`ASK`.
    cmd: Bytes,
    at: Instant,
    hops: u8,
    /// As `Queued::stamp`: what `requeue` replaces.
    stamp: u8,
    on_reply: Option<ReplyFn>,
}

pub struct NodeLink {
    shard: usize,
    pub node: Arc<Node>,
    topo: Arc<Topology>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    owner: Weak<dyn LinkOwner>,
    /// The node is no longer a primary in the view: the task ends.
    retired: Cell<bool>,
    /// Connected and logged in.
    up: Cell<bool>,
    /// Redis has not answered for `STALL_AFTER`.
    stalled: Cell<bool>,
    /// The server's `run_id` on the current connection (set before `up`).
    run_id: RefCell<Bytes>,
    out: RefCell<BytesMut>,
    queued: RefCell<Vec<Queued>>,
    inflight: RefCell<VecDeque<InFlight>>,
    /// Wakes the writer task when `out` becomes non-empty (or on retirement).
    writer: Cell<Option<Waker>>,
    /// Wakes the task's retirement watch.
    retire: Cell<Option<Waker>>,
}

/// What a link tells the publisher that owns it (`Publisher`): a command to
/// send on after a `MOVED`/`ASK`, and that the link's health may have
/// changed. A trait, so that the link, below the publisher, never names it.
pub trait LinkOwner {
    /// `stamp`: as `NodeLink::requeue`.
    fn redirect(&self, r: &Redirect, cmd: Bytes, hops: u8, stamp: u8, on_reply: Option<ReplyFn>);
    fn update_health(&self);
}

impl NodeLink {
    pub fn new(
        shard: usize,
        node: Arc<Node>,
        topo: Arc<Topology>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        owner: Weak<dyn LinkOwner>,
    ) -> Rc<NodeLink> {
        Rc::new(NodeLink {
            shard,
            node,
            topo,
            health,
            metrics,
            owner,
            retired: Cell::new(false),
            up: Cell::new(false),
            stalled: Cell::new(false),
            run_id: RefCell::default(),
            out: RefCell::default(),
            queued: RefCell::default(),
            inflight: RefCell::default(),
            writer: Cell::new(None),
            retire: Cell::new(None),
        })
    }

    fn m(&self) -> &ShardMetrics {
        self.metrics.shard(self.shard)
    }

    /// Up, answering, and still a primary.
    pub fn healthy(&self) -> bool {
        self.up.get() && !self.stalled.get() && !self.retired.get()
    }

    /// The node left the view: stop, losing what is queued.
    pub fn retire(&self) {
        self.retired.set(true);
        if let Some(w) = self.retire.take() {
            w.wake();
        }
        self.drop_queued();
    }

    /// Appends one command (written by `put`), or refuses at once.
    pub fn queue(
        &self,
        put: impl FnOnce(&mut BytesMut),
        hops: u8,
        on_reply: Option<ReplyFn>,
    ) -> Result<(), (Unavailable, Option<ReplyFn>)> {
        self.push(put, false, hops, on_reply)
    }

    /// Like `queue`, with the server's run id appended as the command's last
    /// argument: `put` writes the array header counting it, and every
    /// argument but it.
    pub fn queue_stamped(
        &self,
        put: impl FnOnce(&mut BytesMut),
        hops: u8,
        on_reply: Option<ReplyFn>,
    ) -> Result<(), (Unavailable, Option<ReplyFn>)> {
        self.push(put, true, hops, on_reply)
    }

    /// Sends on `cmd`, a command another link queued (`MOVED`/`ASK`): if it
    /// was stamped (its last `stamp` bytes are that link's run id), the run
    /// id is replaced with this link's.
    pub fn requeue(
        &self,
        cmd: &Bytes,
        stamp: u8,
        hops: u8,
        on_reply: Option<ReplyFn>,
    ) -> Result<(), (Unavailable, Option<ReplyFn>)> {
        let body = &cmd[..cmd.len().saturating_sub(stamp as usize)];
        self.push(|out| out.put_slice(body), stamp > 0, hops, on_reply)
    }

    fn push(
        &self,
        put: impl FnOnce(&mut BytesMut),
        stamped: bool,
        hops: u8,
        on_reply: Option<ReplyFn>,
    ) -> Result<(), (Unavailable, Option<ReplyFn>)> {
        // Refused while down: nothing is queued before the connection's run id is known.
        if !self.healthy() {
            return Err((Unavailable, on_reply));
        }
        {
            let mut out = self.out.borrow_mut();
            let queued = self.queued.borrow().len() + self.inflight.borrow().len();
            if out.len() >= MAX_QUEUED_BYTES || queued >= MAX_UNANSWERED {
                return Err((Unavailable, on_reply));
            }
            let before = out.len();
            put(&mut out);
            let mut stamp = 0;
            if stamped {
                let at = out.len();
                resp::put_bulk(&mut out, &[&self.run_id.borrow()]);
                stamp = (out.len() - at) as u8;
            }
            self.queued.borrow_mut().push(Queued { len: out.len() - before, hops, stamp, on_reply });
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        Ok(())
    }

    /// The task: connect, serve, reconnect with backoff, until retired.
    pub async fn run(self: Rc<Self>) {
        let mut retry = Retry::new(self.shard, Link::Publisher);
        while !self.retired.get() {
            let attempt = monoio::time::timeout(CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT, self.connect()).await;
            match attempt.unwrap_or(Err(LinkError::Timeout("connect + AUTH/SELECT/ROLE"))) {
                Ok((stream, buf)) if !self.retired.get() => {
                    retry.connected(self.m());
                    info!(shard = self.shard, redis = %self.node.name, "redis publisher connected");
                    if self.topo.mode == Mode::Sentinel {
                        // Sentinel: ask again on every (re)connect; `ROLE` was checked meanwhile.
                        self.topo.request_refresh();
                    }
                    self.up.set(true);
                    self.metrics.redis_nodes.link(&self.node.name, true, true);
                    self.set_stalled(false);
                    let e = self.serve(&stream, buf).await;
                    self.up.set(false);
                    self.metrics.redis_nodes.link(&self.node.name, true, false);
                    self.drop_queued();
                    self.changed();
                    if self.retired.get() {
                        return;
                    }
                    self.health.failed(self.shard, Link::Publisher, &self.node.name, &e);
                    retry.failed(&self.node.url, &e);
                    self.topo.request_refresh();
                }
                Ok(_) => return,
                Err(e) => {
                    self.m().redis_connect_failures_total.add_shared(1);
                    self.health.failed(self.shard, Link::Publisher, &self.node.name, &e);
                    retry.failed(&self.node.url, &e);
                    self.topo.request_refresh();
                }
            }
            monoio::time::sleep(retry.next_delay()).await;
        }
    }

    /// Connects to the addresses the topology resolved (no DNS on the shard).
    async fn connect(&self) -> Result<(TcpStream, BytesMut), LinkError> {
        self.handshake(connect_any(&self.node.addrs).await?).await
    }

    async fn handshake(&self, stream: TcpStream) -> Result<(TcpStream, BytesMut), LinkError> {
        let name = format!("corecast-pub-{:02}", self.shard);
        let (mut out, steps) = resp::handshake(&self.node.url, &name, self.topo.mode.check_role());
        // Last: the server's run id, for the commands queued stamped.
        resp::put_command(&mut out, &[b"INFO", b"server"]);
        write_all(&stream, &out).await?;
        let mut buf = BytesMut::new();
        for step in steps {
            resp::check(step, &next_frame(&stream, &mut buf).await?)?;
        }
        let info = next_frame(&stream, &mut buf).await?;
        let run_id = run_id_of(&info);
        if run_id.is_empty() {
            // E.g. an ACL without INFO: the history scripts then ask Redis themselves.
            debug!(shard = self.shard, redis = %self.node.name, reply = ?info, "no run_id from INFO server");
        }
        *self.run_id.borrow_mut() = run_id;
        Ok((stream, buf))
    }

    /// Runs the connection until it fails (or the link is retired); returns why.
    async fn serve(&self, stream: &TcpStream, buf: BytesMut) -> LinkError {
        monoio::select! {
            e = self.write_loop(stream) => e,
            e = self.read_loop(stream, buf) => e,
            e = self.watch() => e,
            _ = crate::rt::until(&self.retire, || self.retired.get()) => LinkError::Closed,
        }
    }

    /// Writes everything queued, one batch per wake-up.
    async fn write_loop(&self, stream: &TcpStream) -> LinkError {
        let keep = self.topo.mode.sharded();
        loop {
            crate::rt::until(&self.writer, || !self.out.borrow().is_empty()).await;
            let batch = self.out.borrow_mut().split().freeze();
            let now = Instant::now();
            {
                let mut inflight = self.inflight.borrow_mut();
                let mut at = 0;
                for q in self.queued.borrow_mut().drain(..) {
                    let cmd = if keep { batch.slice(at..at + q.len) } else { Bytes::new() };
                    at += q.len;
                    inflight.push_back(InFlight { cmd, at: now, hops: q.hops, stamp: q.stamp, on_reply: q.on_reply });
                }
            }
            self.m().redis_publish_writes_total.inc();
            if let Err(e) = write_all(stream, &batch).await {
                return e.into();
            }
        }
    }

    /// Reads replies; each answers the oldest command written.
    async fn read_loop(&self, stream: &TcpStream, mut buf: BytesMut) -> LinkError {
        let fd = stream.as_raw_fd();
        let mut refusals = 0u64;
        loop {
            loop {
                match resp::take_frame(&mut buf) {
                    Ok(Some(reply)) => {
                        if let Err(e) = self.answered(reply, &mut refusals) {
                            return e;
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

    fn answered(&self, reply: BytesFrame, refusals: &mut u64) -> Result<(), LinkError> {
        let Some(cmd) = self.inflight.borrow_mut().pop_front() else { return Ok(()) };
        if let BytesFrame::Error(text) = &reply {
            let text: &str = text;
            if text.starts_with("READONLY") {
                // A replica now: never publish here again; find the primary.
                self.topo.request_refresh();
                if let Some(f) = cmd.on_reply {
                    f(Err(Unavailable));
                }
                self.m().redis_publish_lost_total.add(1);
                return Err(LinkError::Refused { step: "PUBLISH", reply: text.to_string() });
            }
            if let Some(r) = Redirect::parse(text)
                && !cmd.cmd.is_empty()
            {
                self.m().redis_redirects_total.add_shared(1);
                if matches!(r, Redirect::Moved { .. }) {
                    self.topo.request_refresh();
                }
                if let Some(p) = self.owner.upgrade() {
                    p.redirect(&r, cmd.cmd, cmd.hops + 1, cmd.stamp, cmd.on_reply);
                }
                return Ok(());
            }
            // E.g. NOPERM (an ACL without the channel) or CLUSTERDOWN.
            if text.starts_with("CLUSTERDOWN") || text.starts_with("TRYAGAIN") {
                self.topo.request_refresh();
            }
            self.m().redis_publish_refused_total.add(1);
            if refusals.is_power_of_two() || *refusals == 0 {
                warn!(shard = self.shard, redis = %self.node.name, reply = %text, refused_so_far = *refusals + 1, "redis refused a command");
            }
            *refusals += 1;
        }
        if let Some(f) = cmd.on_reply {
            f(Ok(reply));
        }
        Ok(())
    }

    /// Watches how long the oldest command has waited for its answer.
    async fn watch(&self) -> LinkError {
        loop {
            monoio::time::sleep(WATCH_TICK).await;
            let age = self.inflight.borrow().front().map(|b| b.at.elapsed());
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
                redis = %self.node.name,
                "redis publisher: no answer for {STALL_AFTER:?}; refusing publishes until Redis answers"
            );
        }
        self.changed();
    }

    /// Tells the publisher this link's health may have changed.
    fn changed(&self) {
        if let Some(p) = self.owner.upgrade() {
            p.update_health();
        }
    }

    /// The connection is gone and with it whatever it had not delivered.
    fn drop_queued(&self) {
        let queued: Vec<Queued> = self.queued.borrow_mut().drain(..).collect();
        let inflight: Vec<InFlight> = self.inflight.borrow_mut().drain(..).collect();
        self.out.borrow_mut().clear();
        self.stalled.set(false);
        let lost = queued.len() + inflight.len();
        for f in queued.into_iter().filter_map(|q| q.on_reply).chain(inflight.into_iter().filter_map(|c| c.on_reply)) {
            f(Err(Unavailable));
        }
        if lost > 0 {
            self.m().redis_publish_lost_total.add(lost as u64);
            warn!(shard = self.shard, redis = %self.node.name, lost, "publishes lost with the redis connection (delivery is at-most-once)");
        }
    }
}

/// The `run_id` in an `INFO server` reply (40 hex digits), or empty.
fn run_id_of(info: &BytesFrame) -> Bytes {
    let text = match info {
        BytesFrame::BulkString(b) => b,
        _ => return Bytes::new(),
    };
    let Some(at) = text.windows(7).position(|w| w == b"run_id:") else { return Bytes::new() };
    let id = text.slice(at + 7..);
    let end = id.iter().position(|b| !b.is_ascii_hexdigit()).unwrap_or(id.len());
    if end == 0 || end > 64 { Bytes::new() } else { id.slice(..end) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_id_is_read_from_info_server() {
        let info = BytesFrame::BulkString(Bytes::from_static(
            b"# Server\r\nredis_version:7.0.15\r\nprocess_id:9\r\nrun_id:d2b02a6347df24c411c1740cd7c8cbd9187fa6f3\r\ntcp_port:6379\r\n",
        ));
        assert_eq!(&run_id_of(&info)[..], b"d2b02a6347df24c411c1740cd7c8cbd9187fa6f3");
        assert!(run_id_of(&BytesFrame::Error("NOPERM no INFO".into())).is_empty());
        assert!(run_id_of(&BytesFrame::BulkString(Bytes::from_static(b"# Server\r\n"))).is_empty());
    }
}
