//! Shared helpers for the integration tests: start a real corecast process on
//! 127.0.0.1:0, talk to it over real sockets (raw HTTP, tungstenite clients,
//! raw bytes), read its metrics. Every wait has a deadline; nothing sleeps to
//! synchronize where a condition can be polled.
#![allow(dead_code)]

pub mod history;
pub mod priority;
pub mod redis;
pub mod redis_proxy;
pub mod redis_topology;
pub mod webhook;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A corecast process, killed on drop.
pub struct Server {
    pub addr: SocketAddr,
    /// The `--admin-listen` address, when the test asked for one.
    pub admin: Option<SocketAddr>,
    pub child: Child,
    /// stderr (logs) of the process, collected by a thread.
    logs: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Starts `corecast --listen 127.0.0.1:0 ARGS` and waits until /readyz is 200.
pub fn start_server(args: &[&str]) -> Server {
    start_server_with(args, |_| {})
}

/// The monoio driver every test server runs on when `CORECAST_TEST_DRIVER`
/// is set (`uring` or `legacy`; scripts/test.sh runs the socket-level tests
/// once with each), unless the test picks one itself.
pub fn test_driver() -> Option<String> {
    std::env::var("CORECAST_TEST_DRIVER").ok().filter(|d| !d.is_empty())
}

/// `corecast --listen 127.0.0.1:0 ARGS`, on `CORECAST_TEST_DRIVER`'s driver
/// unless ARGS name one, logging at `CORECAST_TEST_LOG` (default info), with
/// stdout and stderr piped and no stdin. It dies with the test's thread
/// (`redis::die_with_parent`): a test that passes its `deadline` aborts,
/// and no drop runs to stop it.
pub fn corecast_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corecast"));
    redis::die_with_parent(&mut cmd);
    cmd.arg("--listen").arg("127.0.0.1:0").args(args);
    if let Some(d) = test_driver()
        && !args.contains(&"--driver")
    {
        cmd.arg("--driver").arg(d);
    }
    cmd.env("RUST_LOG", std::env::var("CORECAST_TEST_LOG").unwrap_or_else(|_| "info".into()));
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
    cmd
}

/// A corecast process a test drives itself (its raw output, a start-up that
/// must fail): `corecast_command(args)` adjusted by `adjust`, killed on drop.
pub struct Spawned(pub Child);

pub fn spawn_corecast(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Spawned {
    let mut cmd = corecast_command(args);
    adjust(&mut cmd);
    Spawned(cmd.spawn().expect("spawn corecast"))
}

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sets its flag when dropped: held by a test thread inside a
/// `thread::scope`, it stops the scope's worker (a publisher looping until
/// the flag) however the thread leaves, a failed assertion included, so
/// the scope ends with that assertion's message instead of waiting.
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Like `start_server`, with a hook to adjust the command (env, rlimits).
pub fn start_server_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Server {
    let s = start_server_unready(args, adjust);
    s.wait_until("/readyz 200", || s.http_get("/readyz").0 == 200);
    s
}

/// Like `start_server_with`, without waiting for `/readyz` (a node that
/// is not ready at first, e.g. before its JWKS fetch).
pub fn start_server_unready(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Server {
    let mut cmd = corecast_command(args);
    adjust(&mut cmd);
    let mut child = cmd.spawn().expect("spawn corecast");
    let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let err = child.stderr.take().expect("piped stderr");
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let wants_admin = args.contains(&"--admin-listen");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("corecast listening on ") {
                let _ = tx.send(a.trim().to_string());
            } else if let Some(a) = line.strip_prefix("corecast admin listening on ") {
                let _ = tx.send(format!("admin {}", a.trim()));
            }
        }
    });
    let mut got = || match rx.recv_timeout(DEADLINE) {
        Ok(a) => a,
        Err(_) => {
            let _ = child.kill();
            panic!("corecast did not start: {}", logs.lock().unwrap());
        }
    };
    let addr: SocketAddr = got().parse().expect("address");
    let admin = wants_admin.then(|| got().strip_prefix("admin ").expect("admin address").parse().expect("address"));
    Server { addr, admin, child, logs }
}

impl Server {
    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// One HTTP/1.1 request with `Connection: close`; returns status and body.
    pub fn http(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        http_at(self.addr, method, path, headers, body)
    }

    /// Descriptors the process holds, from `/proc/<pid>/fd`.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).expect("read /proc/<pid>/fd").count()
    }

    /// Resident memory of the process in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }
}

/// One HTTP/1.1 request to `addr` with `Connection: close`; returns status and body.
pub fn http_at(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    {
        let Ok(mut s) = TcpStream::connect(addr) else { return (0, String::new()) };
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", addr);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        if s.write_all(&bytes).is_err() {
            return (0, String::new());
        }
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        parse_response(&resp)
    }
}

