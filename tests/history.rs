//! Room history and recovery (PROTOCOL.md §7) on one node, standalone and
//! with Redis: offsets and epochs, `subscribe` with `since`, the `history`
//! op, `/api/publish` positions, refusals.

mod common;

use std::time::Duration;

use common::history::{Pos, api_publish, messages, next_message, offsets, subscribe_since};
use common::redis::{RedisServer, deadline};
use common::{Client, Server, start_server};
use serde_json::{Value, json};

const SIZE: &str = "10";

fn standalone() -> Server {
    start_server(&["--shards", "2", "--history-size", SIZE, "--max-ops-per-sec", "0"])
}

fn with_redis(r: &RedisServer) -> Server {
    start_server(&["--shards", "2", "--history-size", SIZE, "--max-ops-per-sec", "0", "--redis", &r.url()])
}

/// 20 messages, then a client recovers from offset 12: 13..20, then live
/// ones, once each; wrong epochs, trimmed and future offsets get
/// `recovered:false` and nothing replayed.
fn recovery_replays_exactly_what_followed(s: &Server) {
    let room = "hist-1";
    let pos: Vec<Pos> = (1..=20).map(|i| api_publish(s, room, json!({"n": i}))).collect();
    let epoch = pos[0].epoch.clone();
    assert!(pos.iter().all(|p| p.epoch == epoch), "one epoch");
    assert_eq!(pos.iter().map(|p| p.offset).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());

    let mut c = Client::connect(&s.ws_url("/ws?user=alice"));
    let since = Pos { epoch: epoch.clone(), offset: 12 };
    let v = subscribe_since(&mut c, room, Some(&since));
    assert_eq!(v, json!({"ev":"subscribed","room":room,"id":"s","recovered":true,"epoch":epoch,"offset":20}));
    let replay = messages(&mut c, room, 8, Duration::from_secs(5));
    assert_eq!(offsets(&replay), (13..=20).collect::<Vec<_>>());
    for m in &replay {
        assert_eq!(m["from"], "server");
        assert_eq!(m["data"], json!({"n": m["offset"]}));
        assert_eq!(m["epoch"], epoch.as_str());
    }
    // Live ones follow, from the API and from a client (its own id as `from`).
    api_publish(s, room, json!("live-21"));
    c.send_json(&json!({"op":"publish","room":room,"data":"live-22","id":"p"}));
    let (mut got, mut acked) = (Vec::new(), false);
    while got.len() < 2 || !acked {
        let v = c.recv();
        if v == json!({"ev":"ack","id":"p"}) {
            acked = true;
            continue;
        }
        got.push(v);
    }
    assert_eq!(offsets(&got), [21, 22]);
    assert_eq!(got[0]["data"], "live-21");
    assert_eq!((got[1]["data"].as_str(), got[1]["from"].as_str()), (Some("live-22"), Some("alice")));
    c.expect_silence(Duration::from_millis(300));

    // A wrong epoch: recovered:false, the current position, no replay.
    let mut w = Client::connect(&s.ws_url("/ws"));
    let v = subscribe_since(&mut w, room, Some(&Pos { epoch: "not-the-epoch".into(), offset: 12 }));
    assert_eq!(v, json!({"ev":"subscribed","room":room,"id":"s","recovered":false,"epoch":epoch,"offset":22}));
    // Trimmed (size 10 holds 13..22): recovered:false.
    let mut t = Client::connect(&s.ws_url("/ws"));
    let v = subscribe_since(&mut t, room, Some(&Pos { epoch: epoch.clone(), offset: 11 }));
    assert_eq!((v["recovered"].clone(), v["offset"].clone()), (json!(false), json!(22)));
    // Above T: recovered:false.
    let mut f = Client::connect(&s.ws_url("/ws"));
    let v = subscribe_since(&mut f, room, Some(&Pos { epoch: epoch.clone(), offset: 99 }));
    assert_eq!(v["recovered"], false);
    // The oldest offset still held is recoverable.
    let mut e = Client::connect(&s.ws_url("/ws"));
    let v = subscribe_since(&mut e, room, Some(&Pos { epoch: epoch.clone(), offset: 12 }));
    assert_eq!(v["recovered"], true);
    assert_eq!(offsets(&messages(&mut e, room, 10, Duration::from_secs(5))), (13..=22).collect::<Vec<_>>());
    // A plain subscribe gets the position and nothing replayed.
    let mut p = Client::connect(&s.ws_url("/ws"));
    let v = subscribe_since(&mut p, room, None);
    assert_eq!(v, json!({"ev":"subscribed","room":room,"id":"s","epoch":epoch,"offset":22}));
    // None of them got a replay: the next thing each sees is offset 23.
    api_publish(s, room, json!(23));
    for c in [&mut w, &mut t, &mut f, &mut e, &mut p, &mut c] {
        let m = next_message(c, room, Duration::from_secs(5)).expect("offset 23");
        assert_eq!(m["offset"], 23);
        c.expect_silence(Duration::from_millis(100));
    }
}

