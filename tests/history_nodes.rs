//! Room history across nodes and failures (PROTOCOL.md §7), with real
//! redis-server and corecast processes: a client away while 100 messages are
//! published comes back to either node and gets exactly those; a node
//! SIGKILLed and restarted, or drained under a 1000 msg/s publisher, loses
//! nothing for clients that reconnect with their position; the subscriber
//! link killed mid-stream is caught up; a Redis that lost its data gives a
//! new epoch and `recovered:false`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::history::{Pos, Roamer, api_publish, messages, next_message, offsets, roam, subscribe_since};
use common::redis::{RedisServer, deadline, wait_until};
use common::{Client, Server, start_server};
use serde_json::json;

fn node(r: &RedisServer, extra: &[&str]) -> Server {
    let url = r.url();
    let mut args = vec!["--shards", "2", "--history-size", "5000", "--max-ops-per-sec", "0", "--redis", &url];
    args.extend_from_slice(extra);
    start_server(&args)
}

fn away_while_100_are_published(back_to_b: bool) {
    let r = RedisServer::start();
    let (a, b) = (node(&r, &[]), node(&r, &[]));
    let room = "away";
    let mut c = Client::connect(&a.ws_url("/ws"));
    let v = subscribe_since(&mut c, room, None);
    assert_eq!(v["offset"], 0);
    for i in 0..5 {
        api_publish(&a, room, json!(i));
    }
    let seen = messages(&mut c, room, 5, Duration::from_secs(5));
    let last = Pos::of(&seen[4]);
    assert_eq!(last.offset, 5);
    drop(c); // Cut off.
    for i in 0..100 {
        api_publish(&b, room, json!({"while_away": i}));
    }
    let back = if back_to_b { &b } else { &a };
    let mut c = Client::connect(&back.ws_url("/ws"));
    let v = subscribe_since(&mut c, room, Some(&last));
    assert_eq!(v, json!({"ev":"subscribed","room":room,"id":"s","recovered":true,"epoch":last.epoch,"offset":105}));
    let missed = messages(&mut c, room, 100, Duration::from_secs(10));
    assert_eq!(offsets(&missed), (6..=105).collect::<Vec<_>>());
    assert!(missed.iter().enumerate().all(|(i, m)| m["data"] == json!({"while_away": i})));
    api_publish(&a, room, json!("live-a"));
    api_publish(&b, room, json!("live-b"));
    let live = messages(&mut c, room, 2, Duration::from_secs(5));
    assert_eq!(offsets(&live), [106, 107]);
    c.expect_silence(Duration::from_millis(300));
}

#[test]
fn a_client_away_while_100_are_published_gets_exactly_those_on_the_other_node() {
    let _d = deadline("away_b", Duration::from_secs(120));
    away_while_100_are_published(true);
}

#[test]
fn a_client_away_while_100_are_published_gets_exactly_those_on_the_same_node() {
    let _d = deadline("away_a", Duration::from_secs(120));
    away_while_100_are_published(false);
}

/// Publishes into `room` on `s` over one WebSocket at about `rate` per
/// second until `stop`; returns how many it sent.
fn publisher(s: &Server, room: &'static str, rate: u32, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    let url = s.ws_url("/ws?user=pub");
    thread::spawn(move || {
        let mut c = Client::connect(&url);
        let start = Instant::now();
        let mut sent = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
            while sent < due {
                c.send_json(&json!({"op":"publish","room":room,"data":sent}));
                sent += 1;
            }
            thread::sleep(Duration::from_millis(5));
        }
        sent
    })
}

/// Starts `n` roamers in `room`; each connects to `url(connects)`.
fn roamers(
    n: usize,
    room: &'static str,
    url: Arc<dyn Fn(u32) -> String + Send + Sync>,
    done: &Arc<AtomicU64>,
    subscribed: &Arc<AtomicUsize>,
) -> Vec<thread::JoinHandle<Roamer>> {
    (0..n)
        .map(|_| {
            let (url, done, subscribed) = (url.clone(), done.clone(), subscribed.clone());
            thread::spawn(move || roam(&*url, room, &done, &subscribed, Duration::from_secs(90)))
        })
        .collect()
}

/// Stops the publisher, marks the end with one more publish, and returns
/// every roamer's (missing, duplicated) count and the roamers.
fn finish(
    last_node: &Server,
    room: &str,
    stop: &AtomicBool,
    pub_thread: thread::JoinHandle<u64>,
    done: &AtomicU64,
    rs: Vec<thread::JoinHandle<Roamer>>,
) -> (u64, u64, Vec<Roamer>) {
    stop.store(true, Ordering::SeqCst);
    let sent = pub_thread.join().unwrap();
    let end = api_publish(last_node, room, json!("end"));
    done.store(end.offset, Ordering::SeqCst);
    let rs: Vec<Roamer> = rs.into_iter().map(|h| h.join().unwrap()).collect();
    let (mut missing, mut dup) = (0, 0);
    for r in &rs {
        let (m, d) = r.tracker.errors(end.offset);
        missing += m;
        dup += d;
        assert_eq!(r.tracker.unrecovered, 0, "every reconnect recovered");
        assert_eq!(r.tracker.gaps, 0);
        r.tracker.assert_in_order();
    }
    eprintln!("published {sent} (+1), final offset {}, {} clients", end.offset, rs.len());
    (missing, dup, rs)
}

