//! Room history (PROTOCOL.md §7) on the Redis topologies of §8, with real
//! redis-server processes and corecast nodes: on a 3-primary Redis Cluster
//! the history keys live on the primary owning the room channel's slot and
//! nowhere else, `since` replays exactly what is missing, a client away
//! while 50 are published on the other node gets exactly those, a
//! subscriber connection to one primary killed is caught up, and a slot
//! moved (keys MIGRATEd) under a publisher gives no position to two
//! messages and goes on in a new epoch at the new owner, and a primary
//! killed hands the room to its promoted replica in a new epoch; under
//! Sentinel history goes on after a failover, in a new epoch, and never
//! replays wrong; on several plain servers each room's history is on its
//! channel's server. (An epoch is bound to the Redis process that drew it,
//! docs/history.md: a history moved or replicated to another process is not
//! trusted, so every old position gets `recovered:false` there.)

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::history::{Pos, api_publish, messages, offsets, subscribe_since};
use common::redis::{RedisServer, deadline, wait_until};
use common::redis_topology::{RedisCluster, SentinelSetup};
use common::{Client, Server, start_server};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

fn hist_node(url: &str) -> Server {
    start_server(&["--shards", "2", "--history-size", "100", "--max-ops-per-sec", "0", "--redis", url])
}

/// One room name per primary of `c`: the first `h-N` whose channel's slot it owns.
fn rooms_on_every_primary(c: &RedisCluster) -> Vec<(String, usize)> {
    let mut rooms = Vec::new();
    for p in c.primaries() {
        let name = (0..1000)
            .map(|i| format!("h-{i}"))
            .find(|r| c.owner(&format!("cc:room:{r}")) == p)
            .expect("a room name for every primary");
        rooms.push((name, p));
    }
    rooms
}

/// The keys of `room`'s history this server holds itself (no redirects).
fn local_history_keys(s: &RedisServer, room: &str) -> Vec<String> {
    let pattern = format!("{{cc:room:{room}}}:*");
    let mut keys: Vec<String> = s.cli(&["KEYS", &pattern]).lines().map(str::to_string).collect();
    keys.retain(|k| !k.is_empty());
    keys.sort();
    keys
}

/// Every message of `msgs` carries `room`'s epoch and the offsets `want`.
fn assert_positions(msgs: &[Value], epoch: &str, want: std::ops::RangeInclusive<u64>) {
    assert_eq!(offsets(msgs), want.collect::<Vec<_>>());
    assert!(msgs.iter().all(|m| m["epoch"] == epoch), "{msgs:?}");
}

