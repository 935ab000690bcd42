//! The parent process: re-executes itself as worker processes, steers them
//! through the phases of a run, and turns what they report into one
//! [`RunReport`].
//!
//! Phases: **ramp** (workers open their connections; ends when every worker
//! is ready) → **measure** (`Go`: publish / echo / idle hold for
//! `--duration`) → **drain** (`Stop`: wait up to `--grace` for outstanding
//! deliveries) → **finish** (`Finish`: workers close, send results, exit).
//! ctrl-c skips ahead to finish; the partial result is reported as such.
//! Each second on the shared clock, once every live worker has sent its
//! tick, one timeline sample is made and the progress line updated.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::RunOpts;
use crate::plan::{Command, Counters, Failures, Report, Scenario, WorkerResult};
use crate::procfs::{self, ProcSample, now_ns};
use crate::report::{ConnectStats, GeneratorStats, IdleStats, RunReport, Sample, ServerStats, TrafficStats};
use crate::stats::{Summary, add_pairs, new_hist, per_sec, percent};

/// How long workers get to close, report and exit after Finish.
const FINISH_WAIT: Duration = Duration::from_secs(10);
/// Drain limit once the user pressed ctrl-c.
const INTERRUPTED_DRAIN: Duration = Duration::from_secs(1);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// First SIGINT/SIGTERM: finish early with partial results. The handler
/// resets itself (SA_RESETHAND), so a second ctrl-c kills the parent at
/// once; workers then see their stdin close and exit too.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a handler that only stores to an atomic is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESETHAND;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Ramp,
    Measure,
    Drain,
    Finish,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Ramp => "ramp",
            Phase::Measure => "measure",
            Phase::Drain => "drain",
            Phase::Finish => "finish",
        }
    }
}

struct WorkerProc {
    child: Child,
    stdin: Option<ChildStdin>,
    alive: bool,
    ready: bool,
    latest: Counters,
    result: Option<WorkerResult>,
}

/// A worker's line (or its end) as seen by its reader thread.
enum Msg {
    Report(usize, Report),
    Gone(usize),
}

