//! Keys from a JSON Web Key Set (`--jwt-jwks-url`, PROTOCOL.md §13).
//!
//! One `jwks` thread per node fetches the set with a blocking HTTP client
//! (ureq over rustls: system roots, or `--jwt-jwks-ca`), off the shards:
//! at start (until it succeeds: `/readyz` is 503 before), every
//! `--jwt-jwks-refresh-secs`, and when a shard met a token whose `kid` it
//! does not know, at most once every `UNKNOWN_KID_EVERY`. Each fetch builds
//! every `DecodingKey` (and its `Validation`) once and publishes the new
//! `KeySet` with one atomic pointer swap (`ArcSwap`); a shard's lookup is a
//! wait-free load and a hash lookup, no lock. A shard never waits for a
//! fetch: a token with an unknown `kid` is refused at once, and the shard
//! pokes the fetcher through a one-slot channel (`try_send`, never blocks).
//! A failed fetch keeps the last good set.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tracing::{info, warn};

use crate::metrics::Metrics;

/// A token naming an unknown `kid` makes the node refetch at most this often.
pub const UNKNOWN_KID_EVERY: Duration = Duration::from_secs(10);
/// The longest wait between retries of a failing fetch (it starts at 1 s and
/// doubles; never longer than the refresh interval).
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A JWKS larger than this is refused (a key set is a few KiB).
const MAX_BODY: u64 = 1 << 20;
/// Connect + request + body, per fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// One usable key: built once per fetch, shared by every shard.
pub struct Key {
    pub key: DecodingKey,
    /// The key's algorithms (from its `alg`, else its type), with the
    /// node's `exp`/`nbf`/`aud`/`iss` rules.
    pub validation: Validation,
}

/// The keys of the last good fetch, by `kid`.
#[derive(Default)]
pub struct KeySet {
    pub keys: HashMap<String, Key>,
}

/// The JWKS state shared by the shards and the fetcher thread.
pub struct Jwks {
    url: String,
    refresh: Duration,
    /// `--jwt-jwks-ca`: the only roots trusted for https; `None`: the system's.
    ca: Option<Vec<ureq::tls::Certificate<'static>>>,
    /// The node's claim rules, copied into each key's `Validation`.
    base: Validation,
    set: ArcSwap<KeySet>,
    /// The first fetch succeeded (`/readyz`).
    ready: AtomicBool,
    wake: Sender<()>,
    wake_rx: std::sync::Mutex<Option<Receiver<()>>>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jwks({})", self.url)
    }
}

