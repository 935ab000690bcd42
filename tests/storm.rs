//! A storm of 10,000 connections arriving at once (a node failure elsewhere
//! sends its clients here) is served without failures: the accept pacing and
//! the kernel backlog absorb it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::start_server;

const STORM: usize = 10_000;
const THREADS: usize = 8;

#[test]
fn ten_thousand_connections_at_once_are_all_upgraded() {
    // All 10,000 handshakes are in flight at once: past the default
    // HTTP-phase cap of 1024 per shard (tested in tests/ops.rs), which would
    // reset the rest. This test is about taking a storm, so the cap is raised.
    let s = start_server(&["--shards", "2", "--max-handshakes-per-shard", "10000"]);
    let addr = s.addr;
    let started = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut socks = Vec::with_capacity(STORM / THREADS);
                for i in 0..STORM / THREADS {
                    let mut c = TcpStream::connect(addr).expect("connect");
                    let req = common::upgrade_request(&format!("/ws?user=s{t}-{i}"), "");
                    c.write_all(req.as_bytes()).expect("send handshake");
                    socks.push(c);
                }
                let mut ok = 0;
                for mut c in socks.iter() {
                    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut buf = [0u8; 12];
                    if c.read_exact(&mut buf).is_ok() && &buf == b"HTTP/1.1 101" {
                        ok += 1;
                    }
                }
                (ok, socks)
            })
        })
        .collect();
    let mut upgraded = 0;
    let mut keep = Vec::new();
    for h in handles {
        let (ok, socks) = h.join().unwrap();
        upgraded += ok;
        keep.push(socks);
    }
    let took = started.elapsed();
    assert_eq!(upgraded, STORM, "every connection of the storm is upgraded");
    s.wait_until("all counted", || s.metric("corecast_connections") as usize == STORM);
    assert!(s.metric("corecast_connections{shard=\"0\"}") > 0.0 && s.metric("corecast_connections{shard=\"1\"}") > 0.0);
    eprintln!("storm of {STORM} upgraded in {took:?}");
}
