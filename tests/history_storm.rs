//! A recovery storm (PROTOCOL.md §7): 5000 clients resubscribe with `since`
//! at once on one node (with Redis, and standalone); every one recovers
//! exactly what it missed, and the node keeps answering a separate client's
//! pings meanwhile. The two storms never run at the same time (`ONE_AT_A_TIME`).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::history::{Pos, api_publish};
use common::priority::{nice, realtime};
use common::redis::{RedisServer, deadline};
use common::{Client, start_server};
use serde_json::json;
use tungstenite::Message;

const CLIENTS: usize = 5000;
const THREADS: usize = 10;
/// The bound on a ping round trip during the storm. The client threads run
/// at nice 19 (they stand in for remote clients: the node's threads come
/// first) and the pinger under SCHED_FIFO (its own scheduling is never what
/// is late), so what is measured is the node's shards. The bound is loose,
/// for a debug build: with 2500 connections ready at once a shard's run
/// queue takes a debug build ~100 ms to go round (seen 8-115 ms), while a
/// shard that blocked on the storm would hold the ping for the whole storm
/// (0.4-0.7 s). The issue's 100 ms is a speed target, measured on a release
/// build and recorded in bench/RESULTS.md (`cargo test --release --test
/// history_storm -- --nocapture`).
const PING_BOUND: Duration = Duration::from_millis(250);

/// The storms share the box's two cores: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn five_thousand_clients_recover_at_once_with_redis_and_the_node_stays_responsive() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let _d = deadline("recovery_storm_redis", Duration::from_secs(300));
    let r = RedisServer::start();
    storm(&["--redis", &r.url()]);
}

#[test]
fn five_thousand_clients_recover_at_once_standalone_and_the_node_stays_responsive() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let _d = deadline("recovery_storm_local", Duration::from_secs(300));
    storm(&[]);
}

fn storm(extra: &[&str]) {
    let mut args = vec!["--shards", "2", "--history-size", "100", "--max-ops-per-sec", "0"];
    args.extend_from_slice(extra);
    let s = start_server(&args);
    let room = "storm";
    let pos: Vec<Pos> = (1..=20).map(|i| api_publish(&s, room, json!(i))).collect();
    let since = json!({"epoch": pos[0].epoch, "offset": 10});
    let url = s.ws_url("/ws");
    let go = Arc::new(Barrier::new(THREADS + 1));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (url, go, since) = (url.clone(), go.clone(), since.clone());
            thread::spawn(move || {
                nice(19);
                let mut cs: Vec<Client> = (0..CLIENTS / THREADS).map(|_| Client::connect(&url)).collect();
                go.wait();
                let op = json!({"op":"subscribe","room":room,"since":since,"id":1}).to_string();
                for c in &mut cs {
                    c.ws.write(Message::text(op.clone())).expect("queue subscribe");
                }
                for c in &mut cs {
                    c.ws.flush().expect("send subscribe");
                }
                // Checked as text, not parsed: 55,000 JSON parses in a debug
                // test binary would take the cores the server needs.
                let mut recovered = 0;
                for c in &mut cs {
                    let v = text(c);
                    assert!(v.contains(r#""recovered":true"#) && v.starts_with(r#"{"ev":"subscribed""#), "{v}");
                    for n in 11..=20 {
                        let m = text(c);
                        assert!(m.ends_with(&format!(r#","offset":{n}}}"#)), "expected offset {n}: {m}");
                    }
                    recovered += 1;
                }
                (recovered, cs)
            })
        })
        .collect();
    // A separate client pings throughout the storm.
    // It counts from the moment the storm starts (not during the connects).
    let storming = Arc::new(AtomicBool::new(true));
    let started_storm = Arc::new(AtomicBool::new(false));
    let pinger = {
        let (url, storming, started_storm) = (url.clone(), storming.clone(), started_storm.clone());
        let mut c = Client::connect(&url);
        thread::spawn(move || {
            realtime();
            let mut worst = Duration::ZERO;
            let mut pings = 0;
            while storming.load(Ordering::SeqCst) {
                let counts = started_storm.load(Ordering::SeqCst);
                let t = Instant::now();
                let v = c.call(json!({"op":"ping","id":pings}));
                assert_eq!(v, json!({"ev":"pong","id":pings}));
                if counts {
                    worst = worst.max(t.elapsed());
                    pings += 1;
                }
                thread::sleep(Duration::from_millis(10));
            }
            (worst, pings)
        })
    };
    go.wait();
    started_storm.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut recovered = 0;
    let mut keep = Vec::new();
    for w in workers {
        let (n, cs) = w.join().unwrap();
        recovered += n;
        keep.push(cs);
    }
    let took = started.elapsed();
    storming.store(false, Ordering::SeqCst);
    let (worst, pings) = pinger.join().unwrap();
    eprintln!("{recovered} clients recovered in {took:?}; {pings} pings, worst round trip {worst:?}");
    assert_eq!(recovered, CLIENTS);
    assert_eq!(s.metric("corecast_history_recovered_total") as usize, CLIENTS);
    // Exactly what it missed: nothing after 20 but the next live message
    // (a duplicate of 11..=20, or anything else, would come first).
    assert_eq!(api_publish(&s, room, json!("end")).offset, 21);
    for c in keep.iter_mut().flatten() {
        let m = text(c);
        assert!(m.starts_with(r#"{"ev":"message""#) && m.ends_with(r#","offset":21}"#), "expected offset 21: {m}");
    }
    assert!(pings > 0);
    assert!(worst < PING_BOUND, "a ping took {worst:?} during a storm of {took:?} (bound {PING_BOUND:?})");
}

/// The next text message, within a minute.
fn text(c: &mut Client) -> String {
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = c.ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    }
    loop {
        match c.ws.read().expect("a message within a minute") {
            Message::Text(t) => return t.to_string(),
            _ => continue,
        }
    }
}
