//! ⑦ The `redis-NN` thread: one per shard, pinned beside it, owning that
//! shard's Redis SUBSCRIBE connection (blocking `std::net::TcpStream`; the
//! thread has nothing else to do).
//!
//! In: `Interest` changes from the shard (a crossbeam channel, plus a
//! self-pipe that wakes the thread's `poll(2)`), and pushed RESP2 frames from
//! Redis, decoded zero-copy with `decode_bytes_mut`. Out: SUBSCRIBE /
//! UNSUBSCRIBE commands (each batch of changes coalesced into one command by
//! `subs.rs`), and, into the shard's inbox, `ShardMsg::Room` / `Direct` (a
//! complete client frame built once from the checked payload),
//! `ShardMsg::Subscribed` (Redis confirmed a room) and `ShardMsg::RedisLink`.
//!
//! A payload is forwarded only if it is the JSON text of the event the
//! channel carries (`message` with the channel's room, or `direct`); anything
//! else is dropped, counted in `bus_dropped_total` and logged at warn (at
//! most once a second). The thread never lets its shard's inbox grow without
//! bound: above `INBOX_HIGH_WATER` it stops reading until the shard has
//! caught up, and Redis buffers meanwhile (Redis cuts off a subscriber whose
//! buffer passes `client-output-buffer-limit pubsub`; we then reconnect).
//!
//! On any failure the connection is dropped, the shard is told
//! (`RedisLink { up: false }`), and the thread reconnects with backoff and
//! subscribes again to everything its shard still needs.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use simd_json::prelude::*;
use tracing::{debug, info, warn};

use super::subs::{Interest, Kind, Subscriptions};
use super::{DEAD_AFTER, HANDSHAKE_TIMEOUT, Health, Link, LinkError, PING_IDLE, RedisUrl, Retry, resp};
use crate::metrics::{Metrics, ShardMetrics};
use crate::protocol::event;
use crate::shard::{InboxSender, ShardMsg};

/// Bytes read from Redis per `read(2)`.
const READ_CHUNK: usize = 32 * 1024;
/// Above this many messages waiting in the shard's inbox the reader stops
/// reading from Redis ...
const INBOX_HIGH_WATER: usize = 8192;
/// ... until it is back down to this.
const INBOX_LOW_WATER: usize = 1024;
/// How long the reader naps while its shard catches up.
const BACKPRESSURE_NAP: Duration = Duration::from_micros(200);
/// Channels per SUBSCRIBE/UNSUBSCRIBE command; a larger batch is split.
const MAX_CHANNELS_PER_COMMAND: usize = 4096;
/// TCP keepalive: probe after this much silence, so that a vanished host is
/// noticed even when both sides are idle.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);

/// The shard's end: batches of `Interest` changes to its reader. `Send`,
/// moved into the shard thread; dropping it (the shard stopped) stops the
/// reader.
pub struct SubHandle {
    tx: Sender<Vec<Interest>>,
    /// The write end of the wake-up pipe; closing it wakes the reader too.
    pipe: UnixStream,
    /// Set while a wake-up byte is unread: a burst of changes writes one byte.
    pending: Arc<AtomicBool>,
}

impl SubHandle {
    /// Hands over the changes of one turn of the shard's event loop.
    pub fn send(&self, batch: Vec<Interest>) {
        if self.tx.send(batch).is_err() {
            return; // The reader has stopped (shutdown).
        }
        if !self.pending.swap(true, Ordering::SeqCst) {
            // A full pipe already holds a wake-up byte; nothing else can fail here.
            let _ = (&self.pipe).write(&[1]);
        }
    }
}

/// The reader's end of the same.
pub struct ReaderInput {
    rx: Receiver<Vec<Interest>>,
    pipe: UnixStream,
    pending: Arc<AtomicBool>,
}

