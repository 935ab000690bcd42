//! One hostile client against a default node, attack by attack (issue:
//! "a public node that one hostile client cannot hurt"): each test makes a
//! single client try to pin memory, descriptors or its shard, and checks
//! from outside (`/proc/<pid>`, `/metrics`, a second client's round trips)
//! that the node stays bounded and keeps serving everyone else.
//!
//! Memory bounds are generous (tens of MiB over a baseline, debug build) but
//! far below what the attacks would pin if unbounded (hundreds of MiB).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::priority::realtime;
use common::{Client, Raw, client_frame, http_at, start_server};
use serde_json::json;
use socket2::{Domain, Socket, Type};

/// The tests here measure other clients' round trips: they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What an attack may add to the node's RSS before the test calls it unbounded.
const RSS_SLACK_KIB: u64 = 48 * 1024;

/// A TCP connection whose receive buffer is as small as the kernel allows,
/// set before the handshake so the advertised window stays tiny: once its
/// buffer is full it advertises a zero window.
fn tiny_window(addr: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(1024).unwrap();
    s.connect(&addr.into()).unwrap();
    s.into()
}

/// The node's descriptor count once the sockets of earlier `/metrics`
/// scrapes (each a connection of its own, closed after the reply) are gone:
/// the lowest count seen over 300 ms.
fn settled_fds(s: &common::Server) -> usize {
    let t = Instant::now();
    let mut low = s.open_fds();
    while t.elapsed() < Duration::from_millis(300) {
        thread::sleep(Duration::from_millis(20));
        low = low.min(s.open_fds());
    }
    low
}

/// A client that sends a `ping` op every `PROBE_EVERY` on one thread,
/// whether or not the last was answered, and times each `pong` on another:
/// a shard held for a while shows as every ping sent meanwhile being late,
/// not as one slow sample.
struct Prober {
    stop: Arc<AtomicBool>,
    sender: thread::JoinHandle<Vec<Instant>>,
    receiver: thread::JoinHandle<Vec<(usize, Instant)>>,
}

/// 50 a second: well within the default op rate.
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// Round trips of one prober, sorted.
struct Rtts(Vec<Duration>);

impl Rtts {
    fn worst(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }
    /// The 99th percentile: the round trip that all but 1% stayed within.
    fn p99(&self) -> Duration {
        self.0.get(self.0.len() * 99 / 100).copied().unwrap_or_default()
    }
    /// That another client on the attacked shard was served throughout: at
    /// most 2% of round trips (at least one allowed) over 50 ms, and none
    /// over 1 s. Pings go out on a clock, so a shard held for a time makes
    /// every ping of that time late: a hold of more than 2% of the run (or
    /// of two probe intervals) fails. The worst gets a
    /// margin, since on this shared 2-core box a moment of CPU taken by
    /// other processes lands on one sample or two (seen up to ~0.6 s at a
    /// load average of 6; a few ms when the box is quiet). Before
    /// `Shard::yield_now` parked its waker instead of waking itself, the
    /// epoll driver let a ping flood hold the shard for the whole flood
    /// (1.1-1.6 s).
    fn assert_served(&self, what: &str) {
        assert!(self.0.len() > 10, "{what}: the prober ran only {} round trips", self.0.len());
        let slow = self.0.iter().filter(|d| **d > Duration::from_millis(50)).count();
        assert!(
            slow <= (self.0.len() / 50).max(1),
            "{what}: {slow} of {} round trips over 50 ms: {:?}",
            self.0.len(),
            self.0
        );
        assert!(self.worst() < Duration::from_secs(1), "{what}: a round trip took {:?}", self.worst());
    }
}

impl std::fmt::Display for Rtts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slow = self.0.iter().filter(|d| **d > Duration::from_millis(50)).count();
        write!(f, "p99 {:?}, worst {:?} over {} ({slow} over 50 ms)", self.p99(), self.worst(), self.0.len())
    }
}