/// The `history` op: last K, after `since`, K capped at the size; it does
/// not subscribe.
fn history_op_lists_stored_messages(s: &Server) {
    let room = "hist-op";
    let mut c = Client::connect(&s.ws_url("/ws?user=bob"));
    let v = c.call(json!({"op":"history","room":room,"limit":5,"id":1}));
    assert_eq!(v["ev"], "history");
    assert_eq!((v["offset"].clone(), v["messages"].clone(), v["id"].clone()), (json!(0), json!([]), json!(1)));
    // A read creates no history (issue 18): an empty room is at the empty
    // epoch, and its first publish draws a real one.
    assert_eq!(v["epoch"], "", "a room without history is at the empty epoch");
    let pos: Vec<Pos> = (1..=12).map(|i| api_publish(s, room, json!([i]))).collect();
    assert!(!pos[0].epoch.is_empty() && pos.iter().all(|p| p.epoch == pos[0].epoch));
    let epoch = pos[0].epoch.clone();
    let v = c.call(json!({"op":"history","room":room,"limit":3,"id":"x"}));
    assert_eq!(
        v,
        json!({"ev":"history","room":room,"epoch":epoch,"offset":12,"messages":[
            {"offset":10,"from":"server","data":[10]},
            {"offset":11,"from":"server","data":[11]},
            {"offset":12,"from":"server","data":[12]}],"id":"x"})
    );
    let v = c.call(json!({"op":"history","room":room,"limit":1000,"id":2}));
    let all: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(all, (3..=12).collect::<Vec<_>>(), "the limit is capped at --history-size");
    let v = c.call(json!({"op":"history","room":room,"since":{"epoch":epoch,"offset":9},"id":3}));
    let after: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(after, [10, 11, 12]);
    let list = |v: Value| -> Vec<u64> {
        v["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect()
    };
    // `since` partly trimmed: what is left after it.
    let v = c.call(json!({"op":"history","room":room,"since":{"epoch":epoch,"offset":1},"id":4}));
    assert_eq!(list(v), (3..=12).collect::<Vec<_>>());
    // `since` from another epoch: the last K, in the current epoch.
    let v = c.call(json!({"op":"history","room":room,"limit":2,"since":{"epoch":"stale","offset":5},"id":5}));
    assert_eq!(v["epoch"], epoch.as_str());
    assert_eq!(list(v), [11, 12]);
    // It did not subscribe.
    api_publish(s, room, json!(13));
    c.expect_silence(Duration::from_millis(300));
}

/// Malformed `since`/`limit` get bad_request; too many reads get rate_limited.
fn bad_since_and_read_storms_are_refused(s: &Server) {
    let mut c = Client::connect(&s.ws_url("/ws"));
    for bad in [
        json!({"op":"subscribe","room":"b","since":5,"id":1}),
        json!({"op":"subscribe","room":"b","since":{"epoch":"e","offset":"3"},"id":1}),
        json!({"op":"subscribe","room":"b","since":{"epoch":"e","offset":1.5},"id":1}),
        json!({"op":"subscribe","room":"b","since":{"epoch":"e".repeat(65),"offset":1},"id":1}),
        json!({"op":"history","room":"b","limit":-1,"id":1}),
    ] {
        let v = c.call(bad.clone());
        assert_eq!(
            (v["ev"].as_str(), v["code"].as_str(), v["id"].clone()),
            (Some("error"), Some("bad_request"), json!(1)),
            "{bad}"
        );
    }
    // 300 history ops at once (the burst is --max-rooms-per-connection,
    // 100 by default): some are refused with rate_limited, every other one
    // is answered, nothing is lost.
    for i in 0..300 {
        c.send_json(&json!({"op":"history","room":"b","limit":1,"id":i}));
    }
    let (mut answered, mut limited) = (0, 0);
    for _ in 0..300 {
        let v = c.recv();
        match (v["ev"].as_str(), v["code"].as_str()) {
            (Some("history"), _) => answered += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            _ => panic!("unexpected {v}"),
        }
    }
    // The burst (100) is answered whole; refills during the 300 may add a few.
    assert!(limited > 0 && answered >= 100, "answered {answered}, rate_limited {limited}");
    assert_eq!(answered + limited, 300);
    c.expect_silence(Duration::from_millis(200));
}

#[test]
fn standalone_recovery_replays_exactly_what_followed() {
    let _d = deadline("standalone_recovery", Duration::from_secs(120));
    recovery_replays_exactly_what_followed(&standalone());
}

#[test]
fn standalone_history_op_lists_stored_messages() {
    let _d = deadline("standalone_history_op", Duration::from_secs(60));
    history_op_lists_stored_messages(&standalone());
}

#[test]
fn standalone_bad_since_and_read_storms_are_refused() {
    let _d = deadline("standalone_refusals", Duration::from_secs(60));
    bad_since_and_read_storms_are_refused(&standalone());
}

#[test]
fn redis_recovery_replays_exactly_what_followed() {
    let _d = deadline("redis_recovery", Duration::from_secs(120));
    let r = RedisServer::start();
    let s = with_redis(&r);
    recovery_replays_exactly_what_followed(&s);
    // The history is where docs/history.md says.
    assert_eq!(r.cli(&["XLEN", "{cc:room:hist-1}:log"]), SIZE);
    assert_eq!(r.cli(&["HGET", "{cc:room:hist-1}:meta", "offset"]), "23");
    let ttl: i64 = r.cli(&["TTL", "{cc:room:hist-1}:log"]).parse().unwrap();
    assert!(ttl > 0 && ttl <= 300, "ttl {ttl}");
}

#[test]
fn redis_history_op_lists_stored_messages() {
    let _d = deadline("redis_history_op", Duration::from_secs(60));
    let r = RedisServer::start();
    history_op_lists_stored_messages(&with_redis(&r));
}

#[test]
fn redis_bad_since_and_read_storms_are_refused() {
    let _d = deadline("redis_refusals", Duration::from_secs(60));
    let r = RedisServer::start();
    bad_since_and_read_storms_are_refused(&with_redis(&r));
}

#[test]
fn a_raw_redis_publish_bypasses_history_and_a_script_flush_is_survived() {
    let _d = deadline("raw_publish", Duration::from_secs(60));
    let r = RedisServer::start();
    let s = with_redis(&r);
    let room = "raw";
    let p1 = api_publish(&s, room, json!(1));
    let mut c = Client::connect(&s.ws_url("/ws"));
    subscribe_since(&mut c, room, Some(&p1));
    r.publish("cc:room:raw", r#"{"ev":"message","room":"raw","from":"backend","data":"x"}"#);
    let v = next_message(&mut c, room, Duration::from_secs(5)).unwrap();
    assert_eq!(v, json!({"ev":"message","room":"raw","from":"backend","data":"x"}), "no offset");
    // SCRIPT FLUSH: the next publish gets NOSCRIPT, loads and goes through.
    assert_eq!(r.cli(&["SCRIPT", "FLUSH"]), "OK");
    let p2 = api_publish(&s, room, json!(2));
    assert_eq!((p2.epoch.as_str(), p2.offset), (p1.epoch.as_str(), 2));
    assert_eq!(next_message(&mut c, room, Duration::from_secs(5)).unwrap()["offset"], 2);
}

#[test]
fn without_history_since_is_answered_unrecovered_and_the_history_op_refused() {
    let s = start_server(&["--shards", "1"]);
    let mut c = Client::connect(&s.ws_url("/ws"));
    let v = c.call(json!({"op":"subscribe","room":"r","since":{"epoch":"e","offset":3},"id":1}));
    assert_eq!(v, json!({"ev":"subscribed","room":"r","id":1,"recovered":false}));
    let v = c.call(json!({"op":"history","room":"r","id":2}));
    assert_eq!((v["code"].as_str(), v["id"].clone()), (Some("bad_request"), json!(2)));
    let (st, body) = s.http("POST", "/api/publish", &[], br#"{"room":"r","data":1}"#);
    assert_eq!((st, body.as_str()), (200, r#"{"ok":true}"#));
    let v: Value = c.recv();
    assert_eq!(v, json!({"ev":"message","room":"r","from":"server","data":1}), "no position without history");
}

#[test]
fn standalone_offsets_are_one_order_for_every_subscriber_and_keep_each_publishers_order() {
    let _d = deadline("standalone_order", Duration::from_secs(120));
    let s = standalone();
    let room = "order";
    let mut subs: Vec<Client> = (0..4).map(|_| Client::connect(&s.ws_url("/ws"))).collect();
    for c in &mut subs {
        subscribe_since(c, room, None);
    }
    const EACH: u64 = 300;
    let pubs: Vec<_> = ["p0", "p1"]
        .into_iter()
        .map(|user| {
            let url = s.ws_url(&format!("/ws?user={user}"));
            std::thread::spawn(move || {
                let mut c = Client::connect(&url);
                for i in 0..EACH {
                    c.send_json(&json!({"op":"publish","room":room,"data":i}));
                }
                c
            })
        })
        .collect();
    let _pubs: Vec<Client> = pubs.into_iter().map(|h| h.join().unwrap()).collect();
    let mut orders = Vec::new();
    for c in &mut subs {
        let got = messages(c, room, 2 * EACH as usize, Duration::from_secs(20));
        assert_eq!(offsets(&got), (1..=2 * EACH).collect::<Vec<_>>(), "offsets in order, once");
        for user in ["p0", "p1"] {
            let data: Vec<u64> =
                got.iter().filter(|m| m["from"] == user).map(|m| m["data"].as_u64().unwrap()).collect();
            assert_eq!(data, (0..EACH).collect::<Vec<_>>(), "{user}'s order");
        }
        orders.push(got.iter().map(|m| (m["from"].clone(), m["data"].clone())).collect::<Vec<_>>());
    }
    assert!(orders.windows(2).all(|w| w[0] == w[1]), "every subscriber sees the same order");
}

#[test]
fn standalone_history_expires_after_its_ttl_and_a_restart_starts_new_epochs() {
    let _d = deadline("standalone_expiry", Duration::from_secs(120));
    let args = ["--shards", "2", "--history-size", SIZE, "--history-ttl-secs", "1", "--max-ops-per-sec", "0"];
    let s = start_server(&args);
    let old = api_publish(&s, "ttl", json!(1));
    let mut poll = Client::connect(&s.ws_url("/ws"));
    s.wait_until("the room's history expired", || {
        // Well within the connection's read rate.
        std::thread::sleep(Duration::from_millis(150));
        let v = poll.call(json!({"op":"history","room":"ttl","id":1}));
        v["epoch"] != old.epoch.as_str()
    });
    let mut c = Client::connect(&s.ws_url("/ws"));
    let v = subscribe_since(&mut c, "ttl", Some(&old));
    assert_eq!((v["recovered"].clone(), v["offset"].clone()), (json!(false), json!(0)));
    assert_ne!(v["epoch"], old.epoch.as_str());
    // A restarted node: a position from the old process is not recovered.
    let s1 = start_server(&["--shards", "2", "--history-size", SIZE]);
    let p = api_publish(&s1, "r", json!(1));
    drop(s1);
    let s2 = start_server(&["--shards", "2", "--history-size", SIZE]);
    assert_eq!(api_publish(&s2, "r", json!(1)).offset, 1);
    let mut c = Client::connect(&s2.ws_url("/ws"));
    let v = subscribe_since(&mut c, "r", Some(&p));
    assert_eq!(v["recovered"], false);
    assert_ne!(v["epoch"], p.epoch.as_str());
}

#[test]
fn history_needs_the_same_grant_as_subscribe() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    const SECRET: &str = "history-secret-0123456789";
    let s = start_server(&["--shards", "1", "--history-size", SIZE, "--jwt-secret", SECRET, "--api-key", "k"]);
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let claims = json!({"sub":"dora","exp":exp,"rooms":["team:*"]});
    let t = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
    let mut c = Client::connect(&s.ws_url(&format!("/ws?token={t}")));
    let v = c.call(json!({"op":"history","room":"secret","id":1}));
    assert_eq!((v["code"].as_str(), v["id"].clone()), (Some("forbidden"), json!(1)));
    let v = c.call(json!({"op":"subscribe","room":"secret","since":{"epoch":"e","offset":0},"id":2}));
    assert_eq!((v["code"].as_str(), v["id"].clone()), (Some("forbidden"), json!(2)));
    let v = c.call(json!({"op":"history","room":"team:1","id":3}));
    assert_eq!((v["ev"].as_str(), v["messages"].clone()), (Some("history"), json!([])));
}

#[test]
fn a_message_that_never_arrived_live_is_fetched_from_the_history_in_order() {
    let _d = deadline("hole", Duration::from_secs(60));
    let r = RedisServer::start();
    let s = with_redis(&r);
    let room = "hole";
    let mut c = Client::connect(&s.ws_url("/ws"));
    subscribe_since(&mut c, room, None);
    let p1 = api_publish(&s, room, json!("one"));
    assert_eq!(next_message(&mut c, room, Duration::from_secs(5)).unwrap()["offset"], 1);
    // Offset 2 goes into the history but is never published (as if a hop
    // had lost it), then offset 3 is published as usual.
    assert_eq!(r.cli(&["HINCRBY", "{cc:room:hole}:meta", "offset", "1"]), "2");
    let lost = format!(r#"{{"ev":"message","room":"hole","from":"x","data":"two","epoch":"{}","offset":2}}"#, p1.epoch);
    assert_eq!(r.cli(&["XADD", "{cc:room:hole}:log", "2-0", "m", &lost]), "2-0");
    assert_eq!(api_publish(&s, room, json!("three")).offset, 3);
    let got = messages(&mut c, room, 2, Duration::from_secs(5));
    assert_eq!(offsets(&got), [2, 3]);
    assert_eq!((got[0]["data"].as_str(), got[1]["data"].as_str()), (Some("two"), Some("three")));
    c.expect_silence(Duration::from_millis(300));
}

#[test]
fn history_is_configured_from_the_environment_too() {
    // On Redis, where the TTL can be read back from the keys.
    let r = RedisServer::start();
    let s = common::start_server_with(&["--shards", "1", "--redis", &r.url()], |cmd| {
        cmd.env("CORECAST_HISTORY_SIZE", "3").env("CORECAST_HISTORY_TTL_SECS", "60");
    });
    for i in 1..=5 {
        assert_eq!(api_publish(&s, "env", json!(i)).offset, i);
    }
    let mut c = Client::connect(&s.ws_url("/ws"));
    let v = c.call(json!({"op":"history","room":"env","id":1}));
    let got: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(got, [3, 4, 5], "CORECAST_HISTORY_SIZE=3");
    for key in ["{cc:room:env}:meta", "{cc:room:env}:log"] {
        let ttl: i64 = r.cli(&["TTL", key]).parse().unwrap();
        assert!((50..=60).contains(&ttl), "CORECAST_HISTORY_TTL_SECS=60: TTL {key} = {ttl}");
    }
}
