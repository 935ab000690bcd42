//! Auth and access (PROTOCOL.md §2): who a WebSocket client is and what it may
//! do. Used by the upgrade (`http::upgrade`) and by the ops (`conn::ops`).
//!
//! - **JWT at the handshake.** With `--jwt-secret` (HS256) or
//!   `--jwt-public-key` (RS256 or ES256, told apart from the PEM) every upgrade
//!   needs a token, from `Authorization: Bearer` or `?token=`. It is checked
//!   once, here (`Verifier::verify`); its `sub` is the user id and its optional
//!   `rooms` claim limits `subscribe` and `publish`.
//! - **What a connection keeps.** A `Grant` — the token's expiry and its room
//!   patterns — boxed behind one pointer-sized field of `Conn`, so a server
//!   without auth pays eight bytes per connection and nothing else. Identical
//!   `rooms` claims share one `Rc` per shard (`intern`).
//! - **Expiry.** A connection whose token expires gets `error` `token_expired`
//!   and is closed with 1008, unless it sent `refresh` with a fresh token in
//!   time. Checked on every incoming op, and by a per-shard sweeper that wakes
//!   once a second and pops the due entries of a heap of (expiry, conn id):
//!   no timer per connection. Entries are deleted lazily — a refreshed or
//!   closed connection's old entry is skipped when it comes up.
//! - **Origin allowlist** (`--allowed-origins`): an upgrade whose `Origin` is
//!   present and not listed gets 403; a request without `Origin` (not a
//!   browser) is let through.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::fmt;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::conn::Conn;
use crate::protocol::{ErrorCode, event, is_valid_name};
use crate::shard::{ConnId, Shard};
use crate::ws::CloseCode;

/// How often each shard's sweeper looks for expired tokens.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The expiry heap is compacted (dead entries dropped) when it grows past
/// this, and then past twice its size after the last compaction.
const COMPACT_MIN_ENTRIES: usize = 1024;

/// The DER of the P-256 curve OID (1.2.840.10045.3.1.7), the curve of ES256.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Checks tokens against the configured key. Built once at start-up, shared
/// read-only by every shard.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    alg: Algorithm,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        write!(f, "Verifier({:?})", self.alg)
    }
}

/// The claims corecast reads; others are ignored.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// A token that passed: the user, its expiry (Unix seconds) and its room
/// patterns (`None`: any room).
#[derive(Debug, PartialEq)]
pub struct Verified {
    pub user: String,
    pub exp: u64,
    pub rooms: Option<Vec<String>>,
}

impl Verifier {
    /// HS256 with a shared secret (`--jwt-secret`).
    pub fn hs256(secret: &[u8]) -> Verifier {
        Verifier::new(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// RS256 or ES256 (P-256) from a public key PEM (`--jwt-public-key`); the
    /// algorithm follows from the key.
    pub fn from_pem(pem: &[u8]) -> anyhow::Result<Verifier> {
        let text = std::str::from_utf8(pem).context("the key file is not a PEM text file")?;
        if !text.contains("-----BEGIN PUBLIC KEY-----") && !text.contains("-----BEGIN RSA PUBLIC KEY-----") {
            bail!("expected a public key PEM (BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY), not a private key");
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Verifier::new(key, Algorithm::RS256));
        }
        let key = DecodingKey::from_ec_pem(pem).context("neither an RSA nor an EC public key")?;
        if !pem_der(text).is_some_and(|der| der.windows(P256_OID.len()).any(|w| w == P256_OID)) {
            bail!("EC keys must be on the P-256 curve (ES256)");
        }
        Ok(Verifier::new(key, Algorithm::ES256))
    }

    fn new(key: DecodingKey, alg: Algorithm) -> Verifier {
        let mut validation = Validation::new(alg);
        // Expiry is exact: a token is valid before `exp`, not at or after it
        // (RFC 7519 §4.1.4), with no leeway: keep the clocks in sync.
        validation.leeway = 0;
        validation.reject_tokens_expiring_in_less_than = 1;
        validation.validate_nbf = true;
        // No audience is configured, so `aud` is not checked.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Verifier { key, validation, alg }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Checks signature, algorithm, `exp`, `nbf`, `sub` and `rooms`. The error
    /// says why, for the 401 body.
    pub fn verify(&self, token: &str) -> Result<Verified, &'static str> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => "token expired\n",
            ErrorKind::ImmatureSignature => "token not yet valid (nbf)\n",
            ErrorKind::InvalidSignature => "bad token signature\n",
            ErrorKind::InvalidAlgorithm => "token signed with another algorithm\n",
            _ => "malformed token\n",
        })?;
        let c = data.claims;
        if !is_valid_name(&c.sub) {
            return Err("bad sub: user ids are 1-128 bytes of A-Z a-z 0-9 _ - . : @ /\n");
        }
        if let Some(rooms) = &c.rooms
            && !rooms.iter().all(|p| is_valid_pattern(p))
        {
            return Err("bad rooms claim: room names, or a prefix followed by *\n");
        }
        Ok(Verified { user: c.sub, exp: c.exp, rooms: c.rooms })
    }
}

