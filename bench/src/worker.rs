//! One worker process: a single-threaded mio event loop (edge-triggered
//! epoll) that owns every `W`-th connection of the run.
//!
//! In: the [`Plan`] and then [`Command`]s on stdin (read by a helper thread
//! that wakes the loop). Out: [`Report`] lines on stdout.
//!
//! Per connection: non-blocking connect from a chosen source address →
//! upgrade → (subscribe) → ready. Senders then publish (or echo) either on a
//! schedule (`rate`) or whenever an ack frees a slot in their window.
//! Receiving reads into one shared buffer and scans frames in place; a
//! connection keeps bytes only for an unfinished frame, so an idle
//! connection holds no buffer at all.

use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::payload::{Event, Scanner, StampedFrame};
use crate::plan::{Command, Counters, Failures, Plan, Report, Role, Scenario, WorkerResult};
use crate::procfs::{now_ns, self_cpu_s};
use crate::proto::{self, Incoming, Join, PeerScanner, Protocol as Wire};
use crate::stats::{Hist, new_hist, to_pairs};
use crate::ws::{self, FrameHeader};

const WAKER: Token = Token(usize::MAX);
/// Every frame is masked with this one key. RFC 6455 §5.3 asks for an
/// unpredictable key per frame, which protects proxies, not servers; a fixed
/// key lets frames be encoded once. The server still has to unmask each byte.
pub const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x8e];
const SECOND_NS: u64 = 1_000_000_000;
/// After Finish, how long to wait for servers to answer our close frames.
const CLOSE_WAIT_NS: u64 = 2 * SECOND_NS;
const READ_CHUNK_BYTES: usize = 256 * 1024;
/// A carry-over buffer larger than this is freed once empty.
const KEEP_BUF_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Upgrading,
    Subscribing,
    Ready,
    /// We sent a close frame and wait for the server's.
    Closing,
    Closed,
}

impl State {
    fn is_pending(self) -> bool {
        matches!(self, State::Connecting | State::Upgrading | State::Subscribing)
    }
}

/// What a connection is, locally.
#[derive(Debug, Clone, Copy)]
enum Local {
    Plain,
    Subscriber {
        room: usize,
    },
    /// Index into `Worker::senders`.
    Sender(usize),
}

struct Conn {
    sock: Option<TcpStream>,
    g: usize,
    local: Local,
    state: State,
    /// When connect() was called (handshake latency, connect timeout).
    since_ns: u64,
    /// Bytes of an unfinished handshake response or frame.
    rbuf: Vec<u8>,
    /// Bytes the socket did not take yet.
    wbuf: Vec<u8>,
    /// A fragmented message being reassembled (RFC 6455 §5.4).
    frag: Vec<u8>,
}

struct Sender {
    conn: usize,
    /// Global sender number, for the room rotation.
    index: usize,
    inflight: usize,
    seq: u64,
    /// Send time of publish `seq`, at `seq % window` (at most `window` are
    /// in flight, so live entries never collide): gives publish → ack latency.
    sent_at: Box<[u64]>,
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Connect,
    Upgrade,
    Subscribe,
    Timeout,
    /// EOF, reset, close frame or protocol violation.
    Closed,
    /// We are finishing.
    Done,
}

struct Worker {
    plan: Plan,
    poll: Poll,
    owned: Vec<usize>,
    /// Next entry of `owned` to open.
    next: usize,
    conns: Vec<Conn>,
    /// Connections in `State::is_pending`.
    pending: usize,
    /// Connections not yet `Closed`.
    open: usize,
    senders: Vec<Sender>,
    /// Publish frames per room (fanout) or the one echo frame.
    frames: Vec<StampedFrame>,
    subs_local: Vec<u32>,
    subs_global: Vec<u32>,
    scanner: Scanner,
    peer: PeerScanner,
    counters: Counters,
    failures: Failures,
    latency: Hist,
    ack_latency: Hist,
    handshake: Hist,
    result: WorkerResult,
    ready_sent: bool,
    running: bool,
    stopped: bool,
    closing_until: Option<u64>,
    /// Messages per second for this worker's senders (0 = window mode).
    local_rate: f64,
    /// Rate mode: sends made since Go.
    issued: u64,
    /// Rate mode: next sender to try.
    cursor: usize,
    next_tick: u64,
    out: io::BufWriter<io::Stdout>,
}

