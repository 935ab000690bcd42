//! The Redis contract a backend relies on (PROTOCOL.md §3 and §8,
//! docs/cluster.md), checked from outside with the test's own Redis
//! connections: the channel names under a non-default `--channel-prefix`
//! (and the history keys `{<prefix>room:R}`), the exact bytes corecast
//! PUBLISHes (the JSON text of the event, byte for byte what its clients
//! get), a backend's `PUBLISH` under the prefix and `SPUBLISH` in a cluster
//! reaching clients, and the channel -> server mapping of several servers,
//! `jump(crc64_xz(channel), n)`, as a golden table a backend must reproduce.

mod common;

use std::time::Duration;

use common::redis::{RedisServer, Resp, RespConn, deadline, wait_until};
use common::redis_topology::RedisCluster;
use common::{Client, start_server};
use serde_json::{Value, json};
use tungstenite::Message;

const SECOND: Duration = Duration::from_secs(1);

/// The next text frame's exact bytes (within 10 s).
fn next_text(c: &mut Client) -> Vec<u8> {
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = c.ws.get_mut() {
        s.set_read_timeout(Some(10 * SECOND)).unwrap();
    }
    loop {
        match c.ws.read().expect("a text frame within 10 s") {
            Message::Text(t) => return t.as_bytes().to_vec(),
            _ => continue,
        }
    }
}

/// SUBSCRIBEs a raw connection to `channels` and reads the confirmations.
fn raw_subscriber(r: &RedisServer, channels: &[&str]) -> RespConn {
    let mut raw = RespConn::open(r.port);
    let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
    args.extend(channels.iter().map(|c| c.as_bytes()));
    raw.send(&args);
    for ch in channels {
        match raw.read() {
            Resp::Array(v) if v[0].text() == "subscribe" && v[1].text() == *ch => {}
            other => panic!("SUBSCRIBE {ch}: {other:?}"),
        }
    }
    raw
}

#[test]
fn a_prefixed_node_publishes_the_exact_event_text_on_its_own_channels() {
    let _d = deadline("prefixed_exact_bytes", 60 * SECOND);
    let r = RedisServer::start();
    let url = r.url();
    let s = start_server(&["--shards", "2", "--channel-prefix", "x:", "--redis", &url]);
    let mut raw = raw_subscriber(&r, &["x:room:lobby", "x:user:bob"]);
    let mut alice = Client::connect(&s.ws_url("/ws?user=alice"));
    let mut bob = Client::connect(&s.ws_url("/ws?user=bob"));
    common::redis::subscribe(&mut bob, "lobby");
    // The node's own subscriptions are under the prefix, none under `cc:`.
    wait_until("bob's user channel subscribed", 5 * SECOND, || r.numsub("x:user:bob") == 2);
    assert_eq!(r.numsub("x:room:lobby"), 2, "the node and the raw subscriber");
    assert_eq!(r.channels("cc:*"), Vec::<String>::new());

    // A room message: what Redis carries is, byte for byte, what bob gets.
    alice.send_json(&json!({"op":"publish","room":"lobby","data":{"n":[1,2.5,null],"s":"é\"\\"}}));
    let (ch, payload) = raw.next_message();
    assert_eq!(ch, "x:room:lobby");
    let got = next_text(&mut bob);
    assert_eq!(String::from_utf8_lossy(&payload), String::from_utf8_lossy(&got), "the exact JSON text of the event");
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v, json!({"ev":"message","room":"lobby","from":"alice","data":{"n":[1,2.5,null],"s":"é\"\\"}}));

    // A direct message, on the user channel.
    alice.send_json(&json!({"op":"send","user":"bob","data":"hi"}));
    let (ch, payload) = raw.next_message();
    assert_eq!(ch, "x:user:bob");
    assert_eq!(payload, br#"{"ev":"direct","from":"alice","data":"hi"}"#);
    assert_eq!(next_text(&mut bob), payload);

    // A backend publishes under the prefix and every subscriber gets exactly
    // that text; under the default prefix nobody listens.
    let backend = r#"{"ev":"message","room":"lobby","from":"backend","data":{"k":1}}"#;
    assert_eq!(r.publish("x:room:lobby", backend), 2);
    assert_eq!(next_text(&mut bob), backend.as_bytes());
    assert_eq!(raw.next_message().1, backend.as_bytes());
    assert_eq!(r.publish("cc:room:lobby", backend), 0);
    bob.expect_silence(Duration::from_millis(300));
}

