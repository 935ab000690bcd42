//! The one `Config`: every option from the command line, the environment
//! (`CORECAST_` + the option in upper snake case) and an optional TOML file
//! (`--config FILE`, keys in snake case), in that order of precedence, then the
//! default. `Options` is what each source may say; `Config` is the resolved,
//! frozen result that every shard reads (it crosses threads inside an `Arc`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;

mod namespace;

pub use namespace::{ClientPublish, Namespace, NamespaceOptions, Namespaces};

/// Bytes an event adds around the data it carries: the WebSocket header
/// (at most 10), `{"ev":"message","room":R,"from":U,"data":`, `"epoch"`
/// (at most 64 bytes) and `"offset"`, with room and user names of at most
/// 128 bytes. The largest event frame the node sends is
/// `--max-message-bytes` plus this, and it must fit `--outbound-queue-bytes`.
pub const ENVELOPE_BYTES: usize = 512;

/// The longest history TTL accepted (a year): far below what would make
/// Redis refuse the script's `EXPIRE` after it assigned an offset.
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// What one source (flags + environment, or the TOML file) may set. Every field
/// is optional so that sources can be layered; defaults live in `Config`.
#[derive(Parser, Deserialize, Debug, Default)]
#[command(name = "corecast", version, about = "Shard-per-core WebSocket fan-out server")]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// TOML file with any of these options (keys in snake_case).
    #[arg(long, env = "CORECAST_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// HTTP/WebSocket listener; every shard binds it with SO_REUSEPORT.
    /// [default: 0.0.0.0:8080]
    #[arg(long, env = "CORECAST_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Separate listener for `/metrics` and `POST /api/publish` (also
    /// `/healthz`, `/readyz`); with it set, the client listener answers 404
    /// for those two. Bind it to a private address. [default: none]
    #[arg(long, env = "CORECAST_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Shard threads, each pinned to one core. [default: the cores this
    /// process may run on]
    #[arg(long, env = "CORECAST_SHARDS")]
    pub shards: Option<usize>,

    /// Redis backplane: `redis://[user:pass@]host:port[/db]`,
    /// `redis+sentinel://[user:pass@]h1:p1,h2:p2/MASTER[/db]`,
    /// `redis+cluster://[user:pass@]h1:p1,h2:p2`, or several
    /// `redis://…,redis://…` (channels spread by jump hash); without it the
    /// node runs standalone on the embedded local bus.
    #[arg(long, env = "CORECAST_REDIS", hide_env_values = true)]
    pub redis: Option<String>,

    /// Prefix of the Redis channels (`<prefix>room:R`, `<prefix>user:U`). [default: cc:]
    #[arg(long, env = "CORECAST_CHANNEL_PREFIX")]
    pub channel_prefix: Option<String>,

    /// Enable the `/echo` endpoint (RFC 6455 conformance testing).
    #[arg(long, env = "CORECAST_ECHO", num_args = 0..=1, default_missing_value = "true")]
    pub echo: Option<bool>,

    /// Serve the demo chat page at `GET /` (`--demo false`: `/` is 404). [default: true]
    #[arg(long, env = "CORECAST_DEMO", num_args = 0..=1, default_missing_value = "true")]
    pub demo: Option<bool>,

    /// Largest WebSocket message accepted; larger ones close with 1009. [default: 65536]
    #[arg(long, env = "CORECAST_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,

    /// Per-connection outbound queue; a client that lets it grow past this is
    /// cut off with 1008. [default: 1048576]
    #[arg(long, env = "CORECAST_OUTBOUND_QUEUE_BYTES")]
    pub outbound_queue_bytes: Option<usize>,

    /// permessage-deflate (RFC 7692): `on` accepts a client's offer (always
    /// with server_no_context_takeover), `off` declines it. [default: off]
    #[arg(long, env = "CORECAST_COMPRESSION")]
    pub compression: Option<Compression>,

    /// With compression on: messages whose payload is smaller than this go
    /// out uncompressed (RSV1 clear). [default: 256]
    #[arg(long, env = "CORECAST_COMPRESSION_MIN_BYTES")]
    pub compression_min_bytes: Option<usize>,

    /// Drain window after SIGTERM/SIGINT, in seconds. [default: 30]
    #[arg(long, env = "CORECAST_DRAIN_SECS")]
    pub drain_secs: Option<u64>,

    /// Required bearer key for `POST /api/publish` when set.
    #[arg(long, env = "CORECAST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// HS256 secret for client JWTs; setting it (or `--jwt-public-key`) turns
    /// auth on: every WebSocket upgrade needs a valid token. [default: auth off]
    #[arg(long, env = "CORECAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key (RS256 for RSA, ES256 for EC P-256) for client JWTs;
    /// setting it turns auth on. [default: auth off]
    #[arg(long, env = "CORECAST_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// URL of a JSON Web Key Set (RSA, EC P-256, Ed25519 keys, chosen by the
    /// token's `kid`); setting it turns auth on. `/readyz` is 503 until the
    /// first fetch succeeds. [default: none]
    #[arg(long, env = "CORECAST_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// Seconds between JWKS fetches (an unknown `kid` also refetches, at
    /// most every 10 s); at least 1. [default: 300]
    #[arg(long, env = "CORECAST_JWT_JWKS_REFRESH_SECS")]
    pub jwt_jwks_refresh_secs: Option<u64>,

    /// PEM file of the CA certificates trusted for an https JWKS URL,
    /// instead of the system's roots. [default: system roots]
    #[arg(long, env = "CORECAST_JWT_JWKS_CA")]
    pub jwt_jwks_ca: Option<PathBuf>,

    /// Tokens must carry this audience (`aud`, a string or an array that
    /// contains it); others get 401. [default: aud not checked]
    #[arg(long, env = "CORECAST_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Tokens must carry this issuer (`iss`); others get 401. [default: iss not checked]
    #[arg(long, env = "CORECAST_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Comma-separated exact origins (`https://app.example.com`) allowed to
    /// open WebSockets; an upgrade whose `Origin` is not listed gets 403, one
    /// without `Origin` (not a browser) is allowed. [default: any]
    #[arg(long, env = "CORECAST_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,

    /// Largest HTTP request body (`POST /api/publish`); larger gets 413. [default: 1048576]
    #[arg(long, env = "CORECAST_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,

    /// Seconds a new connection has to send its complete HTTP request head. [default: 10]
    #[arg(long, env = "CORECAST_HANDSHAKE_TIMEOUT_SECS")]
    pub handshake_timeout_secs: Option<u64>,

    /// Ping interval for idle WebSocket connections, in seconds; a client that
    /// sends nothing (no frame of any kind) for 2 intervals is closed with
    /// 1008. 0 disables heartbeats. [default: 25]
    #[arg(long, env = "CORECAST_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<u64>,

    /// How long a shard may hold a busy connection's queued frames so that
    /// they leave several to a send (fewer, larger packets: less kernel work
    /// per delivery at high per-connection rates, for added latency on busy
    /// connections only). `auto`: only while the shard is behind (its turns
    /// fill most of its time), for 2 ms; at light load every frame is written
    /// at the end of its turn. N: always, up to N ms (at most 1000). 0:
    /// never. [default: auto]
    #[arg(long, env = "CORECAST_WRITE_DELAY_MS")]
    pub write_delay_ms: Option<WriteDelayMs>,

    /// Ops per second each connection may send (token bucket, burst 2x); beyond
    /// it an op gets `rate_limited`, and a client that keeps going is closed
    /// with 1008. 0 = unlimited. [default: 100]
    #[arg(long, env = "CORECAST_MAX_OPS_PER_SEC")]
    pub max_ops_per_sec: Option<u32>,

    /// Rooms one connection may be subscribed to; beyond it `subscribe` gets
    /// `too_large`. 0 = unlimited. [default: 100]
    #[arg(long, env = "CORECAST_MAX_ROOMS_PER_CONNECTION")]
    pub max_rooms_per_connection: Option<usize>,

    /// WebSocket connections per node; beyond it the handshake gets 503.
    /// 0 = unlimited. [default: unlimited]
    #[arg(long, env = "CORECAST_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// New connections each shard accepts per second; beyond it the shard
    /// pauses accepting and the rest wait in the kernel backlog. 0 = unlimited.
    /// [default: 10000]
    #[arg(long, env = "CORECAST_MAX_ACCEPTS_PER_SEC")]
    pub max_accepts_per_sec: Option<u32>,

    /// HTTP-phase sockets (accepted, not yet upgraded) each shard holds;
    /// beyond it new connections are closed at accept. [default: 1024]
    #[arg(long, env = "CORECAST_MAX_HANDSHAKES_PER_SHARD")]
    pub max_handshakes_per_shard: Option<usize>,

    /// How long `/readyz` stays 200 while Redis is degraded (one link, one
    /// server or one cluster primary down) before it turns 503. [default: 10]
    #[arg(long, env = "CORECAST_READY_GRACE_SECS")]
    pub ready_grace_secs: Option<u64>,

    /// I/O driver: `auto` (io_uring, else epoll), `uring` or `legacy` (epoll). [default: auto]
    #[arg(long, env = "CORECAST_DRIVER")]
    pub driver: Option<Driver>,

    /// Messages kept per room for recovery and the `history` op (PROTOCOL.md
    /// §7); 0 turns history off. [default: 0]
    #[arg(long, env = "CORECAST_HISTORY_SIZE")]
    pub history_size: Option<usize>,

    /// How long a room's history outlives its last publish, in seconds. [default: 300]
    #[arg(long, env = "CORECAST_HISTORY_TTL_SECS")]
    pub history_ttl_secs: Option<u64>,

    /// Standalone history: bytes of stored messages the node keeps over all
    /// its rooms (split evenly over the shards); past it the oldest stored
    /// messages are trimmed first, whatever their room. [default: 268435456]
    #[arg(long, env = "CORECAST_HISTORY_MAX_BYTES")]
    pub history_max_bytes: Option<usize>,

    /// POST presence webhooks (PROTOCOL.md §11, docs/webhooks.md) to this
    /// `http://` or `https://` URL. [default: none, webhooks off]
    #[arg(long, env = "CORECAST_WEBHOOK_URL", hide_env_values = true)]
    pub webhook_url: Option<String>,

    /// Signs each webhook request: header `X-Corecast-Signature:
    /// t=<unix secs>,v1=<hex HMAC-SHA256 of "<t>.<body>">`. Without it the
    /// requests carry no signature header. [default: none]
    #[arg(long, env = "CORECAST_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// How long a user (a room) must have had no connection before
    /// `user_offline` (`room_vacated`) is sent, in milliseconds. [default: 3000]
    #[arg(long, env = "CORECAST_WEBHOOK_DEBOUNCE_MS")]
    pub webhook_debounce_ms: Option<u64>,

    /// Webhook events the node holds while its receiver is slow or down;
    /// past it new events are dropped and counted. [default: 10000]
    #[arg(long, env = "CORECAST_WEBHOOK_QUEUE")]
    pub webhook_queue: Option<usize>,

    /// Tests only: how long a webhook batch is retried before it is dropped,
    /// in milliseconds. [default: 360000]
    #[arg(long, env = "CORECAST_WEBHOOK_GIVE_UP_MS", hide = true)]
    pub webhook_give_up_ms: Option<u64>,

    /// Room namespaces (PROTOCOL.md §10): `[[namespace]]` tables, TOML only.
    #[arg(skip)]
    #[serde(default, rename = "namespace")]
    pub namespaces: Vec<NamespaceOptions>,

    /// Log output: `text` or `json`. [default: text]
    #[arg(long, env = "CORECAST_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Test-only: serve `GET /debug/shard` (which shard answers) and
    /// `GET /debug/stall?ms=N` (blocks the answering shard's thread for N ms,
    /// at most 10 s), so that tests can stall one shard. Never in production.
    #[arg(long, env = "CORECAST_DEBUG_HOOKS", hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub debug_hooks: Option<bool>,
    /// Benchmarks only: `false` makes the io_uring driver write one
    /// `sendmsg(2)` per connection as the epoll driver does, for A/B runs of
    /// the batched sends on one binary. [default: true]
    #[arg(long, env = "CORECAST_BATCHED_SENDS", hide = true)]
    pub batched_sends: Option<bool>,
    /// Benchmarks only: `true` makes every shard with members of a room
    /// hold its own Redis subscription, as before one subscription per
    /// node (`services::relay`), for A/B runs. [default: false]
    #[arg(long, env = "CORECAST_PER_SHARD_SUBSCRIPTIONS", hide = true)]
    pub per_shard_subscriptions: Option<bool>,
}