pub fn run(opts: RunOpts) -> Result<RunReport, String> {
    let nofile = procfs::raise_nofile_limit().map_err(|e| format!("raising RLIMIT_NOFILE: {e}"))?;
    install_signal_handlers();
    let server_before = sample_server(&opts.server_pids)?;
    let mut plan = opts.plan.clone();
    // Give the workers a moment to start before connection 0 is due.
    plan.t0_ns = now_ns() + 100_000_000;
    let t0 = plan.t0_ns;
    let started_unix_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());

    let exe = std::env::current_exe().map_err(|e| format!("finding own executable: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let mut workers = Vec::with_capacity(plan.workers);
    for w in 0..plan.workers {
        let mut child = std::process::Command::new(&exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting worker {w}: {e}"))?;
        let stdout = child.stdout.take().ok_or("worker stdout missing")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Report>(&line) {
                    Ok(r) => {
                        if tx.send(Msg::Report(w, r)).is_err() {
                            return;
                        }
                    }
                    Err(e) => eprintln!("worker {w}: unreadable report ({e}): {line}"),
                }
            }
            let _ = tx.send(Msg::Gone(w));
        });
        let mut wp = WorkerProc {
            stdin: child.stdin.take(),
            child,
            alive: true,
            ready: false,
            latest: Counters::default(),
            result: None,
        };
        plan.worker = w;
        let line = serde_json::to_string(&plan).map_err(|e| e.to_string())?;
        send_line(&mut wp, &line);
        workers.push(wp);
    }
    drop(tx);

    let total = plan.total() as u64;
    let mut progress = Progress::new(opts.quiet, plan.scenario, total, opts.duration);
    let mut subs_per_room = vec![0u32; plan.rooms];
    let mut ticks: BTreeMap<u64, (usize, Counters)> = BTreeMap::new();
    let mut timeline = vec![Sample {
        t_s: 0.0,
        phase: Phase::Ramp.name().to_string(),
        ready: 0,
        failed: 0,
        sent_per_s: 0.0,
        received_per_s: 0.0,
        server_cpu_pct: None,
        server_rss_mb: server_before.map(|s| s.rss_kb as f64 / 1024.0),
        generator_cpu_pct: 0.0,
    }];
    let mut prev_sample = (t0, Counters::default(), server_before.map(|s| s.cpu_s));
    let mut phase = Phase::Ramp;
    let mut was_interrupted = false;
    let ramp_s = if plan.connect_rate > 0.0 { total as f64 / plan.connect_rate } else { 0.0 };
    let ramp_deadline = t0 + ((ramp_s + 30.0) * 1e9) as u64 + plan.connect_timeout_ms * 1_000_000;
    let mut phase_end = ramp_deadline;
    let (mut server_at_go, mut server_at_stop, mut server_at_end) = (None, None, None);
    let (mut redis_at_go, mut redis_at_end) = (None, None);
    let mut ready_counters = Counters::default();

    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Msg::Report(w, report)) => match report {
                Report::Tick { k, counters } => {
                    workers[w].latest = counters;
                    let entry = ticks.entry(k).or_default();
                    entry.0 += 1;
                    entry.1.add(&counters);
                }
                Report::Ready { subs_per_room: subs, counters } => {
                    workers[w].ready = true;
                    workers[w].latest = counters;
                    for (total, n) in subs_per_room.iter_mut().zip(subs) {
                        *total += n;
                    }
                }
                Report::Result(result) => {
                    workers[w].latest = result.counters;
                    workers[w].result = Some(*result);
                }
            },
            Ok(Msg::Gone(w)) => {
                workers[w].alive = false;
                if workers[w].result.is_none() {
                    let status = workers[w].child.wait().map(|s| s.to_string()).unwrap_or_default();
                    progress.println(&format!("worker {w} ended without a result ({status})"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }

        // Timeline: a second is complete once every live worker has ticked it.
        let live = workers.iter().filter(|w| w.alive && w.result.is_none()).count();
        while let Some((&k, &(n, sum))) = ticks.first_key_value() {
            if n < live {
                break;
            }
            ticks.remove(&k);
            let now = now_ns();
            let server = sample_server(&opts.server_pids).ok().flatten();
            let (prev_t, prev_c, prev_cpu) = prev_sample;
            let wall = now.saturating_sub(prev_t) as f64 / 1e9;
            let d = |a: u64, b: u64| per_sec(a.saturating_sub(b), 1.0);
            let sample = Sample {
                t_s: k as f64,
                phase: phase.name().to_string(),
                ready: sum.ready,
                failed: sum.failed,
                sent_per_s: d(sum.sent, prev_c.sent),
                received_per_s: d(sum.received, prev_c.received),
                server_cpu_pct: match (server, prev_cpu) {
                    (Some(s), Some(p)) => Some(percent(s.cpu_s - p, wall)),
                    _ => None,
                },
                server_rss_mb: server.map(|s| s.rss_kb as f64 / 1024.0),
                generator_cpu_pct: percent(sum.cpu_s - prev_c.cpu_s, 1.0),
            };
            progress.sample(&sample, &sum, phase);
            timeline.push(sample);
            prev_sample = (now, sum, server.map(|s| s.cpu_s));
        }

        let now = now_ns();
        let stop_now = interrupted() && !was_interrupted && phase < Phase::Finish;
        if stop_now {
            was_interrupted = true;
            progress.println("interrupted: finishing with partial results (ctrl-c again to abort)");
        }
        let all_ready = workers.iter().all(|w| w.ready || !w.alive);
        match phase {
            Phase::Ramp if all_ready || stop_now || now >= phase_end => {
                ready_counters = sum_latest(&workers);
                if !all_ready {
                    progress.println("ramp did not finish in time; measuring what is connected");
                }
                server_at_go = sample_server(&opts.server_pids).ok().flatten();
                redis_at_go = sample_server(&opts.redis_pids).ok().flatten();
                if ready_counters.ready == 0 && !was_interrupted {
                    progress.println("no connection is ready: nothing to measure");
                }
                if was_interrupted || ready_counters.ready == 0 {
                    phase = Phase::Finish;
                    phase_end = now + FINISH_WAIT.as_nanos() as u64;
                    broadcast(&mut workers, &Command::Finish);
                } else {
                    broadcast(&mut workers, &Command::Go { subs_per_room: subs_per_room.clone() });
                    phase = Phase::Measure;
                    phase_end = now + opts.duration.as_nanos() as u64;
                    progress.measure();
                }
            }
            Phase::Measure if stop_now || now >= phase_end => {
                broadcast(&mut workers, &Command::Stop);
                server_at_stop = sample_server(&opts.server_pids).ok().flatten();
                let grace = if was_interrupted { opts.grace.min(INTERRUPTED_DRAIN) } else { opts.grace };
                phase = Phase::Drain;
                phase_end = now + grace.as_nanos() as u64;
            }
            Phase::Drain => {
                let c = sum_latest(&workers);
                let caught_up = c.received >= c.expected
                    && c.acked + c.errors >= c.sent * u64::from(plan.scenario == Scenario::Fanout);
                if caught_up || stop_now || now >= phase_end {
                    server_at_end = sample_server(&opts.server_pids).ok().flatten();
                    redis_at_end = sample_server(&opts.redis_pids).ok().flatten();
                    broadcast(&mut workers, &Command::Finish);
                    phase = Phase::Finish;
                    phase_end = now + FINISH_WAIT.as_nanos() as u64;
                }
            }
            Phase::Finish if workers.iter().all(|w| w.result.is_some() || !w.alive) || now >= phase_end => {
                break;
            }
            _ => {}
        }
    }
    progress.finish();
    for w in &mut workers {
        w.stdin = None;
        if w.result.is_none() {
            let _ = w.child.kill();
        }
        let _ = w.child.wait();
    }

    let results: Vec<&WorkerResult> = workers.iter().filter_map(|w| w.result.as_ref()).collect();
    if results.is_empty() {
        return Err("no worker reported a result".into());
    }
    let measured = Measured {
        server_before,
        server_at_go,
        server_at_stop: server_at_stop.or(server_at_go),
        server_at_end: server_at_end.or(server_at_stop).or(server_at_go),
        ready_counters,
    };
    let mut report = build_report(&opts, &plan, &results, &measured, timeline);
    report.started_unix_s = started_unix_s;
    // The backplane's CPU over the same span as the server's (Go → end of drain).
    report.redis_cpu_s = match (redis_at_go, redis_at_end.or(redis_at_go)) {
        (Some(a), Some(b)) => Some(b.cpu_s - a.cpu_s),
        _ => None,
    };
    report.interrupted = was_interrupted;
    report.generator.nofile_limit = nofile;
    report.generator.workers_lost = workers.len() - results.len();
    Ok(report)
}

fn send_line(w: &mut WorkerProc, line: &str) {
    if let Some(stdin) = w.stdin.as_mut()
        && writeln!(stdin, "{line}").and_then(|_| stdin.flush()).is_err()
    {
        w.stdin = None;
    }
}

fn broadcast(workers: &mut [WorkerProc], cmd: &Command) {
    // Serialising our own enum cannot fail.
    let line = serde_json::to_string(cmd).expect("commands serialise");
    for w in workers.iter_mut() {
        send_line(w, &line);
    }
}

fn sum_latest(workers: &[WorkerProc]) -> Counters {
    let mut c = Counters::default();
    for w in workers {
        c.add(&w.latest);
    }
    c
}

/// `Ok(None)` without pids; an error names the pid that cannot be read.
fn sample_server(pids: &[u32]) -> Result<Option<ProcSample>, String> {
    if pids.is_empty() {
        return Ok(None);
    }
    procfs::sample_all(pids).map(Some).map_err(|e| format!("--server-pid {pids:?}: {e}"))
}

/// Server samples at the phase boundaries.
struct Measured {
    server_before: Option<ProcSample>,
    server_at_go: Option<ProcSample>,
    server_at_stop: Option<ProcSample>,
    server_at_end: Option<ProcSample>,
    ready_counters: Counters,
}

fn build_report(
    opts: &RunOpts,
    plan: &crate::plan::Plan,
    results: &[&WorkerResult],
    m: &Measured,
    timeline: Vec<Sample>,
) -> RunReport {
    let mut c = Counters::default();
    let mut failures = Failures::default();
    let (mut latency, mut ack_latency, mut handshake) = (new_hist(), new_hist(), new_hist());
    let mut gen_cpu = 0.0;
    let mut max_worker_cpu: f64 = 0.0;
    let mut go_ns = u64::MAX;
    let (mut stop_ns, mut last_ready_ns, mut last_receive_ns) = (0, 0, 0);
    for r in results {
        c.add(&r.counters);
        failures.add(&r.failures);
        add_pairs(&mut latency, &r.latency);
        add_pairs(&mut ack_latency, &r.ack_latency);
        add_pairs(&mut handshake, &r.handshake);
        let cpu = r.cpu_at_stop_s - r.cpu_at_go_s;
        gen_cpu += cpu;
        if r.go_ns > 0 {
            go_ns = go_ns.min(r.go_ns);
            max_worker_cpu = max_worker_cpu.max(percent(cpu, r.stop_ns.saturating_sub(r.go_ns) as f64 / 1e9));
        }
        stop_ns = stop_ns.max(r.stop_ns);
        last_ready_ns = last_ready_ns.max(r.last_ready_ns);
        last_receive_ns = last_receive_ns.max(r.last_receive_ns);
    }
    let measured_s = if go_ns < stop_ns { (stop_ns - go_ns) as f64 / 1e9 } else { 0.0 };
    let cores = procfs::cores_available();
    let ramp_s = last_ready_ns.saturating_sub(plan.t0_ns) as f64 / 1e9;
    let connections = ConnectStats {
        target: plan.total() as u64,
        started: c.started,
        connected: c.connected,
        ready: c.ready,
        failed: c.failed,
        failures,
        dropped: c.dropped,
        ready_at_go: m.ready_counters.ready,
        time_to_all_ready_s: ramp_s,
        ready_per_s: per_sec(c.ready, ramp_s),
        target_rate_per_s: plan.connect_rate,
        handshake: Summary::of(&handshake),
    };
    let generator = GeneratorStats {
        workers: plan.workers,
        workers_lost: 0,
        cores,
        source_ips: plan.source_ips.iter().map(ToString::to_string).collect(),
        nofile_limit: 0,
        ramp_cpu_s: m.ready_counters.cpu_s,
        cpu_s: gen_cpu,
        wall_s: measured_s,
        cpu_pct: percent(gen_cpu, measured_s),
        cpu_pct_of_cores: percent(gen_cpu, measured_s * cores as f64),
        max_worker_cpu_pct: max_worker_cpu,
    };
    let cpu = |a: Option<ProcSample>, b: Option<ProcSample>| match (a, b) {
        (Some(a), Some(b)) => b.cpu_s - a.cpu_s,
        _ => 0.0,
    };
    let server = m.server_before.map(|before| {
        let active_cpu = cpu(m.server_at_go, m.server_at_stop);
        let active_sys = match (m.server_at_go, m.server_at_stop) {
            (Some(a), Some(b)) => b.sys_s - a.sys_s,
            _ => 0.0,
        };
        ServerStats {
            pids: opts.server_pids.clone(),
            rss_before_kb: before.rss_kb,
            rss_ready_kb: m.server_at_go.map_or(0, |s| s.rss_kb),
            rss_end_kb: m.server_at_end.map_or(0, |s| s.rss_kb),
            ramp_cpu_s: cpu(Some(before), m.server_at_go),
            cpu_s: active_cpu,
            cpu_pct: percent(active_cpu, measured_s),
            kernel_pct: percent(active_sys, active_cpu),
            cpu_with_drain_s: cpu(m.server_at_go, m.server_at_end),
        }
    });
    let idle = (plan.scenario == Scenario::Idle).then(|| {
        let conns = m.ready_counters.ready as f64;
        let (rss_per_conn, cpu_s) = match (&server, m.server_before) {
            (Some(s), Some(b)) => (
                if conns > 0.0 { (s.rss_ready_kb as f64 - b.rss_kb as f64) * 1024.0 / conns } else { 0.0 },
                Some(s.cpu_s),
            ),
            _ => (0.0, None),
        };
        IdleStats {
            connections: m.ready_counters.ready,
            hold_s: measured_s,
            server_rss_per_conn_bytes: server.as_ref().map(|_| rss_per_conn),
            server_cpu_s: cpu_s,
            server_cpu_us_per_conn_s: cpu_s
                .map(|cpu| if conns > 0.0 && measured_s > 0.0 { cpu * 1e6 / (conns * measured_s) } else { 0.0 }),
        }
    });
    let traffic = matches!(plan.scenario, Scenario::Fanout | Scenario::Echo).then(|| {
        let delivery_s = if last_receive_ns > go_ns { (last_receive_ns - go_ns) as f64 / 1e9 } else { 0.0 };
        let lost = c.expected.saturating_sub(c.received);
        let drain_cpu = server.as_ref().map(|s| s.cpu_with_drain_s);
        TrafficStats {
            senders: plan.senders as u64,
            subscribers: m.ready_counters.ready.saturating_sub(plan.senders as u64),
            rooms: plan.rooms as u64,
            target_rate_per_s: plan.rate,
            window: plan.window as u64,
            payload_bytes: plan.payload as u64,
            duration_s: measured_s,
            sent: c.sent,
            sent_per_s: per_sec(c.sent, measured_s),
            acked: c.acked,
            errors: c.errors,
            maintenance: c.maintenance,
            expected: c.expected,
            received: c.received,
            lost,
            loss_pct: percent(lost as f64, c.expected as f64),
            received_per_s: per_sec(c.received, delivery_s),
            received_per_server_cpu_s: drain_cpu.filter(|&s| s > 0.0).map(|s| c.received as f64 / s),
        }
    });
    let has_traffic = traffic.is_some();
    RunReport {
        scenario: plan.scenario,
        command: std::env::args().collect(),
        started_unix_s: 0,
        interrupted: false,
        targets: opts.urls.clone(),
        generator,
        server,
        connections,
        idle,
        traffic,
        latency: has_traffic.then(|| Summary::of(&latency)),
        ack_latency: (plan.scenario == Scenario::Fanout).then(|| Summary::of(&ack_latency)),
        latency_histogram_ns: crate::stats::to_pairs(&latency),
        latency_bins_us: crate::stats::log_bins(&latency, 10),
        handshake_bins_us: crate::stats::log_bins(&handshake, 10),
        timeline,
        first_error: results.iter().find_map(|r| r.first_error.clone()),
        protocol: plan.protocol,
        redis_cpu_s: None,
    }
}

/// Live output on stderr: an indicatif bar on a terminal, a plain line per
/// second otherwise, nothing with `--quiet`.
struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    scenario: Scenario,
    total: u64,
    duration: Duration,
}