#[test]
fn cluster_history_lives_on_the_slot_owner_and_since_replays_exactly_the_missing() {
    let _d = deadline("cluster_history_lives_on_the_slot_owner", 180 * SECOND);
    let c = RedisCluster::start(3, 0);
    let (a, b) = (hist_node(&c.url()), hist_node(&c.url()));
    let rooms = rooms_on_every_primary(&c);
    assert_eq!(rooms.len(), 3);
    let mut epochs = BTreeMap::new();
    for (room, _) in &rooms {
        for i in 1..=20u64 {
            let node = if i % 2 == 0 { &a } else { &b };
            let p = api_publish(node, room, json!(i));
            assert_eq!(p.offset, i, "{room}");
            epochs.insert(room.clone(), p.epoch);
        }
    }
    for (room, owner) in &rooms {
        let want = vec![format!("{{cc:room:{room}}}:log"), format!("{{cc:room:{room}}}:meta")];
        for (i, s) in c.servers.iter().enumerate() {
            let keys = local_history_keys(s, room);
            if i == *owner {
                assert_eq!(keys, want, "{room} at its owner");
            } else {
                assert!(keys.is_empty(), "{room}'s history also at server {i}: {keys:?}");
            }
        }
        // `since` offset 12 on the other node: 13..20, then live, once each.
        let epoch = &epochs[room];
        let mut cl = Client::connect(&b.ws_url("/ws"));
        let v = subscribe_since(&mut cl, room, Some(&Pos { epoch: epoch.clone(), offset: 12 }));
        assert_eq!(v, json!({"ev":"subscribed","room":room,"id":"s","recovered":true,"epoch":epoch,"offset":20}));
        assert_positions(&messages(&mut cl, room, 8, 10 * SECOND), epoch, 13..=20);
        api_publish(&a, room, json!("live-a"));
        api_publish(&b, room, json!("live-b"));
        assert_positions(&messages(&mut cl, room, 2, 10 * SECOND), epoch, 21..=22);
        cl.expect_silence(Duration::from_millis(300));
    }

    // SCRIPT FLUSH at one owner: the next EVALSHA there gets NOSCRIPT and is
    // sent again as EVAL; offsets stay one per publish, in order.
    let (room0, owner0) = &rooms[0];
    assert_eq!(c.servers[*owner0].cli(&["SCRIPT", "FLUSH"]), "OK");
    let mut cl = Client::connect(&b.ws_url("/ws"));
    assert_eq!(subscribe_since(&mut cl, room0, None)["offset"], 22);
    let mut cw = Client::connect(&a.ws_url("/ws?user=w"));
    for i in 0..5 {
        cw.send_json(&json!({"op":"publish","room":room0,"data":i}));
    }
    let after_flush = messages(&mut cl, room0, 5, 10 * SECOND);
    assert_positions(&after_flush, &epochs[room0], 23..=27);
    assert!(after_flush.iter().enumerate().all(|(i, m)| m["data"] == i), "the publisher's order: {after_flush:?}");
    drop((cl, cw));

    // A client cut off on A while 50 are published (per room) on B gets exactly those.
    let mut cl = Client::connect(&a.ws_url("/ws"));
    let mut last = BTreeMap::new();
    for (room, _) in &rooms {
        let v = subscribe_since(&mut cl, room, None);
        last.insert(room.clone(), Pos::of(&v));
    }
    drop(cl);
    for (room, _) in &rooms {
        for i in 0..50 {
            api_publish(&b, room, json!({"away": i}));
        }
    }
    for (room, _) in &rooms {
        let mut cl = Client::connect(&a.ws_url("/ws"));
        let pos = &last[room];
        let v = subscribe_since(&mut cl, room, Some(pos));
        assert_eq!(v["recovered"], true, "{v}");
        assert_eq!(v["offset"], pos.offset + 50);
        let missed = messages(&mut cl, room, 50, 10 * SECOND);
        assert_positions(&missed, &pos.epoch, pos.offset + 1..=pos.offset + 50);
        assert!(missed.iter().enumerate().all(|(i, m)| m["data"] == json!({"away": i})));
        cl.expect_silence(Duration::from_millis(300));
    }
}

/// Reads every message of the client until `until` says stop (or 30 s).
fn collect(c: &mut Client, mut until: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let end = Instant::now() + 30 * SECOND;
    let mut got = Vec::new();
    while !until(&got) && Instant::now() < end {
        if let Some(v) = c.recv_json(Duration::from_millis(200)) {
            got.push(v);
        }
    }
    got
}

