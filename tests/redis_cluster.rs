//! Several corecast nodes on one private Redis (PROTOCOL.md §3): messages
//! cross nodes in every direction, in publisher order, once; backends publish
//! with any Redis client; malformed payloads are dropped; each node's
//! subscriptions follow its members; `subscribed` means subscribed.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use common::redis::{RedisServer, deadline, expect_event, node, ping, subscribe, unsubscribe, wait_until};
use common::{Client, Raw, client_frame, start_server};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn room_and_direct_messages_cross_every_node_in_order_and_once() {
    let _d = deadline("room_and_direct_messages_cross_every_node_in_order_and_once", 30 * SECOND);
    let redis = RedisServer::start();
    let nodes: Vec<_> = (0..3).map(|_| node(&redis.url(), 2)).collect();
    let mut clients: Vec<Client> =
        nodes.iter().enumerate().map(|(i, n)| Client::connect(&n.ws_url(&format!("/ws?user=u{i}")))).collect();
    for c in &mut clients {
        subscribe(c, "lobby");
    }
    // A second connection of u0 on node 0, not in the room: it gets u0's directs too.
    let mut u0_again = Client::connect(&nodes[0].ws_url("/ws?user=u0"));
    // Its room's `subscribed` is confirmed after its user channel (same shard, in order).
    subscribe(&mut u0_again, "sync-u0-again");

    const N: u64 = 40;
    for n in 0..N {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send_json(&json!({"op": "publish", "room": "lobby", "data": {"node": i, "n": n}}));
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        for j in (0..3).filter(|&j| j != i) {
            c.send_json(&json!({"op": "send", "user": format!("u{j}"), "data": {"node": i}}));
        }
    }

    for (me, c) in clients.iter_mut().enumerate() {
        let mut next = [0u64; 3];
        let mut directs = HashSet::new();
        for _ in 0..(3 * N + 2) {
            let v = expect_event(c, "a message or a direct", 5 * SECOND);
            let from_node = v["data"]["node"].as_u64().expect("data.node") as usize;
            assert_eq!(v["from"], format!("u{from_node}"), "{v}");
            match v["ev"].as_str() {
                Some("message") => {
                    assert_eq!(v["room"], "lobby");
                    let n = v["data"]["n"].as_u64().expect("data.n");
                    assert_eq!(
                        n, next[from_node],
                        "client on node {me}: node {from_node}'s messages out of order or twice"
                    );
                    next[from_node] += 1;
                }
                Some("direct") => {
                    assert!(directs.insert(from_node), "client on node {me}: direct from {from_node} twice")
                }
                _ => panic!("unexpected {v}"),
            }
        }
        assert_eq!(next, [N; 3]);
        assert_eq!(directs.len(), 2);
        c.expect_silence(Duration::from_millis(300));
    }
    let mut seen = HashSet::new();
    for _ in 0..2 {
        let v = expect_event(&mut u0_again, "a direct", 5 * SECOND);
        assert_eq!(v["ev"], "direct", "{v}");
        assert!(seen.insert(v["data"]["node"].as_u64()), "a direct twice: {v}");
    }
    u0_again.expect_silence(Duration::from_millis(200));
}