impl Prober {
    fn start(url: &str) -> Prober {
        let addr: SocketAddr = url.trim_start_matches("ws://").split('/').next().unwrap().parse().unwrap();
        let path = &url[url.find("/ws").expect("a /ws url")..];
        let mut raw = Raw::upgrade(addr, path);
        let mut out = raw.s.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let sender = thread::spawn(move || {
            realtime();
            let mut sent = Vec::new();
            while !st.load(Ordering::Relaxed) {
                let op = format!(r#"{{"op":"ping","id":{}}}"#, sent.len());
                sent.push(Instant::now());
                out.write_all(&client_frame(0x81, op.as_bytes(), true)).expect("prober write");
                thread::sleep(PROBE_EVERY);
            }
            sent
        });
        let st = stop.clone();
        let receiver = thread::spawn(move || {
            realtime();
            raw.s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let (mut got, mut buf, mut b) = (Vec::new(), Vec::<u8>::new(), [0u8; 4096]);
            let mut stopped_at: Option<Instant> = None;
            loop {
                match raw.s.read(&mut b) {
                    Ok(0) => panic!("the prober's connection ended"),
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(e) => panic!("prober read: {e}"),
                }
                // Server frames: unmasked, and a pong is under 126 bytes.
                while buf.len() >= 2 && buf.len() >= 2 + (buf[1] & 0x7f) as usize {
                    let len = (buf[1] & 0x7f) as usize;
                    let v: serde_json::Value = serde_json::from_slice(&buf[2..2 + len]).expect("JSON");
                    assert_eq!(v["ev"], "pong", "{v}");
                    got.push((v["id"].as_u64().expect("id") as usize, Instant::now()));
                    buf.drain(..2 + len);
                }
                if st.load(Ordering::Relaxed) {
                    // After the stop, a moment for the stragglers.
                    if stopped_at.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
            }
            got
        });
        Prober { stop, sender, receiver }
    }

    /// Stops, waits for the answers, and returns the round trips, sorted.
    /// A ping never answered counts as the time since it was sent.
    fn finish(self) -> Rtts {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.join().expect("prober sender");
        let got = self.receiver.join().expect("prober receiver");
        let mut v: Vec<Duration> = sent.iter().map(|t| t.elapsed()).collect();
        for (id, at) in got {
            if let Some(t) = sent.get(id) {
                v[id] = at.duration_since(*t);
            }
        }
        v.sort();
        Rtts(v)
    }
}

/// A connection waiting for the rest of its request head holds its one
/// descriptor, nothing more (the read waits through the shard's poller):
/// a reconnect storm's handshakes cost one descriptor each.
#[test]
fn connections_mid_handshake_hold_one_descriptor_each() {
    let _one_at_a_time = serial();
    let s = start_server(&["--shards", "2", "--max-accepts-per-sec", "0"]);
    let baseline = settled_fds(&s);
    let sockets = s.metric("corecast_sockets");
    let half: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut t = TcpStream::connect(s.addr).unwrap();
            t.write_all(b"GET /ws?user=x HTTP/1.1\r\nHost: x\r\n").unwrap();
            t
        })
        .collect();
    s.wait_until("100 more sockets", || s.metric("corecast_sockets") >= sockets + 100.0);
    // The reads have begun and wait: give every one its turn.
    thread::sleep(Duration::from_millis(200));
    let held = settled_fds(&s);
    assert!(held <= baseline + 100 + 2, "{held} descriptors for 100 handshakes, baseline {baseline}");
    // And they still complete.
    for mut t in half {
        t.write_all(b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
        let mut buf = [0u8; 12];
        t.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"HTTP/1.1 101");
    }
}

