//! Per-shard counters, summed when `/metrics` is scraped.
//!
//! Each shard writes only its own `ShardMetrics` (a load and a store, no
//! locked instruction, no contention); a scrape on any shard reads every
//! shard's counters with relaxed loads and the `prometheus` crate renders the
//! Prometheus text exposition format 0.0.4: one series with the node's total
//! and one series per shard labelled `shard="N"`. Threads other than the owning shard (the
//! Redis readers) use `add_shared`, an atomic add.
//!
//! Besides the plain counters there are two labelled families:
//! `corecast_handshakes_total{result=...}` (every `/ws`/`/echo` upgrade
//! request by outcome, `HandshakeResult`) and the
//! `corecast_delivery_latency_seconds` histogram (`Histogram`): the time from
//! the moment the publishing shard accepted a publish to the moment a
//! receiving shard queued the frame to its local members. It is observed once
//! per message per shard that had at least one local recipient, not once per
//! recipient, so it measures the hop between shards (the inbox, or Redis),
//! not the size of rooms. With the local bus the clock starts in
//! `services::Services::publish` (the publishing shard's own members count too, at ~0);
//! with Redis the message carries only the event JSON, so the clock starts
//! when the shard's reader thread has read and checked it, and the histogram
//! covers reader → inbox → shard (including any wait at the inbox's high-water
//! mark) but not the trip through Redis.
//!
//! # Recording on our atomics, exposition by the `prometheus` crate
//!
//! Recording stays on the per-shard single-writer `Counter`s and
//! `Histogram`s above, because no metrics crate records without a lock or a
//! locked instruction on the hot path, which the issue rules out:
//!
//! - `prometheus-client` (the official client): its `Histogram::observe`
//!   takes a `Mutex` (`inner.lock()`), `Counter::inc` is a `fetch_add`, and a
//!   labelled `Family::get_or_create` takes an `RwLock` read guard and hashes
//!   the label set on every call.
//! - `prometheus` (tikv/rust-prometheus): its shared `IntCounter`/`Histogram`
//!   are atomic read-modify-writes (`fetch_add`, a CAS loop for the float
//!   sum) on every observation; its `local()` counters and histograms avoid
//!   that but must be flushed periodically (or on a timer, `auto_flush`), so
//!   a scrape sees stale values and every shard needs a flush tick.
//!
//! The exposition is done by the well-kept `prometheus` crate: `Exposition`
//! implements `prometheus::core::Collector` as a scrape-time view of
//! `Metrics` (plus the node-level `NodeInfo` families), building
//! `MetricFamily` values from relaxed loads; `Metrics::render` registers it in
//! a fresh `prometheus::Registry` and encodes with `prometheus::TextEncoder`
//! (text format 0.0.4, `prometheus::TEXT_FORMAT`). The crate orders families
//! by name and series by label values; names, labels and values are the same
//! as before, and the integration test (`tests/metrics.rs`) checks the output
//! with the reference Python parser (`prometheus_client.parser`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{Encoder, Registry, TextEncoder};

/// A single-writer counter (or gauge, with `sub`).
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning thread may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }
    /// Subtracts `n` (gauges). Only the owning thread may call this.
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }
    /// Adds `n` from any thread.
    #[inline]
    pub fn add_shared(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Upper bounds of the delivery-latency buckets, in nanoseconds (50µs..1s,
/// roughly 1-2.5-5 per decade); `+Inf` is implied.
pub const LATENCY_BOUNDS_NS: [u64; 15] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    750_000_000,
    1_000_000_000,
];

/// A single-writer latency histogram: one `Counter` per bucket (not
/// cumulative; made cumulative when rendered) and the sum in nanoseconds.
/// Recording is a short scan of `LATENCY_BOUNDS_NS` and two load + store
/// pairs, no lock. The count is rendered as the sum of the buckets, so a
/// scrape always sees `_count` equal to the `+Inf` bucket.
#[derive(Default, Debug)]
pub struct Histogram {
    buckets: [Counter; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: Counter,
}

impl Histogram {
    /// Records one observation. Only the owning thread may call this.
    #[inline]
    pub fn observe(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(LATENCY_BOUNDS_NS.len());
        self.buckets[i].inc();
        self.sum_ns.add(ns);
    }

    /// Per-bucket (non-cumulative) counts, the last one `+Inf`, and the sum.
    fn snapshot(&self) -> ([u64; LATENCY_BOUNDS_NS.len() + 1], u64) {
        (std::array::from_fn(|i| self.buckets[i].get()), self.sum_ns.get())
    }
}

/// How an upgrade request on `/ws` or `/echo` ended
/// (`corecast_handshakes_total{result=...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    /// 101: upgraded.
    Ok,
    /// 400: not an upgrade, bad key, missing Host, bad `?user=`.
    BadRequest,
    /// 426: not WebSocket version 13.
    Version,
    /// 401: missing or invalid token.
    Unauthorized,
    /// 403: origin not allowed.
    Forbidden,
    /// 503: the node is draining.
    Draining,
    /// 503: `--max-connections` reached.
    Full,
    /// 503: the JWKS (`--jwt-jwks-url`) has not been fetched yet.
    NotReady,
}

impl HandshakeResult {
    pub const ALL: [HandshakeResult; 8] = [
        HandshakeResult::Ok,
        HandshakeResult::BadRequest,
        HandshakeResult::Version,
        HandshakeResult::Unauthorized,
        HandshakeResult::Forbidden,
        HandshakeResult::Draining,
        HandshakeResult::Full,
        HandshakeResult::NotReady,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::BadRequest => "bad_request",
            HandshakeResult::Version => "version",
            HandshakeResult::Unauthorized => "unauthorized",
            HandshakeResult::Forbidden => "forbidden",
            HandshakeResult::Draining => "draining",
            HandshakeResult::Full => "full",
            HandshakeResult::NotReady => "not_ready",
        }
    }
}

