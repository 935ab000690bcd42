//! The fault injector: one fault at a time, chosen by a seeded RNG, each
//! logged with its time and what it did. Runs on the test's own thread, so
//! that every process it (re)starts dies with the test (PR_SET_PDEATHSIG is
//! tied to the spawning thread).
//!
//! | fault | what it does |
//! |---|---|
//! | `kill_node` | SIGKILL one corecast node, restart it on the same port 0.2-2 s later |
//! | `drain_node` | SIGTERM one node (drain, `maintenance` to its clients), wait for its exit, restart it |
//! | `pubsub_kill` | `CLIENT KILL TYPE pubsub` on the (a, in Cluster) Redis primary: every node's subscriber link drops |
//! | `failover` | Sentinel: `SENTINEL FAILOVER`; Cluster: `CLUSTER FAILOVER` on a replica in sync |
//! | `cut` | the proxy of one node cuts every client connection through it |
//! | `client_pause` | 10 random clients close their connection and stay away 10-40 s, then recover with `since` |
//! | `snapshot_save` | `BGSAVE` on the primary (every primary in Cluster); arms `snapshot_restart` 4-12 s later |
//! | `snapshot_restart` | SIGKILL the primary (a random one in Cluster) and restart it at once from its RDB |

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::http_at;
use crate::common::redis::RedisServer;
use crate::common::redis_topology::{MASTER, RedisCluster, SentinelSetup};

use super::checker::Ctx;
use super::nodes::Node;
use super::proxy::Proxy;

pub enum Rig {
    Sentinel(SentinelSetup),
    Cluster(RedisCluster),
}

fn role(s: &RedisServer) -> Option<String> {
    let info = s.try_cli(&["INFO", "replication"])?;
    info.lines().find_map(|l| l.strip_prefix("role:")).map(|r| r.trim().to_string())
}

impl Rig {
    pub fn name(&self) -> &'static str {
        match self {
            Rig::Sentinel(_) => "sentinel",
            Rig::Cluster(_) => "cluster",
        }
    }

    pub fn url(&self) -> String {
        match self {
            Rig::Sentinel(s) => s.url(),
            Rig::Cluster(c) => c.url(),
        }
    }

    fn servers(&self) -> Vec<&RedisServer> {
        match self {
            Rig::Sentinel(s) => vec![&s.primary, &s.replica],
            Rig::Cluster(c) => c.servers.iter().collect(),
        }
    }

    fn server_mut(&mut self, port: u16) -> &mut RedisServer {
        match self {
            Rig::Sentinel(s) => {
                if s.primary.port == port {
                    &mut s.primary
                } else {
                    &mut s.replica
                }
            }
            Rig::Cluster(c) => c.servers.iter_mut().find(|s| s.port == port).expect("a server of the cluster"),
        }
    }

    /// Ports of the running servers that say `role:master` now.
    pub fn primaries(&self) -> Vec<u16> {
        self.servers()
            .into_iter()
            .filter(|s| s.is_running() && role(s).as_deref() == Some("master"))
            .map(|s| s.port)
            .collect()
    }

    /// Ports of the running replicas whose link to their primary is up.
    fn synced_replicas(&self) -> Vec<u16> {
        self.servers()
            .into_iter()
            .filter(|s| {
                s.is_running()
                    && s.try_cli(&["INFO", "replication"])
                        .is_some_and(|i| i.contains("role:slave") && i.contains("master_link_status:up"))
            })
            .map(|s| s.port)
            .collect()
    }

    /// Whether the topology serves again: Sentinel: the sentinels agree on a
    /// primary that is one, and the replica follows it; Cluster: every slot
    /// served, every node agreeing.
    pub fn healthy(&self) -> bool {
        match self {
            Rig::Sentinel(s) => {
                let Some(p) = s.agreed_primary() else { return false };
                let servers = [&s.primary, &s.replica];
                servers.iter().any(|x| x.port == p && role(x).as_deref() == Some("master"))
                    && servers.iter().filter(|x| x.port != p).all(|x| {
                        x.try_cli(&["INFO", "replication"]).is_some_and(|i| i.contains("master_link_status:up"))
                    })
            }
            Rig::Cluster(c) => c.servers.iter().filter(|s| s.is_running()).all(|s| {
                s.try_cli(&["CLUSTER", "INFO"]).is_some_and(|i| {
                    i.contains("cluster_state:ok")
                        && i.contains("cluster_slots_assigned:16384")
                        && i.contains("cluster_slots_fail:0")
                        && i.contains("cluster_slots_pfail:0")
                })
            }),
        }
    }
}

