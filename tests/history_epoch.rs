//! A room's epoch is bound to the Redis process whose history it names
//! (PROTOCOL.md §7, docs/history.md "Epochs"), with real redis-server
//! processes and corecast nodes:
//!
//! - a Redis restarted from an older RDB snapshot (SIGKILL after 50 more
//!   publishes): every position held from before, in a room with a live
//!   subscriber and in one nobody was subscribed to, gets `recovered:false`,
//!   new publishes start a new epoch at offset 1, and no position is ever
//!   given to two different messages;
//! - a Sentinel failover to a replica that missed the last writes, while
//!   publishers on two nodes keep going: no position ever names two
//!   messages, the live subscribers on both nodes see the new epoch and
//!   never get an old-epoch offset again, and positions from the lost range
//!   get `recovered:false`;
//! - a read of an unknown room (subscribe, `history`) writes nothing to Redis;
//! - a message a node delivered, which Redis sends it again after the
//!   catch-up read found the history untrusted (`gap` to the empty epoch),
//!   is not delivered a second time.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::history::{Pos, api_publish, messages, offsets, subscribe_since};
use common::redis::{RedisServer, RespConn, deadline, expect_event, wait_until};
use common::redis_topology::{Collector, SentinelSetup};
use common::{Client, Server, start_server};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

fn hist_node(url: &str) -> Server {
    start_server(&["--shards", "2", "--history-size", "1000", "--max-ops-per-sec", "0", "--redis", url])
}

fn meta(room: &str) -> String {
    format!("{{cc:room:{room}}}:meta")
}

/// `POST /api/publish` until Redis takes it (a restart or failover refuses for a while).
fn publish_retrying(s: &Server, room: &str, data: Value) -> Pos {
    let body = json!({"room": room, "data": data}).to_string();
    let end = Instant::now() + 60 * SECOND;
    loop {
        let (st, reply) = s.http("POST", "/api/publish", &[("Content-Type", "application/json")], body.as_bytes());
        if st == 200 {
            let v: Value = serde_json::from_str(&reply).expect("JSON reply");
            return Pos::of(&v);
        }
        assert!(Instant::now() < end, "publish not taken within 60 s: {st} {reply}\n{}", s.logs());
        thread::sleep(Duration::from_millis(100));
    }
}

/// Records that position `p` was given to message `data`; panics if it had
/// been given to another one (an offset reused inside an epoch).
fn record(positions: &mut BTreeMap<(String, u64), Value>, p: &Pos, data: &Value) {
    if let Some(old) = positions.insert((p.epoch.clone(), p.offset), data.clone()) {
        assert_eq!(&old, data, "position {p:?} given to two messages");
    }
}

/// A client holding `since` subscribes: `recovered:false`, the room's
/// current position `now`, and nothing replayed.
fn assert_not_recovered(node: &Server, room: &str, since: &Pos, now: &Pos) {
    let mut cl = Client::connect(&node.ws_url("/ws"));
    let v = subscribe_since(&mut cl, room, Some(since));
    assert_eq!(v["recovered"], false, "since {since:?}: {v}");
    assert_eq!((v["epoch"].as_str(), v["offset"].as_u64()), (Some(now.epoch.as_str()), Some(now.offset)), "{v}");
    cl.expect_silence(Duration::from_millis(200));
}

/// `BGSAVE`, and waits until it is on disk.
fn bgsave(r: &RedisServer) {
    let before = r.cli(&["LASTSAVE"]);
    // A second apart at least: LASTSAVE has a resolution of one second.
    thread::sleep(Duration::from_millis(1100));
    assert!(r.cli(&["BGSAVE"]).contains("Background saving started"));
    wait_until("the snapshot is written", 20 * SECOND, || {
        let info = r.cli(&["INFO", "persistence"]);
        info.contains("rdb_bgsave_in_progress:0")
            && info.contains("rdb_last_bgsave_status:ok")
            && r.cli(&["LASTSAVE"]) != before
    });
}

