//! For the history tests (`tests/history*.rs`, PROTOCOL.md §7): publishing
//! with positions, subscribing with `since`, and a `Tracker` that follows one
//! logical client across reconnects, counts every missing or duplicated
//! offset and records every delivery out of order.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Client, Server};

/// A stream position as the server gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pos {
    pub epoch: String,
    pub offset: u64,
}

impl Pos {
    pub fn of(v: &Value) -> Pos {
        Pos {
            epoch: v["epoch"].as_str().unwrap_or_else(|| panic!("no epoch in {v}")).to_string(),
            offset: v["offset"].as_u64().unwrap_or_else(|| panic!("no offset in {v}")),
        }
    }
    pub fn since(&self) -> Value {
        json!({"epoch": self.epoch, "offset": self.offset})
    }
}

/// `POST /api/publish` into `room`; returns the position it got.
pub fn api_publish(s: &Server, room: &str, data: Value) -> Pos {
    let body = json!({"room": room, "data": data}).to_string();
    let (st, reply) = s.http("POST", "/api/publish", &[("Content-Type", "application/json")], body.as_bytes());
    assert_eq!(st, 200, "publish: {reply}");
    let v: Value = serde_json::from_str(&reply).expect("JSON reply");
    assert_eq!(v["ok"], true);
    Pos::of(&v)
}

/// Subscribes (with `since` when given) and returns the `subscribed` reply.
pub fn subscribe_since(c: &mut Client, room: &str, since: Option<&Pos>) -> Value {
    let mut op = json!({"op": "subscribe", "room": room, "id": "s"});
    if let Some(p) = since {
        op["since"] = p.since();
    }
    c.send_json(&op);
    let v = c.recv_json(Duration::from_secs(10)).expect("a subscribed reply");
    assert_eq!(v["ev"], "subscribed", "{v}");
    assert_eq!(v["id"], "s");
    v
}

/// The next `message` of `room` (skipping nothing: anything else panics).
pub fn next_message(c: &mut Client, room: &str, timeout: Duration) -> Option<Value> {
    let v = c.recv_json(timeout)?;
    assert_eq!(v["ev"], "message", "expected a message, got {v}");
    assert_eq!(v["room"], room);
    Some(v)
}

/// Reads `n` messages; panics if they do not come within `timeout` overall.
pub fn messages(c: &mut Client, room: &str, n: usize, timeout: Duration) -> Vec<Value> {
    let end = Instant::now() + timeout;
    (0..n)
        .map(|i| {
            let left = end.saturating_duration_since(Instant::now());
            next_message(c, room, left)
                .unwrap_or_else(|| panic!("message {} of {n} did not come within {timeout:?}", i + 1))
        })
        .collect()
}

pub fn offsets(msgs: &[Value]) -> Vec<u64> {
    msgs.iter().map(|m| m["offset"].as_u64().expect("offset")).collect()
}

/// One logical client's view of one room over several connections: every
/// offset it was delivered (per epoch) and how often, and the order they
/// arrived in, per connection.
#[derive(Default, Debug)]
pub struct Tracker {
    /// How often each offset was delivered (sorted by offset, not by arrival).
    pub seen: BTreeMap<u64, u32>,
    /// Every delivered offset in arrival order, with the connection (1, 2, ..)
    /// it arrived on.
    pub arrivals: Vec<(u32, u64)>,
    /// Each delivery that broke the order: within a connection an offset must
    /// be the previous one + 1 (unless a `gap` came between), and the first
    /// one on a new connection must be above everything delivered before.
    pub out_of_order: Vec<String>,
    pub epoch: Option<String>,
    pub last: Option<Pos>,
    /// The position its first subscription started after.
    pub start: Option<u64>,
    pub gaps: u32,
    pub unrecovered: u32,
    /// The connection messages are being taken from now (0 before `connected`).
    conn: u32,
    /// The last offset taken on this connection, if any (reset by a `gap`).
    conn_last: Option<u64>,
    /// The highest offset known before this connection began (its `since`).
    before_conn: Option<u64>,
}

impl Tracker {
    /// A new connection begins: order restarts from what was delivered so far.
    pub fn connected(&mut self) {
        self.conn += 1;
        self.conn_last = None;
        self.before_conn = self.last.as_ref().map(|p| p.offset);
    }