macro_rules! shard_metrics {
    ($($name:ident : $kind:literal, $help:literal;)*) => {
        /// One shard's counters. Names are the Prometheus names without the
        /// `corecast_` prefix.
        #[derive(Default, Debug)]
        pub struct ShardMetrics {
            $(#[doc = $help] pub $name: Counter,)*
            /// `corecast_delivery_latency_seconds` (see the module docs).
            pub delivery_latency: Histogram,
            /// `corecast_handshakes_total`, indexed by `HandshakeResult as usize`.
            handshakes: [Counter; HandshakeResult::ALL.len()],
        }

        impl ShardMetrics {
            /// Each plain family: full name, `"counter"` or `"gauge"`, help.
            const FAMILIES: &[(&str, &str, &str)] = &[$((concat!("corecast_", stringify!($name)), $kind, $help),)*];

            /// Calls `f` with each plain counter's value, in `FAMILIES` order.
            fn each(&self, mut f: impl FnMut(u64)) {
                $( f(self.$name.get()); )*
            }
        }
    };
}

shard_metrics! {
    connections: "gauge", "Open WebSocket connections.";
    sockets: "gauge", "Client sockets (HTTP and WebSocket) whose descriptors the node holds, counted until each is closed.";
    connections_total: "counter", "WebSocket connections accepted (successful upgrades).";
    handshakes_failed_total: "counter", "HTTP requests to /ws or /echo refused before the upgrade (the sum of corecast_handshakes_total without result=\"ok\").";
    http_requests_total: "counter", "HTTP requests served (all paths).";
    messages_in_total: "counter", "WebSocket messages received from clients.";
    bytes_in_total: "counter", "Bytes received from client sockets.";
    messages_out_total: "counter", "Frames queued to clients (fan-out deliveries, replies, echoes).";
    bytes_out_total: "counter", "Bytes written to client sockets.";
    publishes_total: "counter", "Messages published from this shard (client ops and POST /api/publish).";
    inbox_messages_total: "counter", "Messages received through the shard's inbox.";
    relay_rooms: "gauge", "Rooms whose Redis subscription this shard holds for the node, passing their messages on to the node's other shards with members.";
    relay_passed_total: "counter", "Room messages from this shard's Redis reader passed on to another shard of the node (one per other shard with members).";
    client_errors_total: "counter", "Error events sent to clients.";
    protocol_closes_total: "counter", "Connections closed for an RFC 6455 violation (1002/1007/1009).";
    slow_consumer_disconnects_total: "counter", "Clients cut off because their outbound queue passed the limit.";
    accept_refused_total: "counter", "Connections refused because the process hit its open-file limit (EMFILE/ENFILE).";
    accept_errors_total: "counter", "Other accept(2) errors.";
    accept_pauses_total: "counter", "Times the accept loop paused at --max-accepts-per-sec (the rest waited in the backlog).";
    max_connections_refused_total: "counter", "Upgrades refused with 503 at --max-connections.";
    heartbeat_pings_total: "counter", "Heartbeat pings sent to connections silent for an interval.";
    heartbeat_timeouts_total: "counter", "Connections closed (1008) after 2 heartbeat intervals of silence.";
    rate_limited_total: "counter", "Ops refused with rate_limited (--max-ops-per-sec).";
    rate_limit_disconnects_total: "counter", "Connections closed (1008) for sustained rate-limit abuse.";
    room_limit_refusals_total: "counter", "Subscribes refused with too_large at --max-rooms-per-connection.";
    bus_unavailable_total: "counter", "Publishes refused because the backplane could not take them.";
    bus_dropped_total: "counter", "Malformed messages from the backplane dropped.";
    redis_connected: "gauge", "1 while this shard's Redis subscriber connection is up (0 without --redis).";
    redis_publisher_connected: "gauge", "1 while this shard's Redis publisher connection is up and answering.";
    redis_reconnects_total: "counter", "Redis connections (subscriber or publisher) made again after being lost.";
    redis_connect_failures_total: "counter", "Failed attempts to connect and log in to Redis.";
    redis_sub_commands_total: "counter", "SUBSCRIBE/UNSUBSCRIBE commands written (each carries every channel changed in a batch).";
    redis_publish_writes_total: "counter", "Writes on the publisher connection (each carries every PUBLISH queued since the last).";
    redis_publish_lost_total: "counter", "PUBLISHes accepted but lost with a dropped Redis connection (at-most-once).";
    redis_reader_waits_total: "counter", "Times the Redis reader stopped reading because its shard's inbox was full.";
    close_timeouts_total: "counter", "Connections cut off because they did not answer our close frame in time.";
    control_rate_limited_total: "counter", "Ping/pong frames from clients ignored for exceeding --max-ops-per-sec.";
    writes_held_total: "counter", "Connections the flusher held back because it wrote them less than the write delay ago (--write-delay-ms N, or auto while the shard is behind).";
    coalescing: "gauge", "1 while this shard's flusher holds busy connections: always with --write-delay-ms N, while the shard is behind with auto.";
    coalescing_entries_total: "counter", "Times this shard fell behind and began holding busy connections (--write-delay-ms auto).";
    socket_writes_total: "counter", "Writes to client sockets: sendmsg(2) calls and batched io_uring sends (fewer per frame = frames coalesced).";
    sends_batched_total: "counter", "Socket writes that went to the kernel in an io_uring batch (io_uring driver), not one sendmsg(2) each.";
    send_batches_total: "counter", "io_uring_enter calls that carried those batched writes.";
    token_expiries: "gauge", "Entries in this shard's token-expiry heap: one per authenticated connection and expiry, one per subscription token (room) and expiry, and refreshed ones until the heap is compacted.";
    full_sockets: "gauge", "Connections whose socket is full, a writer waiting for it to drain (slow readers not yet caught up or cut off).";
    pongs_coalesced_total: "counter", "Pongs that replaced a waiting, unsent pong instead of being queued (RFC 6455 5.5.3).";
    inbox_dropped_total: "counter", "Messages for this shard dropped because its inbox was full (see docs/operations.md: Inbox policy).";
    peer_wakes_total: "counter", "Wakes this shard sent to other shards' inbox tasks: at most one per receiving shard per turn, however many messages it queued there.";
    history_recovered_total: "counter", "Subscribes with since that the room history covered (recovered:true).";
    history_unrecovered_total: "counter", "Subscribes with since that it could not cover (recovered:false).";
    history_duplicates_dropped_total: "counter", "Live history messages dropped at a room because this shard already had them.";
    history_caught_up_total: "counter", "Messages delivered from history after the Redis subscriber link came back.";
    history_gaps_total: "counter", "gap events: a catch-up the history could not cover.";
    history_publish_lost_total: "counter", "History publishes accepted but lost with a dropped Redis publisher link (which carries the history scripts).";
    history_feeds_total: "counter", "Recoveries and catch-ups fed to a member as its outbound queue drained, page by page, rather than pushed at once.";
    history_replies_retried_total: "counter", "Standalone history replies a full shard-pair queue did not take at once, sent again (never dropped).";
    history_ring_bytes: "gauge", "Bytes of messages this shard keeps in standalone history rings (held to its share of --history-max-bytes).";
    redis_publish_refused_total: "counter", "Publishes accepted, then refused by Redis (NOPERM, CLUSTERDOWN, ...) and so lost.";
    redis_redirects_total: "counter", "MOVED/ASK redirections followed (Redis Cluster).";
    redis_unsolicited_unsubscribes_total: "counter", "Shard channels Redis unsubscribed by itself (slot migrated); subscribed again at the new owner.";
    redis_duplicates_dropped_total: "counter", "Messages a Redis server delivered that another had delivered before the channel moved to it (failover): dropped.";
    redis_topology_changes_total: "counter", "New Redis topologies adopted (failover, slot map change); counted on shard 0.";
    deflate_compressions_total: "counter", "Outgoing messages deflated (permessage-deflate): at most once per message per shard for room fan-out, once per echo.";
    deflate_frames_out_total: "counter", "Compressed (RSV1) frames queued to clients.";
    deflate_messages_in_total: "counter", "Compressed messages received and inflated.";
    http_sockets: "gauge", "Client sockets in the HTTP phase (accepted, not yet upgraded nor closed), held to --max-handshakes-per-shard per shard.";
    http_sockets_refused_total: "counter", "Connections closed at accept because the shard held --max-handshakes-per-shard sockets in the HTTP phase.";
    presence_rooms: "gauge", "Presence rooms this shard writes counts in (with Redis: its entries in the writer's room set).";
    presence_members: "gauge", "Presence (room, user) members: standalone, those of the rooms this shard is the authority of; with Redis, those this shard writes counts for (taken every lease, 5 s).";
    presence_rooms_owned: "gauge", "Standalone: presence rooms whose authority is this shard (members kept in memory).";
    presence_events_total: "counter", "join and leave events this shard published (each once for the cluster).";
    presence_commands_total: "counter", "Presence scripts sent to Redis (writes batched per turn and room, reads, leases, reaps).";
    presence_rewrites_total: "counter", "Presence writes lost with their Redis link or refused, written again (with the counts of the moment).";
    presence_reaped_total: "counter", "Presence writers whose lease lapsed (a node crashed or was cut off) reaped by this shard.";
    presence_resyncs_total: "counter", "Times this shard wrote all its presence again after finding its lease gone (reaped while away).";
    namespace_digests: "gauge", "Distinct [[namespace]] tables among the nodes sharing this Redis, as this shard last saw them (more than 1: a mismatch, PROTOCOL.md §10).";
    panics_total: "counter", "Panics caught in a connection's task: that connection was closed, the node went on (docs/operations.md: Panic policy).";
}

impl ShardMetrics {
    /// Counts one upgrade request by its outcome (and, when refused, in
    /// `handshakes_failed_total`). Only the owning shard may call this.
    #[inline]
    pub fn handshake(&self, result: HandshakeResult) {
        self.handshakes[result as usize].inc();
        if result != HandshakeResult::Ok {
            self.handshakes_failed_total.inc();
        }
    }

    pub fn handshakes(&self, result: HandshakeResult) -> u64 {
        self.handshakes[result as usize].get()
    }
}

/// Every shard's counters, shared read-only (`Arc<Metrics>`).
#[derive(Debug)]
pub struct Metrics {
    shards: Box<[ShardMetrics]>,
    /// Open WebSocket connections on the whole node, for `--max-connections`:
    /// one atomic add at each upgrade and one at each close, never per message.
    pub node_connections: AtomicUsize,
    /// The node is draining: set by the signal handler before any shard
    /// gets its `Drain`, so every shard's `/readyz` and upgrades say so at
    /// once, whichever shard a request lands on.
    pub node_draining: std::sync::atomic::AtomicBool,
    /// Per Redis server: how many shards have their links to it up.
    pub redis_nodes: RedisNodes,
    /// Each shard's liveness tick (`Liveness`), checked by `/healthz`.
    pub liveness: Liveness,
    /// The webhook sender's counters (all zero without `--webhook-url`).
    pub webhook: WebhookMetrics,
    /// `--jwt-jwks-url`: the `jwks` thread's fetches and keys.
    pub jwks: JwksStats,
}

/// The webhook sender's counters (`webhook::Webhooks`, PROTOCOL.md §11):
/// node-wide, not per shard, written from any thread (`add_shared`: the
/// shards that emit, the sender thread that delivers), rendered without a
/// `shard` label as `corecast_webhook_*`.
#[derive(Debug, Default)]
pub struct WebhookMetrics {
    /// Events accepted into the queue.
    pub events_total: Counter,
    /// Events acknowledged by a 2xx answer.
    pub sent_total: Counter,
    /// Requests answered 2xx.
    pub requests_ok: Counter,
    /// Requests that failed: another status, no connection, a timeout.
    pub requests_error: Counter,
    /// Requests sent again after a failure.
    pub retries_total: Counter,
    /// Events refused because the queue was full (never accepted).
    pub dropped_queue_full: Counter,
    /// Accepted events dropped with a batch retried past the give-up age.
    pub dropped_expired: Counter,
    /// Accepted events still undelivered when the sender stopped (a node's
    /// drain ran out of time), or emitted after it stopped.
    pub dropped_stopped: Counter,
}

impl WebhookMetrics {
    /// `corecast_webhook_queue`: events accepted and not yet acknowledged
    /// nor dropped (the queue and the batch being sent).
    pub fn queued(&self) -> u64 {
        let done = self.sent_total.get() + self.dropped_expired.get() + self.dropped_stopped.get();
        self.events_total.get().saturating_sub(done)
    }
}

/// `corecast_jwks_fetches_total{result}` and `corecast_jwks_keys`, written by
/// the node's `jwks` thread (`auth::jwks`); shown once it has started.
#[derive(Debug, Default)]
pub struct JwksStats {
    pub on: std::sync::atomic::AtomicBool,
    pub ok: Counter,
    pub error: Counter,
    pub keys: AtomicU64,
}

/// One liveness stamp per shard: a timer on the shard's own runtime stores
/// the time (ms since `origin`) every `LIVENESS_TICK`; a stamp that grows old
/// means the shard's thread has stopped turning (blocked in a syscall, a
/// long computation, a hung task that never yields). Any thread reads them.
#[derive(Debug)]
pub struct Liveness {
    origin: std::time::Instant,
    stamps: Box<[AtomicU64]>,
}

/// How often each shard stamps its liveness.
pub const LIVENESS_TICK: std::time::Duration = std::time::Duration::from_millis(250);

impl Liveness {
    fn new(shards: usize) -> Liveness {
        Liveness { origin: std::time::Instant::now(), stamps: (0..shards).map(|_| AtomicU64::new(0)).collect() }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Shard `i` is turning (called by its own timer).
    pub fn beat(&self, i: usize) {
        self.stamps[i].store(self.now_ms(), Relaxed);
    }

    /// How long ago each shard last stamped, in shard order.
    pub fn ages(&self) -> Vec<std::time::Duration> {
        let now = self.now_ms();
        self.stamps.iter().map(|s| std::time::Duration::from_millis(now.saturating_sub(s.load(Relaxed)))).collect()
    }

    /// The shards whose stamp is older than `limit`, with its age.
    pub fn stalled(&self, limit: std::time::Duration) -> Vec<(usize, std::time::Duration)> {
        self.ages().into_iter().enumerate().filter(|(_, a)| *a > limit).collect()
    }
}

/// `corecast_redis_node_links_up{node,link}`: for each Redis primary this
/// node uses, how many shards' subscriber / publisher links to it are up.
/// Written only when a link goes up or down and when the topology changes
/// (never on the message path), so a mutex is enough.
#[derive(Debug, Default)]
pub struct RedisNodes(Mutex<std::collections::BTreeMap<String, [i64; 2]>>);

impl RedisNodes {
    /// One shard's `publisher` (else subscriber) link to `node` went up or down.
    pub fn link(&self, node: &str, publisher: bool, up: bool) {
        if let Ok(mut m) = self.0.lock() {
            let e = m.entry(node.to_string()).or_default();
            e[usize::from(publisher)] += if up { 1 } else { -1 };
        }
    }

    /// The primaries now: each shows (at 0 while unreachable); a former one
    /// goes once its links are closed.
    pub fn primaries<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        if let Ok(mut m) = self.0.lock() {
            let names: Vec<&str> = names.into_iter().collect();
            m.retain(|k, v| names.contains(&k.as_str()) || v.iter().any(|&n| n != 0));
            for n in names {
                m.entry(n.to_string()).or_default();
            }
        }
    }

    /// Is some link (subscriber or publisher) of some shard up to some
    /// primary? False also before any primary is known.
    pub fn any_up(&self) -> bool {
        self.0.lock().map(|m| m.values().any(|v| v.iter().any(|&n| n > 0))).unwrap_or(false)
    }

    fn snapshot(&self) -> Vec<(String, [i64; 2])> {
        self.0.lock().map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect()).unwrap_or_default()
    }
}