impl Progress {
    fn new(quiet: bool, scenario: Scenario, total: u64, duration: Duration) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let bar = (!quiet && tty).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix("ramp");
            bar
        });
        Progress { bar, lines: !quiet && !tty, scenario, total, duration }
    }

    fn measure(&mut self) {
        if let Some(bar) = &self.bar {
            bar.set_prefix(self.scenario.name());
            bar.set_length(self.duration.as_secs().max(1));
            bar.set_position(0);
        }
    }

    fn sample(&mut self, s: &Sample, c: &Counters, phase: Phase) {
        let server = s.server_cpu_pct.map_or(String::new(), |p| format!(" server cpu {p:.0}%"));
        let traffic = match self.scenario {
            Scenario::Fanout | Scenario::Echo => format!(
                " sent {}/s recv {}/s undelivered {:.3}%",
                si(s.sent_per_s),
                si(s.received_per_s),
                percent(c.expected.saturating_sub(c.received) as f64, c.expected as f64)
            ),
            _ => String::new(),
        };
        let msg = format!(
            "ready {}/{} failed {}{traffic}{server} gen cpu {:.0}%",
            c.ready, self.total, c.failed, s.generator_cpu_pct
        );
        if let Some(bar) = &self.bar {
            if phase == Phase::Ramp {
                bar.set_position(c.ready + c.failed);
            } else {
                bar.inc(1);
            }
            bar.set_message(msg);
        } else if self.lines {
            eprintln!("[{:>4}s {:>7}] {msg}", s.t_s, phase.name());
        }
    }

    fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// 1234567 → "1.23M".
pub fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}
