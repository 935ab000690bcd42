//! Auth and access over real sockets: JWT at the handshake (HS256, RS256,
//! ES256), the `rooms` claim, token expiry and `refresh`, the Origin allowlist.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, DEADLINE, Raw, Server, client_frame, start_server};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;

const SECRET: &str = "test-secret-0123456789";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(claims: Value) -> String {
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

/// A valid HS256 token for `sub`, an hour long.
fn token_for(sub: &str) -> String {
    hs256(json!({"sub": sub, "exp": now() + 3600}))
}

/// The status of a WebSocket upgrade request to `path` with extra headers.
fn upgrade_status(s: &Server, path: &str, headers: &[(&str, &str)]) -> u16 {
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    common::upgrade_status(s.addr, path, &extra).0
}

/// Connects with extra request headers; panics unless the answer is 101.
fn connect_with(url: &str, headers: &[(&str, &str)]) -> Client {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let (ws, resp) = tungstenite::connect(req).unwrap_or_else(|e| panic!("connect {url}: {e}"));
    assert_eq!(resp.status().as_u16(), 101);
    let mut c = Client { ws };
    c.set_timeout(DEADLINE);
    c
}

#[test]
fn valid_token_upgrades_and_from_is_the_sub_not_the_user_param() {
    let s = start_server(&["--jwt-secret", SECRET]);
    let url = format!("/ws?user=mallory&token={}", token_for("alice"));
    let mut alice = Client::connect(&s.ws_url(&url));
    // The same token source in a header.
    let mut bob = connect_with(&s.ws_url("/ws"), &[("authorization", &format!("Bearer {}", token_for("bob")))]);
    bob.subscribe("lobby");
    let ack = alice.call(json!({"op":"publish","room":"lobby","data":{"x":1},"id":1}));
    assert_eq!(ack, json!({"ev":"ack","id":1}));
    let m = bob.recv();
    assert_eq!(m, json!({"ev":"message","room":"lobby","from":"alice","data":{"x":1}}));
    // Direct messages go to the sub, not to the ignored ?user=.
    bob.send_json(&json!({"op":"send","user":"alice","data":"hi"}));
    assert_eq!(alice.recv(), json!({"ev":"direct","from":"bob","data":"hi"}));
}

#[test]
fn missing_malformed_badly_signed_or_expired_tokens_get_401() {
    let s = start_server(&["--jwt-secret", SECRET]);
    let before = s.metric("corecast_handshakes_failed_total");
    let other_key = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub":"alice","exp":now() + 3600}),
        &EncodingKey::from_secret(b"another secret"),
    )
    .unwrap();
    let cases = [
        ("missing", "/ws?user=alice".to_string()),
        ("malformed", "/ws?token=not.a.jwt".to_string()),
        ("bad signature", format!("/ws?token={other_key}")),
        ("expired", format!("/ws?token={}", hs256(json!({"sub":"alice","exp":now() - 5})))),
        ("no exp", format!("/ws?token={}", hs256(json!({"sub":"alice"})))),
        (
            "nbf in the future",
            format!("/ws?token={}", hs256(json!({"sub":"alice","exp":now() + 3600,"nbf":now() + 600}))),
        ),
        ("bad sub", format!("/ws?token={}", hs256(json!({"sub":"a b","exp":now() + 60})))),
        ("bad rooms", format!("/ws?token={}", hs256(json!({"sub":"a","exp":now() + 60,"rooms":"lobby"})))),
    ];
    for (what, path) in &cases {
        assert_eq!(upgrade_status(&s, path, &[]), 401, "{what}");
    }
    let bearer = format!("Bearer {other_key}");
    assert_eq!(upgrade_status(&s, "/ws", &[("Authorization", &bearer)]), 401, "bad signature in a header");
    let after = s.metric("corecast_handshakes_failed_total");
    assert_eq!(after - before, cases.len() as f64 + 1.0);
    assert_eq!(
        s.metric("corecast_handshakes_total{result=\"unauthorized\"}"),
        cases.len() as f64 + 1.0,
        "each counted as unauthorized"
    );
    // And a good one still upgrades, with an `nbf` that has passed too.
    let mut c = Client::connect(&s.ws_url(&format!("/ws?token={}", token_for("alice"))));
    assert_eq!(c.call(json!({"op":"ping"})), json!({"ev":"pong"}));
    let t = hs256(json!({"sub":"alice","exp":now() + 3600,"nbf":now() - 5}));
    let mut c = Client::connect(&s.ws_url(&format!("/ws?token={t}")));
    assert_eq!(c.call(json!({"op":"ping"})), json!({"ev":"pong"}));
}

