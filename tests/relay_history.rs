//! History rooms through the node's relay (`services::relay`, issue 21):
//! a room with history (§7) takes one Redis subscription per node like a
//! plain one (`PUBSUB NUMSUB` on one Redis, `SHARDNUMSUB` at the owning
//! primary of a Cluster), its messages keep their positions on the way to
//! the other shards, and when the subscriber link of the shard that holds
//! it for the node (the *relay*: the first shard to join) is lost (alone,
//! or with every other link) every shard of the node catches up from the
//! history: each member gets every offset once, in order, with no `gap`,
//! and a member joining with `since` meanwhile gets a seamless sequence.
//! `--per-shard-subscriptions true` still holds one per shard.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::history::{Pos, Tracker, api_publish, subscribe_since};
use common::redis::{RedisServer, Resp, RespConn, deadline, wait_until};
use common::redis_topology::{RedisCluster, SentinelSetup};
use common::{Client, Server, StopOnDrop, start_server};
use corecast::services::relay::Relay;
use serde_json::json;

const SHARDS: usize = 4;

fn node(url: &str, shards: usize, per_shard: bool) -> Server {
    start_server(&[
        "--shards",
        &shards.to_string(),
        "--redis",
        url,
        "--history-size",
        "10000",
        "--per-shard-subscriptions",
        &per_shard.to_string(),
        "--max-ops-per-sec",
        "0",
    ])
}

/// A member of `room` on shard `shard` of `node`, subscribed (with `since`
/// when given), with its tracker.
fn member(node: &Server, shard: usize, user: &str, room: &str, since: Option<&Pos>) -> (Client, Tracker) {
    let mut c = node.client_on_shard(shard, user);
    let mut t = Tracker::default();
    let v = subscribe_since(&mut c, room, since);
    match since {
        // A recovery: what it gets starts right after `since`.
        Some(p) => {
            assert_eq!(v["recovered"], true, "{v}");
            t.start = Some(p.offset);
            t.epoch = Some(p.epoch.clone());
            t.last = Some(p.clone());
            t.connected();
        }
        None => {
            t.connected();
            t.subscribed(&v);
        }
    }
    (c, t)
}

/// Reads `c` into `t` until it has every offset up to `last`, then checks
/// that nothing was missed, doubled, reordered or announced as a gap.
fn drain_and_check(what: &str, c: &mut Client, t: &mut Tracker, last: u64, within: Duration) {
    let end = Instant::now() + within;
    while t.highest() < last {
        let left = end.saturating_duration_since(Instant::now());
        let v = c.recv_json(left).unwrap_or_else(|| panic!("{what}: stuck at {} of {last}", t.highest()));
        assert!(t.take(&v), "{what}: unexpected {v}");
    }
    if let Some(v) = c.recv_json(Duration::from_millis(300)) {
        t.take(&v);
    }
    t.assert_in_order();
    assert_eq!(t.errors(last), (0, 0), "{what}: (missing, duplicated) up to {last}");
    assert_eq!(t.gaps, 0, "{what}: no gap, the history had it all");
    assert_eq!(t.highest(), last, "{what}: nothing past the last publish");
}

/// Members of `room` on every shard of every node: one subscription per
/// node, and every member gets every message once, in order.
fn one_per_node(nodes: &[Server], room: &str, numsub: &dyn Fn() -> u64) {
    // The room's first message fixes its epoch; the members start after it.
    api_publish(&nodes[0], room, json!(0));
    let mut members = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for s in 0..SHARDS {
            members.push((n, s, member(node, s, &format!("m{n}-{s}"), room, None)));
        }
    }
    wait_until("one subscription per node", Duration::from_secs(10), || numsub() == nodes.len() as u64);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(numsub(), nodes.len() as u64, "one subscription per node, not per shard");
    let mut last = 0;
    for i in 1..=20 {
        last = api_publish(&nodes[i % nodes.len()], room, json!(i)).offset;
    }
    for (n, s, (c, t)) in &mut members {
        drain_and_check(&format!("node {n} shard {s}"), c, t, last, Duration::from_secs(10));
    }
    members.clear();
    wait_until("no subscription left", Duration::from_secs(10), || numsub() == 0);
}

#[test]
fn a_history_room_takes_one_subscription_per_node_on_one_redis() {
    let _d = deadline("hist_numsub", Duration::from_secs(120));
    let redis = RedisServer::start();
    let nodes: Vec<Server> = (0..3).map(|_| node(&redis.url(), SHARDS, false)).collect();
    one_per_node(&nodes, "hist", &|| redis.numsub("cc:room:hist"));
}

#[test]
fn a_history_room_takes_one_subscription_per_node_on_a_redis_cluster() {
    let _d = deadline("hist_shardnumsub", Duration::from_secs(180));
    let cluster = RedisCluster::start(3, 0);
    let nodes: Vec<Server> = (0..3).map(|_| node(&cluster.url(), SHARDS, false)).collect();
    let owner = cluster.owner("cc:room:hist");
    one_per_node(&nodes, "hist", &|| cluster.shardnumsub(owner, "cc:room:hist"));
}