#[test]
fn a_backend_publish_through_redis_reaches_every_node_and_malformed_ones_are_dropped() {
    let _d = deadline("a_backend_publish_through_redis_reaches_every_node_and_malformed_ones_are_dropped", 30 * SECOND);
    let redis = RedisServer::start();
    let nodes: Vec<_> = (0..3).map(|_| node(&redis.url(), 2)).collect();
    let mut clients: Vec<Client> =
        nodes.iter().enumerate().map(|(i, n)| Client::connect(&n.ws_url(&format!("/ws?user=b{i}")))).collect();
    for c in &mut clients {
        subscribe(c, "lobby");
    }
    let subscribers = redis.numsub("cc:room:lobby");
    assert_eq!(subscribers, 3, "one subscribed shard per node");

    let good = r#"{"ev":"message","room":"lobby","from":"backend","data":1}"#;
    assert_eq!(redis.publish("cc:room:lobby", good), subscribers);
    for c in &mut clients {
        let v = expect_event(c, "the backend's message", 5 * SECOND);
        assert_eq!(v, json!({"ev": "message", "room": "lobby", "from": "backend", "data": 1}));
    }

    let dropped =
        |nodes: &[common::Server]| -> f64 { nodes.iter().map(|n| n.metric("corecast_bus_dropped_total")).sum() };
    let before = dropped(&nodes);
    let malformed: [&[u8]; 6] = [
        b"not json",
        b"[1,2,3]",
        br#"{"ev":"message","room":"lobby""#,
        br#"{"ev":"direct","from":"x","data":1}"#,
        br#"{"ev":"message","room":"elsewhere","from":"x","data":1}"#,
        b"{\"ev\":\"message\",\"room\":\"lobby\",\"from\":\"x\",\"data\":\"\xff\"}",
    ];
    for m in malformed {
        assert_eq!(redis.publish("cc:room:lobby", m), subscribers);
    }
    let want = before + (malformed.len() as u64 * subscribers) as f64;
    wait_until("every subscribed shard dropped every malformed payload", 5 * SECOND, || dropped(&nodes) == want);
    for c in &mut clients {
        c.expect_silence(Duration::from_millis(200));
    }

    // The nodes keep working: the next good message, a direct, a ping.
    assert_eq!(redis.publish("cc:room:lobby", r#"{"ev":"message","room":"lobby","from":"backend","data":2}"#), 3);
    for c in &mut clients {
        assert_eq!(expect_event(c, "message 2", 5 * SECOND)["data"], 2);
        ping(c, SECOND);
    }
    assert_eq!(redis.publish("cc:user:b1", r#"{"ev":"direct","from":"backend","data":"hi"}"#), 1);
    assert_eq!(
        expect_event(&mut clients[1], "a direct", 5 * SECOND),
        json!({"ev": "direct", "from": "backend", "data": "hi"})
    );
}

#[test]
fn subscribed_means_a_message_published_right_after_it_arrives() {
    let _d = deadline("subscribed_means_a_message_published_right_after_it_arrives", 30 * SECOND);
    let redis = RedisServer::start();
    let (n0, n1) = (node(&redis.url(), 2), node(&redis.url(), 2));
    let mut a = Client::connect(&n0.ws_url("/ws?user=a"));
    let mut b = Client::connect(&n1.ws_url("/ws?user=b"));
    for i in 0..40 {
        // A room new to the node each time: the reply waits for Redis.
        let room = format!("fresh-{i}");
        subscribe(&mut a, &room);
        b.send_json(&json!({"op": "publish", "room": room, "data": i}));
        let v = expect_event(&mut a, "the message published right after `subscribed`", 5 * SECOND);
        assert_eq!(v, json!({"ev": "message", "room": room, "from": "b", "data": i}));
    }
}

#[test]
fn a_nodes_redis_channels_follow_its_members() {
    let _d = deadline("a_nodes_redis_channels_follow_its_members", 30 * SECOND);
    let redis = RedisServer::start();
    let n = node(&redis.url(), 2);
    let mut c1 = Client::connect(&n.ws_url("/ws?user=m1"));
    let mut c2 = Client::connect(&n.ws_url("/ws?user=m2"));
    wait_until("both user channels are subscribed", 5 * SECOND, || {
        redis.channels("cc:user:*") == ["cc:user:m1", "cc:user:m2"]
    });

    subscribe(&mut c1, "follow");
    // `subscribed` came back: the channel is there now, no waiting.
    assert_eq!(redis.numsub("cc:room:follow"), 1);
    subscribe(&mut c2, "follow");
    let shards_with_members = redis.numsub("cc:room:follow");
    assert!((1..=2).contains(&shards_with_members), "{shards_with_members}");

    unsubscribe(&mut c1, "follow");
    unsubscribe(&mut c2, "follow");
    wait_until("the room's channel is gone", 5 * SECOND, || {
        redis.numsub("cc:room:follow") == 0 && redis.channels("cc:room:*").is_empty()
    });

    // Back again: subscribed at once, and the channel follows.
    subscribe(&mut c2, "follow");
    assert_eq!(redis.numsub("cc:room:follow"), 1);

    // A closed connection leaves its rooms and its user channel.
    drop(c2);
    wait_until("the closed connection's channels are gone", 5 * SECOND, || {
        redis.channels("cc:room:*").is_empty() && redis.channels("cc:user:*") == ["cc:user:m1"]
    });
    drop(c1);
    wait_until("no channel left", 5 * SECOND, || redis.channels("cc:*").is_empty());
}

#[test]
fn a_burst_of_joins_reaches_redis_as_a_few_subscribe_commands() {
    let _d = deadline("a_burst_of_joins_reaches_redis_as_a_few_subscribe_commands", 30 * SECOND);
    let redis = RedisServer::start();
    // One connection joining 500 rooms at once: past the default limits.
    let url = redis.url();
    let n =
        start_server(&["--shards", "1", "--redis", &url, "--max-ops-per-sec", "0", "--max-rooms-per-connection", "0"]);
    let mut c = Raw::upgrade(n.addr, "/ws?user=burst");
    wait_until("the user channel is subscribed", 5 * SECOND, || redis.numsub("cc:user:burst") == 1);
    let before = n.metric("corecast_redis_sub_commands_total");

    // 500 subscribes arriving at once, as from 500 clients joining together.
    const ROOMS: usize = 500;
    let burst: Vec<u8> = (0..ROOMS)
        .flat_map(|i| {
            let op = json!({"op": "subscribe", "room": format!("burst-{i}"), "id": i});
            client_frame(0x81, op.to_string().as_bytes(), true)
        })
        .collect();
    c.s.write_all(&burst).expect("write the burst");
    let mut replied = HashSet::new();
    for _ in 0..ROOMS {
        let (_, payload) = c.read_frame().expect("a `subscribed` reply");
        let v: Value = serde_json::from_slice(&payload).expect("JSON");
        assert_eq!(v["ev"], "subscribed", "{v}");
        assert!(replied.insert(v["id"].as_u64().expect("id")));
    }
    // One SUBSCRIBE per turn of the shard's event loop (the whole burst is
    // read in one or two), never one per join.
    let commands = n.metric("corecast_redis_sub_commands_total") - before;
    assert!(commands <= 3.0, "{ROOMS} joins took {commands} SUBSCRIBE commands");
    assert_eq!(redis.channels("cc:room:burst-*").len(), ROOMS);
}
