//! One Redis subscription per room per node (`services::relay`, issue 21):
//! 3 nodes at `--shards 4` with a room's members on every shard hold 3
//! subscriptions of its channel, not 12 (`PUBSUB NUMSUB` on one Redis,
//! `PUBSUB SHARDNUMSUB` at the owning primary of a Cluster); every member
//! gets every message once and in order while members leave shard by shard
//! and after the subscriber links are cut; a room whose members are all on
//! one shard is held there and its messages cross to no other shard; the
//! hidden `--per-shard-subscriptions` restores one per shard.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::redis::{RedisServer, wait_until};
use common::redis_topology::RedisCluster;
use common::{Client, Server, StopOnDrop, start_server};
use corecast::services::relay::Relay;
use serde_json::json;

const SHARDS: usize = 4;

fn nodes(url: &str, per_shard: bool) -> Vec<Server> {
    let per_shard = per_shard.to_string();
    (0..3)
        .map(|_| {
            start_server(&[
                "--shards",
                "4",
                "--redis",
                url,
                "--per-shard-subscriptions",
                &per_shard,
                "--max-ops-per-sec",
                "0",
            ])
        })
        .collect()
}

/// One member of `room` on every shard of every node: (node, shard, client).
fn everywhere(nodes: &[Server], room: &str) -> Vec<(usize, usize, Client)> {
    let mut out = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for s in 0..SHARDS {
            let mut c = node.client_on_shard(s, &format!("m{n}-{s}"));
            c.subscribe(room);
            out.push((n, s, c));
        }
    }
    out
}

/// Publishes `from..=to` into `room` through node 0 and checks that every
/// client gets exactly those, in order.
fn publish_and_check(nodes: &[Server], room: &str, clients: &mut [(usize, usize, Client)], from: u64, to: u64) {
    for i in from..=to {
        let body = json!({"room": room, "data": i}).to_string();
        assert_eq!(nodes[0].http("POST", "/api/publish", &[], body.as_bytes()).0, 200);
    }
    for (n, s, c) in clients.iter_mut() {
        for i in from..=to {
            let v = c.recv();
            assert_eq!((v["room"].as_str(), v["data"].as_u64()), (Some(room), Some(i)), "node {n} shard {s}: {v}");
        }
    }
    for (n, s, c) in clients.iter_mut() {
        if let Some(v) = c.recv_json(Duration::from_millis(100)) {
            panic!("node {n} shard {s}: more than once: {v}");
        }
    }
}

/// The room's subscriptions, as Redis counts them.
fn relayed_room(nodes: &[Server], numsub: &dyn Fn() -> u64) {
    let mut clients = everywhere(nodes, "big");
    assert_eq!(numsub(), 3, "one subscription per node");
    publish_and_check(nodes, "big", &mut clients, 1, 20);
    // Members leave shard by shard on every node (the relay among them, at
    // some point): the others keep getting every message, and the node's
    // one subscription stays while it has a member.
    let mut next = 21;
    for s in 0..SHARDS - 1 {
        clients.retain(|(_, shard, _)| *shard != s);
        for node in nodes {
            let left = (SHARDS - 1 - s) as f64;
            node.wait_until("the close counted", || node.metric("corecast_connections") == left);
        }
        assert_eq!(numsub(), 3, "after shard {s}'s members left");
        publish_and_check(nodes, "big", &mut clients, next, next + 4);
        next += 5;
    }
    clients.clear();
    wait_until("no subscription left", Duration::from_secs(10), || numsub() == 0);
}

