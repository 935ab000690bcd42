//! Logging in to Redis: an ACL user (`redis://user:pass@host/db`), a
//! password alone (`redis://:pass@host`), and a wrong password, which keeps
//! the node up but not ready, saying why.

mod common;

use std::time::Duration;

use common::Client;
use common::redis::{RedisServer, UnreadyNode, deadline, expect_event, node, subscribe, wait_until};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

fn protected_redis() -> RedisServer {
    acl_redis("app pw", &["&cc:*"])
}

/// A Redis with a password and an ACL user `app` (password `pw`) allowed only
/// what corecast needs, on `channels` only. (Not CLIENT SETNAME: the node
/// must cope with that being refused.)
fn acl_redis(pw: &str, channels: &[&str]) -> RedisServer {
    let redis = RedisServer::start_with(&["--requirepass", "adminpw"]).cli_auth(&["-a", "adminpw"]);
    let pass = format!(">{pw}");
    let mut args = vec!["ACL", "SETUSER", "app", "on", &pass, "resetchannels"];
    args.extend_from_slice(channels);
    args.extend_from_slice(&["+publish", "+subscribe", "+unsubscribe", "+ping", "+select"]);
    assert_eq!(redis.cli(&args), "OK");
    redis
}

#[test]
fn an_acl_user_and_a_password_alone_both_log_in_and_messages_cross() {
    let _d = deadline("an_acl_user_and_a_password_alone_both_log_in_and_messages_cross", 30 * SECOND);
    let redis = protected_redis();
    // The space in the password is percent-encoded in the URL.
    let n0 = node(&format!("redis://app:app%20pw@127.0.0.1:{}/2", redis.port), 2);
    let n1 = node(&format!("redis://:adminpw@127.0.0.1:{}/1", redis.port), 1);
    let clients = redis.cli(&["CLIENT", "LIST"]);
    assert!(clients.contains("user=app"), "{clients}");
    assert!(clients.contains("db=2"), "SELECT 2 was run: {clients}");

    let mut a = Client::connect(&n0.ws_url("/ws?user=a"));
    let mut b = Client::connect(&n1.ws_url("/ws?user=b"));
    subscribe(&mut a, "auth");
    subscribe(&mut b, "auth");
    a.send_json(&json!({"op": "publish", "room": "auth", "data": 1}));
    b.send_json(&json!({"op": "publish", "room": "auth", "data": 2}));
    for c in [&mut a, &mut b] {
        let mut got: Vec<_> = (0..2).map(|_| expect_event(c, "a message", 5 * SECOND)["data"].clone()).collect();
        got.sort_by_key(|v| v.as_u64());
        assert_eq!(got, [json!(1), json!(2)]);
    }
}

#[test]
fn a_wrong_password_keeps_the_node_up_but_not_ready_and_says_why() {
    let _d = deadline("a_wrong_password_keeps_the_node_up_but_not_ready_and_says_why", 30 * SECOND);
    let redis = protected_redis();
    let mut n =
        UnreadyNode::start(&["--shards", "1", "--redis", &format!("redis://app:nope@127.0.0.1:{}", redis.port)]);
    // The client listener's body is terse (no error text); the log says why.
    wait_until("/readyz not ready", 10 * SECOND, || {
        let (status, body) = n.http_get("/readyz");
        status == 503 && body.contains("redis not connected yet") && !body.contains("WRONGPASS")
    });
    assert_eq!(n.http_get("/healthz").0, 200);
    wait_until("the log says why", 5 * SECOND, || n.logs().contains("AUTH refused: WRONGPASS"));
    assert!(!n.logs().contains("nope"), "the password must not be logged");
    assert!(n.child.try_wait().expect("try_wait").is_none(), "the node must keep running");
}

/// `POST /api/publish` answers once Redis has answered the PUBLISH: one
/// Redis refuses (here an ACL without the room's channel) is a 503, not a
/// 200 for a message that was dropped; one it takes is a 200 and delivered.
#[test]
fn an_api_publish_answers_after_redis_and_a_refused_one_is_a_503() {
    let _d = deadline("an_api_publish_answers_after_redis_and_a_refused_one_is_a_503", 30 * SECOND);
    let redis = acl_redis("pw", &["&cc:room:open*", "&cc:user:*"]);
    let url = format!("redis://app:pw@127.0.0.1:{}", redis.port);
    let n = common::start_server(&["--shards", "2", "--redis", &url, "--api-key", "k"]);
    let mut c = Client::connect(&n.ws_url("/ws?user=u"));
    subscribe(&mut c, "open-1");
    let auth = [("Authorization", "Bearer k")];
    let (st, body) = n.http("POST", "/api/publish", &auth, br#"{"room":"open-1","data":1}"#);
    assert_eq!((st, body.as_str()), (200, r#"{"ok":true}"#));
    assert_eq!(expect_event(&mut c, "the message", 5 * SECOND)["data"], json!(1));
    let (st, body) = n.http("POST", "/api/publish", &auth, br#"{"room":"closed","data":2}"#);
    assert_eq!((st, body.as_str()), (503, r#"{"ok":false,"error":"unavailable"}"#), "NOPERM is not a 200");
    assert_eq!(n.metric("corecast_redis_publish_refused_total"), 1.0);
    let (st, _) = n.http("POST", "/api/publish", &auth, br#"{"user":"u","data":3}"#);
    assert_eq!(st, 200);
    assert_eq!(expect_event(&mut c, "the direct message", 5 * SECOND)["data"], json!(3));
}
