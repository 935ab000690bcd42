//! The result of a run and its three renderings: the summary table on
//! stdout, the JSON file (`--json`), and a self-contained HTML page
//! (`--html`) whose plots are inline SVG drawn by [`crate::svg`].

use std::fmt::Write as _;

use serde::Serialize;

use crate::coordinator::si;
use crate::plan::{Failures, Scenario};
use crate::stats::Summary;
use crate::svg::{self, Series};

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub scenario: Scenario,
    pub command: Vec<String>,
    pub started_unix_s: u64,
    /// ctrl-c (or SIGTERM) cut the run short: the numbers cover what ran.
    pub interrupted: bool,
    pub targets: Vec<String>,
    pub generator: GeneratorStats,
    /// Present when `--server-pid` was given.
    pub server: Option<ServerStats>,
    pub connections: ConnectStats,
    pub idle: Option<IdleStats>,
    pub traffic: Option<TrafficStats>,
    /// Send → delivery (fanout) or send → echo (echo), µs.
    pub latency: Option<Summary>,
    /// Publish → ack, µs.
    pub ack_latency: Option<Summary>,
    /// `[value_ns, count]` buckets of `latency`, for re-analysis.
    pub latency_histogram_ns: Vec<[u64; 2]>,
    /// `(upper bound µs, count)`, 10 bins per decade.
    pub latency_bins_us: Vec<(f64, u64)>,
    pub handshake_bins_us: Vec<(f64, u64)>,
    /// One sample per second from the start of the ramp.
    pub timeline: Vec<Sample>,
    pub first_error: Option<String>,
    /// The client protocol spoken (`--protocol`).
    pub protocol: crate::proto::Protocol,
    /// CPU seconds of the `--redis-pid` processes, Go → end of drain.
    pub redis_cpu_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct GeneratorStats {
    pub workers: usize,
    /// Workers that died before reporting (their numbers are missing).
    pub workers_lost: usize,
    /// CPUs the generator may run on (`taskset`).
    pub cores: usize,
    pub source_ips: Vec<String>,
    pub nofile_limit: u64,
    /// All workers' CPU seconds from their start until all connections were ready.
    pub ramp_cpu_s: f64,
    /// All workers' CPU seconds during the measured phase.
    pub cpu_s: f64,
    pub wall_s: f64,
    /// `cpu_s / wall_s` in percent of one core.
    pub cpu_pct: f64,
    /// Same, in percent of all `cores`: near 100 means the generator saturates.
    pub cpu_pct_of_cores: f64,
    /// The busiest worker, in percent of one core: near 100 means that one saturates.
    pub max_worker_cpu_pct: f64,
}

#[derive(Debug, Serialize)]
pub struct ServerStats {
    pub pids: Vec<u32>,
    /// Summed over the pids: before any connection, when all were ready, at the end.
    pub rss_before_kb: u64,
    pub rss_ready_kb: u64,
    pub rss_end_kb: u64,
    /// CPU seconds while connections were opened (before → all ready).
    pub ramp_cpu_s: f64,
    /// CPU seconds during the measured phase (Go → Stop).
    pub cpu_s: f64,
    /// In percent of one core.
    pub cpu_pct: f64,
    /// Of `cpu_s`, the kernel's (stime) share in percent.
    pub kernel_pct: f64,
    /// CPU seconds from Go to the end of the drain (all deliveries counted).
    pub cpu_with_drain_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ConnectStats {
    pub target: u64,
    pub started: u64,
    /// Upgraded (101).
    pub connected: u64,
    /// Upgraded and, where needed, subscribed.
    pub ready: u64,
    pub failed: u64,
    pub failures: Failures,
    /// Ready connections the server or network closed before the end.
    pub dropped: u64,
    /// Ready when the measured phase started.
    pub ready_at_go: u64,
    /// From the first connect() to the last connection becoming ready.
    pub time_to_all_ready_s: f64,
    pub ready_per_s: f64,
    /// `--connect-rate` (0 = unpaced).
    pub target_rate_per_s: f64,
    /// connect() → 101, µs.
    pub handshake: Summary,
}

#[derive(Debug, Serialize)]
pub struct IdleStats {
    pub connections: u64,
    pub hold_s: f64,
    /// (server RSS when all ready − RSS before) / connections.
    pub server_rss_per_conn_bytes: Option<f64>,
    pub server_cpu_s: Option<f64>,
    /// Server CPU µs per connection per second of idle hold.
    pub server_cpu_us_per_conn_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct TrafficStats {
    pub senders: u64,
    pub subscribers: u64,
    pub rooms: u64,
    /// 0 = window mode (as fast as acks/replies allow).
    pub target_rate_per_s: f64,
    pub window: u64,
    pub payload_bytes: u64,
    pub duration_s: f64,
    pub sent: u64,
    pub sent_per_s: f64,
    pub acked: u64,
    pub errors: u64,
    pub maintenance: u64,
    /// Deliveries the sends should cause (room members per publish; 1 per echo).
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    /// Received over Go → last delivery.
    pub received_per_s: f64,
    /// Received per server CPU-second (Go → end of drain).
    pub received_per_server_cpu_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the start of the ramp.
    pub t_s: f64,
    pub phase: String,
    pub ready: u64,
    pub failed: u64,
    pub sent_per_s: f64,
    pub received_per_s: f64,
    pub server_cpu_pct: Option<f64>,
    pub server_rss_mb: Option<f64>,
    /// All workers, percent of one core.
    pub generator_cpu_pct: f64,
}

fn us(v: f64) -> String {
    if v >= 10_000.0 { format!("{:.1} ms", v / 1000.0) } else { format!("{v:.0} µs") }
}

fn latency_line(s: &Summary) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
        us(s.p50_us),
        us(s.p90_us),
        us(s.p99_us),
        us(s.p999_us),
        us(s.max_us),
        s.count
    )
}