#[test]
fn one_subscription_per_node_on_one_redis() {
    let redis = RedisServer::start();
    let n = nodes(&redis.url(), false);
    relayed_room(&n, &|| redis.numsub("cc:room:big"));
    // Cut every subscriber link: the relays subscribe again and pass on.
    let mut clients = everywhere(&n, "again");
    assert_eq!(redis.numsub("cc:room:again"), 3);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    wait_until("the relays subscribed again", Duration::from_secs(10), || {
        redis.numsub("cc:room:again") == 3 && n.iter().all(|s| s.links_up())
    });
    // A publish right as a reader comes back may be lost (at most once,
    // §2): wait until one arrives everywhere, then check exactly.
    let mut k = 0;
    'warm: loop {
        k += 1;
        assert!(k < 100, "the room never came back everywhere");
        let body = json!({"room": "again", "data": {"warm": k}}).to_string();
        n[0].http("POST", "/api/publish", &[], body.as_bytes());
        for (_, _, c) in clients.iter_mut() {
            loop {
                match c.recv_json(Duration::from_millis(200)) {
                    Some(v) if v["data"]["warm"] == k => break,
                    Some(_) => continue,
                    None => continue 'warm,
                }
            }
        }
        break;
    }
    publish_and_check(&n, "again", &mut clients, 1, 10);
}

#[test]
fn one_subscription_per_node_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let n = nodes(&cluster.url(), false);
    let owner = cluster.owner("cc:room:big");
    relayed_room(&n, &|| cluster.shardnumsub(owner, "cc:room:big"));
}

#[test]
fn per_shard_subscriptions_hold_one_per_shard() {
    let redis = RedisServer::start();
    let n = nodes(&redis.url(), true);
    let mut clients = everywhere(&n, "big");
    assert_eq!(redis.numsub("cc:room:big"), 12, "one per shard with members");
    publish_and_check(&n, "big", &mut clients, 1, 10);
}

/// `corecast_inbox_messages_total` of each shard of a 4-shard node.
fn inboxes(node: &Server) -> Vec<f64> {
    (0..SHARDS).map(|s| node.metric(&format!("corecast_inbox_messages_total{{shard=\"{s}\"}}"))).collect()
}

/// A room whose members are all on one shard is held by that shard, even
/// when its directory (the hash of its name) is another: its messages
/// reach no other shard's inbox. A room with members on two shards costs
/// the one hop to the second.
#[test]
fn a_room_on_one_shard_is_held_there_and_costs_no_hop() {
    let redis = RedisServer::start();
    let node = start_server(&["--shards", "4", "--redis", &redis.url(), "--max-ops-per-sec", "0"]);
    let publish = |room: &str, i: u64| {
        let body = json!({"room": room, "data": i}).to_string();
        assert_eq!(node.http("POST", "/api/publish", &[], body.as_bytes()).0, 200);
    };
    const N: u64 = 200;
    // Every pair stays connected to the end: a close still being counted
    // would throw off `client_on_shard`'s count of the next connection.
    let mut pairs = Vec::new();
    for k in 0..SHARDS {
        let room = (0..).map(|i| format!("pair-{k}-{i}")).find(|r| Relay::directory_of(r, SHARDS) != k).unwrap();
        let directory = Relay::directory_of(&room, SHARDS);
        let mut pair = [node.client_on_shard(k, &format!("a{k}")), node.client_on_shard(k, &format!("b{k}"))];
        for c in &mut pair {
            c.subscribe(&room);
        }
        assert_eq!(redis.numsub(&format!("cc:room:{room}")), 1, "one subscription");
        let before = inboxes(&node);
        for i in 1..=N {
            publish(&room, i);
        }
        for c in &mut pair {
            for i in 1..=N {
                let v = c.recv();
                assert_eq!((v["room"].as_str(), v["data"].as_u64()), (Some(room.as_str()), Some(i)), "{v}");
            }
        }
        let after = inboxes(&node);
        let grew: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert!(grew[k] >= N as f64, "shard {k}'s reader brought the room's messages: {grew:?}");
        assert_eq!(node.metric(&format!("corecast_relay_rooms{{shard=\"{k}\"}}")), 1.0, "shard {k} holds its room");
        assert_eq!(node.metric("corecast_relay_passed_total"), 0.0, "nothing passed on");
        for (s, g) in grew.iter().enumerate().filter(|(s, _)| *s != k) {
            assert!(*g < 20.0, "shard {s} (directory {directory}) saw the messages of a room on shard {k}: {grew:?}");
        }
        pairs.push(pair);
    }
    // Members on two shards: the holder (the first to join) passes each
    // message to the other.
    let room = "split";
    let mut a = node.client_on_shard(1, "split-a");
    a.subscribe(room);
    let mut b = node.client_on_shard(2, "split-b");
    b.subscribe(room);
    assert_eq!(redis.numsub("cc:room:split"), 1, "one subscription for two shards");
    let before = inboxes(&node);
    for i in 1..=N {
        publish(room, i);
    }
    for c in [&mut a, &mut b] {
        for i in 1..=N {
            assert_eq!(c.recv()["data"].as_u64(), Some(i));
        }
    }
    let grew: Vec<f64> = inboxes(&node).iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(grew[1] >= N as f64 && grew[2] >= N as f64, "held on 1, passed on to 2: {grew:?}");
    assert_eq!(node.metric("corecast_relay_rooms{shard=\"1\"}"), 2.0, "shard 1 holds its pair's room and this one");
    assert_eq!(node.metric("corecast_relay_passed_total{shard=\"1\"}"), N as f64, "each message passed on once");
    assert_eq!(node.metric("corecast_relay_passed_total"), N as f64, "by shard 1 alone");
}