impl Server {
    pub fn http_get(&self, path: &str) -> (u16, String) {
        self.http("GET", path, &[], b"")
    }

    /// Every backplane link of the node is up: `/readyz` is 200 and not
    /// degraded (a degraded node still answers 200 within its grace).
    pub fn links_up(&self) -> bool {
        let (st, body) = self.http_get("/readyz");
        st == 200 && body == "ready\n"
    }

    pub fn metrics(&self) -> String {
        let (st, body) = self.http_get("/metrics");
        assert_eq!(st, 200, "GET /metrics");
        body
    }

    /// The value of one series, e.g. `corecast_connections` or
    /// `corecast_connections{shard="1"}`; panics if absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric_in(&self.metrics(), series).unwrap_or_else(|| panic!("no series {series}"))
    }

    /// A WebSocket client as `user` on shard `shard`. Which shard takes a
    /// connection is the kernel's (SO_REUSEPORT hashes the ports), so this
    /// opens connections, closing each stray one again, until one lands
    /// there, read from `corecast_connections{shard}`. Expects no other
    /// WebSocket to open or close meanwhile.
    pub fn client_on_shard(&self, shard: usize, user: &str) -> Client {
        let on = |s: &Server| s.metric(&format!("corecast_connections{{shard=\"{shard}\"}}"));
        for _ in 0..200 {
            let total = self.metric("corecast_connections");
            let before = on(self);
            let c = Client::connect(&self.ws_url(&format!("/ws?user={user}")));
            self.wait_until("the connection counted", || self.metric("corecast_connections") == total + 1.0);
            if on(self) == before + 1.0 {
                return c;
            }
            drop(c);
            self.wait_until("the stray connection gone", || self.metric("corecast_connections") == total);
        }
        panic!("200 connections, none on shard {shard}");
    }

    /// Polls `cond` until it holds, failing the test after `DEADLINE`.
    pub fn wait_until(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let t = Instant::now();
        while !cond() {
            if t.elapsed() > DEADLINE {
                panic!("timed out waiting for {what}\n--- server log ---\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn sigterm(&self) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Waits for the process to exit; returns its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if t.elapsed() > limit {
                panic!("corecast did not exit within {limit:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds `series` (name plus optional labels) in Prometheus text.
pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
    })
}

pub fn parse_response(resp: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(resp);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A blocking WebSocket client (tungstenite) for protocol-level tests.
pub struct Client {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// Connects; every read has a timeout (`DEADLINE` until a call sets
    /// another), so a node that never answers fails the test, not hangs it.
    pub fn connect(url: &str) -> Client {
        let (ws, resp) = tungstenite::connect(url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        let mut c = Client { ws };
        c.set_timeout(DEADLINE);
        c
    }

    pub fn local_port(&self) -> u16 {
        match self.ws.get_ref() {
            MaybeTlsStream::Plain(s) => s.local_addr().unwrap().port(),
            _ => unreachable!("plain TCP only"),
        }
    }

    pub fn set_timeout(&mut self, t: Duration) {
        if let MaybeTlsStream::Plain(s) = self.ws.get_mut() {
            s.set_read_timeout(Some(t)).unwrap();
        }
    }

    pub fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    pub fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s)).expect("send");
    }

    /// The next text message as JSON, or `None` after `timeout`. Pings are
    /// answered by tungstenite; the connection closing panics.
    pub fn recv_json(&mut self, timeout: Duration) -> Option<Value> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.set_timeout(left);
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("server sent JSON")),
                Ok(Message::Binary(_)) => panic!("server sent a binary frame"),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return None;
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// The next message, which must arrive within `DEADLINE`.
    pub fn recv(&mut self) -> Value {
        self.recv_json(DEADLINE).expect("a message within the deadline")
    }

    /// Asserts absence: nothing arrives within `d`.
    pub fn expect_silence(&mut self, d: Duration) {
        if let Some(v) = self.recv_json(d) {
            panic!("expected silence, got {v}");
        }
    }

    /// Sends an op and returns the reply (the next message).
    pub fn call(&mut self, v: Value) -> Value {
        self.send_json(&v);
        self.recv()
    }

    pub fn subscribe(&mut self, room: &str) {
        let r = self.call(serde_json::json!({"op":"subscribe","room":room,"id":room}));
        assert_eq!(r, serde_json::json!({"ev":"subscribed","room":room,"id":room}));
    }

    /// Reads until the server closes; returns the close code it sent.
    pub fn expect_close(&mut self) -> Option<u16> {
        let end = Instant::now() + DEADLINE;
        loop {
            self.set_timeout(end.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
            match self.ws.read() {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => return None,
                Err(tungstenite::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {}
                Err(e) => panic!("expected a close frame, got {e}"),
            }
        }
    }
}

/// The raw WebSocket upgrade request for `path` (the RFC 6455 sample key),
/// with `extra` header lines (each ending in CRLF) before the blank line.
/// Waits until every connection in `tabs` (all of `user`) is reachable
/// through `via`'s server API: a connection is reachable once its node's
/// subscription to the user's channel is in place, which with Redis takes
/// one round trip after the upgrade. Publishes numbered direct messages
/// until a round reaches every tab, and leaves every tab drained to it.
pub fn until_reachable(via: &Server, user: &str, tabs: &mut [Client]) {
    for k in 0..50 {
        let body = serde_json::json!({"user": user, "data": {"warm": k}}).to_string();
        let (code, reply) = via.http("POST", "/api/publish", &[], body.as_bytes());
        assert_eq!(code, 200, "{reply}");
        let mut all = true;
        for t in tabs.iter_mut() {
            // Earlier rounds arrive first (one publisher, in order).
            let got = loop {
                match t.recv_json(Duration::from_millis(300)) {
                    Some(v) if v["data"]["warm"] == k => break true,
                    Some(v) if v["data"].get("warm").is_some() => continue,
                    Some(v) => panic!("unexpected before the warm-up ended: {v}"),
                    None => break false,
                }
            };
            all &= got;
        }
        if all {
            return;
        }
    }
    panic!("{user}'s connections never all became reachable");
}

pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends an upgrade request for `path` (with `extra` header lines) on a new
/// connection; returns the response's status and head (a 101 is left open
/// and dropped; a refusal's body is not read).
pub fn upgrade_status(addr: SocketAddr, path: &str, extra: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(upgrade_request(path, extra).as_bytes()).unwrap();
    let mut r = Raw { s, buf: Vec::new() };
    let head = String::from_utf8_lossy(&r.read_until(b"\r\n\r\n")).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head)
}

/// A raw TCP connection for sending bytes tungstenite would refuse to send.
pub struct Raw {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects and completes a WebSocket handshake on `path`.
    pub fn upgrade(addr: SocketAddr, path: &str) -> Raw {
        Raw::upgrade_on(TcpStream::connect(addr).expect("connect"), path)
    }

    /// Like `upgrade`, with extra request header lines (each ending in
    /// CRLF); returns the 101's head too.
    pub fn upgrade_with(addr: SocketAddr, path: &str, extra: &str) -> (Raw, String) {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(upgrade_request(path, extra).as_bytes()).unwrap();
        let mut r = Raw { s, buf: Vec::new() };
        let head = String::from_utf8_lossy(&r.read_until(b"\r\n\r\n")).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        (r, head)
    }

    /// Completes a WebSocket handshake on `path` over a connected socket.
    pub fn upgrade_on(mut s: TcpStream, path: &str) -> Raw {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(upgrade_request(path, "").as_bytes()).unwrap();
        let mut r = Raw { s, buf: Vec::new() };
        let head = r.read_until(b"\r\n\r\n");
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        r
    }

    fn read_until(&mut self, pat: &[u8]) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.windows(pat.len()).position(|w| w == pat) {
                return self.buf.drain(..i + pat.len()).collect();
            }
            let mut b = [0u8; 4096];
            let n = self.s.read(&mut b).expect("read");
            assert!(n > 0, "EOF before {:?}", String::from_utf8_lossy(pat));
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    /// Sends a frame, masked with a fixed key unless `masked` is false.
    pub fn send_frame(&mut self, b0: u8, payload: &[u8], masked: bool) {
        self.s.write_all(&client_frame(b0, payload, masked)).unwrap();
    }

    /// Reads one server frame: (first header byte, payload). `None` on EOF.
    pub fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (b0, l) = (self.buf[0], (self.buf[1] & 0x7f) as usize);
                let (len, h) = match l {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.buf.len() >= h + len {
                    let payload = self.buf[h..h + len].to_vec();
                    self.buf.drain(..h + len);
                    return Some((b0, payload));
                }
            }
            let mut b = [0u8; 65536];
            match self.s.read(&mut b) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Reads frames until a close frame; returns its status code.
    pub fn expect_close_code(&mut self) -> u16 {
        loop {
            match self.read_frame() {
                Some((b0, p)) if b0 & 0x0f == 0x8 => {
                    assert!(p.len() >= 2, "close frame without a code");
                    return u16::from_be_bytes([p[0], p[1]]);
                }
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// After a close, the server must end the TCP connection.
    pub fn expect_eof(&mut self) {
        while self.read_frame().is_some() {}
    }
}

/// A client frame: header byte `b0`, then the (masked) payload.
pub fn client_frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let key = [0xa1, 0xb2, 0xc3, 0xd4];
    let mut v = vec![b0];
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => v.push(m | n as u8),
        n @ 126..=65535 => {
            v.push(m | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(m | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        v.extend_from_slice(&key);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        v.extend_from_slice(payload);
    }
    v
}
