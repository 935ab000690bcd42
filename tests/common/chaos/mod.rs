//! The chaos run (tests/chaos.rs, docs/chaos.md): 3 corecast nodes on a
//! Redis Sentinel or Cluster rig, clients behind one TCP proxy per node,
//! a publisher, a fault injector, and a checker of every client's stream.

pub mod checker;
pub mod client;
pub mod faults;
pub mod nodes;
pub mod proxy;
pub mod publisher;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use checker::{Ctx, Kind, Stream};
use faults::{Faults, Rig};
use nodes::Node;
use proxy::Proxy;
use publisher::{Http, Seqs};

use crate::common::redis_topology::{RedisCluster, SentinelSetup};

#[derive(Debug, Clone)]
pub struct Config {
    pub secs: u64,
    pub seed: u64,
    pub clients: usize,
    pub rooms: usize,
    pub rate: f64,
    pub shards: usize,
    pub history_size: usize,
    pub drain_secs: u64,
    pub outbound_queue_bytes: usize,
    /// How long, after the faults, every client has to reach the final positions.
    pub settle_secs: u64,
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")))
}

impl Config {
    /// From `CORECAST_CHAOS_*`; `None` unless `CORECAST_CHAOS_SECS` is set.
    pub fn from_env() -> Option<Config> {
        // (--outbound-queue-bytes is small by default: 64 KiB, so that a
        // client away for 10-40 s recovers more than its queue holds.)
        let secs: u64 = env("CORECAST_CHAOS_SECS")?;
        let seed = env("CORECAST_CHAOS_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
        });
        Some(Config {
            secs,
            seed,
            clients: env("CORECAST_CHAOS_CLIENTS").unwrap_or(300),
            rooms: env("CORECAST_CHAOS_ROOMS").unwrap_or(30),
            rate: env("CORECAST_CHAOS_RATE").unwrap_or(500.0),
            shards: env("CORECAST_CHAOS_SHARDS").unwrap_or(1),
            history_size: env("CORECAST_CHAOS_HISTORY").unwrap_or(2000),
            drain_secs: 3,
            outbound_queue_bytes: env("CORECAST_CHAOS_OUTBOUND_QUEUE").unwrap_or(65536),
            settle_secs: env("CORECAST_CHAOS_SETTLE_SECS").unwrap_or(60),
        })
    }

    /// Whether `topology` is among those `CORECAST_CHAOS_TOPOLOGY` asks for
    /// (`sentinel`, `cluster` or `both`, the default).
    pub fn wants(topology: &str) -> bool {
        let t: String = env("CORECAST_CHAOS_TOPOLOGY").unwrap_or_else(|| "both".into());
        t == "both" || t == topology
    }
}

/// The rooms of client `i`: one, and a second for every third client.
fn rooms_of(i: usize, rooms: usize) -> Vec<usize> {
    let mut v = vec![i % rooms];
    if i.is_multiple_of(3) {
        let second = (i / 3 + 11) % rooms;
        if second != v[0] {
            v.push(second);
        }
    }
    v
}

/// (client, room, the stream's position as its client thread updates it).
type SharedPos = (usize, usize, Arc<std::sync::Mutex<Option<(u32, u64)>>>);

pub struct Report {
    pub text: String,
    pub violations: usize,
    pub problems: Vec<String>,
}

