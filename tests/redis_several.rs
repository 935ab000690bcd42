//! Several independent Redis servers (`--redis redis://a,redis://b,...`):
//! each channel lives on exactly one of them (jump consistent hash), every
//! node agrees on which, messages cross nodes as with one Redis, and a
//! server lost takes down only its own rooms.

mod common;

use std::time::Duration;

use common::redis::{RedisServer, deadline, expect_event, wait_until};
use common::redis_topology::subscribe_all;
use common::{Client, Server, start_server};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

fn several_node(url: &str) -> Server {
    start_server(&["--shards", "2", "--redis", url, "--max-rooms-per-connection", "0", "--max-ops-per-sec", "0"])
}

#[test]
fn channels_are_spread_over_the_servers_and_a_lost_server_only_takes_its_rooms() {
    let _d = deadline("channels_are_spread_over_the_servers_and_a_lost_server_only_takes_its_rooms", 60 * SECOND);
    let mut redis: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let url = redis.iter().map(|r| r.url()).collect::<Vec<_>>().join(",");
    let (n0, n1) = (several_node(&url), several_node(&url));
    let rooms: Vec<String> = (0..60).map(|i| format!("j-{i}")).collect();
    let mut a = Client::connect(&n0.ws_url("/ws?user=a"));
    let mut b = Client::connect(&n1.ws_url("/ws?user=b"));
    subscribe_all(&mut a, &rooms);
    subscribe_all(&mut b, &rooms);

    // Each room's channel is at exactly one server, subscribed by both nodes there.
    let mut home = Vec::new();
    for r in &rooms {
        let counts: Vec<u64> = redis.iter().map(|s| s.numsub(&format!("cc:room:{r}"))).collect();
        let at: Vec<usize> = (0..3).filter(|&i| counts[i] > 0).collect();
        assert_eq!(at.len(), 1, "room {r} at one server: {counts:?}");
        assert_eq!(counts[at[0]], 2, "room {r}: one subscription per node");
        home.push(at[0]);
    }
    for i in 0..3 {
        assert!(home.iter().filter(|&&h| h == i).count() >= 5, "spread over every server: {home:?}");
    }
    let mut p = Client::connect(&n1.ws_url("/ws?user=p"));
    for r in &rooms {
        p.send_json(&json!({"op": "publish", "room": r, "data": r}));
    }
    for _ in &rooms {
        let v = expect_event(&mut a, "a message", 5 * SECOND);
        assert_eq!(v["from"], "p");
        assert_eq!(v["data"], v["room"]);
    }

    // One server lost: its rooms are refused, the others still flow.
    let lost = home[0];
    redis[lost].kill();
    // The other servers still serve: degraded, still ready within the grace
    // (--ready-grace-secs); the client listener's body names no address.
    wait_until("/readyz says degraded", 5 * SECOND, || {
        let (status, body) = n1.http_get("/readyz");
        status == 200 && body.contains("degraded") && !body.contains("127.0.0.1")
    });
    assert_eq!(common::metric_in(&n1.metrics(), "corecast_redis_degraded"), Some(1.0));
    for (r, &h) in rooms.iter().zip(&home) {
        p.send_json(&json!({"op": "publish", "room": r, "data": 2, "id": r}));
        let v = expect_event(&mut p, "an answer", 5 * SECOND);
        if h == lost {
            assert_eq!((v["ev"].as_str(), v["code"].as_str()), (Some("error"), Some("unavailable")), "{v}");
        } else {
            assert_eq!(v, json!({"ev": "ack", "id": r}));
            assert_eq!(expect_event(&mut a, "the message", 5 * SECOND)["room"], *r);
        }
    }
    a.expect_silence(Duration::from_millis(300));
}