#[test]
fn cluster_a_killed_subscriber_connection_to_one_primary_is_caught_up() {
    let _d = deadline("cluster_a_killed_subscriber_connection_is_caught_up", 180 * SECOND);
    let c = RedisCluster::start(3, 0);
    let (a, b) = (hist_node(&c.url()), hist_node(&c.url()));
    let rooms = rooms_on_every_primary(&c);
    let mut cl = Client::connect(&b.ws_url("/ws"));
    for (room, _) in &rooms {
        subscribe_since(&mut cl, room, None);
    }
    for (room, _) in &rooms {
        api_publish(&a, room, json!("before"));
    }
    let got = collect(&mut cl, |g| g.len() == rooms.len());
    assert_eq!(got.len(), rooms.len());
    // Every pub/sub connection to the first room's primary dropped, then at
    // once 10 publishes there and nothing after: whatever went out while
    // B's connection there was re-made comes with the catch-up.
    let (room, owner) = &rooms[0];
    let reconnects = b.metric("corecast_redis_reconnects_total");
    let killed: u64 = c.servers[*owner].cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).parse().unwrap();
    assert!(killed >= 1, "B's subscriber connection to the owner was killed ({killed})");
    for i in 0..10 {
        api_publish(&a, room, json!(i));
    }
    let got = collect(&mut cl, |g| g.len() == 10);
    let (msgs, other): (Vec<Value>, Vec<Value>) = got.into_iter().partition(|v| v["ev"] == "message");
    assert!(other.is_empty(), "only messages: {other:?}");
    assert_eq!(offsets(&msgs), (2..=11).collect::<Vec<_>>(), "every offset once, in order");
    cl.expect_silence(Duration::from_millis(500));
    // The kill did cut B off: its link there was re-made.
    b.wait_until("B re-made its subscriber connection", || b.metric("corecast_redis_reconnects_total") > reconnects);
    eprintln!("caught up from history on B: {}", b.metric("corecast_history_caught_up_total"));
    // The other primaries' rooms go on as before.
    for (room, _) in &rooms[1..] {
        api_publish(&a, room, json!("after"));
        let m = messages(&mut cl, room, 1, 10 * SECOND);
        assert_eq!(offsets(&m), [2]);
    }
}

