//! Command-line flags, one subcommand per scenario, and how they become a
//! [`Plan`] plus the parent's own settings ([`RunOpts`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::plan::{Plan, Scenario, Target};
use crate::procfs::cores_available;
use crate::proto::Protocol;

#[derive(Parser)]
#[command(name = "corecast-bench", version, about = "Load generator for corecast WebSocket fan-out servers")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Open N connections at a target rate: achieved rate, failures, time until all are up.
    Connect(ConnectArgs),
    /// Hold N subscribed, silent connections: server RSS per connection and CPU per connection-second.
    Idle(IdleArgs),
    /// S subscribers in R rooms, P publishers: deliveries/s, loss, end-to-end latency, server CPU.
    Fanout(FanoutArgs),
    /// Request/response on /echo (server started with --echo): rate and round-trip latency.
    Echo(EchoArgs),
    /// The capacity model (docs/capacity.md): what a deployment spends on a workload,
    /// its headroom, or (`--nodes 0`) the smallest deployment that carries it. Runs nothing.
    Plan(PlanArgs),
    /// Internal: one worker process, driven by its parent over stdin/stdout.
    #[command(hide = true)]
    Worker,
}

/// Flags every scenario takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server node(s), `ws://host:port[/path]`; repeat or comma-separate for several nodes.
    #[arg(long = "url", value_delimiter = ',', default_value = "ws://127.0.0.1:8080")]
    pub urls: Vec<String>,
    /// Worker processes (0 = enough for --max-per-worker, at least one per available core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Most connections one worker process holds (stay well under the open-files limit).
    #[arg(long, default_value_t = 15_000)]
    pub max_per_worker: usize,
    /// Local addresses to connect from, comma-separated; `auto` = a few 127.0.0.x
    /// when every URL is on loopback; `none` = let the kernel choose.
    #[arg(long, default_value = "auto")]
    pub source_ips: String,
    /// New connections per second over the whole run (0 = as fast as --max-pending allows).
    #[arg(long, default_value_t = 5000.0)]
    pub connect_rate: f64,
    /// Connections in their handshake at once, per worker.
    #[arg(long, default_value_t = 256)]
    pub max_pending: usize,
    /// A connection not upgraded (and subscribed) this long after connect() has failed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Server process to watch for RSS and CPU (repeat for several nodes).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// A backplane process (e.g. redis-server) whose CPU is reported on its own (repeatable).
    #[arg(long = "redis-pid")]
    pub redis_pids: Vec<u32>,
    /// Client protocol: corecast's, or a peer's (`raw` text broadcast, `socketio`, `centrifuge`),
    /// whose servers have one channel (`--rooms 1`).
    #[arg(long, value_enum, default_value_t = Protocol::Corecast)]
    pub protocol: Protocol,
    /// Room names are this prefix plus a number.
    #[arg(long, default_value = "bench-")]
    pub room_prefix: String,
    /// User ids (`?user=`) are this prefix plus the connection number.
    #[arg(long, default_value = "bench-")]
    pub user_prefix: String,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report (inline SVG plots) here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// No progress output on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub connections: usize,
    /// Keep them open this long once all are up.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub hold: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open and subscribe.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub connections: usize,
    /// Rooms the connections are spread over.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Idle hold over which server CPU is measured.
    #[arg(long, short, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscribing connections.
    #[arg(long, short = 's', default_value_t = 1000)]
    pub subscribers: usize,
    /// Rooms the subscribers are spread over.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Publishing connections (not subscribed).
    #[arg(long, short = 'p', default_value_t = 10)]
    pub publishers: usize,
    /// Publishes per second over all publishers (0 = as fast as acks come back, see --window).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Unacknowledged publishes allowed per publisher.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Size of each publish's `data` JSON in bytes (at least 58).
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// How long to publish.
    #[arg(long, short, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After publishing stops, wait at most this long for outstanding deliveries.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub grace: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to /echo.
    #[arg(long, short = 'n', default_value_t = 10)]
    pub connections: usize,
    /// Requests in flight per connection (1 = strict request/response).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Requests per second over all connections (0 = closed loop, as fast as replies come).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Message size in bytes (at least 58).
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// How long to send.
    #[arg(long, short, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After sending stops, wait at most this long for outstanding replies.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub grace: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// Unit costs as JSON (`scripts/bench-capacity.sh` fits them on a host); default: this
    /// repository's test box, `bench/costs.json`.
    #[arg(long)]
    pub costs: Option<PathBuf>,
    /// Nodes (0 = find the fewest nodes and primaries that carry the load).
    #[arg(long, default_value_t = 0)]
    pub nodes: u32,
    /// Shards (cores) per node.
    #[arg(long, default_value_t = 32)]
    pub shards: u32,
    /// Redis primaries (0 = one standalone node on the local bus; with `--nodes 0`, the most
    /// primaries to consider, at least 1).
    #[arg(long, default_value_t = 1)]
    pub primaries: u32,
    /// One Redis subscription per shard with members (`--per-shard-subscriptions true`).
    #[arg(long)]
    pub per_shard_subscriptions: bool,
    /// Connections that are members of a room.
    #[arg(long, short = 's')]
    pub subscribers: f64,
    /// Rooms they are spread over.
    #[arg(long)]
    pub rooms: f64,
    /// Publishes per second over all rooms.
    #[arg(long)]
    pub rate: f64,
    /// Other held connections (no room).
    #[arg(long, default_value_t = 0.0)]
    pub idle: f64,
    /// Share of each core the server may use.
    #[arg(long, default_value_t = 0.7)]
    pub server_cpu_budget: f64,
    /// Share of its core one Redis primary may use.
    #[arg(long, default_value_t = 0.7)]
    pub redis_cpu_budget: f64,
    /// Memory per node, GiB (the process's; the kernel's socket memory is apart).
    #[arg(long, default_value_t = 64.0)]
    pub node_memory_gib: f64,
    /// Connections per node (descriptors, ports, the kernel's socket memory: tuning.md).
    #[arg(long, default_value_t = 1_000_000.0)]
    pub node_connections: f64,
    /// Print the prediction as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The parent's side of a run.
