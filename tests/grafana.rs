//! `docs/grafana/corecast.json` against real nodes: every PromQL expression
//! in the dashboard (panel targets and template-variable queries) is taken
//! apart into the metric names it selects, and each name must be exported by
//! a running corecast, a standalone node or one on a private redis-server
//! (`corecast_redis_node_links_up` exists only with `--redis`). A selector
//! asking for per-shard series (`shard!=""`) must name a family that has
//! them. The dashboard must also keep its seven rows, in order, each naming
//! the metrics its topic is about, so a dashboard trimmed to nothing fails.
//!
//! The extractor is a small PromQL tokenizer, not a parser: it skips string
//! literals, label matchers (`{...}`), ranges (`[...]`), numbers and
//! durations, Grafana variables (`$x`, `${x}`), keywords, and the label lists
//! after `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`; an
//! identifier followed by `(` is a function or an aggregation; every other
//! identifier is a series selector, i.e. a metric name. A name with
//! `_bucket`/`_sum`/`_count` counts as its base family only when the
//! exposition declares that base a histogram.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::redis::RedisServer;
use common::{Server, start_server};
use serde_json::{Value, json};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/corecast.json");

/// The dashboard's rows, in order, and metrics (families) each must use.
const TOPICS: &[(&str, &[&str])] = &[
    ("Connections", &["corecast_connections", "corecast_connections_total", "corecast_handshakes_total"]),
    ("Deliveries", &["corecast_messages_out_total", "corecast_publishes_total", "corecast_bytes_out_total"]),
    ("Delivery latency", &["corecast_delivery_latency_seconds"]),
    ("Slow consumers and cut-offs", &["corecast_slow_consumer_disconnects_total", "corecast_full_sockets"]),
    (
        "Redis links",
        &[
            "corecast_redis_connected",
            "corecast_redis_publisher_connected",
            "corecast_redis_node_links_up",
            "corecast_redis_reconnects_total",
            "corecast_redis_publish_lost_total",
        ],
    ),
    ("Inbox backlog", &["corecast_inbox_backlog", "corecast_inbox_dropped_total"]),
    (
        "History and recovery",
        &["corecast_history_recovered_total", "corecast_history_unrecovered_total", "corecast_history_gaps_total"],
    ),
];

// ---- the extractor ------------------------------------------------------------

/// One series selector in an expression: the metric name and the text of its
/// label matchers (without the braces; empty if none).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    name: String,
    matchers: String,
}

/// PromQL words that are not metric names where they stand without `(`.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// The index just past the string literal starting at `i`.
fn skip_string(b: &[u8], i: usize) -> Result<usize, String> {
    let q = b[i];
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' if q != b'`' => j += 2,
            c if c == q => return Ok(j + 1),
            _ => j += 1,
        }
    }
    Err(format!("unterminated string at {i}"))
}

/// The index just past the group opened by `b[i]` (`{`, `[` or `(`),
/// skipping nested groups and strings.
fn skip_group(b: &[u8], i: usize) -> Result<usize, String> {
    let mut stack = vec![b[i]];
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'"' | b'\'' | b'`' => {
                j = skip_string(b, j)?;
                continue;
            }
            c @ (b'{' | b'[' | b'(') => stack.push(c),
            c @ (b'}' | b']' | b')') => {
                let open = stack.pop().unwrap();
                if (open, c) != (b'{', b'}') && (open, c) != (b'[', b']') && (open, c) != (b'(', b')') {
                    return Err(format!("`{}` at {j} closes `{}`", c as char, open as char));
                }
                if stack.is_empty() {
                    return Ok(j + 1);
                }
            }
            _ => {}
        }
        j += 1;
    }
    Err(format!("unclosed `{}` at {i}", b[i] as char))
}

fn skip_space(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Every series selector in a PromQL expression (with Grafana variables).
fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut depth = 0i32;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => i = skip_string(b, i)?,
            // Label matchers without a name before them (`{__name__=...}`),
            // ranges, subqueries, `[[var]]`.
            b'{' | b'[' => i = skip_group(b, i)?,
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced `)` at {i}"));
                }
                i += 1;
            }
            b'}' | b']' => return Err(format!("unbalanced `{}` at {i}", c as char)),
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            // Grafana variables: `$name`, `${name}`, `${name:format}`.
            b'$' => {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    i = skip_group(b, i)?;
                } else {
                    while i < b.len() && ident_char(b[i]) {
                        i += 1;
                    }
                }
            }
            // Numbers and durations: 0.99, 1e-9, 0x1f, 5m, 1h30m.
            c if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) => {
                let hex = c == b'0' && matches!(b.get(i + 1), Some(b'x' | b'X'));
                i += 1;
                while i < b.len() {
                    let d = b[i];
                    let exp_sign = !hex && matches!(d, b'+' | b'-') && matches!(b[i - 1], b'e' | b'E');
                    if d.is_ascii_alphanumeric() || d == b'.' || d == b'_' || exp_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
            }
            c if ident_start(c) => {
                let start = i;
                while i < b.len() && ident_char(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let next = skip_space(b, i);
                let lower = word.to_ascii_lowercase();
                if LABEL_LISTS.contains(&lower.as_str()) && b.get(next) == Some(&b'(') {
                    i = skip_group(b, next)?;
                } else if b.get(next) == Some(&b'(') || KEYWORDS.contains(&lower.as_str()) {
                    // A function or aggregation (its arguments follow), or a keyword.
                } else if b.get(next) == Some(&b'{') {
                    let end = skip_group(b, next)?;
                    out.push(Selector { name: word.into(), matchers: expr[next + 1..end - 1].into() });
                    i = end;
                } else {
                    out.push(Selector { name: word.into(), matchers: String::new() });
                }
            }
            _ => i += 1,
        }
    }
    if depth != 0 {
        return Err("unclosed `(`".into());
    }
    Ok(out)
}