#[test]
fn rooms_claim_allows_exact_and_prefix_rooms_and_forbids_the_rest() {
    let s = start_server(&["--jwt-secret", SECRET]);
    let t = hs256(json!({"sub":"carol","exp":now() + 3600,"rooms":["lobby","team:7:*"]}));
    let mut c = Client::connect(&s.ws_url(&format!("/ws?token={t}")));
    c.subscribe("lobby");
    c.subscribe("team:7:chat");
    let forbidden =
        |id: i64| json!({"ev":"error","code":"forbidden","message":"the token does not allow this room","id":id});
    assert_eq!(c.call(json!({"op":"subscribe","room":"team:8:chat","id":1})), forbidden(1));
    assert_eq!(c.call(json!({"op":"subscribe","room":"lobby2","id":2})), forbidden(2));
    assert_eq!(c.call(json!({"op":"publish","room":"secret","data":1,"id":3})), forbidden(3));
    c.send_json(&json!({"op":"publish","room":"team:7:chat","data":2,"id":4}));
    // The ack and our own message (we are subscribed), in either order; then
    // nothing from the forbidden publish.
    let mut got = vec![c.recv(), c.recv()];
    got.sort_by_key(|v| v.to_string());
    assert_eq!(got, [json!({"ev":"message","room":"team:7:chat","from":"carol","data":2}), json!({"ev":"ack","id":4})]);
    c.expect_silence(Duration::from_millis(100));
    // A forbidden publish reaches nobody, not even a member of that room.
    let mut member = Client::connect(&s.ws_url(&format!("/ws?token={}", token_for("sam"))));
    member.subscribe("secret");
    assert_eq!(c.call(json!({"op":"publish","room":"secret","data":"leak","id":5})), forbidden(5));
    member.expect_silence(Duration::from_millis(300));
    // The member does get a publish allowed to its sender: the silence above
    // was not a room that delivers nothing.
    let ok = hs256(json!({"sub":"trent","exp":now() + 3600,"rooms":["secret"]}));
    let mut allowed = Client::connect(&s.ws_url(&format!("/ws?token={ok}")));
    allowed.send_json(&json!({"op":"publish","room":"secret","data":"fine"}));
    assert_eq!(member.recv(), json!({"ev":"message","room":"secret","from":"trent","data":"fine"}));
    // `rooms` does not limit direct messages (docs/auth.md).
    c.send_json(&json!({"op":"send","user":"sam","data":"dm"}));
    assert_eq!(member.recv(), json!({"ev":"direct","from":"carol","data":"dm"}));
}

/// PROTOCOL §2: the server sets `from`; one the client puts in its op is ignored.
#[test]
fn a_client_supplied_from_is_ignored() {
    let s = start_server(&["--jwt-secret", SECRET]);
    let mut c = Client::connect(&s.ws_url(&format!("/ws?token={}", token_for("ivan"))));
    let mut other = Client::connect(&s.ws_url(&format!("/ws?token={}", token_for("judy"))));
    c.subscribe("lobby");
    other.subscribe("lobby");
    c.send_json(&json!({"op":"publish","room":"lobby","data":1,"from":"mallory","id":1}));
    assert_eq!(other.recv(), json!({"ev":"message","room":"lobby","from":"ivan","data":1}));
    c.send_json(&json!({"op":"send","user":"judy","data":2,"from":"mallory"}));
    assert_eq!(other.recv(), json!({"ev":"direct","from":"ivan","data":2}));
}