impl RunReport {
    /// `(label, value)` rows shared by the text table and the HTML page.
    pub fn rows(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        let c = &self.connections;
        let g = &self.generator;
        row(
            "scenario",
            format!("{}{}", self.scenario.name(), if self.interrupted { " (interrupted: partial)" } else { "" }),
        );
        row("targets", format!("{} ({} protocol)", self.targets.join(", "), self.protocol.name()));
        row(
            "connections",
            format!(
                "{} ready of {} (upgraded {}, failed {}, dropped {})",
                c.ready, c.target, c.connected, c.failed, c.dropped
            ),
        );
        if c.failed > 0 {
            let f = &c.failures;
            row(
                "failures",
                format!(
                    "connect {} upgrade {} subscribe {} timeout {} closed {}",
                    f.connect, f.upgrade, f.subscribe, f.timeout, f.closed
                ),
            );
        }
        let pace =
            if c.target_rate_per_s > 0.0 { format!("target {}/s", si(c.target_rate_per_s)) } else { "unpaced".into() };
        row("ramp", format!("all ready in {:.2} s, {}/s ({pace})", c.time_to_all_ready_s, si(c.ready_per_s)));
        row("handshake", latency_line(&c.handshake));
        let per_conn = |cpu: f64| {
            if c.ready > 0 { format!(" = {:.1} µs per connection", cpu * 1e6 / c.ready as f64) } else { String::new() }
        };
        let mut ramp_cpu = format!("generator {:.2} s{}", g.ramp_cpu_s, per_conn(g.ramp_cpu_s));
        if let Some(s) = &self.server {
            let _ = write!(ramp_cpu, "; server {:.2} s{}", s.ramp_cpu_s, per_conn(s.ramp_cpu_s));
        }
        row("ramp CPU", ramp_cpu);
        if let Some(i) = &self.idle {
            row("idle hold", format!("{:.1} s with {} connections", i.hold_s, i.connections));
            if let (Some(rss), Some(cpu), Some(us_per)) =
                (i.server_rss_per_conn_bytes, i.server_cpu_s, i.server_cpu_us_per_conn_s)
            {
                row("server RSS / conn", format!("{:.0} bytes ({:.2} KiB)", rss, rss / 1024.0));
                // /proc/<pid>/stat counts in clock ticks (10 ms at USER_HZ 100).
                let tick_us = 1e6 / crate::procfs::clock_ticks_per_sec();
                let resolution = tick_us / (i.connections.max(1) as f64 * i.hold_s.max(1e-9));
                row(
                    "server CPU idle",
                    format!(
                        "{cpu:.2} s = {us_per:.4} µs per connection-second (resolution {resolution:.4}: one clock tick)"
                    ),
                );
            }
        }
        if let Some(t) = &self.traffic {
            let pace = if t.target_rate_per_s > 0.0 {
                format!("target {}/s, window {}", si(t.target_rate_per_s), t.window)
            } else {
                format!("window {} per sender", t.window)
            };
            row(
                "sent",
                format!(
                    "{} in {:.1} s = {}/s ({pace}); acked {}, errors {}",
                    t.sent,
                    t.duration_s,
                    si(t.sent_per_s),
                    t.acked,
                    t.errors
                ),
            );
            let what = if self.scenario == Scenario::Echo { "replies" } else { "deliveries" };
            row(
                what,
                format!(
                    "{} of {} expected = {}/s, lost {} ({:.4}%)",
                    t.received,
                    t.expected,
                    si(t.received_per_s),
                    t.lost,
                    t.loss_pct
                ),
            );
            if let Some(per_cpu) = t.received_per_server_cpu_s {
                row(&format!("{what} / server CPU-s"), si(per_cpu));
            }
        }
        if let Some(l) = &self.latency {
            row(if self.scenario == Scenario::Echo { "round trip" } else { "end-to-end" }, latency_line(l));
        }
        if let Some(l) = &self.ack_latency {
            row("publish → ack", latency_line(l));
        }
        if let Some(s) = &self.server {
            row(
                "server",
                format!(
                    "pids {:?}: cpu {:.2} s ({:.0}% of a core, {:.0}% of it in the kernel) in the measured phase; RSS {:.1} → {:.1} → {:.1} MiB",
                    s.pids,
                    s.cpu_s,
                    s.cpu_pct,
                    s.kernel_pct,
                    s.rss_before_kb as f64 / 1024.0,
                    s.rss_ready_kb as f64 / 1024.0,
                    s.rss_end_kb as f64 / 1024.0
                ),
            );
        }
        if let Some(cpu) = self.redis_cpu_s {
            row("redis", format!("cpu {cpu:.2} s from Go to the end of the drain"));
        }
        row(
            "generator",
            format!(
                "{} workers on {} cores, cpu {:.2} s in {:.1} s = {:.0}% of a core ({:.0}% of its cores; busiest worker {:.0}%)",
                g.workers, g.cores, g.cpu_s, g.wall_s, g.cpu_pct, g.cpu_pct_of_cores, g.max_worker_cpu_pct
            ),
        );
        if !g.source_ips.is_empty() {
            row("source IPs", g.source_ips.join(", "));
        }
        if g.workers_lost > 0 {
            row("WARNING", format!("{} workers died before reporting", g.workers_lost));
        }
        if let Some(e) = &self.first_error {
            row("first error", e.clone());
        }
        rows
    }