/// The metric names an expression selects.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    Ok(selectors(expr)?.into_iter().map(|s| s.name).collect())
}

/// The PromQL inside a Grafana Prometheus variable query, if any:
/// `label_values(expr, label)` → `expr`; `query_result(expr)` → `expr`;
/// `label_values(label)`, `label_names()`, `metrics(regex)` → none; anything
/// else is PromQL as it stands.
fn variable_promql(q: &str) -> Option<String> {
    let q = q.trim();
    let call = |f: &str| q.strip_prefix(f).and_then(|r| r.trim_start().strip_prefix('(')?.strip_suffix(')'));
    if let Some(args) = call("label_values") {
        // The label is the last argument; with one argument there is no expr.
        return args.rsplit_once(',').map(|(e, _)| e.trim().to_string());
    }
    if let Some(inner) = call("query_result") {
        return Some(inner.to_string());
    }
    if call("label_names").is_some() || call("metrics").is_some() {
        return None;
    }
    Some(q.to_string())
}

/// Every PromQL expression in a dashboard: (where, expr). Panel targets
/// (also inside collapsed rows), annotation queries, and query variables.
fn expressions(dash: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, place: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                let place =
                    m.get("title").and_then(Value::as_str).map_or(place.to_string(), |t| format!("panel {t:?}"));
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push((place.clone(), e.clone()));
                }
                for (k, v) in m {
                    if k != "templating" {
                        walk(v, &place, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, place, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, "dashboard", &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let q = match &var["query"] {
            Value::String(s) => s.as_str(),
            q => q["query"].as_str().unwrap_or_default(),
        };
        if let Some(e) = variable_promql(q) {
            out.push((format!("variable ${}", var["name"].as_str().unwrap_or("?")), e));
        }
    }
    out
}

// ---- the exposition ------------------------------------------------------------

/// What one `/metrics` scrape declares: families by `# TYPE` and the sample
/// names, and which sample names have per-shard series.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: BTreeSet<String>,
    sharded: BTreeSet<String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let mut w = t.split_whitespace();
                if let (Some(name), Some(kind)) = (w.next(), w.next()) {
                    e.types.insert(name.into(), kind.into());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
                let name = &line[..end];
                e.samples.insert(name.into());
                if line[end..].starts_with('{') && line[end..].contains("shard=\"") {
                    e.sharded.insert(name.into());
                }
            }
        }
        e
    }

    /// The family a name in a query stands for, if this scrape exports it.
    fn family(&self, name: &str) -> Option<String> {
        if self.types.contains_key(name) {
            return Some(name.into());
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && self.types.get(base).map(String::as_str) == Some("histogram")
            {
                return Some(base.into());
            }
        }
        self.samples.contains(name).then(|| name.into())
    }
}

/// What is wrong with `dash` against these scrapes: expressions that do not
/// tokenize, metrics no scrape exports, `shard!=""` on a family without
/// per-shard series. Empty when all is well.
fn problems(dash: &Value, scrapes: &[Exposition]) -> Vec<String> {
    let mut out = Vec::new();
    for (place, expr) in expressions(dash) {
        let sels = match selectors(&expr) {
            Ok(s) => s,
            Err(e) => {
                out.push(format!("{place}: cannot read {expr:?}: {e}"));
                continue;
            }
        };
        for s in sels {
            if !scrapes.iter().any(|x| x.family(&s.name).is_some()) {
                out.push(format!("{place}: `{}` is not exported by corecast", s.name));
            } else if s.matchers.replace(' ', "").contains("shard!=\"\"")
                && !scrapes.iter().any(|x| x.sharded.contains(&s.name))
            {
                out.push(format!("{place}: `{}` has no per-shard series but is selected with shard!=\"\"", s.name));
            }
        }
    }
    out
}