#[test]
fn per_shard_subscriptions_still_hold_one_per_shard_for_a_history_room() {
    let _d = deadline("hist_per_shard", Duration::from_secs(120));
    let redis = RedisServer::start();
    let a = node(&redis.url(), SHARDS, true);
    api_publish(&a, "hist", json!(0));
    let mut members: Vec<_> = (0..SHARDS).map(|s| member(&a, s, &format!("m{s}"), "hist", None)).collect();
    wait_until("one per shard", Duration::from_secs(10), || redis.numsub("cc:room:hist") == SHARDS as u64);
    let mut last = 0;
    for i in 1..=10 {
        last = api_publish(&a, "hist", json!(i)).offset;
    }
    for (s, (c, t)) in members.iter_mut().enumerate() {
        drain_and_check(&format!("shard {s}"), c, t, last, Duration::from_secs(10));
    }
}

/// The Redis client ids of a node's subscriber link `corecast-sub-NN`
/// (only node `a` has shard `shard`'s: the other node has one shard).
fn sub_link_ids(redis: &dyn Fn(&[&str]) -> String, shard: usize) -> Vec<String> {
    let name = format!("name=corecast-sub-{shard:02}");
    redis(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.split(' ').any(|kv| kv == name))
        .filter_map(|l| l.split(' ').find_map(|kv| kv.strip_prefix("id=")).map(String::from))
        .collect()
}

