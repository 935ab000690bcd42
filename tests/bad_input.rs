//! Every bad input named in PROTOCOL.md gets its error event or close code,
//! and the connection (or the server, for everybody else) keeps working.

mod common;

use common::{Client, Raw, start_server};
use serde_json::json;

#[test]
fn bad_ops_get_named_errors_and_the_connection_stays_open() {
    let s = start_server(&["--shards", "1"]);
    let mut c = Client::connect(&s.ws_url("/ws?user=bob"));
    let err = |c: &mut Client, text: &str| {
        c.send_text(text);
        let m = c.recv();
        assert_eq!(m["ev"], "error", "{text} -> {m}");
        m
    };
    assert_eq!(err(&mut c, "not json")["code"], "bad_request");
    assert_eq!(err(&mut c, "[1,2,3]")["code"], "bad_request");
    assert_eq!(
        err(&mut c, r#"{"op":"fly","id":4}"#),
        json!({"ev":"error","code":"bad_request","message":"unknown \"op\"","id":4})
    );
    assert_eq!(err(&mut c, r#"{"op":"subscribe","room":"no spaces","id":"a"}"#)["code"], "bad_room");
    assert_eq!(err(&mut c, r#"{"op":"subscribe","room":""}"#)["code"], "bad_room");
    let long = "r".repeat(129);
    assert_eq!(err(&mut c, &format!(r#"{{"op":"subscribe","room":"{long}"}}"#))["code"], "bad_room");
    assert_eq!(err(&mut c, r#"{"op":"publish","room":"r"}"#)["code"], "bad_request");
    assert_eq!(err(&mut c, r#"{"op":"send","user":"a b","data":1}"#)["code"], "bad_request");
    assert_eq!(err(&mut c, r#"{"op":"ping","id":[1]}"#)["code"], "bad_request");
    c.ws.send(tungstenite::Message::binary(vec![1u8, 2, 3])).unwrap();
    assert_eq!(c.recv()["code"], "bad_request");
    assert_eq!(c.call(json!({"op":"ping","id":1})), json!({"ev":"pong","id":1}));
    assert_eq!(s.metric("corecast_client_errors_total"), 10.0);
}

/// Sends one bad frame on a raw connection; expects `code` and a closed TCP,
/// while a bystander on the same server keeps working.
fn closes_with(frame: &[u8], code: u16, args: &[&str]) {
    let s = start_server(args);
    let mut bystander = Client::connect(&s.ws_url("/ws?user=by"));
    bystander.subscribe("r");
    let mut raw = Raw::upgrade(s.addr, "/ws?user=evil");
    use std::io::Write;
    raw.s.write_all(frame).unwrap();
    assert_eq!(raw.expect_close_code(), code);
    raw.expect_eof();
    assert_eq!(bystander.call(json!({"op":"publish","room":"r","data":1,"id":1}))["ev"], "message");
    s.wait_until("protocol close counted", || s.metric("corecast_protocol_closes_total") == 1.0);
}

#[test]
fn invalid_utf8_closes_with_1007() {
    closes_with(&common::client_frame(0x81, b"\xce\xba\xff", true), 1007, &[]);
}

#[test]
fn unmasked_frame_closes_with_1002() {
    closes_with(&common::client_frame(0x81, b"{}", false), 1002, &[]);
}

#[test]
fn reserved_bits_and_opcodes_close_with_1002() {
    closes_with(&common::client_frame(0xC1, b"{}", true), 1002, &[]);
    closes_with(&common::client_frame(0x83, b"{}", true), 1002, &[]);
}

#[test]
fn fragmented_ping_and_orphan_continuation_close_with_1002() {
    closes_with(&common::client_frame(0x09, b"", true), 1002, &[]);
    closes_with(&common::client_frame(0x80, b"x", true), 1002, &[]);
}

#[test]
fn message_over_the_limit_closes_with_1009() {
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(2000));
    closes_with(&common::client_frame(0x81, big.as_bytes(), true), 1009, &["--max-message-bytes", "1024"]);
    // The limit also holds across fragments.
    let half = "x".repeat(700);
    let mut two = common::client_frame(0x01, half.as_bytes(), true);
    two.extend(common::client_frame(0x80, half.as_bytes(), true));
    closes_with(&two, 1009, &["--max-message-bytes", "1024"]);
}

#[test]
fn bad_close_code_closes_with_1002_and_a_good_one_is_echoed() {
    closes_with(&common::client_frame(0x88, &1005u16.to_be_bytes(), true), 1002, &[]);
    let s = start_server(&[]);
    let mut raw = Raw::upgrade(s.addr, "/ws");
    raw.send_frame(0x88, &4001u16.to_be_bytes(), true);
    assert_eq!(raw.expect_close_code(), 4001);
    raw.expect_eof();
}

#[test]
fn fragmented_text_with_interleaved_ping_is_one_op() {
    let s = start_server(&[]);
    let mut raw = Raw::upgrade(s.addr, "/ws?user=f");
    raw.send_frame(0x01, br#"{"op":"pi"#, true);
    raw.send_frame(0x89, b"hb", true);
    raw.send_frame(0x80, br#"ng","id":3}"#, true);
    let (b0, p) = raw.read_frame().unwrap();
    assert_eq!((b0, p.as_slice()), (0x8A, &b"hb"[..]), "pong first, with the ping's payload");
    let (b0, p) = raw.read_frame().unwrap();
    assert_eq!((b0, p.as_slice()), (0x81, &br#"{"ev":"pong","id":3}"#[..]));
}