#[test]
fn a_redis_restarted_from_an_older_snapshot_starts_new_epochs_and_recovers_no_old_position() {
    let _d = deadline("a_redis_restarted_from_an_older_snapshot", 180 * SECOND);
    let mut redis = RedisServer::start();
    let node = hist_node(&redis.url());
    // "live" has a subscriber throughout; nobody is subscribed to "offline".
    let rooms = ["live", "offline"];
    let mut live = Client::connect(&node.ws_url("/ws"));
    subscribe_since(&mut live, "live", None);
    let mut positions = BTreeMap::new();
    let mut held: BTreeMap<&str, Vec<Pos>> = BTreeMap::new();
    for room in rooms {
        for i in 1..=50u64 {
            let p = api_publish(&node, room, json!(i));
            assert_eq!(p.offset, i);
            record(&mut positions, &p, &json!(i));
            held.entry(room).or_default().push(p);
        }
    }
    bgsave(&redis);
    for room in rooms {
        for i in 51..=100u64 {
            let p = api_publish(&node, room, json!(i));
            assert_eq!(p.offset, i);
            record(&mut positions, &p, &json!(i));
            held.entry(room).or_default().push(p);
        }
    }
    let old_epoch = held["live"][0].epoch.clone();
    let got = messages(&mut live, "live", 100, 10 * SECOND);
    assert_eq!(offsets(&got), (1..=100).collect::<Vec<_>>());
    let old_run = redis.cli(&["HGET", &meta("live"), "run"]);
    assert_eq!(redis.cli(&["INFO", "server"]).lines().find_map(|l| l.strip_prefix("run_id:")), Some(old_run.as_str()));

    // The crash: the last 50 of each room are lost; the snapshot's meta survives.
    redis.kill();
    redis.restart();
    for room in rooms {
        assert_eq!(redis.cli(&["HGET", &meta(room), "offset"]), "50", "{room}: the snapshot's history is back");
        assert_eq!(redis.cli(&["HGET", &meta(room), "run"]), old_run);
    }
    assert_ne!(redis.cli(&["INFO", "server"]).lines().find_map(|l| l.strip_prefix("run_id:")), Some(old_run.as_str()));

    // Before any new publish: the loaded history is not trusted, and
    // reading it changes nothing in Redis.
    wait_until("the node is ready again, every link up", 30 * SECOND, || node.links_up());
    let mut probe = Client::connect(&node.ws_url("/ws"));
    let v = subscribe_since(&mut probe, "offline", Some(&held["offline"][9]));
    assert_eq!(v["recovered"], false, "{v}");
    assert_ne!(v["epoch"], old_epoch.as_str(), "{v}");
    probe.expect_silence(Duration::from_millis(200));
    drop(probe);
    for room in rooms {
        assert_eq!(redis.cli(&["HGET", &meta(room), "offset"]), "50", "{room}: a read wrote nothing");
        assert_eq!(redis.cli(&["HGET", &meta(room), "epoch"]), old_epoch_of(&held[room]));
    }

    // New publishes: a new epoch from 1, past every offset held before.
    let mut now = BTreeMap::new();
    for room in rooms {
        let first = publish_retrying(&node, room, json!("new 1"));
        assert_eq!(first.offset, 1, "{room}: {first:?}");
        assert_ne!(first.epoch, old_epoch_of(&held[room]), "{room}: a new epoch");
        record(&mut positions, &first, &json!("new 1"));
        let mut last = first.clone();
        for i in 2..=110u64 {
            let data = json!(format!("new {i}"));
            last = api_publish(&node, room, data.clone());
            assert_eq!((last.epoch.as_str(), last.offset), (first.epoch.as_str(), i));
            record(&mut positions, &last, &data);
        }
        now.insert(room, last);
    }

    // The live subscriber: never an old-epoch message again, the new epoch in order.
    let mut after = Vec::new();
    let end = Instant::now() + 20 * SECOND;
    while !after.last().is_some_and(|v: &Value| v["ev"] == "message" && v["offset"] == 110) {
        let left = end.saturating_duration_since(Instant::now());
        after.push(live.recv_json(left).unwrap_or_else(|| panic!("the new epoch up to 110 live: {after:?}")));
    }
    let mut prev = 0;
    for v in &after {
        assert!(v["ev"] == "message" || v["ev"] == "gap", "{v}");
        if v["ev"] == "gap" && v["epoch"] == "" {
            continue; // "no history yet": the restarted Redis, before the first publish
        }
        assert_eq!(v["epoch"], now["live"].epoch.as_str(), "only the new epoch after the restart: {v}");
        let o = v["offset"].as_u64().expect("offset");
        assert!(o > prev || (o == prev && v["ev"] == "gap"), "in order: {after:?}");
        if v["ev"] == "message" {
            record(&mut positions, &Pos::of(v), &v["data"]);
        }
        prev = o;
    }

    // Every position held from before the crash, lost or not: recovered:false.
    for room in rooms {
        for o in [10u64, 50, 60, 100] {
            assert_not_recovered(&node, room, &held[room][o as usize - 1], &now[room]);
        }
        // The new epoch itself recovers exactly.
        let mut cl = Client::connect(&node.ws_url("/ws"));
        let since = Pos { epoch: now[room].epoch.clone(), offset: 100 };
        let v = subscribe_since(&mut cl, room, Some(&since));
        assert_eq!(v["recovered"], true, "{v}");
        let missed = messages(&mut cl, room, 10, 10 * SECOND);
        assert_eq!(offsets(&missed), (101..=110).collect::<Vec<_>>());
        for m in &missed {
            record(&mut positions, &Pos::of(m), &m["data"]);
        }
    }
}