pub struct Faults {
    rng: fastrand::Rng,
    pub rig: Rig,
    pub nodes: Vec<Node>,
    pub proxies: Vec<Arc<Proxy>>,
    pub counts: BTreeMap<&'static str, u64>,
    pub log: Vec<String>,
    /// An armed `snapshot_restart`: when, and the primaries that saved.
    armed: Option<(Instant, Vec<u16>)>,
    deck: Vec<&'static str>,
    drain_secs: u64,
}

impl Faults {
    pub fn new(seed: u64, rig: Rig, nodes: Vec<Node>, proxies: Vec<Arc<Proxy>>, drain_secs: u64) -> Faults {
        Faults {
            rng: fastrand::Rng::with_seed(seed ^ 0x5eed_f417),
            rig,
            nodes,
            proxies,
            counts: BTreeMap::new(),
            log: Vec::new(),
            armed: None,
            deck: Vec::new(),
            drain_secs,
        }
    }

    /// Seconds to wait before the next fault: 2 to 6.
    pub fn pause(&mut self) -> Duration {
        Duration::from_millis(self.rng.u64(2000..6000))
    }

    fn note(&mut self, ctx: &Ctx, kind: &'static str, what: String) {
        *self.counts.entry(kind).or_default() += 1;
        let n: u64 = self.counts.values().sum();
        let line = format!("[t={:7.2}s] #{n} {kind}: {what}", ctx.now());
        eprintln!("FAULT {line}");
        *ctx.last_fault.lock().unwrap() = line.clone();
        self.log.push(line);
    }

    /// Injects one fault (the armed snapshot restart when it is due).
    pub fn inject(&mut self, ctx: &Ctx) {
        if let Some((due, _)) = &self.armed
            && Instant::now() >= *due
        {
            let (_, saved) = self.armed.take().expect("armed");
            return self.snapshot_restart(ctx, saved);
        }
        // A shuffled deck rather than independent draws: every kind comes
        // up in every round of 9 faults (~35 s), so a 2-minute run has each.
        if self.deck.is_empty() {
            self.deck = vec![
                "kill_node",
                "kill_node",
                "drain_node",
                "pubsub_kill",
                "failover",
                "cut",
                "cut",
                "client_pause",
                "snapshot_save",
            ];
            self.rng.shuffle(&mut self.deck);
        }
        let kind = self.deck.pop().expect("a card");
        match kind {
            "kill_node" => self.kill_node(ctx),
            "drain_node" => self.drain_node(ctx),
            "pubsub_kill" => self.pubsub_kill(ctx),
            "failover" => self.failover(ctx),
            "cut" => self.cut(ctx),
            "client_pause" => self.client_pause(ctx),
            _ if self.armed.is_some() => self.cut(ctx),
            _ => self.snapshot_save(ctx),
        }
    }

    fn kill_node(&mut self, ctx: &Ctx) {
        let i = self.rng.usize(0..self.nodes.len());
        let down = Duration::from_millis(self.rng.u64(200..2000));
        self.nodes[i].kill();
        self.note(ctx, "kill_node", format!("node {i} SIGKILLed, restart in {:.1}s", down.as_secs_f64()));
        std::thread::sleep(down);
        let r = self.nodes[i].start(Duration::from_secs(30));
        self.log.push(format!("[t={:7.2}s]    node {i} restarted: {r:?}", ctx.now()));
    }

    fn drain_node(&mut self, ctx: &Ctx) {
        let i = self.rng.usize(0..self.nodes.len());
        self.note(ctx, "drain_node", format!("node {i} SIGTERM (drain {} s)", self.drain_secs));
        let took = self.nodes[i].drain(Duration::from_secs(self.drain_secs + 10));
        if took.is_none() {
            self.note(
                ctx,
                "drain_overrun",
                format!("node {i} still running {} s after SIGTERM: killed", self.drain_secs + 10),
            );
        }
        let r = self.nodes[i].start(Duration::from_secs(30));
        self.log.push(format!("[t={:7.2}s]    node {i} drained in {took:?}, restarted: {r:?}", ctx.now()));
    }

    fn pubsub_kill(&mut self, ctx: &Ctx) {
        let p = self.rig.primaries();
        if p.is_empty() {
            return self.note(ctx, "pubsub_kill", "no primary answers: skipped".into());
        }
        let port = p[self.rng.usize(0..p.len())];
        let n = self.rig.server_mut(port).try_cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        self.note(ctx, "pubsub_kill", format!("CLIENT KILL TYPE pubsub on primary :{port}: {n:?} killed"));
    }

