//! The server API calls of PROTOCOL.md §12 that are built so far, against
//! real nodes: standalone and 3 nodes on one real redis-server.

mod common;

use common::redis::RedisServer;
use common::{Client, Server, start_server};
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