fn old_epoch_of(held: &[Pos]) -> String {
    held[0].epoch.clone()
}

/// Publishes `{"n": i}` into `room` over the API of `nodes` in turn until
/// stopped; every acknowledged position is kept with its data.
fn publisher(
    nodes: Vec<std::net::SocketAddr>,
    room: &'static str,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<(Pos, Value)>> {
    thread::spawn(move || {
        let mut acked = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            let data = json!({"n": i});
            let body = json!({"room": room, "data": data}).to_string();
            let addr = nodes[i as usize % nodes.len()];
            let (st, reply) =
                common::http_at(addr, "POST", "/api/publish", &[("Content-Type", "application/json")], body.as_bytes());
            if st == 200 {
                let v: Value = serde_json::from_str(&reply).expect("JSON reply");
                acked.push((Pos::of(&v), data));
            }
            thread::sleep(Duration::from_millis(10));
        }
        acked
    })
}

#[test]
fn a_sentinel_failover_that_lost_the_last_writes_never_gives_a_position_to_two_messages() {
    let _d = deadline("a_sentinel_failover_that_lost_the_last_writes", 240 * SECOND);
    let mut s = SentinelSetup::start();
    let new_port = s.replica.port;
    let (n0, n1) = (hist_node(&s.url()), hist_node(&s.url()));
    let room = "lossy";
    let mut subs = Vec::new();
    for node in [&n0, &n1] {
        let mut c = Client::connect(&node.ws_url("/ws"));
        subscribe_since(&mut c, room, None);
        subs.push(Collector::start(c));
    }
    let mut positions = BTreeMap::new();
    let mut before = Vec::new();
    for i in 1..=20u64 {
        let data = json!(i);
        let p = api_publish(if i % 2 == 0 { &n0 } else { &n1 }, room, data.clone());
        assert_eq!(p.offset, i);
        record(&mut positions, &p, &data);
        before.push(p);
    }
    let epoch = before[0].epoch.clone();
    wait_until("the replica has offset 20", 10 * SECOND, || {
        s.replica.try_cli(&["HGET", &meta(room), "offset"]).as_deref() == Some("20")
    });
    // Cut replication: the replica stopped and its link closed by the
    // primary, then ten more writes only the primary (and the nodes) see.
    s.replica.pause();
    s.primary.cli(&["CLIENT", "KILL", "TYPE", "replica"]);
    for i in 21..=30u64 {
        let data = json!(i);
        let p = api_publish(if i % 2 == 0 { &n0 } else { &n1 }, room, data.clone());
        assert_eq!(p.offset, i);
        record(&mut positions, &p, &data);
        before.push(p);
    }
    // Publishers on both nodes keep going through the failover.
    let stop = Arc::new(AtomicBool::new(false));
    let pubber = publisher(vec![n0.addr, n1.addr], "lossy", stop.clone());
    thread::sleep(Duration::from_millis(300));
    s.primary.kill();
    s.replica.resume();
    wait_until("the sentinels promote the replica", 60 * SECOND, || s.agreed_primary() == Some(new_port));
    let renewed = publish_retrying(&n0, room, json!("after"));
    assert_ne!(renewed.epoch, epoch, "a promoted replica starts a new epoch");
    record(&mut positions, &renewed, &json!("after"));
    // Past every offset of the lost range in the new epoch.
    let end = Instant::now() + 60 * SECOND;
    let mut last = renewed.clone();
    while last.offset < 40 {
        assert!(Instant::now() < end, "the new epoch reaches 40");
        let data = json!(format!("pad {}", last.offset));
        last = publish_retrying(&n1, room, data.clone());
        record(&mut positions, &last, &data);
    }
    stop.store(true, Ordering::SeqCst);
    let acked = pubber.join().unwrap();
    assert!(!acked.is_empty(), "the publishers got through");
    for (p, data) in &acked {
        record(&mut positions, p, data);
        // Under the old epoch only what the old primary assigned after 30
        // (the promoted replica, which ended at 20, would reuse 21.. there).
        assert!(p.epoch != epoch || p.offset > 30, "{p:?}");
    }
    let now = publish_retrying(&n0, room, json!("end"));
    record(&mut positions, &now, &json!("end"));
    assert_eq!(now.epoch, last.epoch);
    // The promoted replica's history is the new epoch only.
    assert_eq!(s.replica.cli(&["HGET", &meta(room), "epoch"]), now.epoch);
    let run_now =
        s.replica.cli(&["INFO", "server"]).lines().find_map(|l| l.strip_prefix("run_id:")).map(str::to_string);
    assert_eq!(Some(s.replica.cli(&["HGET", &meta(room), "run"])), run_now);

    // The live subscribers on both nodes: each reaches "end" (as a message,
    // or in a gap if its node's subscriber link came back after it), then a
    // last message comes live to both; no position was delivered for two
    // messages, and the new epoch was seen, in order.
    let reached = |sub: &mut Collector, i: usize, what: &dyn Fn(&Value) -> bool| {
        let end = Instant::now() + 30 * SECOND;
        loop {
            sub.poll();
            if sub.got.iter().any(|(v, _)| what(v)) {
                return;
            }
            assert!(Instant::now() < end, "node {i}: {:?}\n{}\n{}", sub.got, n0.logs(), n1.logs());
            thread::sleep(Duration::from_millis(20));
        }
    };
    for (i, sub) in subs.iter_mut().enumerate() {
        reached(sub, i, &|v| v["epoch"] == now.epoch.as_str() && v["offset"].as_u64() >= Some(now.offset));
    }
    let fin = publish_retrying(&n1, room, json!("final"));
    assert_eq!((fin.epoch.as_str(), fin.offset), (now.epoch.as_str(), now.offset + 1));
    record(&mut positions, &fin, &json!("final"));
    for (i, sub) in subs.iter_mut().enumerate() {
        reached(sub, i, &|v| v["ev"] == "message" && v["data"] == "final" && v["offset"].as_u64() == Some(fin.offset));
        let evs: Vec<&Value> = sub.got.iter().map(|(v, _)| v).collect();
        let mut seen_new = false;
        let mut prev: Option<(String, u64)> = None;
        for v in &evs {
            assert!(v["ev"] == "message" || v["ev"] == "gap", "node {i}: {v}");
            let p = Pos::of(v);
            if v["ev"] == "gap" && p.epoch.is_empty() {
                continue; // "no history yet": the promoted replica, before its first publish
            }
            if v["ev"] == "message" {
                record(&mut positions, &p, &v["data"]);
            }
            if p.epoch == now.epoch {
                seen_new = true;
            } else {
                assert!(!seen_new, "node {i}: an old-epoch event after the new epoch: {evs:?}");
                assert_eq!(p.epoch, epoch, "node {i}: {v}");
            }
            if let Some((e, o)) = &prev
                && *e == p.epoch
            {
                assert!(p.offset > *o || (p.offset == *o && v["ev"] == "gap"), "node {i}: in order: {evs:?}");
            }
            prev = Some((p.epoch.clone(), p.offset));
        }
        assert!(seen_new, "node {i}: the new epoch live");
    }

    // Positions from before the failover, lost (21..30) or replicated: recovered:false.
    for node in [&n0, &n1] {
        for o in [15u64, 20, 21, 25, 30] {
            assert_not_recovered(node, room, &before[o as usize - 1], &fin);
        }
    }
}