#[test]
fn cluster_a_history_room_whose_slot_moves_under_a_publisher_goes_on_in_a_new_epoch_and_repeats_nothing() {
    let _d = deadline("cluster_slot_move_under_history", 240 * SECOND);
    let c = RedisCluster::start(3, 0);
    let (a, b) = (hist_node(&c.url()), hist_node(&c.url()));
    let room = "moving";
    let channel = format!("cc:room:{room}");
    let slot = c.slot(&channel).to_string();
    let from = c.owner(&channel);
    let to = c.primaries().into_iter().find(|&p| p != from).expect("another primary");

    let mut live = Client::connect(&b.ws_url("/ws"));
    let v = subscribe_since(&mut live, room, None);
    assert_eq!(v["offset"], 0);
    let first = api_publish(&a, room, json!("first"));
    assert_eq!(first.offset, 1);

    // A publisher over the API on A, as fast as it gets answers; counts the
    // publishes acknowledged with a position and keeps those positions
    // (refusals during the move are allowed: they have no offset).
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let acked_at = Arc::new(std::sync::Mutex::new(Vec::<Pos>::new()));
    let addr = a.addr;
    let pubber = {
        let (stop, acked, acked_at) = (stop.clone(), acked.clone(), acked_at.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let body = json!({"room": "moving", "data": i}).to_string();
                let (st, reply) = common::http_at(
                    addr,
                    "POST",
                    "/api/publish",
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                );
                if st == 200 {
                    let v: Value = serde_json::from_str(&reply).expect("JSON reply");
                    acked_at.lock().unwrap().push(Pos::of(&v));
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                i += 1;
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    wait_until("some publishes before the move", 20 * SECOND, || acked.load(Ordering::SeqCst) >= 30);

    // The reshard by hand, as redis-cli --cluster does it: IMPORTING,
    // MIGRATING, MIGRATE the slot's keys (both history keys), NODE on all.
    let (from_s, to_s) = (&c.servers[from], &c.servers[to]);
    let (from_id, to_id) = (c.node_id(from), c.node_id(to));
    assert_eq!(to_s.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]), "OK");
    assert_eq!(from_s.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]), "OK");
    thread::sleep(Duration::from_millis(200)); // Publishing goes on meanwhile (ASK for moved keys).
    let keys: Vec<String> = from_s
        .cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
        .lines()
        .map(str::to_string)
        .filter(|k| !k.is_empty())
        .collect();
    assert!(keys.iter().any(|k| k.ends_with(":log")), "the history keys are in the slot: {keys:?}");
    let mut migrate = vec!["MIGRATE", "127.0.0.1"];
    let port = to_s.port.to_string();
    migrate.extend_from_slice(&[&port, "", "0", "5000", "KEYS"]);
    migrate.extend(keys.iter().map(String::as_str));
    assert_eq!(from_s.cli(&migrate), "OK");
    for s in c.servers.iter() {
        assert_eq!(s.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]), "OK");
    }
    let moved_at = acked.load(Ordering::SeqCst);
    wait_until("publishes after the move", 30 * SECOND, || acked.load(Ordering::SeqCst) >= moved_at + 50);
    stop.store(true, Ordering::SeqCst);
    pubber.join().unwrap();

    let end = api_publish(&b, room, json!("end"));
    // The keys moved to another Redis process: its first publish there drew
    // a new epoch (one recovered:false per moved room, docs/history.md).
    assert_ne!(end.epoch, first.epoch, "a migrated history starts a new epoch at the new owner");
    assert!(local_history_keys(from_s, room).is_empty(), "nothing left at the old owner");
    assert_eq!(local_history_keys(to_s, room).len(), 2, "both keys at the new owner");
    // Every acknowledged publish got its own position, none assigned twice:
    // the old epoch 1..=k at the old owner, the new one 1..=m at the new.
    let mut all = acked_at.lock().unwrap().clone();
    all.push(first.clone());
    all.push(end.clone());
    let per_epoch = |e: &str| {
        let mut o: Vec<u64> = all.iter().filter(|p| p.epoch == e).map(|p| p.offset).collect();
        o.sort_unstable();
        o
    };
    let (old, new) = (per_epoch(&first.epoch), per_epoch(&end.epoch));
    assert_eq!(old.len() + new.len(), all.len(), "only two epochs: {all:?}");
    assert_eq!(old, (1..=old.len() as u64).collect::<Vec<_>>(), "old epoch: each offset once");
    assert_eq!(new, (1..=end.offset).collect::<Vec<_>>(), "new epoch: each offset once, up to end");

    // The live subscriber: the old epoch in order, then the new one in
    // order (or a gap into it), nothing twice.
    let got =
        collect(&mut live, |g| g.last().is_some_and(|v| v["epoch"] == end.epoch.as_str() && v["offset"] == end.offset));
    let split = got.iter().position(|v| v["epoch"] != first.epoch.as_str()).expect("the new epoch");
    assert!(got[..split].iter().all(|v| v["ev"] == "message"), "{got:?}");
    assert_eq!(offsets(&got[..split]), (1..=split as u64).collect::<Vec<_>>(), "old epoch once, in order");
    assert!(split as u64 <= old.len() as u64);
    let rest = &got[split..];
    // (A catch-up at the new owner before its first publish there finds no
    // trusted history: a gap at the empty epoch.)
    let new_or_none = |v: &Value| v["epoch"] == end.epoch.as_str() || (v["ev"] == "gap" && v["epoch"] == "");
    assert!(rest.iter().all(new_or_none), "{rest:?}");
    let msgs: Vec<Value> = rest.iter().filter(|v| v["ev"] == "message").cloned().collect();
    let o = offsets(&msgs);
    assert!(o.windows(2).all(|w| w[1] == w[0] + 1), "new epoch once, in order: {rest:?}");
    assert!(rest.iter().filter(|v| v["ev"] == "gap").count() <= 2, "{rest:?}");
    live.expect_silence(Duration::from_millis(300));

    // Recovery after the move, on either node: a position of the old epoch
    // is not recovered; one of the new epoch is, exactly.
    for node in [&a, &b] {
        let mut cl = Client::connect(&node.ws_url("/ws"));
        let v = subscribe_since(&mut cl, room, Some(&Pos { epoch: first.epoch.clone(), offset: old.len() as u64 }));
        assert_eq!(v["recovered"], false, "{v}");
        assert_eq!((v["epoch"].as_str(), v["offset"].as_u64()), (Some(end.epoch.as_str()), Some(end.offset)));
        cl.expect_silence(Duration::from_millis(200));
        let mut cl = Client::connect(&node.ws_url("/ws"));
        let k = end.offset.min(20);
        let since = Pos { epoch: end.epoch.clone(), offset: end.offset - k };
        let v = subscribe_since(&mut cl, room, Some(&since));
        assert_eq!(v["recovered"], true, "{v}");
        assert_positions(
            &messages(&mut cl, room, k as usize, 10 * SECOND),
            &end.epoch,
            end.offset - k + 1..=end.offset,
        );
    }
}

