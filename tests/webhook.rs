//! Webhook delivery (PROTOCOL.md §11) against a real HTTP receiver on a
//! real socket (`common::webhook::Receiver`): body, signature, batching,
//! retries, a receiver that is down or hangs, the queue bound, expiry,
//! stop, and the `--webhook-url` check at start-up.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::webhook::{Answer, Receiver};
use corecast::config::WebhookConfig;
use corecast::metrics::Metrics;
use corecast::webhook::{WebhookEvent, WebhookKind, Webhooks};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn start(url: &str, adjust: impl FnOnce(&mut WebhookConfig)) -> (Webhooks, Arc<Metrics>) {
    let mut cfg = WebhookConfig::new(url);
    adjust(&mut cfg);
    let metrics = Arc::new(Metrics::new(1));
    (Webhooks::start(&cfg, metrics.clone()).expect("a URL starts the sender"), metrics)
}

fn user(i: usize) -> WebhookEvent {
    WebhookEvent::new(WebhookKind::UserOnline, &format!("u{i}"), 1_700_000_000_000 + i as u64)
}

/// The `user` of each event, in order.
fn users(evs: &[Value]) -> Vec<String> {
    evs.iter().map(|e| e["user"].as_str().expect("a user event").to_string()).collect()
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("u{i}")).collect()
}

/// Polls `cond` until it holds (or panics after `WAIT`, saying `what`).
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A batch arrives once, in order, with the exact body, headers, and a
/// signature that verifies with the secret and fails with another one or
/// over another body.
#[test]
fn a_batch_arrives_once_in_order_with_exact_body_and_valid_signature() {
    let rx = Receiver::start(&[Answer::Status(200)]);
    let (hooks, m) = start(&rx.url(), |c| c.secret = Some("s3cret".into()));
    let evs = [
        WebhookEvent::new(WebhookKind::UserOnline, "alice", 1_700_000_000_001),
        WebhookEvent::new(WebhookKind::RoomOccupied, "chat:\"lobby\"\\é", 1_700_000_000_002),
        WebhookEvent::new(WebhookKind::UserOffline, "bob\n", 1_700_000_000_003),
        WebhookEvent::new(WebhookKind::RoomVacated, "chat:x", 1_700_000_000_004),
    ];
    let before = SystemTimeSecs::now();
    for e in &evs {
        hooks.emit(e.clone());
    }
    rx.wait_for_events(4, WAIT);
    // Nothing sent twice: still one request a while later.
    std::thread::sleep(Duration::from_millis(300));
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/hook"));
    assert_eq!(
        String::from_utf8(r.body.clone()).unwrap(),
        concat!(
            r#"{"events":[{"event":"user_online","user":"alice","at_ms":1700000000001},"#,
            r#"{"event":"room_occupied","room":"chat:\"lobby\"\\é","at_ms":1700000000002},"#,
            r#"{"event":"user_offline","user":"bob\n","at_ms":1700000000003},"#,
            r#"{"event":"room_vacated","room":"chat:x","at_ms":1700000000004}]}"#
        )
    );
    assert_eq!(r.events()[1], json!({"event":"room_occupied","room":"chat:\"lobby\"\\é","at_ms":1_700_000_000_002u64}));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("user-agent"), Some(concat!("corecast/", env!("CARGO_PKG_VERSION"))));
    let t = r.check_signature("s3cret").expect("the signature verifies");
    assert!((before..=SystemTimeSecs::now()).contains(&t), "t={t} is the time of sending");
    assert!(r.check_signature("s3cret!").is_err(), "another secret fails");
    let mut tampered = r.clone();
    tampered.body[20] ^= 1;
    assert!(tampered.check_signature("s3cret").is_err(), "another body fails");
    let w = &m.webhook;
    assert_eq!((w.events_total.get(), w.sent_total.get(), w.requests_ok.get()), (4, 4, 1));
    assert_eq!((w.requests_error.get(), w.retries_total.get(), w.queued()), (0, 0, 0));
}

struct SystemTimeSecs;
impl SystemTimeSecs {
    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }
}

/// Without a secret there is no signature header at all.
#[test]
fn without_a_secret_there_is_no_signature_header() {
    let rx = Receiver::start(&[Answer::Status(204)]);
    let (hooks, _m) = start(&rx.url(), |_| {});
    hooks.emit(user(0));
    rx.wait_for_events(1, WAIT);
    let r = &rx.requests()[0];
    assert_eq!(r.header("x-corecast-signature"), None, "{:?}", r.headers);
    assert!(r.check_signature("anything").is_err());
}