impl Jwks {
    /// Checks the URL and reads the CA file; nothing is fetched before `start`.
    pub fn new(url: &str, refresh: Duration, ca: Option<&Path>, base: Validation) -> anyhow::Result<Jwks> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--jwt-jwks-url must be an http:// or https:// URL (got {url:?})");
        }
        let ca = match ca {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| format!("--jwt-jwks-ca: read {}", path.display()))?;
                let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                        _ => None,
                    })
                    .collect();
                if certs.is_empty() {
                    bail!("--jwt-jwks-ca: no certificate in {}", path.display());
                }
                Some(certs)
            }
        };
        let (wake, wake_rx) = crossbeam_channel::bounded(1);
        Ok(Jwks {
            url: url.to_owned(),
            refresh,
            ca,
            base,
            set: ArcSwap::from_pointee(KeySet::default()),
            ready: AtomicBool::new(false),
            wake,
            wake_rx: std::sync::Mutex::new(Some(wake_rx)),
        })
    }

    /// Has a fetch ever succeeded?
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The current keys (a wait-free load; the guard keeps this set alive).
    pub fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.set.load()
    }

    /// A token named a `kid` that is not in the set: ask the fetcher for a
    /// refetch. Never blocks; pokes that find one already pending are dropped.
    pub fn unknown_kid(&self) {
        let _ = self.wake.try_send(());
    }

    /// Starts the node's `jwks` fetcher thread (once).
    pub fn start(self: &Arc<Self>, metrics: &Arc<Metrics>) -> anyhow::Result<()> {
        let Some(rx) = self.wake_rx.lock().ok().and_then(|mut r| r.take()) else { return Ok(()) };
        metrics.jwks.on.store(true, Ordering::Relaxed);
        let (me, metrics) = (self.clone(), metrics.clone());
        std::thread::Builder::new().name("jwks".into()).spawn(move || me.run(&rx, &metrics)).context("spawn jwks")?;
        Ok(())
    }

    fn agent(&self) -> ureq::Agent {
        use ureq::tls::{RootCerts, TlsConfig};
        let roots = match &self.ca {
            Some(certs) => RootCerts::Specific(Arc::new(certs.clone())),
            None => RootCerts::PlatformVerifier,
        };
        let config = ureq::Agent::config_builder()
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            .timeout_global(Some(FETCH_TIMEOUT))
            .build();
        ureq::Agent::new_with_config(config)
    }

    /// The fetcher: fetch, then wait for the refresh time or a poke about an
    /// unknown `kid` (honoured no sooner than `UNKNOWN_KID_EVERY` after the
    /// last fetch), and again.
    fn run(&self, wake: &Receiver<()>, metrics: &Metrics) {
        let agent = self.agent();
        let mut retry = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            let next = match self.fetch(&agent) {
                Ok(set) => {
                    let n = set.keys.len();
                    if !self.ready() || n != self.keys().keys.len() {
                        info!(url = %self.url, keys = n, "JWKS fetched");
                    }
                    self.set.store(Arc::new(set));
                    self.ready.store(true, Ordering::Release);
                    metrics.jwks.ok.add_shared(1);
                    metrics.jwks.keys.store(n as u64, Ordering::Relaxed);
                    retry = Duration::from_secs(1);
                    started + self.refresh
                }
                Err(e) => {
                    warn!(url = %self.url, error = %format!("{e:#}"), "JWKS fetch failed; keeping the last good keys");
                    metrics.jwks.error.add_shared(1);
                    let wait = retry.min(self.refresh);
                    retry = (retry * 2).min(RETRY_MAX);
                    started + wait
                }
            };
            // Wait for the next fetch time, or an unknown kid.
            match wake.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(()) => {
                    let earliest = (started + UNKNOWN_KID_EVERY).min(next);
                    std::thread::sleep(earliest.saturating_duration_since(Instant::now()));
                    // Pokes that came meanwhile are answered by this fetch.
                    while wake.try_recv().is_ok() {}
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn fetch(&self, agent: &ureq::Agent) -> anyhow::Result<KeySet> {
        let mut resp = agent.get(&self.url).call().context("GET")?;
        let body = resp.body_mut().with_config().limit(MAX_BODY).read_to_string().context("read the body")?;
        let (set, skipped) = parse(&body, &self.base)?;
        for (kid, why) in skipped {
            warn!(url = %self.url, kid = %kid, why, "JWKS key skipped");
        }
        // A set that verifies nothing is a failed fetch: the last good keys
        // (and the readiness they gave) stay.
        if set.keys.is_empty() {
            bail!("no usable key in the set");
        }
        Ok(set)
    }
}

/// Parses a JWKS document: every usable signing key with a `kid` (RSA, EC
/// P-256, Ed25519), and the (kid, reason) of each key left out. A document
/// that is not a key set is an error; one key that cannot be used is not.
pub fn parse(text: &str, base: &Validation) -> anyhow::Result<(KeySet, Vec<(String, &'static str)>)> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_str(text).context("not a JSON Web Key Set ({\"keys\":[...]})")?;
    let mut set = KeySet::default();
    let mut skipped = Vec::new();
    for raw in doc.keys {
        let kid = raw.get("kid").and_then(|k| k.as_str()).unwrap_or("").to_owned();
        match key_of(raw, base) {
            Ok(key) if !kid.is_empty() => {
                set.keys.insert(kid, key);
            }
            Ok(_) => skipped.push((kid, "no kid")),
            Err(why) => skipped.push((kid, why)),
        }
    }
    Ok((set, skipped))
}

/// One JWK as a verification key, or why not.
fn key_of(raw: serde_json::Value, base: &Validation) -> Result<Key, &'static str> {
    let jwk: Jwk = serde_json::from_value(raw).map_err(|_| "not a JWK this node reads")?;
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Err("not a signing key (use)");
    }
    // The algorithms a token signed with this key may name: the key's own
    // `alg` when given, else those of its type. Never the token's say-so.
    let family: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => &[Algorithm::ES256],
        AlgorithmParameters::EllipticCurve(_) => return Err("EC keys must be on P-256"),
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
        AlgorithmParameters::OctetKeyPair(_) => return Err("OKP keys must be Ed25519"),
        AlgorithmParameters::OctetKey(_) => return Err("symmetric keys are not taken from a JWKS"),
        _ => return Err("unsupported key type"),
    };
    let algorithms: Vec<Algorithm> = match jwk.common.key_algorithm {
        None => family.to_vec(),
        Some(a) => match family.iter().find(|f| key_algorithm(**f) == Some(a)) {
            Some(f) => vec![*f],
            None => return Err("alg does not fit the key type"),
        },
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| "bad key material")?;
    let mut validation = base.clone();
    validation.algorithms = algorithms;
    Ok(Key { key, validation })
}

fn key_algorithm(a: Algorithm) -> Option<KeyAlgorithm> {
    Some(match a {
        Algorithm::RS256 => KeyAlgorithm::RS256,
        Algorithm::RS384 => KeyAlgorithm::RS384,
        Algorithm::RS512 => KeyAlgorithm::RS512,
        Algorithm::PS256 => KeyAlgorithm::PS256,
        Algorithm::PS384 => KeyAlgorithm::PS384,
        Algorithm::PS512 => KeyAlgorithm::PS512,
        Algorithm::ES256 => KeyAlgorithm::ES256,
        Algorithm::EdDSA => KeyAlgorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_by_kid_and_unusable_ones_are_skipped() {
        // An Ed25519 public key (RFC 8037 A.2), an EC P-384 key, an HMAC key.
        let doc = r#"{"keys":[
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"ed"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"EC","crv":"P-384","x":"AAAA","y":"AAAA","kid":"p384"},
            {"kty":"oct","k":"c2VjcmV0","kid":"hmac"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"enc","use":"enc"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"rs","alg":"RS256"},
            {"kty":"XYZ","kid":"odd"}
        ]}"#;
        let (set, skipped) = parse(doc, &Validation::new(Algorithm::RS256)).unwrap();
        assert_eq!(set.keys.keys().collect::<Vec<_>>(), ["ed"]);
        assert_eq!(set.keys["ed"].validation.algorithms, [Algorithm::EdDSA]);
        let kids: Vec<&str> = skipped.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kids, ["", "p384", "hmac", "enc", "rs", "odd"]);
        assert!(parse("{\"nokeys\":1}", &Validation::new(Algorithm::RS256)).is_err());
        assert!(parse("[]", &Validation::new(Algorithm::RS256)).is_err());
    }
}