/// Members come and go on every shard of a node in turn while messages
/// keep coming: by turns the next one joins before the last one leaves
/// (the holder stays, with no member of its own) and after the room has
/// emptied on the node (the next member's shard holds it). Each member
/// gets nothing before its `subscribed` and, from then on, an unbroken
/// run of messages, in order, each once; when the last has left, the node
/// holds no subscription.
#[test]
fn members_coming_and_going_on_every_shard_get_an_unbroken_run() {
    let redis = RedisServer::start();
    let node = start_server(&["--shards", "4", "--redis", &redis.url(), "--max-ops-per-sec", "0"]);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let body = json!({"room": "churn", "data": i}).to_string();
                assert_eq!(node.http("POST", "/api/publish", &[], body.as_bytes()).0, 200);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let mut last: Option<Client> = None;
        for round in 0..12 {
            let overlap = round % 2 == 1;
            if !overlap && let Some(c) = last.take() {
                drop(c);
                node.wait_until("the room empty on the node", || node.metric("corecast_connections") == 0.0);
                wait_until("the subscription let go", Duration::from_secs(10), || redis.numsub("cc:room:churn") == 0);
            }
            let shard = (round * 3) % SHARDS;
            let mut c = node.client_on_shard(shard, &format!("c{round}"));
            c.send_json(&json!({"op": "subscribe", "room": "churn", "id": "s"}));
            let v = c.recv();
            assert_eq!(v["ev"], "subscribed", "round {round}, shard {shard}: nothing before `subscribed`: {v}");
            if let Some(c) = last.take() {
                drop(c);
            }
            // A run of 30 (however fast the publisher goes on a busy box).
            let mut got = Vec::new();
            let until = std::time::Instant::now() + Duration::from_secs(20);
            while got.len() < 30 && std::time::Instant::now() < until {
                if let Some(v) = c.recv_json(Duration::from_millis(50)) {
                    got.push(v["data"].as_u64().unwrap_or_else(|| panic!("round {round}: {v}")));
                }
            }
            assert_eq!(got.len(), 30, "round {round}, shard {shard}: {got:?}");
            for w in got.windows(2) {
                assert_eq!(w[1], w[0] + 1, "round {round}, shard {shard} (overlap {overlap}): {got:?}");
            }
            last = Some(c);
        }
        drop(last.take());
        wait_until("no subscription left", Duration::from_secs(10), || redis.numsub("cc:room:churn") == 0);
    });
}