/// docs/auth.md: expiry is "checked on every op" as well as by the sweep
/// (once a second). An op sent just after `exp` is refused at once with
/// `token_expired` (no `pong`), without waiting for the sweep: the op lands
/// a few ms into the second of `exp`, where the sweep's tick has 1 s to fall.
#[test]
fn an_op_right_after_exp_is_refused_before_the_sweep() {
    let s = start_server(&["--jwt-secret", SECRET, "--shards", "1"]);
    let exp = now() + 2;
    let t = hs256(json!({"sub":"kim","exp":exp}));
    let mut c = Client::connect(&s.ws_url(&format!("/ws?token={t}")));
    assert_eq!(c.call(json!({"op":"ping","id":"before"})), json!({"ev":"pong","id":"before"}));
    let at = UNIX_EPOCH + Duration::from_secs(exp) + Duration::from_millis(5);
    std::thread::sleep(at.duration_since(SystemTime::now()).unwrap_or_default());
    let sent = std::time::Instant::now();
    c.send_json(&json!({"op":"ping","id":"after"}));
    let e = c.recv();
    let took = sent.elapsed();
    assert_eq!((e["ev"].as_str(), e["code"].as_str()), (Some("error"), Some("token_expired")), "{e}");
    assert!(e.get("id").is_none(), "{e}");
    assert!(took < Duration::from_millis(250), "token_expired {took:?} after the op: the sweep's, not the op's");
    assert_eq!(c.expect_close(), Some(1008));
}

/// docs/auth.md: with auth on, `/echo` (when enabled) needs a token too.
#[test]
fn echo_needs_a_token_when_auth_is_on() {
    let s = start_server(&["--jwt-secret", SECRET, "--echo"]);
    assert_eq!(upgrade_status(&s, "/echo", &[]), 401);
    assert_eq!(upgrade_status(&s, "/echo?token=not.a.jwt", &[]), 401);
    let mut c = Client::connect(&s.ws_url(&format!("/echo?token={}", token_for("e"))));
    c.ws.send(tungstenite::Message::text("hello")).unwrap();
    match c.ws.read().unwrap() {
        tungstenite::Message::Text(t) => assert_eq!(t.as_str(), "hello"),
        m => panic!("expected the echo, got {m:?}"),
    }
}

/// Generates a key pair with the openssl CLI; returns (private PEM, public key file).
fn openssl_keys(dir: &Path, name: &str, genpkey: &[&str]) -> (Vec<u8>, PathBuf) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let ok = Command::new("openssl").arg("genpkey").args(genpkey).arg("-out").arg(&private).output().unwrap();
    assert!(ok.status.success(), "openssl genpkey {name}: {}", String::from_utf8_lossy(&ok.stderr));
    let ok = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .output()
        .unwrap();
    assert!(ok.status.success(), "openssl pkey -pubout {name}: {}", String::from_utf8_lossy(&ok.stderr));
    (std::fs::read(&private).unwrap(), public)
}

