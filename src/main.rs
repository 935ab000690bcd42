//! `corecast [OPTIONS]`: flags → `Config` → `server::run`, nothing else.

use std::io::IsTerminal;
use std::sync::Mutex;

use tracing_appender::non_blocking::WorkerGuard;

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
    //
    // Lines go to stderr from a writer thread, never from a shard: a shard
    // only hands its line to a bounded queue, and when the queue is full
    // (stderr blocked: a full pipe, a stalled journald) the line is dropped
    // (lossy), so logging never blocks a shard.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    *LOG_GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match cfg.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    corecast::server::install_panic_policy(flush_logs);
    let r = corecast::server::run(cfg);
    flush_logs();
    r
}

/// The log writer thread's guard: dropping it writes out what is queued.
static LOG_GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Writes out the queued log lines (at exit, and before a fatal panic exits).
fn flush_logs() {
    let guard = LOG_GUARD.lock().map(|mut g| g.take()).unwrap_or(None);
    drop(guard);
}