/// `POST /api/publish` until Redis takes it (a failover refuses for a while).
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

#[test]
fn sentinel_history_goes_on_after_a_failover_and_never_replays_wrong() {
    let _d = deadline("sentinel_history_goes_on_after_a_failover", 180 * SECOND);
    let mut s = SentinelSetup::start();
    let new_port = s.replica.port;
    let (n0, n1) = (hist_node(&s.url()), hist_node(&s.url()));
    let room = "sent";
    let mut live = Client::connect(&n1.ws_url("/ws"));
    subscribe_since(&mut live, room, None);
    let mut before = Vec::new();
    for i in 1..=10u64 {
        let p = api_publish(&n0, room, json!(i));
        assert_eq!(p.offset, i);
        before.push(p);
    }
    let epoch = before[0].epoch.clone();
    assert_positions(&messages(&mut live, room, 10, 10 * SECOND), &epoch, 1..=10);
    // History writes go to the primary only.
    assert!(!s.replica.cli(&["CLIENT", "LIST"]).contains("name=corecast"), "nothing connects to the replica");
    // Let the replica have the history (asynchronous replication), so that
    // the failover keeps it.
    wait_until("the replica has the room's history", 10 * SECOND, || {
        s.replica.try_cli(&["HGET", &format!("{{cc:room:{room}}}:meta"), "offset"]).as_deref() == Some("10")
    });

    s.primary.kill();
    wait_until("the sentinels promote the replica", 60 * SECOND, || s.agreed_primary() == Some(new_port));
    let after = publish_retrying(&n0, room, json!("after"));
    let more = publish_retrying(&n1, room, json!("more"));
    assert_eq!(more.epoch, after.epoch);
    assert_eq!(more.offset, after.offset + 1);
    // The replica had the meta key, but it is another Redis process: the
    // history it replicated is not trusted (it may lack the last writes), so
    // a new epoch starts there. (Publishes refused during the failover never
    // got an offset; one whose reply was lost may have: offset >= 1.)
    assert_ne!(after.epoch, epoch, "a promoted replica starts a new epoch");
    assert!(after.offset >= 1, "{after:?}");

    // The live subscriber: the old epoch's messages end, then the new
    // epoch's in order, once (a gap it is told about may come between).
    let got = collect(&mut live, |g| {
        g.last().is_some_and(|v| v["epoch"] == more.epoch.as_str() && v["offset"] == more.offset)
    });
    let mut prev: Option<(String, u64)> = None;
    for v in &got {
        let o = v["offset"].as_u64().expect("offset");
        let e = v["epoch"].as_str().expect("epoch").to_string();
        match v["ev"].as_str() {
            Some("message") => {
                assert_eq!(e, more.epoch, "nothing of the old epoch after 10: {got:?}");
                if let Some((pe, po)) = &prev
                    && *pe == e
                {
                    assert!(o > *po, "in order, once: {got:?}");
                }
            }
            Some("gap") => {}
            _ => panic!("unexpected {v}"),
        }
        prev = Some((e, o));
    }

    // A position from before the failover: recovered:false, never a wrong replay.
    let mut cl = Client::connect(&n1.ws_url("/ws"));
    let v = subscribe_since(&mut cl, room, Some(&before[4]));
    assert_eq!(v["recovered"], false, "{v}");
    assert_eq!((v["epoch"].as_str(), v["offset"].as_u64()), (Some(more.epoch.as_str()), Some(more.offset)), "{v}");
    cl.expect_silence(Duration::from_millis(300));
    // No corecast connection to the old primary's address is left to write to: it is dead.
    assert!(!s.primary.is_running());
}