/// Entry point of `corecast-bench worker`: reads the plan from stdin, runs, reports.
pub fn main() -> io::Result<()> {
    // ctrl-c reaches the whole process group; only the parent acts on it and
    // tells the workers what to do. SAFETY: setting a signal disposition.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let stdin = io::stdin();
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    let plan: Plan = serde_json::from_str(&line)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad plan: {e}")))?;

    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name("commands".into()).spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Command>(&line) {
                Ok(cmd) => {
                    if tx.send(cmd).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("worker: ignoring bad command {line:?}: {e}"),
            }
            let _ = waker.wake();
        }
        // The parent is gone (or closed our stdin): finish on our own.
        let _ = tx.send(Command::Finish);
        let _ = waker.wake();
    })?;
    Worker::new(plan, poll).run(&rx)
}

impl Worker {
    fn new(plan: Plan, poll: Poll) -> Worker {
        let owned: Vec<usize> = plan.owned().collect();
        let local_senders = owned.iter().filter(|&&g| matches!(plan.conn(g).role, Role::Sender { .. })).count();
        let local_rate = if plan.senders > 0 { plan.rate * local_senders as f64 / plan.senders as f64 } else { 0.0 };
        let frames = match plan.scenario {
            Scenario::Fanout if local_senders > 0 && plan.protocol != Wire::Corecast => {
                vec![proto::publish_frame(plan.protocol, plan.payload, MASK)]
            }
            Scenario::Fanout if local_senders > 0 => {
                (0..plan.rooms).map(|r| StampedFrame::publish(&plan.room_name(r), plan.payload, MASK)).collect()
            }
            Scenario::Echo => vec![StampedFrame::echo(plan.payload, MASK)],
            _ => Vec::new(),
        };
        Worker {
            subs_local: vec![0; plan.rooms],
            subs_global: Vec::new(),
            next_tick: plan.t0_ns + SECOND_NS,
            owned,
            next: 0,
            conns: Vec::new(),
            pending: 0,
            open: 0,
            senders: Vec::with_capacity(local_senders),
            frames,
            scanner: Scanner::default(),
            peer: PeerScanner::default(),
            counters: Counters::default(),
            failures: Failures::default(),
            latency: new_hist(),
            ack_latency: new_hist(),
            handshake: new_hist(),
            result: WorkerResult::default(),
            ready_sent: false,
            running: false,
            stopped: false,
            closing_until: None,
            local_rate,
            issued: 0,
            cursor: 0,
            out: io::BufWriter::new(io::stdout()),
            plan,
            poll,
        }
    }

