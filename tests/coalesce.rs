//! `--write-delay-ms auto`, the default (`src/conn/flush.rs`): the flusher
//! holds busy connections only while its shard is behind. At light load
//! every frame leaves in its own write, at once; under saturation busy
//! connections are held and several frames leave per write; either way
//! every member gets every message, once, in order. `--write-delay-ms 0`
//! never holds. Judged from `/metrics` counters, never from timings.

mod common;

use std::time::{Duration, Instant};

use common::{Raw, Server, client_frame, metric_in, start_server};
use serde_json::{Value, json};

/// The counters these tests judge by, read from one scrape.
#[derive(Debug, Clone, Copy)]
struct Counts {
    /// Frames queued to clients.
    out: f64,
    /// Writes to client sockets.
    writes: f64,
    held: f64,
    entries: f64,
    coalescing: f64,
}

fn counts(s: &Server) -> Counts {
    let text = s.metrics();
    let m = |name: &str| metric_in(&text, name).unwrap_or_else(|| panic!("no {name}"));
    Counts {
        out: m("corecast_messages_out_total"),
        writes: m("corecast_socket_writes_total"),
        held: m("corecast_writes_held_total"),
        entries: m("corecast_coalescing_entries_total"),
        coalescing: m("corecast_coalescing"),
    }
}

/// A raw WebSocket subscribed to `room`.
fn member(s: &Server, user: &str, room: &str) -> Raw {
    let mut c = Raw::upgrade(s.addr, &format!("/ws?user={user}"));
    c.send_frame(0x81, json!({"op":"subscribe","room":room,"id":"s"}).to_string().as_bytes(), true);
    let (_, p) = c.read_frame().expect("the subscribe reply");
    let v: Value = serde_json::from_slice(&p).unwrap();
    assert_eq!(v["ev"], "subscribed", "{v}");
    c
}

/// A client's publish of `data` to `room` as a WebSocket frame (no id: no
/// reply, so the only frames written are the deliveries).
fn publish(room: &str, data: &Value) -> Vec<u8> {
    client_frame(0x81, json!({"op":"publish","room":room,"data":data}).to_string().as_bytes(), true)
}

/// The next message's `data`.
fn next_data(c: &mut Raw) -> Value {
    let (b0, p) = c.read_frame().expect("a frame before EOF");
    assert_eq!(b0, 0x81, "a text frame");
    let v: Value = serde_json::from_slice(&p).unwrap();
    assert_eq!(v["ev"], "message", "{v}");
    v["data"].clone()
}

/// A room of 50 at 20 msg/s, for 2 s: the shard is idle most of the time,
/// so nothing is held and every frame leaves in its own write.
#[test]
fn at_light_load_nothing_is_held_and_every_frame_leaves_at_once() {
    const MEMBERS: usize = 50;
    const MESSAGES: usize = 40;
    let s = start_server(&["--shards", "1", "--max-ops-per-sec", "0"]);
    let mut cs: Vec<Raw> = (0..MEMBERS).map(|i| member(&s, &format!("m{i}"), "chat")).collect();
    let mut publisher = Raw::upgrade(s.addr, "/ws?user=pub");
    let before = counts(&s);
    for n in 0..MESSAGES {
        std::io::Write::write_all(&mut publisher.s, &publish("chat", &json!({"n": n}))).unwrap();
        // Member 0 has it before the next is sent: each message is its own
        // pass of the flusher, which writes all 50 members (one batch).
        assert_eq!(next_data(&mut cs[0])["n"], n);
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, c) in cs.iter_mut().enumerate().skip(1) {
        for n in 0..MESSAGES {
            assert_eq!(next_data(c)["n"], n, "member {i}: in order, once");
        }
    }
    let after = counts(&s);
    eprintln!("light load: {before:?} -> {after:?}");
    assert_eq!(after.held, before.held, "a frame was held at light load");
    assert_eq!(after.entries, before.entries, "the shard called itself behind at light load");
    assert_eq!(after.coalescing, 0.0);
    // One write per delivery at least (the scrapes' replies add theirs): no
    // frame waited for another.
    let deliveries = (MEMBERS * MESSAGES) as f64;
    assert!(after.out - before.out >= deliveries, "{before:?} -> {after:?}");
    assert!(after.writes - before.writes >= deliveries, "fewer writes than deliveries: {before:?} -> {after:?}");
}

/// A member's fast reader: frames parsed in place from a cursor into one
/// buffer (`Raw::read_frame` moves the buffer down for each frame), the
/// message's number found without a JSON parse, so that 200 readers keep
/// up with the node on two cores.
struct Fast {
    s: std::net::TcpStream,
    buf: Vec<u8>,
    at: usize,
    end: usize,
}

impl Fast {
    /// Takes over `c`'s socket: nothing must have arrived since its last frame.
    fn new(c: Raw) -> Fast {
        Fast { s: c.s, buf: vec![0; 1 << 20], at: 0, end: 0 }
    }

    /// The next message's payload.
    fn next(&mut self) -> &[u8] {
        loop {
            let b = &self.buf[self.at..self.end];
            if b.len() >= 2 {
                assert_eq!(b[0], 0x81, "a text frame");
                let (len, h) = match b[1] {
                    126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                    126 => (usize::MAX, 0),
                    n if n < 126 => (n as usize, 2),
                    n => panic!("unexpected length byte {n}"),
                };
                if len != usize::MAX && b.len() >= h + len {
                    let start = self.at + h;
                    self.at = start + len;
                    return &self.buf[start..start + len];
                }
            }
            if self.at > 0 {
                self.buf.copy_within(self.at..self.end, 0);
                (self.end, self.at) = (self.end - self.at, 0);
            }
            let n = std::io::Read::read(&mut self.s, &mut self.buf[self.end..]).expect("read");
            assert!(n > 0, "EOF");
            self.end += n;
        }
    }
}

