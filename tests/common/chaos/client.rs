//! One chaos client: a thread that follows its rooms across connections the
//! way clients/js/corecast.js does. It connects through one node's proxy,
//! subscribes every room with `since` = its position there (PROTOCOL.md
//! §7), and on any end of the connection (server close, `maintenance`, a
//! cut, a node's death, silence) reconnects through another node's proxy,
//! after the delay `maintenance` asked for or a jittered backoff. A
//! subscribe refused (`unavailable`) is retried on the same connection.
//! Unlike the JS client it drops nothing: every event goes to the checker.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use super::checker::{Ctx, Stream};

pub struct ClientSpec {
    pub id: usize,
    pub proxies: Vec<u16>,
    pub seed: u64,
}

/// How the connection ended.
enum End {
    Stop,
    Closed,
    Maintenance(Instant),
    Stale,
    Paused,
}

pub fn run(spec: ClientSpec, ctx: Arc<Ctx>, stop: Arc<AtomicBool>, streams: Vec<Stream>) -> Vec<Stream> {
    let mut rng = fastrand::Rng::with_seed(spec.seed);
    let mut streams = streams;
    let n = spec.proxies.len();
    let mut node = spec.id % n;
    let mut conn = 0u32;
    let mut failures = 0u32;
    while !stop.load(Ordering::Relaxed) {
        if ctx.paused(spec.id) {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let Some(mut ws) = connect(spec.proxies[node], spec.id) else {
            ctx.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            failures += 1;
            let cap = 50u64 << failures.min(5);
            std::thread::sleep(Duration::from_millis(rng.u64(cap / 2..=cap)));
            node = (node + 1 + rng.usize(0..n - 1)) % n;
            continue;
        };
        ctx.stats.connects.fetch_add(1, Ordering::Relaxed);
        conn += 1;
        for s in streams.iter_mut() {
            s.new_connection(conn, node as u8);
        }
        let end = session(&mut ws, &ctx, spec.id, &stop, &mut streams, &mut failures);
        let _ = ws.close(None);
        let _ = ws.flush();
        drop(ws);
        if matches!(end, End::Stop) {
            break;
        }
        ctx.stats.disconnects.fetch_add(1, Ordering::Relaxed);
        match end {
            End::Maintenance(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                std::thread::sleep(wait + Duration::from_millis(rng.u64(0..100)));
            }
            End::Paused => {
                ctx.stats.pauses.fetch_add(1, Ordering::Relaxed);
            }
            End::Stale => {
                ctx.stats.stale_drops.fetch_add(1, Ordering::Relaxed);
            }
            _ => std::thread::sleep(Duration::from_millis(rng.u64(10..200))),
        }
        // Another node: the one we were on may be dying.
        node = (node + 1 + rng.usize(0..n - 1)) % n;
    }
    streams
}

type Ws = WebSocket<TcpStream>;

fn connect(port: u16, id: usize) -> Option<Ws> {
    let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let _ = s.set_nodelay(true);
    let url = format!("ws://127.0.0.1:{port}/ws?user=c{id}");
    let (ws, resp) = tungstenite::client::client(url, s).ok()?;
    (resp.status().as_u16() == 101).then_some(ws)
}

fn send(ws: &mut Ws, v: &Value) -> bool {
    ws.send(Message::text(v.to_string())).is_ok()
}

fn subscribe_op(ctx: &Ctx, s: &Stream) -> (Value, Option<(u32, u64)>) {
    let room = &ctx.rooms[s.room];
    let mut op = json!({"op": "subscribe", "room": room, "id": room});
    if let Some((e, o)) = s.since(ctx) {
        op["since"] = json!({"epoch": e, "offset": o});
    }
    (op, s.last)
}

fn session(ws: &mut Ws, ctx: &Ctx, id: usize, stop: &AtomicBool, streams: &mut [Stream], failures: &mut u32) -> End {
    let index: HashMap<String, usize> =
        streams.iter().enumerate().map(|(i, s)| (ctx.rooms[s.room].clone(), i)).collect();
    // The `since` each pending subscribe was sent with.
    let mut pending: HashMap<usize, Option<(u32, u64)>> = HashMap::new();
    let mut retry: HashMap<usize, Instant> = HashMap::new();
    for (i, s) in streams.iter().enumerate() {
        let (op, since) = subscribe_op(ctx, s);
        if !send(ws, &op) {
            return End::Closed;
        }
        pending.insert(i, since);
    }
    ws.get_mut().set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
    let mut last_rx = Instant::now();
    let mut last_ping = Instant::now();
    let mut maintenance: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return End::Stop;
        }
        if ctx.paused(id) {
            return End::Paused;
        }
        let now = Instant::now();
        if let Some(at) = maintenance
            && now > at + Duration::from_secs(2)
        {
            // The server should have closed us by now; leave on time anyway.
            return End::Maintenance(at);
        }
        if now.duration_since(last_rx) > Duration::from_secs(15) {
            return End::Stale;
        }
        if now.duration_since(last_ping) > Duration::from_secs(5) {
            last_ping = now;
            if !send(ws, &json!({"op": "ping", "id": "p"})) {
                return End::Closed;
            }
        }
        let due: Vec<usize> = retry.iter().filter(|(_, t)| **t <= now).map(|(i, _)| *i).collect();
        for i in due {
            retry.remove(&i);
            let (op, since) = subscribe_op(ctx, &streams[i]);
            if !send(ws, &op) {
                return End::Closed;
            }
            pending.insert(i, since);
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                last_rx = Instant::now();
                let Ok(v) = serde_json::from_str::<Value>(&t) else {
                    ctx.stats.other_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let room = v["room"].as_str().and_then(|r| index.get(r).copied());
                match (v["ev"].as_str().unwrap_or(""), room) {
                    ("message", Some(i)) => streams[i].on_message(ctx, &v),
                    ("gap", Some(i)) => streams[i].on_gap(ctx, &v),
                    ("subscribed", Some(i)) => {
                        *failures = 0;
                        let since = match pending.remove(&i) {
                            Some(since) => since,
                            None => {
                                // Not asked for on this connection: judged as
                                // a recovery from where the stream is.
                                ctx.violation(
                                    super::checker::Kind::Protocol,
                                    id,
                                    streams[i].room,
                                    format!("a `subscribed` no subscribe on this connection asked for: {v}"),
                                    streams[i].recent(ctx),
                                );
                                streams[i].last
                            }
                        };
                        streams[i].on_subscribed(ctx, &v, since);
                    }
                    ("maintenance", _) => {
                        ctx.stats.maintenance.fetch_add(1, Ordering::Relaxed);
                        let ms = v["reconnect_in_ms"].as_u64().unwrap_or(0);
                        maintenance = Some(Instant::now() + Duration::from_millis(ms));
                    }
                    ("error", _) => {
                        let id = v["id"].as_str().and_then(|r| index.get(r).copied());
                        match id {
                            Some(i) if pending.contains_key(&i) => {
                                ctx.stats.subscribe_errors.fetch_add(1, Ordering::Relaxed);
                                pending.remove(&i);
                                retry.insert(i, Instant::now() + Duration::from_millis(500));
                            }
                            _ => {
                                ctx.stats.other_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    ("pong", _) => {}
                    _ => {
                        ctx.stats.other_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Message::Close(f)) => {
                if f.is_some_and(|f| u16::from(f.code) == 1008) {
                    ctx.stats.policy_closes.fetch_add(1, Ordering::Relaxed);
                }
                // Read on until the closing handshake ends the connection.
                last_rx = Instant::now();
            }
            Ok(_) => last_rx = Instant::now(),
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                return match maintenance {
                    Some(at) => End::Maintenance(at),
                    None => End::Closed,
                };
            }
        }
    }
}