impl ReaderInput {
    /// Hands every waiting `Interest` to `f`. Fails once the shard has
    /// stopped (its `SubHandle` is gone).
    fn take(&self, mut f: impl FnMut(Interest)) -> Result<(), Shutdown> {
        // The order matters. Empty the pipe, *then* clear `pending`, *then*
        // empty the channel: a send whose swap saw `pending` still set is
        // picked up by the channel drain below; one that saw it clear wrote
        // a byte that is still in the pipe and wakes the next `poll`.
        // (Clearing before emptying the pipe could swallow that byte and
        // leave `pending` set with nothing to wake us: changes stuck.)
        let mut sink = [0u8; 64];
        while let Ok(n) = (&self.pipe).read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        self.pending.store(false, Ordering::SeqCst);
        loop {
            match self.rx.try_recv() {
                Ok(batch) => batch.into_iter().for_each(&mut f),
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => return Err(Shutdown),
            }
        }
    }
}

/// Makes a connected `SubHandle` / `ReaderInput` pair.
pub fn channel() -> io::Result<(SubHandle, ReaderInput)> {
    let (w, r) = UnixStream::pair()?;
    w.set_nonblocking(true)?;
    r.set_nonblocking(true)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let pending = Arc::new(AtomicBool::new(false));
    Ok((SubHandle { tx, pipe: w, pending: pending.clone() }, ReaderInput { rx, pipe: r, pending }))
}

/// Everything `start` hands a reader.
pub struct ReaderParts {
    pub shard: usize,
    pub core: usize,
    pub url: Arc<RedisUrl>,
    pub prefix: Arc<str>,
    pub inbox: InboxSender,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub input: ReaderInput,
    /// Larger payloads are dropped: they would cut off every receiver
    /// (`--outbound-queue-bytes`).
    pub max_payload: usize,
}

pub struct Reader {
    shard: usize,
    core: usize,
    url: Arc<RedisUrl>,
    inbox: InboxSender,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    input: ReaderInput,
    subs: Subscriptions,
    json: JsonCheck,
    max_payload: usize,
    drops: DropLog,
}

/// How serving one connection ended.
enum End {
    /// The shard stopped: the thread ends.
    Shutdown,
    /// The connection failed: reconnect.
    Lost(LinkError),
}

impl From<LinkError> for End {
    fn from(e: LinkError) -> End {
        End::Lost(e)
    }
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> End {
        End::Lost(e.into())
    }
}

/// The shard's `SubHandle` is gone.
struct Shutdown;

impl Reader {
    pub fn new(p: ReaderParts) -> Reader {
        Reader {
            shard: p.shard,
            core: p.core,
            url: p.url,
            inbox: p.inbox,
            metrics: p.metrics,
            health: p.health,
            input: p.input,
            subs: Subscriptions::new(&p.prefix),
            json: JsonCheck::default(),
            max_payload: p.max_payload,
            drops: DropLog::default(),
        }
    }

    fn m(&self) -> &ShardMetrics {
        self.metrics.shard(self.shard)
    }