/// 150 events at once leave as 100 + 50, in order. To make "at once"
/// exact on a loaded box, the sender is first held in a retry (a 500 on a
/// single event) while the 150 are queued behind it.
#[test]
fn a_burst_of_150_leaves_in_two_requests_of_at_most_100() {
    let rx = Receiver::start(&[Answer::Status(500), Answer::Status(200)]);
    let (hooks, m) = start(&rx.url(), |_| {});
    hooks.emit(user(0));
    rx.wait_for_requests(1, WAIT);
    for i in 1..151 {
        hooks.emit(user(i));
    }
    let evs = rx.wait_for_events(151, WAIT);
    assert_eq!(users(&evs), names(0..151), "in order, each once");
    let sizes: Vec<usize> = rx.requests().iter().map(|r| r.events().len()).collect();
    assert_eq!(sizes, [1, 1, 100, 50], "the held event (failed, then retried), then the burst in two");
    assert_eq!(m.webhook.sent_total.get(), 151);
}

/// A receiver answering 500 twice, then 200, gets every event; the two
/// failures are two retries.
#[test]
fn two_500s_then_200_loses_nothing_and_counts_two_retries() {
    let rx = Receiver::start(&[Answer::Status(500), Answer::Status(503), Answer::Status(200)]);
    let (hooks, m) = start(&rx.url(), |c| c.secret = Some("k".into()));
    for i in 0..5 {
        hooks.emit(user(i));
    }
    let evs = rx.wait_for_events(5, WAIT);
    assert_eq!(users(&evs), names(0..5));
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    for r in &reqs {
        assert_eq!(r.body, reqs[0].body, "the same batch each time");
        r.check_signature("k").expect("each attempt is signed");
    }
    let w = &m.webhook;
    wait_until("the ack counted", || w.sent_total.get() == 5);
    assert_eq!((w.retries_total.get(), w.requests_error.get(), w.requests_ok.get()), (2, 2, 1));
    assert_eq!((w.dropped_expired.get(), w.queued()), (0, 0));
}

/// Nothing listening (connection refused), then a receiver comes up on
/// that port: it gets the batch.
#[test]
fn a_receiver_that_is_down_then_up_gets_the_batch() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let (hooks, m) = start(&url, |_| {});
    for i in 0..3 {
        hooks.emit(user(i));
    }
    let w = &m.webhook;
    wait_until("two refused attempts", || w.requests_error.get() >= 2);
    assert_eq!(w.sent_total.get(), 0);
    let rx = Receiver::start_on(port, &[Answer::Status(200)]);
    let evs = rx.wait_for_events(3, WAIT);
    assert_eq!(users(&evs), names(0..3));
    wait_until("the ack counted", || w.sent_total.get() == 3);
    assert!(w.retries_total.get() >= 2);
}

/// With the sender stuck on a receiver that never answers and a queue of
/// 50, 200 emits take what fits and drop the rest, counted exactly, and do
/// not block. Stopping is bounded even then, and counts what was held.
#[test]
fn a_full_queue_drops_and_counts_the_excess_without_blocking() {
    let rx = Receiver::start(&[Answer::Hang]);
    let (hooks, m) = start(&rx.url(), |c| c.queue = 50);
    let w = &m.webhook;
    // One event in flight: the sender is blocked in its request.
    hooks.emit(user(0));
    rx.wait_for_requests(1, WAIT);
    let t = Instant::now();
    for i in 1..201 {
        hooks.emit(user(i));
    }
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "200 emits took {took:?}");
    assert_eq!(w.events_total.get(), 51, "the one in flight and a full queue");
    assert_eq!(w.dropped_queue_full.get(), 150);
    assert_eq!(w.queued(), 51);
    // A stop does not wait past its deadline for a request that hangs...
    let t = Instant::now();
    assert!(!hooks.flush_and_stop(Duration::from_millis(300)), "the sender is still in its request");
    assert!(t.elapsed() < Duration::from_secs(2), "flush_and_stop waited {:?}", t.elapsed());
    // ...and once that request ends (the receiver goes away), what was
    // held is counted as dropped at stop; nothing is left in the gauge.
    drop(rx);
    wait_until("the held events counted at stop", || w.dropped_stopped.get() == 51);
    assert_eq!((w.sent_total.get(), w.queued()), (0, 0));
    hooks.emit(user(999));
    wait_until("an emit after the stop counted", || w.dropped_stopped.get() == 52);
    assert_eq!(w.events_total.get(), 51);
}

