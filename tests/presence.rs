//! Presence (PROTOCOL.md §11) and the namespace publish policies (§10),
//! against real nodes: standalone (several shards), and 3 nodes on one
//! real redis-server, on a Redis Cluster and behind Sentinel.
//!
//! The truth test walks 500 connections of 200 users (many with several
//! tabs) in and out of 50 rooms at random, and at checkpoints compares what
//! every node answers (`/api/presence` paged with a small `limit`,
//! `/api/presence_stats`, and the `presence` op) with the truth the test
//! keeps itself.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::redis_topology::{RedisCluster, TempDir};
use common::{Client, Server, start_server};
use serde_json::{Value, json};

const NAMESPACES: &str = r#"
[[namespace]]
prefix = "who:"
presence = true

[[namespace]]
prefix = "chat:"
presence = true
join_leave = true
presence_grace_ms = 400

[[namespace]]
prefix = "lounge:"
presence = true
join_leave = true
presence_grace_ms = 4000

[[namespace]]
prefix = "feed:"
client_publish = "none"

[[namespace]]
prefix = "club:"
client_publish = "members"

[[namespace]]
prefix = "quiet:"
deliver_to_publisher = false

[[namespace]]
prefix = "quieth:"
deliver_to_publisher = false
history_size = 10
"#;

fn config(dir: &TempDir) -> String {
    let file = dir.file("ns.toml");
    std::fs::write(&file, NAMESPACES).unwrap();
    file
}

fn nodes(n: usize, redis: Option<&str>, file: &str) -> Vec<Server> {
    (0..n)
        .map(|_| {
            let mut args = vec!["--shards", "2", "--config", file, "--max-ops-per-sec", "0"];
            if let Some(url) = redis {
                args.extend(["--redis", url]);
            }
            start_server(&args)
        })
        .collect()
}

/// room → user → connections: what presence must say.
type Truth = BTreeMap<String, BTreeMap<String, u64>>;