    fn failover(&mut self, ctx: &Ctx) {
        match &self.rig {
            Rig::Sentinel(s) => {
                let i = self.rng.usize(0..s.sentinels.len());
                let before = s.agreed_primary();
                let r = s.sentinels[i].cli(&["SENTINEL", "FAILOVER", MASTER]);
                self.note(ctx, "failover", format!("SENTINEL FAILOVER via sentinel {i} (primary was {before:?}): {r}"));
            }
            Rig::Cluster(_) => {
                let r = self.rig.synced_replicas();
                if r.is_empty() {
                    return self.note(ctx, "failover", "no replica in sync: skipped".into());
                }
                let port = r[self.rng.usize(0..r.len())];
                let out = self.rig.server_mut(port).try_cli(&["CLUSTER", "FAILOVER"]);
                self.note(ctx, "failover", format!("CLUSTER FAILOVER on replica :{port}: {out:?}"));
            }
        }
    }

    fn cut(&mut self, ctx: &Ctx) {
        let i = self.rng.usize(0..self.proxies.len());
        let n = self.proxies[i].cut();
        self.note(ctx, "cut", format!("proxy of node {i} cut {n} client connections"));
    }

    fn client_pause(&mut self, ctx: &Ctx) {
        let n = ctx.pause_until.len();
        let mut who = Vec::new();
        for _ in 0..10.min(n) {
            let i = self.rng.usize(0..n);
            let away = self.rng.u64(10_000..40_000);
            ctx.pause_until[i].store(ctx.now_ms() + away, std::sync::atomic::Ordering::Relaxed);
            who.push(format!("{i}:{}s", away / 1000));
        }
        self.note(ctx, "client_pause", format!("clients away (client:seconds) {}", who.join(" ")));
    }

    fn snapshot_save(&mut self, ctx: &Ctx) {
        let p = self.rig.primaries();
        let mut saved = Vec::new();
        for &port in &p {
            if self.rig.server_mut(port).try_cli(&["BGSAVE"]).is_some() {
                saved.push(port);
            }
        }
        let due = Duration::from_millis(self.rng.u64(4000..12000));
        self.armed = Some((Instant::now() + due, saved.clone()));
        self.note(
            ctx,
            "snapshot_save",
            format!("BGSAVE on primaries {saved:?}; restart from it in {:.1}s", due.as_secs_f64()),
        );
    }

    fn snapshot_restart(&mut self, ctx: &Ctx, saved: Vec<u16>) {
        let now: Vec<u16> = self.rig.primaries();
        // A primary that saved and still is one; else any primary (its RDB
        // is then whatever it last wrote: a replica's full sync, or none).
        let still: Vec<u16> = now.iter().copied().filter(|p| saved.contains(p)).collect();
        let pool = if still.is_empty() { now } else { still };
        if pool.is_empty() {
            return self.note(ctx, "snapshot_restart", "no primary answers: skipped".into());
        }
        let port = pool[self.rng.usize(0..pool.len())];
        let rdb = self.rig.server_mut(port).rdb_path();
        let rdb_age = std::fs::metadata(&rdb).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        // Noted first: what goes wrong from here on is this fault's.
        self.note(
            ctx,
            "snapshot_restart",
            format!(
                "primary :{port} SIGKILLed and restarted from its RDB (written {:.1?} s ago)",
                rdb_age.map(|d| d.as_secs_f64())
            ),
        );
        let s = self.rig.server_mut(port);
        s.forget_replicaof();
        s.kill();
        s.restart();
        // What it came back as (a Sentinel may already have failed over).
        std::thread::sleep(Duration::from_millis(300));
        let r = role(self.rig.server_mut(port));
        self.log.push(format!("[t={:7.2}s]    :{port} back as {r:?}", ctx.now()));
    }

    /// After the run: every node running and ready, the Redis topology
    /// healthy. Returns what did not heal within `limit`.
    pub fn heal(&mut self, ctx: &Ctx, limit: Duration) -> Vec<String> {
        let end = Instant::now() + limit;
        let mut problems = Vec::new();
        while !self.rig.healthy() {
            if Instant::now() > end {
                problems.push(format!("the Redis {} topology did not heal within {limit:?}", self.rig.name()));
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for n in &mut self.nodes {
            if !n.is_running() {
                n.kill();
                if let Err(e) = n.start(Duration::from_secs(30)) {
                    problems.push(e);
                }
            }
            let addr = ([127, 0, 0, 1], n.port).into();
            while http_at(addr, "GET", "/readyz", &[], b"").0 != 200 {
                if Instant::now() > end {
                    problems.push(format!("node {} not ready after the run", n.index));
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.log.push(format!("[t={:7.2}s] healed: {problems:?}", ctx.now()));
        problems
    }
}