#[test]
fn a_node_killed_and_restarted_mid_stream_loses_nothing_for_clients_that_come_back() {
    let _d = deadline("kill_restart", Duration::from_secs(180));
    let r = RedisServer::start();
    let a = node(&r, &[]);
    let b = node(&r, &[]);
    let room = "crash";
    let current = Arc::new(Mutex::new(a.ws_url("/ws")));
    let cur = current.clone();
    let url: Arc<dyn Fn(u32) -> String + Send + Sync> = Arc::new(move |_| cur.lock().unwrap().clone());
    let (done, subscribed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicUsize::new(0)));
    let rs = roamers(10, room, url, &done, &subscribed);
    wait_until("all subscribed", Duration::from_secs(20), || subscribed.load(Ordering::SeqCst) == 10);
    let stop = Arc::new(AtomicBool::new(false));
    let p = publisher(&b, room, 300, stop.clone());
    thread::sleep(Duration::from_millis(700));
    let mut a = a;
    a.child.kill().unwrap(); // SIGKILL
    let _ = a.child.wait();
    let a2 = node(&r, &[]);
    *current.lock().unwrap() = a2.ws_url("/ws");
    thread::sleep(Duration::from_millis(700));
    let (missing, dup, rs) = finish(&b, room, &stop, p, &done, rs);
    assert_eq!((missing, dup), (0, 0), "missing or duplicated offsets");
    assert!(rs.iter().all(|r| r.connects >= 2), "every client reconnected");
}

#[test]
fn a_drained_node_under_1000_msgs_per_sec_loses_nothing_for_clients_that_move() {
    let _d = deadline("drain", Duration::from_secs(180));
    let r = RedisServer::start();
    let mut a = node(&r, &["--drain-secs", "2"]);
    let b = node(&r, &[]);
    let room = "drain";
    let (a_url, b_url) = (a.ws_url("/ws"), b.ws_url("/ws"));
    let url: Arc<dyn Fn(u32) -> String + Send + Sync> =
        Arc::new(move |n| if n == 0 { a_url.clone() } else { b_url.clone() });
    let (done, subscribed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients = 20;
    let rs = roamers(clients, room, url, &done, &subscribed);
    wait_until("all subscribed", Duration::from_secs(20), || subscribed.load(Ordering::SeqCst) == clients);
    let stop = Arc::new(AtomicBool::new(false));
    let p = publisher(&b, room, 1000, stop.clone());
    thread::sleep(Duration::from_millis(500));
    a.sigterm();
    let status = a.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "drained node exits cleanly: {status}");
    thread::sleep(Duration::from_millis(1000));
    let (missing, dup, rs) = finish(&b, room, &stop, p, &done, rs);
    assert_eq!(missing + dup, 0, "missing {missing}, duplicated {dup}");
    assert!(rs.iter().all(|r| r.maintenance == 1 && r.connects == 2), "each got maintenance and moved once");
}

#[test]
fn a_killed_subscriber_link_is_caught_up_in_order_once() {
    let _d = deadline("link_kill", Duration::from_secs(180));
    let r = RedisServer::start();
    let a = node(&r, &[]);
    let room = "linkkill";
    let a_url = a.ws_url("/ws");
    let url: Arc<dyn Fn(u32) -> String + Send + Sync> = Arc::new(move |_| a_url.clone());
    let (done, subscribed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicUsize::new(0)));
    let rs = roamers(5, room, url, &done, &subscribed);
    wait_until("all subscribed", Duration::from_secs(20), || subscribed.load(Ordering::SeqCst) == 5);
    let stop = Arc::new(AtomicBool::new(false));
    let p = publisher(&a, room, 1000, stop.clone());
    let before = a.metric("corecast_redis_reconnects_total");
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(400));
        let killed: u64 = r.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).parse().unwrap();
        assert!(killed >= 2, "the node's subscriber connections were killed ({killed})");
        // Both shards' subscriber connections back at Redis (a `/readyz` read
        // right after the kill can still say 200 before the node noticed).
        a.wait_until("subscriber links back", || {
            r.cli(&["CLIENT", "LIST", "TYPE", "pubsub"]).lines().filter(|l| l.contains("corecast-sub")).count() >= 2
                && a.links_up()
        });
    }
    thread::sleep(Duration::from_millis(400));
    let (missing, dup, rs) = finish(&a, room, &stop, p, &done, rs);
    assert_eq!((missing, dup), (0, 0), "missing or duplicated offsets");
    assert!(rs.iter().all(|r| r.connects == 1), "no client had to reconnect");
    assert!(a.metric("corecast_redis_reconnects_total") >= before + 6.0);
    eprintln!("caught up from history: {}", a.metric("corecast_history_caught_up_total"));
    // In order (`finish` asserted it per delivery too): on its one
    // connection, each roamer got start+1, start+2, .. end in arrival order.
    for r in &rs {
        let start = r.tracker.start.unwrap();
        let arrived: Vec<u64> = r.tracker.arrivals.iter().map(|&(_, o)| o).collect();
        assert_eq!(arrived, (start + 1..=start + arrived.len() as u64).collect::<Vec<_>>());
        assert_eq!(arrived.last().copied(), Some(r.tracker.highest()));
    }
}

