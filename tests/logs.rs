//! Structured logs: with `--log-format json`, every line is one JSON object,
//! and lines about a connection carry its shard and connection id as fields.

mod common;

use common::{Raw, start_server_with};
use serde_json::Value;

/// The first JSON log line whose message is `message`, if any.
fn line_with(logs: &str, message: &str) -> Option<Value> {
    logs.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
        .find(|v| v["fields"]["message"] == message)
}

#[test]
fn json_logs_carry_shard_and_conn() {
    let s = start_server_with(&["--shards", "1", "--log-format", "json"], |c| {
        c.env("RUST_LOG", "corecast=debug");
    });
    // A refused handshake (400) and a protocol error (an unmasked client frame).
    assert_eq!(s.http_get("/ws").0, 400);
    let mut raw = Raw::upgrade(s.addr, "/ws?user=logger");
    raw.send_frame(0x81, b"{}", false);
    assert_eq!(raw.expect_close_code(), 1002);
    for message in ["handshake refused", "protocol error"] {
        s.wait_until(message, || line_with(&s.logs(), message).is_some());
        let v = line_with(&s.logs(), message).unwrap();
        assert_eq!(v["level"], "DEBUG", "{v}");
        assert_eq!(v["fields"]["shard"], 0, "{v}");
        assert!(v["fields"]["conn"].is_u64(), "{v}");
    }
    let refused = line_with(&s.logs(), "handshake refused").unwrap();
    assert_eq!(refused["fields"]["result"], "bad_request");
    assert_eq!(refused["fields"]["status"], 400);
}

#[test]
fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    // stderr is a pipe here, as under journald, a file or `docker logs`.
    let s = common::start_server(&["--shards", "1"]);
    assert_eq!(s.http_get("/healthz").0, 200);
    s.wait_until("start-up lines", || s.logs().contains("shard running"));
    let logs = s.logs();
    assert!(!logs.contains('\x1b'), "escape codes in the log:\n{logs:?}");
    assert!(logs.lines().any(|l| l.contains("INFO") && l.contains("shard running")), "{logs}");
}

#[test]
fn a_closed_stderr_does_not_take_the_node_down() {
    // stderr's reader goes away (a restarted journald, a `| head`): log
    // lines are dropped, and nothing panics.
    use std::io::{BufRead, BufReader};
    let mut child = common::spawn_corecast(&["--shards", "2", "--drain-secs", "1"], |c| {
        c.env("RUST_LOG", "corecast=debug");
    });
    drop(child.stderr.take());
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr: std::net::SocketAddr = line.trim().strip_prefix("corecast listening on ").expect(&line).parse().unwrap();
    // Debug lines on every shard: refused handshakes and protocol errors.
    for _ in 0..20 {
        assert_eq!(common::http_at(addr, "GET", "/ws", &[], b"").0, 400);
        let mut raw = Raw::upgrade(addr, "/ws?user=quiet");
        raw.send_frame(0x81, b"{}", false);
        assert_eq!(raw.expect_close_code(), 1002);
    }
    assert_eq!(common::http_at(addr, "GET", "/healthz", &[], b"").0, 200);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "the node did not drain and exit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}: a shard died writing to the closed stderr");
}