#[test]
fn zero_window_subscribers_are_cut_off_and_their_descriptors_come_back() {
    let _one_at_a_time = serial();
    let s = start_server(&[
        "--shards",
        "2",
        "--outbound-queue-bytes",
        "65536",
        "--max-message-bytes",
        "16384",
        "--max-ops-per-sec",
        "0",
    ]);
    let mut reader = Client::connect(&s.ws_url("/ws?user=reader"));
    reader.subscribe("flood");
    let mut publisher = Client::connect(&s.ws_url("/ws?user=pub"));
    s.wait_until("2 connections", || s.metric("corecast_connections") == 2.0);
    let baseline = settled_fds(&s);
    // 200 subscribers that never read, behind a tiny window.
    let mut slow: Vec<Raw> = (0..200)
        .map(|i| {
            let mut r = Raw::upgrade_on(tiny_window(s.addr), &format!("/ws?user=slow{i}"));
            r.send_frame(0x81, br#"{"op":"subscribe","room":"flood","id":1}"#, true);
            r
        })
        .collect();
    s.wait_until("200 more subscribers", || s.metric("corecast_messages_in_total") >= 201.0);
    s.wait_until("200 more descriptors", || s.open_fds() == baseline + 200);
    // Flood the room in batches the reading client takes in as it goes; it
    // must get every message, in order.
    let pad = "f".repeat(2000);
    let (batch, mut sent) = (16, 0u64);
    let t = Instant::now();
    // One descriptor per connection while their sockets are full (the
    // writer waits through the shard's poller, not on a second one); the
    // scrapes of this loop are a connection each, closed after the reply.
    let (mut peak, mut full) = (0, 0.0f64);
    while s.metric("corecast_slow_consumer_disconnects_total") < 200.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "slow subscribers were not all cut off");
        peak = peak.max(s.open_fds());
        full = full.max(s.metric("corecast_full_sockets"));
        for _ in 0..batch {
            publisher.send_json(&json!({"op":"publish","room":"flood","data":{"i":sent,"pad":pad}}));
            sent += 1;
        }
        for k in (sent - batch)..sent {
            let m = reader.recv();
            assert_eq!(m["data"]["i"], json!(k), "the reading client gets everything, in order");
        }
    }
    assert!(full >= 20.0, "too few sockets were ever full at once ({full}): the peak below shows nothing");
    assert!(peak <= baseline + 200 + 4, "{peak} descriptors with {full} full sockets, baseline {baseline} + 200");
    // Within 5 s every cut-off socket is closed: descriptors back to the
    // baseline, and the socket gauge agrees with the connection gauge.
    let t = Instant::now();
    while s.open_fds() > baseline {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "descriptors: {} open, baseline {baseline}, after {:?}",
            s.open_fds(),
            t.elapsed()
        );
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "FIGURE zero-window: 200 cut off after {sent} messages; at most {full} sockets full at once and \
         {peak} descriptors (baseline {baseline}); back to baseline in {:?}",
        t.elapsed()
    );
    let m = s.metrics();
    let conns = common::metric_in(&m, "corecast_connections").unwrap();
    let sockets = common::metric_in(&m, "corecast_sockets").unwrap();
    assert_eq!(conns, 2.0, "{m}");
    // The scrape's own socket is the one more.
    assert_eq!(sockets, conns + 1.0, "sockets and connections agree");
    // The attackers see their connections end (reset or FIN), never hang.
    for r in slow.iter_mut().take(5) {
        r.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        r.expect_eof();
    }
    assert_eq!(publisher.call(json!({"op":"ping","id":1})), json!({"ev":"pong","id":1}));
}

