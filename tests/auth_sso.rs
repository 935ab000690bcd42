//! PROTOCOL.md §13 (Auth, v1.2) over real sockets: `--jwt-audience` and
//! `--jwt-issuer`, keys from a real JWKS server in the test process (RSA, EC
//! P-256, Ed25519; rotation, the unknown-kid refetch limit, readiness before
//! the first fetch, https with a private CA), the `subs` and `dm` claims,
//! subscription tokens (grant, expiry, refresh) and the reserved `server` id.

mod common;
#[path = "common/jwks.rs"]
mod jwks;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Client, Server, start_server, start_server_unready};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use jwks::{JwksServer, TempDir, TestKey, tls_server_config};
use serde_json::{Value, json};

const SECRET: &str = "sso-secret-0123456789";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(claims: Value) -> String {
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn status(s: &Server, token: &str) -> u16 {
    common::upgrade_status(s.addr, &format!("/ws?token={token}"), "").0
}

fn connect(s: &Server, token: &str) -> Client {
    Client::connect(&s.ws_url(&format!("/ws?token={token}")))
}

#[test]
fn audience_and_issuer_must_match_when_set() {
    let s = start_server(&["--jwt-secret", SECRET, "--jwt-audience", "corecast", "--jwt-issuer", "https://idp.test/"]);
    let exp = now() + 600;
    let ok = [
        json!({"sub":"a","exp":exp,"aud":"corecast","iss":"https://idp.test/"}),
        json!({"sub":"a","exp":exp,"aud":["billing","corecast"],"iss":"https://idp.test/"}),
    ];
    for c in ok {
        assert_eq!(status(&s, &hs256(c.clone())), 101, "{c}");
    }
    let bad = [
        json!({"sub":"a","exp":exp,"iss":"https://idp.test/"}),
        json!({"sub":"a","exp":exp,"aud":"other","iss":"https://idp.test/"}),
        json!({"sub":"a","exp":exp,"aud":["x","y"],"iss":"https://idp.test/"}),
        json!({"sub":"a","exp":exp,"aud":"corecast"}),
        json!({"sub":"a","exp":exp,"aud":"corecast","iss":"https://evil.test/"}),
    ];
    for c in bad {
        assert_eq!(status(&s, &hs256(c.clone())), 401, "{c}");
    }
    // Without the flags the same claims are not looked at.
    let open = start_server(&["--jwt-secret", SECRET]);
    assert_eq!(status(&open, &hs256(json!({"sub":"a","exp":exp,"aud":"other","iss":"x"}))), 101);
}

#[test]
fn jwks_keys_of_each_type_verify_tokens_chosen_by_kid() {
    let dir = TempDir::new("jwks-types");
    let rsa = TestKey::new(&dir.0, "rsa", "k-rsa");
    let ec = TestKey::new(&dir.0, "ec", "k-ec");
    let ed = TestKey::new(&dir.0, "ed25519", "k-ed");
    let jwks = JwksServer::start(None);
    jwks.serve(&[&rsa, &ec, &ed]);
    let s = start_server(&["--jwt-jwks-url", &jwks.url(), "--jwt-audience", "cc"]);
    assert_eq!(s.metric("corecast_jwks_keys"), 3.0);
    assert!(s.metric("corecast_jwks_fetches_total{result=\"ok\"}") >= 1.0);
    let claims = json!({"sub":"dave","exp":now() + 600,"aud":"cc"});
    for k in [&rsa, &ec, &ed] {
        let mut c = connect(&s, &k.sign(&claims));
        c.subscribe("r");
        let m = c.call(json!({"op":"publish","room":"r","data":k.kid}));
        assert_eq!(m, json!({"ev":"message","room":"r","from":"dave","data":k.kid}));
        // The audience rule holds for JWKS keys too.
        assert_eq!(status(&s, &k.sign(&json!({"sub":"dave","exp":now() + 600}))), 401, "{} without aud", k.kid);
    }
    // The key is the one its kid names: the right signature under another
    // key's kid, an unknown kid or no kid at all is refused.
    assert_eq!(status(&s, &rsa.sign_as(&claims, Some("k-ec"))), 401);
    assert_eq!(status(&s, &ec.sign_as(&claims, Some("k-other"))), 401);
    assert_eq!(status(&s, &ed.sign_as(&claims, None)), 401);
    // A shared-secret token under a JWKS kid (algorithm confusion) too.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k-rsa".into());
    let forged = encode(&h, &claims, &EncodingKey::from_secret(rsa.jwk["n"].as_str().unwrap().as_bytes())).unwrap();
    assert_eq!(status(&s, &forged), 401);
}

#[test]
fn readyz_is_503_until_the_first_jwks_fetch_succeeds() {
    let dir = TempDir::new("jwks-ready");
    let key = TestKey::new(&dir.0, "ec", "k1");
    let jwks = JwksServer::start(None); // answers 500 for now
    // Retries back off 1 s, 2 s, 4 s ..., never past the refresh interval:
    // 2 s here, so that a slow test still sees the recovery soon.
    let s = start_server_unready(&["--jwt-jwks-url", &jwks.url(), "--jwt-jwks-refresh-secs", "2"], |_| {});
    s.wait_until("a failed fetch", || jwks.hits() >= 1);
    s.wait_until("the failure counted", || s.metric("corecast_jwks_fetches_total{result=\"error\"}") >= 1.0);
    let (code, body) = s.http_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("JWKS"), "{body}");
    let token = key.sign(&json!({"sub":"u","exp":now() + 600}));
    assert_eq!(status(&s, &token), 503, "no token can be checked yet");
    assert_eq!(s.metric("corecast_handshakes_total{result=\"not_ready\"}"), 1.0);
    // A set with no usable key (a shared secret only) is no better: once
    // every fetch the server answered is counted, none counted as ok.
    jwks.set(200, json!({"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"hmac"}]}).to_string());
    let hits = jwks.hits();
    s.wait_until("the HMAC-only set fetched", || jwks.hits() > hits);
    let answered = jwks.hits() as f64;
    let counted = || {
        s.metric("corecast_jwks_fetches_total{result=\"ok\"}")
            + s.metric("corecast_jwks_fetches_total{result=\"error\"}")
    };
    s.wait_until("every answered fetch counted", || counted() >= answered);
    assert_eq!(s.http_get("/readyz").0, 503);
    assert_eq!(s.metric("corecast_jwks_fetches_total{result=\"ok\"}"), 0.0);
    // The server comes good: the next retry finds it.
    jwks.serve(&[&key]);
    let t0 = Instant::now();
    s.wait_until("/readyz 200", || s.http_get("/readyz").0 == 200);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(status(&s, &token), 101);
    // Later failures keep the keys and the readiness.
    jwks.set(500, "down".into());
    let errors = s.metric("corecast_jwks_fetches_total{result=\"error\"}");
    assert_eq!(status(&s, &key.sign_as(&json!({"sub":"u","exp":now() + 600}), Some("k9"))), 401);
    s.wait_until("a refetch that failed", || s.metric("corecast_jwks_fetches_total{result=\"error\"}") > errors);
    assert_eq!(s.http_get("/readyz").0, 200);
    assert_eq!(status(&s, &token), 101);
}

/// A rotated key works without a restart, through the unknown-kid refetch
/// (the periodic one is 300 s away); a flood of unknown kids refetches at
/// most once every 10 s (requests counted at the JWKS server).
#[test]
fn rotated_key_works_within_10s_and_unknown_kids_refetch_at_most_every_10s() {
    let dir = TempDir::new("jwks-rotate");
    let old = TestKey::new(&dir.0, "rsa", "2026-a");
    let new = TestKey::new(&dir.0, "ed25519", "2026-b");
    let jwks = JwksServer::start(None);
    jwks.serve(&[&old]);
    let s = start_server(&["--jwt-jwks-url", &jwks.url(), "--jwt-jwks-refresh-secs", "300"]);
    let claims = json!({"sub":"rot","exp":now() + 600});
    assert_eq!(status(&s, &old.sign(&claims)), 101);
    assert_eq!(jwks.hits(), 1);
    jwks.serve(&[&new]);
    let t0 = Instant::now();
    let mut tries = 0;
    while status(&s, &new.sign(&claims)) != 101 {
        tries += 1;
        assert!(t0.elapsed() < Duration::from_secs(13), "the new kid still refused after {:?}", t0.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t0.elapsed();
    assert!(tries > 0, "refused at first: the set was not refetched yet");
    assert_eq!(jwks.hits(), 2, "one refetch for {tries} refused tokens");
    // The old key left the set with the rotation.
    assert_eq!(status(&s, &old.sign(&claims)), 401);
    // A flood of unknown kids: 12 s of them, 20 a second.
    let before = jwks.hits();
    let flood = Instant::now();
    while flood.elapsed() < Duration::from_secs(12) {
        assert_eq!(status(&s, &new.sign_as(&claims, Some("nope"))), 401);
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = jwks.hits() - before;
    assert!(during <= 2, "{during} fetches in 12 s of unknown kids");
    assert!(during >= 1, "the unknown kid never made the node look again");
    assert_eq!(status(&s, &new.sign(&claims)), 101);
    eprintln!("rotation took {took:?} ({tries} refused); {during} refetches in the 12 s flood");
}

#[test]
fn jwks_refreshes_every_refresh_secs() {
    let dir = TempDir::new("jwks-refresh");
    let key = TestKey::new(&dir.0, "ec", "k");
    let jwks = JwksServer::start(None);
    jwks.serve(&[&key]);
    let s = start_server(&["--jwt-jwks-url", &jwks.url(), "--jwt-jwks-refresh-secs", "1"]);
    let h0 = jwks.hits();
    std::thread::sleep(Duration::from_millis(3_500));
    let got = jwks.hits() - h0;
    assert!((2..=5).contains(&got), "{got} fetches in 3.5 s at one a second");
    assert!(s.metric("corecast_jwks_fetches_total{result=\"ok\"}") >= 3.0);
}

#[test]
fn jwks_over_https_with_a_private_ca() {
    let dir = TempDir::new("jwks-tls");
    let (ca, tls) = tls_server_config(&dir.0);
    let key = TestKey::new(&dir.0, "ed25519", "tls-k");
    let jwks = JwksServer::start(Some(tls));
    jwks.serve(&[&key]);
    assert!(jwks.url().starts_with("https://"));
    let s = start_server(&["--jwt-jwks-url", &jwks.url(), "--jwt-jwks-ca", ca.to_str().unwrap()]);
    let mut c = connect(&s, &key.sign(&json!({"sub":"tls","exp":now() + 600})));
    assert_eq!(c.call(json!({"op":"ping","id":1})), json!({"ev":"pong","id":1}));
    // With the system roots, the private CA is not trusted: never ready.
    let untrusted = start_server_unready(&["--jwt-jwks-url", &jwks.url()], |_| {});
    untrusted.wait_until("a failed https fetch", || {
        untrusted.metric("corecast_jwks_fetches_total{result=\"error\"}") >= 1.0
    });
    assert_eq!(untrusted.http_get("/readyz").0, 503);
    assert_eq!(untrusted.metric("corecast_jwks_fetches_total{result=\"ok\"}"), 0.0);
}

#[test]
fn subs_claim_subscribes_at_connect_and_receives_publishes() {
    let s = start_server(&["--jwt-secret", SECRET, "--max-rooms-per-connection", "2"]);
    let t = hs256(json!({"sub":"sub1","exp":now() + 600,"rooms":["lobby"],"subs":["news","alerts"]}));
    let mut c = connect(&s, &t);
    assert_eq!(c.recv(), json!({"ev":"subscribed","room":"news"}));
    assert_eq!(c.recv(), json!({"ev":"subscribed","room":"alerts"}));
    let mut p = connect(&s, &hs256(json!({"sub":"editor","exp":now() + 600})));
    p.send_json(&json!({"op":"publish","room":"news","data":"extra"}));
    assert_eq!(c.recv(), json!({"ev":"message","room":"news","from":"editor","data":"extra"}));
    // `subs` rooms may be left and joined again, not published to (not in `rooms`).
    assert_eq!(
        c.call(json!({"op":"unsubscribe","room":"news","id":1})),
        json!({"ev":"unsubscribed","room":"news","id":1})
    );
    assert_eq!(c.call(json!({"op":"subscribe","room":"news","id":2})), json!({"ev":"subscribed","room":"news","id":2}));
    let r = c.call(json!({"op":"publish","room":"news","data":1,"id":3}));
    assert_eq!((r["code"].as_str(), r["id"].as_i64()), (Some("forbidden"), Some(3)), "{r}");
    // The per-connection room limit holds for `subs` as for `subscribe`.
    let t = hs256(json!({"sub":"sub2","exp":now() + 600,"subs":["a","b","c"]}));
    let mut c = connect(&s, &t);
    assert_eq!(c.recv(), json!({"ev":"subscribed","room":"a"}));
    assert_eq!(c.recv(), json!({"ev":"subscribed","room":"b"}));
    let e = c.recv();
    assert_eq!((e["ev"].as_str(), e["code"].as_str()), (Some("error"), Some("too_large")), "{e}");
    assert!(e.get("id").is_none() && e["message"].as_str().unwrap().contains('c'), "{e}");
    c.expect_silence(Duration::from_millis(200));
    // A bad `subs` claim is a bad token.
    assert_eq!(status(&s, &hs256(json!({"sub":"x","exp":now() + 600,"subs":["bad room"]}))), 401);
}

/// `subs` over Redis: the join at connect subscribes the node on Redis like
/// a client's `subscribe`, so a publish made on another node arrives, and
/// the `subscribed` comes only once this node is subscribed there.
#[test]
fn subs_claim_over_redis_receives_a_publish_from_another_node() {
    let redis = common::redis::RedisServer::start();
    let a = start_server(&["--jwt-secret", SECRET, "--redis", &redis.url()]);
    let b = start_server(&["--jwt-secret", SECRET, "--redis", &redis.url()]);
    let mut c = connect(&a, &hs256(json!({"sub":"r1","exp":now() + 600,"rooms":[],"subs":["wire"]})));
    assert_eq!(c.recv(), json!({"ev":"subscribed","room":"wire"}));
    let mut p = connect(&b, &hs256(json!({"sub":"r2","exp":now() + 600})));
    p.send_json(&json!({"op":"publish","room":"wire","data":"across","id":1}));
    assert_eq!(p.recv(), json!({"ev":"ack","id":1}));
    assert_eq!(c.recv(), json!({"ev":"message","room":"wire","from":"r2","data":"across"}));
}

/// `subs` in a history room: the subscribe at connect is the client's
/// subscribe (`Services::subscribe`), position included.
#[test]
fn subs_claim_in_a_history_room_gets_its_position() {
    let s = start_server(&["--jwt-secret", SECRET, "--history-size", "10"]);
    let mut c = connect(&s, &hs256(json!({"sub":"h","exp":now() + 600,"subs":["feed"]})));
    let sub = c.recv();
    assert_eq!((sub["ev"].as_str(), sub["room"].as_str()), (Some("subscribed"), Some("feed")), "{sub}");
    assert!(sub.get("epoch").is_some() && sub.get("offset").is_some() && sub.get("id").is_none(), "{sub}");
}

#[test]
fn dm_false_makes_send_forbidden() {
    let s = start_server(&["--jwt-secret", SECRET]);
    let mut quiet = connect(&s, &hs256(json!({"sub":"quiet","exp":now() + 600,"dm":false})));
    let mut talker = connect(&s, &hs256(json!({"sub":"talker","exp":now() + 600,"dm":true})));
    let r = quiet.call(json!({"op":"send","user":"talker","data":"hi","id":"d1"}));
    assert_eq!(
        (r["ev"].as_str(), r["code"].as_str(), r["id"].as_str()),
        (Some("error"), Some("forbidden"), Some("d1"))
    );
    talker.expect_silence(Duration::from_millis(200));
    // It still receives direct messages, and may publish.
    talker.send_json(&json!({"op":"send","user":"quiet","data":"yo"}));
    assert_eq!(quiet.recv(), json!({"ev":"direct","from":"talker","data":"yo"}));
    assert_eq!(quiet.call(json!({"op":"publish","room":"r","data":1,"id":2})), json!({"ev":"ack","id":2}));
}

#[test]
fn subscription_token_grants_a_room_expires_and_refresh_keeps_it() {
    let s = start_server(&["--jwt-secret", SECRET]);
    let conn_token = hs256(json!({"sub":"viewer","exp":now() + 600,"rooms":["lobby"]}));
    let mut c = connect(&s, &conn_token);
    let mut p = connect(&s, &hs256(json!({"sub":"host","exp":now() + 600})));
    let sub_token = |user: &str, room: &str, exp: u64| hs256(json!({"sub":user,"room":room,"exp":exp}));
    let forbidden = |r: &Value, id: &str| {
        assert_eq!(
            (r["ev"].as_str(), r["code"].as_str(), r["id"].as_str()),
            (Some("error"), Some("forbidden"), Some(id)),
            "{r}"
        )
    };
    // Without a token the `rooms` claim decides; bad tokens grant nothing.
    forbidden(&c.call(json!({"op":"subscribe","room":"vip","id":"a"})), "a");
    let t = sub_token("someone-else", "vip", now() + 60);
    forbidden(&c.call(json!({"op":"subscribe","room":"vip","token":t,"id":"b"})), "b");
    let t = sub_token("viewer", "other", now() + 60);
    forbidden(&c.call(json!({"op":"subscribe","room":"vip","token":t,"id":"c"})), "c");
    let t = sub_token("viewer", "vip", now() - 1);
    forbidden(&c.call(json!({"op":"subscribe","room":"vip","token":t,"id":"d"})), "d");
    forbidden(&c.call(json!({"op":"subscribe","room":"vip","token":conn_token,"id":"e"})), "e");
    let wrong_key = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub":"viewer","room":"vip","exp":now() + 60}),
        &EncodingKey::from_secret(b"nope"),
    )
    .unwrap();
    forbidden(&c.call(json!({"op":"subscribe","room":"vip","token":wrong_key,"id":"f"})), "f");
    // A subscription token opens no connection.
    assert_eq!(status(&s, &sub_token("viewer", "vip", now() + 60)), 401);

    // A good one, short: granted, then taken away at its expiry.
    let exp = now() + 2;
    let t = sub_token("viewer", "vip", exp);
    assert_eq!(
        c.call(json!({"op":"subscribe","room":"vip","token":t,"id":1})),
        json!({"ev":"subscribed","room":"vip","id":1})
    );
    p.send_json(&json!({"op":"publish","room":"vip","data":"in"}));
    assert_eq!(c.recv(), json!({"ev":"message","room":"vip","from":"host","data":"in"}));
    // Granted to subscribe, not to publish (`rooms` decides that).
    forbidden(&c.call(json!({"op":"publish","room":"vip","data":0,"id":"g"})), "g");
    let gone = c.recv_json(Duration::from_secs(6)).expect("unsubscribed at the token's expiry");
    assert_eq!(gone, json!({"ev":"unsubscribed","room":"vip","reason":"token_expired"}));
    assert!(now() >= exp);
    p.send_json(&json!({"op":"publish","room":"vip","data":"after"}));
    c.expect_silence(Duration::from_millis(300));
    assert_eq!(c.call(json!({"op":"ping","id":"alive"})), json!({"ev":"pong","id":"alive"}));
    forbidden(&c.call(json!({"op":"subscribe","room":"vip","id":"h"})), "h");

    // Refreshed in time: kept past the first expiry.
    let exp = now() + 3;
    let t = sub_token("viewer", "stage", exp);
    assert_eq!(c.call(json!({"op":"subscribe","room":"stage","token":t,"id":2}))["ev"], "subscribed");
    // Not for another room's token, nor a room held without one.
    forbidden(
        &c.call(json!({"op":"refresh","room":"stage","token":sub_token("viewer", "vip", now() + 60),"id":"i"})),
        "i",
    );
    let r = c.call(json!({"op":"refresh","room":"lobby","token":sub_token("viewer", "lobby", now() + 60),"id":"j"}));
    assert_eq!((r["code"].as_str(), r["id"].as_str()), (Some("bad_request"), Some("j")), "{r}");
    let exp2 = now() + 60;
    let r = c.call(json!({"op":"refresh","room":"stage","token":sub_token("viewer", "stage", exp2),"id":3}));
    assert_eq!(r, json!({"ev":"refreshed","room":"stage","exp":exp2,"id":3}));
    let past = UNIX_EPOCH + Duration::from_secs(exp + 1) + Duration::from_millis(500);
    c.expect_silence(past.duration_since(SystemTime::now()).unwrap_or_default());
    p.send_json(&json!({"op":"publish","room":"stage","data":"still"}));
    assert_eq!(c.recv(), json!({"ev":"message","room":"stage","from":"host","data":"still"}));
    // A connection `refresh` keeps the room token's grant.
    let fresh = hs256(json!({"sub":"viewer","exp":now() + 600,"rooms":["lobby"]}));
    assert_eq!(c.call(json!({"op":"refresh","token":fresh,"id":4}))["ev"], "refreshed");
    p.send_json(&json!({"op":"publish","room":"stage","data":"kept"}));
    assert_eq!(c.recv(), json!({"ev":"message","room":"stage","from":"host","data":"kept"}));
}

/// A subscription token is no connection token: neither at the upgrade
/// (tested above) nor as a connection `refresh` (it would widen the
/// connection to whatever its missing `rooms` claim allows).
#[test]
fn a_subscription_token_cannot_refresh_the_connection() {
    let s = start_server(&["--jwt-secret", SECRET]);
    let mut c = connect(&s, &hs256(json!({"sub":"w","exp":now() + 600,"rooms":["lobby"]})));
    let t = hs256(json!({"sub":"w","room":"vip","exp":now() + 600}));
    let r = c.call(json!({"op":"refresh","token":t,"id":1}));
    assert_eq!((r["code"].as_str(), r["id"].as_i64()), (Some("forbidden"), Some(1)), "{r}");
    let r = c.call(json!({"op":"subscribe","room":"other","id":2}));
    assert_eq!(r["code"], "forbidden", "the rooms claim still holds: {r}");
}

#[test]
fn subscription_tokens_need_auth() {
    let s = start_server(&[]);
    let mut c = Client::connect(&s.ws_url("/ws?user=u"));
    let r = c.call(json!({"op":"subscribe","room":"r","token":"a.b.c","id":1}));
    assert_eq!((r["code"].as_str(), r["id"].as_i64()), (Some("bad_request"), Some(1)), "{r}");
}

#[test]
fn server_is_reserved_both_ways() {
    let open = start_server(&[]);
    let (code, body) = common::upgrade_status(open.addr, "/ws?user=server", "");
    assert_eq!(code, 400, "{body}");
    assert_eq!(common::upgrade_status(open.addr, "/ws?user=servers", "").0, 101);
    let s = start_server(&["--jwt-secret", SECRET]);
    assert_eq!(status(&s, &hs256(json!({"sub":"server","exp":now() + 600}))), 401);
    assert_eq!(status(&s, &hs256(json!({"sub":"server2","exp":now() + 600}))), 101);
}
