//! Token and origin checks: stateless, built once at start-up and shared
//! read-only by every shard.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::jwks::Jwks;
use crate::metrics::Metrics;
use crate::protocol::is_valid_name;

/// The DER of the P-256 curve OID (1.2.840.10045.3.1.7), the curve of ES256.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Checks tokens against the configured key (or key set). Built once at
/// start-up, shared read-only by every shard.
pub struct Verifier {
    keys: Keys,
}

enum Keys {
    /// `--jwt-secret` or `--jwt-public-key`: one key, one algorithm.
    Static { key: DecodingKey, validation: Box<Validation>, alg: Algorithm },
    /// `--jwt-jwks-url`: keys by `kid`, refreshed by the node's `jwks` thread.
    Jwks(Arc<Jwks>),
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        match &self.keys {
            Keys::Static { alg, .. } => write!(f, "Verifier({alg:?})"),
            Keys::Jwks(j) => write!(f, "Verifier({j:?})"),
        }
    }
}

/// What every token must also satisfy (`--jwt-audience`, `--jwt-issuer`,
/// PROTOCOL.md §13).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

/// The user id of server-side publishes (§4, §13): no client may take it.
pub const SERVER_USER: &str = "server";

/// The claims corecast reads; others are ignored.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    /// §13: rooms the connection is subscribed to at connect.
    #[serde(default)]
    subs: Option<Vec<String>>,
    /// §13: `false` refuses the connection's `send`.
    #[serde(default)]
    dm: Option<bool>,
    /// §13: the room of a subscription token (never in a connection token).
    #[serde(default)]
    room: Option<String>,
}

/// A token that passed: the user, its expiry (Unix seconds), its room
/// patterns (`None`: any room), its `subs` rooms and `dm`.
#[derive(Debug, PartialEq)]
pub struct Verified {
    pub user: String,
    pub exp: u64,
    pub rooms: Option<Vec<String>>,
    pub subs: Vec<String>,
    pub dm: bool,
}

impl Verifier {
    /// HS256 with a shared secret (`--jwt-secret`).
    pub fn hs256(secret: &[u8], rules: &Rules) -> Verifier {
        Verifier::fixed(DecodingKey::from_secret(secret), Algorithm::HS256, rules)
    }