/// The DER inside a PEM text (all of its base64 lines).
fn pem_der(text: &str) -> Option<Vec<u8>> {
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).map(str::trim).collect();
    B64.decode(b64).ok()
}

/// A room pattern: a room name, or a (possibly empty) prefix followed by `*`.
fn is_valid_pattern(p: &str) -> bool {
    match p.strip_suffix('*') {
        Some("") => true,
        Some(prefix) => is_valid_name(prefix),
        None => is_valid_name(p),
    }
}

/// The token of an upgrade request: `Authorization: Bearer` first, then `?token=`.
pub fn token_of(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned());
    bearer.or_else(|| form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == "token").map(|(_, v)| v.into()))
}

/// Is this upgrade's `Origin` acceptable? Without an allowlist, or without an
/// `Origin` header (not a browser), yes; otherwise it must be listed.
pub fn origin_allowed(allowed: Option<&[String]>, headers: &HeaderMap) -> bool {
    let (Some(allowed), Some(origin)) = (allowed, headers.get("origin")) else { return true };
    let origin = origin.to_str().unwrap_or("").trim().trim_end_matches('/');
    allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
}

/// Parses `--allowed-origins`: comma-separated origins, e.g.
/// `https://app.example.com,https://admin.example.com`. Empty means any.
pub fn parse_origins(list: &str) -> Option<Box<[String]>> {
    let v: Vec<String> =
        list.split(',').map(|o| o.trim().trim_end_matches('/').to_owned()).filter(|o| !o.is_empty()).collect();
    (!v.is_empty()).then(|| v.into_boxed_slice())
}

// ---- what a connection keeps ---------------------------------------------------

/// Room patterns as in the `rooms` claim, shared by the shard's connections
/// whose tokens carry the same list.
pub type Rooms = Rc<[Box<str>]>;

/// What an authenticated connection keeps of its token (boxed in `Conn`).
#[derive(Debug)]
pub struct Grant {
    /// Unix seconds; the token is valid before this.
    exp: u64,
    /// `None`: the token had no `rooms` claim, any room is allowed.
    rooms: Option<Rooms>,
}

impl Grant {
    /// The grant of a verified token, its room list shared through this
    /// shard's intern table.
    pub fn new(v: &Verified) -> Grant {
        Grant { exp: v.exp, rooms: v.rooms.as_deref().map(intern) }
    }

    /// May this connection subscribe and publish to `room`?
    pub fn allows(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|ps| ps.iter().any(|p| matches(p, room)))
    }
}

/// Does `room` match `pattern` (exact, or prefix when it ends with `*`)?
fn matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

thread_local! {
    /// This shard's distinct `rooms` lists. An entry only the table still
    /// holds is dropped when the table has doubled since the last pruning.
    static INTERNED: RefCell<(HashSet<Rooms>, usize)> = RefCell::default();
    /// This shard's (expiry, conn id) heap and whether its sweeper runs.
    static EXPIRIES: RefCell<Expiries> = RefCell::default();
}

fn intern(rooms: &[String]) -> Rooms {
    INTERNED.with(|t| {
        let (set, prune_at) = &mut *t.borrow_mut();
        let key: Rooms = rooms.iter().map(|r| Box::from(r.as_str())).collect();
        if let Some(shared) = set.get(&key) {
            return shared.clone();
        }
        if set.len() >= *prune_at {
            set.retain(|r| Rc::strong_count(r) > 1);
            *prune_at = (set.len() * 2).max(64);
        }
        set.insert(key.clone());
        key
    })
}