/// Every member of `room` as `node` lists it, page by page (`limit` 7).
fn listed(node: &Server, room: &str) -> Option<(u64, u64, BTreeMap<String, u64>)> {
    let mut members = BTreeMap::new();
    let mut after: Option<String> = None;
    for _ in 0..200 {
        let q = match &after {
            Some(a) => format!("/api/presence?room={room}&limit=7&after={a}"),
            None => format!("/api/presence?room={room}&limit=7"),
        };
        let (code, body) = node.http_get(&q);
        assert_eq!(code, 200, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let (clients, users) = (v["clients"].as_u64().unwrap(), v["users"].as_u64().unwrap());
        let page = v["members"].as_array().unwrap();
        assert!(page.len() <= 7);
        for m in page {
            let u = m["user"].as_str().unwrap().to_string();
            // Each member once, in ascending byte order.
            if members.keys().next_back().is_some_and(|last: &String| *last >= u) {
                panic!("{room}: {u} listed out of order or twice");
            }
            members.insert(u, m["clients"].as_u64().unwrap());
        }
        match v.get("next") {
            Some(n) => after = Some(n.as_str().unwrap().to_string()),
            None => return Some((clients, users, members)),
        }
    }
    None
}

fn matches(node: &Server, room: &str, want: &BTreeMap<String, u64>) -> Result<(), String> {
    let (clients, users, members) = listed(node, room).ok_or("paging did not end")?;
    let (code, body) = node.http_get(&format!("/api/presence_stats?room={room}"));
    let stats: Value = serde_json::from_str(&body).map_err(|e| format!("{code} {body}: {e}"))?;
    let total: u64 = want.values().sum();
    let got = (clients, users, &members, stats["clients"].as_u64(), stats["users"].as_u64());
    let expect = (total, want.len() as u64, want, Some(total), Some(want.len() as u64));
    if got == expect { Ok(()) } else { Err(format!("{room}: got {got:?}, want {expect:?}")) }
}

/// Waits (changes are batched and cross nodes) until every node agrees
/// with the truth in every room.
fn check(nodes: &[Server], rooms: &[String], truth: &Truth, what: &str) {
    let empty = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut wrong = None;
        'all: for n in nodes {
            for r in rooms {
                if let Err(e) = matches(n, r, truth.get(r).unwrap_or(&empty)) {
                    wrong = Some(e);
                    break 'all;
                }
            }
        }
        match wrong {
            None => return,
            Some(e) if Instant::now() > end => panic!("{what}: presence wrong after 10 s: {e}"),
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

struct Tab {
    user: String,
    client: Client,
    rooms: BTreeSet<String>,
}

fn connect(nodes: &[Server], node: usize, user: &str) -> Tab {
    let client = Client::connect(&nodes[node].ws_url(&format!("/ws?user={user}")));
    Tab { user: user.to_string(), client, rooms: BTreeSet::new() }
}

fn truth_of(tabs: &[Tab]) -> Truth {
    let mut t = Truth::new();
    for tab in tabs {
        for r in &tab.rooms {
            *t.entry(r.clone()).or_default().entry(tab.user.clone()).or_default() += 1;
        }
    }
    t
}

/// 500 connections of 200 users over the nodes, walking in and out of 50
/// presence rooms, closing and reopening tabs; checked at checkpoints.
fn random_walk(nodes: &[Server], conns: usize, users: usize, steps: usize, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    eprintln!("seed {seed}");
    let rooms: Vec<String> = (0..50).map(|i| format!("who:r{i}")).collect();
    let mut tabs: Vec<Tab> =
        (0..conns).map(|i| connect(nodes, i % nodes.len(), &format!("u{:03}", i % users))).collect();
    for step in 1..=steps {
        let i = rng.usize(..tabs.len());
        if rng.u8(..100) < 3 {
            // A tab closes; the user comes back on another node.
            let user = tabs[i].user.clone();
            let node = rng.usize(..nodes.len());
            tabs[i] = connect(nodes, node, &user);
            continue;
        }
        let room = &rooms[rng.usize(..rooms.len())];
        let tab = &mut tabs[i];
        if tab.rooms.remove(room) {
            let r = tab.client.call(json!({"op":"unsubscribe","room":room,"id":1}));
            assert_eq!(r["ev"], "unsubscribed", "{r}");
        } else {
            let r = tab.client.call(json!({"op":"subscribe","room":room,"id":1}));
            assert_eq!(r["ev"], "subscribed", "{r}");
            tab.rooms.insert(room.clone());
        }
        if step % (steps / 3) == 0 {
            check(nodes, &rooms, &truth_of(&tabs), &format!("checkpoint at step {step}"));
        }
    }
    // The `presence` op agrees with the API (and pages the same).
    let truth = truth_of(&tabs);
    let busiest = truth.iter().max_by_key(|(_, m)| m.len()).map(|(r, _)| r.clone()).unwrap();
    let v = tabs[0].client.call(json!({"op":"presence","room":busiest,"limit":10000,"id":"p"}));
    assert_eq!(v["ev"], "presence", "{v}");
    let got: BTreeMap<String, u64> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["user"].as_str().unwrap().to_string(), m["clients"].as_u64().unwrap()))
        .collect();
    assert_eq!(&got, &truth[&busiest]);
    let v = tabs[1].client.call(json!({"op":"presence_stats","room":busiest,"id":"s"}));
    assert_eq!(v["users"].as_u64(), Some(truth[&busiest].len() as u64), "{v}");
    assert!(v.get("members").is_none());
    // Everyone leaves: every room is empty everywhere.
    drop(tabs);
    check(nodes, &rooms, &Truth::new(), "after every connection closed");
}