/// The order check above can fail: a `Tracker` fed deliveries out of order
/// (within a connection, and across a reconnect) reports them.
#[test]
fn the_tracker_catches_deliveries_out_of_order() {
    let msg = |o: u64| json!({"ev":"message","room":"r","epoch":"e","offset":o,"data":null});
    let sub = json!({"ev":"subscribed","room":"r","id":"s","epoch":"e","offset":10});
    // In order, with a reconnect resuming above the last one: clean.
    let mut t = common::history::Tracker::default();
    t.connected();
    t.subscribed(&sub);
    for o in [11, 12, 13] {
        t.take(&msg(o));
    }
    t.connected();
    for o in [14, 15] {
        t.take(&msg(o));
    }
    t.assert_in_order();
    assert_eq!(t.arrivals, [(1, 11), (1, 12), (1, 13), (2, 14), (2, 15)]);
    assert_eq!(t.errors(15), (0, 0));
    // Swapped within a connection: none missing, none twice, yet caught.
    let mut t = common::history::Tracker::default();
    t.connected();
    t.subscribed(&sub);
    for o in [11, 13, 12, 14] {
        t.take(&msg(o));
    }
    assert_eq!(t.errors(14), (0, 0), "the counts alone cannot see it");
    assert_eq!(t.out_of_order.len(), 3, "13 after 11, 12 after 13, 14 after 12: {:?}", t.out_of_order);
    assert!(std::panic::catch_unwind(|| t.assert_in_order()).is_err());
    // A reconnect that starts again below what was already delivered.
    let mut t = common::history::Tracker::default();
    t.connected();
    t.subscribed(&sub);
    for o in [11, 12, 13] {
        t.take(&msg(o));
    }
    t.connected();
    t.take(&msg(12));
    assert_eq!(t.out_of_order.len(), 1, "{:?}", t.out_of_order);
    assert!(std::panic::catch_unwind(|| t.assert_in_order()).is_err());
    // The first message on the first connection must follow `subscribed`.
    let mut t = common::history::Tracker::default();
    t.connected();
    t.subscribed(&sub);
    t.take(&msg(9));
    assert!(std::panic::catch_unwind(|| t.assert_in_order()).is_err());
}

#[test]
fn a_redis_that_lost_its_data_gives_a_new_epoch_and_no_false_recovery() {
    let _d = deadline("redis_reset", Duration::from_secs(120));
    let mut r = RedisServer::start();
    let a = node(&r, &[]);
    let room = "reset";
    let mut c = Client::connect(&a.ws_url("/ws"));
    subscribe_since(&mut c, room, None);
    let published: Vec<Pos> = (1..=5).map(|i| api_publish(&a, room, json!(i))).collect();
    let old = published[4].clone();
    assert_eq!(offsets(&messages(&mut c, room, 5, Duration::from_secs(5))), [1, 2, 3, 4, 5]);
    r.restart(); // No persistence: everything is gone.
    a.wait_until("links back", || a.links_up());
    // The connected client is told its stream has a gap: the room has no
    // history now (the empty epoch; a read creates none).
    let gap = c.recv_json(Duration::from_secs(10)).expect("a gap event");
    assert_eq!(gap, json!({"ev":"gap","room":room,"epoch":"","offset":0}));
    // Every link back (the gap came over the subscriber link of c's shard;
    // d's read may go over another shard's publisher link).
    a.wait_until("every link back", || a.links_up());
    // A position from before is not recovered.
    let mut d = Client::connect(&a.ws_url("/ws"));
    let v = subscribe_since(&mut d, room, Some(&old));
    assert_eq!(v, json!({"ev":"subscribed","room":room,"id":"s","recovered":false,"epoch":"","offset":0}));
    // The first publish draws a new epoch, from offset 1.
    let p = api_publish(&a, room, json!("after"));
    let new_epoch = p.epoch.clone();
    assert!(new_epoch != old.epoch && !new_epoch.is_empty() && p.offset == 1, "{p:?}");
    for c in [&mut c, &mut d] {
        let m = next_message(c, room, Duration::from_secs(5)).unwrap();
        assert_eq!((m["epoch"].as_str(), m["offset"].as_u64()), (Some(new_epoch.as_str()), Some(1)));
    }
}
