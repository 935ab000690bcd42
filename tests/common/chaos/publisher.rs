//! The publisher: `POST /api/publish` (PROTOCOL.md §4, §7) straight to the
//! nodes (a backend, not behind the clients' proxies) over keep-alive
//! connections, each payload `{"s": seq}` unique per room. A 200 carries
//! the position, recorded as ground truth (and checked: a position already
//! holding another payload is a lie). A 503 is `refused`; a connection error
//! or timeout leaves the publish's fate `unknown` (it may have been stored).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::checker::{Ctx, Origin};

/// A keep-alive HTTP/1.1 connection to one node.
pub struct Http {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
}

pub enum Outcome {
    Acked(String, u64),
    Refused,
    Unknown,
}

impl Http {
    pub fn new(port: u16) -> Http {
        Http { port, conn: None }
    }

    fn post(&mut self, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_write_timeout(Some(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let r = self.conn.as_mut().expect("connected");
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let res = (|| {
            r.get_mut().write_all(req.as_bytes())?;
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
            }
            let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let (mut len, mut close) = (0usize, false);
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed in head"));
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').unwrap_or((l, ""));
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body)?;
            Ok((status, String::from_utf8_lossy(&body).into_owned(), close))
        })();
        match res {
            Ok((st, body, close)) => {
                if close {
                    self.conn = None;
                }
                Ok((st, body))
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    /// One publish of `{"s": seq}` into `room`.
    pub fn publish(&mut self, room: &str, seq: u64) -> Outcome {
        let body = json!({"room": room, "data": {"s": seq}}).to_string();
        match self.post("/api/publish", &body) {
            Ok((200, reply)) => {
                let v: Value = serde_json::from_str(&reply).unwrap_or(Value::Null);
                match (v["epoch"].as_str(), v["offset"].as_u64()) {
                    (Some(e), Some(o)) => Outcome::Acked(e.to_string(), o),
                    _ => Outcome::Unknown,
                }
            }
            Ok((503, _)) => Outcome::Refused,
            _ => Outcome::Unknown,
        }
    }
}

/// The per-room sequence numbers, shared by every publisher thread.
pub struct Seqs(pub Vec<AtomicU64>);

impl Seqs {
    pub fn new(rooms: usize) -> Seqs {
        Seqs((0..rooms).map(|_| AtomicU64::new(1)).collect())
    }
    pub fn next(&self, room: usize) -> u64 {
        self.0[room].fetch_add(1, Ordering::Relaxed)
    }
}

/// Records an outcome; returns the position when acked.
pub fn account(ctx: &Ctx, room: usize, seq: u64, out: Outcome) -> Option<(String, u64)> {
    match out {
        Outcome::Acked(e, o) => {
            ctx.stats.published_acked.fetch_add(1, Ordering::Relaxed);
            let (_, lie) = ctx.record(room, &e, o, seq, Origin::Ack);
            if let Some((kind, what)) = lie {
                ctx.violation(kind, usize::MAX, room, format!("publisher's ack: {what}"), Vec::new());
            }
            Some((e, o))
        }
        Outcome::Refused => {
            ctx.stats.published_refused.fetch_add(1, Ordering::Relaxed);
            None
        }
        Outcome::Unknown => {
            ctx.stats.published_unknown.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// One publisher thread: `rate` publishes a second, rooms in turn (offset
/// by `index`), to node `index` first and the next one whenever a publish
/// fails, until `stop`.
pub fn run(index: usize, ports: Vec<u16>, rate: f64, ctx: Arc<Ctx>, seqs: Arc<Seqs>, stop: Arc<AtomicBool>) {
    let mut http: Vec<Http> = ports.iter().map(|&p| Http::new(p)).collect();
    let mut node = index % ports.len();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let rooms = ctx.rooms.len();
    let mut k = index * 7;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            // Far behind (a node stalled us): do not burst to catch up.
            ctx.stats.publisher_lag_resets.fetch_add(1, Ordering::Relaxed);
            next = now;
        }
        next += interval;
        let room = k % rooms;
        k += 1;
        let seq = seqs.next(room);
        let out = http[node].publish(&ctx.rooms[room], seq);
        let failed = !matches!(out, Outcome::Acked(..));
        account(&ctx, room, seq, out);
        if failed {
            node = (node + 1) % ports.len();
        }
    }
}
