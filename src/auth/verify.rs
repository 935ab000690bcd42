//! Token and origin checks: stateless, built once at start-up and shared
//! read-only by every shard.

use std::fmt;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::protocol::is_valid_name;

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
