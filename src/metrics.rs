//! Per-shard counters, summed when `/metrics` is scraped.
//!
//! Each shard writes only its own `ShardMetrics` (a load and a store, no
//! locked instruction, no contention); a scrape on any shard reads every
//! shard's counters with relaxed loads and renders the Prometheus text
//! exposition format 0.0.4: one series with the node's total and one series
//! per shard labelled `shard="N"`. Threads other than the owning shard (the
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
//! `Shard::publish` (the publishing shard's own members count too, at ~0);
//! with Redis the message carries only the event JSON, so the clock starts
//! when the shard's reader thread has read and checked it, and the histogram
//! covers reader → inbox → shard (including any wait at the inbox's high-water
//! mark) but not the trip through Redis.
//!
//! # Why no metrics crate
//!
//! We looked at `prometheus-client` (the official Rust client) for both the
//! recording and the encoding side, and keep the hand-rolled code:
//!
//! - Recording: its `Histogram` keeps its state behind a lock
//!   (`inner: Arc<Mutex<Inner>>`, `observe` calls `self.inner.lock()`, with a
//!   `TODO: Consider using atomics` in the source; later releases use a
//!   `parking_lot` lock, still a lock), its `Counter::inc` is a `fetch_add` (a
//!   locked read-modify-write where ours is a plain load + store), and a
//!   labelled `Family::get_or_create` takes an `RwLock` read guard and hashes
//!   the label set on every call. Per-shard use would need one `Family` label
//!   per shard or one registry per shard, and still pay those on every
//!   message. `metrics` + `metrics-exporter-prometheus` is the same story
//!   with a global recorder behind a `dyn` call and a registry lookup per
//!   key. That is the "lock on the hot path" the issue rules out.
//! - Encoding only (our atomics as the source of truth, read by a custom
//!   `Collector` at scrape time): possible, but then the crate is a text
//!   formatter. It writes OpenMetrics 1.0 (`application/openmetrics-text`,
//!   `# EOF`, counter names get `_total` appended so every existing series
//!   would have to be re-registered under a stripped name) rather than the
//!   0.0.4 format our scrapers and dashboards read today, and it allocates
//!   label sets per scrape just as we do. A few hundred lines of formatting
//!   are not worth a format change plus a dependency; the integration test
//!   (`tests/metrics.rs`) checks our output with the reference Python
//!   parser (`prometheus_client.parser`) instead.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

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
}

impl HandshakeResult {
    pub const ALL: [HandshakeResult; 7] = [
        HandshakeResult::Ok,
        HandshakeResult::BadRequest,
        HandshakeResult::Version,
        HandshakeResult::Unauthorized,
        HandshakeResult::Forbidden,
        HandshakeResult::Draining,
        HandshakeResult::Full,
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
            fn each(&self, mut f: impl FnMut(&'static str, &'static str, &'static str, u64)) {
                $( f(stringify!($name), $kind, $help, self.$name.get()); )*
            }
        }
    };
}

shard_metrics! {
    connections: "gauge", "Open WebSocket connections.";
    sockets: "gauge", "Open client sockets (HTTP and WebSocket).";
    connections_total: "counter", "WebSocket connections accepted (successful upgrades).";
    handshakes_failed_total: "counter", "HTTP requests to /ws or /echo refused before the upgrade (the sum of corecast_handshakes_total without result=\"ok\").";
    http_requests_total: "counter", "HTTP requests served (all paths).";
    messages_in_total: "counter", "WebSocket messages received from clients.";
    bytes_in_total: "counter", "Bytes received from client sockets.";
    messages_out_total: "counter", "Frames queued to clients (fan-out deliveries, replies, echoes).";
    bytes_out_total: "counter", "Bytes written to client sockets.";
    publishes_total: "counter", "Messages published from this shard (client ops and POST /api/publish).";
    inbox_messages_total: "counter", "Messages received through the shard's inbox.";
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
}

