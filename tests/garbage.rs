//! Random bytes after the handshake (and instead of it) never crash a shard
//! or disturb other clients: each bad connection ends on its own.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Client, Raw, start_server};
use serde_json::json;

#[test]
fn random_bytes_end_only_their_own_connection() {
    let s = start_server(&["--shards", "2"]);
    let mut a = Client::connect(&s.ws_url("/ws?user=a"));
    let mut b = Client::connect(&s.ws_url("/ws?user=b"));
    b.subscribe("calm");
    let mut rng = fastrand::Rng::with_seed(6455);
    for round in 0..200 {
        let len = rng.usize(1..2048);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if round % 2 == 0 {
            // After a valid upgrade: junk frames (sometimes with a valid
            // masked header in front so the payload path is reached too).
            let mut raw = Raw::upgrade(s.addr, "/ws");
            if round % 4 == 0 {
                let mut f = common::client_frame(0x81, &junk, true);
                f.truncate(f.len().min(3000));
                junk = f;
            }
            let _ = raw.s.write_all(&junk);
            let _ = raw.s.shutdown(std::net::Shutdown::Write);
            raw.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut sink = Vec::new();
            let _ = raw.s.read_to_end(&mut sink);
        } else {
            // Instead of HTTP.
            let mut t = TcpStream::connect(s.addr).unwrap();
            let _ = t.write_all(&junk);
            let _ = t.shutdown(std::net::Shutdown::Write);
            t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut sink = Vec::new();
            let _ = t.read_to_end(&mut sink);
        }
        if round % 50 == 0 {
            let r = a.call(json!({"op":"publish","room":"calm","data":round,"id":round}));
            assert!(r["ev"] == "ack" || r["ev"] == "message", "{r}");
            assert_eq!(b.recv()["data"], json!(round));
        }
    }
    assert_eq!(a.call(json!({"op":"ping","id":1})), json!({"ev":"pong","id":1}));
    s.wait_until("junk connections gone", || s.metric("corecast_connections") == 2.0);
    assert_eq!(s.http_get("/healthz").0, 200);
}