#[derive(Default)]
struct Expiries {
    heap: BinaryHeap<Reverse<(u64, ConnId)>>,
    sweeper: bool,
    compact_at: usize,
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Gives an upgraded connection its grant and schedules its expiry check.
pub fn attach(shard: &Rc<Shard>, conn: &Rc<Conn>, grant: Grant) {
    track(shard, conn.id, grant.exp);
    conn.grant.set(Some(Box::new(grant)));
}

fn track(shard: &Rc<Shard>, id: ConnId, exp: u64) {
    EXPIRIES.with(|e| {
        let mut e = e.borrow_mut();
        e.heap.push(Reverse((exp, id)));
        if !e.sweeper {
            // Started by the shard's first authenticated connection: without
            // auth there is no sweeper at all.
            e.sweeper = true;
            e.compact_at = COMPACT_MIN_ENTRIES;
            monoio::spawn(run_sweeper(shard.clone()));
        }
    })
}

/// Runs `f` on the connection's grant (`None`: auth is off).
fn with_grant<R>(conn: &Conn, f: impl FnOnce(Option<&Grant>) -> R) -> R {
    let g = conn.grant.take();
    let r = f(g.as_deref());
    conn.grant.set(g);
    r
}

/// May `conn` subscribe and publish to `room`? Always, with auth off.
pub fn allows(conn: &Conn, room: &str) -> bool {
    with_grant(conn, |g| g.is_none_or(|g| g.allows(room)))
}

/// Checked before each op: if the token has expired, sends `token_expired`,
/// closes with 1008 and returns true. Reads the clock only with auth on.
pub fn check_expiry(shard: &Shard, conn: &Rc<Conn>) -> bool {
    let due = with_grant(conn, |g| g.is_some_and(|g| now_secs() >= g.exp));
    if due {
        expire(shard, conn);
    }
    due
}

/// The token is over: `token_expired`, then close with 1008. Once the close
/// is queued, further calls queue nothing.
fn expire(shard: &Shard, conn: &Rc<Conn>) {
    if conn.push(shard, event::error(ErrorCode::TokenExpired, "the token has expired; reconnect with a new one", None))
    {
        shard.m().client_errors_total.inc();
        tracing::debug!(shard = shard.id, conn = conn.id, "token expired: closing");
    }
    conn.close(shard, CloseCode::POLICY);
}

/// The sweeper: once a second, expires the connections whose tokens are due.
async fn run_sweeper(shard: Rc<Shard>) {
    loop {
        monoio::time::sleep(SWEEP_EVERY).await;
        sweep(&shard, now_secs());
    }
}

fn sweep(shard: &Rc<Shard>, now: u64) {
    // Current iff the connection is still there with that very expiry; the
    // entries of refreshed or closed connections are skipped (lazy deletion).
    let current = |id: ConnId, exp: u64| shard.conn(id).filter(|c| with_grant(c, |g| g.is_some_and(|g| g.exp == exp)));
    let due: Vec<(u64, ConnId)> = EXPIRIES.with(|e| {
        let mut e = e.borrow_mut();
        let mut due = Vec::new();
        while let Some(&Reverse((exp, id))) = e.heap.peek()
            && exp <= now
        {
            e.heap.pop();
            due.push((exp, id));
        }
        if e.heap.len() > e.compact_at {
            e.heap.retain(|Reverse((exp, id))| current(*id, *exp).is_some());
            e.compact_at = (e.heap.len() * 2).max(COMPACT_MIN_ENTRIES);
        }
        due
    });
    for (exp, id) in due {
        if let Some(c) = current(id, exp) {
            expire(shard, &c);
        }
    }
}

/// The `refresh` op: a fresh token for the same user replaces the grant
/// (expiry and rooms). Subscriptions the new `rooms` claim no longer allows
/// are left, each with an `unsubscribed` event (no `id`).
pub fn refresh(shard: &Rc<Shard>, conn: &Rc<Conn>, me: &str, token: &str, id: Option<&str>) -> Result<(), ErrorCode> {
    let Some(verifier) = shard.cfg.auth.as_deref() else {
        return Err(ErrorCode::BadRequest);
    };
    let v = verifier.verify(token).map_err(|_| ErrorCode::Forbidden)?;
    if v.user != me {
        return Err(ErrorCode::Forbidden);
    }
    let grant = Grant::new(&v);
    let mut dropped = Vec::new();
    for room in conn.take_rooms() {
        if grant.allows(&room) {
            conn.add_room(room);
        } else {
            dropped.push(room);
        }
    }
    attach(shard, conn, grant);
    for room in dropped {
        // Already off the connection's list; this leaves the room table.
        shard.unsubscribe(conn, &room);
        conn.push(shard, event::membership("unsubscribed", &room, None));
    }
    conn.push(shard, event::refreshed(v.exp, id));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn verifies_hs256_and_names_each_failure() {
        let v = Verifier::hs256(b"s3cret");
        let exp = now_secs() + 60;
        let ok = v.verify(&token(b"s3cret", serde_json::json!({"sub":"alice","exp":exp,"rooms":["a","b:*"]})));
        assert_eq!(ok, Ok(Verified { user: "alice".into(), exp, rooms: Some(vec!["a".into(), "b:*".into()]) }));
        assert_eq!(v.verify(&token(b"other", serde_json::json!({"sub":"a","exp":exp}))), Err("bad token signature\n"));
        let past = now_secs() - 1;
        assert_eq!(v.verify(&token(b"s3cret", serde_json::json!({"sub":"a","exp":past}))), Err("token expired\n"));
        assert_eq!(v.verify(&token(b"s3cret", serde_json::json!({"sub":"a"}))), Err("malformed token\n"));
        assert_eq!(v.verify(&token(b"s3cret", serde_json::json!({"exp":exp}))), Err("malformed token\n"));
        assert!(v.verify(&token(b"s3cret", serde_json::json!({"sub":"a b","exp":exp}))).is_err());
        assert!(v.verify(&token(b"s3cret", serde_json::json!({"sub":"a","exp":exp,"rooms":["x y"]}))).is_err());
        assert!(v.verify(&token(b"s3cret", serde_json::json!({"sub":"a","exp":exp,"rooms":"a"}))).is_err());
        assert_eq!(v.verify("not.a.jwt"), Err("malformed token\n"));
    }

    #[test]
    fn room_patterns_match_exactly_or_by_prefix() {
        let g = Grant { exp: 0, rooms: Some(intern(&["lobby".into(), "team:42:*".into()])) };
        assert!(g.allows("lobby"));
        assert!(!g.allows("lobby2"));
        assert!(g.allows("team:42:chat"));
        assert!(g.allows("team:42:"));
        assert!(!g.allows("team:43:chat"));
        assert!(Grant { exp: 0, rooms: Some(intern(&["*".into()])) }.allows("anything"));
        assert!(Grant { exp: 0, rooms: None }.allows("anything"));
        assert!(!Grant { exp: 0, rooms: Some(intern(&[])) }.allows("lobby"));
        assert!(is_valid_pattern("a*") && is_valid_pattern("*") && !is_valid_pattern("a*b") && !is_valid_pattern(""));
    }

    #[test]
    fn auth_off_costs_a_connection_one_pointer() {
        assert_eq!(std::mem::size_of::<std::cell::Cell<Option<Box<Grant>>>>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn identical_room_lists_share_one_allocation() {
        let a = intern(&["x".into(), "y:*".into()]);
        let b = intern(&["x".into(), "y:*".into()]);
        assert!(Rc::ptr_eq(&a, &b));
    }

    #[test]
    fn tokens_come_from_bearer_then_query() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h, Some("user=x&token=q%2Bq")).as_deref(), Some("q+q"));
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(token_of(&h, Some("token=q")).as_deref(), Some("abc"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(token_of(&h, None), None);
    }

    #[test]
    fn origins_are_matched_exactly_and_absent_is_allowed() {
        let list = parse_origins("https://app.example.com, https://b.example.com/").unwrap();
        let mut h = HeaderMap::new();
        assert!(origin_allowed(Some(&list), &h));
        h.insert("origin", "https://b.example.com".parse().unwrap());
        assert!(origin_allowed(Some(&list), &h));
        h.insert("origin", "https://evil.example.com".parse().unwrap());
        assert!(!origin_allowed(Some(&list), &h));
        assert!(origin_allowed(None, &h));
        h.insert("origin", "null".parse().unwrap());
        assert!(!origin_allowed(Some(&list), &h));
        assert_eq!(parse_origins(" , "), None);
    }
}
