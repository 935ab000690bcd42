//! Entry point of `corecast-bench`: a worker process runs its event loop;
//! otherwise the flags become a run, and its report goes to stdout, `--json`
//! and `--html`. The crate doc (`lib.rs`) maps the modules.

use std::process::ExitCode;

use clap::Parser;
use corecast_bench::{cli, coordinator, worker};

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