#[test]
fn several_servers_keep_each_rooms_history_on_its_channels_server() {
    let _d = deadline("several_servers_history", 120 * SECOND);
    let (r0, r1) = (RedisServer::start(), RedisServer::start());
    let url = format!("{},{}", r0.url(), r1.url());
    let (a, b) = (hist_node(&url), hist_node(&url));
    let rooms: Vec<String> = (0..8).map(|i| format!("sv-{i}")).collect();
    let mut holders = [0, 0];
    for room in &rooms {
        for i in 1..=20u64 {
            let p = api_publish(if i % 2 == 0 { &a } else { &b }, room, json!(i));
            assert_eq!(p.offset, i);
        }
        let at: Vec<usize> = [&r0, &r1].iter().map(|r| local_history_keys(r, room).len()).collect();
        assert!(at == [2, 0] || at == [0, 2], "{room}: history keys on exactly one server: {at:?}");
        holders[if at[0] == 2 { 0 } else { 1 }] += 1;
        let mut cl = Client::connect(&a.ws_url("/ws"));
        let probe = subscribe_since(&mut cl, room, None);
        let epoch = probe["epoch"].as_str().unwrap().to_string();
        drop(cl);
        let mut cl = Client::connect(&b.ws_url("/ws"));
        let v = subscribe_since(&mut cl, room, Some(&Pos { epoch: epoch.clone(), offset: 12 }));
        assert_eq!(v["recovered"], true, "{v}");
        assert_positions(&messages(&mut cl, room, 8, 10 * SECOND), &epoch, 13..=20);
    }
    assert!(holders[0] > 0 && holders[1] > 0, "rooms spread over both servers: {holders:?}");
}

#[test]
fn sentinel_history_follows_a_demoted_primary_to_the_new_one_in_a_new_epoch() {
    let _d = deadline("sentinel_history_follows_a_demoted_primary", 180 * SECOND);
    let s = SentinelSetup::start();
    let new_port = s.replica.port;
    let (n0, n1) = (hist_node(&s.url()), hist_node(&s.url()));
    let room = "demoted";
    let mut before = Vec::new();
    for i in 1..=10u64 {
        before.push(api_publish(if i % 2 == 0 { &n0 } else { &n1 }, room, json!(i)));
    }
    let epoch = before[0].epoch.clone();
    assert_eq!(before[9].offset, 10);
    // A graceful failover: the old primary stays up, as a replica.
    s.sentinels[0].cli(&["SENTINEL", "FAILOVER", "mymaster"]);
    wait_until("the sentinels name the replica", 60 * SECOND, || s.agreed_primary() == Some(new_port));
    wait_until("the old primary is a replica", 30 * SECOND, || {
        s.primary.try_cli(&["ROLE"]).is_some_and(|r| r.starts_with("slave"))
    });
    // The new primary is another Redis process: a new epoch from 1 there,
    // even though this failover lost nothing.
    let after = publish_retrying(&n0, room, json!("after"));
    assert_ne!(after.epoch, epoch, "a new epoch at the new primary");
    assert_eq!(after.offset, 1, "{after:?}");
    let more = publish_retrying(&n1, room, json!("more"));
    assert_eq!(more, Pos { epoch: after.epoch.clone(), offset: 2 });
    // Every history (and publish) link is at the new primary; none writes to the demoted one.
    wait_until("no corecast link left at the demoted primary", 30 * SECOND, || {
        s.primary.try_cli(&["CLIENT", "LIST"]).is_some_and(|l| !l.contains("name=corecast-pub"))
    });
    let at_new = s.replica.cli(&["CLIENT", "LIST"]);
    assert!(at_new.contains("name=corecast-pub-00") && at_new.contains("name=corecast-pub-01"), "{at_new}");
    wait_until("the demoted primary replicates the new history", 30 * SECOND, || {
        s.primary.try_cli(&["HGET", &format!("{{cc:room:{room}}}:meta"), "epoch"]).as_deref() == Some(&more.epoch)
    });
    // A position from before: recovered:false, no replay; one of the new
    // epoch: exactly what followed it.
    let new_epoch = more.epoch.clone();
    for node in [&n0, &n1] {
        let mut cl = Client::connect(&node.ws_url("/ws"));
        let v = subscribe_since(&mut cl, room, Some(&before[3]));
        assert_eq!(v, json!({"ev":"subscribed","room":room,"id":"s","recovered":false,"epoch":new_epoch,"offset":2}));
        cl.expect_silence(Duration::from_millis(300));
        let mut cl = Client::connect(&node.ws_url("/ws"));
        let v = subscribe_since(&mut cl, room, Some(&after));
        assert_eq!(v, json!({"ev":"subscribed","room":room,"id":"s","recovered":true,"epoch":new_epoch,"offset":2}));
        let missed = messages(&mut cl, room, 1, 10 * SECOND);
        assert_positions(&missed, &new_epoch, 2..=2);
        assert_eq!(missed[0]["data"], "more");
        cl.expect_silence(Duration::from_millis(300));
    }
}