/// The number after `key` in a payload (`{"...":{"n":12}}`), if there.
fn number_after(p: &[u8], key: &[u8]) -> Option<u64> {
    let i = p.windows(key.len()).rposition(|w| w == key)? + key.len();
    let digits = p[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&p[i..i + digits]).ok()?.parse().ok()
}

/// Publisher threads, each posting to `/api/publish` as fast as the node
/// answers. Each post is a new connection, never held (it was never
/// written before), so holds do not slow the publishers down; with four,
/// the shard always has the next post waiting while it serves one.
const PUBLISHERS: u64 = 4;

/// A room of 200 members (one reader thread each) and `PUBLISHERS`
/// publishing as fast as they can for 2 s, then an end marker. Every member
/// checks it got every message once, each publisher's in order. Returns
/// the counters before and after, and the messages sent.
fn saturate(extra: &[&str]) -> (Counts, Counts, u64) {
    const MEMBERS: usize = 200;
    let mut args = vec!["--shards", "1", "--max-ops-per-sec", "0"];
    args.extend_from_slice(extra);
    let s = start_server(&args);
    let readers: Vec<_> = (0..MEMBERS)
        .map(|i| {
            let mut c = Fast::new(member(&s, &format!("m{i}"), "big"));
            std::thread::spawn(move || {
                let mut next = [0u64; PUBLISHERS as usize];
                loop {
                    let p = c.next();
                    if let Some(end) = number_after(p, br#""end":"#) {
                        assert_eq!(end, next.iter().sum::<u64>(), "member {i}: every message, once: {next:?}");
                        return end;
                    }
                    let (t, n) = (number_after(p, br#""t":"#), number_after(p, br#""n":"#));
                    let t = t.unwrap_or_else(|| panic!("member {i}: {}", String::from_utf8_lossy(p))) as usize;
                    assert_eq!(n, Some(next[t]), "member {i}: publisher {t}'s in order, once");
                    next[t] += 1;
                }
            })
        })
        .collect();
    let before = counts(&s);
    let start = Instant::now();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|t| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut n = 0u64;
                while start.elapsed() < Duration::from_secs(2) {
                    let body = json!({"room":"big","data":{"t":t,"n":n}}).to_string();
                    let (st, reply) = common::http_at(addr, "POST", "/api/publish", &[], body.as_bytes());
                    assert_eq!(st, 200, "{reply}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let sent: u64 = publishers.into_iter().map(|p| p.join().expect("a publisher failed")).sum();
    let body = json!({"room":"big","data":{"end":sent}}).to_string();
    assert_eq!(s.http("POST", "/api/publish", &[], body.as_bytes()).0, 200);
    for r in readers {
        assert_eq!(r.join().expect("a member's reader failed"), sent);
    }
    let after = counts(&s);
    if extra.is_empty() {
        // Quiet again: the shard stops holding within a window or two.
        s.wait_until("the shard no longer behind", || counts(&s).coalescing == 0.0);
    }
    (before, after, sent)
}

/// Under saturation the default holds busy connections: the shard fell
/// behind (`corecast_coalescing_entries_total`), connections were held, and
/// frames left several per write, more than with `--write-delay-ms 0` under
/// the same load (which holds nothing and is never called behind); nothing
/// was lost or reordered (checked by every member). Once the load stops the
/// gauge drops back to 0. One test, so that the two runs do not share the
/// cores.
#[test]
fn under_saturation_busy_connections_are_held_and_frames_leave_several_per_write() {
    let (before, after, sent) = saturate(&[]);
    let (out, writes) = (after.out - before.out, after.writes - before.writes);
    eprintln!(
        "auto: {sent} messages, {out} frames in {writes} writes ({:.2} per write); {before:?} -> {after:?}",
        out / writes
    );
    let (b0, a0, sent0) = saturate(&["--write-delay-ms", "0"]);
    let (out0, writes0) = (a0.out - b0.out, a0.writes - b0.writes);
    eprintln!(
        "off: {sent0} messages, {out0} frames in {writes0} writes ({:.2} per write); {b0:?} -> {a0:?}",
        out0 / writes0
    );
    assert!(sent > 0 && sent0 > 0);
    assert!(after.entries > before.entries, "the shard never fell behind: {before:?} -> {after:?}");
    assert!(after.held > before.held, "nothing was held: {before:?} -> {after:?}");
    assert!(out > 1.5 * writes, "{out} frames in {writes} writes");
    assert_eq!((a0.held, a0.entries, a0.coalescing), (0.0, 0.0, 0.0), "--write-delay-ms 0 held: {a0:?}");
    assert!(out / writes > out0 / writes0, "no more frames per write than without holds");
}

/// `corecast_coalescing` at rest: 0 by default (a shard with nothing to
/// do is not behind) and with `0`, 1 with a fixed delay, which always holds.
#[test]
fn the_coalescing_gauge_says_whether_the_flusher_holds() {
    for (args, want) in [(&[][..], 0.0), (&["--write-delay-ms", "0"][..], 0.0), (&["--write-delay-ms", "5"][..], 1.0)] {
        let s = start_server(&[&["--shards", "2"][..], args].concat());
        s.wait_until("the flushers started", || counts(&s).coalescing == 2.0 * want);
        // Some traffic, then still the same.
        let mut c = member(&s, "u", "r");
        c.send_frame(0x81, json!({"op":"publish","room":"r","data":1}).to_string().as_bytes(), true);
        assert_eq!(next_data(&mut c), json!(1));
        let n = counts(&s);
        assert_eq!((n.coalescing, n.entries), (2.0 * want, 0.0), "{args:?}: {n:?}");
    }
}