/// Members on every shard of node `a` (4 shards), shard `relay` first (it
/// holds the room; its directory is another shard), while node `b`
/// publishes throughout and the subscriber links are cut: by turns the relay's link
/// alone (the other shards' own links stay up: only the relay's news can
/// start their catch-up) and every link at once. Midway a member joins
/// with `since` on a shard that is not the relay. Everyone gets every
/// offset once, in order, without a gap.
fn cut_while_publishing(redis: &(dyn Fn(&[&str]) -> String + Sync), url: &str, room: &str, relay: usize) {
    assert_ne!(relay, 0, "a holder that is not shard 0 (node b's one shard has that name too)");
    let a = node(url, SHARDS, false);
    let b = node(url, 1, false);
    let first = api_publish(&b, room, json!(0));
    let mut members = joined_from(&a, relay, room);
    let caught_up = caught_up_total(&a);
    let late_shard = (relay + 1) % SHARDS;

    let stop = AtomicBool::new(false);
    let published = AtomicU64::new(first.offset);
    let mut late = None;
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let publisher = scope.spawn(|| {
            let mut i = 1;
            while !stop.load(Ordering::SeqCst) {
                let p = api_publish(&b, room, json!(i));
                published.store(p.offset, Ordering::SeqCst);
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        for round in 0..6 {
            std::thread::sleep(Duration::from_millis(250));
            if round % 2 == 0 {
                // The relay's link alone.
                let ids = sub_link_ids(redis, relay);
                assert_eq!(ids.len(), 1, "one subscriber link named for shard {relay}: {ids:?}");
                assert_eq!(redis(&["CLIENT", "KILL", "ID", &ids[0]]), "1", "the relay's link was killed");
            } else {
                // Every link at once (on a Cluster, every link to the
                // room's owner: a shard has one there only while it has a
                // channel there), the holder's among them.
                let ids = sub_link_ids(redis, relay);
                assert_eq!(ids.len(), 1, "the holder's link is there to be cut: {ids:?}");
                let killed: u64 = redis(&["CLIENT", "KILL", "TYPE", "pubsub"]).parse().expect("a count");
                assert!(killed >= 1, "the subscriber links were killed ({killed})");
            }
            if round == 2 {
                // Joins with `since` while the links come back, on a shard
                // that is not the relay: from where a member was a moment ago.
                let since = Pos { epoch: first.epoch.clone(), offset: first.offset };
                late = Some(member(&a, late_shard, "late", room, Some(&since)));
            }
        }
        std::thread::sleep(Duration::from_millis(250));
        stop.store(true, Ordering::SeqCst);
        publisher.join().expect("the publisher");
    });
    let last = published.load(Ordering::SeqCst);
    assert!(last > 200, "published throughout ({last})");
    a.wait_until("every link up again", || a.links_up());
    for (s, (c, t)) in &mut members {
        drain_and_check(&format!("shard {s} (relay {relay})"), c, t, last, Duration::from_secs(20));
    }
    let (mut c, mut t) = late.expect("the late member");
    drain_and_check(&format!("the late member on shard {late_shard}"), &mut c, &mut t, last, Duration::from_secs(20));
    assert!(caught_up_total(&a) > caught_up, "what the cuts missed was read from the history");
    // Live delivery goes on, once, everywhere.
    let p = api_publish(&b, room, json!("after"));
    for (s, (c, t)) in &mut members {
        drain_and_check(&format!("shard {s} after"), c, t, p.offset, Duration::from_secs(10));
    }
}

/// `corecast_history_caught_up_total`, every shard's.
fn caught_up_total(s: &Server) -> f64 {
    s.metrics()
        .lines()
        .filter(|l| l.starts_with("corecast_history_caught_up_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A room whose directory (on a 4-shard node) is shard `want`
/// (`services::relay`): its holder is the first shard to join, another.
fn room_directed_by(want: usize) -> String {
    (0..).map(|i| format!("cut-{i}")).find(|r| Relay::directory_of(r, SHARDS) == want).unwrap()
}

/// A member of `room` on every shard of `a`, shard `holder` first: that
/// shard holds the room's subscription for the node.
fn joined_from(a: &Server, holder: usize, room: &str) -> Vec<(usize, (Client, Tracker))> {
    (0..SHARDS).map(|k| (holder + k) % SHARDS).map(|s| (s, member(a, s, &format!("m{s}"), room, None))).collect()
}

#[test]
fn cutting_the_relays_link_loses_nothing_on_any_shard_on_one_redis() {
    let _d = deadline("hist_cut_redis", Duration::from_secs(180));
    let redis = RedisServer::start();
    let room = room_directed_by(1);
    cut_while_publishing(&|args| redis.cli(args), &redis.url(), &room, 2);
}

#[test]
fn cutting_the_relays_link_loses_nothing_on_any_shard_on_a_redis_cluster() {
    let _d = deadline("hist_cut_cluster", Duration::from_secs(240));
    let cluster = RedisCluster::start(3, 0);
    let room = room_directed_by(2);
    // The links to the primary that owns the room's channel are the ones cut.
    let owner = cluster.owner(&format!("cc:room:{room}"));
    let primary = &cluster.servers[owner];
    cut_while_publishing(&|args| primary.cli(args), &cluster.url(), &room, 3);
}

#[test]
fn cutting_the_relays_link_loses_nothing_on_any_shard_through_sentinel() {
    let _d = deadline("hist_cut_sentinel", Duration::from_secs(240));
    let s = SentinelSetup::start();
    let room = room_directed_by(3);
    cut_while_publishing(&|args| s.primary.cli(args), &s.url(), &room, 1);
}

/// The tail: what is published while the relay's link alone is down (Redis
/// refuses it back: `maxclients`) and nothing after reaches every shard
/// once the link is back. No later message shows the other shards a hole;
/// only the relay's news (`News::LinkDown`) makes them catch up.
#[test]
fn what_is_published_while_the_relays_link_is_down_reaches_every_shard_with_nothing_after_it() {
    let _d = deadline("hist_tail", Duration::from_secs(120));
    let redis = RedisServer::start();
    let room = room_directed_by(1);
    let room = room.as_str();
    let a = node(&redis.url(), SHARDS, false);
    let b = node(&redis.url(), 1, false);
    let first = api_publish(&b, room, json!(0));
    let mut members = joined_from(&a, 2, room);
    let live = api_publish(&b, room, json!("live")).offset;
    for (s, (c, t)) in &mut members {
        drain_and_check(&format!("shard {s} before"), c, t, live, Duration::from_secs(10));
    }
    let relay_link = sub_link_ids(&|args| redis.cli(args), 2);
    assert_eq!(relay_link.len(), 1, "the relay's one link: {relay_link:?}");
    let caught_up = caught_up_total(&a);
    // Opened first: it stays, and lets new connections in again later.
    let mut admin = RespConn::open(redis.port);
    assert_eq!(admin.cmd(&["CONFIG", "SET", "maxclients", "1"]).text(), "OK");
    assert_eq!(admin.cmd(&["CLIENT", "KILL", "ID", &relay_link[0]]), Resp::Int(1), "the relay's link was killed");
    // Published through b's publisher link, which stayed up.
    let mut last = live;
    for i in 1..=5 {
        last = api_publish(&b, room, json!(i)).offset;
    }
    assert_eq!(last, live + 5);
    // Nothing comes while the relay's link is refused (a member on another
    // shard, whose own link is up, waits for the relay's).
    for (s, (c, _)) in &mut members {
        if let Some(v) = c.recv_json(Duration::from_millis(if *s == 0 { 700 } else { 50 })) {
            panic!("shard {s} got {v} while the relay's link was down");
        }
    }
    assert_eq!(admin.cmd(&["CONFIG", "SET", "maxclients", "10000"]).text(), "OK");
    // No publish from here on.
    for (s, (c, t)) in &mut members {
        drain_and_check(&format!("shard {s} after the relay's link came back"), c, t, last, Duration::from_secs(15));
    }
    assert!(caught_up_total(&a) >= caught_up + SHARDS as f64 * 5.0, "every shard read the 5 from the history");
    assert_eq!(first.offset, live - 1);
}