#[test]
fn cluster_history_goes_on_at_a_promoted_replica_in_a_new_epoch() {
    let _d = deadline("cluster_history_goes_on_at_a_promoted_replica", 180 * SECOND);
    let mut c = RedisCluster::start(3, 1);
    let (a, b) = (hist_node(&c.url()), hist_node(&c.url()));
    let (room, owner) = rooms_on_every_primary(&c).remove(0);
    let mut live = Client::connect(&b.ws_url("/ws"));
    subscribe_since(&mut live, &room, None);
    let before: Vec<Pos> = (1..=10u64).map(|i| api_publish(&a, &room, json!(i))).collect();
    let epoch = before[0].epoch.clone();
    assert_positions(&messages(&mut live, &room, 10, 10 * SECOND), &epoch, 1..=10);
    // Its replica has all of it before the primary goes (replication is
    // asynchronous: a replica that lacks the tail is the known gap, not this case).
    c.wait_replicas_caught_up(owner, 10 * SECOND);
    c.servers[owner].kill();
    wait_until("a replica takes over the lost primary's slots", 60 * SECOND, || {
        let p = c.primaries();
        p.len() == 3 && !p.contains(&owner)
    });
    c.wait_ok(60 * SECOND);
    assert_ne!(c.owner(&format!("cc:room:{room}")), owner);
    // The promoted replica is another Redis process: the replicated history
    // is not trusted (here it had everything, but a replica may lack the
    // last writes), so the room goes on in a new epoch from 1.
    let after = publish_retrying(&a, &room, json!("after"));
    assert_ne!(after.epoch, epoch, "a new epoch at the promoted replica");
    assert_eq!(after.offset, 1, "{after:?}");
    let got = collect(&mut live, |g| g.last().is_some_and(|v| v["epoch"] == after.epoch.as_str() && v["offset"] == 1));
    let msgs: Vec<&Value> = got.iter().filter(|v| v["ev"] == "message").collect();
    assert!(msgs.iter().all(|v| v["epoch"] == after.epoch.as_str()), "nothing of the old epoch again: {got:?}");
    let more = publish_retrying(&b, &room, json!("more"));
    assert_eq!(more, Pos { epoch: after.epoch.clone(), offset: 2 });
    for node in [&a, &b] {
        let mut cl = Client::connect(&node.ws_url("/ws"));
        let v = subscribe_since(&mut cl, &room, Some(&before[6]));
        assert_eq!(v, json!({"ev":"subscribed","room":room,"id":"s","recovered":false,"epoch":after.epoch,"offset":2}));
        cl.expect_silence(Duration::from_millis(300));
        let mut cl = Client::connect(&node.ws_url("/ws"));
        let v = subscribe_since(&mut cl, &room, Some(&after));
        assert_eq!(v, json!({"ev":"subscribed","room":room,"id":"s","recovered":true,"epoch":after.epoch,"offset":2}));
        assert_positions(&messages(&mut cl, &room, 1, 10 * SECOND), &after.epoch, 2..=2);
        cl.expect_silence(Duration::from_millis(300));
    }
}