pub struct RunOpts {
    pub plan: Plan,
    /// Measured phase: idle hold, publish/echo time, or connect's hold.
    pub duration: Duration,
    pub grace: Duration,
    pub server_pids: Vec<u32>,
    pub redis_pids: Vec<u32>,
    pub json: Option<PathBuf>,
    pub html: Option<PathBuf>,
    pub quiet: bool,
    pub urls: Vec<String>,
}

/// Builds the run from a scenario's flags. Errors name the flag to fix.
pub fn run_opts(cmd: &Cmd) -> Result<RunOpts, String> {
    let (scenario, common, duration, grace) = match cmd {
        Cmd::Connect(a) => (Scenario::Connect, &a.common, a.hold, Duration::ZERO),
        Cmd::Idle(a) => (Scenario::Idle, &a.common, a.duration, Duration::ZERO),
        Cmd::Fanout(a) => (Scenario::Fanout, &a.common, a.duration, a.grace),
        Cmd::Echo(a) => (Scenario::Echo, &a.common, a.duration, a.grace),
        Cmd::Worker | Cmd::Plan(_) => return Err("this subcommand takes no run options".into()),
    };
    let targets = common.urls.iter().map(|u| Target::parse(u)).collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() {
        return Err("--url: at least one server is needed".into());
    }
    let mut plan = Plan {
        scenario,
        protocol: common.protocol,
        worker: 0,
        workers: 1,
        t0_ns: 0,
        source_ips: Vec::new(),
        targets,
        connect_rate: common.connect_rate.max(0.0),
        max_pending: common.max_pending.max(1),
        connect_timeout_ms: common.connect_timeout.as_millis() as u64,
        plain: 0,
        subscribers: 0,
        senders: 0,
        rooms: 1,
        room_prefix: common.room_prefix.clone(),
        user_prefix: common.user_prefix.clone(),
        rate: 0.0,
        window: 1,
        payload: 128,
    };
    match cmd {
        Cmd::Connect(a) => plan.plain = a.connections,
        Cmd::Idle(a) => {
            plan.subscribers = a.connections;
            plan.rooms = a.rooms.max(1);
        }
        Cmd::Fanout(a) => {
            plan.subscribers = a.subscribers;
            plan.senders = a.publishers;
            plan.rooms = a.rooms.max(1);
            plan.rate = a.rate.max(0.0);
            plan.window = a.window.max(1);
            plan.payload = a.payload;
        }
        Cmd::Echo(a) => {
            plan.senders = a.connections;
            plan.rate = a.rate.max(0.0);
            plan.window = a.window.max(1);
            plan.payload = a.payload;
        }
        Cmd::Worker | Cmd::Plan(_) => {}
    }
    if !plan.room_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:@/".contains(&b)) {
        return Err("--room-prefix: use only A-Z a-z 0-9 _ - . : @ /".into());
    }
    if !plan.user_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
        return Err("--user-prefix: use only A-Z a-z 0-9 _ - .".into());
    }
    if !plan.protocol.has_rooms() && plan.rooms > 1 {
        return Err(format!(
            "--rooms {}: the {} protocol has one channel; use --rooms 1",
            plan.rooms,
            plan.protocol.name()
        ));
    }
    if plan.protocol != Protocol::Corecast && scenario == Scenario::Echo {
        return Err("--protocol: echo needs corecast's /echo".into());
    }
    let total = plan.total();
    if total == 0 {
        return Err("nothing to do: the run has no connections".into());
    }
    let per_worker = common.max_per_worker.max(1);
    plan.workers =
        if common.workers > 0 { common.workers } else { total.div_ceil(per_worker).max(cores_available()) }.min(total);
    if total.div_ceil(plan.workers) > per_worker {
        return Err(format!(
            "--workers {}: {total} connections need at least {} workers of --max-per-worker {per_worker}",
            plan.workers,
            total.div_ceil(per_worker)
        ));
    }
    plan.source_ips = source_ips(&common.source_ips, &plan.targets, total)?;
    Ok(RunOpts {
        plan,
        duration,
        grace,
        server_pids: common.server_pids.clone(),
        redis_pids: common.redis_pids.clone(),
        json: common.json.clone(),
        html: common.html.clone(),
        quiet: common.quiet,
        urls: common.urls.clone(),
    })
}

