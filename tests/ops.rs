//! Operations, on real processes: readiness that means "this node can serve"
//! (a degraded Redis within `--ready-grace-secs`), `/healthz` that sees a
//! stalled shard whichever shard answers, the descriptor count in
//! `/metrics`, the cap on HTTP-phase sockets (`--max-handshakes-per-shard`),
//! the panic policy (a connection's panic costs that connection only; any
//! other panic ends the node at once) and throttled warnings.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::redis::{RedisServer, deadline, expect_event, wait_until};
use common::{Client, Server, http_at, metric_in, start_server};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

/// An HTTP/1.1 connection kept alive across requests (one shard serves all
/// of them: the one the kernel gave the socket to).
struct KeepAlive {
    s: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    fn connect(addr: SocketAddr) -> KeepAlive {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(15 * SECOND)).unwrap();
        KeepAlive { s, buf: Vec::new() }
    }

    fn send(&mut self, path: &str) {
        write!(self.s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    }

    /// Reads one response (head + Content-Length body).
    fn response(&mut self) -> (u16, String) {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).to_string();
                    self.buf.drain(..end + 4 + len);
                    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                    return (status, body);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).expect("read a response");
            assert!(n > 0, "the server closed a kept-alive connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn get(&mut self, path: &str) -> (u16, String) {
        self.send(path);
        self.response()
    }
}

/// A kept-alive connection that shard `shard` serves (found by asking
/// `/debug/shard` on fresh connections).
fn keep_alive_on(addr: SocketAddr, shard: usize) -> KeepAlive {
    for _ in 0..200 {
        let mut c = KeepAlive::connect(addr);
        if c.get("/debug/shard") == (200, format!("{shard}\n")) {
            return c;
        }
    }
    panic!("200 connections, none on shard {shard}");
}

// ---- 1. readiness ---------------------------------------------------------------------

#[test]
fn a_degraded_redis_keeps_the_node_ready_for_the_grace_then_not_then_ready_again() {
    let _d = deadline("a_degraded_redis_keeps_the_node_ready_for_the_grace", 90 * SECOND);
    let mut redis: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let url = redis.iter().map(|r| r.url()).collect::<Vec<_>>().join(",");
    let n =
        start_server(&["--shards", "2", "--redis", &url, "--ready-grace-secs", "3", "--admin-listen", "127.0.0.1:0"]);
    let admin = n.admin.unwrap();
    let admin_metric = |series: &str| {
        let (st, body) = http_at(admin, "GET", "/metrics", &[], b"");
        assert_eq!(st, 200);
        metric_in(&body, series)
    };
    assert_eq!(n.http_get("/readyz"), (200, "ready\n".to_string()));
    assert_eq!(admin_metric("corecast_redis_degraded"), Some(0.0));

    // A room whose channel lives at the server that stays.
    let mut a = Client::connect(&n.ws_url("/ws?user=a"));
    let rooms: Vec<String> = (0..16).map(|i| format!("s-{i}")).collect();
    for r in &rooms {
        a.subscribe(r);
    }
    let kept = rooms.iter().find(|r| redis[0].numsub(&format!("cc:room:{r}")) > 0).expect("a room at server 0");

    // One of two servers lost: degraded, still ready within the grace.
    let lost_port = redis[1].port;
    redis[1].kill();
    let killed = Instant::now();
    wait_until("degraded", 5 * SECOND, || admin_metric("corecast_redis_degraded") == Some(1.0));
    let (st, body) = n.http_get("/readyz");
    assert!(killed.elapsed() < 3 * SECOND, "the check itself must be inside the grace");
    assert_eq!((st, body.as_str()), (200, "ready, degraded: redis\n"), "terse on the client listener");
    // The admin listener says which link, where.
    let (st, body) = http_at(admin, "GET", "/readyz", &[], b"");
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("degraded") && body.contains(&lost_port.to_string()), "{body}");
    // The other server still serves a room on this node.
    a.send_json(&json!({"op": "publish", "room": kept, "data": 1}));
    assert_eq!(expect_event(&mut a, "a message", 5 * SECOND)["room"], json!(kept));

    // Past the grace: 503, with a terse body.
    wait_until("/readyz 503 after the grace", 10 * SECOND, || n.http_get("/readyz").0 == 503);
    let took = killed.elapsed();
    assert!(took >= Duration::from_millis(2900), "503 after {took:?}, before the 3 s grace");
    let (_, body) = n.http_get("/readyz");
    assert_eq!(body, "not ready: redis degraded for longer than --ready-grace-secs\n");
    assert_eq!(n.http_get("/healthz").0, 200, "alive all along");

    // Back: ready at once (once the links are up), not degraded.
    redis[1].restart();
    wait_until("/readyz 200 again", 15 * SECOND, || n.http_get("/readyz") == (200, "ready\n".to_string()));
    assert_eq!(admin_metric("corecast_redis_degraded"), Some(0.0));

    // Every server lost: the node cannot serve: 503 at once, grace or not.
    redis[0].kill();
    redis[1].kill();
    let killed = Instant::now();
    wait_until("/readyz 503 with every link down", 5 * SECOND, || {
        n.http_get("/readyz") == (503, "not ready: redis unreachable\n".to_string())
    });
    assert!(killed.elapsed() < 3 * SECOND, "every link down must not wait for the grace: {:?}", killed.elapsed());
    redis[0].restart();
    redis[1].restart();
    wait_until("/readyz 200 after both came back", 15 * SECOND, || n.http_get("/readyz").0 == 200);
}