/// Asynchronous replication can lose the last writes in a failover: the
/// promoted replica's history ends before what the nodes delivered. Those
/// offsets must never be used again for other messages (a client holding
/// one would be "recovered" past messages it never saw): the promoted
/// replica is another Redis process, so its history is not trusted; the
/// node's catch-up finds no history to trust (its subscriber gets a gap),
/// and the first publish there starts a new epoch.
#[test]
fn cluster_failover_that_lost_the_last_writes_starts_a_new_epoch_never_reuses_offsets() {
    let _d = deadline("cluster_failover_that_lost_the_last_writes", 180 * SECOND);
    let mut c = RedisCluster::start(3, 1);
    let (a, b) = (hist_node(&c.url()), hist_node(&c.url()));
    let (room, owner) = rooms_on_every_primary(&c).remove(0);
    let owner_port = c.servers[owner].port;
    let replica = (0..c.servers.len())
        .find(|&i| {
            c.servers[i]
                .try_cli(&["INFO", "replication"])
                .is_some_and(|r| r.contains("role:slave") && r.contains(&format!("master_port:{owner_port}")))
        })
        .expect("the owner's replica");
    let mut live = Client::connect(&b.ws_url("/ws"));
    subscribe_since(&mut live, &room, None);
    let mut before: Vec<Pos> = (1..=7u64).map(|i| api_publish(&a, &room, json!(i))).collect();
    let epoch = before[0].epoch.clone();
    c.wait_replicas_caught_up(owner, 10 * SECOND);
    // Cut replication: the replica stopped, its link closed by the primary
    // (nothing more reaches its socket), then three more writes.
    c.servers[replica].pause();
    c.servers[owner].cli(&["CLIENT", "KILL", "TYPE", "replica"]);
    before.extend((8..=10u64).map(|i| api_publish(&a, &room, json!(i))));
    assert_eq!(before[9], Pos { epoch: epoch.clone(), offset: 10 });
    assert_positions(&messages(&mut live, &room, 10, 10 * SECOND), &epoch, 1..=10);
    c.servers[owner].kill();
    c.servers[replica].resume();
    wait_until("the replica takes over the lost primary's slots", 60 * SECOND, || {
        let p = c.primaries();
        p.len() == 3 && p.contains(&replica)
    });
    c.wait_ok(60 * SECOND);
    // The promoted replica's history ends at 7.
    assert_eq!(
        c.servers[replica].cli(&["HGET", &format!("{{cc:room:{room}}}:meta"), "offset"]),
        "7",
        "the failover lost the last three writes"
    );
    // Node b delivered 8..10: its catch-up finds no history it may trust
    // (the meta names the old primary's process); its subscriber is told
    // with a gap, and nothing of the old epoch is delivered again.
    let got = collect(&mut live, |g| g.iter().any(|v| v["ev"] == "gap"));
    let gap = got.iter().find(|v| v["ev"] == "gap").unwrap_or_else(|| panic!("a gap: {got:?}"));
    assert!(got.iter().all(|v| v["ev"] == "gap"), "nothing delivered from the lost epoch: {got:?}");
    assert_ne!(gap["epoch"], epoch.as_str(), "{gap}");
    assert_eq!(gap["offset"], 0);
    // The read wrote nothing: the meta still names the old epoch at 7.
    assert_eq!(c.servers[replica].cli(&["HGET", &format!("{{cc:room:{room}}}:meta"), "epoch"]), epoch);
    // New messages: a new epoch from 1, never epoch E offsets 8..10 again.
    let after = publish_retrying(&a, &room, json!("after"));
    assert_ne!(after.epoch, epoch);
    assert_eq!(after.offset, 1, "{after:?}");
    let renewed = after.epoch.clone();
    let m = messages(&mut live, &room, 1, 10 * SECOND);
    assert_positions(&m, &renewed, 1..=1);
    // A client that held offset 9 of the old epoch is not "recovered".
    for node in [&a, &b] {
        let mut cl = Client::connect(&node.ws_url("/ws"));
        let v = subscribe_since(&mut cl, &room, Some(&before[8]));
        assert_eq!(v["recovered"], false, "{v}");
        assert_eq!((v["epoch"].as_str(), v["offset"].as_u64()), (Some(renewed.as_str()), Some(1)), "{v}");
        cl.expect_silence(Duration::from_millis(300));
    }
}