impl Metrics {
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            node_connections: AtomicUsize::new(0),
        }
    }

    pub fn shard(&self, i: usize) -> &ShardMetrics {
        &self.shards[i]
    }

    /// Sums one counter over all shards.
    pub fn total(&self, pick: impl Fn(&ShardMetrics) -> &Counter) -> u64 {
        self.shards.iter().map(|s| pick(s).get()).sum()
    }

    /// Prometheus text exposition. `extra` lines (already formatted) go first.
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(extra);
        let n = self.shards.len();
        let mut rows: Vec<(&'static str, &'static str, &'static str, Vec<u64>)> = Vec::new();
        for (i, s) in self.shards.iter().enumerate() {
            let mut k = 0;
            s.each(|name, kind, help, v| {
                if i == 0 {
                    rows.push((name, kind, help, Vec::with_capacity(n)));
                }
                rows[k].3.push(v);
                k += 1;
            });
        }
        for (name, kind, help, values) in rows {
            let total: u64 = values.iter().sum();
            let _ = writeln!(out, "# HELP corecast_{name} {help}");
            let _ = writeln!(out, "# TYPE corecast_{name} {kind}");
            let _ = writeln!(out, "corecast_{name} {total}");
            for (i, v) in values.iter().enumerate() {
                let _ = writeln!(out, "corecast_{name}{{shard=\"{i}\"}} {v}");
            }
        }
        self.render_handshakes(&mut out);
        self.render_latency(&mut out);
        out
    }

    fn render_handshakes(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP corecast_handshakes_total Upgrade requests on /ws and /echo by result.");
        let _ = writeln!(out, "# TYPE corecast_handshakes_total counter");
        for r in HandshakeResult::ALL {
            let label = r.label();
            let per: Vec<u64> = self.shards.iter().map(|s| s.handshakes(r)).collect();
            let _ = writeln!(out, "corecast_handshakes_total{{result=\"{label}\"}} {}", per.iter().sum::<u64>());
            for (i, v) in per.iter().enumerate() {
                let _ = writeln!(out, "corecast_handshakes_total{{result=\"{label}\",shard=\"{i}\"}} {v}");
            }
        }
    }

    fn render_latency(&self, out: &mut String) {
        const NAME: &str = "corecast_delivery_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {NAME} Publish accepted to frame queued on a receiving shard (once per message per shard)."
        );
        let _ = writeln!(out, "# TYPE {NAME} histogram");
        let snaps: Vec<_> = self.shards.iter().map(|s| s.delivery_latency.snapshot()).collect();
        let mut total = ([0u64; LATENCY_BOUNDS_NS.len() + 1], 0u64);
        for (b, sum) in &snaps {
            for (t, v) in total.0.iter_mut().zip(b) {
                *t += v;
            }
            total.1 += sum;
        }
        let one = |out: &mut String, shard: Option<usize>, (b, sum): &([u64; LATENCY_BOUNDS_NS.len() + 1], u64)| {
            let (sep, lbl) = match shard {
                Some(i) => (",", format!("shard=\"{i}\"")),
                None => ("", String::new()),
            };
            let mut cum = 0;
            for (i, v) in b.iter().enumerate() {
                cum += v;
                let le = match LATENCY_BOUNDS_NS.get(i) {
                    Some(ns) => format!("{}", *ns as f64 / 1e9),
                    None => "+Inf".into(),
                };
                let _ = writeln!(out, "{NAME}_bucket{{{lbl}{sep}le=\"{le}\"}} {cum}");
            }
            let braces = if lbl.is_empty() { String::new() } else { format!("{{{lbl}}}") };
            let _ = writeln!(out, "{NAME}_sum{braces} {}", *sum as f64 / 1e9);
            let _ = writeln!(out, "{NAME}_count{braces} {cum}");
        };
        one(out, None, &total);
        for (i, s) in snaps.iter().enumerate() {
            one(out, Some(i), s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_totals_and_per_shard_series() {
        let m = Metrics::new(2);
        m.shard(0).connections.add(3);
        m.shard(1).connections.add(4);
        m.shard(1).connections.sub(1);
        m.shard(1).bus_dropped_total.add_shared(2);
        let text = m.render("");
        assert!(text.contains("# TYPE corecast_connections gauge\ncorecast_connections 6\n"));
        assert!(text.contains("corecast_connections{shard=\"0\"} 3\n"));
        assert!(text.contains("corecast_connections{shard=\"1\"} 3\n"));
        assert!(text.contains("corecast_bus_dropped_total 2\n"));
        assert_eq!(m.total(|s| &s.connections), 6);
    }

    #[test]
    fn renders_handshakes_and_latency() {
        let m = Metrics::new(2);
        m.shard(0).handshake(HandshakeResult::Ok);
        m.shard(1).handshake(HandshakeResult::Unauthorized);
        m.shard(1).delivery_latency.observe(std::time::Duration::from_micros(20));
        m.shard(1).delivery_latency.observe(std::time::Duration::from_millis(3));
        m.shard(0).delivery_latency.observe(std::time::Duration::from_secs(5));
        let text = m.render("");
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