    /// RS256 or ES256 (P-256) from a public key PEM (`--jwt-public-key`); the
    /// algorithm follows from the key.
    pub fn from_pem(pem: &[u8], rules: &Rules) -> anyhow::Result<Verifier> {
        let text = std::str::from_utf8(pem).context("the key file is not a PEM text file")?;
        if !text.contains("-----BEGIN PUBLIC KEY-----") && !text.contains("-----BEGIN RSA PUBLIC KEY-----") {
            bail!("expected a public key PEM (BEGIN PUBLIC KEY or BEGIN RSA PUBLIC KEY), not a private key");
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Verifier::fixed(key, Algorithm::RS256, rules));
        }
        let key = DecodingKey::from_ec_pem(pem).context("neither an RSA nor an EC public key")?;
        if !pem_der(text).is_some_and(|der| der.windows(P256_OID.len()).any(|w| w == P256_OID)) {
            bail!("EC keys must be on the P-256 curve (ES256)");
        }
        Ok(Verifier::fixed(key, Algorithm::ES256, rules))
    }

    /// Keys from a JWKS (`--jwt-jwks-url`); nothing is fetched until the
    /// node starts its `jwks` thread (`start_fetcher`).
    pub fn jwks(url: &str, refresh: Duration, ca: Option<&Path>, rules: &Rules) -> anyhow::Result<Verifier> {
        let jwks = Jwks::new(url, refresh, ca, validation(Algorithm::RS256, rules))?;
        Ok(Verifier { keys: Keys::Jwks(Arc::new(jwks)) })
    }

    fn fixed(key: DecodingKey, alg: Algorithm, rules: &Rules) -> Verifier {
        Verifier { keys: Keys::Static { key, validation: Box::new(validation(alg, rules)), alg } }
    }

    /// Starts the JWKS fetcher thread, if keys come from a JWKS.
    pub fn start_fetcher(&self, metrics: &Arc<Metrics>) -> anyhow::Result<()> {
        match &self.keys {
            Keys::Jwks(j) => j.start(metrics),
            Keys::Static { .. } => Ok(()),
        }
    }

    /// Can tokens be checked yet? False until the first JWKS fetch succeeded.
    pub fn ready(&self) -> bool {
        match &self.keys {
            Keys::Jwks(j) => j.ready(),
            Keys::Static { .. } => true,
        }
    }

    /// The algorithm of a single configured key (`None` with a JWKS).
    pub fn algorithm(&self) -> Option<Algorithm> {
        match &self.keys {
            Keys::Static { alg, .. } => Some(*alg),
            Keys::Jwks(_) => None,
        }
    }

    /// Signature (the key chosen by `kid` with a JWKS), algorithm, `exp`,
    /// `nbf`, `aud`, `iss`, then the claims' shapes. The error says why.
    fn claims(&self, token: &str) -> Result<Claims, &'static str> {
        let data = match &self.keys {
            Keys::Static { key, validation, .. } => jsonwebtoken::decode::<Claims>(token, key, validation),
            Keys::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token\n")?;
                let Some(kid) = header.kid else { return Err("the token has no kid (keys come from a JWKS)\n") };
                let set = jwks.keys();
                let Some(k) = set.keys.get(&kid) else {
                    // Refused now; the fetcher looks again (at most every 10 s).
                    jwks.unknown_kid();
                    return Err("unknown kid\n");
                };
                jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation)
            }
        };
        let c = data
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => "token expired\n",
                ErrorKind::ImmatureSignature => "token not yet valid (nbf)\n",
                ErrorKind::InvalidSignature => "bad token signature\n",
                ErrorKind::InvalidAlgorithm => "token signed with another algorithm\n",
                ErrorKind::InvalidAudience => "wrong audience (aud)\n",
                ErrorKind::InvalidIssuer => "wrong issuer (iss)\n",
                ErrorKind::MissingRequiredClaim(c) if c == "aud" => "missing audience (aud)\n",
                ErrorKind::MissingRequiredClaim(c) if c == "iss" => "missing issuer (iss)\n",
                _ => "malformed token\n",
            })?
            .claims;
        if !is_valid_name(&c.sub) {
            return Err("bad sub: user ids are 1-128 bytes of A-Z a-z 0-9 _ - . : @ /\n");
        }
        if c.sub == SERVER_USER {
            return Err("sub \"server\" is reserved\n");
        }
        Ok(c)
    }

    /// A connection token (the upgrade, `refresh`): checks as `claims` does,
    /// and the `rooms`, `subs` and `dm` claims. A subscription token (one
    /// with `room`) is refused: it grants one room, not a connection.
    pub fn verify(&self, token: &str) -> Result<Verified, &'static str> {
        let c = self.claims(token)?;
        if c.room.is_some() {
            return Err("a subscription token (room claim) cannot open a connection\n");
        }
        if let Some(rooms) = &c.rooms
            && !rooms.iter().all(|p| is_valid_pattern(p))
        {
            return Err("bad rooms claim: room names, or a prefix followed by *\n");
        }
        let subs = c.subs.unwrap_or_default();
        if !subs.iter().all(|r| is_valid_name(r)) {
            return Err("bad subs claim: room names\n");
        }
        Ok(Verified { user: c.sub, exp: c.exp, rooms: c.rooms, subs, dm: c.dm.unwrap_or(true) })
    }

    /// A subscription token (§13) for `room`, held by `user`'s connection:
    /// signed like connection tokens, `sub` = `user`, `room` = `room`.
    /// Returns its expiry (Unix seconds).
    pub fn verify_subscription(&self, token: &str, user: &str, room: &str) -> Result<u64, &'static str> {
        let c = self.claims(token)?;
        match c.room {
            None => Err("not a subscription token (no room claim)"),
            Some(r) if r != room => Err("the subscription token is for another room"),
            Some(_) if c.sub != user => Err("the subscription token is for another user"),
            Some(_) => Ok(c.exp),
        }
    }
}