#[test]
fn ping_flood_without_reading_is_cut_off_and_memory_stays_bounded() {
    let _one_at_a_time = serial();
    let s = start_server(&["--shards", "1"]);
    let base = s.rss_kib();
    let mut attacker = Raw::upgrade_on(tiny_window(s.addr), "/ws?user=attacker");
    let ping = client_frame(0x89, &[b'p'; 125], true);
    let chunk: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 512).collect();
    attacker.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let t = Instant::now();
    let mut written = 0usize;
    // Up to 200 MiB of pings, never reading a pong.
    let cut = loop {
        if written > 200 << 20 || t.elapsed() > Duration::from_secs(20) {
            break false;
        }
        match attacker.s.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
    };
    assert!(cut, "the ping flood was not cut off ({written} bytes written)");
    eprintln!(
        "FIGURE ping flood (default rate): cut off after {:?}, {} KiB written; RSS {base} -> {} KiB",
        t.elapsed(),
        written / 1024,
        s.rss_kib()
    );
    s.wait_until("flood counted", || s.metric("corecast_control_rate_limited_total") > 0.0);
    assert_eq!(s.metric("corecast_rate_limit_disconnects_total"), 1.0);
    let grown = s.rss_kib().saturating_sub(base);
    assert!(grown < RSS_SLACK_KIB, "RSS grew by {grown} KiB");
    let mut other = Client::connect(&s.ws_url("/ws?user=other"));
    assert_eq!(other.call(json!({"op":"ping","id":2})), json!({"ev":"pong","id":2}));
}

#[test]
fn ping_flood_with_no_rate_limit_queues_one_pong() {
    let _one_at_a_time = serial();
    // Without an op rate the flood is not cut off, but it can queue one pong.
    let s = start_server(&["--shards", "1", "--max-ops-per-sec", "0"]);
    let prober = Prober::start(&s.ws_url("/ws?user=prober"));
    let base = s.rss_kib();
    let mut attacker = Raw::upgrade_on(tiny_window(s.addr), "/ws?user=attacker");
    let ping = client_frame(0x89, &[b'p'; 125], true);
    let chunk: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 512).collect();
    attacker.s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    let t = Instant::now();
    let mut written = 0usize;
    while written < 100 << 20 && t.elapsed() < Duration::from_secs(15) {
        if let Ok(n) = attacker.s.write(&chunk) {
            written += n;
        }
    }
    assert!(written > 8 << 20, "the server stopped reading the pings: only {written} bytes taken");
    eprintln!(
        "FIGURE ping flood (no rate limit): {} MiB of pings in {:?}, {} pongs coalesced; RSS {base} -> {} KiB",
        written >> 20,
        t.elapsed(),
        s.metric("corecast_pongs_coalesced_total"),
        s.rss_kib()
    );
    assert!(s.metric("corecast_pongs_coalesced_total") > 1000.0, "pongs were coalesced");
    let grown = s.rss_kib().saturating_sub(base);
    assert!(grown < RSS_SLACK_KIB, "RSS grew by {grown} KiB after {written} bytes of pings");
    let rtts = prober.finish();
    eprintln!("FIGURE ping flood (no rate limit): other client's round trips {rtts}");
    rtts.assert_served("ping flood");
}

