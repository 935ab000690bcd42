//! `POST /api/publish` to many targets, its `idempotency_key`, and
//! `POST /api/batch` (PROTOCOL.md §12), against real nodes: standalone
//! (`--shards 2`, the calls pinned to one shard or the other), 3 nodes on
//! one real redis-server, and 3 nodes on a real Redis Cluster.
//!
//! "Nothing more arrived" is shown without sleeping: after the call that
//! must deliver nothing, a marker goes to the same targets, and the next
//! message every connection gets must be the marker (a user channel and a
//! room keep the order in which Redis, or the local bus, took them).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::redis_topology::{RedisCluster, TempDir};
use common::{Client, DEADLINE, Server, start_server};
use serde_json::{Value, json};

/// Users, each with one connection; the first `TWICE` have a second one on
/// another node (another shard, mostly, standalone).
const USERS: usize = 500;
const TWICE: usize = 40;

/// Where a call is sent: a node and, standalone, one of its shards.
#[derive(Clone, Copy, Debug)]
struct Ep {
    node: usize,
    shard: Option<usize>,
}

struct Setup {
    nodes: Vec<Server>,
    /// Three places to call, each another node (standalone: the shards
    /// alternate, so a repeat lands on the other shard).
    eps: [Ep; 3],
    _dir: TempDir,
}

/// Nodes with history for every room but `live:*`.
fn setup(n: usize, redis: Option<&str>) -> Setup {
    let dir = TempDir::new("api-publish");
    let ns = dir.file("ns.toml");
    std::fs::write(&ns, "[[namespace]]\nprefix = \"live:\"\nhistory_size = 0\n").unwrap();
    let nodes: Vec<Server> = (0..n)
        .map(|_| {
            let mut args = vec!["--shards", "2", "--history-size", "100", "--config", &ns, "--debug-hooks"];
            if let Some(url) = redis {
                args.extend(["--redis", url]);
            }
            start_server(&args)
        })
        .collect();
    let eps = if n == 1 {
        [Ep { node: 0, shard: Some(0) }, Ep { node: 0, shard: Some(1) }, Ep { node: 0, shard: Some(0) }]
    } else {
        [Ep { node: 0, shard: None }, Ep { node: 1, shard: None }, Ep { node: 2, shard: None }]
    };
    Setup { nodes, eps, _dir: dir }
}

impl Setup {
    fn post(&self, ep: Ep, path: &str, body: &Value) -> (u16, String) {
        self.post_raw(ep, path, body.to_string().as_bytes())
    }

    fn post_raw(&self, ep: Ep, path: &str, body: &[u8]) -> (u16, String) {
        let node = &self.nodes[ep.node];
        match ep.shard {
            None => node.http("POST", path, &[], body),
            Some(shard) => post_on_shard(node.addr, shard, path, body),
        }
    }

    /// A publish that must succeed; its reply.
    fn publish(&self, ep: Ep, body: Value) -> Value {
        let (code, reply) = self.post(ep, "/api/publish", &body);
        assert_eq!(code, 200, "{body}: {reply}");
        serde_json::from_str(&reply).unwrap()
    }
}