#[test]
fn a_prefixed_node_keeps_room_history_under_the_prefix() {
    let _d = deadline("prefixed_history_keys", 60 * SECOND);
    let r = RedisServer::start();
    let url = r.url();
    let s = start_server(&["--shards", "2", "--channel-prefix", "x:", "--history-size", "10", "--redis", &url]);
    let mut raw = raw_subscriber(&r, &["x:room:h"]);
    let mut c = Client::connect(&s.ws_url("/ws?user=c"));
    common::history::subscribe_since(&mut c, "h", None);
    let p = common::history::api_publish(&s, "h", json!("one"));
    assert_eq!(p.offset, 1);
    let (ch, payload) = raw.next_message();
    assert_eq!(ch, "x:room:h");
    assert_eq!(next_text(&mut c), payload, "the exact text, position included");
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!((v["epoch"].as_str(), v["offset"].as_u64()), (Some(p.epoch.as_str()), Some(1)), "{v}");
    // The keys (docs/history.md): `{x:room:h}:meta` and `{x:room:h}:log`.
    let mut keys: Vec<String> = r.cli(&["KEYS", "*"]).lines().map(String::from).collect();
    keys.sort();
    assert_eq!(keys, ["{x:room:h}:log", "{x:room:h}:meta"]);
    assert_eq!(r.cli(&["HGET", "{x:room:h}:meta", "offset"]), "1");
    assert_eq!(r.cli(&["HGET", "{x:room:h}:meta", "epoch"]), p.epoch);
}

#[test]
fn a_backend_spublish_in_a_cluster_reaches_clients() {
    let _d = deadline("cluster_spublish", 120 * SECOND);
    let c = RedisCluster::start(3, 0);
    let url = c.url();
    let s = start_server(&["--shards", "2", "--redis", &url]);
    let mut bob = Client::connect(&s.ws_url("/ws?user=bob"));
    common::redis::subscribe(&mut bob, "lobby");
    let owner = c.owner("cc:room:lobby");
    assert_eq!(c.shardnumsub(owner, "cc:room:lobby"), 1, "the node SSUBSCRIBEd at the slot's owner");
    let backend = r#"{"ev":"message","room":"lobby","from":"backend","data":[1]}"#;
    let n = c.servers[owner].cli(&["SPUBLISH", "cc:room:lobby", backend]);
    assert_eq!(n, "1", "one node subscribed");
    assert_eq!(next_text(&mut bob), backend.as_bytes());
    // A direct message too, on its own slot's owner.
    let owner = c.owner("cc:user:bob");
    let backend = r#"{"ev":"direct","from":"backend","data":"hi"}"#;
    wait_until("bob's user channel subscribed", 5 * SECOND, || c.shardnumsub(owner, "cc:user:bob") == 1);
    assert_eq!(c.servers[owner].cli(&["SPUBLISH", "cc:user:bob", backend]), "1");
    assert_eq!(next_text(&mut bob), backend.as_bytes());
}

// ---- several servers: which server holds a channel ------------------------------

/// CRC-64/XZ (reflected ECMA-182 polynomial, init and xorout all ones), as a
/// backend would write it from the catalogue definition.
fn crc64_xz(data: &[u8]) -> u64 {
    let mut crc = u64::MAX;
    for &b in data {
        crc ^= u64::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xC96C_5795_D787_0F42 } else { crc >> 1 };
        }
    }
    !crc
}

/// Jump consistent hash (Lamping & Veach 2014), as published.
fn jump(mut key: u64, n: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(n) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The golden table: channel -> index of its server among 3, in `--redis`
/// URL order (computed from the definitions above; the node must agree).
const GOLDEN_3: [(&str, u32); 6] = [
    ("cc:room:lobby", 2),
    ("cc:room:chat", 2),
    ("cc:room:r1", 1),
    ("cc:room:r2", 1),
    ("cc:user:alice", 2),
    ("cc:user:bob", 0),
];

#[test]
fn the_reference_definitions_give_the_golden_table() {
    assert_eq!(crc64_xz(b"123456789"), 0x995D_C9BB_DF19_39FA, "the CRC-64/XZ check value");
    assert_eq!(crc64_xz(b"cc:room:lobby"), 0x95F3_E57B_4CA8_7F60);
    for (ch, at) in GOLDEN_3 {
        assert_eq!(jump(crc64_xz(ch.as_bytes()), 3), at, "{ch}");
        assert_eq!(jump(crc64_xz(ch.as_bytes()), 1), 0, "{ch}: one server holds everything");
    }
    // Consistency: from 3 to 4 servers a channel stays or moves to the new one.
    for (ch, at) in GOLDEN_3 {
        let four = jump(crc64_xz(ch.as_bytes()), 4);
        assert!(four == at || four == 3, "{ch}: {at} -> {four}");
    }
}

#[test]
fn several_servers_hold_each_channel_where_the_golden_table_says() {
    let _d = deadline("several_golden", 60 * SECOND);
    let redis: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let url = redis.iter().map(|r| r.url()).collect::<Vec<_>>().join(",");
    let s = start_server(&["--shards", "2", "--redis", &url]);
    let mut alice = Client::connect(&s.ws_url("/ws?user=alice"));
    let _bob = Client::connect(&s.ws_url("/ws?user=bob"));
    for room in ["lobby", "chat", "r1", "r2"] {
        common::redis::subscribe(&mut alice, room);
    }
    for (ch, at) in GOLDEN_3 {
        wait_until(&format!("{ch} subscribed"), 5 * SECOND, || redis[at as usize].numsub(ch) == 1);
        for (i, r) in redis.iter().enumerate() {
            if i != at as usize {
                assert_eq!(r.numsub(ch), 0, "{ch} only on server {at}, not {i}");
            }
        }
    }
}
