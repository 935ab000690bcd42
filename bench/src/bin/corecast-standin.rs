//! `corecast-standin`: a deliberately small stand-in for the corecast server,
//! so the load generator can be exercised before (or without) the real one.
//! Not a reference implementation and not a benchmark subject.
//!
//! One thread, one mio loop. Speaks enough of `shared/PROTOCOL.md`:
//! `GET /ws?user=U` (subscribe, unsubscribe, publish with ack, ping),
//! `GET /echo` with `--echo`, `GET /readyz` `/healthz` `/metrics`.
//! Takes `--listen ADDR`, `--shards N` (ignored) and `--echo`; any other flag
//! (e.g. `--redis`) is refused, which lets `scripts/bench.sh` test its
//! "no Redis mode" path. Simplifications: it accepts only the RFC 6455 §1.3
//! sample `Sec-WebSocket-Key` (the one the generator sends), parses ops with
//! serde_json, and cuts off a client whose outbound queue passes 1 MiB.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use corecast_bench::ws::{self, FrameHeader};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use serde::Deserialize;
use serde_json::value::RawValue;

const LISTENER: Token = Token(usize::MAX);
const OUTBOUND_LIMIT_BYTES: usize = 1 << 20;
const MAX_HTTP_HEAD_BYTES: usize = 8192;

#[derive(PartialEq)]
enum Kind {
    Http,
    Ws { user: String },
    Echo,
}

struct Client {
    sock: TcpStream,
    kind: Kind,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    rooms: Vec<String>,
}

#[derive(Deserialize)]
struct Op<'a> {
    op: &'a str,
    room: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    clients: HashMap<usize, Client>,
    rooms: HashMap<String, Vec<usize>>,
    next_token: usize,
    echo: bool,
    delivered: u64,
}

fn main() {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 8080).into();
    let mut echo = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => match args.next().and_then(|a| a.parse().ok()) {
                Some(a) => listen = a,
                None => fail("--listen needs ADDR:PORT"),
            },
            "--shards" => {
                args.next();
            }
            "--echo" => echo = true,
            other => fail(&format!("unsupported option {other} (this is the bench stand-in)")),
        }
    }
    if let Err(e) = run(listen, echo) {
        fail(&e.to_string());
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("corecast-standin: {msg}");
    std::process::exit(2)
}

fn run(listen: SocketAddr, echo: bool) -> io::Result<()> {
    let poll = Poll::new()?;
    let mut listener = TcpListener::bind(listen)?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    eprintln!("corecast-standin listening on {listen}");
    let mut server =
        Server { poll, listener, clients: HashMap::new(), rooms: HashMap::new(), next_token: 0, echo, delivered: 0 };
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = server.poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                server.accept();
            } else {
                let t = ev.token().0;
                if ev.is_writable() {
                    server.flush(t);
                }
                if ev.is_readable() {
                    server.read(t, &mut scratch);
                }
            }
        }
    }
}