/// A batch never acknowledged is retried until the give-up age, then
/// dropped and counted as expired; the sender goes on with the next one.
#[test]
fn a_batch_never_acknowledged_expires_and_is_counted() {
    let rx = Receiver::start(&[Answer::Status(500)]);
    let (hooks, m) = start(&rx.url(), |c| c.give_up_after = Duration::from_millis(1500));
    let w = &m.webhook;
    let t = Instant::now();
    for i in 0..7 {
        hooks.emit(user(i));
    }
    wait_until("the batch expired", || w.dropped_expired.get() == 7);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1500), "retried for the whole give-up age, not {took:?}");
    let tries = rx.requests().len();
    assert!(tries >= 3, "retried with backoff: {tries} attempts");
    assert_eq!(w.retries_total.get() as usize, tries - 1);
    assert_eq!((w.sent_total.get(), w.queued()), (0, 0));
    hooks.emit(user(7));
    let next = rx.wait_for_requests(tries + 1, WAIT);
    assert_eq!(users(&next[tries].events()), ["u7"], "the next batch is tried");
}

/// `flush_and_stop` delivers what the node holds (through a failure) and
/// returns once done; later emits are counted as dropped.
#[test]
fn flush_and_stop_delivers_what_is_held() {
    let rx = Receiver::start(&[Answer::Status(500), Answer::Status(200)]);
    let (hooks, m) = start(&rx.url(), |_| {});
    for i in 0..5 {
        hooks.emit(user(i));
    }
    let t = Instant::now();
    assert!(hooks.flush_and_stop(Duration::from_secs(5)), "finished in time");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(users(&rx.events()), names(0..5));
    let w = &m.webhook;
    assert_eq!((w.sent_total.get(), w.retries_total.get(), w.queued()), (5, 1, 0));
    hooks.emit(user(5));
    assert_eq!((w.dropped_stopped.get(), w.events_total.get()), (1, 5));
}

/// A `--webhook-url` that is not http(s) stops the node at start with a
/// message naming the flag; the webhook metrics are served (at zero)
/// whatever the flags.
#[test]
fn a_bad_webhook_url_stops_the_node_and_the_metrics_are_served() {
    let mut child = common::spawn_corecast(&["--shards", "1", "--webhook-url", "ftp://x"], |c| {
        c.stdout(std::process::Stdio::null());
    });
    let end = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "corecast --webhook-url ftp://x did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{status:?}");
    assert!(err.contains("--webhook-url must start with http:// or https://"), "{err}");

    let s = common::start_server(&["--shards", "1", "--webhook-url", "http://127.0.0.1:9/hook"]);
    for series in [
        "corecast_webhook_events_total",
        "corecast_webhook_sent_total",
        "corecast_webhook_requests_total{result=\"error\"}",
        "corecast_webhook_retries_total",
        "corecast_webhook_dropped_total{reason=\"queue_full\"}",
        "corecast_webhook_dropped_total{reason=\"expired\"}",
        "corecast_webhook_queue",
    ] {
        assert_eq!(s.metric(series), 0.0, "{series}");
    }
}

/// `https://` speaks TLS: the first bytes on the socket are a TLS
/// handshake record (a ClientHello). A peer that then closes is a failed
/// request, retried on a new connection (the sender lives on).
#[test]
fn https_speaks_tls_and_a_failed_handshake_is_retried() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://127.0.0.1:{}/hook", listener.local_addr().unwrap().port());
    let (hooks, m) = start(&url, |_| {});
    hooks.emit(user(0));
    for attempt in 0..2 {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut head = [0u8; 2];
        std::io::Read::read_exact(&mut s, &mut head).unwrap();
        assert_eq!(
            head,
            [0x16, 0x03],
            "attempt {attempt}: a TLS handshake record (type 22, version 3.x), got {head:?}"
        );
    }
    let w = &m.webhook;
    wait_until("two failed requests", || w.requests_error.get() >= 2);
    assert_eq!(w.sent_total.get(), 0);
}