#[test]
fn reading_a_room_without_history_writes_nothing_to_redis() {
    let _d = deadline("reading_a_room_without_history_writes_nothing", 60 * SECOND);
    let redis = RedisServer::start();
    let node = hist_node(&redis.url());
    let mut c = Client::connect(&node.ws_url("/ws"));
    let v = subscribe_since(&mut c, "ghost", None);
    let v2 = c.call(json!({"op": "history", "room": "ghost", "limit": 10, "id": "h"}));
    let made_up = Pos { epoch: "nope".into(), offset: 5 };
    let mut c2 = Client::connect(&node.ws_url("/ws"));
    let v3 = subscribe_since(&mut c2, "ghost", Some(&made_up));
    assert_eq!(redis.cli(&["EXISTS", &meta("ghost")]), "0", "no meta written by a read");
    assert_eq!(redis.cli(&["EXISTS", "{cc:room:ghost}:log"]), "0");
    assert_eq!(redis.cli(&["DBSIZE"]), "0", "nothing at all written");
    assert_eq!(v3["recovered"], false, "{v3}");
    assert_eq!(v2["ev"], "history", "{v2}");
    assert_eq!(v2["messages"], json!([]), "{v2}");
    // What a client is told of a room with no history yet (the Rust side's
    // contract for read.lua's {'', 0}).
    assert_eq!(v, json!({"ev":"subscribed","room":"ghost","id":"s","epoch":"","offset":0}), "{v}");

    // The first publish makes the history, bound to this Redis process.
    let p = api_publish(&node, "ghost", json!("first"));
    assert_eq!(p.offset, 1);
    assert_ne!(p.epoch, "");
    let run_id = redis.cli(&["INFO", "server"]).lines().find_map(|l| l.strip_prefix("run_id:")).map(str::to_string);
    assert_eq!(Some(redis.cli(&["HGET", &meta("ghost"), "run"])), run_id);
    let got = messages(&mut c, "ghost", 1, 10 * SECOND);
    assert_eq!(got[0]["epoch"], p.epoch.as_str());
}

