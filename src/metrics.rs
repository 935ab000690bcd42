//! Per-shard counters, summed when `/metrics` is scraped.
//!
//! Each shard writes only its own `ShardMetrics` (a load and a store, no
//! locked instruction, no contention); a scrape on any shard reads every
//! shard's counters with relaxed loads and renders the Prometheus text
//! exposition format 0.0.4: one unlabelled series with the node's total and
//! one series per shard labelled `shard="N"`. Threads other than the owning
//! shard (the Redis readers) use `add_shared`, an atomic add.

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

macro_rules! shard_metrics {
    ($($name:ident : $kind:literal, $help:literal;)*) => {
        /// One shard's counters. Names are the Prometheus names without the
        /// `corecast_` prefix.
        #[derive(Default, Debug)]
        pub struct ShardMetrics { $(#[doc = $help] pub $name: Counter,)* }

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
    handshakes_failed_total: "counter", "HTTP requests to /ws or /echo refused before the upgrade.";
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
        out
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
}