// ---- 2. liveness ---------------------------------------------------------------------------

#[test]
fn healthz_on_one_shard_names_another_that_stalls_and_heals_after() {
    let s = start_server(&["--shards", "2", "--debug-hooks"]);
    let mut on0 = keep_alive_on(s.addr, 0);
    let mut on1 = keep_alive_on(s.addr, 1);
    assert_eq!(on0.get("/healthz"), (200, "ok\n".to_string()));
    // Shard 1's thread blocks for 6 s.
    on1.send("/debug/stall?ms=6000");
    let stalled = Instant::now();
    let body = loop {
        let (st, body) = on0.get("/healthz");
        if st == 503 {
            break body;
        }
        assert_eq!(st, 200);
        assert!(stalled.elapsed() < 5 * SECOND, "/healthz still 200 {:?} into the stall", stalled.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = stalled.elapsed();
    assert!(took >= Duration::from_millis(1900), "503 after {took:?}: the limit is 2 s");
    let (st, text) = on0.get("/metrics");
    assert_eq!((st, metric_in(&text, "corecast_stalled_shards")), (200, Some(1.0)), "served by shard 0");
    assert!(body.starts_with("stalled: shard 1 ("), "{body}");
    assert!(!body.contains("shard 0"), "{body}");
    // The stall ends: shard 1 answers, and /healthz is 200 again, on both.
    assert_eq!(on1.response(), (200, "1\n".to_string()));
    // Its next tick is due at once; within a second at most.
    s.wait_until("/healthz 200 again", || on0.get("/healthz") == (200, "ok\n".to_string()));
    assert_eq!(on1.get("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(s.metric("corecast_stalled_shards"), 0.0);
}

// ---- 3. the descriptor count -----------------------------------------------------------------

#[test]
fn open_fds_follows_the_descriptors_the_process_holds() {
    let s = start_server(&["--shards", "1"]);
    let base = metric_in(&s.metrics(), "corecast_open_fds").expect("corecast_open_fds");
    // The scrape's own socket is one of them; /proc read from outside.
    assert!((base - s.open_fds() as f64).abs() <= 2.0, "{base} vs {}", s.open_fds());
    let held: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(s.addr).unwrap()).collect();
    s.wait_until("50 more sockets", || s.metric("corecast_sockets") >= 51.0);
    let more = metric_in(&s.metrics(), "corecast_open_fds").unwrap();
    assert!((more - base - 50.0).abs() <= 2.0, "{base} -> {more}");
    drop(held);
    s.wait_until("back", || (s.metric("corecast_open_fds") - base).abs() <= 2.0);
}

// ---- 4. HTTP-phase sockets ---------------------------------------------------------------------

/// Reads until EOF or reset; true if that came within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[test]
fn http_phase_sockets_past_the_cap_are_closed_at_accept() {
    const N: usize = 8;
    let s = start_server(&[
        "--shards",
        "1",
        "--max-handshakes-per-shard",
        "8",
        "--handshake-timeout-secs",
        "60",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let admin = s.admin.unwrap();
    let m = |series: &str| metric_in(&http_at(admin, "GET", "/metrics", &[], b"").1, series).unwrap();
    let half = |s: &mut TcpStream| s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();
    // The start-up probe's socket counts until it is closed.
    s.wait_until("no HTTP-phase socket", || m("corecast_http_sockets") == 0.0);
    let mut held: Vec<TcpStream> = (0..N).map(|_| TcpStream::connect(s.addr).unwrap()).collect();
    held.iter_mut().for_each(half);
    s.wait_until("8 HTTP-phase sockets", || m("corecast_http_sockets") == N as f64);
    let mut extra: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(s.addr).unwrap()).collect();
    for e in &mut extra {
        let _ = e.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n");
        assert!(closed_within(e, 2 * SECOND), "an extra socket was kept");
    }
    assert_eq!(m("corecast_http_sockets_refused_total"), 3.0);
    assert_eq!(m("corecast_http_sockets"), N as f64);
    // The held ones are still open, waiting for the rest of their head.
    for h in &mut held {
        assert!(!closed_within(h, Duration::from_millis(20)), "a held socket was closed");
    }
    // A WebSocket cannot get in while the shard is full ...
    assert!(tungstenite::connect(s.ws_url("/ws?user=w")).is_err(), "a WebSocket got in past the cap");
    // ... and can once the others are gone; the gauge returns to 0.
    drop(held);
    s.wait_until("the gauge back to 0", || m("corecast_http_sockets") == 0.0);
    let mut c = Client::connect(&s.ws_url("/ws?user=w"));
    c.subscribe("in");
    assert_eq!(m("corecast_http_sockets"), 0.0, "an upgraded socket is not in the HTTP phase");
}

// ---- 5. panics -------------------------------------------------------------------------------------

#[test]
fn a_panic_in_one_connections_task_costs_that_connection_only() {
    let s = start_server(&["--shards", "1", "--debug-hooks"]);
    let mut a = Client::connect(&s.ws_url("/ws?user=a"));
    let mut b = Client::connect(&s.ws_url("/ws?user=b"));
    a.subscribe("r");
    b.subscribe("r");
    let fds = s.open_fds();
    let sockets = s.metric("corecast_sockets");
    let mut p = TcpStream::connect(s.addr).unwrap();
    p.write_all(b"GET /debug/panic HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    p.set_read_timeout(Some(5 * SECOND)).unwrap();
    let mut got = Vec::new();
    let _ = p.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains("200"), "the panicking request was answered");
    // The node goes on: the other clients still get a publish.
    a.send_json(&json!({"op": "publish", "room": "r", "data": "after"}));
    for c in [&mut a, &mut b] {
        let v = c.recv();
        assert_eq!((v["ev"].as_str(), v["data"].as_str()), (Some("message"), Some("after")), "{v}");
    }
    assert_eq!(s.http_get("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(s.metric("corecast_panics_total"), 1.0);
    // The panicking socket's descriptor is released and the table forgot it.
    s.wait_until("the socket gone", || s.metric("corecast_sockets") == sockets);
    drop(p);
    s.wait_until("descriptors back", || s.open_fds() <= fds);
    let logs = s.logs();
    assert!(logs.contains("a connection's task panicked"), "{logs}");
    assert!(logs.contains("debug hook: panic in a connection's task"), "{logs}");
    assert!(s.child.id() > 0);
}

#[test]
fn a_panic_in_one_websockets_read_closes_that_websocket_only() {
    let s = start_server(&["--shards", "1", "--debug-hooks"]);
    let mut a = Client::connect(&s.ws_url("/ws?user=a"));
    let mut b = Client::connect(&s.ws_url("/ws?user=b"));
    a.subscribe("r");
    b.subscribe("r");
    let fds = s.open_fds();
    let mut p = Client::connect(&s.ws_url("/ws?user=p"));
    p.subscribe("r");
    p.send_text("debug:panic");
    assert_eq!(p.expect_close(), Some(1011), "the panicking WebSocket is closed with 1011");
    s.wait_until("it left the tables", || s.metric("corecast_connections") == 2.0);
    a.send_json(&json!({"op": "publish", "room": "r", "data": "after"}));
    for c in [&mut a, &mut b] {
        let v = c.recv();
        assert_eq!((v["ev"].as_str(), v["data"].as_str()), (Some("message"), Some("after")), "{v}");
    }
    assert_eq!(s.http_get("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(s.metric("corecast_panics_total"), 1.0);
    drop(p);
    s.wait_until("descriptors back", || s.open_fds() <= fds);
    // The shard still reads and answers its other WebSockets.
    assert_eq!(a.call(json!({"op": "subscribe", "room": "r2", "id": 1}))["ev"], "subscribed");
    assert!(s.logs().contains("phase=\"websocket\"") || s.logs().contains("phase=websocket"), "{}", s.logs());
}

fn exits_promptly_on(place: &str) {
    let mut s = start_server(&["--shards", "2", "--debug-hooks"]);
    let _c = Client::connect(&s.ws_url("/ws?user=a"));
    let _ = s.http_get(&format!("/debug/panic?in={place}"));
    let t = Instant::now();
    let st = s.wait_exit(5 * SECOND);
    assert!(t.elapsed() < 3 * SECOND, "exited after {:?}", t.elapsed());
    assert_eq!(st.code(), Some(70), "{st:?}");
    let logs = s.logs();
    assert!(logs.contains("panic outside a connection's task: exiting"), "{logs}");
}

#[test]
fn a_panic_in_a_shard_task_ends_the_node_at_once() {
    exits_promptly_on("task");
}

#[test]
fn a_panic_on_an_unsupervised_thread_ends_the_node_at_once() {
    exits_promptly_on("thread");
}

// ---- 6. throttled warnings -----------------------------------------------------------------------------

#[test]
fn a_flood_of_one_warning_logs_a_bounded_number_of_lines() {
    let s: Server = start_server(&[
        "--shards",
        "1",
        "--max-handshakes-per-shard",
        "1",
        "--handshake-timeout-secs",
        "60",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let admin = s.admin.unwrap();
    let m = |series: &str| metric_in(&http_at(admin, "GET", "/metrics", &[], b"").1, series).unwrap();
    s.wait_until("no HTTP-phase socket", || m("corecast_http_sockets") == 0.0);
    let mut hold = TcpStream::connect(s.addr).unwrap();
    hold.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    s.wait_until("one HTTP-phase socket", || m("corecast_http_sockets") == 1.0);
    const FLOOD: usize = 300;
    for _ in 0..FLOOD {
        let mut e = TcpStream::connect(s.addr).unwrap();
        assert!(closed_within(&mut e, 2 * SECOND));
    }
    assert_eq!(m("corecast_http_sockets_refused_total"), FLOOD as f64);
    let line = "too many sockets in the HTTP phase";
    let lines = s.logs().matches(line).count();
    // One line per 5 s at this site: the flood took well under 10 s.
    assert!((1..=2).contains(&lines), "{lines} lines for {FLOOD} refusals:\n{}", s.logs());
    // The next line, after the interval, reports what was held back.
    std::thread::sleep(Duration::from_millis(5100));
    let mut e = TcpStream::connect(s.addr).unwrap();
    assert!(closed_within(&mut e, 2 * SECOND));
    s.wait_until("the next line", || s.logs().matches(line).count() == lines + 1);
    let logs = s.logs();
    let last = logs.lines().rfind(|l| l.contains(line)).unwrap();
    assert!(last.contains("suppressed="), "{last}");
    let n: usize = last.split("suppressed=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(n >= FLOOD - 2, "{last}");
    drop(hold);
}