fn seed() -> u64 {
    std::env::var("CORECAST_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..))
}

#[test]
fn standalone_presence_equals_the_truth_on_every_shard() {
    let dir = TempDir::new("presence");
    let n = nodes(1, None, &config(&dir));
    random_walk(&n, 300, 120, 1500, seed());
}

#[test]
fn presence_equals_the_truth_on_three_nodes_on_one_redis() {
    let dir = TempDir::new("presence");
    let redis = RedisServer::start();
    let n = nodes(3, Some(&redis.url()), &config(&dir));
    random_walk(&n, 500, 200, 2000, seed());
    // Nothing left behind but the writers' leases and room sets.
    let keys = redis.cli(&["--scan", "--pattern", "*room:who:*"]);
    assert!(keys.trim().is_empty(), "room keys left: {keys}");
}

#[test]
fn presence_equals_the_truth_on_a_redis_cluster() {
    let dir = TempDir::new("presence");
    let cluster = RedisCluster::start(3, 0);
    let n = nodes(3, Some(&cluster.url()), &config(&dir));
    random_walk(&n, 300, 120, 1200, seed());
}

/// Events a client got, skipping nothing: the next one must be `want`.
fn next_event(c: &mut Client, want: Value) {
    let v = c.recv();
    assert_eq!(v, want);
}

fn join_leave_across(nodes: &[Server]) {
    let last = nodes.len() - 1;
    let mut alice = Client::connect(&nodes[0].ws_url("/ws?user=alice"));
    alice.subscribe("chat:x");
    // Her own join comes after her `subscribed`.
    next_event(&mut alice, json!({"ev":"join","room":"chat:x","user":"alice"}));
    // Bob's first tab, on another node: one join.
    let mut bob1 = Client::connect(&nodes[last].ws_url("/ws?user=bob"));
    bob1.subscribe("chat:x");
    next_event(&mut alice, json!({"ev":"join","room":"chat:x","user":"bob"}));
    // His second tab: no event; closing one of two: no leave.
    let mut bob2 = Client::connect(&nodes[0].ws_url("/ws?user=bob"));
    bob2.subscribe("chat:x");
    drop(bob1);
    alice.expect_silence(Duration::from_millis(900));
    // A reconnect within the grace (400 ms): nothing.
    drop(bob2);
    let mut bob3 = Client::connect(&nodes[last].ws_url("/ws?user=bob"));
    bob3.subscribe("chat:x");
    alice.expect_silence(Duration::from_millis(900));
    // Gone for longer than the grace: one leave, after the grace.
    let gone = Instant::now();
    drop(bob3);
    next_event(&mut alice, json!({"ev":"leave","room":"chat:x","user":"bob"}));
    assert!(gone.elapsed() >= Duration::from_millis(350), "the leave waited for the grace: {:?}", gone.elapsed());
    alice.expect_silence(Duration::from_millis(600));
    // And back: a join again (they alternate).
    let mut bob4 = Client::connect(&nodes[0].ws_url("/ws?user=bob"));
    bob4.subscribe("chat:x");
    next_event(&mut alice, json!({"ev":"join","room":"chat:x","user":"bob"}));
    let v = alice.call(json!({"op":"presence","room":"chat:x","id":1}));
    assert_eq!(v["members"], json!([{"user":"alice","clients":1},{"user":"bob","clients":1}]), "{v}");
}

#[test]
fn join_and_leave_alternate_with_tabs_and_grace_standalone() {
    let dir = TempDir::new("presence");
    join_leave_across(&nodes(1, None, &config(&dir)));
}

#[test]
fn join_and_leave_alternate_with_tabs_and_grace_across_nodes() {
    let dir = TempDir::new("presence");
    let redis = RedisServer::start();
    join_leave_across(&nodes(3, Some(&redis.url()), &config(&dir)));
}

/// A node SIGKILLed: its connections stop counting, and its users' leaves
/// reach the other nodes, within 30 s + the grace.
#[test]
fn a_killed_nodes_users_leave_within_30_seconds() {
    let dir = TempDir::new("presence");
    let redis = RedisServer::start();
    let mut n = nodes(2, Some(&redis.url()), &config(&dir));
    let mut watcher = Client::connect(&n[0].ws_url("/ws?user=watcher"));
    watcher.subscribe("chat:k");
    next_event(&mut watcher, json!({"ev":"join","room":"chat:k","user":"watcher"}));
    let mut doomed: Vec<Client> = (0..5).map(|i| Client::connect(&n[1].ws_url(&format!("/ws?user=d{i}")))).collect();
    for c in &mut doomed {
        c.subscribe("chat:k");
    }
    let mut joined = BTreeSet::new();
    while joined.len() < 5 {
        let v = watcher.recv();
        assert_eq!(v["ev"], "join", "{v}");
        joined.insert(v["user"].as_str().unwrap().to_string());
    }
    let killed = Instant::now();
    n[1].child.kill().unwrap();
    n[1].child.wait().unwrap();
    let mut left = BTreeSet::new();
    while left.len() < 5 {
        let v = watcher.recv_json(Duration::from_secs(31)).expect("a leave within 30 s + grace");
        assert_eq!(v["ev"], "leave", "{v}");
        assert!(left.insert(v["user"].as_str().unwrap().to_string()), "one leave per user: {v}");
    }
    let took = killed.elapsed();
    eprintln!("the killed node's users left {took:?} after the kill");
    assert!(took < Duration::from_millis(30_400), "{took:?}");
    assert_eq!(left, joined);
    let (_, body) = n[0].http_get("/api/presence_stats?room=chat:k");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["clients"].as_u64(), v["users"].as_u64()), (Some(1), Some(1)), "{v}");
    assert!(n[0].metric("corecast_presence_reaped_total") >= 1.0);
}