    /// The thread's body: connect, serve, reconnect, until the shard stops.
    pub fn run(mut self) {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: self.core }) {
            warn!(shard = self.shard, core = self.core, "redis reader: could not pin to core");
        }
        let mut retry = Retry::new(self.shard, Link::Subscriber);
        loop {
            match self.connect() {
                Ok((sock, buf)) => {
                    retry.connected(self.m());
                    info!(shard = self.shard, redis = %self.url, "redis subscriber connected");
                    let end = self.serve(sock, buf);
                    self.set_link(false);
                    self.subs.reset();
                    match end {
                        End::Shutdown => return,
                        End::Lost(e) => {
                            self.health.failed(self.shard, Link::Subscriber, &e);
                            retry.failed(&self.url, &e);
                        }
                    }
                }
                Err(e) => {
                    self.m().redis_connect_failures_total.add_shared(1);
                    self.health.failed(self.shard, Link::Subscriber, &e);
                    retry.failed(&self.url, &e);
                }
            }
            if self.pause(retry.next_delay()).is_err() {
                return;
            }
        }
    }

    // ---- connecting ----------------------------------------------------------

    fn connect(&mut self) -> Result<(TcpStream, BytesMut), LinkError> {
        let addrs: Vec<SocketAddr> = self.url.addr().to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(LinkError::Io(io::Error::new(io::ErrorKind::NotFound, "the Redis host has no address")));
        }
        self.health.set_addrs(&addrs);
        let mut last = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, super::CONNECT_TIMEOUT) {
                Ok(sock) => return self.handshake(sock),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or(LinkError::Closed, LinkError::from))
    }

    /// AUTH, SELECT, CLIENT SETNAME, pipelined; returns the socket and any
    /// bytes read past the last reply.
    fn handshake(&self, mut sock: TcpStream) -> Result<(TcpStream, BytesMut), LinkError> {
        sock.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(Duration::from_secs(1))
            .with_retries(3);
        socket2::SockRef::from(&sock).set_tcp_keepalive(&keepalive)?;
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        sock.set_write_timeout(Some(DEAD_AFTER))?;
        let (out, steps) = resp::handshake(&self.url, &format!("corecast-sub-{:02}", self.shard));
        sock.write_all(&out)?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        for step in steps {
            let reply = loop {
                if let Some(reply) = resp::take_reply(&mut buf)? {
                    break reply;
                }
                match read_more(&mut sock, &mut buf) {
                    Ok(0) => return Err(LinkError::Closed),
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) => return Err(LinkError::Timeout("AUTH/SELECT")),
                    Err(e) => return Err(e.into()),
                }
            };
            resp::check(step, reply.as_ref().map(|_| ()).map_err(String::as_str))?;
        }
        Ok((sock, buf))
    }

    /// Tells the shard first, then `/readyz`: a node reports ready only once
    /// its shards are told (and so hold `subscribed` replies).
    fn set_link(&self, up: bool) {
        let _ = self.inbox.send_wait(ShardMsg::RedisLink { up });
        self.health.set(self.shard, Link::Subscriber, up);
    }

    // ---- serving a connection ------------------------------------------------

    fn serve(&mut self, mut sock: TcpStream, mut buf: BytesMut) -> End {
        // Up before the first SUBSCRIBE, so that every confirmation after it
        // reaches a shard that knows the link is up.
        self.set_link(true);
        if self.take_interest().is_err() {
            return End::Shutdown;
        }
        let sock_fd = sock.as_raw_fd();
        let wake_fd = self.input.pipe.as_raw_fd();
        let mut last_rx = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        loop {
            if let Err(end) = self.write_plan(&mut sock) {
                return end;
            }
            loop {
                match decode_bytes_mut(&mut buf) {
                    Ok(Some((frame, _, _))) => {
                        if let Err(end) = self.on_frame(frame) {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => return End::Lost(LinkError::Protocol),
                }
            }
            // Heartbeat: a silent connection gets a PING; an unanswered one is dead.
            let now = Instant::now();
            match ping_sent {
                Some(at) if now - at >= DEAD_AFTER => return End::Lost(LinkError::Timeout("PING")),
                None if now - last_rx >= PING_IDLE => {
                    if let Err(e) = sock.write_all(resp::PING) {
                        return e.into();
                    }
                    ping_sent = Some(now);
                }
                _ => {}
            }
            let wait = match ping_sent {
                Some(at) => (at + DEAD_AFTER).saturating_duration_since(now),
                None => (last_rx + PING_IDLE).saturating_duration_since(now),
            };
            let mut fds = [pollfd(sock_fd), pollfd(wake_fd)];
            if let Err(e) = poll(&mut fds, wait) {
                return e.into();
            }
            if is_ready(&fds[1]) && self.take_interest().is_err() {
                return End::Shutdown;
            }
            if is_ready(&fds[0]) {
                match read_more(&mut sock, &mut buf) {
                    Ok(0) => return End::Lost(LinkError::Closed),
                    Ok(_) => {
                        last_rx = Instant::now();
                        ping_sent = None;
                    }
                    Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return e.into(),
                }
            }
        }
    }

    /// Writes what it takes to reach the wanted subscriptions, and confirms
    /// to the shard the rooms that needed nothing.
    fn write_plan(&mut self, sock: &mut TcpStream) -> Result<(), End> {
        let plan = self.subs.plan();
        if !plan.is_empty() {
            let mut out = BytesMut::new();
            let mut commands = 0;
            for (cmd, list) in [(&b"UNSUBSCRIBE"[..], &plan.unsubscribe), (&b"SUBSCRIBE"[..], &plan.subscribe)] {
                for chunk in list.chunks(MAX_CHANNELS_PER_COMMAND) {
                    resp::put_channels(&mut out, cmd, chunk);
                    commands += 1;
                }
            }
            sock.write_all(&out)?;
            self.m().redis_sub_commands_total.add_shared(commands);
            debug!(
                shard = self.shard,
                subscribe = plan.subscribe.len(),
                unsubscribe = plan.unsubscribe.len(),
                commands,
                wanted = self.subs.wanted(),
                "redis subscriptions changed"
            );
        }
        for s in self.subs.settled() {
            self.to_shard(ShardMsg::Subscribed { room: s.room, seq: s.seq })?;
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: BytesFrame) -> Result<(), End> {
        use BytesFrame::{Array, BulkString};
        match frame {
            Array(parts) => match parts.as_slice() {
                [BulkString(kind), BulkString(channel), BulkString(payload)] if kind == "message" => {
                    self.on_message(channel, payload)
                }
                [BulkString(kind), BulkString(channel), _] if kind == "subscribe" || kind == "unsubscribe" => {
                    match self.subs.confirm(channel) {
                        Some(s) => self.to_shard(ShardMsg::Subscribed { room: s.room, seq: s.seq }),
                        None => Ok(()),
                    }
                }
                // ["pong", ""] and anything else Redis may push.
                _ => Ok(()),
            },
            // E.g. NOPERM on SUBSCRIBE (an ACL without the channel): reconnect and retry.
            BytesFrame::Error(e) => Err(End::Lost(LinkError::Refused { step: "SUBSCRIBE", reply: e.to_string() })),
            _ => Ok(()),
        }
    }

    fn on_message(&mut self, channel: &Bytes, payload: &Bytes) -> Result<(), End> {
        let Some((kind, name)) = self.subs.lookup(channel) else {
            // Sent before our UNSUBSCRIBE reached Redis: nobody here wants it.
            return Ok(());
        };
        let name = name.clone();
        let pos = match self.json.check_with_position(kind, &name, payload, self.max_payload) {
            Ok(pos) => pos,
            Err(why) => {
                self.m().bus_dropped_total.add_shared(1);
                self.drops.dropped(self.shard, channel, why);
                return Ok(());
            }
        };
        // The delivery-latency clock starts here: the payload is the exact
        // event JSON, with no room for the publisher's timestamp.
        let sent = Instant::now();
        let frame = event::frame_json(payload);
        let msg = match kind {
            Kind::Room => ShardMsg::Room { room: name, frame, sent, pos: pos.map(Box::new) },
            Kind::User => ShardMsg::Direct { user: name, frame, sent },
        };
        if self.inbox.backlog() >= INBOX_HIGH_WATER {
            self.m().redis_reader_waits_total.add_shared(1);
            while self.inbox.backlog() > INBOX_LOW_WATER {
                thread::sleep(BACKPRESSURE_NAP);
                if self.take_interest().is_err() {
                    return Err(End::Shutdown);
                }
            }
        }
        self.to_shard(msg)
    }

    fn to_shard(&self, msg: ShardMsg) -> Result<(), End> {
        self.inbox.send_wait(msg).map_err(|_| End::Shutdown)
    }

    // ---- the shard's side ----------------------------------------------------

    /// Applies every `Interest` waiting. Fails once the shard has stopped.
    fn take_interest(&mut self) -> Result<(), Shutdown> {
        let subs = &mut self.subs;
        self.input.take(|i| subs.apply(i))
    }

    /// Sleeps `d` between connection attempts, still taking interest changes.
    fn pause(&mut self, d: Duration) -> Result<(), Shutdown> {
        let until = Instant::now() + d;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            let mut fds = [pollfd(self.input.pipe.as_raw_fd())];
            if poll(&mut fds, left).is_err() || is_ready(&fds[0]) {
                self.take_interest()?;
            }
        }
    }
}

// ---- checking payloads --------------------------------------------------------

/// Why a message from Redis was dropped: whoever published it (a backend, a
/// misconfigured node) broke PROTOCOL.md §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    TooLarge,
    NotJson,
    NotAnObject,
    /// `ev` is not `message` (room channel) or `direct` (user channel).
    WrongEvent,
    /// A `message` whose `room` is not the channel's room.
    WrongRoom,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Malformed::TooLarge => "larger than --outbound-queue-bytes",
            Malformed::NotJson => "not JSON (or not UTF-8)",
            Malformed::NotAnObject => "not a JSON object",
            Malformed::WrongEvent => "`ev` is not `message` (room channel) or `direct` (user channel)",
            Malformed::WrongRoom => "`room` does not match the channel",
        })
    }
}