    fn run(mut self, commands: &mpsc::Receiver<Command>) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; READ_CHUNK_BYTES];
        loop {
            let now = now_ns();
            let timeout = self.next_wakeup(now).map(|at| Duration::from_nanos(at.saturating_sub(now)));
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e);
            }
            for ev in events.iter() {
                if ev.token() != WAKER {
                    self.on_event(ev.token().0, ev, &mut scratch);
                }
            }
            let now = now_ns();
            while let Ok(cmd) = commands.try_recv() {
                self.command(cmd, now);
            }
            self.open_due(now);
            self.pump(now);
            self.tick(now);
            if !self.ready_sent && self.next == self.owned.len() && self.pending == 0 {
                self.ready_sent = true;
                let report = Report::Ready { subs_per_room: self.subs_local.clone(), counters: self.snapshot() };
                self.emit(&report);
            }
            if self.closing_until.is_some_and(|until| self.open == 0 || now >= until) {
                break;
            }
        }
        self.finish_result();
        let result = Report::Result(Box::new(std::mem::take(&mut self.result)));
        self.emit(&result);
        Ok(())
    }

    /// The earliest moment the loop has something to do without I/O.
    fn next_wakeup(&self, now: u64) -> Option<u64> {
        let mut at = self.next_tick;
        if self.next < self.owned.len() && self.pending < self.plan.max_pending && self.closing_until.is_none() {
            at = at.min(self.open_time(self.owned[self.next]));
        }
        if self.running && !self.stopped && self.local_rate > 0.0 {
            let due = self.result.go_ns + ((self.issued + 1) as f64 * 1e9 / self.local_rate) as u64;
            at = at.min(due);
        }
        if let Some(until) = self.closing_until {
            at = at.min(until);
        }
        Some(at.max(now))
    }

    fn open_time(&self, g: usize) -> u64 {
        if self.plan.connect_rate > 0.0 {
            self.plan.t0_ns + (g as f64 * 1e9 / self.plan.connect_rate) as u64
        } else {
            self.plan.t0_ns
        }
    }

    fn command(&mut self, cmd: Command, now: u64) {
        match cmd {
            Command::Go { subs_per_room } if !self.running => {
                self.subs_global = subs_per_room;
                self.running = true;
                self.result.go_ns = now;
                self.result.cpu_at_go_s = self_cpu_s();
                if self.plan.rate <= 0.0 {
                    for si in 0..self.senders.len() {
                        for _ in 0..self.plan.window {
                            self.send(si, now_ns());
                        }
                    }
                }
            }
            Command::Go { .. } => {}
            Command::Stop => self.stop(now),
            Command::Finish => {
                self.stop(now);
                self.next = self.owned.len();
                self.closing_until = Some(now + CLOSE_WAIT_NS);
                for ci in 0..self.conns.len() {
                    match self.conns[ci].state {
                        State::Subscribing | State::Ready => {
                            let mut frame = Vec::with_capacity(8);
                            ws::format_frame(ws::OP_CLOSE, &1000u16.to_be_bytes(), Some(MASK), &mut frame);
                            self.pending -= usize::from(self.conns[ci].state == State::Subscribing);
                            self.conns[ci].state = State::Closing;
                            if self.write(ci, &frame).is_err() {
                                self.close(ci, Why::Done);
                            }
                        }
                        State::Connecting | State::Upgrading => self.close(ci, Why::Done),
                        State::Closing | State::Closed => {}
                    }
                }
            }
        }
    }

    fn stop(&mut self, now: u64) {
        if !self.stopped {
            self.stopped = true;
            self.result.stop_ns = now;
            self.result.cpu_at_stop_s = self_cpu_s();
        }
    }

    /// Opens the connections whose time has come, within `max_pending`.
    fn open_due(&mut self, now: u64) {
        while self.next < self.owned.len()
            && self.pending < self.plan.max_pending
            && self.open_time(self.owned[self.next]) <= now
        {
            let g = self.owned[self.next];
            self.next += 1;
            self.open_one(g, now);
        }
    }

    fn open_one(&mut self, g: usize, now: u64) {
        let cp = self.plan.conn(g);
        let local = match cp.role {
            Role::Plain => Local::Plain,
            Role::Subscriber { room } => Local::Subscriber { room },
            Role::Sender { index } => {
                self.senders.push(Sender {
                    conn: self.conns.len(),
                    index,
                    inflight: 0,
                    seq: 0,
                    sent_at: vec![0; self.plan.window.max(1)].into_boxed_slice(),
                });
                Local::Sender(self.senders.len() - 1)
            }
        };
        self.counters.started += 1;
        let ci = self.conns.len();
        let addr = self.plan.targets[cp.target].addr;
        let sock = connect(addr, cp.source_ip).and_then(|mut s| {
            self.poll.registry().register(&mut s, Token(ci), Interest::READABLE | Interest::WRITABLE)?;
            Ok(s)
        });
        self.conns.push(Conn {
            sock: None,
            g,
            local,
            state: State::Connecting,
            since_ns: now,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            frag: Vec::new(),
        });
        self.pending += 1;
        self.open += 1;
        match sock {
            Ok(s) => self.conns[ci].sock = Some(s),
            Err(e) => {
                self.note_error(|| format!("connect to {addr} from {:?}: {e}", cp.source_ip));
                self.close(ci, Why::Connect);
            }
        }
    }

    fn on_event(&mut self, ci: usize, ev: &mio::event::Event, scratch: &mut [u8]) {
        let Some(conn) = self.conns.get(ci) else {
            return;
        };
        match conn.state {
            State::Closed => {}
            State::Connecting => self.on_connected(ci),
            _ => {
                if ev.is_writable() && self.flush(ci).is_err() {
                    self.close(ci, Why::Closed);
                    return;
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.on_readable(ci, scratch);
                }
            }
        }
    }

    /// A connect() finished one way or the other: send the upgrade request.
    fn on_connected(&mut self, ci: usize) {
        let Some(sock) = self.conns[ci].sock.as_ref() else {
            return;
        };
        let error = match sock.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match sock.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return, // still connecting
                Err(e) => Some(e),
            },
        };
        if let Some(e) = error {
            let addr = self.plan.targets[self.plan.conn(self.conns[ci].g).target].addr;
            self.note_error(|| format!("connect to {addr}: {e}"));
            self.close(ci, Why::Connect);
            return;
        }
        let cp = self.plan.conn(self.conns[ci].g);
        let mut request = Vec::with_capacity(256);
        ws::format_handshake(&self.plan.targets[cp.target].host, &cp.path, &mut request);
        self.conns[ci].state = State::Upgrading;
        if self.write(ci, &request).is_err() {
            self.close(ci, Why::Connect);
        }
    }

    fn on_readable(&mut self, ci: usize, scratch: &mut [u8]) {
        loop {
            let Some(sock) = self.conns[ci].sock.as_mut() else {
                return;
            };
            let n = match sock.read(scratch) {
                Ok(0) => {
                    self.close_by_peer(ci, "connection closed by server");
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close_by_peer(ci, &e.to_string());
                    return;
                }
            };
            let now = now_ns();
            let mut buf = std::mem::take(&mut self.conns[ci].rbuf);
            let used = if buf.is_empty() {
                let used = self.ingest(ci, &scratch[..n], now);
                buf.extend_from_slice(&scratch[used.unwrap_or(n)..n]);
                used
            } else {
                buf.extend_from_slice(&scratch[..n]);
                let used = self.ingest(ci, &buf, now);
                buf.drain(..used.unwrap_or(buf.len()));
                used
            };
            if used.is_none() || self.conns[ci].state == State::Closed {
                return;
            }
            if buf.is_empty() && buf.capacity() > KEEP_BUF_BYTES {
                buf = Vec::new();
            }
            self.conns[ci].rbuf = buf;
            // A short read emptied the socket: epoll (edge-triggered) reports
            // the next arrival, so skip the read that would say WouldBlock.
            if n < scratch.len() {
                return;
            }
        }
    }

    /// Consumes the handshake response and whole frames at the front of
    /// `input`; returns how many bytes were used, `None` once the connection
    /// is closed.
    fn ingest(&mut self, ci: usize, input: &[u8], now: u64) -> Option<usize> {
        let mut at = 0;
        if self.conns[ci].state == State::Upgrading {
            match ws::parse_handshake_response(input) {
                Ok(None) => return Some(0),
                Ok(Some(n)) => {
                    at = n;
                    self.on_upgraded(ci, now);
                }
                Err(e) => {
                    self.note_error(|| format!("upgrade refused: {e:?}"));
                    self.close(ci, Why::Upgrade);
                    return None;
                }
            }
        }
        loop {
            let header = match FrameHeader::parse(&input[at..]) {
                Ok(Some(h)) => h,
                Ok(None) => return Some(at),
                Err(e) => {
                    self.note_error(|| format!("protocol error from server: {e:?}"));
                    self.close(ci, Why::Closed);
                    return None;
                }
            };
            let (h, header_len) = header;
            // "A client MUST close a connection if it detects a masked frame." (RFC 6455 §5.1)
            if h.mask.is_some() {
                self.note_error(|| "protocol error from server: masked frame".into());
                self.close(ci, Why::Closed);
                return None;
            }
            let start = at + header_len;
            let Some(payload) = input.get(start..start + h.payload_len as usize) else {
                return Some(at);
            };
            at = start + payload.len();
            self.on_frame(ci, h, payload, now);
            if matches!(self.conns[ci].state, State::Closed) {
                return None;
            }
        }
    }

    fn on_upgraded(&mut self, ci: usize, now: u64) {
        self.counters.connected += 1;
        self.handshake.saturating_record(now.saturating_sub(self.conns[ci].since_ns));
        match self.conns[ci].local {
            // A peer's connections all join its one channel, senders too.
            Local::Subscriber { .. } | Local::Sender(_) if self.plan.protocol != Wire::Corecast => {
                match proto::join(self.plan.protocol) {
                    Join::Ready => self.on_ready(ci, now),
                    Join::Wait => self.conns[ci].state = State::Subscribing,
                    Join::Send(text) => {
                        self.conns[ci].state = State::Subscribing;
                        self.send_text_or_close(ci, &text);
                    }
                }
            }
            Local::Subscriber { room } => {
                let frame = subscribe_frame(&self.plan.room_name(room));
                self.conns[ci].state = State::Subscribing;
                if self.write(ci, &frame).is_err() {
                    self.close(ci, Why::Closed);
                }
            }
            Local::Plain | Local::Sender(_) => self.on_ready(ci, now),
        }
    }

    fn on_ready(&mut self, ci: usize, now: u64) {
        self.conns[ci].state = State::Ready;
        self.pending -= 1;
        self.counters.ready += 1;
        self.result.last_ready_ns = now;
        if let Local::Subscriber { room } = self.conns[ci].local {
            self.subs_local[room] += 1;
        }
    }

    fn on_frame(&mut self, ci: usize, h: FrameHeader, payload: &[u8], now: u64) {
        match h.opcode {
            ws::OP_TEXT | ws::OP_BINARY if h.fin => self.on_message(ci, payload, now),
            ws::OP_TEXT | ws::OP_BINARY => self.conns[ci].frag = payload.to_vec(),
            ws::OP_CONTINUATION => {
                self.conns[ci].frag.extend_from_slice(payload);
                if h.fin {
                    let whole = std::mem::take(&mut self.conns[ci].frag);
                    self.on_message(ci, &whole, now);
                }
            }
            ws::OP_PING => {
                // "Upon receipt of a Ping frame, an endpoint MUST send a Pong
                // frame in response" with the same data. (RFC 6455 §5.5.2)
                let mut pong = Vec::with_capacity(payload.len() + 6);
                ws::format_frame(ws::OP_PONG, payload, Some(MASK), &mut pong);
                if self.write(ci, &pong).is_err() {
                    self.close(ci, Why::Closed);
                }
            }
            ws::OP_CLOSE => {
                if self.conns[ci].state != State::Closing {
                    // Echo the status code back, as RFC 6455 §5.5.1 asks.
                    let mut reply = Vec::with_capacity(8);
                    ws::format_frame(ws::OP_CLOSE, payload.get(..2).unwrap_or(&[]), Some(MASK), &mut reply);
                    let _ = self.write(ci, &reply);
                    let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                    self.close_by_peer(ci, &format!("close frame from server, code {code:?}"));
                } else {
                    self.close(ci, Why::Done);
                }
            }
            _ => {} // pong
        }
    }

    fn on_message(&mut self, ci: usize, json: &[u8], now: u64) {
        if self.plan.protocol != Wire::Corecast {
            for msg in proto::lines(self.plan.protocol, json) {
                self.on_peer_message(ci, msg, now);
                if self.conns[ci].state == State::Closed {
                    return;
                }
            }
            return;
        }
        let event = self.scanner.event(json);
        match (self.conns[ci].local, event) {
            (_, Event::Error) => {
                self.counters.errors += 1;
                self.note_error(|| format!("server error: {}", String::from_utf8_lossy(json)));
                match self.conns[ci].local {
                    Local::Subscriber { .. } if self.conns[ci].state == State::Subscribing => {
                        self.close(ci, Why::Subscribe)
                    }
                    Local::Sender(si) if self.scanner.id(json).is_some() => self.on_reply(si, now),
                    _ => {}
                }
            }
            (_, Event::Maintenance) => self.counters.maintenance += 1,
            (Local::Subscriber { .. }, Event::Message) => {
                self.counters.received += 1;
                self.result.last_receive_ns = now;
                if let Some(t) = self.scanner.timestamp(json) {
                    self.latency.saturating_record(now.saturating_sub(t));
                }
            }
            (Local::Subscriber { .. }, Event::Subscribed) if self.conns[ci].state == State::Subscribing => {
                self.on_ready(ci, now)
            }
            (Local::Sender(si), Event::Ack) => {
                self.counters.acked += 1;
                if let Some(id) = self.scanner.id(json) {
                    let s = &self.senders[si];
                    if id < s.seq && s.seq - id <= s.sent_at.len() as u64 {
                        let sent = s.sent_at[(id % s.sent_at.len() as u64) as usize];
                        self.ack_latency.saturating_record(now.saturating_sub(sent));
                    }
                }
                self.on_reply(si, now);
            }
            (Local::Sender(si), Event::Other) if self.plan.scenario == Scenario::Echo => {
                self.counters.received += 1;
                self.result.last_receive_ns = now;
                if let Some(t) = self.scanner.timestamp(json) {
                    self.latency.saturating_record(now.saturating_sub(t));
                }
                self.on_reply(si, now);
            }
            _ => {}
        }
    }

    /// One message from a peer server (see `proto`): subscribers count it;
    /// a sender takes its own copy back as the ack and ignores other senders'.
    fn on_peer_message(&mut self, ci: usize, msg: &[u8], now: u64) {
        match (self.peer.classify(self.plan.protocol, msg), self.conns[ci].local) {
            (Incoming::Reply(text), _) => self.send_text_or_close(ci, text),
            (Incoming::Joined, _) if self.conns[ci].state == State::Subscribing => self.on_ready(ci, now),
            (Incoming::Error, _) => {
                self.counters.errors += 1;
                self.note_error(|| format!("server error: {}", String::from_utf8_lossy(msg)));
                if self.conns[ci].state == State::Subscribing {
                    self.close(ci, Why::Subscribe);
                }
            }
            (Incoming::Message { .. }, _) if self.conns[ci].state != State::Ready => {}
            (Incoming::Message { t, .. }, Local::Subscriber { .. }) => {
                self.counters.received += 1;
                self.result.last_receive_ns = now;
                if let Some(t) = t {
                    self.latency.saturating_record(now.saturating_sub(t));
                }
            }
            (Incoming::Message { t, sender }, Local::Sender(si)) if sender == Some(self.senders[si].index as u64) => {
                self.counters.acked += 1;
                if let Some(t) = t {
                    self.ack_latency.saturating_record(now.saturating_sub(t));
                }
                self.on_reply(si, now);
            }
            _ => {}
        }
    }

    /// Writes `text` as one masked text frame; a failed write closes the connection.
    fn send_text_or_close(&mut self, ci: usize, text: &[u8]) {
        let mut frame = Vec::with_capacity(text.len() + 14);
        ws::format_frame(ws::OP_TEXT, text, Some(MASK), &mut frame);
        if self.write(ci, &frame).is_err() {
            self.close(ci, Why::Closed);
        }
    }

    /// A sender's request was answered: free its slot, refill in window mode.
    fn on_reply(&mut self, si: usize, now: u64) {
        let s = &mut self.senders[si];
        s.inflight = s.inflight.saturating_sub(1);
        if self.running && !self.stopped && self.plan.rate <= 0.0 {
            self.send(si, now);
        }
    }

    /// Rate mode: sends what the schedule says is due, round-robin over
    /// senders with room in their window.
    fn pump(&mut self, now: u64) {
        if !self.running || self.stopped || self.local_rate <= 0.0 || self.senders.is_empty() {
            return;
        }
        let due = (now.saturating_sub(self.result.go_ns) as f64 * self.local_rate / 1e9) as u64;
        while self.issued < due {
            let mut sent = false;
            for _ in 0..self.senders.len() {
                let si = self.cursor;
                self.cursor = (self.cursor + 1) % self.senders.len();
                if self.send(si, now) {
                    sent = true;
                    break;
                }
            }
            if !sent {
                return; // every window is full: wait for acks
            }
            self.issued += 1;
        }
    }

    /// Sends sender `si`'s next message if its window has room.
    fn send(&mut self, si: usize, now: u64) -> bool {
        let s = &mut self.senders[si];
        let ci = s.conn;
        if s.inflight >= self.plan.window || self.conns[ci].state != State::Ready {
            return false;
        }
        let (frame, expect) = match self.plan.scenario {
            Scenario::Fanout => {
                let room = self.plan.publish_room(s.index, s.seq);
                (room, self.subs_global.get(room).copied().unwrap_or(0))
            }
            _ => (0, 1),
        };
        let Some(frame) = self.frames.get_mut(frame) else {
            return false;
        };
        // A peer's frame carries the sender's number where corecast's has the op id.
        let id = if self.plan.protocol == Wire::Corecast { s.seq } else { s.index as u64 };
        let bytes = frame.stamp(now, s.seq, id);
        let slot = (s.seq % s.sent_at.len() as u64) as usize;
        s.sent_at[slot] = now;
        s.seq += 1;
        s.inflight += 1;
        self.counters.sent += 1;
        self.counters.expected += u64::from(expect);
        if write_or_buffer(&mut self.conns[ci], bytes).is_err() {
            self.close(ci, Why::Closed);
            return false;
        }
        true
    }

    /// Emits the ticks that are due and times out slow connections.
    fn tick(&mut self, now: u64) {
        if now < self.next_tick {
            return;
        }
        let limit = self.plan.connect_timeout_ms * 1_000_000;
        if self.pending > 0 {
            for ci in 0..self.conns.len() {
                let c = &self.conns[ci];
                if c.state.is_pending() && now.saturating_sub(c.since_ns) > limit {
                    self.note_error(|| format!("not ready within {} ms", limit / 1_000_000));
                    self.close(ci, Why::Timeout);
                }
            }
        }
        while self.next_tick <= now {
            let k = (self.next_tick - self.plan.t0_ns) / SECOND_NS;
            self.next_tick += SECOND_NS;
            let report = Report::Tick { k, counters: self.snapshot() };
            self.emit(&report);
        }
    }

    fn snapshot(&self) -> Counters {
        Counters { cpu_s: self_cpu_s(), ..self.counters }
    }

    fn write(&mut self, ci: usize, bytes: &[u8]) -> io::Result<()> {
        write_or_buffer(&mut self.conns[ci], bytes)
    }

    fn flush(&mut self, ci: usize) -> io::Result<()> {
        let conn = &mut self.conns[ci];
        let Some(sock) = conn.sock.as_mut() else {
            return Ok(());
        };
        while !conn.wbuf.is_empty() {
            match sock.write(&conn.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    conn.wbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        conn.wbuf = Vec::new();
        Ok(())
    }

    fn close_by_peer(&mut self, ci: usize, why: &str) {
        if self.conns[ci].state == State::Closing {
            self.close(ci, Why::Done);
        } else {
            self.note_error(|| why.to_string());
            self.close(ci, Why::Closed);
        }
    }

    fn close(&mut self, ci: usize, why: Why) {
        let conn = &mut self.conns[ci];
        if conn.state == State::Closed {
            return;
        }
        if let Some(mut sock) = conn.sock.take() {
            let _ = self.poll.registry().deregister(&mut sock);
        }
        let was = std::mem::replace(&mut conn.state, State::Closed);
        conn.rbuf = Vec::new();
        conn.wbuf = Vec::new();
        conn.frag = Vec::new();
        self.open -= 1;
        if was.is_pending() {
            self.pending -= 1;
            let f = &mut self.failures;
            let counter = match why {
                Why::Connect => &mut f.connect,
                Why::Upgrade => &mut f.upgrade,
                Why::Subscribe => &mut f.subscribe,
                Why::Timeout => &mut f.timeout,
                Why::Closed => &mut f.closed,
                Why::Done => return,
            };
            *counter += 1;
            self.counters.failed += 1;
        } else if was == State::Ready && why != Why::Done {
            self.counters.dropped += 1;
        }
    }

    fn note_error(&mut self, what: impl FnOnce() -> String) {
        if self.result.first_error.is_none() {
            self.result.first_error = Some(what());
        }
    }

    fn emit(&mut self, report: &Report) {
        let ok = serde_json::to_writer(&mut self.out, report).is_ok()
            && self.out.write_all(b"\n").is_ok()
            && self.out.flush().is_ok();
        if !ok {
            // The parent is gone; nobody will read a result.
            std::process::exit(1);
        }
    }

    fn finish_result(&mut self) {
        let now = now_ns();
        self.stop(now);
        if self.result.go_ns == 0 {
            self.result.cpu_at_go_s = self.result.cpu_at_stop_s;
        }
        self.result.counters = self.snapshot();
        self.result.failures = self.failures;
        self.result.latency = to_pairs(&self.latency);
        self.result.ack_latency = to_pairs(&self.ack_latency);
        self.result.handshake = to_pairs(&self.handshake);
    }
}

/// `{"op":"subscribe","room":ROOM,"id":1}`, masked.
fn subscribe_frame(room: &str) -> Vec<u8> {
    let json = format!(r#"{{"op":"subscribe","room":"{room}","id":1}}"#);
    let mut frame = Vec::with_capacity(json.len() + 14);
    ws::format_frame(ws::OP_TEXT, json.as_bytes(), Some(MASK), &mut frame);
    frame
}

/// Writes what the socket takes now and keeps the rest for the next writable event.
fn write_or_buffer(conn: &mut Conn, bytes: &[u8]) -> io::Result<()> {
    let Some(sock) = conn.sock.as_mut() else {
        return Err(io::ErrorKind::NotConnected.into());
    };
    if !conn.wbuf.is_empty() {
        conn.wbuf.extend_from_slice(bytes);
        return Ok(());
    }
    let mut at = 0;
    while at < bytes.len() {
        match sock.write(&bytes[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    conn.wbuf.extend_from_slice(&bytes[at..]);
    Ok(())
}

/// A non-blocking connect to `addr`, bound to `source` if given.
fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        // Let connect() pick the port, unique per 4-tuple rather than per
        // source address, so each (source, server) pair has the whole
        // ephemeral range. SAFETY: setsockopt with a valid int option.
        let one: libc::c_int = 1;
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(sock.into()))
}
