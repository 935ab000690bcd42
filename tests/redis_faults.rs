//! Redis failing under running nodes: killed and restarted on the same port,
//! or paused (SIGSTOP). Nodes and clients stay up, publishes are refused
//! fast (`unavailable`), `/readyz` says why, and delivery resumes when Redis
//! is back.

mod common;

use std::time::{Duration, Instant};

use common::redis::{RedisServer, deadline, expect_event, node, ping, subscribe, wait_until};
use common::{Client, Server};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

fn readyz(n: &Server) -> (u16, String) {
    n.http_get("/readyz")
}

/// Publishes with an id until the node refuses one; returns how long the
/// refusal took to come back.
fn publish_until_refused(c: &mut Client, room: &str, limit: Duration) -> Duration {
    let end = Instant::now() + limit;
    for i in 0.. {
        assert!(Instant::now() < end, "publishes were still accepted after {limit:?}");
        let sent = Instant::now();
        c.send_json(&json!({"op": "publish", "room": room, "data": i, "id": i}));
        // Skip deliveries of earlier publishes; wait for this one's answer.
        loop {
            let v = expect_event(c, "ack or error", 5 * SECOND);
            if v["id"] == i {
                if v["ev"] == "error" {
                    assert_eq!(v["code"], "unavailable", "{v}");
                    return sent.elapsed();
                }
                assert_eq!(v["ev"], "ack", "{v}");
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unreachable!()
}

/// Waits for the next `message` in `room` with `data`, skipping others
/// (late deliveries of publishes accepted before the fault).
fn expect_message(c: &mut Client, room: &str, data: &str) {
    let end = Instant::now() + 10 * SECOND;
    loop {
        let v = expect_event(c, &format!("message {data:?}"), end.saturating_duration_since(Instant::now()));
        if v["ev"] == "message" && v["data"] == data {
            assert_eq!(v["room"], room);
            return;
        }
    }
}

#[test]
fn every_node_reconnects_and_resubscribes_after_redis_restarts() {
    let _d = deadline("every_node_reconnects_and_resubscribes_after_redis_restarts", 40 * SECOND);
    let mut redis = RedisServer::start();
    let (n0, n1) = (node(&redis.url(), 2), node(&redis.url(), 2));
    let mut a = Client::connect(&n0.ws_url("/ws?user=a"));
    let mut b = Client::connect(&n1.ws_url("/ws?user=b"));
    subscribe(&mut a, "r");
    subscribe(&mut b, "r");

    redis.kill();
    for n in [&n0, &n1] {
        wait_until("/readyz turns 503", 5 * SECOND, || readyz(n).0 == 503);
        let (_, why) = readyz(n);
        assert_eq!(why, "not ready: redis unreachable\n");
        assert_eq!(n.http_get("/healthz").0, 200);
    }
    // The clients are still connected and served; publishing is refused.
    ping(&mut a, SECOND);
    let took = publish_until_refused(&mut a, "r", 5 * SECOND);
    assert!(took < SECOND, "a refusal took {took:?}");

    redis.restart();
    for n in [&n0, &n1] {
        wait_until("every link back", 10 * SECOND, || n.links_up());
        assert!(n.metric("corecast_redis_reconnects_total") >= 2.0, "both links of the shards in use reconnected");
    }
    // Every channel still needed is back: the room (one shard per node) and both users.
    wait_until("the channels are back", 5 * SECOND, || {
        redis.numsub("cc:room:r") == 2 && redis.channels("cc:user:*") == ["cc:user:a", "cc:user:b"]
    });
    b.send_json(&json!({"op": "publish", "room": "r", "data": "after", "id": "x"}));
    expect_message(&mut a, "r", "after");
    expect_message(&mut b, "r", "after");
}

#[test]
fn a_paused_redis_fails_publishes_fast_and_the_nodes_recover_on_sigcont() {
    let _d = deadline("a_paused_redis_fails_publishes_fast_and_the_nodes_recover_on_sigcont", 40 * SECOND);
    let redis = RedisServer::start();
    let (n0, n1) = (node(&redis.url(), 2), node(&redis.url(), 2));
    let mut a = Client::connect(&n0.ws_url("/ws?user=a"));
    let mut b = Client::connect(&n1.ws_url("/ws?user=b"));
    subscribe(&mut a, "p");
    subscribe(&mut b, "p");

    redis.pause();
    // Refused once Redis has left a publish unanswered for a second; each
    // refusal itself is immediate.
    let took = publish_until_refused(&mut a, "p", 10 * SECOND);
    assert!(took < SECOND, "a refusal took {took:?}");
    let took = publish_until_refused(&mut a, "p", SECOND);
    assert!(took < SECOND / 2, "a refusal took {took:?}");
    // The shard keeps serving.
    let t = Instant::now();
    ping(&mut a, SECOND);
    assert!(t.elapsed() < SECOND / 2);
    wait_until("/readyz turns 503", 10 * SECOND, || readyz(&n0).0 == 503);
    assert_eq!(n0.http_get("/healthz").0, 200);

    redis.resume();
    for n in [&n0, &n1] {
        wait_until("every link back", 15 * SECOND, || n.links_up());
    }
    wait_until("the room's channel is back on both nodes", 5 * SECOND, || redis.numsub("cc:room:p") == 2);
    b.send_json(&json!({"op": "publish", "room": "p", "data": "back", "id": "y"}));
    expect_message(&mut a, "p", "back");
    expect_message(&mut b, "p", "back");
}
