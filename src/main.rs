//! `corecast [OPTIONS]`: flags → `Config` → `server::run`, nothing else.

use corecast::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // One line for the operator (no backtrace, the causes joined by `: `).
        Err(e) => {
            eprintln!("corecast: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cfg = Config::load(std::env::args_os())?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    corecast::server::run(cfg)
}