/// The families each row's panels use, rows in order: top-level panels
/// after a row panel belong to it, and so do a collapsed row's own panels.
fn rows(dash: &Value, scrapes: &[Exposition]) -> Vec<(String, BTreeSet<String>)> {
    let mut out: Vec<(String, BTreeSet<String>)> = Vec::new();
    let add = |out: &mut Vec<(String, BTreeSet<String>)>, panel: &Value| {
        let Some(row) = out.last_mut() else { return };
        for (_, expr) in expressions(panel) {
            for name in metric_names(&expr).unwrap_or_default() {
                if let Some(f) = scrapes.iter().find_map(|x| x.family(&name)) {
                    row.1.insert(f);
                }
            }
        }
    };
    for p in dash["panels"].as_array().into_iter().flatten() {
        if p["type"] == "row" {
            out.push((p["title"].as_str().unwrap_or_default().to_string(), BTreeSet::new()));
            for inner in p["panels"].as_array().into_iter().flatten() {
                add(&mut out, inner);
            }
        } else {
            add(&mut out, p);
        }
    }
    out
}

fn scrape(s: &Server) -> Exposition {
    Exposition::parse(&s.metrics())
}

/// Scrapes of a standalone node and of a node on a private redis-server
/// (with room history on), both on the driver `CORECAST_TEST_DRIVER` names.
fn scrape_both() -> [Exposition; 2] {
    let standalone = start_server(&["--shards", "2"]);
    let redis = RedisServer::start();
    let with_redis = start_server(&["--shards", "2", "--redis", &redis.url(), "--history-size", "16"]);
    [scrape(&standalone), scrape(&with_redis)]
}