impl Server {
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    let t = self.next_token;
                    self.next_token += 1;
                    let _ = sock.set_nodelay(true);
                    if self
                        .poll
                        .registry()
                        .register(&mut sock, Token(t), Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        self.clients.insert(
                            t,
                            Client { sock, kind: Kind::Http, rbuf: Vec::new(), wbuf: Vec::new(), rooms: Vec::new() },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    eprintln!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn read(&mut self, t: usize, scratch: &mut [u8]) {
        loop {
            let Some(c) = self.clients.get_mut(&t) else {
                return;
            };
            match c.sock.read(scratch) {
                Ok(0) => return self.drop_client(t),
                Ok(n) => c.rbuf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_client(t),
            }
        }
        let Some(c) = self.clients.get_mut(&t) else {
            return;
        };
        let buf = std::mem::take(&mut c.rbuf);
        let used = if c.kind == Kind::Http { self.http(t, &buf) } else { self.frames(t, &buf) };
        if let (Some(used), Some(c)) = (used, self.clients.get_mut(&t)) {
            c.rbuf = buf[used..].to_vec();
        }
    }

    /// Handles one request head; `None` once the client is gone.
    fn http(&mut self, t: usize, buf: &[u8]) -> Option<usize> {
        let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
            if buf.len() > MAX_HTTP_HEAD_BYTES {
                self.drop_client(t);
                return None;
            }
            return Some(0);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let upgrade = head.to_ascii_lowercase().contains("upgrade: websocket");
        let key_ok = head.contains(ws::HANDSHAKE_KEY);
        let reply = |status: &str, body: &str| {
            format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
        };
        let kind = match path {
            "/ws" if upgrade && key_ok => {
                let user = query.split('&').find_map(|kv| kv.strip_prefix("user=")).unwrap_or("anonymous");
                Some(Kind::Ws { user: user.to_string() })
            }
            "/echo" if upgrade && key_ok && self.echo => Some(Kind::Echo),
            _ => None,
        };
        let Some(kind) = kind else {
            let response = match path {
                "/readyz" | "/healthz" => reply("200 OK", "ok"),
                "/metrics" => reply("200 OK", &format!("standin_deliveries_total {}\n", self.delivered)),
                "/ws" | "/echo" => reply("400 Bad Request", ""),
                _ => reply("404 Not Found", ""),
            };
            self.send(t, response.as_bytes());
            self.drop_client_after_flush(t);
            return None;
        };
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            ws::HANDSHAKE_ACCEPT
        );
        if let Some(c) = self.clients.get_mut(&t) {
            c.kind = kind;
        }
        self.send(t, response.as_bytes());
        let rest = self.frames(t, &buf[end + 4..])?;
        Some(end + 4 + rest)
    }

    /// Handles whole frames; returns bytes used, `None` once the client is gone.
    fn frames(&mut self, t: usize, buf: &[u8]) -> Option<usize> {
        let mut at = 0;
        loop {
            let (h, n) = match FrameHeader::parse(&buf[at..]) {
                Ok(Some(h)) => h,
                Ok(None) => return Some(at),
                Err(_) => {
                    self.drop_client(t);
                    return None;
                }
            };
            // "The server MUST close the connection upon receiving a frame that is not masked." (RFC 6455 §5.1)
            let Some(mask) = h.mask else {
                self.drop_client(t);
                return None;
            };
            let Some(body) = buf.get(at + n..at + n + h.payload_len as usize) else {
                return Some(at);
            };
            let mut payload = body.to_vec();
            ws::apply_mask(&mut payload, mask, 0);
            at += n + body.len();
            match h.opcode {
                ws::OP_TEXT | ws::OP_BINARY if self.clients.get(&t).is_some_and(|c| c.kind == Kind::Echo) => {
                    let mut frame = Vec::new();
                    ws::format_frame(h.opcode, &payload, None, &mut frame);
                    self.send(t, &frame);
                }
                ws::OP_TEXT => self.op(t, &payload),
                ws::OP_PING => {
                    let mut frame = Vec::new();
                    ws::format_frame(ws::OP_PONG, &payload, None, &mut frame);
                    self.send(t, &frame);
                }
                ws::OP_CLOSE => {
                    let mut frame = Vec::new();
                    ws::format_frame(ws::OP_CLOSE, payload.get(..2).unwrap_or(&[]), None, &mut frame);
                    self.send(t, &frame);
                    self.drop_client_after_flush(t);
                    return None;
                }
                _ => {}
            }
            if !self.clients.contains_key(&t) {
                return None;
            }
        }
    }

    fn op(&mut self, t: usize, json: &[u8]) {
        let reply = |ev: &str, id: Option<&RawValue>| match id {
            Some(id) => format!(r#"{{"ev":"{ev}","id":{}}}"#, id.get()),
            None => format!(r#"{{"ev":"{ev}"}}"#),
        };
        let Ok(op) = serde_json::from_slice::<Op>(json) else {
            return self.text(t, r#"{"ev":"error","code":"bad_request","message":"not an op"}"#);
        };
        match (op.op, op.room) {
            ("subscribe", Some(room)) => {
                let members = self.rooms.entry(room.clone()).or_default();
                if !members.contains(&t) {
                    members.push(t);
                }
                if let Some(c) = self.clients.get_mut(&t) {
                    c.rooms.push(room.clone());
                }
                let id = op.id.map_or(String::new(), |id| format!(r#","id":{}"#, id.get()));
                self.text(t, &format!(r#"{{"ev":"subscribed","room":{}{id}}}"#, serde_json::Value::from(room)));
            }
            ("unsubscribe", Some(room)) => {
                if let Some(m) = self.rooms.get_mut(&room) {
                    m.retain(|&x| x != t);
                }
                self.text(t, &reply("unsubscribed", op.id));
            }
            ("publish", Some(room)) => {
                let from = match self.clients.get(&t).map(|c| &c.kind) {
                    Some(Kind::Ws { user }) => user.clone(),
                    _ => String::new(),
                };
                let data = op.data.map_or("null", |d| d.get());
                let event = format!(
                    r#"{{"ev":"message","room":{},"from":{},"data":{data}}}"#,
                    serde_json::Value::from(room.as_str()),
                    serde_json::Value::from(from)
                );
                let mut frame = Vec::with_capacity(event.len() + 10);
                ws::format_frame(ws::OP_TEXT, event.as_bytes(), None, &mut frame);
                let members = self.rooms.get(&room).cloned().unwrap_or_default();
                for m in members {
                    self.delivered += 1;
                    self.send(m, &frame);
                }
                if op.id.is_some() {
                    self.text(t, &reply("ack", op.id));
                }
            }
            ("ping", _) => self.text(t, &reply("pong", op.id)),
            _ => self.text(t, r#"{"ev":"error","code":"bad_request","message":"unknown op"}"#),
        }
    }

    fn text(&mut self, t: usize, json: &str) {
        let mut frame = Vec::with_capacity(json.len() + 4);
        ws::format_frame(ws::OP_TEXT, json.as_bytes(), None, &mut frame);
        self.send(t, &frame);
    }

    fn send(&mut self, t: usize, bytes: &[u8]) {
        let Some(c) = self.clients.get_mut(&t) else {
            return;
        };
        c.wbuf.extend_from_slice(bytes);
        if c.wbuf.len() > OUTBOUND_LIMIT_BYTES {
            return self.drop_client(t);
        }
        self.flush(t);
    }

    fn flush(&mut self, t: usize) {
        let Some(c) = self.clients.get_mut(&t) else {
            return;
        };
        while !c.wbuf.is_empty() {
            match c.sock.write(&c.wbuf) {
                Ok(n) => {
                    c.wbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_client(t),
            }
        }
    }

    /// Closes after the queued bytes went out (best effort: one flush).
    fn drop_client_after_flush(&mut self, t: usize) {
        self.flush(t);
        self.drop_client(t);
    }

    fn drop_client(&mut self, t: usize) {
        let Some(mut c) = self.clients.remove(&t) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.sock);
        for room in c.rooms {
            if let Some(m) = self.rooms.get_mut(&room) {
                m.retain(|&x| x != t);
                if m.is_empty() {
                    self.rooms.remove(&room);
                }
            }
        }
    }
}