/// `--compression`: permessage-deflate accepted or declined.
#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Off,
    On,
}

#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Auto,
    Uring,
    Legacy,
}

#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `--write-delay-ms` as given: `auto` or a number of milliseconds (TOML:
/// `write_delay_ms = "auto"` or `write_delay_ms = 2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteDelayMs {
    Auto,
    Ms(u64),
}

impl std::str::FromStr for WriteDelayMs {
    type Err = String;
    fn from_str(s: &str) -> Result<WriteDelayMs, String> {
        match s.trim() {
            a if a.eq_ignore_ascii_case("auto") => Ok(WriteDelayMs::Auto),
            n => n.parse().map(WriteDelayMs::Ms).map_err(|_| format!("`auto` or milliseconds (0: off), not `{s}`")),
        }
    }
}

impl<'de> Deserialize<'de> for WriteDelayMs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<WriteDelayMs, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Ms(u64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Ms(n) => Ok(WriteDelayMs::Ms(n)),
            Raw::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// How the flusher holds busy connections (`conn::flush`), from
/// `--write-delay-ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteDelay {
    /// `0`: every dirty connection is written at the end of its turn.
    Off,
    /// `N`: a connection written less than this ago is always held.
    Fixed(Duration),
    /// `auto` (the default): held for `conn::flush::AUTO_DELAY` only while
    /// the shard is behind.
    Auto,
}

