//! For the history tests (`tests/history*.rs`, PROTOCOL.md §7): publishing
//! with positions, subscribing with `since`, and a `Tracker` that follows one
//! logical client across reconnects and counts every missing or duplicated
//! offset.

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
/// offset it was delivered (per epoch) and how often.
#[derive(Default, Debug)]
pub struct Tracker {
    pub seen: BTreeMap<u64, u32>,
    pub epoch: Option<String>,
    pub last: Option<Pos>,
    /// The position its first subscription started after.
    pub start: Option<u64>,
    pub gaps: u32,
    pub unrecovered: u32,
}

impl Tracker {
    /// Takes one event; returns false for anything but a message or gap.
    pub fn take(&mut self, v: &Value) -> bool {
        match v["ev"].as_str() {
            Some("message") => {
                let p = Pos::of(v);
                if let Some(e) = &self.epoch {
                    assert_eq!(e, &p.epoch, "the epoch changed mid-test: {v}");
                }
                self.epoch = Some(p.epoch.clone());
                *self.seen.entry(p.offset).or_default() += 1;
                self.last = Some(p);
                true
            }
            Some("gap") => {
                self.gaps += 1;
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
        }
        if v.get("recovered") == Some(&json!(false)) {
            self.unrecovered += 1;
        }
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