pub fn run(topology: &str, cfg: &Config) -> Report {
    let t_start = Instant::now();
    let dir = std::env::var("CORECAST_CHAOS_DIR")
        .map(|d| std::path::PathBuf::from(d).join(topology))
        .unwrap_or_else(|_| std::env::temp_dir().join(format!("corecast-chaos-{}-{topology}", std::process::id())));
    std::fs::create_dir_all(&dir).expect("create the run's directory");
    eprintln!("chaos {topology}: {cfg:?}; logs in {}", dir.display());

    let rig = match topology {
        "sentinel" => Rig::Sentinel(SentinelSetup::start()),
        "cluster" => Rig::Cluster(RedisCluster::start(3, 1)),
        t => panic!("unknown topology {t}"),
    };
    let url = rig.url();
    let node_args: Vec<String> = [
        "--shards",
        &cfg.shards.to_string(),
        "--redis",
        &url,
        "--history-size",
        &cfg.history_size.to_string(),
        "--drain-secs",
        &cfg.drain_secs.to_string(),
        "--outbound-queue-bytes",
        &cfg.outbound_queue_bytes.to_string(),
        // The node refuses a queue that cannot hold its largest message
        // (+ 512 bytes of envelope); the chaos messages are small.
        "--max-message-bytes",
        &(cfg.outbound_queue_bytes / 4).to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut nodes: Vec<Node> =
        (0..3).map(|i| Node::new(i, node_args.clone(), dir.join(format!("node-{i}.log")))).collect();
    for n in &mut nodes {
        n.start(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    }
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let proxies: Vec<Arc<Proxy>> = ports.iter().map(|&p| Arc::new(Proxy::start(p))).collect();
    let proxy_ports: Vec<u16> = proxies.iter().map(|p| p.port).collect();

    let rooms: Vec<String> = (0..cfg.rooms).map(|i| format!("chaos-{i}")).collect();
    let ctx = Arc::new(Ctx::with_clients(rooms.clone(), cfg.clients));
    let stop_clients = Arc::new(AtomicBool::new(false));
    let mut shared: Vec<SharedPos> = Vec::new();
    let mut clients = Vec::new();
    for i in 0..cfg.clients {
        let streams: Vec<Stream> = rooms_of(i, cfg.rooms).into_iter().map(|r| Stream::new(i, r)).collect();
        shared.extend(streams.iter().map(|s| (s.client, s.room, s.shared.clone())));
        let spec = client::ClientSpec {
            id: i,
            proxies: proxy_ports.clone(),
            seed: cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
        };
        let (c, s) = (ctx.clone(), stop_clients.clone());
        clients.push(
            std::thread::Builder::new()
                .name(format!("client-{i}"))
                .stack_size(512 * 1024)
                .spawn(move || client::run(spec, c, s, streams))
                .expect("spawn a client"),
        );
        // 300 clients in about a second and a half.
        std::thread::sleep(Duration::from_millis(5));
    }
    let all_live = Instant::now() + Duration::from_secs(60);
    while shared.iter().any(|(_, _, p)| p.lock().unwrap().is_none()) {
        assert!(Instant::now() < all_live, "not every client subscribed within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("chaos {topology}: {} streams subscribed after {:.1}s", shared.len(), t_start.elapsed().as_secs_f64());

    let seqs = Arc::new(Seqs::new(cfg.rooms));
    let stop_pub = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..3)
        .map(|i| {
            let (c, s, st, p) = (ctx.clone(), seqs.clone(), stop_pub.clone(), ports.clone());
            let rate = cfg.rate / 3.0;
            std::thread::spawn(move || publisher::run(i, p, rate, c, s, st))
        })
        .collect();

    // ---- faults ----
    let mut faults = Faults::new(cfg.seed, rig, nodes, proxies.clone(), cfg.drain_secs);
    let t_faults = Instant::now();
    let end = t_faults + Duration::from_secs(cfg.secs);
    while Instant::now() < end {
        let pause = faults.pause();
        let wake = (Instant::now() + pause).min(end);
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        if Instant::now() >= end {
            break;
        }
        faults.inject(&ctx);
    }
    let fault_secs = t_faults.elapsed().as_secs_f64();
    // Paused clients come back now.
    for p in &ctx.pause_until {
        p.store(0, Ordering::Relaxed);
    }
    let last = ctx.last_fault.lock().unwrap().clone();
    *ctx.last_fault.lock().unwrap() =
        format!("none since the faults stopped at t={:.1}s (the last: {last})", ctx.now());
    eprintln!("chaos {topology}: faults over; healing");

    // ---- settle ----
    let mut problems = faults.heal(&ctx, Duration::from_secs(90));
    // Traffic on a healed system, then the publishers stop.
    std::thread::sleep(Duration::from_secs(5));
    stop_pub.store(true, Ordering::SeqCst);
    for p in publishers {
        p.join().expect("publisher thread");
    }
    let publish_secs = t_faults.elapsed().as_secs_f64();
    // A last publish per room: its position is where every stream must get to.
    let mut fences = Vec::new();
    for (r, room) in rooms.iter().enumerate() {
        let mut got = None;
        let t = Instant::now();
        let mut k = r;
        while got.is_none() && t.elapsed() < Duration::from_secs(30) {
            let seq = seqs.next(r);
            let out = Http::new(ports[k % ports.len()]).publish(room, seq);
            got = publisher::account(&ctx, r, seq, out);
            k += 1;
            if got.is_none() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        match got {
            Some((e, o)) => fences.push(Some((ctx.epoch_id(r, &e), o, e))),
            None => {
                problems.push(format!("room {room}: no publish succeeded within 30 s after the run"));
                fences.push(None);
            }
        }
    }
    let settle_end = Instant::now() + Duration::from_secs(cfg.settle_secs);
    let behind = |shared: &[SharedPos]| -> Vec<usize> {
        shared
            .iter()
            .enumerate()
            .filter(|(_, (_, r, p))| match (&fences[*r], *p.lock().unwrap()) {
                (Some((fe, fo, _)), Some((e, o))) => !(e == *fe && o >= *fo),
                (Some(_), None) => true,
                (None, _) => false,
            })
            .map(|(i, _)| i)
            .collect()
    };
    let t_settle = Instant::now();
    let mut left = behind(&shared);
    while !left.is_empty() && Instant::now() < settle_end {
        std::thread::sleep(Duration::from_millis(200));
        left = behind(&shared);
    }
    let settled_in = t_settle.elapsed().as_secs_f64();
    stop_clients.store(true, Ordering::SeqCst);
    let mut streams = Vec::new();
    for c in clients {
        streams.extend(c.join().expect("client thread"));
    }
    for &i in &left {
        let (c, r, p) = &shared[i];
        let pos = *p.lock().unwrap();
        let (_, fo, fe) = fences[*r].as_ref().expect("a fence");
        let at = pos.map(|(e, o)| format!("{}:{o}", checker::short(&ctx.epoch_name(*r, e))));
        let recent =
            streams.iter().find(|s| s.client == *c && s.room == *r).map(|s| s.recent(&ctx)).unwrap_or_default();
        ctx.violation(
            Kind::NotCaughtUp,
            *c,
            *r,
            format!(
                "{} s after the final publish the stream is at {at:?}, the room at {}:{fo}",
                cfg.settle_secs,
                checker::short(fe)
            ),
            recent,
        );
    }
    ctx.judge_switches();

    // ---- report ----
    let st = &ctx.stats;
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let total_faults: u64 = faults.counts.iter().filter(|(k, _)| **k != "drain_overrun").map(|(_, v)| v).sum();
    let counts = ctx.counts();
    let nviol: usize = counts.iter().map(|c| c.1).sum();
    let kinds = [Kind::SilentLoss, Kind::Duplicate, Kind::OutOfOrder, Kind::Lie, Kind::NotCaughtUp, Kind::Protocol];
    let by_kind: Vec<String> = kinds
        .iter()
        .map(|k| format!("{}={}", k.name(), counts.iter().find(|c| c.0 == *k).map(|c| c.1).unwrap_or(0)))
        .collect();
    let mut t = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        t,
        "== chaos {topology}: seed {}, {:.0} s of faults, {} clients ({} streams) in {} rooms, {} msg/s asked, {} shard(s)/node",
        cfg.seed,
        fault_secs,
        cfg.clients,
        streams.len(),
        cfg.rooms,
        cfg.rate,
        cfg.shards
    );
    let faults_line: Vec<String> = faults.counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(t, "faults injected: {total_faults} ({})", faults_line.join(" "));
    let _ = writeln!(
        t,
        "published: acked {} ({:.0}/s over {:.0} s), refused {}, unknown {}, publisher lag resets {}",
        g(&st.published_acked),
        g(&st.published_acked) as f64 / publish_secs,
        publish_secs,
        g(&st.published_refused),
        g(&st.published_unknown),
        g(&st.publisher_lag_resets)
    );
    let _ = writeln!(
        t,
        "clients: connects {}, failed connects {}, disconnects {}, maintenance {}, closed 1008 (slow consumer) {}, pauses {}, stale drops {}, other errors {}",
        g(&st.connects),
        g(&st.connect_failures),
        g(&st.disconnects),
        g(&st.maintenance),
        g(&st.policy_closes),
        g(&st.pauses),
        g(&st.stale_drops),
        g(&st.other_errors)
    );
    let _ = writeln!(
        t,
        "messages checked: {}; subscribed {} (recovered:true {}, recovered:false {}), gaps {} ({} behind the stream's position), subscribes refused {}",
        g(&st.messages),
        g(&st.subscribes),
        g(&st.recovered_true),
        g(&st.recovered_false),
        g(&st.gaps),
        g(&st.gaps_backward),
        g(&st.subscribe_errors)
    );
    let proxied: Vec<u64> = proxies.iter().map(|p| p.accepted.load(Ordering::Relaxed)).collect();
    let _ = writeln!(t, "connections through the proxies of nodes 0, 1, 2: {proxied:?}");
    let _ = writeln!(
        t,
        "caught up {:.1} s after the final publish: {} of {} streams",
        settled_in,
        shared.len() - left.len(),
        shared.len()
    );
    let _ = writeln!(t, "violations: {nviol} ({})", by_kind.join(" "));
    if !problems.is_empty() {
        let _ = writeln!(t, "did not heal: {problems:?}");
    }
    let _ = writeln!(
        t,
        "CHAOS-RESULT topology={topology} seed={} secs={:.0} faults={total_faults} messages={} recovered_true={} recovered_false={} gaps={} violations={nviol} {}",
        cfg.seed,
        fault_secs,
        g(&st.messages),
        g(&st.recovered_true),
        g(&st.recovered_false),
        g(&st.gaps),
        by_kind.join(" ")
    );
    let _ = writeln!(t, "-- fault log --");
    for l in &faults.log {
        let _ = writeln!(t, "{l}");
    }
    let violations = ctx.violations.lock().unwrap();
    if !violations.is_empty() {
        let _ = writeln!(t, "-- violations (the first 40 of each kind) --");
        for k in kinds {
            for v in violations.iter().filter(|v| v.kind == k).take(40) {
                let who = if v.client == usize::MAX { "publisher".to_string() } else { format!("client {}", v.client) };
                let _ = writeln!(
                    t,
                    "{} {who} room {} at t={:.2}s: {}\n    last fault: {}",
                    k.name(),
                    v.room,
                    v.at,
                    v.detail,
                    v.last_fault
                );
                for r in &v.recent {
                    let _ = writeln!(t, "      {r}");
                }
            }
        }
    }
    drop(violations);
    let _ = std::fs::write(dir.join("report.txt"), &t);
    drop(faults);
    if nviol == 0 && problems.is_empty() && std::env::var("CORECAST_CHAOS_DIR").is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        let _ = writeln!(t, "(report and node logs kept in {})", dir.display());
    }
    Report { text: t, violations: nviol, problems }
}
