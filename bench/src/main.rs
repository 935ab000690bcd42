//! Entry point of `corecast-bench`: a worker process runs its event loop;
//! otherwise the flags become a run, and its report goes to stdout, `--json`
//! and `--html`. The crate doc (`lib.rs`) maps the modules.

use std::process::ExitCode;

use clap::Parser;
use corecast_bench::{capacity, cli, coordinator, worker};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if matches!(cli.command, cli::Cmd::Worker) {
        return match worker::main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corecast-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: &cli::Cmd) -> Result<(), String> {
    if let cli::Cmd::Plan(a) = cmd {
        return plan(a);
    }
    let opts = cli::run_opts(cmd)?;
    let (json, html) = (opts.json.clone(), opts.html.clone());
    let report = coordinator::run(opts)?;
    print!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, text + "\n").map_err(|e| format!("--json {}: {e}", path.display()))?;
    }
    if let Some(path) = html {
        std::fs::write(&path, report.html()).map_err(|e| format!("--html {}: {e}", path.display()))?;
    }
    Ok(())
}

/// `plan`: the capacity model for one deployment, or the smallest one.
fn plan(a: &cli::PlanArgs) -> Result<(), String> {
    let text = match &a.costs {
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("--costs {}: {e}", p.display()))?,
        None => capacity::DEFAULT_COSTS.to_string(),
    };
    let costs: capacity::Costs = serde_json::from_str(&text).map_err(|e| format!("--costs: {e}"))?;
    if a.subscribers < 0.0 || a.rooms < 1.0 || a.rate < 0.0 || a.idle < 0.0 || a.shards == 0 {
        return Err("--subscribers, --rate and --idle must be >= 0, --rooms and --shards >= 1".into());
    }
    let w = capacity::Workload { subscribers: a.subscribers, rooms: a.rooms, rate: a.rate, idle: a.idle };
    let b = capacity::Budget {
        server_cpu: a.server_cpu_budget,
        redis_cpu: a.redis_cpu_budget,
        node_memory: a.node_memory_gib * (1u64 << 30) as f64,
        node_connections: a.node_connections,
    };
    let p = if a.nodes == 0 {
        capacity::size(&costs, a.shards, a.primaries == 0, w, b, 10_000, a.primaries.max(1))
            .ok_or("no deployment within 10000 nodes and --primaries carries this load (a single room too busy for one primary?)")?
    } else {
        let d = capacity::Deployment {
            nodes: a.nodes,
            shards: a.shards,
            primaries: a.primaries,
            per_shard_subscriptions: a.per_shard_subscriptions,
        };
        capacity::predict(&costs, d, w, b)
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p).map_err(|e| e.to_string())?);
    } else {
        print!("costs: {}\n{}", costs.host, p.table());
    }
    Ok(())
}