/// History settings, from `--history-size` and `--history-ttl-secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    pub size: usize,
    pub ttl: Duration,
}

/// The longest `--webhook-debounce-ms` accepted (an hour).
pub const MAX_WEBHOOK_DEBOUNCE_MS: u64 = 3_600_000;

/// The largest `--webhook-queue` accepted: the queue is allocated whole at
/// start (a few tens of bytes per slot), so a typo must not take gigabytes.
pub const MAX_WEBHOOK_QUEUE: usize = 1_000_000;

/// How long a webhook batch is retried before it is dropped (PROTOCOL.md
/// §11 asks for at least 5 minutes).
pub const WEBHOOK_GIVE_UP: Duration = Duration::from_secs(6 * 60);

/// Webhook settings (`webhook::Webhooks::start`); `url: None`: webhooks off.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// `--webhook-url`, checked to be `http://` or `https://` with a host.
    pub url: Option<Box<str>>,
    /// `--webhook-secret`; `None` (or empty): requests are not signed.
    pub secret: Option<Box<str>>,
    /// `--webhook-debounce-ms`: how long an offline or vacated transition
    /// must last before it is sent (read by the presence service).
    pub debounce: Duration,
    /// `--webhook-queue`: events held at most, at least 1.
    pub queue: usize,
    /// How long one batch is retried before it is dropped: `WEBHOOK_GIVE_UP`
    /// (tests shorten it, also with the hidden `--webhook-give-up-ms`).
    #[doc(hidden)]
    pub give_up_after: Duration,
}

impl WebhookConfig {
    /// Webhooks to `url` with every other setting at its default.
    pub fn new(url: &str) -> WebhookConfig {
        WebhookConfig { url: Some(url.into()), ..WebhookConfig::default() }
    }
}

impl Default for WebhookConfig {
    fn default() -> WebhookConfig {
        WebhookConfig {
            url: None,
            secret: None,
            debounce: Duration::from_millis(3000),
            queue: 10_000,
            give_up_after: WEBHOOK_GIVE_UP,
        }
    }
}

/// Never prints the secret.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("debounce", &self.debounce)
            .field("queue", &self.queue)
            .field("give_up_after", &self.give_up_after)
            .finish()
    }
}

