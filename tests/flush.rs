//! The shard's flusher (`src/shard/flush.rs`): on the io_uring driver a room
//! message's sends to many connections enter the kernel together, one
//! `io_uring_enter` for the batch, and every member still gets every frame,
//! in order; the epoll driver (and `--batched-sends false`) writes one
//! `sendmsg` each. Heartbeat pings that fall due together share a batch too.
//! Counted from `/metrics`.

mod common;

use common::{Client, start_server, test_driver};
use serde_json::json;

const MEMBERS: usize = 200;
const MESSAGES: usize = 20;

/// `MEMBERS` subscribers on one shard, `MESSAGES` publishes over the HTTP
/// API; every subscriber reads them all in order. Returns (sends batched,
/// batches).
fn room_of_many(extra: &[&str]) -> (f64, f64) {
    let mut args = vec!["--shards", "1", "--max-ops-per-sec", "0"];
    args.extend_from_slice(extra);
    let s = start_server(&args);
    let mut cs: Vec<Client> = (0..MEMBERS).map(|i| Client::connect(&s.ws_url(&format!("/ws?user=m{i}")))).collect();
    for c in cs.iter_mut() {
        c.subscribe("big");
    }
    for n in 0..MESSAGES {
        let body = json!({"room":"big","data":{"n":n}}).to_string();
        let (st, _) = s.http("POST", "/api/publish", &[("Content-Type", "application/json")], body.as_bytes());
        assert_eq!(st, 200);
    }
    for (i, c) in cs.iter_mut().enumerate() {
        for n in 0..MESSAGES {
            let m = c.recv();
            assert_eq!(m["ev"], "message", "member {i}: {m}");
            assert_eq!(m["data"]["n"], n, "member {i}: in order, once");
        }
    }
    (s.metric("corecast_sends_batched_total"), s.metric("corecast_send_batches_total"))
}

fn batched() {
    let (sends, batches) = room_of_many(&["--driver", "uring"]);
    eprintln!("{sends} sends in {batches} io_uring batches");
    // At least every delivery went in a batch (plus the subscribe replies).
    assert!(sends >= (MEMBERS * MESSAGES) as f64, "{sends} sends batched");
    // Each publish reaches the 200 in one pass: many sends per kernel entry
    // (the replies to 200 subscribes, one per pass, pull the mean down).
    assert!(batches >= 1.0 && sends / batches >= 10.0, "{sends} sends in {batches} batches");
}

fn plain(extra: &[&str]) {
    let (sends, batches) = room_of_many(extra);
    assert_eq!((sends, batches), (0.0, 0.0), "no batching with {extra:?}");
}

#[test]
fn a_room_message_to_many_members_enters_the_kernel_once_per_batch_on_io_uring() {
    match test_driver().as_deref() {
        Some("legacy") => plain(&["--driver", "legacy"]),
        _ => batched(),
    }
}

#[test]
fn batched_sends_can_be_turned_off_for_ab_benchmarks() {
    if test_driver().as_deref() == Some("legacy") {
        // The flag is an io_uring one; the uring pass runs this test.
        eprintln!("SKIPPED batched_sends_can_be_turned_off_for_ab_benchmarks: CORECAST_TEST_DRIVER=legacy");
        return;
    }
    plain(&["--driver", "uring", "--batched-sends", "false"]);
}

/// Heartbeat pings that fall due together (one sweep tick's slice of the
/// connection table) go out in one pass of the flusher: on io_uring, one
/// kernel entry for many pings.
#[test]
fn heartbeat_pings_due_together_go_out_in_one_batch() {
    if test_driver().as_deref() == Some("legacy") {
        // Batches are io_uring's; the uring pass runs this test.
        eprintln!("SKIPPED heartbeat_pings_due_together_go_out_in_one_batch: CORECAST_TEST_DRIVER=legacy");
        return;
    }
    let s = start_server(&["--shards", "1", "--driver", "uring", "--heartbeat-secs", "2"]);
    // Silent WebSockets: they never send, so each is pinged after 2 s.
    let _idle: Vec<common::Raw> =
        (0..MEMBERS).map(|i| common::Raw::upgrade(s.addr, &format!("/ws?user=i{i}"))).collect();
    s.wait_until("all connected", || s.metric("corecast_connections") as usize == MEMBERS);
    let (sends0, batches0, pings0) = (
        s.metric("corecast_sends_batched_total"),
        s.metric("corecast_send_batches_total"),
        s.metric("corecast_heartbeat_pings_total"),
    );
    s.wait_until("every idle connection pinged", || {
        s.metric("corecast_heartbeat_pings_total") - pings0 >= MEMBERS as f64
    });
    let sends = s.metric("corecast_sends_batched_total") - sends0;
    let batches = s.metric("corecast_send_batches_total") - batches0;
    eprintln!("{sends} pings and other sends in {batches} io_uring batches");
    assert!(sends >= MEMBERS as f64, "{sends}");
    assert!(batches >= 1.0 && sends / batches >= 10.0, "{sends} sends in {batches} batches");
}