#[test]
fn namespaces_refuse_client_publishes_as_configured() {
    let dir = TempDir::new("presence");
    let n = nodes(1, None, &config(&dir));
    let mut c = Client::connect(&n[0].ws_url("/ws?user=pub"));
    let v = c.call(json!({"op":"publish","room":"feed:news","data":1,"id":1}));
    assert_eq!((v["ev"].as_str(), v["code"].as_str()), (Some("error"), Some("forbidden")), "{v}");
    let v = c.call(json!({"op":"publish","room":"club:a","data":1,"id":2}));
    assert_eq!(v["code"], "forbidden", "not a member: {v}");
    c.subscribe("club:a");
    c.send_json(&json!({"op":"publish","room":"club:a","data":1,"id":3}));
    // The ack and the message itself, in either order.
    let got: BTreeSet<String> = (0..2).map(|_| c.recv()["ev"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, BTreeSet::from(["ack".to_string(), "message".to_string()]));
    // The server API still publishes into a `none` room.
    c.subscribe("feed:news");
    let (code, _) = n[0].http("POST", "/api/publish", &[], br#"{"room":"feed:news","data":7}"#);
    assert_eq!(code, 200);
    assert_eq!(c.recv()["data"], 7);
    // Presence ops outside a presence namespace: bad_request.
    let v = c.call(json!({"op":"presence","room":"club:a","id":4}));
    assert_eq!(v["code"], "bad_request", "{v}");
    let (code, _) = n[0].http_get("/api/presence?room=club:a");
    assert_eq!(code, 400);
}

/// Some tabs of some users in a few presence rooms on `nodes`.
fn settle_some(nodes: &[Server]) -> (Vec<Tab>, Vec<String>) {
    let rooms: Vec<String> = (0..4).map(|i| format!("who:f{i}")).collect();
    let mut tabs = Vec::new();
    for i in 0..24 {
        let mut t = connect(nodes, i % nodes.len(), &format!("f{}", i % 10));
        for r in rooms.iter().skip(i % 3) {
            t.client.subscribe(r);
            t.rooms.insert(r.clone());
        }
        tabs.push(t);
    }
    check(nodes, &rooms, &truth_of(&tabs), "before the fault");
    (tabs, rooms)
}

/// Redis restarts empty (no persistence): every node writes its counts
/// again when its links come back, and presence is the truth again.
#[test]
fn presence_is_written_again_after_redis_lost_everything() {
    let dir = TempDir::new("presence");
    let mut redis = RedisServer::start();
    let n = nodes(2, Some(&redis.url()), &config(&dir));
    let (tabs, rooms) = settle_some(&n);
    redis.cli(&["SET", "marker", "1"]);
    redis.kill();
    redis.restart();
    // (The nodes may have written again already: the marker shows the loss.)
    assert_eq!(redis.cli(&["EXISTS", "marker"]).trim(), "0", "the restarted Redis lost its data");
    common::redis::wait_until("links back", Duration::from_secs(10), || n.iter().all(|s| s.links_up()));
    check(&n, &rooms, &truth_of(&tabs), "after Redis restarted empty");
}

#[test]
fn presence_stays_right_across_a_sentinel_failover() {
    let dir = TempDir::new("presence");
    let mut s = common::redis_topology::SentinelSetup::start();
    let n = nodes(2, Some(&s.url()), &config(&dir));
    let (mut tabs, rooms) = settle_some(&n);
    s.primary.kill();
    let replica = s.replica.port;
    common::redis::wait_until("the sentinels promote the replica", Duration::from_secs(40), || {
        s.agreed_primary() == Some(replica)
    });
    common::redis::wait_until("links back", Duration::from_secs(20), || n.iter().all(|s| s.links_up()));
    check(&n, &rooms, &truth_of(&tabs), "after the failover");
    // And it follows changes after it.
    tabs.truncate(10);
    check(&n, &rooms, &truth_of(&tabs), "after tabs closed past the failover");
}

/// `deliver_to_publisher = false`: the publishing connection does not get
/// its message, its other tab (on another node) and everyone else do; in a
/// history room too.
fn no_echo(nodes: &[Server]) {
    let last = nodes.len() - 1;
    for room in ["quiet:a", "quieth:a"] {
        let mut a = Client::connect(&nodes[0].ws_url("/ws?user=pat"));
        let mut b = Client::connect(&nodes[last].ws_url("/ws?user=pat"));
        let mut other = Client::connect(&nodes[last].ws_url("/ws?user=sam"));
        for c in [&mut a, &mut b, &mut other] {
            let v = c.call(json!({"op":"subscribe","room":room,"id":room}));
            assert_eq!(v["ev"], "subscribed", "{v}");
        }
        for i in 0..3 {
            let v = a.call(json!({"op":"publish","room":room,"data":i,"id":i}));
            assert_eq!(v, json!({"ev":"ack","id":i}), "{room}");
            for c in [&mut b, &mut other] {
                let m = c.recv();
                assert_eq!((m["ev"].as_str(), m["data"].as_i64()), (Some("message"), Some(i)), "{room}: {m}");
            }
        }
        // Another connection's message still reaches it.
        let v = other.call(json!({"op":"publish","room":room,"data":"x","id":9}));
        assert_eq!(v["ev"], "ack");
        assert_eq!(a.recv()["data"], "x", "{room}");
        a.expect_silence(Duration::from_millis(300));
    }
}

#[test]
fn the_publisher_does_not_get_its_own_message_where_configured() {
    let dir = TempDir::new("presence");
    no_echo(&nodes(1, None, &config(&dir)));
    let redis = RedisServer::start();
    no_echo(&nodes(2, Some(&redis.url()), &config(&dir)));
}

/// Nodes with different `[[namespace]]` tables on one Redis say so, in the
/// log and in `/metrics` (§10); the same tables: 1.
#[test]
fn nodes_report_a_namespace_mismatch() {
    let dir = TempDir::new("presence");
    let redis = RedisServer::start();
    let same = nodes(2, Some(&redis.url()), &config(&dir));
    let digests = |s: &Server| s.metric("corecast_namespace_digests{shard=\"0\"}");
    same[0].wait_until("the leases compared", || digests(&same[0]) == 1.0 && digests(&same[1]) == 1.0);
    let other = dir.file("other.toml");
    std::fs::write(&other, "[[namespace]]\nprefix = \"who:\"\npresence = false\n").unwrap();
    let odd = start_server(&["--shards", "1", "--config", &other, "--redis", &redis.url()]);
    same[0].wait_until("a mismatch is seen", || digests(&same[0]) == 2.0);
    odd.wait_until("and by the odd node", || digests(&odd) == 2.0);
    assert!(same[0].logs().contains("different [[namespace]] tables"), "{}", same[0].logs());
}

/// A whole node drains (SIGTERM): its clients move to another node within
/// the grace, and nobody sees a leave or a join for them.
#[test]
fn a_drain_that_moves_clients_within_the_grace_is_silent() {
    let dir = TempDir::new("presence");
    let redis = RedisServer::start();
    let file = config(&dir);
    let stay = nodes(1, Some(&redis.url()), &file).pop().unwrap();
    let mut going = start_server(&["--shards", "2", "--config", &file, "--redis", &redis.url(), "--drain-secs", "1"]);
    let mut watcher = Client::connect(&stay.ws_url("/ws?user=watcher"));
    watcher.subscribe("lounge:x");
    next_event(&mut watcher, json!({"ev":"join","room":"lounge:x","user":"watcher"}));
    let mut movers: Vec<Client> = (0..4).map(|i| Client::connect(&going.ws_url(&format!("/ws?user=m{i}")))).collect();
    for m in &mut movers {
        m.subscribe("lounge:x");
    }
    for _ in 0..4 {
        assert_eq!(watcher.recv()["ev"], "join");
    }
    going.sigterm();
    // Each client is told to go, goes, and comes back on the other node
    // (as the JS client does), well within the 4 s grace.
    let mut back = Vec::new();
    for (i, mut m) in movers.into_iter().enumerate() {
        // (After the joins of the movers subscribed later.)
        while m.recv()["ev"] != "maintenance" {}
        m.expect_close();
        let mut c = Client::connect(&stay.ws_url(&format!("/ws?user=m{i}")));
        c.subscribe("lounge:x");
        back.push(c);
    }
    going.wait_exit(Duration::from_secs(10));
    // Past the grace: not one event about the movers.
    watcher.expect_silence(Duration::from_millis(5000));
    let v = watcher.call(json!({"op":"presence_stats","room":"lounge:x","id":1}));
    assert_eq!((v["clients"].as_u64(), v["users"].as_u64()), (Some(5), Some(5)), "{v}");
}

/// With Redis, a room outside every history namespace leaves no key behind
/// after publishes and reads (§10), and a presence room's keys go when it
/// empties.
#[test]
fn rooms_without_history_leave_no_key_in_redis() {
    let dir = TempDir::new("presence");
    let redis = RedisServer::start();
    let n = nodes(1, Some(&redis.url()), &config(&dir));
    let mut c = Client::connect(&n[0].ws_url("/ws?user=k"));
    c.subscribe("lobby");
    for i in 0..5 {
        c.send_json(&json!({"op":"publish","room":"lobby","data":i}));
        assert_eq!(c.recv()["data"], i);
    }
    let v = c.call(json!({"op":"history","room":"lobby","id":"h"}));
    assert_eq!(v["code"], "bad_request", "{v}");
    let (code, _) = n[0].http("POST", "/api/publish", &[], br#"{"room":"lobby","data":1}"#);
    assert_eq!(code, 200);
    assert_eq!(c.recv()["from"], "server");
    let keys = redis.cli(&["--scan", "--pattern", "*lobby*"]);
    assert!(keys.trim().is_empty(), "keys of a room without history: {keys}");
    // A presence room has keys while it has members, none after.
    c.subscribe("who:k");
    n[0].wait_until("presence keys", || !redis.cli(&["--scan", "--pattern", "*who:k*"]).trim().is_empty());
    drop(c);
    n[0].wait_until("no presence keys left", || redis.cli(&["--scan", "--pattern", "*who:k*"]).trim().is_empty());
    assert!(redis.cli(&["--scan", "--pattern", "*lobby*"]).trim().is_empty());
}

/// `corecast_presence_members` counts (room, user) members: standalone,
/// exactly, summed over the shards; with Redis, each shard's own, at the
/// next lease.
#[test]
fn the_members_metric_counts_room_user_pairs() {
    let dir = TempDir::new("presence");
    let n = nodes(1, None, &config(&dir));
    let mut tabs: Vec<Client> =
        (0..6).map(|i| Client::connect(&n[0].ws_url(&format!("/ws?user=p{}", i % 3)))).collect();
    for (i, t) in tabs.iter_mut().enumerate() {
        t.subscribe("who:m1");
        if i < 2 {
            t.subscribe("who:m2");
        }
    }
    // 3 users in who:m1, 2 in who:m2.
    n[0].wait_until("5 members", || n[0].metric("corecast_presence_members") == 5.0);
    drop(tabs);
    n[0].wait_until("none", || n[0].metric("corecast_presence_members") == 0.0);
    let redis = RedisServer::start();
    let r = nodes(1, Some(&redis.url()), &config(&dir));
    let mut c = Client::connect(&r[0].ws_url("/ws?user=q"));
    c.subscribe("who:m1");
    c.subscribe("who:m2");
    common::redis::wait_until("the lease counts them", Duration::from_secs(12), || {
        r[0].metric("corecast_presence_members") == 2.0
    });
}