/// One request on a kept-alive connection that `/debug/shard` says is on
/// `shard` (the kernel picks a shard per connection: new ones until one
/// lands there).
fn post_on_shard(addr: SocketAddr, shard: usize, path: &str, body: &[u8]) -> (u16, String) {
    for _ in 0..200 {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut r = BufReader::new(s);
        r.get_mut().write_all(b"GET /debug/shard HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let (code, on) = read_response(&mut r);
        assert_eq!(code, 200);
        if on.trim() != shard.to_string() {
            continue;
        }
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
        r.get_mut().write_all(&[head.as_bytes(), body].concat()).unwrap();
        return read_response(&mut r);
    }
    panic!("200 connections, none on shard {shard}");
}

fn read_response(r: &mut BufReader<TcpStream>) -> (u16, String) {
    let (mut status, mut len) = (String::new(), 0);
    r.read_line(&mut status).expect("status line");
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("header");
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("body");
    (status.split_whitespace().nth(1).unwrap().parse().unwrap(), String::from_utf8(body).unwrap())
}

fn user(i: usize) -> String {
    format!("u{i}")
}

fn all_users() -> Vec<String> {
    (0..USERS).map(user).collect()
}

/// The connections: `(user index, client)`, spread over the nodes.
fn connect(s: &Setup) -> Vec<(usize, Client)> {
    let n = s.nodes.len();
    let mut conns = Vec::with_capacity(USERS + TWICE);
    for i in 0..USERS {
        conns.push((i, Client::connect(&s.nodes[i % n].ws_url(&format!("/ws?user={}", user(i))))));
    }
    for i in 0..TWICE {
        conns.push((i, Client::connect(&s.nodes[(i + 1) % n].ws_url(&format!("/ws?user={}", user(i))))));
    }
    conns
}

/// Every connection reachable by its user's channel: a node delivers to a
/// user only once its subscription to the user's channel is confirmed, so
/// warm-up messages go to the users not all of whose connections got one
/// yet, round after round, until all did; then a `sync` marker to every
/// user, and each connection reads up to it (what it reads before it are
/// warm-ups of later rounds).
fn warm_up(s: &Setup, conns: &mut [(usize, Client)]) {
    let mut warm = vec![false; conns.len()];
    for round in 1.. {
        let mut pending: Vec<String> =
            conns.iter().zip(&warm).filter(|(_, w)| !**w).map(|((u, _), _)| user(*u)).collect();
        if pending.is_empty() {
            break;
        }
        assert!(round <= 50, "{} connections never reachable", pending.len());
        pending.sort();
        pending.dedup();
        s.publish(s.eps[0], json!({"users": pending, "data": {"warm": round}}));
        let end = Instant::now() + Duration::from_millis(300);
        for ((_, c), w) in conns.iter_mut().zip(warm.iter_mut()).filter(|(_, w)| !**w) {
            let left = end.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            if let Some(v) = c.recv_json(left) {
                assert!(v["data"]["warm"].is_u64(), "{v}");
                *w = true;
            }
        }
    }
    s.publish(s.eps[0], json!({"users": all_users(), "data": "sync"}));
    for (_, c) in conns.iter_mut() {
        loop {
            let v = c.recv();
            if v["data"] == "sync" {
                break;
            }
            assert!(v["data"]["warm"].is_u64(), "{v}");
        }
    }
}

/// Each connection's next message is `want(user)`.
fn each_gets(conns: &mut [(usize, Client)], want: impl Fn(usize) -> Value) {
    for (u, c) in conns.iter_mut() {
        assert_eq!(c.recv(), want(*u), "connection of {}", user(*u));
    }
}

fn direct(data: Value) -> impl Fn(usize) -> Value {
    move |_| json!({"ev":"direct","from":"server","data":data})
}

/// A publish to every user, then the same key again elsewhere, with other
/// targets, and a new key.
fn users_and_keys(s: &Setup, conns: &mut [(usize, Client)]) {
    let users = all_users();
    let reply = s.publish(s.eps[0], json!({"users": users, "data": {"n": 1}}));
    let want: Vec<Value> = users.iter().map(|u| json!({"user": u})).collect();
    assert_eq!(reply, json!({"ok": true, "results": want}));
    each_gets(conns, direct(json!({"n": 1})));

    let first = json!({"users": users, "data": {"n": 2}, "idempotency_key": "order-42"});
    let (code, reply) = s.post(s.eps[1], "/api/publish", &first);
    assert_eq!(code, 200, "{reply}");
    each_gets(conns, direct(json!({"n": 2})));
    // The repeat, on another node (shard): the same bytes, nothing delivered.
    let (code, again) = s.post(s.eps[2], "/api/publish", &first);
    assert_eq!((code, &again), (200, &reply));
    let (code, again) = s.post(s.eps[0], "/api/publish", &first);
    assert_eq!((code, &again), (200, &reply));
    // Other targets under the same key: 409, nothing delivered.
    let other = json!({"users": &users[..10], "data": {"n": 2}, "idempotency_key": "order-42"});
    let (code, body) = s.post(s.eps[2], "/api/publish", &other);
    assert_eq!(code, 409, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], "conflict");
    // A new key delivers; it is the next thing every connection gets.
    let next = json!({"users": users, "data": {"n": 3}, "idempotency_key": "order-43"});
    assert_eq!(s.post(s.eps[2], "/api/publish", &next).0, 200);
    each_gets(conns, direct(json!({"n": 3})));

    // Keys: 1 to 64 bytes.
    let key = |k: &str| json!({"user": "nobody", "data": 0, "idempotency_key": k});
    assert_eq!(s.post(s.eps[0], "/api/publish", &key(&"k".repeat(65))).0, 400);
    assert_eq!(s.post(s.eps[0], "/api/publish", &key("")).0, 400);
    let (code, body) = s.post(s.eps[0], "/api/publish", &key(&"k".repeat(64)));
    assert_eq!((code, body.as_str()), (200, r#"{"ok":true}"#), "one target: the reply of §4");
    // A single target keeps §4's reply under a key too, and its repeat.
    let one = json!({"user": user(7), "data": "one", "idempotency_key": "one"});
    let (code, body) = s.post(s.eps[1], "/api/publish", &one);
    assert_eq!((code, body.as_str()), (200, r#"{"ok":true}"#));
    let (code, body) = s.post(s.eps[0], "/api/publish", &one);
    assert_eq!((code, body.as_str()), (200, r#"{"ok":true}"#));
    // `room` and `rooms` with the one name are other targets.
    let as_list = json!({"users": [user(7)], "data": "one", "idempotency_key": "one"});
    assert_eq!(s.post(s.eps[2], "/api/publish", &as_list).0, 409);
    for (u, c) in conns.iter_mut().filter(|(u, _)| *u == 7) {
        assert_eq!(c.recv(), direct(json!("one"))(*u), "once");
    }
    s.publish(s.eps[1], json!({"users": users, "data": "marker"}));
    each_gets(conns, direct(json!("marker")));
}

/// Watchers of `h:a` (history) and `live:b` (none) on every node.
fn watchers(s: &Setup) -> Vec<Client> {
    s.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut c = Client::connect(&n.ws_url(&format!("/ws?user=watcher{i}")));
            c.subscribe("live:b");
            let v = c.call(json!({"op":"subscribe","room":"h:a","id":1}));
            assert_eq!(v["ev"], "subscribed", "{v}");
            c
        })
        .collect()
}

/// Rooms with and without history: positions in the results, the same as
/// the messages carry; a repeat answers the same positions and delivers
/// nothing.
fn rooms(s: &Setup, watchers: &mut [Client]) {
    let body = json!({"rooms": ["h:a", "live:b", "h:c"], "data": {"r": 1}, "idempotency_key": "rooms-1"});
    let (code, text) = s.post(s.eps[1], "/api/publish", &body);
    assert_eq!(code, 200, "{text}");
    let reply: Value = serde_json::from_str(&text).unwrap();
    let results = reply["results"].as_array().unwrap();
    assert_eq!(reply["ok"], true);
    assert_eq!(results.len(), 3);
    assert_eq!(results[1], json!({"room": "live:b"}), "no history: no position");
    let (a, c) = (&results[0], &results[2]);
    assert_eq!((a["room"].as_str(), c["room"].as_str()), (Some("h:a"), Some("h:c")));
    assert!(a["epoch"].as_str().is_some_and(|e| !e.is_empty()), "{reply}");
    assert!(a["offset"].as_u64().is_some_and(|o| o >= 1), "{reply}");
    assert_eq!(c["offset"], 1, "h:c's first message: {reply}");
    for w in watchers.iter_mut() {
        // One message per room, in either order between the rooms.
        let mut got = [w.recv(), w.recv()];
        got.sort_by_key(|v| v["room"].as_str().unwrap().to_string());
        assert_eq!(
            got[0],
            json!({"ev":"message","room":"h:a","from":"server","data":{"r":1},"epoch":a["epoch"],"offset":a["offset"]})
        );
        assert_eq!(got[1], json!({"ev":"message","room":"live:b","from":"server","data":{"r":1}}));
    }
    let (code, again) = s.post(s.eps[2], "/api/publish", &body);
    assert_eq!((code, &again), (200, &text), "the first reply, byte for byte");
    // A single history room: §4's reply, the next offset (the repeat took none).
    let next = s.publish(s.eps[0], json!({"room": "h:a", "data": "marker"}));
    let offset = a["offset"].as_u64().unwrap() + 1;
    assert_eq!(next, json!({"ok": true, "epoch": a["epoch"], "offset": offset}));
    assert_eq!(s.publish(s.eps[0], json!({"room": "live:b", "data": "marker"})), json!({"ok": true}));
    for w in watchers.iter_mut() {
        let mut got = [w.recv(), w.recv()];
        got.sort_by_key(|v| v["room"].as_str().unwrap().to_string());
        assert_eq!((got[0]["room"].as_str(), &got[0]["data"]), (Some("h:a"), &json!("marker")));
        assert_eq!(got[0]["offset"], offset);
        assert_eq!((got[1]["room"].as_str(), &got[1]["data"]), (Some("live:b"), &json!("marker")));
    }
}

/// A batch of mixed calls: replies in order, each what the call alone
/// answers, and their effects.
fn batch(s: &Setup, conns: &mut [(usize, Client)], watchers: &mut [Client]) {
    let cmd = |m: &str, p: Value| json!({"method": m, "params": p});
    let body = json!({"commands": [
        cmd("subscribe", json!({"user": "u1", "room": "live:batch"})),
        cmd("publish", json!({"room": "live:b", "data": "b1"})),
        cmd("publish", json!({"users": ["u2", "u3"], "data": "b2"})),
        cmd("unsubscribe", json!({"user": "u1", "room": "live:batch"})),
        cmd("publish", json!({"room": "bad room", "data": 1})),
        cmd("frobnicate", json!({})),
        cmd("disconnect", json!({"user": "u4", "code": 4501, "reason": "bye"})),
        "not a command",
        cmd("subscribe", json!({"user": "u1"})),
        cmd("publish", json!({"room": "h:batch", "data": "b3"})),
    ]});
    let (code, text) = s.post(s.eps[2], "/api/batch", &body);
    assert_eq!(code, 200, "{text}");
    let replies = serde_json::from_str::<Value>(&text).unwrap()["replies"].as_array().unwrap().clone();
    assert_eq!(replies.len(), 10, "{text}");
    assert_eq!(replies[0], json!({"ok": true}));
    assert_eq!(replies[1], json!({"ok": true}));
    assert_eq!(replies[2], json!({"ok": true, "results": [{"user": "u2"}, {"user": "u3"}]}));
    assert_eq!(replies[3], json!({"ok": true}));
    assert_eq!(replies[4], json!({"ok": false, "error": "bad_room"}), "the call's own 400 body");
    assert_eq!(replies[5]["error"], "unknown_method");
    assert_eq!(replies[6], json!({"ok": true}));
    assert_eq!(replies[7]["error"], "bad_request");
    assert_eq!(replies[8]["error"], "bad_request");
    assert_eq!((&replies[9]["ok"], replies[9]["offset"].as_u64()), (&json!(true), Some(1)), "{text}");
    // Their effects.
    for w in watchers.iter_mut() {
        assert_eq!(w.recv(), json!({"ev":"message","room":"live:b","from":"server","data":"b1"}));
    }
    for (u, c) in conns.iter_mut() {
        match *u {
            1 => {
                assert_eq!(c.recv(), json!({"ev":"subscribed","room":"live:batch","server":true}));
                assert_eq!(c.recv(), json!({"ev":"unsubscribed","room":"live:batch","server":true}));
            }
            2 | 3 => assert_eq!(c.recv(), direct(json!("b2"))(*u)),
            4 => {
                assert_eq!(c.recv(), json!({"ev":"disconnect","code":4501,"reason":"bye"}));
                assert_eq!(c.expect_close(), Some(4501));
            }
            _ => {}
        }
    }
    // 1000 commands fit in the body limit and are all answered.
    let many: Vec<Value> = (0..1000).map(|i| cmd("publish", json!({"user": "nobody", "data": i}))).collect();
    let (code, text) = s.post(s.eps[0], "/api/batch", &json!({ "commands": many }));
    assert_eq!(code, 200);
    let replies = serde_json::from_str::<Value>(&text).unwrap()["replies"].as_array().unwrap().clone();
    assert!(replies.len() == 1000 && replies.iter().all(|r| *r == json!({"ok": true})), "{text}");
}

fn bad_bodies(s: &Setup) {
    let ep = s.eps[0];
    let names = |n: usize| (0..n).map(user).collect::<Vec<_>>();
    for body in [
        json!({"users": [], "data": 1}),
        json!({"rooms": [], "data": 1}),
        json!({"users": names(1001), "data": 1}),
        json!({"rooms": names(1001), "data": 1}),
        json!({"room": "a", "rooms": ["a"], "data": 1}),
        json!({"user": "a", "users": ["a"], "data": 1}),
        json!({"rooms": ["a"], "users": ["a"], "data": 1}),
        json!({"room": "a", "user": "a", "data": 1}),
        json!({"rooms": ["a", "bad room"], "data": 1}),
        json!({"users": ["a", ""], "data": 1}),
        json!({"users": ["a", 1], "data": 1}),
        json!({"users": "a", "data": 1}),
        json!({"users": ["a"]}),
        json!({"users": ["a"], "data": 1, "idempotency_key": 7}),
        json!({"data": 1}),
    ] {
        let (code, reply) = s.post(ep, "/api/publish", &body);
        assert_eq!(code, 400, "{body}: {reply}");
        assert!(serde_json::from_str::<Value>(&reply).unwrap()["error"].is_string(), "{reply}");
    }
    // 1000 is the limit, not past it.
    let (code, reply) = s.post(ep, "/api/publish", &json!({"users": names(1000), "data": 1}));
    assert_eq!(code, 200, "{reply}");
    let many = |n: usize| json!({"commands": vec![json!({"method":"publish","params":{"user":"a","data":1}}); n]});
    for body in [json!({"commands": []}), many(1001), json!({}), json!({"commands": "x"})] {
        let (code, reply) = s.post(ep, "/api/batch", &body);
        assert_eq!(code, 400, "{reply}");
        assert_eq!(serde_json::from_str::<Value>(&reply).unwrap()["error"], "bad_request");
    }
    assert_eq!(s.post_raw(ep, "/api/batch", b"not json").0, 400);
    assert_eq!(s.nodes[0].http("GET", "/api/batch", &[], b"").0, 405);
}

fn run(s: &Setup) {
    let started = Instant::now();
    let mut conns = connect(s);
    let mut watchers = watchers(s);
    warm_up(s, &mut conns);
    users_and_keys(s, &mut conns);
    rooms(s, &mut watchers);
    batch(s, &mut conns, &mut watchers);
    bad_bodies(s);
    eprintln!("{} node(s): {:?}", s.nodes.len(), started.elapsed());
}

#[test]
fn many_targets_keys_and_batches_standalone() {
    run(&setup(1, None));
}

#[test]
fn many_targets_keys_and_batches_on_one_redis() {
    let redis = RedisServer::start();
    run(&setup(3, Some(&redis.url())));
}

#[test]
fn many_targets_keys_and_batches_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 0);
    run(&setup(3, Some(&cluster.url())));
}

/// §4 holds for the new calls: the API key, 403 on an authenticated node
/// without one, the admin listener only.
#[test]
fn batch_obeys_the_rules_of_section_4() {
    let body = br#"{"commands":[{"method":"publish","params":{"room":"r","data":1}}]}"#;
    let s = start_server(&["--jwt-secret", "s3cret"]);
    assert_eq!(s.http("POST", "/api/batch", &[], body).0, 403);
    let s = start_server(&["--admin-listen", "127.0.0.1:0", "--api-key", "k"]);
    let admin = s.admin.expect("admin address");
    let auth = [("Authorization", "Bearer k")];
    assert_eq!(s.http("POST", "/api/batch", &auth, body).0, 404, "not on the client listener");
    assert_eq!(common::http_at(admin, "POST", "/api/batch", &[], body).0, 401);
    let (code, reply) = common::http_at(admin, "POST", "/api/batch", &auth, body);
    assert_eq!((code, reply.as_str()), (200, r#"{"replies":[{"ok":true}]}"#));
    let multi = br#"{"users":["a","b"],"data":1,"idempotency_key":"k1"}"#;
    assert_eq!(common::http_at(admin, "POST", "/api/publish", &[], multi).0, 401);
    assert_eq!(common::http_at(admin, "POST", "/api/publish", &auth, multi).0, 200);
}

/// Standalone with many shards a list's direct messages overrun one
/// shard's queue into the others (the publish limit is 16384 / 39 / 2 =
/// 210 with 40 shards): the call waits for them to drain instead of
/// failing the targets past it; every one is delivered.
#[test]
fn a_list_waits_for_a_congested_local_bus() {
    let s = start_server(&["--shards", "40"]);
    let mut c = Client::connect(&s.ws_url("/ws?user=u999"));
    let users: Vec<String> = (0..1000).map(user).collect();
    for round in 0..3 {
        let (code, reply) =
            s.http("POST", "/api/publish", &[], json!({"users": users, "data": round}).to_string().as_bytes());
        assert_eq!(code, 200, "{reply}");
        assert_eq!(c.recv(), json!({"ev":"direct","from":"server","data":round}));
    }
}

/// A repeat that finds the first call still in flight waits for its reply
/// (and delivers nothing), or after `IN_FLIGHT_WAIT` (10 s) answers 409
/// `in_progress`. The first call is played by writing its record into
/// Redis by hand, as the scripts keep it.
#[test]
fn a_repeat_waits_for_the_first_call_in_flight() {
    let redis = RedisServer::start();
    let node = common::redis::node(&redis.url(), 2);
    let mut u1 = Client::connect(&node.ws_url("/ws?user=u1"));
    let fp = redis.cli(&["EVAL", "return redis.sha1hex(ARGV[1])", "0", "users\nu1"]);
    let record = |key: &str| format!("{{cc:idem:{}}}", key.bytes().map(|b| format!("{b:02x}")).collect::<String>());
    let pending = |key: &str| {
        redis.cli(&["HSET", &record(key), "fp", fp.trim(), "state", "p", "token", "elsewhere"]);
        redis.cli(&["PEXPIRE", &record(key), "30000"]);
    };
    // Its own connection: the wait is as long as `common::http`'s timeout.
    let call = |key: &str| {
        let body = json!({"users": ["u1"], "data": "again", "idempotency_key": key}).to_string();
        let s = TcpStream::connect(node.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = BufReader::new(s);
        let head = format!("POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
        r.get_mut().write_all(&[head.as_bytes(), body.as_bytes()].concat()).unwrap();
        read_response(&mut r)
    };
    // Done while we wait: its reply.
    pending("slow");
    let first = r#"{"ok":true,"results":[{"user":"u1"}],"first":true}"#;
    let t = Instant::now();
    let finisher = {
        let (port, key) = (redis.port, record("slow"));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut c = common::redis::RespConn::open(port);
            c.cmd(&["HSET", &key, "state", "d", "reply", first]);
        })
    };
    assert_eq!(call("slow"), (200, first.to_string()));
    assert!(t.elapsed() >= Duration::from_millis(300), "it waited for the first");
    finisher.join().unwrap();
    // Never done: 409 after the wait.
    pending("stuck");
    let t = Instant::now();
    let (code, body) = call("stuck");
    assert_eq!(code, 409, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], "in_progress");
    assert!(t.elapsed() >= Duration::from_secs(9), "{:?}", t.elapsed());
    // Neither delivered; a new key does, and a done record lives 300 s.
    assert_eq!(call("fresh").0, 200);
    assert_eq!(u1.recv(), json!({"ev":"direct","from":"server","data":"again"}));
    let ttl: u64 = redis.cli(&["PTTL", &record("fresh")]).trim().parse().unwrap();
    assert!((290_000..=300_000).contains(&ttl), "{ttl}");
}
