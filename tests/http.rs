//! The HTTP side (PROTOCOL.md §1): routes, statuses, handshake refusals.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::start_server;

#[test]
fn routes_answer_with_their_statuses() {
    let s = start_server(&[]);
    assert_eq!(s.http_get("/healthz"), (200, "ok\n".into()));
    assert_eq!(s.http_get("/readyz").0, 200);
    assert_eq!(s.http_get("/nope").0, 404);
    assert_eq!(s.http_get("/echo").0, 404, "/echo is off by default");
    assert_eq!(s.http_get("/ws").0, 400, "plain GET /ws");
    assert_eq!(s.metric("corecast_handshakes_failed_total"), 1.0, "a request to /ws refused before an upgrade");
    assert_eq!(s.http("DELETE", "/healthz", &[], b"").0, 405);
    let ws = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")];
    let mut v12 = ws.to_vec();
    v12.push(("Sec-WebSocket-Version", "12"));
    assert_eq!(s.http("GET", "/ws", &v12, b"").0, 426);
    let mut badkey = vec![("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")];
    badkey.push(("Sec-WebSocket-Key", "short"));
    assert_eq!(s.http("GET", "/ws", &badkey, b"").0, 400);
    let mut baduser = ws.to_vec();
    baduser.push(("Sec-WebSocket-Version", "13"));
    assert_eq!(s.http("GET", "/ws?user=a%20b", &baduser, b"").0, 400);
    let m = s.metrics();
    assert!(m.contains("# TYPE corecast_connections gauge"));
    // The plain GET /ws, then the version, key and user refusals.
    assert_eq!(s.metric("corecast_handshakes_failed_total"), 4.0);
}

#[test]
fn body_over_the_limit_is_413_and_malformed_http_is_400() {
    let s = start_server(&["--max-body-bytes", "100"]);
    let body = vec![b'x'; 500];
    assert_eq!(s.http("POST", "/api/publish", &[], &body).0, 413);
    let mut t = TcpStream::connect(s.addr).unwrap();
    t.write_all(b"GARBAGE\x01\x02 / HTTP/9\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    t.read_to_end(&mut resp).unwrap();
    assert_eq!(common::parse_response(&resp).0, 400);
    assert_eq!(s.http_get("/healthz").0, 200, "server still serves");
}

#[test]
fn keep_alive_serves_several_requests_on_one_socket() {
    let s = start_server(&[]);
    let mut t = TcpStream::connect(s.addr).unwrap();
    t.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut resp = String::new();
    t.read_to_string(&mut resp).unwrap();
    assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 2, "{resp}");
    assert!(resp.ends_with("ready\n"));
}

#[test]
fn options_come_from_env_and_config_file_with_flags_first() {
    let dir = std::env::temp_dir().join(format!("cc-http-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("corecast.toml");
    std::fs::write(&file, "echo = false\nmax_body_bytes = 10\n").unwrap();
    let f = file.to_str().unwrap().to_string();
    // Env turns /echo on over the file; the flag's body limit beats the file's.
    let s = common::start_server_with(&["--config", &f, "--max-body-bytes", "1000"], |c| {
        c.env("CORECAST_ECHO", "true");
    });
    let mut c = common::Client::connect(&s.ws_url("/echo"));
    c.send_text("{\"hello\":1}");
    assert_eq!(c.recv(), serde_json::json!({"hello":1}));
    assert_eq!(s.http("POST", "/api/publish", &[], br#"{"room":"r","data":1}"#).0, 200);
}