/// Found by a 300 s chaos run (bench/RESULTS.md, "Chaos run"): at a Cluster
/// failover, the catch-up read on the new primary found the room's history
/// bound to the old one and answered the empty epoch (`gap` at `"":0`);
/// 9 ms later the old primary's last message reached the node again through
/// the new primary, and since the room was now at the empty epoch, it went
/// out a second time. Here the same with one Redis: the history is rebound
/// by hand (`meta.run`), the node's subscriber link is killed so that the
/// room catches up, and once the gap is out the room's last message is
/// published again on its channel, byte for byte as Redis sent it first.
#[test]
fn a_message_sent_again_by_redis_after_a_gap_to_the_empty_epoch_is_not_delivered_twice() {
    let _d = deadline("a_message_sent_again_after_a_gap", 60 * SECOND);
    let redis = RedisServer::start();
    let node =
        start_server(&["--shards", "1", "--history-size", "100", "--max-ops-per-sec", "0", "--redis", &redis.url()]);
    let room = "again";
    let channel = format!("cc:room:{room}");
    let mut c = Client::connect(&node.ws_url("/ws"));
    subscribe_since(&mut c, room, None);
    // The test's own subscriber, for the bytes Redis delivers.
    let mut tap = RespConn::open(redis.port);
    tap.cmd(&["SUBSCRIBE", &channel]);
    let sent: Vec<Pos> = (1..=3).map(|i| api_publish(&node, room, json!(i))).collect();
    let got = messages(&mut c, room, 3, 5 * SECOND);
    assert_eq!(offsets(&got), [1, 2, 3]);
    let raw = (0..3).map(|_| tap.next_message()).last().unwrap();
    assert_eq!(raw.0, channel);
    drop(tap);
    let dropped = node.metric("corecast_history_duplicates_dropped_total");

    // The history is another Redis process's now: the catch-up read cannot
    // trust it and answers the empty epoch.
    assert_eq!(redis.cli(&["HSET", &meta(room), "run", "another-process"]), "0");
    assert_eq!(redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]), "1", "the node's one subscriber link");
    let g = expect_event(&mut c, "the gap of the catch-up", 10 * SECOND);
    assert_eq!(g, json!({"ev": "gap", "room": room, "epoch": "", "offset": 0}), "{g}");
    node.wait_until("ready, every link up", || node.links_up());

    // Redis sends the room's last message again.
    assert_eq!(redis.publish(&channel, &raw.1), 1, "the node's subscriber link got it");
    c.expect_silence(Duration::from_millis(500));
    node.wait_until("the copy counted as a duplicate", || {
        node.metric("corecast_history_duplicates_dropped_total") == dropped + 1.0
    });
    // What is published next (a new epoch, bound to this process) goes out.
    let next = api_publish(&node, room, json!("next"));
    assert_eq!(next.offset, 1);
    assert_ne!(next.epoch, sent[2].epoch);
    let m = expect_event(&mut c, "the next message", 5 * SECOND);
    assert_eq!((m["epoch"].as_str(), m["offset"].as_u64()), (Some(next.epoch.as_str()), Some(1)), "{m}");
}