#[test]
fn rs256_and_es256_public_keys_verify_tokens() {
    let dir = std::env::temp_dir().join(format!("cc-auth-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rsa = openssl_keys(&dir, "rsa", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
    let ec = openssl_keys(&dir, "ec", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let claims = json!({"sub":"dave","exp":now() + 3600});
    for (alg, (private, public)) in [(Algorithm::RS256, rsa), (Algorithm::ES256, ec)] {
        let s = start_server(&["--jwt-public-key", public.to_str().unwrap()]);
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&private).unwrap(),
            _ => EncodingKey::from_ec_pem(&private).unwrap(),
        };
        let t = encode(&Header::new(alg), &claims, &key).unwrap();
        let mut c = Client::connect(&s.ws_url(&format!("/ws?token={t}")));
        c.subscribe("r");
        assert_eq!(
            c.call(json!({"op":"publish","room":"r","data":0})),
            json!({"ev":"message","room":"r","from":"dave","data":0})
        );
        // An HS256 token "signed" with the public key is refused (algorithm confusion).
        let pem = std::fs::read(&public).unwrap();
        let forged = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(&pem)).unwrap();
        assert_eq!(upgrade_status(&s, &format!("/ws?token={forged}"), &[]), 401, "{alg:?} vs HS256");
        assert_eq!(upgrade_status(&s, &format!("/ws?token={}", token_for("dave")), &[]), 401);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn expiring_token_gets_token_expired_then_close_1008() {
    let s = start_server(&["--jwt-secret", SECRET]);
    let t = hs256(json!({"sub":"erin","exp":now() + 2}));
    let mut c = Client::connect(&s.ws_url(&format!("/ws?token={t}")));
    // Idle: the shard's sweeper finds it (no op is needed).
    let e = c.recv_json(DEADLINE).expect("token_expired before the deadline");
    assert_eq!(e["ev"], "error");
    assert_eq!(e["code"], "token_expired");
    assert_eq!(c.expect_close(), Some(1008));
}

#[test]
fn refresh_before_expiry_keeps_the_connection_and_replaces_the_rooms() {
    let s = start_server(&["--jwt-secret", SECRET]);
    // Long enough for the ops below on a loaded machine, short enough to outlive.
    let old_exp = now() + 3;
    let t = hs256(json!({"sub":"frank","exp":old_exp,"rooms":["a","b"]}));
    let mut c = Client::connect(&s.ws_url(&format!("/ws?token={t}")));
    c.subscribe("a");
    c.subscribe("b");
    // A token for someone else, or a badly signed one, is refused; nothing changes.
    let other = hs256(json!({"sub":"grace","exp":now() + 60}));
    let r = c.call(json!({"op":"refresh","token":other,"id":"r1"}));
    assert_eq!(
        (r["ev"].as_str(), r["code"].as_str(), r["id"].as_str()),
        (Some("error"), Some("forbidden"), Some("r1"))
    );
    let r = c.call(json!({"op":"refresh","token":"x.y.z","id":"r2"}));
    assert_eq!((r["code"].as_str(), r["id"].as_str()), (Some("forbidden"), Some("r2")));
    // A fresh token with fewer rooms: `b` is left, then the new expiry is confirmed.
    let exp = now() + 60;
    let fresh = hs256(json!({"sub":"frank","exp":exp,"rooms":["a"]}));
    c.send_json(&json!({"op":"refresh","token":fresh,"id":7}));
    assert_eq!(c.recv(), json!({"ev":"unsubscribed","room":"b"}));
    assert_eq!(c.recv(), json!({"ev":"refreshed","exp":exp,"id":7}));
    // Past the old expiry the connection is still there.
    // (the sweeper runs once a second, so wait a second past it)
    let past_old_exp = UNIX_EPOCH + Duration::from_secs(old_exp + 1) + Duration::from_millis(500);
    c.expect_silence(past_old_exp.duration_since(SystemTime::now()).unwrap_or_default());
    assert!(now() > old_exp);
    assert_eq!(c.call(json!({"op":"ping","id":1})), json!({"ev":"pong","id":1}));
    let r = c.call(json!({"op":"subscribe","room":"b","id":2}));
    assert_eq!((r["code"].as_str(), r["id"].as_i64()), (Some("forbidden"), Some(2)));
    assert_eq!(
        c.call(json!({"op":"publish","room":"a","data":1})),
        json!({"ev":"message","room":"a","from":"frank","data":1})
    );
}

/// A `refresh` that takes away a room whose recovery is still pending (the
/// subscribe's history read not answered yet) ends that recovery too: after
/// `unsubscribed` no `subscribed` and no replay come for the room. Both ops
/// go in one TCP write, so the node handles them in one read, before the
/// recovery's read can run (one shard: deterministic).
#[test]
fn refresh_that_drops_a_recovering_room_ends_its_recovery() {
    let s = start_server(&["--jwt-secret", SECRET, "--history-size", "10", "--shards", "1"]);
    let mut p = Client::connect(&s.ws_url(&format!("/ws?token={}", token_for("pub"))));
    let sub = p.call(json!({"op":"subscribe","room":"r","id":1}));
    let since = json!({"epoch": sub["epoch"], "offset": sub["offset"]});
    for i in 0..3 {
        p.send_json(&json!({"op":"publish","room":"r","data":i}));
        assert_eq!(p.recv()["data"], json!(i));
    }
    let exp = now() + 600;
    let only_r = hs256(json!({"sub":"u","exp":exp,"rooms":["r"]}));
    let only_x = hs256(json!({"sub":"u","exp":exp,"rooms":["x"]}));
    let mut raw = Raw::upgrade(s.addr, &format!("/ws?token={only_r}"));
    let ops =
        [json!({"op":"subscribe","room":"r","since":since,"id":"s"}), json!({"op":"refresh","token":only_x,"id":"f"})];
    let bytes: Vec<u8> = ops.iter().flat_map(|op| client_frame(0x81, op.to_string().as_bytes(), true)).collect();
    raw.s.write_all(&bytes).unwrap();
    // Long enough for a recovery read on an idle one-shard node; then a
    // ping marks the end of what the node sent.
    std::thread::sleep(Duration::from_millis(300));
    raw.send_frame(0x81, json!({"op":"ping","id":"end"}).to_string().as_bytes(), true);
    let mut got = Vec::new();
    loop {
        let (_, payload) = raw.read_frame().expect("a frame");
        let ev: Value = serde_json::from_slice(&payload).unwrap();
        if ev == json!({"ev":"pong","id":"end"}) {
            break;
        }
        got.push(ev);
    }
    assert_eq!(
        got,
        [json!({"ev":"unsubscribed","room":"r"}), json!({"ev":"refreshed","exp":exp,"id":"f"})],
        "after unsubscribed, nothing more of the room"
    );
}

/// `refresh` has its own rate limit (a burst of 4, then one a second per
/// connection, refused before any signature check) and keeps one expiry
/// entry per connection:
/// the same token sent again and again adds nothing to the shard's heap
/// (`corecast_token_expiries`), where each one used to add an entry.
#[test]
fn refresh_is_rate_limited_and_keeps_one_expiry_per_connection() {
    let s = start_server(&["--jwt-secret", SECRET, "--shards", "1", "--max-ops-per-sec", "0"]);
    let expiries = || s.metric("corecast_token_expiries{shard=\"0\"}");
    let t = token_for("u");
    let mut c = Client::connect(&s.ws_url(&format!("/ws?token={t}")));
    s.wait_until("one expiry entry for the connection", || expiries() == 1.0);
    for i in 0..4 {
        let r = c.call(json!({"op":"refresh","token":t,"id":i}));
        assert_eq!(r["ev"], "refreshed", "{r}");
    }
    for i in 4..200 {
        let r = c.call(json!({"op":"refresh","token":t,"id":i}));
        assert_eq!((r["code"].as_str(), r["id"].as_i64()), (Some("rate_limited"), Some(i)), "{r}");
    }
    // A badly signed token within the second is refused the same way,
    // without a signature check (it would say forbidden otherwise).
    let r = c.call(json!({"op":"refresh","token":"x.y.z","id":"bad"}));
    assert_eq!(r["code"], "rate_limited");
    assert_eq!(expiries(), 1.0, "the same token again adds no entry");
    std::thread::sleep(Duration::from_millis(1_200));
    let again = c.call(json!({"op":"refresh","token":t,"id":"later"}));
    assert_eq!(again["ev"], "refreshed", "{again}");
    assert_eq!(expiries(), 1.0);
    // A fresh token (another expiry) is one more entry, until compaction.
    std::thread::sleep(Duration::from_millis(1_200));
    let fresh = hs256(json!({"sub": "u", "exp": now() + 7200}));
    assert_eq!(c.call(json!({"op":"refresh","token":fresh,"id":"fresh"}))["ev"], "refreshed");
    assert_eq!(expiries(), 2.0);
    drop(c);
}

#[test]
fn refresh_without_auth_is_a_bad_request() {
    let s = start_server(&[]);
    let mut c = Client::connect(&s.ws_url("/ws?user=u"));
    let r = c.call(json!({"op":"refresh","token":token_for("u"),"id":1}));
    assert_eq!((r["code"].as_str(), r["id"].as_i64()), (Some("bad_request"), Some(1)));
}

#[test]
fn origin_not_in_the_allowlist_gets_403_listed_or_absent_upgrades() {
    let s = start_server(&["--allowed-origins", "https://app.example.com,https://admin.example.com"]);
    let before = s.metric("corecast_handshakes_failed_total");
    assert_eq!(upgrade_status(&s, "/ws", &[("Origin", "https://evil.example.com")]), 403);
    assert_eq!(upgrade_status(&s, "/ws", &[("Origin", "null")]), 403);
    assert_eq!(s.metric("corecast_handshakes_failed_total") - before, 2.0);
    let mut c = connect_with(&s.ws_url("/ws?user=o"), &[("origin", "https://admin.example.com")]);
    assert_eq!(c.call(json!({"op":"ping","id":1})), json!({"ev":"pong","id":1}));
    // The match is case-insensitive (docs/auth.md), both ways.
    assert_eq!(upgrade_status(&s, "/ws?user=q", &[("Origin", "HTTPS://APP.EXAMPLE.COM")]), 101);
    assert_eq!(upgrade_status(&s, "/ws?user=q", &[("Origin", "https://App.Example.Com")]), 101);
    assert_eq!(upgrade_status(&s, "/ws?user=q", &[("Origin", "HTTPS://EVIL.EXAMPLE.COM")]), 403);
    // Not a browser: no Origin header at all is allowed.
    let mut c = Client::connect(&s.ws_url("/ws?user=p"));
    assert_eq!(c.call(json!({"op":"ping","id":1})), json!({"ev":"pong","id":1}));
}

#[test]
fn origin_check_and_auth_together() {
    let s = start_server(&["--jwt-secret", SECRET, "--allowed-origins", "https://app.example.com"]);
    let path = format!("/ws?token={}", token_for("h"));
    assert_eq!(upgrade_status(&s, &path, &[("Origin", "https://evil.example.com")]), 403);
    assert_eq!(upgrade_status(&s, "/ws", &[("Origin", "https://app.example.com")]), 401);
    let mut c = connect_with(&s.ws_url(&path), &[("origin", "https://app.example.com")]);
    assert_eq!(c.call(json!({"op":"ping"})), json!({"ev":"pong"}));
}

/// `--help` shows which variable sets a secret, never its value: a help
/// screen ends up in terminals, CI logs and bug reports.
#[test]
fn help_never_prints_a_secret_from_the_environment() {
    let secrets = [
        ("CORECAST_JWT_SECRET", "jwt-secret-sentinel-1"),
        ("CORECAST_API_KEY", "api-key-sentinel-2"),
        ("CORECAST_REDIS", "redis://:redis-pass-sentinel-3@127.0.0.1:1"),
        ("CORECAST_WEBHOOK_SECRET", "webhook-secret-sentinel-4"),
        ("CORECAST_WEBHOOK_URL", "http://127.0.0.1:1/hook?token=webhook-url-sentinel-5"),
    ];
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_corecast"));
    cmd.arg("--help");
    for (k, v) in secrets {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("corecast --help runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "--help exits 0");
    for flag in ["--jwt-secret", "--api-key", "--redis", "--webhook-secret", "--webhook-url"] {
        assert!(text.contains(flag), "--help lists {flag}");
    }
    for (k, v) in secrets {
        assert!(text.contains(k), "--help names {k}");
        let token = v.split(['/', ':', '@', '=']).find(|t| t.contains("sentinel")).unwrap();
        assert!(!text.contains(token), "--help printed the value of {k}");
    }
}