/// Is `url` something the webhook client can POST to: `http://` or
/// `https://` (any case) with a host? Says what is wrong, without echoing
/// the URL (it may carry a token).
fn check_webhook_url(url: &str) -> Result<(), &'static str> {
    let uri: http::Uri = url.parse().map_err(|_| "is not a valid URL")?;
    match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://"),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => Ok(()),
        _ => Err("has no host"),
    }
}

/// The resolved configuration, frozen at start-up and shared read-only.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `--admin-listen`: where `/metrics` and `/api/publish` are served
    /// instead of `listen` (`http::serve`).
    pub admin_listen: Option<SocketAddr>,
    /// Cores the shards are pinned to, one per shard, in shard order.
    pub cores: Vec<usize>,
    pub redis: Option<String>,
    pub channel_prefix: String,
    pub echo: bool,
    /// Serve the demo page at `GET /` (`http/demo.html`).
    pub demo: bool,
    pub max_message_bytes: usize,
    pub outbound_queue_bytes: usize,
    /// `--compression on`: permessage-deflate is negotiated (`ws::deflate`).
    pub compression: bool,
    /// Smallest payload sent compressed.
    pub compression_min_bytes: usize,
    pub drain: Duration,
    pub api_key: Option<String>,
    /// Checks client JWTs; `None`: auth is off (`auth::verify`).
    pub auth: Option<Arc<crate::auth::Verifier>>,
    /// `None`: any origin.
    pub allowed_origins: Option<Box<[String]>>,
    pub max_body_bytes: usize,
    pub handshake_timeout: Duration,
    /// Heartbeat interval; `Duration::ZERO` = off (`shard::heartbeat`).
    pub heartbeat: Duration,
    /// Whether and how long the flusher holds busy connections' frames
    /// (`conn::flush`).
    pub write_delay: WriteDelay,
    /// Per-connection op rate (burst twice that); 0 = unlimited (`conn::limits`).
    pub max_ops_per_sec: u32,
    /// 0 = unlimited.
    pub max_rooms_per_connection: usize,
    /// Per node; `usize::MAX` = unlimited.
    pub max_connections: usize,
    /// Per shard; 0 = unlimited (`accept`).
    pub max_accepts_per_sec: u32,
    /// Per shard, at least 1 (`accept`).
    pub max_handshakes_per_shard: usize,
    /// `/readyz` tolerates a Redis degradation this long (`bus::redis::health`).
    pub ready_grace: Duration,
    pub driver: Driver,
    pub log_format: LogFormat,
    /// `--debug-hooks` (hidden, test-only): `/debug/shard`, `/debug/stall`.
    pub debug_hooks: bool,
    /// `--batched-sends` (hidden, for benchmarks): io_uring batches the
    /// flusher's writes (io_uring driver only).
    pub batched_sends: bool,
    /// `--per-shard-subscriptions` (hidden, for benchmarks): no relay, every
    /// shard subscribes for its own members.
    pub per_shard_subscriptions: bool,
    /// Room history (§7) of the rooms no namespace matches; `None`: off.
    pub history: Option<HistorySettings>,
    /// Per-prefix room options (§10); `namespaces.history(room)` says
    /// whether and how a room keeps history.
    pub namespaces: Namespaces,
    /// `--history-max-bytes`: the node's budget for standalone history.
    pub history_max_bytes: usize,
    /// `--webhook-*` (PROTOCOL.md §11): where and how presence events are
    /// posted, and the debounce of offline / vacated.
    pub webhook: WebhookConfig,
}

impl Options {
    /// Layers `other` (a lower-precedence source) under `self`.
    fn or(self, other: Options) -> Options {
        macro_rules! layer {
            ($($f:ident),*) => {
                Options {
                    config: self.config,
                    // Tables come from the file only.
                    namespaces: if self.namespaces.is_empty() { other.namespaces } else { self.namespaces },
                    $($f: self.$f.or(other.$f)),*
                }
            };
        }
        layer!(
            listen,
            admin_listen,
            shards,
            redis,
            channel_prefix,
            echo,
            demo,
            max_message_bytes,
            outbound_queue_bytes,
            compression,
            compression_min_bytes,
            drain_secs,
            api_key,
            jwt_secret,
            jwt_public_key,
            jwt_jwks_url,
            jwt_jwks_refresh_secs,
            jwt_jwks_ca,
            jwt_audience,
            jwt_issuer,
            allowed_origins,
            max_body_bytes,
            handshake_timeout_secs,
            heartbeat_secs,
            write_delay_ms,
            max_ops_per_sec,
            max_rooms_per_connection,
            max_connections,
            max_accepts_per_sec,
            max_handshakes_per_shard,
            ready_grace_secs,
            driver,
            log_format,
            debug_hooks,
            batched_sends,
            per_shard_subscriptions,
            history_size,
            history_ttl_secs,
            history_max_bytes,
            webhook_url,
            webhook_secret,
            webhook_debounce_ms,
            webhook_queue,
            webhook_give_up_ms
        )
    }
}

