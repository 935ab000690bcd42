//! Heartbeats (`--heartbeat-secs`): silent clients are reaped, clients that
//! answer pings stay.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{Client, DEADLINE, Raw, start_server};
use serde_json::json;

#[test]
fn silent_client_is_reaped_after_two_intervals_a_reading_client_stays() {
    let s = start_server(&["--shards", "1", "--heartbeat-secs", "1"]);
    let t = Instant::now();
    // Raw never answers pings (nor sends anything else).
    let mut silent = Raw::upgrade(s.addr, "/ws?user=silent");
    // tungstenite answers every ping while we keep reading.
    let mut alive = Client::connect(&s.ws_url("/ws?user=alive"));
    let reaper = std::thread::spawn(move || {
        let mut pings = 0;
        loop {
            match silent.read_frame() {
                Some((0x89, p)) => {
                    assert!(p.is_empty(), "heartbeat pings carry no payload");
                    pings += 1;
                }
                Some((0x88, p)) => {
                    let code = u16::from_be_bytes([p[0], p[1]]);
                    let at = t.elapsed();
                    silent.expect_eof();
                    return (pings, code, at);
                }
                Some((b0, _)) => panic!("unexpected frame {b0:#x}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    });
    while !reaper.is_finished() {
        assert!(t.elapsed() < DEADLINE, "silent client not reaped within {DEADLINE:?}");
        assert_eq!(alive.recv_json(Duration::from_millis(50)), None);
    }
    let (pings, code, at) = reaper.join().unwrap();
    assert!(pings >= 1, "pinged before being reaped");
    assert_eq!(code, 1008);
    // Silent for 2 intervals, reaped at the next visit of the sweep (2-3 s).
    assert!(at >= Duration::from_millis(1900) && at < Duration::from_secs(5), "reaped after {at:?}");
    // The reading client outlives another two intervals and still works.
    let t2 = Instant::now();
    while t2.elapsed() < Duration::from_millis(2500) {
        assert_eq!(alive.recv_json(Duration::from_millis(100)), None);
    }
    assert_eq!(alive.call(json!({"op":"ping","id":1})), json!({"ev":"pong","id":1}));
    s.wait_until("one connection left", || s.metric("corecast_connections") == 1.0);
    assert_eq!(s.metric("corecast_heartbeat_timeouts_total"), 1.0);
    assert!(s.metric("corecast_heartbeat_pings_total") >= 2.0);
}

#[test]
fn heartbeat_zero_sends_no_pings() {
    let s = start_server(&["--shards", "1", "--heartbeat-secs", "0"]);
    let mut raw = Raw::upgrade(s.addr, "/ws?user=quiet");
    // Absence over 2.5 s: what this proves is that 0 is not taken as a short
    // interval (a 1 s interval would have pinged by now). It cannot tell "0 =
    // off" from "0 = the default 25 s" without waiting 25 s; that `0` parses
    // to `Duration::ZERO` (off) is the config unit tests' part.
    raw.s.set_read_timeout(Some(Duration::from_millis(2500))).unwrap();
    let mut b = [0u8; 16];
    let r = raw.s.read(&mut b);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "expected silence, got {r:?}"
    );
    assert_eq!(s.metric("corecast_heartbeat_pings_total"), 0.0);
    assert_eq!(s.metric("corecast_connections"), 1.0);
}