/// `auto`: 127.0.0.2, .3, … — four, or one per 20000 connections — when all
/// targets are on loopback (any 127/8 address is local on Linux); otherwise none.
fn source_ips(spec: &str, targets: &[Target], total: usize) -> Result<Vec<IpAddr>, String> {
    match spec {
        "none" | "" => Ok(Vec::new()),
        "auto" if targets.iter().all(|t| t.addr.ip().is_loopback()) => {
            let n = total.div_ceil(20_000).clamp(4, 250);
            Ok((0..n).map(|i| IpAddr::from([127, 0, 0, 2 + i as u8])).collect())
        }
        "auto" => Ok(Vec::new()),
        list => list.split(',').map(|s| s.trim().parse().map_err(|e| format!("--source-ips {s:?}: {e}"))).collect(),
    }
}

/// `10`, `10s`, `1.5s`, `250ms`, `2m` → a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = num.trim().parse().map_err(|_| format!("{s:?}: expected e.g. 10s, 500ms, 2m"))?;
    if !(value >= 0.0 && value.is_finite()) {
        return Err(format!("{s:?}: must be a non-negative time"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_usual_units() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    fn opts(args: &[&str]) -> Result<RunOpts, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        run_opts(&cli.command)
    }

    #[test]
    fn connections_are_split_over_enough_workers_and_source_ips() {
        let o = opts(&["b", "connect", "-n", "100000", "--url", "ws://127.0.0.1:1,ws://127.0.0.1:2"]).unwrap();
        assert!(o.plan.workers >= 7);
        assert_eq!(o.plan.targets.len(), 2);
        assert_eq!(o.plan.source_ips.len(), 5);
        assert_eq!(o.plan.source_ips[0], IpAddr::from([127, 0, 0, 2]));
        let few = opts(&["b", "echo", "-n", "1", "--source-ips", "none"]).unwrap();
        assert_eq!((few.plan.workers, few.plan.source_ips.len()), (1, 0));
    }

    #[test]
    fn impossible_layouts_are_refused_with_the_flag_to_fix() {
        let err = opts(&["b", "connect", "-n", "40000", "--workers", "2"]).err().unwrap();
        assert!(err.contains("--workers"), "{err}");
        let err = opts(&["b", "idle", "--room-prefix", "a b"]).err().unwrap();
        assert!(err.contains("--room-prefix"), "{err}");
        assert!(opts(&["b", "fanout", "--url", "wss://x"]).is_err());
        let err = opts(&["b", "fanout", "--protocol", "raw", "--rooms", "10"]).err().unwrap();
        assert!(err.contains("--rooms"), "{err}");
        assert!(opts(&["b", "echo", "--protocol", "socketio"]).is_err());
        let ok = opts(&["b", "idle", "--protocol", "centrifuge", "--rooms", "1"]).unwrap();
        assert_eq!(ok.plan.protocol, Protocol::Centrifuge);
    }
}