/// The `Validation` of tokens signed with `alg`, under `rules`.
fn validation(alg: Algorithm, rules: &Rules) -> Validation {
    let mut validation = Validation::new(alg);
    // Expiry is exact: a token is valid before `exp`, not at or after it
    // (RFC 7519 §4.1.4), with no leeway: keep the clocks in sync.
    validation.leeway = 0;
    validation.reject_tokens_expiring_in_less_than = 1;
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    match &rules.audience {
        // `aud` (a string or an array) must contain it.
        Some(a) => {
            validation.set_audience(&[a]);
            required.push("aud");
        }
        // No audience is configured, so `aud` is not checked.
        None => validation.validate_aud = false,
    }
    if let Some(i) = &rules.issuer {
        validation.set_issuer(&[i]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// The DER inside a PEM text (all of its base64 lines).
fn pem_der(text: &str) -> Option<Vec<u8>> {
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).map(str::trim).collect();
    B64.decode(b64).ok()
}

/// A room pattern: a room name, or a (possibly empty) prefix followed by `*`.
pub(crate) fn is_valid_pattern(p: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::grant::now_secs;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn verifies_hs256_and_names_each_failure() {
        let v = Verifier::hs256(b"s3cret", &Rules::default());
        let exp = now_secs() + 60;
        let ok = v.verify(&token(b"s3cret", serde_json::json!({"sub":"alice","exp":exp,"rooms":["a","b:*"]})));
        let rooms = Some(vec!["a".into(), "b:*".into()]);
        assert_eq!(ok, Ok(Verified { user: "alice".into(), exp, rooms, subs: vec![], dm: true }));
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
    fn audience_issuer_server_and_subscription_tokens() {
        use serde_json::json;
        let rules = Rules { audience: Some("cc".into()), issuer: Some("https://idp".into()) };
        let v = Verifier::hs256(b"k", &rules);
        let exp = now_secs() + 60;
        let t = |c: serde_json::Value| token(b"k", c);
        assert!(v.verify(&t(json!({"sub":"a","exp":exp,"aud":"cc","iss":"https://idp"}))).is_ok());
        assert!(v.verify(&t(json!({"sub":"a","exp":exp,"aud":["x","cc"],"iss":"https://idp"}))).is_ok());
        assert_eq!(
            v.verify(&t(json!({"sub":"a","exp":exp,"aud":"x","iss":"https://idp"}))),
            Err("wrong audience (aud)\n")
        );
        assert_eq!(v.verify(&t(json!({"sub":"a","exp":exp,"iss":"https://idp"}))), Err("missing audience (aud)\n"));
        assert_eq!(v.verify(&t(json!({"sub":"a","exp":exp,"aud":"cc","iss":"other"}))), Err("wrong issuer (iss)\n"));
        assert_eq!(v.verify(&t(json!({"sub":"a","exp":exp,"aud":"cc"}))), Err("missing issuer (iss)\n"));
        let ok = |c: serde_json::Value| {
            let mut c = c;
            c["aud"] = json!("cc");
            c["iss"] = json!("https://idp");
            c["exp"] = json!(exp);
            t(c)
        };
        assert_eq!(v.verify(&ok(json!({"sub":"server"}))), Err("sub \"server\" is reserved\n"));
        let got = v.verify(&ok(json!({"sub":"a","subs":["x","y"],"dm":false}))).unwrap();
        assert_eq!((got.subs, got.dm), (vec!["x".to_string(), "y".to_string()], false));
        assert!(v.verify(&ok(json!({"sub":"a","subs":["x*"]}))).is_err());
        // A subscription token opens no connection; a connection token
        // grants no room.
        let sub = ok(json!({"sub":"a","room":"r"}));
        assert!(v.verify(&sub).is_err());
        assert_eq!(v.verify_subscription(&sub, "a", "r"), Ok(exp));
        assert!(v.verify_subscription(&sub, "b", "r").is_err());
        assert!(v.verify_subscription(&sub, "a", "s").is_err());
        assert!(v.verify_subscription(&ok(json!({"sub":"a"})), "a", "r").is_err());
        // Without rules, `aud` and `iss` are not looked at.
        let open = Verifier::hs256(b"k", &Rules::default());
        assert!(open.verify(&t(json!({"sub":"a","exp":exp,"aud":"x","iss":"y"}))).is_ok());
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
