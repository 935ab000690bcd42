//! Limits: op rate, rooms per connection, connections per node, accept rate,
//! and the HTTP head (slowloris timeout, 431).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Client, DEADLINE, parse_response, start_server};
use serde_json::{Value, json};
use tungstenite::Message;

/// Sends an upgrade request and returns the response's status (0 if none).
fn upgrade_status(addr: SocketAddr, user: &str) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(common::upgrade_request(&format!("/ws?user={user}"), "").as_bytes()).unwrap();
    (read_status(&mut s), s)
}

/// Reads a response head and returns its status.
fn read_status(s: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    parse_response(&head).0
}

/// Reads everything up to the server's close frame: (text messages, close code).
fn read_until_close(c: &mut Client) -> (Vec<Value>, Option<u16>) {
    let end = Instant::now() + DEADLINE;
    let mut msgs = Vec::new();
    loop {
        assert!(Instant::now() < end, "no close frame within {DEADLINE:?}");
        match c.ws.read() {
            Ok(Message::Text(t)) => msgs.push(serde_json::from_str(&t).unwrap()),
            Ok(Message::Close(f)) => return (msgs, f.map(|f| u16::from(f.code))),
            Ok(_) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn flooding_client_is_rate_limited_then_closed_others_unaffected() {
    let s = start_server(&["--shards", "1", "--max-ops-per-sec", "10"]);
    let mut flood = Client::connect(&s.ws_url("/ws?user=flood"));
    let mut calm = Client::connect(&s.ws_url("/ws?user=calm"));
    for i in 0..300 {
        flood.send_json(&json!({"op":"ping","id":i}));
    }
    // The other client, on the same shard, is answered at once.
    let t = Instant::now();
    assert_eq!(calm.call(json!({"op":"ping","id":"c"})), json!({"ev":"pong","id":"c"}));
    assert!(t.elapsed() < Duration::from_millis(500), "calm client waited {:?}", t.elapsed());
    let (msgs, code) = read_until_close(&mut flood);
    assert_eq!(code, Some(1008));
    let pongs = msgs.iter().filter(|m| m["ev"] == "pong").count();
    let limited: Vec<&Value> = msgs.iter().filter(|m| m["ev"] == "error").collect();
    // Burst of 2x the rate, plus what refilled while the flood arrived.
    assert!((20..40).contains(&pongs), "{pongs} pongs");
    assert!(limited.len() > 50, "{} refusals before the close", limited.len());
    for e in &limited {
        assert_eq!(e["code"], "rate_limited", "{e}");
        assert!(e["id"].is_u64(), "the refusal carries the op's id: {e}");
    }
    assert_eq!(s.metric("corecast_rate_limit_disconnects_total"), 1.0);
    assert_eq!(s.metric("corecast_rate_limited_total"), limited.len() as f64);
    assert_eq!(calm.call(json!({"op":"ping","id":"d"})), json!({"ev":"pong","id":"d"}));
}

#[test]
fn subscribing_past_max_rooms_is_refused_with_too_large() {
    let s = start_server(&["--max-rooms-per-connection", "3"]);
    let mut c = Client::connect(&s.ws_url("/ws?user=rooms"));
    for r in ["r0", "r1", "r2"] {
        c.subscribe(r);
    }
    let e = c.call(json!({"op":"subscribe","room":"r3","id":"x"}));
    assert_eq!(e["ev"], "error", "{e}");
    assert_eq!(e["code"], "too_large");
    assert_eq!(e["id"], "x");
    // Subscribing again to a room it is in is not a new room.
    c.subscribe("r1");
    let r = c.call(json!({"op":"unsubscribe","room":"r0","id":1}));
    assert_eq!(r["ev"], "unsubscribed");
    c.subscribe("r3");
    assert_eq!(s.metric("corecast_room_limit_refusals_total"), 1.0);
}

#[test]
fn max_connections_refuses_the_next_upgrade_with_503_until_one_closes() {
    let s = start_server(&["--shards", "2", "--max-connections", "5"]);
    let mut cs: Vec<Client> = (0..5).map(|i| Client::connect(&s.ws_url(&format!("/ws?user=m{i}")))).collect();
    let (st, _) = upgrade_status(s.addr, "sixth");
    assert_eq!(st, 503);
    assert_eq!(s.metric("corecast_max_connections_refused_total"), 1.0);
    let mut gone = cs.pop().unwrap();
    gone.ws.close(None).unwrap();
    while gone.ws.read().is_ok() {}
    s.wait_until("a place freed", || s.metric("corecast_connections") == 4.0);
    let mut c = Client::connect(&s.ws_url("/ws?user=after"));
    assert_eq!(c.call(json!({"op":"ping","id":1})), json!({"ev":"pong","id":1}));
    assert_eq!(upgrade_status(s.addr, "seventh").0, 503);
}

#[test]
fn connection_storm_is_paced_by_the_accept_limit_and_all_served() {
    let s = start_server(&["--shards", "1", "--max-accepts-per-sec", "2000"]);
    let total = 3000;
    let threads = 6;
    let t = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|w| {
            let addr = s.addr;
            std::thread::spawn(move || {
                // Every connection first (they queue in the backlog), then
                // every request, then every answer.
                let mut socks: Vec<TcpStream> =
                    (0..total / threads).map(|_| TcpStream::connect(addr).expect("connect")).collect();
                for (i, so) in socks.iter_mut().enumerate() {
                    so.set_read_timeout(Some(DEADLINE)).unwrap();
                    so.write_all(common::upgrade_request(&format!("/ws?user=s{w}-{i}"), "").as_bytes()).unwrap();
                }
                let ok = socks.iter_mut().map(read_status).filter(|&st| st == 101).count();
                (ok, socks)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut ok = 0;
    for h in workers {
        let (n, socks) = h.join().unwrap();
        ok += n;
        held.extend(socks);
    }
    let took = t.elapsed();
    assert_eq!(ok, total, "every connection of the storm is served");
    assert!(took < Duration::from_secs(9), "storm took {took:?}");
    // 3000 at 2000/s with a 200 burst cannot go through without pauses.
    assert!(took >= Duration::from_millis(1000), "storm took only {took:?}");
    assert!(s.metric("corecast_accept_pauses_total") > 0.0);
    assert_eq!(s.metric("corecast_connections"), total as f64);
}

#[test]
fn slowloris_head_is_closed_after_the_handshake_timeout() {
    let s = start_server(&["--handshake-timeout-secs", "1"]);
    let mut so = TcpStream::connect(s.addr).unwrap();
    so.set_read_timeout(Some(DEADLINE)).unwrap();
    let t = Instant::now();
    so.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: webso").unwrap();
    let mut rest = Vec::new();
    let r = so.read_to_end(&mut rest);
    let at = t.elapsed();
    assert!(r.is_ok() || r.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset), "{r:?}");
    assert!(at >= Duration::from_millis(900) && at < Duration::from_secs(4), "closed after {at:?}");
    assert!(!rest.starts_with(b"HTTP/1.1 101"));
    // The server is fine.
    assert_eq!(s.http_get("/healthz").0, 200);
}

#[test]
fn oversized_request_head_gets_431() {
    let s = start_server(&[]);
    let mut so = TcpStream::connect(s.addr).unwrap();
    so.set_read_timeout(Some(DEADLINE)).unwrap();
    let pad = "a".repeat(20 * 1024);
    let _ = so.write_all(common::upgrade_request("/ws", &format!("X-Pad: {pad}\r\n")).as_bytes());
    assert_eq!(read_status(&mut so), 431);
}
