//! `corecast-bench`: load generator for corecast (and any server speaking
//! its wire protocol, `shared/PROTOCOL.md`).
//!
//! The parent process ([`coordinator`]) parses the flags ([`cli`]), starts
//! worker processes (this same binary, `worker` subcommand, [`worker`]),
//! each an event loop holding at most `--max-per-worker` connections,
//! drives them through the run ([`plan`]) and renders what they measured
//! ([`report`], [`svg`]). Workers speak WebSocket with a small client codec
//! ([`ws`]), send pre-encoded frames and find timestamps in what they
//! receive without parsing JSON ([`payload`]); latencies go into
//! HdrHistograms ([`stats`]); server RSS/CPU come from /proc ([`procfs`]).
//! `--protocol` switches the join step and receive path to one of the
//! peers' client protocols ([`proto`]) for side-by-side runs. `plan` runs
//! nothing: it is the capacity model ([`capacity`], docs/capacity.md).

pub mod capacity;
pub mod cli;
pub mod coordinator;
pub mod payload;
pub mod plan;
pub mod procfs;
pub mod proto;
pub mod report;
pub mod stats;
pub mod svg;
pub mod worker;
pub mod ws;
