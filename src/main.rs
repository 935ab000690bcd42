//! `corecast [OPTIONS]`: flags → `Config` → `server::run`, nothing else.

use std::io::IsTerminal;

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
    // Colour codes only for a person at a terminal: journald, files and
    // `docker logs` get plain text, and `--log-format json` stays clean.
    let ansi = cfg.log_format == LogFormat::Text && std::io::stderr().is_terminal();
    // A log line that cannot be written (stderr closed: a restarted
    // journald, a reader that went away) is dropped. tracing-subscriber's
    // default reports it with `eprintln!`, which panics on that same closed
    // stderr and takes the logging thread (a shard!) down with it.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match cfg.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    corecast::server::run(cfg)
}
