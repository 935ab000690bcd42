//! Auth and access (PROTOCOL.md §2): who a WebSocket client is and what it may
//! do. Stateless leaves: `verify` (tokens, origins; used by `config` and the
//! upgrade) and `grant` (what a connection keeps). The per-shard expiry
//! sweep and the `refresh` op act on connections, so they live above, in
//! `services::expiry`.
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
//! - **More checks and key sources (§13).** `--jwt-audience` and
//!   `--jwt-issuer` go into every `Validation`; `--jwt-jwks-url` takes the
//!   keys from a JWKS by `kid`, fetched off the shards (`jwks`). The claims
//!   `subs` (rooms joined at connect) and `dm` (may `send`) are kept in the
//!   `Grant`, and so are the rooms granted by subscription tokens (`room`
//!   claim), each with its expiry. `sub` `server` is refused: it is the
//!   `from` of server-side publishes.
//! - **Origin allowlist** (`--allowed-origins`): an upgrade whose `Origin` is
//!   present and not listed gets 403; a request without `Origin` (not a
//!   browser) is let through.

pub mod grant;
pub mod jwks;
pub mod verify;

pub use grant::Grant;
pub use verify::{Rules, SERVER_USER, Verified, Verifier, origin_allowed, parse_origins, token_of};