    /// Takes one event; returns false for anything but a message or gap.
    pub fn take(&mut self, v: &Value) -> bool {
        match v["ev"].as_str() {
            Some("message") => {
                let p = Pos::of(v);
                // (The empty epoch is a room that had no history yet: its
                // first publish draws the real one.)
                if let Some(e) = self.epoch.as_ref().filter(|e| !e.is_empty()) {
                    assert_eq!(e, &p.epoch, "the epoch changed mid-test: {v}");
                }
                self.epoch = Some(p.epoch.clone());
                let o = p.offset;
                match self.conn_last {
                    Some(prev) if o != prev + 1 => {
                        self.out_of_order.push(format!("connection {}: offset {o} after {prev}", self.conn))
                    }
                    None if self.before_conn.is_some_and(|b| o <= b) => self.out_of_order.push(format!(
                        "connection {}: first offset {o} not above {:?}, delivered before",
                        self.conn, self.before_conn
                    )),
                    _ => {}
                }
                self.conn_last = Some(o);
                self.arrivals.push((self.conn, o));
                *self.seen.entry(o).or_default() += 1;
                self.last = Some(p);
                true
            }
            Some("gap") => {
                self.gaps += 1;
                // Offsets jump after a gap; order restarts above the last one.
                self.before_conn = self.last.as_ref().map(|p| p.offset);
                self.conn_last = None;
                true
            }
            _ => false,
        }
    }

    /// Takes a `subscribed` reply.
    pub fn subscribed(&mut self, v: &Value) {
        let p = Pos::of(v);
        if self.start.is_none() {
            self.start = Some(p.offset);
            self.epoch = Some(p.epoch.clone());
            self.last = Some(p);
            self.before_conn = self.start;
        }
        if v.get("recovered") == Some(&json!(false)) {
            self.unrecovered += 1;
        }
    }

    /// Panics, naming the first few, if any delivery broke the order.
    pub fn assert_in_order(&self) {
        assert!(
            self.out_of_order.is_empty(),
            "{} deliveries out of order, first: {:?}",
            self.out_of_order.len(),
            &self.out_of_order[..self.out_of_order.len().min(5)]
        );
    }

    /// Missing plus duplicated offsets in start+1 ..= upto.
    pub fn errors(&self, upto: u64) -> (u64, u64) {
        let from = self.start.unwrap_or(0) + 1;
        let missing = (from..=upto).filter(|o| !self.seen.contains_key(o)).count() as u64;
        let dup = self.seen.values().map(|&n| u64::from(n.saturating_sub(1))).sum();
        (missing, dup)
    }

    pub fn highest(&self) -> u64 {
        self.seen.keys().next_back().copied().unwrap_or(self.start.unwrap_or(0))
    }
}

/// A logical client that follows one room across connections: it connects
/// to `url()` (asked again before every reconnect), subscribes with its last
/// position, records everything into its `Tracker`, honours `maintenance`
/// (waits its delay before reconnecting), and reconnects whenever the
/// connection breaks. It stops once it has seen `done` (non-zero) or the
/// deadline passes.
pub struct Roamer {
    pub tracker: Tracker,
    pub connects: u32,
    pub maintenance: u32,
}

pub fn roam(
    url: &dyn Fn(u32) -> String,
    room: &str,
    done: &std::sync::atomic::AtomicU64,
    subscribed: &std::sync::atomic::AtomicUsize,
    limit: Duration,
) -> Roamer {
    use std::sync::atomic::Ordering;
    use tungstenite::Message;
    let end = Instant::now() + limit;
    let mut r = Roamer { tracker: Tracker::default(), connects: 0, maintenance: 0 };
    let finished = |t: &Tracker| {
        let d = done.load(Ordering::SeqCst);
        d > 0 && t.highest() >= d
    };
    loop {
        assert!(Instant::now() < end, "roamer in {room} gave up after {limit:?}: {:?}", r.tracker.last);
        let Ok((mut ws, _)) = tungstenite::connect(url(r.connects)) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        r.connects += 1;
        r.tracker.connected();
        let mut op = json!({"op": "subscribe", "room": room, "id": "s"});
        if let Some(p) = &r.tracker.last {
            op["since"] = p.since();
        }
        if ws.send(Message::text(op.to_string())).is_err() {
            continue;
        }
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        }
        let mut reconnect_at = None;
        let mut first = true;
        loop {
            if finished(&r.tracker) {
                return r;
            }
            assert!(Instant::now() < end, "roamer in {room} timed out: {:?}", r.tracker.last);
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).expect("JSON");
                    match v["ev"].as_str() {
                        Some("subscribed") => {
                            assert!(first, "one subscribed per connection: {v}");
                            first = false;
                            r.tracker.subscribed(&v);
                            if r.connects == 1 {
                                subscribed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Some("maintenance") => {
                            r.maintenance += 1;
                            let ms = v["reconnect_in_ms"].as_u64().expect("reconnect_in_ms");
                            reconnect_at = Some(Instant::now() + Duration::from_millis(ms));
                        }
                        Some("error") => panic!("roamer got an error: {v}"),
                        _ => {
                            assert!(!first, "an event before subscribed: {v}");
                            r.tracker.take(&v);
                        }
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        if let Some(at) = reconnect_at {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
    }
}