    pub fn table(&self) -> String {
        let rows = self.rows();
        let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        out
    }

    pub fn html(&self) -> String {
        let mut h = String::new();
        let title = format!("corecast-bench {}", self.scenario.name());
        let _ = write!(
            h,
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
             body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}\
             table{{border-collapse:collapse}}td{{padding:3px 12px;border-bottom:1px solid #ddd;vertical-align:top}}\
             td:first-child{{font-weight:600;white-space:nowrap}}code{{background:#f4f4f4;padding:2px 4px}}\
             svg{{margin:1em 0;display:block}}</style></head><body>\n<h1>{t}</h1>\n<p><code>{cmd}</code></p>\n<table>\n",
            t = esc(&title),
            cmd = esc(&self.command.join(" "))
        );
        for (k, v) in self.rows() {
            let _ = writeln!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(&k), esc(&v));
        }
        h.push_str("</table>\n");
        if !self.latency_bins_us.is_empty() {
            let what = if self.scenario == Scenario::Echo { "Round-trip latency" } else { "End-to-end latency" };
            h.push_str(&svg::histogram(
                &format!("{what} distribution (bars) and CDF (line)"),
                "latency (µs, log scale)",
                &self.latency_bins_us,
            ));
        }
        let t = &self.timeline;
        let xy = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
            t.iter().filter_map(|s| f(s).map(|v| (s.t_s, v))).collect()
        };
        if self.traffic.is_some() {
            let (sent, recv) = if self.scenario == Scenario::Echo {
                ("requests/s", "replies/s")
            } else {
                ("publishes/s", "deliveries/s")
            };
            h.push_str(&svg::line_chart(
                "Throughput per second",
                "seconds since start",
                "per second",
                &[
                    Series { name: recv.into(), color: "#1f77b4", points: xy(&|s| Some(s.received_per_s)) },
                    Series { name: sent.into(), color: "#ff7f0e", points: xy(&|s| Some(s.sent_per_s)) },
                ],
            ));
        }
        h.push_str(&svg::line_chart(
            "Connections ready",
            "seconds since start",
            "connections",
            &[
                Series { name: "ready".into(), color: "#2ca02c", points: xy(&|s| Some(s.ready as f64)) },
                Series { name: "failed".into(), color: "#d62728", points: xy(&|s| Some(s.failed as f64)) },
            ],
        ));
        h.push_str(&svg::line_chart(
            "CPU per second (100% = one core)",
            "seconds since start",
            "% of a core",
            &[
                Series { name: "server".into(), color: "#9467bd", points: xy(&|s| s.server_cpu_pct) },
                Series { name: "generator".into(), color: "#8c564b", points: xy(&|s| Some(s.generator_cpu_pct)) },
            ],
        ));
        if self.server.is_some() {
            h.push_str(&svg::line_chart(
                "Server RSS",
                "seconds since start",
                "MiB",
                &[Series { name: "RSS".into(), color: "#17becf", points: xy(&|s| s.server_rss_mb) }],
            ));
        }
        if !self.handshake_bins_us.is_empty() {
            h.push_str(&svg::histogram(
                "Handshake latency (connect → 101)",
                "latency (µs, log scale)",
                &self.handshake_bins_us,
            ));
        }
        h.push_str("</body></html>\n");
        h
    }
}

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(ch),
        }
    }
    out
}