impl Config {
    /// Flags and environment (`args`), then the TOML file they name, then defaults.
    pub fn load<I, T>(args: I) -> anyhow::Result<Config>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Options::try_parse_from(args).unwrap_or_else(|e| e.exit());
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("config: read {}", path.display()))?;
                toml::from_str::<Options>(&text).with_context(|| format!("config: parse {}", path.display()))?
            }
            None => Options::default(),
        };
        Config::resolve(cli.or(file))
    }

    fn resolve(o: Options) -> anyhow::Result<Config> {
        let webhook = Config::webhook(&o)?;
        let allowed: Vec<usize> =
            core_affinity::get_core_ids().map(|ids| ids.into_iter().map(|c| c.id).collect()).unwrap_or_default();
        let available = allowed.len().max(1);
        let shards = o.shards.unwrap_or(available);
        if shards == 0 || shards > 1024 {
            bail!("--shards must be between 1 and 1024 (got {shards})");
        }
        // Shard i is pinned to the i-th allowed core; with more shards than
        // cores they wrap around (useful for tests, not for production).
        let cores = (0..shards).map(|i| allowed.get(i % available).copied().unwrap_or(i)).collect();
        let max_message_bytes = o.max_message_bytes.unwrap_or(64 * 1024);
        if max_message_bytes < 125 {
            bail!("--max-message-bytes must be at least 125");
        }
        let channel_prefix = o.channel_prefix.unwrap_or_else(|| "cc:".into());
        // A brace would move `{<prefix>room:R}` (the history keys' hash tag)
        // off the channel's cluster slot: every history script CROSSSLOT.
        if channel_prefix.contains(['{', '}']) {
            bail!("--channel-prefix must not contain '{{' or '}}' (got {channel_prefix:?})");
        }
        // Client auth (PROTOCOL.md §2, §13): one key source, and the claim rules.
        let rules = crate::auth::Rules {
            audience: o.jwt_audience.filter(|s| !s.is_empty()),
            issuer: o.jwt_issuer.filter(|s| !s.is_empty()),
        };
        let jwks_url = o.jwt_jwks_url.filter(|s| !s.is_empty());
        let sources = [o.jwt_secret.as_deref().is_some_and(|s| !s.is_empty()), o.jwt_public_key.is_some()];
        if sources.into_iter().chain([jwks_url.is_some()]).filter(|&on| on).count() > 1 {
            bail!("set one of --jwt-secret, --jwt-public-key and --jwt-jwks-url");
        }
        let refresh_secs = o.jwt_jwks_refresh_secs.unwrap_or(300);
        if refresh_secs == 0 {
            bail!("--jwt-jwks-refresh-secs must be at least 1");
        }
        if jwks_url.is_none() && o.jwt_jwks_ca.is_some() {
            bail!("--jwt-jwks-ca needs --jwt-jwks-url");
        }
        let auth = match (o.jwt_secret.filter(|s| !s.is_empty()), &o.jwt_public_key, jwks_url) {
            (Some(secret), _, _) => Some(Arc::new(crate::auth::Verifier::hs256(secret.as_bytes(), &rules))),
            (None, Some(path), _) => {
                let pem = std::fs::read(path).with_context(|| format!("--jwt-public-key: read {}", path.display()))?;
                let v = crate::auth::Verifier::from_pem(&pem, &rules)
                    .with_context(|| format!("--jwt-public-key: {}", path.display()))?;
                Some(Arc::new(v))
            }
            (None, None, Some(url)) => {
                let refresh = Duration::from_secs(refresh_secs);
                Some(Arc::new(crate::auth::Verifier::jwks(&url, refresh, o.jwt_jwks_ca.as_deref(), &rules)?))
            }
            (None, None, None) if rules.audience.is_some() || rules.issuer.is_some() => {
                bail!("--jwt-audience and --jwt-issuer need a key: --jwt-secret, --jwt-public-key or --jwt-jwks-url")
            }
            (None, None, None) => None,
        };
        let ttl_secs = o.history_ttl_secs.unwrap_or(300);
        if ttl_secs > MAX_TTL_SECS {
            bail!("--history-ttl-secs must be at most {MAX_TTL_SECS} (a year; got {ttl_secs})");
        }
        let max_handshakes_per_shard = o.max_handshakes_per_shard.unwrap_or(1024);
        if max_handshakes_per_shard == 0 {
            bail!("--max-handshakes-per-shard must be at least 1");
        }
        let history = match o.history_size.unwrap_or(0) {
            0 => None,
            size => {
                if ttl_secs == 0 {
                    bail!("--history-ttl-secs must be at least 1");
                }
                Some(HistorySettings { size, ttl: Duration::from_secs(ttl_secs) })
            }
        };
        let namespaces = Namespaces::resolve(history, ttl_secs, &o.namespaces)?;
        // Limits that agree: the largest message a client may send, once
        // wrapped in its event, must fit a subscriber's outbound queue, or
        // every subscriber would be cut off by it.
        let outbound_queue_bytes = o.outbound_queue_bytes.unwrap_or(1 << 20);
        if max_message_bytes + ENVELOPE_BYTES > outbound_queue_bytes {
            bail!(
                "--outbound-queue-bytes ({outbound_queue_bytes}) cannot hold the largest message: \
                 --max-message-bytes ({max_message_bytes}) + {ENVELOPE_BYTES} bytes of event envelope; \
                 raise --outbound-queue-bytes or lower --max-message-bytes"
            );
        }
        Ok(Config {
            listen: o.listen.unwrap_or_else(|| "0.0.0.0:8080".parse().expect("valid literal")),
            admin_listen: o.admin_listen,
            cores,
            redis: o.redis.filter(|s| !s.is_empty()),
            channel_prefix,
            echo: o.echo.unwrap_or(false),
            demo: o.demo.unwrap_or(true),
            max_message_bytes,
            outbound_queue_bytes,
            compression: o.compression == Some(Compression::On),
            compression_min_bytes: o.compression_min_bytes.unwrap_or(256),
            drain: Duration::from_secs(o.drain_secs.unwrap_or(30)),
            api_key: o.api_key.filter(|s| !s.is_empty()),
            auth,
            allowed_origins: o.allowed_origins.as_deref().and_then(crate::auth::parse_origins),
            max_body_bytes: o.max_body_bytes.unwrap_or(1 << 20),
            handshake_timeout: Duration::from_secs(o.handshake_timeout_secs.unwrap_or(10).max(1)),
            heartbeat: Duration::from_secs(o.heartbeat_secs.unwrap_or(25)),
            write_delay: match o.write_delay_ms.unwrap_or(WriteDelayMs::Auto) {
                WriteDelayMs::Auto => WriteDelay::Auto,
                WriteDelayMs::Ms(0) => WriteDelay::Off,
                // A second at most: it is a batching window, not a queue.
                WriteDelayMs::Ms(n) => WriteDelay::Fixed(Duration::from_millis(n.min(1000))),
            },
            max_ops_per_sec: o.max_ops_per_sec.unwrap_or(100),
            max_rooms_per_connection: o.max_rooms_per_connection.unwrap_or(100),
            max_connections: o.max_connections.filter(|&n| n > 0).unwrap_or(usize::MAX),
            max_accepts_per_sec: o.max_accepts_per_sec.unwrap_or(10_000),
            max_handshakes_per_shard,
            ready_grace: Duration::from_secs(o.ready_grace_secs.unwrap_or(10)),
            driver: o.driver.unwrap_or(Driver::Auto),
            log_format: o.log_format.unwrap_or(LogFormat::Text),
            debug_hooks: o.debug_hooks.unwrap_or(false),
            batched_sends: o.batched_sends.unwrap_or(true),
            per_shard_subscriptions: o.per_shard_subscriptions.unwrap_or(false),
            history,
            namespaces,
            history_max_bytes: o.history_max_bytes.unwrap_or(256 << 20),
            webhook,
        })
    }

    /// `--webhook-*`, checked.
    fn webhook(o: &Options) -> anyhow::Result<WebhookConfig> {
        let d = WebhookConfig::default();
        let url = o.webhook_url.as_deref().map(str::trim).filter(|u| !u.is_empty());
        if let Some(u) = url
            && let Err(why) = check_webhook_url(u)
        {
            bail!("--webhook-url {why}");
        }
        let debounce_ms = o.webhook_debounce_ms.unwrap_or(d.debounce.as_millis() as u64);
        if debounce_ms > MAX_WEBHOOK_DEBOUNCE_MS {
            bail!("--webhook-debounce-ms must be at most {MAX_WEBHOOK_DEBOUNCE_MS} (an hour; got {debounce_ms})");
        }
        let queue = o.webhook_queue.unwrap_or(d.queue);
        if queue == 0 || queue > MAX_WEBHOOK_QUEUE {
            bail!("--webhook-queue must be between 1 and {MAX_WEBHOOK_QUEUE} (got {queue})");
        }
        let give_up_after = o.webhook_give_up_ms.map_or(d.give_up_after, Duration::from_millis);
        Ok(WebhookConfig {
            url: url.map(Into::into),
            secret: o.webhook_secret.as_deref().filter(|s| !s.is_empty()).map(Into::into),
            debounce: Duration::from_millis(debounce_ms),
            queue,
            give_up_after,
        })
    }

    /// Can an event carrying `data_len` bytes of data reach a subscriber?
    /// (`POST /api/publish` answers 413 if not.)
    pub fn deliverable(&self, data_len: usize) -> bool {
        data_len + ENVELOPE_BYTES <= self.outbound_queue_bytes
    }

    pub fn shards(&self) -> usize {
        self.cores.len()
    }

    /// A config for in-process unit tests.
    #[cfg(test)]
    pub fn for_tests() -> Config {
        Config::resolve(Options { shards: Some(1), ..Options::default() }).expect("defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Config::load` reads `CORECAST_*` from the environment (clap's `env`),
    /// so a variable a developer exported would change what these tests see.
    /// Every test here calls this first: it removes them, once per process.
    fn clean_env() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let ours: Vec<std::ffi::OsString> =
                std::env::vars_os().map(|(k, _)| k).filter(|k| k.to_string_lossy().starts_with("CORECAST_")).collect();
            for k in ours {
                // SAFETY: only when such a variable is set at all (never under
                // scripts/test.sh); no test of this crate writes the
                // environment, and this runs once, before the first load.
                unsafe { std::env::remove_var(&k) };
            }
        });
    }

    /// A temporary directory of this test's own, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("cc-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        /// Writes `name` with `text`; returns its path.
        fn file(&self, name: &str, text: &str) -> String {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            p.to_str().unwrap().to_string()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn flag_beats_file_and_file_beats_default() {
        clean_env();
        let dir = TempDir::new("cfg");
        let file = dir.file("c.toml", "drain_secs = 7\nlisten = \"127.0.0.1:9999\"\necho = true\n");
        let cfg = Config::load(["corecast", "--config", &file, "--listen", "127.0.0.1:1234"]).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:1234".parse().unwrap());
        assert_eq!(cfg.drain, Duration::from_secs(7));
        assert!(cfg.echo);
        assert_eq!(cfg.max_message_bytes, 65536);
        assert_eq!(cfg.channel_prefix, "cc:");
        assert!(cfg.demo, "the demo page is on by default");
        assert!(!Config::load(["corecast", "--demo", "false"]).unwrap().demo);
        assert!(Config::load(["corecast", "--demo"]).unwrap().demo);
    }

    #[test]
    fn history_is_off_by_default_and_reads_flag_env_and_file() {
        clean_env();
        assert_eq!(Config::load(["corecast"]).unwrap().history, None);
        let cfg = Config::load(["corecast", "--history-size", "50"]).unwrap();
        assert_eq!(cfg.history, Some(HistorySettings { size: 50, ttl: Duration::from_secs(300) }));
        let dir = TempDir::new("cfg3");
        let file = dir.file("c.toml", "history_size = 7\nhistory_ttl_secs = 9\n");
        let cfg = Config::load(["corecast", "--config", &file]).unwrap();
        assert_eq!(cfg.history, Some(HistorySettings { size: 7, ttl: Duration::from_secs(9) }));
        assert!(Config::load(["corecast", "--history-size", "1", "--history-ttl-secs", "0"]).is_err());
    }

    #[test]
    fn compression_is_off_by_default_and_reads_flag_and_file() {
        clean_env();
        let cfg = Config::load(["corecast"]).unwrap();
        assert!(!cfg.compression);
        assert_eq!(cfg.compression_min_bytes, 256);
        let cfg = Config::load(["corecast", "--compression", "on", "--compression-min-bytes", "64"]).unwrap();
        assert!(cfg.compression);
        assert_eq!(cfg.compression_min_bytes, 64);
        let dir = TempDir::new("cfg4");
        let file = dir.file("c.toml", "compression = \"on\"\n");
        assert!(Config::load(["corecast", "--config", &file]).unwrap().compression);
        let cfg = Config::load(["corecast", "--config", &file, "--compression", "off"]).unwrap();
        assert!(!cfg.compression, "the flag beats the file");
    }

    #[test]
    fn limits_that_cannot_deliver_the_largest_message_are_refused() {
        let err = Config::load(["corecast", "--max-message-bytes", "1048576"]).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("--outbound-queue-bytes") && text.contains("--max-message-bytes"), "{text}");
        assert!(
            Config::load(["corecast", "--max-message-bytes", "1048576", "--outbound-queue-bytes", "2097152"]).is_ok()
        );
        let cfg = Config::load(["corecast"]).unwrap();
        assert!(cfg.deliverable((1 << 20) - ENVELOPE_BYTES) && !cfg.deliverable((1 << 20) - ENVELOPE_BYTES + 1));
    }

    #[test]
    fn a_prefix_with_braces_and_a_ttl_past_a_year_are_refused() {
        assert!(Config::load(["corecast", "--channel-prefix", "{x}:"]).is_err());
        assert!(Config::load(["corecast", "--history-size", "5", "--history-ttl-secs", "99999999999"]).is_err());
        assert!(Config::load(["corecast", "--history-size", "5", "--history-ttl-secs", "31536000"]).is_ok());
    }

    #[test]
    fn namespaces_come_from_the_file() {
        let dir = std::env::temp_dir().join(format!("cc-cfg5-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[[namespace]]\nprefix = \"chat:\"\nhistory_size = 20\n").unwrap();
        let cfg = Config::load(["corecast", "--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(cfg.history, None);
        assert_eq!(cfg.namespaces.history("chat:a").map(|h| h.size), Some(20));
        assert_eq!(cfg.namespaces.history("lobby"), None);
        std::fs::write(&file, "[[namespace]]\nprefix = \"chat:\"\nhistory_sise = 20\n").unwrap();
        let err = Config::load(["corecast", "--config", file.to_str().unwrap()]).unwrap_err();
        assert!(format!("{err:#}").contains("history_sise"), "{err:#}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn webhook_flags_defaults_and_checks() {
        clean_env();
        let cfg = Config::load(["corecast"]).unwrap();
        assert_eq!(cfg.webhook, WebhookConfig::default());
        assert_eq!(cfg.webhook.url, None);
        assert_eq!(cfg.webhook.debounce, Duration::from_millis(3000));
        assert_eq!(cfg.webhook.queue, 10_000);
        assert_eq!(cfg.webhook.give_up_after, Duration::from_secs(360));
        let cfg = Config::load([
            "corecast",
            "--webhook-url",
            "https://hooks.example.com/cc?k=1",
            "--webhook-secret",
            "s3cret",
            "--webhook-debounce-ms",
            "0",
            "--webhook-queue",
            "50",
        ])
        .unwrap();
        assert_eq!(cfg.webhook.url.as_deref(), Some("https://hooks.example.com/cc?k=1"));
        assert_eq!(cfg.webhook.secret.as_deref(), Some("s3cret"));
        assert_eq!(cfg.webhook.debounce, Duration::ZERO);
        assert_eq!(cfg.webhook.queue, 50);
        assert!(!format!("{cfg:?}").contains("s3cret"), "Debug never prints the secret");
        assert!(Config::load(["corecast", "--webhook-url", "HTTP://127.0.0.1:9/x"]).is_ok());
        let cfg =
            Config::load(["corecast", "--webhook-url", "", "--webhook-secret", "", "--webhook-give-up-ms", "1500"])
                .unwrap();
        assert_eq!((cfg.webhook.url, cfg.webhook.secret), (None, None), "empty is unset");
        assert_eq!(cfg.webhook.give_up_after, Duration::from_millis(1500));
        for (args, says) in [
            (&["--webhook-url", "ftp://x"][..], "--webhook-url must start with http:// or https://"),
            (&["--webhook-url", "127.0.0.1:9"][..], "--webhook-url"),
            (&["--webhook-url", "http://"][..], "--webhook-url"),
            (&["--webhook-url", "http://a b/"][..], "--webhook-url"),
            (&["--webhook-queue", "0"][..], "--webhook-queue"),
            (&["--webhook-queue", "1000001"][..], "--webhook-queue"),
            (&["--webhook-debounce-ms", "3600001"][..], "--webhook-debounce-ms"),
        ] {
            let err = Config::load(["corecast"].iter().chain(args)).unwrap_err();
            assert!(format!("{err:#}").contains(says), "{args:?}: {err:#}");
        }
        let dir = TempDir::new("cfg6");
        let file = dir.file("c.toml", "webhook_url = \"http://127.0.0.1:9/h\"\nwebhook_queue = 7\n");
        let cfg = Config::load(["corecast", "--config", &file]).unwrap();
        assert_eq!((cfg.webhook.url.as_deref(), cfg.webhook.queue), (Some("http://127.0.0.1:9/h"), 7));
    }

    #[test]
    fn auth_takes_one_key_source_and_checks_the_jwks_flags() {
        clean_env();
        assert!(Config::load(["corecast", "--jwt-secret", "s", "--jwt-jwks-url", "http://x/jwks"]).is_err());
        assert!(Config::load(["corecast", "--jwt-jwks-url", "ftp://x/jwks"]).is_err());
        assert!(Config::load(["corecast", "--jwt-jwks-url", "http://x/j", "--jwt-jwks-refresh-secs", "0"]).is_err());
        assert!(Config::load(["corecast", "--jwt-jwks-url", "http://x/j", "--jwt-jwks-refresh-secs", "1"]).is_ok());
        assert!(Config::load(["corecast", "--jwt-jwks-ca", "/nonexistent"]).is_err());
        assert!(Config::load(["corecast", "--jwt-jwks-url", "https://x/j", "--jwt-jwks-ca", "/nonexistent"]).is_err());
        assert!(Config::load(["corecast", "--jwt-audience", "a"]).is_err(), "an audience without a key");
        let cfg = Config::load(["corecast", "--jwt-secret", "s", "--jwt-audience", "a", "--jwt-issuer", "i"]).unwrap();
        assert!(cfg.auth.is_some_and(|a| a.ready()));
        let cfg = Config::load(["corecast", "--jwt-jwks-url", "http://127.0.0.1:1/jwks"]).unwrap();
        assert!(!cfg.auth.unwrap().ready(), "not ready before the first fetch");
    }

    #[test]
    fn write_delay_is_auto_by_default_and_reads_auto_a_number_or_zero() {
        clean_env();
        assert_eq!(Config::load(["corecast"]).unwrap().write_delay, WriteDelay::Auto);
        assert_eq!(Config::load(["corecast", "--write-delay-ms", "auto"]).unwrap().write_delay, WriteDelay::Auto);
        assert_eq!(Config::load(["corecast", "--write-delay-ms", "0"]).unwrap().write_delay, WriteDelay::Off);
        let cfg = Config::load(["corecast", "--write-delay-ms", "2"]).unwrap();
        assert_eq!(cfg.write_delay, WriteDelay::Fixed(Duration::from_millis(2)));
        let cfg = Config::load(["corecast", "--write-delay-ms", "5000"]).unwrap();
        assert_eq!(cfg.write_delay, WriteDelay::Fixed(Duration::from_secs(1)), "capped at a second");
        // (`Config::load` exits on a bad flag, as clap does.)
        let err = Options::try_parse_from(["corecast", "--write-delay-ms", "soon"]).unwrap_err();
        assert!(err.to_string().contains("`auto` or milliseconds"), "{err}");
        assert!(Options::try_parse_from(["corecast", "--write-delay-ms", "-1"]).is_err());
        assert!(Options::try_parse_from(["corecast", "--write-delay-ms", "AUTO"]).is_ok());
        let dir = TempDir::new("cfg7");
        for (text, want) in [
            ("write_delay_ms = 0\n", WriteDelay::Off),
            ("write_delay_ms = 3\n", WriteDelay::Fixed(Duration::from_millis(3))),
            ("write_delay_ms = \"auto\"\n", WriteDelay::Auto),
            ("write_delay_ms = \"2\"\n", WriteDelay::Fixed(Duration::from_millis(2))),
        ] {
            let file = dir.file("c.toml", text);
            assert_eq!(Config::load(["corecast", "--config", &file]).unwrap().write_delay, want, "{text}");
        }
        let file = dir.file("c.toml", "write_delay_ms = \"later\"\n");
        assert!(Config::load(["corecast", "--config", &file]).is_err());
        let file = dir.file("c.toml", "write_delay_ms = 4\n");
        let cfg = Config::load(["corecast", "--config", &file, "--write-delay-ms", "auto"]).unwrap();
        assert_eq!(cfg.write_delay, WriteDelay::Auto, "the flag beats the file");
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        clean_env();
        let dir = TempDir::new("cfg2");
        let file = dir.file("c.toml", "no_such_option = 1\n");
        let err = Config::load(["corecast", "--config", &file]).unwrap_err();
        assert!(format!("{err:#}").contains("no_such_option"), "{err:#}");
    }
}