/// Writes to the subscriber's socket while a publisher sends `n` messages
/// a few ms apart (each its own turn of the shard's loop); every message
/// arrives, in order.
fn writes_for_spaced_publishes(extra: &[&str], n: usize) -> f64 {
    let mut args = vec!["--shards", "1", "--max-ops-per-sec", "0"];
    args.extend_from_slice(extra);
    let s = start_server(&args);
    let mut sub = Client::connect(&s.ws_url("/ws?user=sub"));
    sub.subscribe("tick");
    let mut publisher = Client::connect(&s.ws_url("/ws?user=pub"));
    // A reply the publisher has read: every earlier write is done, count
    // from here.
    publisher.subscribe("elsewhere");
    let before = s.metric("corecast_socket_writes_total");
    for i in 0..n {
        // No id: no ack, so the only frames written are the deliveries.
        publisher.send_json(&json!({"op":"publish","room":"tick","data":{"n":i}}));
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    for i in 0..n {
        let m = sub.recv();
        assert_eq!(m["ev"], "message", "{m}");
        assert_eq!(m["data"]["n"], i, "in order, once");
    }
    // Less the write of the first scrape's own response.
    s.metric("corecast_socket_writes_total") - before - 1.0
}

/// `--write-delay-ms`: a connection written less than the delay ago is
/// held, and its frames of that window leave in one write (a second-long
/// delay holds all eight publishes, 3 ms apart, unless the test is held up
/// for a second; eight: one batched send takes up to 8 frames); without it
/// (`0`) each message is written when its turn ends, and so it is by
/// default (`auto`) on a shard this idle (tests/coalesce.rs).
#[test]
fn with_a_write_delay_a_busy_connections_frames_leave_together() {
    let plain = writes_for_spaced_publishes(&["--write-delay-ms", "0"], 8);
    let delayed = writes_for_spaced_publishes(&["--write-delay-ms", "1000"], 8);
    let auto = writes_for_spaced_publishes(&[], 8);
    eprintln!("writes for 8 spaced messages: {plain} without a delay, {delayed} with 1000 ms, {auto} with auto");
    assert!((1.0..=2.0).contains(&delayed), "{delayed} writes with the delay");
    assert!(plain > delayed, "{plain} writes without the delay");
    assert!(auto > delayed, "{auto} writes by default");
}

/// `--write-delay-ms` holds only connections written less than the delay
/// ago: one quiet for longer (a chat, a room at 50 msg/s under a short
/// delay) is written at once, in the turn its frame was queued.
#[test]
fn a_write_delay_does_not_hold_a_quiet_connection() {
    let s = start_server(&["--shards", "1", "--write-delay-ms", "300"]);
    let mut sub = Client::connect(&s.ws_url("/ws?user=sub"));
    sub.subscribe("chat");
    let mut publisher = Client::connect(&s.ws_url("/ws?user=pub"));
    publisher.subscribe("elsewhere");
    for i in 0..3 {
        // Longer than the delay since anything was written to `sub`.
        std::thread::sleep(std::time::Duration::from_millis(700));
        let held = s.metric("corecast_writes_held_total");
        publisher.send_json(&json!({"op":"publish","room":"chat","data":i}));
        let m = sub.recv();
        assert_eq!(m["data"], i, "{m}");
        // The scrapes' own responses are not held either: each connection
        // is new.
        assert_eq!(s.metric("corecast_writes_held_total"), held, "message {i} was held");
    }
    // While it is busy, it is held (the counter can move).
    let held = s.metric("corecast_writes_held_total");
    for i in 3..6 {
        publisher.send_json(&json!({"op":"publish","room":"chat","data":i}));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for i in 3..6 {
        assert_eq!(sub.recv()["data"], i);
    }
    assert!(s.metric("corecast_writes_held_total") > held, "a busy connection was not held");
}