impl Metrics {
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            node_connections: AtomicUsize::new(0),
            node_draining: std::sync::atomic::AtomicBool::new(false),
            redis_nodes: RedisNodes::default(),
            liveness: Liveness::new(shards),
            webhook: WebhookMetrics::default(),
            jwks: JwksStats::default(),
        }
    }

    pub fn shard(&self, i: usize) -> &ShardMetrics {
        &self.shards[i]
    }

    /// Sums one counter over all shards.
    pub fn total(&self, pick: impl Fn(&ShardMetrics) -> &Counter) -> u64 {
        self.shards.iter().map(|s| pick(s).get()).sum()
    }

    /// The Prometheus text exposition (format 0.0.4, `prometheus::TEXT_FORMAT`)
    /// of these counters and of `node`, encoded by the `prometheus` crate.
    pub fn render(self: &Arc<Self>, node: NodeInfo) -> String {
        let registry = Registry::new();
        // Cannot fail: the descriptors are valid (unit-tested) and the
        // registry is fresh.
        registry.register(Box::new(Exposition { metrics: self.clone(), node })).expect("register Exposition");
        let mut out = Vec::with_capacity(16 * 1024);
        // Cannot fail either: every family has at least its node-total series.
        TextEncoder::new().encode(&registry.gather(), &mut out).expect("encode metrics");
        String::from_utf8(out).expect("the text encoder writes UTF-8")
    }
}