fn load_dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap_or_else(|e| panic!("read {DASHBOARD}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

// ---- the tests ------------------------------------------------------------------

#[test]
fn every_metric_the_dashboard_names_is_exported() {
    let dash = load_dashboard();
    let scrapes = scrape_both();
    assert!(scrapes[1].types.contains_key("corecast_redis_node_links_up"), "the Redis node exports its links");

    let exprs = expressions(&dash);
    let mut used = BTreeSet::new();
    for (_, e) in &exprs {
        used.extend(metric_names(e).unwrap_or_default());
    }
    let bad = problems(&dash, &scrapes);
    assert!(bad.is_empty(), "docs/grafana/corecast.json:\n  {}", bad.join("\n  "));
    let families: BTreeSet<String> = used.iter().filter_map(|n| scrapes.iter().find_map(|x| x.family(n))).collect();
    let exported: BTreeSet<&String> = scrapes.iter().flat_map(|x| x.types.keys()).collect();
    let unused: Vec<&&String> = exported.iter().filter(|f| !families.contains(f.as_str())).collect();
    println!(
        "{} expressions, {} metric names, {} of {} exported families; not on the dashboard: {unused:?}",
        exprs.len(),
        used.len(),
        families.len(),
        exported.len()
    );
}

#[test]
fn the_dashboard_has_its_seven_rows_in_order_each_on_its_topic() {
    let dash = load_dashboard();
    let scrapes = scrape_both();

    let rows = rows(&dash, &scrapes);
    let titles: Vec<&str> = rows.iter().map(|(t, _)| t.as_str()).collect();
    let want: Vec<&str> = TOPICS.iter().map(|(t, _)| *t).collect();
    assert_eq!(titles, want, "the dashboard's rows");
    for ((title, used), (_, needs)) in rows.iter().zip(TOPICS) {
        for m in *needs {
            assert!(used.contains(*m), "row {title:?} does not use {m}; it uses {used:?}");
        }
    }
    // Latency is read as quantiles of the real histogram.
    let exprs = expressions(&dash);
    assert!(
        exprs.iter().any(|(_, e)| e.contains("histogram_quantile(0.99")
            && e.contains("rate(corecast_delivery_latency_seconds_bucket")),
        "a p99 from corecast_delivery_latency_seconds_bucket"
    );

    // Importable and readable: a datasource input and variable every panel
    // uses, an instance variable, and a description on every panel.
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    let vars = dash["templating"]["list"].as_array().expect("templating.list");
    assert!(vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"));
    assert!(vars.iter().any(|v| v["name"] == "instance" && v["type"] == "query"));
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate panel id {}", p["id"]);
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap_or_default();
        assert!(p["description"].as_str().is_some_and(|d| d.len() > 20), "panel {title:?} needs a description");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?}");
        let targets = p["targets"].as_array().map_or(0, Vec::len);
        assert!(targets > 0, "panel {title:?} has no query");
        for t in p["targets"].as_array().unwrap() {
            assert!(t["expr"].as_str().is_some_and(|e| e.contains("$instance")), "panel {title:?}: {t}");
        }
    }
    println!("rows: {titles:?}");
}

/// The check fails for what it must: a metric corecast does not export, a
/// suffix on a family that is no histogram, a variable on a bogus metric, a
/// per-shard selector on a node-level gauge, an expression that does not
/// tokenize; and it stays quiet for real names around them.
#[test]
fn a_bogus_metric_is_reported_against_a_real_scrape() {
    let scrapes = scrape_both();
    let dash = json!({
        "panels": [
            {"type": "row", "title": "Bogus", "panels": []},
            {"type": "timeseries", "title": "mixed", "targets": [
                {"expr": "sum by (shard) (rate(corecast_connections_total{instance=~\"$instance\"}[5m])) \
                          + on (instance) group_left corecast_no_such_metric{shard=\"0\"}"},
                {"expr": "histogram_quantile(0.99, sum by (le) (rate(corecast_delivery_latency_seconds_bucket[5m])))"},
                {"expr": "rate(corecast_connections_bucket[5m])"},
                {"expr": "corecast_open_fds{shard!=\"\"}"},
                {"expr": "sum(rate(corecast_publishes_total[5m]"},
            ]},
        ],
        "templating": {"list": [
            {"name": "instance", "type": "query", "query": {"query": "label_values(corecast_bogus_info, instance)"}},
        ]},
    });
    let bad = problems(&dash, &scrapes);
    let has = |what: &str| bad.iter().any(|p| p.contains(what));
    assert!(has("`corecast_no_such_metric` is not exported"), "{bad:#?}");
    assert!(has("`corecast_connections_bucket` is not exported"), "{bad:#?}");
    assert!(has("variable $instance: `corecast_bogus_info` is not exported"), "{bad:#?}");
    assert!(has("`corecast_open_fds` has no per-shard series"), "{bad:#?}");
    assert!(has("cannot read \"sum(rate(corecast_publishes_total[5m]\""), "{bad:#?}");
    assert_eq!(bad.len(), 5, "nothing else: {bad:#?}");

    // The real dashboard with one bogus query added fails the same check.
    let mut real = load_dashboard();
    let panel = real["panels"].as_array_mut().unwrap().iter_mut().find(|p| p["type"] != "row").unwrap();
    panel["targets"].as_array_mut().unwrap().push(json!({"expr": "rate(corecast_messages_delivered_total[5m])"}));
    let bad = problems(&real, &scrapes);
    assert_eq!(bad.len(), 1, "{bad:#?}");
    assert!(bad[0].contains("`corecast_messages_delivered_total` is not exported"), "{bad:#?}");

    // A dashboard trimmed to nothing has no rows for the topics.
    let empty = json!({"panels": []});
    assert!(rows(&empty, &scrapes).is_empty());
}

#[test]
fn the_extractor_keeps_metrics_and_drops_the_rest() {
    let names = |e: &str| metric_names(e).unwrap().into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (instance, le) \
             (rate(a_bucket{instance=~\"$instance\",shard=\"\",x=~\"}{[(\"}[$__rate_interval])))"
        ),
        ["a_bucket"]
    );
    assert_eq!(names("sum(b) by (shard) / on(instance) group_left(version) c offset 5m"), ["b", "c"]);
    assert_eq!(names("clamp_min(d - deriv(e[5m]), 0) > bool 1e-9 and f unless g or h"), ["d", "e", "f", "g", "h"]);
    assert_eq!(names("topk(5, i) + count_values(\"v\", j) + max without (shard) (k @ start())"), ["i", "j", "k"]);
    assert_eq!(names("sum(increase(l[1h30m])) / (sum(m) > 0) + 0x1F * Inf + ${var:raw} + [[old]]"), ["l", "m"]);
    assert_eq!(names("label_replace(n, \"dst\", \"$1\", \"src\", \"(.*)\") + vector(1) + time()"), ["n"]);
    assert_eq!(names("SUM BY (shard) (o)"), ["o"]);
    assert_eq!(names("{__name__=\"p\"}"), Vec::<String>::new());
    assert!(selectors("sum(q").is_err());
    assert!(selectors("r{shard=\"0\"").is_err());
    assert!(selectors("s[5m)").is_err());
    assert_eq!(
        selectors("t{shard!=\"\"} + u").unwrap(),
        [
            Selector { name: "t".into(), matchers: "shard!=\"\"".into() },
            Selector { name: "u".into(), matchers: "".into() }
        ]
    );

    assert_eq!(variable_promql("label_values(corecast_info, instance)").as_deref(), Some("corecast_info"));
    assert_eq!(variable_promql("label_values(v{job=\"a\"}, instance)").as_deref(), Some("v{job=\"a\"}"));
    assert_eq!(variable_promql("label_values(instance)"), None);
    assert_eq!(variable_promql("metrics(corecast_.*)"), None);
    assert_eq!(variable_promql("query_result(topk(3, w))").as_deref(), Some("topk(3, w)"));
}
