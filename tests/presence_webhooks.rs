//! Presence's webhooks end to end (PROTOCOL.md §11): real corecast nodes on
//! a real redis-server (and standalone), posting to a real HTTP receiver.
//! Each transition is sent once for the cluster, `user_offline` and
//! `room_vacated` only after the debounce, a flap within it sends nothing,
//! every request is signed, and a receiver that fails twice still gets the
//! batch.

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use common::redis_topology::TempDir;
use common::webhook::{Answer, Receiver};
use common::{Client, Server, start_server};
use serde_json::Value;

const SECRET: &str = "hook-secret";
const DEBOUNCE_MS: u64 = 600;

fn nodes(n: usize, redis: Option<&str>, hook: &Receiver, dir: &TempDir) -> Vec<Server> {
    let file = dir.file("ns.toml");
    std::fs::write(&file, "[[namespace]]\nprefix = \"who:\"\npresence = true\n").unwrap();
    let (url, debounce) = (hook.url(), DEBOUNCE_MS.to_string());
    (0..n)
        .map(|_| {
            let mut args = vec!["--shards", "2", "--config", &file, "--webhook-url", &url];
            args.extend(["--webhook-secret", SECRET, "--webhook-debounce-ms", &debounce]);
            if let Some(r) = redis {
                args.extend(["--redis", r]);
            }
            start_server(&args)
        })
        .collect()
}

/// (event, subject) of every acknowledged event, in order.
fn seen(hook: &Receiver) -> Vec<(String, String)> {
    hook.events()
        .iter()
        .map(|e| {
            let subject = e.get("user").or(e.get("room")).and_then(Value::as_str).unwrap_or("?");
            (e["event"].as_str().unwrap().to_string(), subject.to_string())
        })
        .collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn ev(e: &str, s: &str) -> (String, String) {
    (e.to_string(), s.to_string())
}

/// Waits for `want` (in any order: a user's and a room's transitions are
/// decided apart), then that nothing more comes (a second node, a late
/// duplicate).
fn wait_seen(hook: &Receiver, want: &[(String, String)]) {
    hook.wait_for_events(want.len(), Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(DEBOUNCE_MS + 400));
    assert_eq!(sorted(seen(hook)), sorted(want.to_vec()));
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

fn transitions(n: &[Server], hook: &Receiver) {
    let last = n.len() - 1;
    // First connection anywhere: online at once; a second tab on another
    // node: nothing. Subscribing to a presence room: occupied.
    let mut a = Client::connect(&n[0].ws_url("/ws?user=ann"));
    let mut b = Client::connect(&n[last].ws_url("/ws?user=ann"));
    a.subscribe("who:x");
    b.subscribe("who:x");
    let mut want = vec![ev("user_online", "ann"), ev("room_occupied", "who:x")];
    wait_seen(hook, &want);
    // A flap within the debounce: one tab closes, the user reconnects
    // quickly elsewhere; the room keeps a member: nothing.
    drop(a);
    let a2 = Client::connect(&n[0].ws_url("/ws?user=ann"));
    drop(b);
    std::thread::sleep(Duration::from_millis(100));
    let mut c = Client::connect(&n[last].ws_url("/ws?user=ann"));
    c.subscribe("who:x");
    std::thread::sleep(Duration::from_millis(DEBOUNCE_MS + 400));
    assert_eq!(sorted(seen(hook)), sorted(want.clone()), "a flap within the debounce sends nothing");
    // Gone for good: offline and vacated, each once, after the debounce.
    let gone_ms = unix_ms();
    drop(c);
    drop(a2);
    want.extend([ev("room_vacated", "who:x"), ev("user_offline", "ann")]);
    hook.wait_for_events(want.len(), Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(DEBOUNCE_MS + 400));
    assert_eq!(sorted(seen(hook)), sorted(want), "offline and vacated, once each");
    for e in hook.events().iter().filter(|e| e["event"] == "user_offline" || e["event"] == "room_vacated") {
        let at = e["at_ms"].as_u64().unwrap();
        assert!(at >= gone_ms + DEBOUNCE_MS, "{e} came before the debounce ({gone_ms} + {DEBOUNCE_MS})");
    }
    // Every request signed, and the event times are Unix milliseconds.
    for r in hook.requests() {
        r.check_signature(SECRET).unwrap();
        for e in r.events() {
            assert!(e["at_ms"].as_u64().unwrap() > 1_700_000_000_000, "{e}");
        }
    }
}

#[test]
fn each_transition_is_posted_once_across_nodes() {
    let dir = TempDir::new("hooks");
    let hook = Receiver::start(&[Answer::Status(200)]);
    let redis = RedisServer::start();
    let n = nodes(3, Some(&redis.url()), &hook, &dir);
    transitions(&n, &hook);
}

#[test]
fn each_transition_is_posted_once_standalone() {
    let dir = TempDir::new("hooks");
    let hook = Receiver::start(&[Answer::Status(200)]);
    let n = nodes(1, None, &hook, &dir);
    transitions(&n, &hook);
}

/// A receiver that answers 500 twice, then 200: the batch arrives (at least
/// once), nothing is lost.
#[test]
fn a_failing_receiver_gets_the_batch_after_retries() {
    let dir = TempDir::new("hooks");
    let hook = Receiver::start(&[Answer::Status(500), Answer::Status(500), Answer::Status(200)]);
    let n = nodes(1, None, &hook, &dir);
    let clients: Vec<Client> = (0..5).map(|i| Client::connect(&n[0].ws_url(&format!("/ws?user=r{i}")))).collect();
    let evs = hook.wait_for_events(5, Duration::from_secs(15));
    let mut users: Vec<&str> = evs.iter().map(|e| e["user"].as_str().unwrap()).collect();
    users.sort();
    users.dedup();
    assert_eq!(users, ["r0", "r1", "r2", "r3", "r4"]);
    assert!(hook.requests().len() >= 3, "two failures, then the delivery");
    assert!(n[0].metric("corecast_webhook_retries_total") >= 2.0);
    drop(clients);
}