#[test]
fn pipelined_http_without_reading_holds_one_response_and_the_shard_keeps_serving() {
    let _one_at_a_time = serial();
    let s = start_server(&["--shards", "1", "--handshake-timeout-secs", "3"]);
    let prober = Prober::start(&s.ws_url("/ws?user=prober"));
    let base = s.rss_kib();
    let mut attacker = TcpStream::connect(s.addr).unwrap();
    attacker.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let one = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let chunk: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
    // 100k of each, never reading; the writes block once the node stops reading.
    let t = Instant::now();
    let mut sent = 0usize;
    // When a write last made progress, and when one failed (the node dropped us).
    let mut progressed = t;
    let mut ended = None;
    while sent < 100_000 && t.elapsed() < Duration::from_secs(20) {
        match attacker.write(&chunk) {
            Ok(n) => {
                sent += n / one.len();
                progressed = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => {
                ended = Some((Instant::now(), e));
                break;
            }
        }
    }
    // On loopback the socket buffers may take every request (several MB)
    // without a write failing: then poke with a few bytes (never read by the
    // node, which is stuck flushing) until a write fails.
    let bulk_end = Instant::now();
    while ended.is_none() && bulk_end.elapsed() < Duration::from_secs(10) {
        match attacker.write(b"\r\n") {
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => ended = Some((Instant::now(), e)),
        }
    }
    let served = s.metric("corecast_http_requests_total");
    eprintln!("FIGURE pipelined: {sent} requests written, {served} answered; RSS {base} -> {} KiB", s.rss_kib());
    assert!(served < 10_000.0, "the node kept answering a client that never reads: {served} requests");
    let grown = s.rss_kib().saturating_sub(base);
    assert!(grown < RSS_SLACK_KIB, "RSS grew by {grown} KiB");
    // The handshake timeout (3 s) covers the flush of a response: the
    // attacker is dropped (a write fails with a reset / broken pipe) once it
    // has not read for that long. The node's flush was stuck by the time the
    // bulk writes ended (it answered a few hundred of 100k), and a blocked
    // write notices within its 1 s timeout: 3 + 1 s, and 1 s of slack.
    let (at, e) = ended.unwrap_or_else(|| panic!("the attacker was never dropped ({:?} of writing)", t.elapsed()));
    assert!(
        matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
        "the attacker's write failed with {e}"
    );
    let after = at.saturating_duration_since(progressed);
    eprintln!("FIGURE pipelined: dropped {after:?} after the writes ended or stalled");
    assert!(after <= Duration::from_secs(3 + 1 + 1), "dropped only {after:?} after the writes ended or stalled");
    let rtts = prober.finish();
    eprintln!("FIGURE pipelined: other client's round trips {rtts}");
    rtts.assert_served("pipelined requests");
}

#[test]
fn endless_http_head_is_refused_at_the_limit_with_memory_bounded() {
    let _one_at_a_time = serial();
    let s = start_server(&["--shards", "1"]);
    let prober = Prober::start(&s.ws_url("/ws?user=prober"));
    let base = s.rss_kib();
    let mut attacker = TcpStream::connect(s.addr).unwrap();
    attacker.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    attacker.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ").unwrap();
    let chunk = vec![b'a'; 1 << 20];
    let mut reader = attacker.try_clone().unwrap();
    let response = thread::spawn(move || {
        reader.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = [0u8; 12];
        reader.read_exact(&mut head).map(|_| head.to_vec())
    });
    let t = Instant::now();
    let mut written = 0usize;
    while written < 64 << 20 && t.elapsed() < Duration::from_secs(10) {
        match attacker.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    let head = response.join().unwrap().expect("a response before the close");
    assert_eq!(&head, b"HTTP/1.1 431", "{}", String::from_utf8_lossy(&head));
    eprintln!("FIGURE endless head: 431 after {} KiB written; RSS {base} -> {} KiB", written / 1024, s.rss_kib());
    let grown = s.rss_kib().saturating_sub(base);
    assert!(grown < RSS_SLACK_KIB, "RSS grew by {grown} KiB after {written} bytes of head");
    // Keep probing while the node lingers over the rest of the flood.
    thread::sleep(Duration::from_secs(1));
    let rtts = prober.finish();
    eprintln!("FIGURE endless head: other client's round trips {rtts}");
    rtts.assert_served("endless head");
}

#[test]
fn endless_http_body_is_refused_at_the_limit() {
    let _one_at_a_time = serial();
    let s = start_server(&["--shards", "1"]);
    let base = s.rss_kib();
    for head in [
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        let mut attacker = TcpStream::connect(s.addr).unwrap();
        attacker.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        attacker.write_all(head.as_bytes()).unwrap();
        let mut reader = attacker.try_clone().unwrap();
        let response = thread::spawn(move || {
            reader.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut status = [0u8; 12];
            reader.read_exact(&mut status).map(|_| status.to_vec())
        });
        let chunk = vec![b'{'; 1 << 20];
        let t = Instant::now();
        let mut written = 0usize;
        while written < 32 << 20 && t.elapsed() < Duration::from_secs(5) {
            match attacker.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        let status = response.join().unwrap().expect("a response");
        let want: &[u8] = if head.contains("chunked") { b"HTTP/1.1 411" } else { b"HTTP/1.1 413" };
        assert_eq!(&status[..], want, "{}", String::from_utf8_lossy(&status));
    }
    let grown = s.rss_kib().saturating_sub(base);
    assert!(grown < RSS_SLACK_KIB, "RSS grew by {grown} KiB");
    assert_eq!(s.http_get("/healthz").0, 200);
}

#[test]
fn publish_api_is_403_with_jwt_auth_and_no_api_key() {
    let _one_at_a_time = serial();
    let s = start_server(&["--jwt-secret", "s3cret"]);
    let (st, body) = s.http("POST", "/api/publish", &[], br#"{"room":"r","data":1}"#);
    assert_eq!(st, 403, "{body}");
    // With a key it is the key that decides.
    let s = start_server(&["--jwt-secret", "s3cret", "--api-key", "k"]);
    assert_eq!(s.http("POST", "/api/publish", &[], br#"{"room":"r","data":1}"#).0, 401);
    let auth = [("Authorization", "Bearer k")];
    assert_eq!(s.http("POST", "/api/publish", &auth, br#"{"room":"r","data":1}"#).0, 200);
}

#[test]
fn admin_listener_serves_metrics_and_publish_and_the_client_port_does_not() {
    let _one_at_a_time = serial();
    let s = start_server(&["--admin-listen", "127.0.0.1:0", "--api-key", "k"]);
    let admin = s.admin.expect("admin address printed");
    assert_ne!(admin, s.addr);
    let auth = [("Authorization", "Bearer k")];
    let body = br#"{"room":"news","data":{"n":1}}"#;
    // Client port: no /metrics, no /api/publish.
    assert_eq!(s.http_get("/metrics").0, 404);
    assert_eq!(s.http("POST", "/api/publish", &auth, body).0, 404);
    assert_eq!(s.http_get("/healthz").0, 200);
    // Admin port: both, plus health; no WebSockets and no demo page.
    let mut sub = Client::connect(&s.ws_url("/ws?user=u"));
    sub.subscribe("news");
    let (st, m) = http_at(admin, "GET", "/metrics", &[], b"");
    assert_eq!(st, 200);
    assert!(m.contains("corecast_connections 1"), "{m}");
    assert_eq!(http_at(admin, "POST", "/api/publish", &auth, body).0, 200);
    let got = sub.recv();
    assert_eq!(got["from"], "server");
    assert_eq!(got["data"], json!({"n":1}));
    assert_eq!(http_at(admin, "GET", "/readyz", &[], b"").0, 200);
    assert_eq!(http_at(admin, "GET", "/", &[], b"").0, 404);
    let (st, _) = http_at(
        admin,
        "GET",
        "/ws",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        b"",
    );
    assert_eq!(st, 404, "no WebSockets on the admin port");
}

#[test]
fn a_close_that_is_never_answered_is_reaped() {
    let _one_at_a_time = serial();
    // One op per second: the third op in a burst is refused, and after 50
    // refusals the node closes with 1008 and waits for the answer.
    let s = start_server(&["--shards", "1", "--max-ops-per-sec", "1"]);
    let mut r = Raw::upgrade(s.addr, "/ws?user=stubborn");
    for _ in 0..60 {
        r.send_frame(0x81, br#"{"op":"ping"}"#, true);
    }
    assert_eq!(r.expect_close_code(), 1008);
    // The client never answers the close but keeps sending: within the
    // close timeout (5 s) the node cuts it off.
    r.s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let t = Instant::now();
    loop {
        if r.s.write_all(&client_frame(0x81, br#"{"op":"ping"}"#, true)).is_err() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(12), "the unanswered close was never reaped");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(t.elapsed() >= Duration::from_secs(3), "cut off before the close timeout: {:?}", t.elapsed());
    assert_eq!(s.metric("corecast_close_timeouts_total"), 1.0);
    s.wait_until("socket closed", || s.metric("corecast_sockets") == 1.0);
}

#[test]
fn frames_sent_with_the_upgrade_request_are_handled_at_once() {
    let _one_at_a_time = serial();
    let s = start_server(&["--shards", "1"]);
    let mut st = TcpStream::connect(s.addr).unwrap();
    let mut bytes = common::upgrade_request("/ws?user=eager", "").into_bytes();
    bytes.extend(client_frame(0x81, br#"{"op":"ping","id":7}"#, true));
    st.write_all(&bytes).unwrap();
    // Nothing more is sent: the reply must come from the bytes already there.
    st.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    let want = br#"{"ev":"pong","id":7}"#;
    while !got.windows(want.len()).any(|w| w == want) {
        let n = st.read(&mut b).expect("the pong, without sending more");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
}

#[test]
fn a_stalled_shard_bounds_its_inbox_and_the_other_shard_keeps_serving() {
    let _one_at_a_time = serial();
    // A queue big enough for everything shard 1 is handed while stuck.
    let s = start_server(&[
        "--shards",
        "2",
        "--debug-hooks",
        "--max-ops-per-sec",
        "0",
        "--outbound-queue-bytes",
        "67108864",
    ]);
    // A keep-alive HTTP connection on shard 1: ask, then stall it there.
    let mut stall = loop {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.write_all(b"GET /debug/shard HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut b = [0u8; 512];
        let n = c.read(&mut b).unwrap();
        if String::from_utf8_lossy(&b[..n]).ends_with("\r\n\r\n1\n") {
            break c;
        }
    };
    // Subscribers on both shards, and a publisher on shard 0.
    let mut sub1 = s.client_on_shard(1, "sub1");
    sub1.subscribe("busy");
    let mut publisher = s.client_on_shard(0, "pub");
    let mut sub0 = s.client_on_shard(0, "sub0");
    sub0.subscribe("busy");
    let base = s.rss_kib();
    stall.write_all(b"GET /debug/stall?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    thread::sleep(Duration::from_millis(100));
    // Publish from shard 0 while shard 1 is stuck, 200 at a time: shard 1's
    // inbox fills to its publish limit, then publishes are refused with
    // `unavailable` (back-pressure) and shard 0 goes on serving.
    let data = "x".repeat(1000);
    let (mut acked, mut refused) = (0u32, 0u32);
    // The ids of the accepted publishes, in the order they were sent.
    let mut accepted = Vec::new();
    let t = Instant::now();
    let mut id = 0u64;
    while refused == 0 && t.elapsed() < Duration::from_secs(4) {
        for _ in 0..200 {
            id += 1;
            publisher.send_json(&json!({"op":"publish","room":"busy","data":{"n":id,"pad":data},"id":id}));
        }
        let mut batch = Vec::new();
        for _ in 0..200 {
            let r = publisher.recv();
            match r["ev"].as_str() {
                Some("ack") => batch.push(r["id"].as_u64().expect("ack id")),
                Some("error") if r["code"] == "unavailable" => refused += 1,
                _ => panic!("unexpected {r}"),
            }
        }
        acked += batch.len() as u32;
        // Shard 0's subscriber keeps receiving while shard 1 is stuck.
        for n in &batch {
            assert_eq!(sub0.recv()["data"]["n"], json!(n));
        }
        accepted.extend(batch);
    }
    assert!(refused > 0, "publishes were never refused ({acked} acked) while a shard was stuck");
    assert!(acked >= 8000, "back-pressure started early: {acked} acked");
    let m = s.metrics();
    let backlog = common::metric_in(&m, "corecast_inbox_backlog{shard=\"1\"}").unwrap();
    assert!(backlog <= 16_384.0, "{backlog}");
    let grown = s.rss_kib().saturating_sub(base);
    eprintln!(
        "FIGURE stalled shard: {acked} accepted, then {refused} refused with unavailable; backlog {backlog}; RSS +{grown} KiB"
    );
    assert!(grown < RSS_SLACK_KIB, "RSS grew by {grown} KiB");
    // Once the shard is back it delivers everything that was accepted, in order.
    for n in &accepted {
        let m = sub1.recv();
        assert_eq!((m["ev"].as_str(), &m["data"]["n"]), (Some("message"), &json!(n)), "in order");
    }
    sub1.expect_silence(Duration::from_millis(200));
    assert_eq!(s.metric("corecast_inbox_dropped_total"), 0.0, "nothing accepted was dropped");
}

#[test]
fn kills_from_inside_a_fan_out_and_a_heartbeat_sweep_leave_the_shard_serving() {
    let _one_at_a_time = serial();
    // One shard, so every kill below happens on the shard that serves the
    // others too: a fan-out cuts off zero-window subscribers while it walks
    // the room, and the heartbeat sweep cuts off silent ones while it walks
    // the connection table (the RefCell contract in src/shard/mod.rs).
    let s = start_server(&[
        "--shards",
        "1",
        "--heartbeat-secs",
        "2",
        "--outbound-queue-bytes",
        "32768",
        "--max-message-bytes",
        "16384",
        "--max-ops-per-sec",
        "0",
    ]);
    let mut reader = Client::connect(&s.ws_url("/ws?user=reader"));
    reader.subscribe("r");
    let mut publisher = Client::connect(&s.ws_url("/ws?user=pub"));
    let baseline = settled_fds(&s);
    // Silent subscribers: they read (so fan-out does not cut them off) but
    // never answer a ping, so only the sweep can end them.
    let silent: Vec<Raw> = (0..50)
        .map(|i| {
            let mut r = Raw::upgrade(s.addr, &format!("/ws?user=silent{i}"));
            r.send_frame(0x81, br#"{"op":"subscribe","room":"r"}"#, true);
            r
        })
        .collect();
    let drains: Vec<_> = silent
        .into_iter()
        .map(|mut r| {
            thread::spawn(move || {
                r.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut b = vec![0u8; 1 << 16];
                while matches!(r.s.read(&mut b), Ok(n) if n > 0) {}
            })
        })
        .collect();
    let _stuck: Vec<Raw> = (0..50)
        .map(|i| {
            let mut r = Raw::upgrade_on(tiny_window(s.addr), &format!("/ws?user=stuck{i}"));
            r.send_frame(0x81, br#"{"op":"subscribe","room":"r"}"#, true);
            r
        })
        .collect();
    s.wait_until("100 more subscribers", || s.metric("corecast_messages_in_total") >= 101.0);
    let pad = "k".repeat(1500);
    let t = Instant::now();
    let mut i = 0u64;
    // The stuck ones are silent too: either walk may end them first, but
    // the flood (flat out until they are cut off) beats 2 intervals.
    let cut = || s.metric("corecast_heartbeat_timeouts_total") + s.metric("corecast_slow_consumer_disconnects_total");
    while cut() < 100.0 || s.metric("corecast_heartbeat_timeouts_total") < 50.0 {
        let flat_out = s.metric("corecast_slow_consumer_disconnects_total") < 50.0;
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not every attacker was cut off: {} by the sweep, {} in fan-out",
            s.metric("corecast_heartbeat_timeouts_total"),
            s.metric("corecast_slow_consumer_disconnects_total")
        );
        for _ in 0..8 {
            publisher.send_json(&json!({"op":"publish","room":"r","data":{"i":i,"pad":pad}}));
            i += 1;
        }
        for k in (i - 8)..i {
            assert_eq!(reader.recv()["data"]["i"], json!(k));
        }
        if !flat_out {
            thread::sleep(Duration::from_millis(20));
        }
    }
    s.wait_until("descriptors back", || s.open_fds() <= baseline);
    for d in drains {
        d.join().unwrap();
    }
    assert_eq!(publisher.call(json!({"op":"ping","id":9})), json!({"ev":"pong","id":9}));
    assert_eq!(s.metric("corecast_connections"), 2.0);
    assert!(s.metric("corecast_slow_consumer_disconnects_total") > 0.0, "some were cut off inside a fan-out");
}
