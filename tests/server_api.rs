//! The server API calls of PROTOCOL.md §12 that are built so far, against
//! real nodes: standalone, 3 nodes on one real redis-server and 3 nodes on
//! a real Redis Cluster.

mod common;

use common::redis::RedisServer;
use common::redis_topology::RedisCluster;
use common::{Client, Server, start_server, until_reachable};
use serde_json::{Value, json};

fn nodes(n: usize, redis: Option<&str>) -> Vec<Server> {
    (0..n)
        .map(|_| {
            let mut args = vec!["--shards", "2"];
            if let Some(url) = redis {
                args.extend(["--redis", url]);
            }
            start_server(&args)
        })
        .collect()
}

/// A user with connections on every node is disconnected with 4501: each
/// gets the event, then the close with that status; another user is not
/// touched.
fn kick(nodes: &[Server]) {
    let mut tabs: Vec<Client> =
        (0..nodes.len() * 2).map(|i| Client::connect(&nodes[i % nodes.len()].ws_url("/ws?user=mallory"))).collect();
    let mut bystander = Client::connect(&nodes[0].ws_url("/ws?user=alice"));
    for t in &mut tabs {
        t.subscribe("lobby");
    }
    until_reachable(&nodes[nodes.len() - 1], "mallory", &mut tabs);
    let body = br#"{"user":"mallory","code":4501,"reason":"banned"}"#;
    let (code, reply) = nodes[nodes.len() - 1].http("POST", "/api/disconnect", &[], body);
    assert_eq!((code, reply.as_str()), (200, r#"{"ok":true}"#));
    for t in &mut tabs {
        assert_eq!(t.recv(), json!({"ev":"disconnect","code":4501,"reason":"banned"}));
        assert_eq!(t.expect_close(), Some(4501));
    }
    let v = bystander.call(json!({"op":"ping","id":1}));
    assert_eq!(v, json!({"ev":"pong","id":1}), "another user is not touched");
    // The default status is 4500; reconnecting is possible (the server
    // does not ban; the client decides by the code).
    let mut again = Client::connect(&nodes[0].ws_url("/ws?user=mallory"));
    until_reachable(&nodes[0], "mallory", std::slice::from_mut(&mut again));
    let (code, _) = nodes[0].http("POST", "/api/disconnect", &[], br#"{"user":"mallory"}"#);
    assert_eq!(code, 200);
    let v: Value = again.recv();
    assert_eq!((v["ev"].as_str(), v["code"].as_u64()), (Some("disconnect"), Some(4500)));
    assert_eq!(again.expect_close(), Some(4500));
}

#[test]
fn a_user_is_disconnected_on_every_shard_standalone() {
    kick(&nodes(1, None));
}

#[test]
fn a_user_is_disconnected_on_every_node() {
    let redis = RedisServer::start();
    kick(&nodes(3, Some(&redis.url())));
}

#[test]
fn a_user_is_disconnected_on_every_node_of_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 0);
    kick(&nodes(3, Some(&cluster.url())));
}

#[test]
fn bad_disconnect_bodies_are_400() {
    let n = nodes(1, None);
    for body in [
        &b"not json"[..],
        br#"{"code":4500}"#,
        br#"{"user":"a b"}"#,
        br#"{"user":"u","code":1000}"#,
        br#"{"user":"u","code":5000}"#,
    ] {
        let (code, reply) = n[0].http("POST", "/api/disconnect", &[], body);
        assert_eq!(code, 400, "{}: {reply}", String::from_utf8_lossy(body));
        assert!(reply.contains("bad_request"), "{reply}");
    }
    let long = format!(r#"{{"user":"u","reason":"{}"}}"#, "x".repeat(121));
    assert_eq!(n[0].http("POST", "/api/disconnect", &[], long.as_bytes()).0, 400);
    assert_eq!(n[0].http("GET", "/api/disconnect", &[], b"").0, 405);
}

/// `POST /api/subscribe` with `since` puts every connection of a user (on
/// every node) into a history room: each recovers what it missed, then
/// gets live messages; `/api/unsubscribe` takes them out again.
fn server_subscribe(nodes: &[Server]) {
    let last = nodes.len() - 1;
    let publish = |i: u64| -> (String, u64) {
        let body = format!(r#"{{"room":"h:1","data":{i}}}"#);
        let (code, reply) = nodes[last].http("POST", "/api/publish", &[], body.as_bytes());
        assert_eq!(code, 200, "{reply}");
        let v: Value = serde_json::from_str(&reply).unwrap();
        (v["epoch"].as_str().unwrap().to_string(), v["offset"].as_u64().unwrap())
    };
    let (epoch, first) = publish(1);
    for i in 2..=5 {
        publish(i);
    }
    let mut tabs: Vec<Client> =
        (0..nodes.len() * 2).map(|i| Client::connect(&nodes[i % nodes.len()].ws_url("/ws?user=carol"))).collect();
    until_reachable(&nodes[0], "carol", &mut tabs);
    let body = json!({"user":"carol","room":"h:1","since":{"epoch":epoch,"offset":first + 1}}).to_string();
    let (code, reply) = nodes[0].http("POST", "/api/subscribe", &[], body.as_bytes());
    assert_eq!((code, reply.as_str()), (200, r#"{"ok":true}"#));
    for t in &mut tabs {
        let v = t.recv();
        assert_eq!((v["ev"].as_str(), v["server"].as_bool()), (Some("subscribed"), Some(true)), "{v}");
        assert_eq!((v["room"].as_str(), v["recovered"].as_bool()), (Some("h:1"), Some(true)), "{v}");
        for i in 3..=5 {
            assert_eq!(t.recv()["data"], i, "the missed messages, in order");
        }
    }
    publish(6);
    for t in &mut tabs {
        assert_eq!(t.recv()["data"], 6, "then live");
    }
    let (code, _) = nodes[last].http("POST", "/api/unsubscribe", &[], br#"{"user":"carol","room":"h:1"}"#);
    assert_eq!(code, 200);
    for t in &mut tabs {
        assert_eq!(t.recv(), json!({"ev":"unsubscribed","room":"h:1","server":true}));
    }
    publish(7);
    for t in &mut tabs {
        t.expect_silence(std::time::Duration::from_millis(300));
    }
}

fn history_nodes(n: usize, redis: Option<&str>) -> Vec<Server> {
    (0..n)
        .map(|_| {
            let mut args = vec!["--shards", "2", "--history-size", "100"];
            if let Some(url) = redis {
                args.extend(["--redis", url]);
            }
            start_server(&args)
        })
        .collect()
}

#[test]
fn the_server_subscribes_a_user_with_recovery_standalone() {
    server_subscribe(&history_nodes(1, None));
}

#[test]
fn the_server_subscribes_a_user_with_recovery_on_every_node() {
    let redis = RedisServer::start();
    server_subscribe(&history_nodes(3, Some(&redis.url())));
}

#[test]
fn the_server_subscribes_a_user_with_recovery_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 0);
    server_subscribe(&history_nodes(3, Some(&cluster.url())));
}

#[test]
fn bad_membership_bodies_are_400() {
    let n = nodes(1, None);
    for (path, body) in [
        ("/api/subscribe", &b"{}"[..]),
        ("/api/subscribe", br#"{"user":"u"}"#),
        ("/api/subscribe", br#"{"user":"u","room":"a b"}"#),
        ("/api/subscribe", br#"{"user":"u","room":"r","since":{"epoch":"e"}}"#),
        ("/api/unsubscribe", br#"{"user":"u","room":"r","since":{"epoch":"e","offset":1}}"#),
    ] {
        let (code, reply) = n[0].http("POST", path, &[], body);
        assert_eq!(code, 400, "{path} {}: {reply}", String::from_utf8_lossy(body));
    }
}

/// `GET /api/history` answers what the `history` op answers, without `id`.
fn history_api(nodes: &[Server]) {
    for i in 1..=5 {
        let body = format!(r#"{{"room":"h:api","data":{i}}}"#);
        assert_eq!(nodes[0].http("POST", "/api/publish", &[], body.as_bytes()).0, 200);
    }
    let mut c = Client::connect(&nodes[nodes.len() - 1].ws_url("/ws?user=reader"));
    for limit in [2, 100] {
        let mut op = c.call(json!({"op":"history","room":"h:api","limit":limit,"id":1}));
        op.as_object_mut().unwrap().remove("id");
        let (code, body) = nodes[0].http_get(&format!("/api/history?room=h:api&limit={limit}"));
        assert_eq!(code, 200, "{body}");
        let api: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(api, op);
        assert_eq!(api["messages"].as_array().unwrap().len(), limit.min(5));
    }
    assert_eq!(nodes[0].http_get("/api/history?room=h:api&limit=x").0, 400);
    assert_eq!(nodes[0].http_get("/api/history?limit=1").0, 400);
}

#[test]
fn the_history_api_answers_like_the_op() {
    history_api(&history_nodes(1, None));
    let redis = RedisServer::start();
    history_api(&history_nodes(2, Some(&redis.url())));
    // A room that keeps no history: 400.
    let n = nodes(1, None);
    assert_eq!(n[0].http_get("/api/history?room=lobby").0, 400);
}

/// `GET /api/rooms` and `GET /api/info` over `nodes` (each `--shards 2`):
/// rooms summed over the nodes and their shards, pages in byte order,
/// one `info` entry per node with its own counts; with a node stopped
/// (SIGSTOP) both answer within 3 s and count the nodes that answered.
fn census(nodes: &[Server]) {
    let n = nodes.len();
    // On node i: "chat:a" gets 2 connections of ann (on both shards) and
    // one of bob; "chat:b" one of bob; only node 0 has "other".
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut on = |shard: usize, user: &str, rooms: &[&str]| {
            let mut c = node.client_on_shard(shard, user);
            for r in rooms {
                c.subscribe(r);
            }
            clients.push(c);
        };
        on(0, "ann", &["chat:a"]);
        on(1, "ann", &["chat:a"]);
        on(1, "bob", &["chat:a", "chat:b"]);
        if i == 0 {
            on(0, "cy", &["other"]);
        }
    }
    let get = |node: &Server, path: &str| -> Value {
        let (code, body) = node.http_get(path);
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    };
    let all = json!({"rooms":[
        {"room":"chat:a","clients":3 * n},
        {"room":"chat:b","clients":n},
        {"room":"other","clients":1},
    ],"nodes":n});
    for node in nodes {
        assert_eq!(get(node, "/api/rooms"), all);
    }
    let last = &nodes[n - 1];
    assert_eq!(
        get(last, "/api/rooms?prefix=chat:&limit=1"),
        json!({"rooms":[{"room":"chat:a","clients":3 * n}],"nodes":n,"more":true})
    );
    assert_eq!(
        get(last, "/api/rooms?prefix=chat:&after=chat:a&limit=1"),
        json!({"rooms":[{"room":"chat:b","clients":n}],"nodes":n})
    );
    assert_eq!(get(last, "/api/rooms?prefix=none"), json!({"rooms":[],"nodes":n}));
    for bad in ["/api/rooms?limit=0", "/api/rooms?limit=1001", "/api/rooms?after=a%20b"] {
        assert_eq!(last.http_get(bad).0, 400, "{bad}");
    }
    let info = get(last, "/api/info");
    let list = info["nodes"].as_array().unwrap();
    assert_eq!(list.len(), n, "{info}");
    let mut ids: Vec<&str> = list.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), n, "distinct node ids: {info}");
    let mut by_port: Vec<(u16, (u64, u64, u64))> = list
        .iter()
        .map(|e| {
            assert_eq!((e["shards"].as_u64(), e["shards_answered"].as_u64()), (Some(2), Some(2)), "{e}");
            assert_eq!(e["version"], env!("CARGO_PKG_VERSION"));
            assert!(e["uptime_secs"].as_u64().is_some(), "{e}");
            let port = e["listen"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap();
            let counts = |k: &str| e[k].as_u64().unwrap();
            (port, (counts("connections"), counts("users"), counts("rooms")))
        })
        .collect();
    by_port.sort();
    let mut want: Vec<(u16, (u64, u64, u64))> =
        nodes.iter().enumerate().map(|(i, s)| (s.addr.port(), if i == 0 { (4, 3, 3) } else { (3, 2, 2) })).collect();
    want.sort();
    assert_eq!(by_port, want, "{info}");
    if n == 1 {
        return;
    }
    // A stopped node keeps its Redis connections open and answers nothing.
    let stopped = &nodes[n - 1];
    unsafe { libc::kill(stopped.child.id() as i32, libc::SIGSTOP) };
    let t = std::time::Instant::now();
    let rooms = get(&nodes[0], "/api/rooms");
    let info = get(&nodes[0], "/api/info");
    let took = t.elapsed();
    unsafe { libc::kill(stopped.child.id() as i32, libc::SIGCONT) };
    assert!(took < std::time::Duration::from_secs(6), "two calls within 3 s each: {took:?}");
    assert_eq!(
        rooms,
        json!({"rooms":[
            {"room":"chat:a","clients":3 * (n - 1)},
            {"room":"chat:b","clients":n - 1},
            {"room":"other","clients":1},
        ],"nodes":n - 1})
    );
    assert_eq!(info["nodes"].as_array().unwrap().len(), n - 1, "{info}");
    assert!(!info.to_string().contains(&format!(":{}\"", stopped.addr.port())), "{info}");
    // Back: all answer again.
    assert_eq!(get(&nodes[0], "/api/rooms"), all);
}

#[test]
fn rooms_and_info_standalone() {
    census(&nodes(1, None));
}

#[test]
fn rooms_and_info_on_every_node_with_one_stopped() {
    let redis = RedisServer::start();
    census(&nodes(3, Some(&redis.url())));
}

#[test]
fn rooms_and_info_on_a_redis_cluster_with_one_node_stopped() {
    let cluster = RedisCluster::start(3, 0);
    census(&nodes(3, Some(&cluster.url())));
}