/// simd-json's parse, with its buffers kept from one message to the next.
#[derive(Default)]
pub struct JsonCheck {
    /// simd-json parses in place; the payload (shared, read-only) is copied here.
    scratch: Vec<u8>,
    buffers: simd_json::Buffers,
}

impl JsonCheck {
    /// Is `payload` the event a `kind` channel named `name` carries?
    pub fn check(&mut self, kind: Kind, name: &str, payload: &[u8], max: usize) -> Result<(), Malformed> {
        self.check_with_position(kind, name, payload, max).map(|_| ())
    }

    /// `check`, and for a room message with history (PROTOCOL.md §7) its
    /// `epoch` and `offset`. A message without them (a backend's raw
    /// PUBLISH) has no position and is delivered as before; one with an
    /// `offset` that is not an unsigned integer or an `epoch` that is not a
    /// string of at most 64 bytes is treated as having none.
    pub fn check_with_position(
        &mut self,
        kind: Kind,
        name: &str,
        payload: &[u8],
        max: usize,
    ) -> Result<Option<crate::history::Position>, Malformed> {
        if payload.len() > max {
            return Err(Malformed::TooLarge);
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        let tape =
            simd_json::to_tape_with_buffers(&mut self.scratch, &mut self.buffers).map_err(|_| Malformed::NotJson)?;
        let value = tape.as_value();
        let obj = value.as_object().ok_or(Malformed::NotAnObject)?;
        let is = |key: &str, want: &str| obj.get(key).is_some_and(|v| v.as_str() == Some(want));
        match kind {
            Kind::Room if !is("ev", "message") => Err(Malformed::WrongEvent),
            Kind::Room if !is("room", name) => Err(Malformed::WrongRoom),
            Kind::User if !is("ev", "direct") => Err(Malformed::WrongEvent),
            Kind::User => Ok(None),
            Kind::Room => {
                let offset = obj.get("offset").and_then(|v| v.as_u64());
                let epoch = obj.get("epoch").and_then(|v| v.as_str().and_then(crate::history::Epoch::new));
                Ok(offset.zip(epoch).map(|(offset, epoch)| crate::history::Position { epoch, offset }))
            }
        }
    }
}

/// Warns about dropped messages at most once a second, with a count of the
/// ones not logged in between.
#[derive(Default)]
struct DropLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl DropLog {
    fn dropped(&mut self, shard: usize, channel: &[u8], why: Malformed) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < Duration::from_secs(1)) {
            self.suppressed += 1;
            return;
        }
        warn!(
            shard,
            channel = %String::from_utf8_lossy(channel),
            reason = %why,
            not_logged_since_last = self.suppressed,
            "dropping a malformed message from Redis"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

// ---- small I/O helpers ----------------------------------------------------------

/// Reads once into the end of `buf`.
fn read_more(sock: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let r = sock.read(&mut buf[start..]);
    buf.truncate(start + *r.as_ref().unwrap_or(&0));
    r
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

fn is_ready(p: &libc::pollfd) -> bool {
    p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

/// `poll(2)` for up to `timeout` (rounded up to a millisecond).
fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `pollfd` for the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_checked_against_their_channel() {
        let mut j = JsonCheck::default();
        let ok = br#"{"ev":"message","room":"lobby","from":"backend","data":1}"#;
        assert_eq!(j.check(Kind::Room, "lobby", ok, 1 << 20), Ok(()));
        assert_eq!(j.check(Kind::Room, "other", ok, 1 << 20), Err(Malformed::WrongRoom));
        assert_eq!(j.check(Kind::User, "u1", ok, 1 << 20), Err(Malformed::WrongEvent));
        assert_eq!(j.check(Kind::User, "u1", br#"{"ev":"direct","from":"a","data":[1]}"#, 1 << 20), Ok(()));
        assert_eq!(j.check(Kind::Room, "lobby", b"{\"ev\":\"message\",", 1 << 20), Err(Malformed::NotJson));
        assert_eq!(j.check(Kind::Room, "lobby", b"not json", 1 << 20), Err(Malformed::NotJson));
        assert_eq!(j.check(Kind::Room, "lobby", b"[1,2]", 1 << 20), Err(Malformed::NotAnObject));
        assert_eq!(
            j.check(Kind::Room, "lobby", b"{\"ev\":\"message\",\"room\":\"lobby\",\"x\":\"\xff\"}", 1 << 20),
            Err(Malformed::NotJson)
        );
        assert_eq!(j.check(Kind::Room, "lobby", ok, 10), Err(Malformed::TooLarge));
        // The buffers are reused: a valid one after invalid ones still passes.
        assert_eq!(j.check(Kind::Room, "lobby", ok, 1 << 20), Ok(()));
    }

    #[test]
    fn history_messages_pass_their_position_and_raw_ones_have_none() {
        let mut j = JsonCheck::default();
        let raw = br#"{"ev":"message","room":"r","from":"backend","data":1}"#;
        assert_eq!(j.check_with_position(Kind::Room, "r", raw, 1 << 20), Ok(None));
        let hist = br#"{"ev":"message","room":"r","from":"u","data":{"offset":1},"epoch":"e1","offset":42}"#;
        let pos = j.check_with_position(Kind::Room, "r", hist, 1 << 20).unwrap().unwrap();
        assert_eq!((pos.epoch.as_str(), pos.offset), ("e1", 42));
        let bad = br#"{"ev":"message","room":"r","from":"u","data":1,"epoch":"e1","offset":-3}"#;
        assert_eq!(j.check_with_position(Kind::Room, "r", bad, 1 << 20), Ok(None));
    }

    #[test]
    fn no_interest_is_left_waiting_without_a_wake_up() {
        // A sender racing the reader: every change must be taken within one
        // wake-up of being sent, never left behind with no byte in the pipe.
        const N: u64 = 200_000;
        let (h, input) = channel().unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let sender = thread::spawn(move || {
            for i in 0..N {
                h.send(vec![Interest { kind: Kind::User, name: "u".into(), on: true, seq: i }]);
                if i % 64 == 0 {
                    thread::yield_now();
                }
            }
            // Keep the pipe open: closing it would wake the reader anyway.
            let _ = done_rx.recv();
        });
        let mut got = 0;
        while got < N {
            let mut fds = [pollfd(input.pipe.as_raw_fd())];
            poll(&mut fds, Duration::from_secs(2)).unwrap();
            assert!(is_ready(&fds[0]), "stuck: {got} of {N} taken, {} waiting with no wake-up", input.rx.len());
            assert!(input.take(|_| got += 1).is_ok());
        }
        done_tx.send(()).unwrap();
        sender.join().unwrap();
    }

    #[test]
    fn a_burst_of_interest_writes_one_wake_up_byte() {
        let (h, input) = channel().unwrap();
        for i in 0..100 {
            h.send(vec![Interest { kind: Kind::Room, name: format!("r{i}").into(), on: true, seq: i }]);
        }
        let mut buf = [0u8; 16];
        assert_eq!((&input.pipe).read(&mut buf).unwrap(), 1);
        assert_eq!(input.rx.len(), 100);
        input.pending.store(false, Ordering::SeqCst);
        drop(h);
        assert_eq!((&input.pipe).read(&mut buf).unwrap(), 0, "a stopped shard closes the pipe");
    }
}
