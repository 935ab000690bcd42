//! `/metrics` read by a real Prometheus text parser (the reference Python
//! `prometheus_client.parser`, installed by scripts/test.sh), checked against
//! what the test did: connections, handshake refusals, messages in and out,
//! publishes, the delivery-latency histogram, per-shard series summing to
//! the node's total.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use common::redis::{RedisServer, node};
use common::{Client, start_server};
use serde_json::{Value, json};

/// Turns the exposition text into the parser's samples.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

#[derive(Debug, Clone)]
struct Sample {
    family: String,
    kind: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Scrape(Vec<Sample>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut py = Command::new("python3")
            .args(["-c", PARSE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 (scripts/test.sh installs prometheus-client)");
        py.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = py.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the Prometheus parser rejected /metrics (pip install prometheus-client?): {}\n--- text ---\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        Scrape(
            v.into_iter()
                .map(|s| Sample {
                    family: s["family"].as_str().unwrap().into(),
                    kind: s["type"].as_str().unwrap().into(),
                    name: s["name"].as_str().unwrap().into(),
                    labels: serde_json::from_value(s["labels"].clone()).unwrap(),
                    value: s["value"].as_f64().unwrap(),
                })
                .collect(),
        )
    }

    /// The value of the sample `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.0
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .unwrap_or_else(|| panic!("no sample {name}{want:?}"))
            .value
    }
}

#[test]
fn metrics_parse_and_match_what_was_sent() {
    const N: usize = 6;
    const M: usize = 5;
    let s = start_server(&["--shards", "2"]);
    // Two refusals: not an upgrade (400), wrong version (426).
    assert_eq!(s.http_get("/ws").0, 400);
    let v12 = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "12"),
    ];
    assert_eq!(s.http("GET", "/ws", &v12, b"").0, 426);

    let mut cs: Vec<Client> = (0..N).map(|i| Client::connect(&s.ws_url(&format!("/ws?user=m{i}")))).collect();
    s.wait_until("all connections counted", || s.metric("corecast_connections") as usize == N);
    for c in cs.iter_mut() {
        c.subscribe("obs");
    }
    let before = Scrape::parse(&s.metrics());
    for i in 0..M {
        cs[0].send_json(&json!({"op":"publish","room":"obs","data":i}));
    }
    for c in cs.iter_mut() {
        for i in 0..M {
            assert_eq!(c.recv(), json!({"ev":"message","room":"obs","from":"m0","data":i}));
        }
    }
    let text = s.metrics();
    let after = Scrape::parse(&text);
    let total = |name: &str| after.get(name, &[]);

    assert_eq!(total("corecast_connections"), N as f64);
    assert_eq!(total("corecast_connections_total"), N as f64);
    assert_eq!(after.get("corecast_handshakes_total", &[("result", "ok")]), N as f64);
    assert_eq!(after.get("corecast_handshakes_total", &[("result", "bad_request")]), 1.0);
    assert_eq!(after.get("corecast_handshakes_total", &[("result", "version")]), 1.0);
    assert_eq!(after.get("corecast_handshakes_total", &[("result", "unauthorized")]), 0.0);
    assert_eq!(total("corecast_handshakes_failed_total"), 2.0);
    // N subscribes and M publishes.
    assert_eq!(total("corecast_messages_in_total"), (N + M) as f64);
    assert_eq!(total("corecast_publishes_total"), M as f64);
    // Between the scrapes: M messages to each of N members, plus the first
    // scrape's own HTTP response (queued after it was rendered).
    let out = total("corecast_messages_out_total") - before.get("corecast_messages_out_total", &[]);
    assert_eq!(out, (M * N + 1) as f64);

    // The histogram: one observation per message per shard with members
    // (both shards, or only one if every client landed on the same shard).
    const H: &str = "corecast_delivery_latency_seconds";
    assert!(after.0.iter().any(|s| s.family == H && s.kind == "histogram"), "{H} is a histogram");
    let count = total(&format!("{H}_count"));
    assert!(count >= M as f64 && count <= (2 * M) as f64, "{H}_count {count}");
    assert!(total(&format!("{H}_sum")) >= 0.0);
    for shard in [None, Some("0"), Some("1")] {
        let buckets: Vec<&Sample> = after
            .0
            .iter()
            .filter(|s| s.name == format!("{H}_bucket") && s.labels.get("shard").map(String::as_str) == shard)
            .collect();
        assert!(buckets.len() >= 10, "{shard:?}: {} buckets", buckets.len());
        let les: Vec<f64> =
            buckets.iter().map(|b| b.labels["le"].replace("+Inf", "inf").parse::<f64>().unwrap()).collect();
        assert!(les.windows(2).all(|w| w[0] < w[1]), "bounds increase: {les:?}");
        assert!(buckets.windows(2).all(|w| w[0].value <= w[1].value), "cumulative buckets never decrease");
        assert_eq!(buckets.last().unwrap().labels["le"], "+Inf");
        let c = match shard {
            None => count,
            Some(i) => after.get(&format!("{H}_count"), &[("shard", i)]),
        };
        assert_eq!(buckets.last().unwrap().value, c, "+Inf bucket == _count ({shard:?})");
    }

    // Every per-shard series sums to the series without the shard label.
    let mut sums: BTreeMap<(String, BTreeMap<String, String>), (f64, usize)> = BTreeMap::new();
    for smp in after.0.iter().filter(|s| s.labels.contains_key("shard")) {
        let mut rest = smp.labels.clone();
        rest.remove("shard");
        let e = sums.entry((smp.name.clone(), rest)).or_default();
        e.0 += smp.value;
        e.1 += 1;
    }
    assert!(sums.len() > 30, "per-shard series: {}", sums.len());
    for ((name, labels), (sum, shards)) in sums {
        assert_eq!(shards, 2, "{name}{labels:?}: one series per shard");
        let node = after.0.iter().find(|s| s.name == name && s.labels == labels);
        let node = node.unwrap_or_else(|| panic!("no node total for {name}{labels:?}")).value;
        assert!((node - sum).abs() <= 1e-9 * node.abs().max(1.0), "{name}{labels:?}: node {node} != shards {sum}");
    }
}

#[test]
fn with_redis_the_latency_histogram_counts_deliveries_from_the_reader() {
    const M: usize = 4;
    let redis = RedisServer::start();
    let s = node(&redis.url(), 1);
    let mut a = Client::connect(&s.ws_url("/ws?user=a"));
    a.subscribe("obs");
    for i in 0..M {
        a.send_json(&json!({"op":"publish","room":"obs","data":i}));
    }
    for i in 0..M {
        assert_eq!(a.recv(), json!({"ev":"message","room":"obs","from":"a","data":i}));
    }
    let after = Scrape::parse(&s.metrics());
    // One shard with one member: one observation per message, through Redis.
    assert_eq!(after.get("corecast_delivery_latency_seconds_count", &[]), M as f64);
    assert_eq!(after.get("corecast_delivery_latency_seconds_bucket", &[("le", "+Inf")]), M as f64);
    assert_eq!(after.get("corecast_publishes_total", &[]), M as f64);
}
