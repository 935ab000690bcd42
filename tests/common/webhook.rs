//! A real HTTP/1.1 webhook receiver for tests: a `TcpListener` on
//! 127.0.0.1 with a thread per connection (keep-alive: many requests per
//! connection), `Content-Length` and chunked bodies. It records every
//! request (method, path, headers, body) as it arrives, answers each with
//! the next step of its script (the last step repeats forever), and checks
//! `X-Corecast-Signature` on its own: HMAC-SHA256 over the bytes that
//! arrived, compared with `Mac::verify_slice`, not with the server's code.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What the receiver does with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Answers with this status (and a 2-byte body).
    Status(u16),
    /// Never answers; the connection is closed when the receiver is dropped.
    Hang,
}

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// In arrival order, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// What the receiver answered (or will not).
    pub answer: Answer,
    /// Which connection (0, 1, …, in accept order) carried it.
    pub conn: usize,
}

impl Request {
    /// The value of header `name` (any case); panics if it is repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut found = self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "header {name} repeated: {:?}", self.headers);
        first
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body's `events` array.
    pub fn events(&self) -> Vec<Value> {
        match self.json() {
            Value::Object(mut o) if o.len() == 1 => match o.remove("events") {
                Some(Value::Array(evs)) => evs,
                other => panic!("\"events\" is not an array: {other:?}"),
            },
            other => panic!("body is not {{\"events\":[…]}}: {other}"),
        }
    }

    pub fn acknowledged(&self) -> bool {
        matches!(self.answer, Answer::Status(200..=299))
    }

    /// Checks `X-Corecast-Signature: t=<t>,v1=<hex>` against `secret` and
    /// the body that arrived; returns `t`.
    pub fn check_signature(&self, secret: &str) -> Result<u64, String> {
        use hmac::{Hmac, Mac};
        let h = self.header("x-corecast-signature").ok_or("no X-Corecast-Signature header")?;
        let (t, v1) =
            h.strip_prefix("t=").and_then(|r| r.split_once(",v1=")).ok_or_else(|| format!("not t=..,v1=..: {h}"))?;
        let t: u64 = t.parse().map_err(|_| format!("t is not a number: {h}"))?;
        if v1.len() != 64 || !v1.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!("v1 is not 64 lowercase hex digits: {h}"));
        }
        let tag: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&v1[2 * i..2 * i + 2], 16).unwrap()).collect();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(&self.body);
        mac.verify_slice(&tag).map_err(|_| format!("signature does not match the body: {h}"))?;
        Ok(t)
    }
}

struct State {
    script: Vec<Answer>,
    requests: Mutex<Vec<Request>>,
    stop: AtomicBool,
}

pub struct Receiver {
    port: u16,
    state: Arc<State>,
}

impl Receiver {
    /// Listens on a free port of 127.0.0.1; the i-th request (in arrival
    /// order) gets `script[i]`, and every one past the end the last step.
    pub fn start(script: &[Answer]) -> Receiver {
        Receiver::listen(TcpListener::bind("127.0.0.1:0").unwrap(), script)
    }

    /// As `start`, on `port` (a receiver that comes up where one was down).
    pub fn start_on(port: u16, script: &[Answer]) -> Receiver {
        Receiver::listen(TcpListener::bind(("127.0.0.1", port)).unwrap(), script)
    }

    fn listen(listener: TcpListener, script: &[Answer]) -> Receiver {
        assert!(!script.is_empty(), "a script needs at least one step");
        let port = listener.local_addr().unwrap().port();
        let state =
            Arc::new(State { script: script.to_vec(), requests: Mutex::new(Vec::new()), stop: AtomicBool::new(false) });
        listener.set_nonblocking(true).unwrap();
        let st = state.clone();
        std::thread::spawn(move || {
            let mut conns = 0;
            while !st.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let (st, conn) = (st.clone(), conns);
                        conns += 1;
                        std::thread::spawn(move || serve(s, conn, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Receiver { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The events of every acknowledged (2xx) request, in arrival order.
    pub fn events(&self) -> Vec<Value> {
        self.requests().iter().filter(|r| r.acknowledged()).flat_map(Request::events).collect()
    }

    /// Waits until `n` events were acknowledged; returns them all.
    pub fn wait_for_events(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let end = Instant::now() + timeout;
        loop {
            let evs = self.events();
            if evs.len() >= n {
                return evs;
            }
            assert!(Instant::now() < end, "{} of {n} events after {timeout:?}: {:?}", evs.len(), self.requests());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `n` requests arrived (answered or not); returns them all.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let end = Instant::now() + timeout;
        loop {
            let reqs = self.requests();
            if reqs.len() >= n {
                return reqs;
            }
            assert!(Instant::now() < end, "{} of {n} requests after {timeout:?}: {reqs:?}", reqs.len());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Receiver {
    /// Stops listening (the port closes) and ends hanging connections.
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
    }
}

/// One connection: requests until the client closes it (or asks to).
fn serve(s: TcpStream, conn: usize, st: &State) {
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    while let Some(mut req) = read_request(&mut r, conn) {
        let close = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        {
            let mut all = st.requests.lock().unwrap();
            req.answer = st.script[all.len().min(st.script.len() - 1)];
            all.push(req.clone());
        }
        match req.answer {
            Answer::Hang => {
                while !st.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return;
            }
            Answer::Status(code) => {
                let head = format!("HTTP/1.1 {code} X\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok");
                if w.write_all(head.as_bytes()).is_err() || close {
                    return;
                }
            }
        }
    }
}

/// One request; `None` at a clean end of the connection. Panics on
/// anything malformed (the test then misses its events and says so).
fn read_request(r: &mut BufReader<TcpStream>, conn: usize) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let (method, path, version) = (parts.next()?, parts.next()?, parts.next()?);
    assert_eq!(version, "HTTP/1.1", "request line: {line:?}");
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or_else(|| panic!("header line: {h:?}"));
        headers.push((k.to_string(), v.trim().to_string()));
    }
    let mut req = Request {
        method: method.into(),
        path: path.into(),
        headers,
        body: Vec::new(),
        answer: Answer::Status(0),
        conn,
    };
    if let Some(n) = req.header("content-length") {
        let mut body = vec![0; n.parse().unwrap()];
        r.read_exact(&mut body).unwrap();
        req.body = body;
    } else if req.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).unwrap();
            if size == 0 {
                break;
            }
            req.body.extend_from_slice(&chunk[..size]);
        }
    }
    Some(req)
}