/// The `/metrics` content type: the text format 0.0.4 the `prometheus`
/// crate's `TextEncoder` writes (`prometheus::TEXT_FORMAT`), in UTF-8.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Node-level values exposed next to the counters: `corecast_shards`,
/// `corecast_draining`, `corecast_info{version,driver}`,
/// `corecast_inbox_backlog{shard}`, `corecast_open_fds`.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub shards: usize,
    pub draining: bool,
    pub driver: &'static str,
    /// Messages waiting in each shard's inbox, in shard order.
    pub inbox_backlog: Vec<usize>,
    /// Descriptors the process holds (`open_fds`), if known.
    pub open_fds: Option<usize>,
    /// With Redis: whether a link or a cluster slot is down
    /// (`corecast_redis_degraded`); `None` without Redis.
    pub redis_degraded: Option<bool>,
}

/// The descriptors this process holds, at no per-descriptor cost on the
/// calling (shard) thread: Linux (6.2+) reports the count of open
/// descriptors as the size of `/proc/self/fd`, one `stat(2)` that counts the
/// bits of the descriptor table (no directory walk, no allocation per
/// descriptor). On an older kernel (size 0) a `fd-count` thread, started on
/// the first call, walks the directory once a second off the shards, and the
/// value it last counted is returned (up to a second old).
pub fn open_fds() -> Option<usize> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(m) = std::fs::metadata("/proc/self/fd")
        && m.size() > 0
    {
        return usize::try_from(m.size()).ok();
    }
    static SAMPLED: AtomicUsize = AtomicUsize::new(usize::MAX);
    static SAMPLER: std::sync::Once = std::sync::Once::new();
    SAMPLER.call_once(|| {
        let _ = std::thread::Builder::new().name("fd-count".into()).spawn(|| {
            loop {
                if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
                    // The walk's own descriptor is not the node's.
                    SAMPLED.store(d.count().saturating_sub(1), Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
    });
    match SAMPLED.load(Relaxed) {
        usize::MAX => None,
        n => Some(n),
    }
}

const HANDSHAKES: (&str, &str) = ("corecast_handshakes_total", "Upgrade requests on /ws and /echo by result.");
const LATENCY: (&str, &str) = (
    "corecast_delivery_latency_seconds",
    "Publish accepted to frame queued on a receiving shard (once per message per shard).",
);
const SHARDS: (&str, &str) = ("corecast_shards", "Shard threads in this process.");
const DRAINING: (&str, &str) = ("corecast_draining", "1 while the node drains.");
const INFO: (&str, &str) = ("corecast_info", "Build and runtime information.");
const BACKLOG: (&str, &str) = (
    "corecast_inbox_backlog",
    "Messages waiting in the shard's inbox (bounded; see docs/operations.md: Inbox policy).",
);
const FDS: (&str, &str) =
    ("corecast_open_fds", "File descriptors the process holds (sockets, listeners, pipes, files).");
const REDIS_DEGRADED: (&str, &str) = (
    "corecast_redis_degraded",
    "1 while a Redis link of some shard is down or a cluster slot has no primary (with --redis); /readyz stays 200 for --ready-grace-secs of it.",
);
const SHARD_STALL: (&str, &str) = (
    "corecast_stalled_shards",
    "Shards whose liveness tick (stamped every 0.25 s on the shard's own runtime) is older than 2 s: /healthz fails while it is above 0.",
);
/// A shard whose liveness stamp is older than this is stalled (`/healthz`).
pub const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
const JWKS_FETCHES: (&str, &str) =
    ("corecast_jwks_fetches_total", "JWKS fetches (--jwt-jwks-url) by result: ok or error.");
const JWKS_KEYS: (&str, &str) = ("corecast_jwks_keys", "Usable keys in the last JWKS fetched (--jwt-jwks-url).");
const REDIS_NODE_LINKS: (&str, &str) = (
    "corecast_redis_node_links_up",
    "Shards whose subscriber / publisher link to this Redis primary is up (with --redis; 0 while it is unreachable).",
);

const WEBHOOK_EVENTS: (&str, &str) =
    ("corecast_webhook_events_total", "Webhook events accepted into the node's queue (--webhook-url).");
const WEBHOOK_SENT: (&str, &str) = ("corecast_webhook_sent_total", "Webhook events acknowledged by a 2xx answer.");
const WEBHOOK_REQUESTS: (&str, &str) = (
    "corecast_webhook_requests_total",
    "Webhook requests by result: ok (2xx), error (other status, connection error, timeout).",
);
const WEBHOOK_RETRIES: (&str, &str) =
    ("corecast_webhook_retries_total", "Webhook requests sent again after a failure (with backoff).");
const WEBHOOK_DROPPED: (&str, &str) = (
    "corecast_webhook_dropped_total",
    "Webhook events dropped: queue_full (refused, --webhook-queue), expired (retried past the give-up age), stopped (undelivered when the sender stopped).",
);
const WEBHOOK_QUEUE: (&str, &str) =
    ("corecast_webhook_queue", "Webhook events accepted and not yet acknowledged nor dropped.");

/// The descriptors of every family `Exposition` collects, built once.
static DESCS: LazyLock<Vec<Desc>> = LazyLock::new(|| {
    let desc = |name: &str, help: &str, labels: &[&str]| {
        let labels = labels.iter().map(|l| l.to_string()).collect();
        Desc::new(name.into(), help.into(), labels, HashMap::new()).expect("valid metric descriptor")
    };
    let mut v: Vec<Desc> = ShardMetrics::FAMILIES.iter().map(|(name, _, help)| desc(name, help, &["shard"])).collect();
    v.push(desc(HANDSHAKES.0, HANDSHAKES.1, &["result", "shard"]));
    v.push(desc(LATENCY.0, LATENCY.1, &["shard"]));
    v.push(desc(SHARDS.0, SHARDS.1, &[]));
    v.push(desc(DRAINING.0, DRAINING.1, &[]));
    v.push(desc(INFO.0, INFO.1, &["version", "driver"]));
    v.push(desc(BACKLOG.0, BACKLOG.1, &["shard"]));
    v.push(desc(FDS.0, FDS.1, &[]));
    v.push(desc(REDIS_NODE_LINKS.0, REDIS_NODE_LINKS.1, &["node", "link"]));
    v.push(desc(JWKS_FETCHES.0, JWKS_FETCHES.1, &["result"]));
    v.push(desc(JWKS_KEYS.0, JWKS_KEYS.1, &[]));
    v.push(desc(REDIS_DEGRADED.0, REDIS_DEGRADED.1, &[]));
    v.push(desc(SHARD_STALL.0, SHARD_STALL.1, &[]));
    v.push(desc(WEBHOOK_EVENTS.0, WEBHOOK_EVENTS.1, &[]));
    v.push(desc(WEBHOOK_SENT.0, WEBHOOK_SENT.1, &[]));
    v.push(desc(WEBHOOK_REQUESTS.0, WEBHOOK_REQUESTS.1, &["result"]));
    v.push(desc(WEBHOOK_RETRIES.0, WEBHOOK_RETRIES.1, &[]));
    v.push(desc(WEBHOOK_DROPPED.0, WEBHOOK_DROPPED.1, &["reason"]));
    v.push(desc(WEBHOOK_QUEUE.0, WEBHOOK_QUEUE.1, &[]));
    v
});

/// A scrape-time view of `Metrics` for the `prometheus` crate: `collect`
/// reads every shard's counters with relaxed loads (no lock, nothing written)
/// and builds one family per metric, each with the node's total (no `shard`
/// label) and one series per shard labelled `shard="N"`.
struct Exposition {
    metrics: Arc<Metrics>,
    node: NodeInfo,
}

fn label(name: &str, value: impl Into<String>) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.into());
    l.set_value(value.into());
    l
}

fn shard_label(i: usize) -> LabelPair {
    label("shard", i.to_string())
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

/// One counter or gauge sample.
fn sample(kind: MetricType, labels: Vec<LabelPair>, v: f64) -> proto::Metric {
    let mut m = proto::Metric::from_label(labels);
    if kind == MetricType::GAUGE {
        let mut g = proto::Gauge::default();
        g.set_value(v);
        m.set_gauge(g);
    } else {
        let mut c = proto::Counter::default();
        c.set_value(v);
        m.set_counter(c);
    }
    m
}

type LatencySnapshot = ([u64; LATENCY_BOUNDS_NS.len() + 1], u64);

/// One histogram sample from per-bucket (non-cumulative) counts; the
/// encoder adds the `+Inf` bucket from the count.
fn histogram(labels: Vec<LabelPair>, (b, sum): &LatencySnapshot) -> proto::Metric {
    let mut cum = 0;
    let mut buckets = Vec::with_capacity(LATENCY_BOUNDS_NS.len());
    for (ns, v) in LATENCY_BOUNDS_NS.iter().zip(b) {
        cum += v;
        let mut bucket = proto::Bucket::default();
        bucket.set_upper_bound(*ns as f64 / 1e9);
        bucket.set_cumulative_count(cum);
        buckets.push(bucket);
    }
    cum += b[LATENCY_BOUNDS_NS.len()];
    let mut h = proto::Histogram::default();
    h.set_bucket(buckets);
    h.set_sample_count(cum);
    h.set_sample_sum(*sum as f64 / 1e9);
    let mut m = proto::Metric::from_label(labels);
    m.set_histogram(h);
    m
}

impl Collector for Exposition {
    fn desc(&self) -> Vec<&Desc> {
        DESCS.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let shards = &self.metrics.shards;
        let mut out = Vec::with_capacity(ShardMetrics::FAMILIES.len() + 5);

        // The plain counters and gauges: one row of per-shard values each.
        let mut rows: Vec<Vec<u64>> = vec![Vec::with_capacity(shards.len()); ShardMetrics::FAMILIES.len()];
        for s in shards.iter() {
            let mut k = 0;
            s.each(|v| {
                rows[k].push(v);
                k += 1;
            });
        }
        for ((name, kind, help), values) in ShardMetrics::FAMILIES.iter().zip(rows) {
            let kind = if *kind == "gauge" { MetricType::GAUGE } else { MetricType::COUNTER };
            let mut series = Vec::with_capacity(values.len() + 1);
            series.push(sample(kind, vec![], values.iter().sum::<u64>() as f64));
            for (i, v) in values.iter().enumerate() {
                series.push(sample(kind, vec![shard_label(i)], *v as f64));
            }
            out.push(family(name, help, kind, series));
        }

        // corecast_handshakes_total{result}, per shard and total.
        let mut series = Vec::with_capacity(HandshakeResult::ALL.len() * (shards.len() + 1));
        for r in HandshakeResult::ALL {
            let per: Vec<u64> = shards.iter().map(|s| s.handshakes(r)).collect();
            series.push(sample(MetricType::COUNTER, vec![label("result", r.label())], per.iter().sum::<u64>() as f64));
            for (i, v) in per.iter().enumerate() {
                series.push(sample(MetricType::COUNTER, vec![label("result", r.label()), shard_label(i)], *v as f64));
            }
        }
        out.push(family(HANDSHAKES.0, HANDSHAKES.1, MetricType::COUNTER, series));

        // The delivery-latency histogram, total and per shard.
        let snaps: Vec<LatencySnapshot> = shards.iter().map(|s| s.delivery_latency.snapshot()).collect();
        let mut total: LatencySnapshot = ([0; LATENCY_BOUNDS_NS.len() + 1], 0);
        for (b, sum) in &snaps {
            for (t, v) in total.0.iter_mut().zip(b) {
                *t += v;
            }
            total.1 += sum;
        }
        let mut series = Vec::with_capacity(snaps.len() + 1);
        series.push(histogram(vec![], &total));
        for (i, snap) in snaps.iter().enumerate() {
            series.push(histogram(vec![shard_label(i)], snap));
        }
        out.push(family(LATENCY.0, LATENCY.1, MetricType::HISTOGRAM, series));

        // Node-level families.
        let node = &self.node;
        out.push(family(
            SHARDS.0,
            SHARDS.1,
            MetricType::GAUGE,
            vec![sample(MetricType::GAUGE, vec![], node.shards as f64)],
        ));
        let draining = f64::from(u8::from(node.draining));
        out.push(family(DRAINING.0, DRAINING.1, MetricType::GAUGE, vec![sample(MetricType::GAUGE, vec![], draining)]));
        let info = vec![label("version", env!("CARGO_PKG_VERSION")), label("driver", node.driver)];
        out.push(family(INFO.0, INFO.1, MetricType::GAUGE, vec![sample(MetricType::GAUGE, info, 1.0)]));
        let mut series = vec![sample(MetricType::GAUGE, vec![], node.inbox_backlog.iter().sum::<usize>() as f64)];
        for (i, v) in node.inbox_backlog.iter().enumerate() {
            series.push(sample(MetricType::GAUGE, vec![shard_label(i)], *v as f64));
        }
        out.push(family(BACKLOG.0, BACKLOG.1, MetricType::GAUGE, series));
        if let Some(n) = node.open_fds {
            out.push(family(FDS.0, FDS.1, MetricType::GAUGE, vec![sample(MetricType::GAUGE, vec![], n as f64)]));
        }
        if let Some(d) = node.redis_degraded {
            let v = f64::from(u8::from(d));
            out.push(family(
                REDIS_DEGRADED.0,
                REDIS_DEGRADED.1,
                MetricType::GAUGE,
                vec![sample(MetricType::GAUGE, vec![], v)],
            ));
        }
        let stalled = self.metrics.liveness.stalled(STALL_LIMIT).len() as f64;
        let series = vec![sample(MetricType::GAUGE, vec![], stalled)];
        out.push(family(SHARD_STALL.0, SHARD_STALL.1, MetricType::GAUGE, series));
        let w = &self.metrics.webhook;
        let one = |kind, v: u64| vec![sample(kind, vec![], v as f64)];
        let labelled = |name: &str, rows: &[(&str, &Counter)]| -> Vec<proto::Metric> {
            rows.iter().map(|(v, c)| sample(MetricType::COUNTER, vec![label(name, *v)], c.get() as f64)).collect()
        };
        out.push(family(
            WEBHOOK_EVENTS.0,
            WEBHOOK_EVENTS.1,
            MetricType::COUNTER,
            one(MetricType::COUNTER, w.events_total.get()),
        ));
        out.push(family(
            WEBHOOK_SENT.0,
            WEBHOOK_SENT.1,
            MetricType::COUNTER,
            one(MetricType::COUNTER, w.sent_total.get()),
        ));
        let series = labelled("result", &[("ok", &w.requests_ok), ("error", &w.requests_error)]);
        out.push(family(WEBHOOK_REQUESTS.0, WEBHOOK_REQUESTS.1, MetricType::COUNTER, series));
        out.push(family(
            WEBHOOK_RETRIES.0,
            WEBHOOK_RETRIES.1,
            MetricType::COUNTER,
            one(MetricType::COUNTER, w.retries_total.get()),
        ));
        let series = labelled(
            "reason",
            &[("queue_full", &w.dropped_queue_full), ("expired", &w.dropped_expired), ("stopped", &w.dropped_stopped)],
        );
        out.push(family(WEBHOOK_DROPPED.0, WEBHOOK_DROPPED.1, MetricType::COUNTER, series));
        out.push(family(WEBHOOK_QUEUE.0, WEBHOOK_QUEUE.1, MetricType::GAUGE, one(MetricType::GAUGE, w.queued())));
        let nodes = self.metrics.redis_nodes.snapshot();
        if !nodes.is_empty() {
            let mut series = Vec::with_capacity(nodes.len() * 2);
            for (node, [sub, publ]) in nodes {
                for (link, v) in [("subscriber", sub), ("publisher", publ)] {
                    series.push(sample(
                        MetricType::GAUGE,
                        vec![label("node", node.clone()), label("link", link)],
                        v as f64,
                    ));
                }
            }
            out.push(family(REDIS_NODE_LINKS.0, REDIS_NODE_LINKS.1, MetricType::GAUGE, series));
        }
        let jwks = &self.metrics.jwks;
        if jwks.on.load(Relaxed) {
            let series = [("ok", &jwks.ok), ("error", &jwks.error)]
                .into_iter()
                .map(|(r, c)| sample(MetricType::COUNTER, vec![label("result", r)], c.get() as f64))
                .collect();
            out.push(family(JWKS_FETCHES.0, JWKS_FETCHES.1, MetricType::COUNTER, series));
            let keys = vec![sample(MetricType::GAUGE, vec![], jwks.keys.load(Relaxed) as f64)];
            out.push(family(JWKS_KEYS.0, JWKS_KEYS.1, MetricType::GAUGE, keys));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_totals_and_per_shard_series() {
        let m = Arc::new(Metrics::new(2));
        m.shard(0).connections.add(3);
        m.shard(1).connections.add(4);
        m.shard(1).connections.sub(1);
        m.shard(1).bus_dropped_total.add_shared(2);
        let text = m.render(NodeInfo { shards: 2, driver: "test", ..NodeInfo::default() });
        assert!(text.contains("# TYPE corecast_connections gauge\ncorecast_connections 6\n"));
        assert!(text.contains("corecast_connections{shard=\"0\"} 3\n"));
        assert!(text.contains("corecast_connections{shard=\"1\"} 3\n"));
        assert!(text.contains("corecast_bus_dropped_total 2\n"));
        assert_eq!(m.total(|s| &s.connections), 6);
    }

    #[test]
    fn content_type_is_the_encoders_text_format() {
        assert!(CONTENT_TYPE.starts_with(prometheus::TEXT_FORMAT));
        assert_eq!(prometheus::TEXT_FORMAT, "text/plain; version=0.0.4");
    }

    #[test]
    fn redis_node_links_are_counted_per_node_and_kept_while_a_primary() {
        let m = Arc::new(Metrics::new(2));
        m.redis_nodes.primaries(["10.0.0.1:7000", "10.0.0.2:7000"]);
        m.redis_nodes.link("10.0.0.1:7000", false, true);
        m.redis_nodes.link("10.0.0.1:7000", true, true);
        m.redis_nodes.link("10.0.0.1:7000", true, true);
        let text = m.render(NodeInfo { shards: 2, driver: "test", ..NodeInfo::default() });
        assert!(text.contains("corecast_redis_node_links_up{node=\"10.0.0.1:7000\",link=\"publisher\"} 2\n"), "{text}");
        assert!(
            text.contains("corecast_redis_node_links_up{node=\"10.0.0.2:7000\",link=\"subscriber\"} 0\n"),
            "{text}"
        );
        // A former primary stays until its links are closed.
        m.redis_nodes.primaries(["10.0.0.2:7000"]);
        assert_eq!(m.redis_nodes.snapshot().len(), 2);
        for publisher in [false, true, true] {
            m.redis_nodes.link("10.0.0.1:7000", publisher, false);
        }
        m.redis_nodes.primaries(["10.0.0.2:7000"]);
        assert_eq!(m.redis_nodes.snapshot(), [("10.0.0.2:7000".to_string(), [0, 0])]);
    }

    #[test]
    fn renders_node_families() {
        let m = Arc::new(Metrics::new(3));
        let text = m.render(NodeInfo {
            shards: 3,
            draining: true,
            driver: "epoll",
            inbox_backlog: vec![0, 4, 1],
            open_fds: Some(9),
            redis_degraded: Some(true),
        });
        assert!(text.contains("corecast_redis_degraded 1\n"), "{text}");
        assert!(text.contains("# TYPE corecast_shards gauge\ncorecast_shards 3\n"));
        assert!(text.contains("corecast_draining 1\n"));
        let info = format!("corecast_info{{version=\"{}\",driver=\"epoll\"}} 1\n", env!("CARGO_PKG_VERSION"));
        assert!(text.contains(&info), "{text}");
        assert!(text.contains("corecast_connections{shard=\"2\"} 0\n"));
        assert!(text.contains("corecast_inbox_backlog 5\n"), "{text}");
        assert!(text.contains("corecast_inbox_backlog{shard=\"1\"} 4\n"), "{text}");
        assert!(text.contains("corecast_open_fds 9\n"), "{text}");
    }

    #[test]
    fn renders_webhook_families() {
        let m = Arc::new(Metrics::new(2));
        let w = &m.webhook;
        w.events_total.add_shared(10);
        w.sent_total.add_shared(6);
        w.requests_ok.add_shared(2);
        w.requests_error.add_shared(3);
        w.retries_total.add_shared(3);
        w.dropped_queue_full.add_shared(4);
        w.dropped_expired.add_shared(1);
        let text = m.render(NodeInfo { shards: 2, driver: "test", ..NodeInfo::default() });
        for line in [
            "corecast_webhook_events_total 10\n",
            "corecast_webhook_sent_total 6\n",
            "corecast_webhook_requests_total{result=\"ok\"} 2\n",
            "corecast_webhook_requests_total{result=\"error\"} 3\n",
            "corecast_webhook_retries_total 3\n",
            "corecast_webhook_dropped_total{reason=\"queue_full\"} 4\n",
            "corecast_webhook_dropped_total{reason=\"expired\"} 1\n",
            "corecast_webhook_dropped_total{reason=\"stopped\"} 0\n",
            "# TYPE corecast_webhook_queue gauge\ncorecast_webhook_queue 3\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }

    #[test]
    fn renders_handshakes_and_latency() {
        let m = Arc::new(Metrics::new(2));
        m.shard(0).handshake(HandshakeResult::Ok);
        m.shard(1).handshake(HandshakeResult::Unauthorized);
        m.shard(1).delivery_latency.observe(std::time::Duration::from_micros(20));
        m.shard(1).delivery_latency.observe(std::time::Duration::from_millis(3));
        m.shard(0).delivery_latency.observe(std::time::Duration::from_secs(5));
        let text = m.render(NodeInfo { shards: 2, driver: "test", ..NodeInfo::default() });
        assert!(text.contains("corecast_handshakes_total{result=\"ok\"} 1\n"));
        assert!(text.contains("corecast_handshakes_total{result=\"unauthorized\",shard=\"1\"} 1\n"));
        assert!(text.contains("corecast_handshakes_failed_total 1\n"));
        assert!(text.contains("corecast_delivery_latency_seconds_bucket{le=\"0.00005\"} 1\n"));
        assert!(text.contains("corecast_delivery_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("corecast_delivery_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("corecast_delivery_latency_seconds_count 3\n"));
        assert!(text.contains("corecast_delivery_latency_seconds_bucket{shard=\"1\",le=\"1\"} 2\n"));
        assert!(text.contains("corecast_delivery_latency_seconds_count{shard=\"0\"} 1\n"));
        assert!(text.contains("corecast_delivery_latency_seconds_sum{shard=\"1\"} 0.00302\n"));
    }
}
