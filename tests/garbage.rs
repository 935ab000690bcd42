//! Random bytes after the handshake (and instead of it) never crash a shard
//! or disturb other clients: each bad connection ends on its own (the node
//! closes it while the test still holds its side open), and every socket
//! comes back.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Client, Raw, start_server};
use serde_json::json;

#[test]
fn random_bytes_end_only_their_own_connection() {
    // A head that never completes ends at the handshake timeout.
    let s = start_server(&["--shards", "2", "--handshake-timeout-secs", "2"]);
    let mut a = Client::connect(&s.ws_url("/ws?user=a"));
    let mut b = Client::connect(&s.ws_url("/ws?user=b"));
    b.subscribe("calm");
    let sockets = s.metric("corecast_sockets");
    // Reads what the node sends until it ends the connection; the test's
    // write side stays open, so only the node can end it. Returns how long
    // that took, or None if it did not within `limit`.
    let ended_by_node = |t: &mut TcpStream, limit: Duration| -> Option<Duration> {
        let start = Instant::now();
        t.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut b = [0u8; 4096];
        while start.elapsed() < limit {
            match t.read(&mut b) {
                Ok(0) => return Some(start.elapsed()),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return Some(start.elapsed()), // reset
            }
        }
        None
    };
    let mut rng = fastrand::Rng::with_seed(6455);
    // All 200 are sent first and held open (a head that never completes
    // takes the 2 s handshake timeout; one at a time that would be minutes).
    let mut held = Vec::new();
    for round in 0..200 {
        let len = rng.usize(1..2048);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let mut t = if round % 2 == 0 {
            // After a valid upgrade: junk frames (sometimes with a valid
            // masked header in front so the payload path is reached too).
            let raw = Raw::upgrade(s.addr, "/ws");
            if round % 4 == 0 {
                junk = common::client_frame(0x81, &junk, true);
            }
            raw.s
        } else {
            // Instead of HTTP.
            TcpStream::connect(s.addr).unwrap()
        };
        let _ = t.write_all(&junk);
        held.push((round, t));
        if round % 50 == 0 {
            let r = a.call(json!({"op":"publish","room":"calm","data":round,"id":round}));
            assert!(r["ev"] == "ack" || r["ev"] == "message", "{r}");
            assert_eq!(b.recv()["data"], json!(round));
        }
    }
    let sent = Instant::now();
    let mut open = Vec::new();
    for (round, t) in &mut held {
        let left = Duration::from_secs(4).saturating_sub(sent.elapsed());
        if ended_by_node(t, left.max(Duration::from_millis(100))).is_none() {
            open.push(*round);
        }
    }
    let slowest = sent.elapsed();
    eprintln!("FIGURE garbage: all ended {slowest:?} after the last was sent; still open after 4 s: {open:?}");
    assert!(open.is_empty(), "connections the node did not end within 4 s (rounds): {open:?}");
    assert_eq!(a.call(json!({"op":"ping","id":1})), json!({"ev":"pong","id":1}));
    s.wait_until("junk connections gone", || s.metric("corecast_connections") == 2.0);
    // HTTP-phase sockets are not in corecast_connections: count descriptors.
    s.wait_until("every socket back", || s.metric("corecast_sockets") == sockets);
    assert_eq!(s.http_get("/healthz").0, 200);
}
