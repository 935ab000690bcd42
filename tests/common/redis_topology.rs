//! For the topology tests (`tests/redis_cluster_mode.rs`,
//! `tests/redis_sentinel.rs`): a real Redis Cluster (N primaries, each
//! with replicas, made by `redis-cli --cluster create`) and a real Sentinel
//! set-up (a primary, a replica, three `redis-server --sentinel`), all on
//! free ports, their files in a private temporary directory, every process
//! killed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::redis::{RedisServer, answers, die_with_parent, free_port, wait_until};

/// A directory of its own under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "corecast-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create a temp dir");
        TempDir(p)
    }
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- Redis Cluster ----------------------------------------------------------------

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    pub failed: bool,
    /// Slot ranges served (primaries only), inclusive.
    pub slots: Vec<(u16, u16)>,
}

pub struct RedisCluster {
    /// Every server, primaries and replicas; index = creation order.
    pub servers: Vec<RedisServer>,
    _dir: TempDir,
}

impl RedisCluster {
    /// `primaries` primaries with `replicas` replicas each, `cluster-node-timeout`
    /// 2000 ms, every slot assigned, `cluster_state:ok` everywhere.
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        let dir = TempDir::new("cluster");
        let n = primaries * (1 + replicas);
        let servers: Vec<RedisServer> = (0..n)
            .map(|i| {
                let conf = dir.file(&format!("nodes-{i}.conf"));
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    // Short, for quick failovers; not so short that a busy
                    // 2-core machine makes a healthy primary look dead.
                    "--cluster-node-timeout",
                    "2000",
                    // Replicas sync at once (not after the 5 s diskless
                    // delay) and may always take over.
                    "--repl-diskless-sync-delay",
                    "0",
                    "--cluster-replica-validity-factor",
                    "0",
                    // A primary lost takes only its own slots down.
                    "--cluster-require-full-coverage",
                    "no",
                    "--dir",
                    &dir.0.to_string_lossy(),
                ])
            })
            .collect();
        let addrs: Vec<String> = servers.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = RedisCluster { servers, _dir: dir };
        c.wait_ok(Duration::from_secs(20));
        if replicas > 0 {
            c.wait_replicas_synced(Duration::from_secs(20));
        }
        c
    }

    /// `redis+cluster://` with two seeds.
    pub fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{},127.0.0.1:{}", self.servers[0].port, self.servers[1].port)
    }

    pub fn index_of_port(&self, port: u16) -> usize {
        self.servers.iter().position(|s| s.port == port).expect("a server of this cluster")
    }

    /// Every running server answers `cluster_state:ok`, agrees on who serves
    /// every slot, and sees the same primaries.
    pub fn wait_ok(&self, limit: Duration) {
        wait_until("cluster_state:ok on every running node", limit, || {
            let mut views = Vec::new();
            for s in self.servers.iter().filter(|s| s.is_running()) {
                let Some(info) = s.try_cli(&["CLUSTER", "INFO"]) else { return false };
                if !info.contains("cluster_state:ok")
                    || !info.contains("cluster_slots_assigned:16384")
                    || !info.contains("cluster_slots_fail:0")
                    || !info.contains("cluster_slots_pfail:0")
                {
                    return false;
                }
                let Some(nodes) = self.nodes_from(s) else { return false };
                let mut owners: Vec<(u16, u16, u16)> = nodes
                    .iter()
                    .filter(|n| n.primary && !n.failed)
                    .flat_map(|n| n.slots.iter().map(move |&(a, b)| (a, b, n.port)))
                    .collect();
                owners.sort();
                views.push(owners);
            }
            !views.is_empty() && views.windows(2).all(|w| w[0] == w[1])
        });
    }

    /// Every running replica has its master link up (so it may fail over).
    pub fn wait_replicas_synced(&self, limit: Duration) {
        wait_until("every replica is in sync", limit, || {
            self.servers.iter().filter(|s| s.is_running()).all(|s| {
                s.try_cli(&["INFO", "replication"])
                    .is_some_and(|i| i.contains("role:master") || i.contains("master_link_status:up"))
            })
        });
    }

    /// Every replica of primary `i` has applied everything `i` has written so
    /// far (its `slave_repl_offset` reached the primary's `master_repl_offset`).
    /// `WAIT` from a fresh `redis-cli` connection cannot say this: it waits only
    /// for that connection's own writes, so it returns at once. A replica that
    /// just finished its initial (diskless) sync may still lack writes made
    /// since, until the primary puts it online on its first ACK.
    pub fn wait_replicas_caught_up(&self, i: usize, limit: Duration) {
        let field = |info: &str, key: &str| -> Option<u64> {
            info.lines().find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        };
        let primary = &self.servers[i];
        let info = primary.cli(&["INFO", "replication"]);
        let target = field(&info, "master_repl_offset:").expect("master_repl_offset");
        let replicas: Vec<&RedisServer> = self
            .servers
            .iter()
            .filter(|s| {
                s.is_running()
                    && s.try_cli(&["INFO", "replication"]).is_some_and(|r| {
                        r.contains("role:slave") && r.contains(&format!("master_port:{}", primary.port))
                    })
            })
            .collect();
        assert!(!replicas.is_empty(), "server {i} has a replica");
        wait_until("the replicas have applied every write of their primary", limit, || {
            replicas.iter().all(|r| {
                r.try_cli(&["INFO", "replication"])
                    .and_then(|x| field(&x, "slave_repl_offset:"))
                    .is_some_and(|o| o >= target)
            })
        });
    }

    /// `CLUSTER NODES` as seen by server `s`.
    pub fn nodes_from(&self, s: &RedisServer) -> Option<Vec<ClusterNode>> {
        let text = s.try_cli(&["CLUSTER", "NODES"])?;
        Some(text.lines().filter_map(parse_node_line).collect())
    }

    /// The nodes as the first running server sees them.
    pub fn nodes(&self) -> Vec<ClusterNode> {
        let s = self.servers.iter().find(|s| s.is_running()).expect("a running server");
        self.nodes_from(s).expect("CLUSTER NODES")
    }

    /// `CLUSTER KEYSLOT key`.
    pub fn slot(&self, key: &str) -> u16 {
        let s = self.servers.iter().find(|s| s.is_running()).expect("a running server");
        s.cli(&["CLUSTER", "KEYSLOT", key]).parse().expect("a slot number")
    }

    /// The index of the primary serving `key`'s slot now.
    pub fn owner(&self, key: &str) -> usize {
        let slot = self.slot(key);
        let n = self
            .nodes()
            .into_iter()
            .find(|n| n.primary && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"));
        self.index_of_port(n.port)
    }

    /// Indices of the primaries now.
    pub fn primaries(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .nodes()
            .into_iter()
            .filter(|n| n.primary && !n.failed && !n.slots.is_empty())
            .map(|n| self.index_of_port(n.port))
            .collect();
        v.sort();
        v
    }

    /// `PUBSUB SHARDNUMSUB channel` at server `i`.
    pub fn shardnumsub(&self, i: usize, channel: &str) -> u64 {
        let out = self.servers[i].cli(&["PUBSUB", "SHARDNUMSUB", channel]);
        out.lines().nth(1).and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("SHARDNUMSUB: {out:?}"))
    }

    pub fn node_id(&self, i: usize) -> String {
        self.servers[i].cli(&["CLUSTER", "MYID"])
    }
}

fn parse_node_line(line: &str) -> Option<ClusterNode> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 {
        return None;
    }
    let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
    let flags = f[2];
    let slots = f[8..]
        .iter()
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.parse().ok().map(|a| (a, a)),
        })
        .collect();
    Some(ClusterNode {
        id: f[0].to_string(),
        port,
        primary: flags.contains("master"),
        failed: flags.contains("fail") && !flags.contains("fail?"),
        slots,
    })
}

// ---- Sentinel -----------------------------------------------------------------------

pub const MASTER: &str = "mymaster";

/// A `redis-server --sentinel`, killed on drop.
pub struct Sentinel {
    pub port: u16,
    child: Child,
}

impl Sentinel {
    pub fn cli(&self, args: &[&str]) -> String {
        let out =
            Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One primary, one replica, three sentinels watching them (quorum 2,
/// `down-after-milliseconds` 2000, `failover-timeout` 3000; 1000 ms once let
/// a loaded CI box see the just-promoted replica as down and fail back).
pub struct SentinelSetup {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
    dir: TempDir,
}

impl SentinelSetup {
    pub fn start() -> SentinelSetup {
        let dir = TempDir::new("sentinel");
        // Redis 7 syncs a replica diskless after a 5 s delay by default
        // (waiting for more replicas to share the stream); with one replica
        // that is 5 s of nothing at the start and again after the failover.
        let no_delay = ["--repl-diskless-sync-delay", "0"];
        let primary = RedisServer::start_with(&no_delay);
        let replica = RedisServer::start_with(
            &[&no_delay[..], &["--replicaof", "127.0.0.1", &primary.port.to_string()]].concat(),
        );
        let sentinels: Vec<Sentinel> = (0..3).map(|i| start_sentinel(&dir, i, primary.port)).collect();
        // Two of Sentinel's own timers, shortened for a test (`SENTINEL
        // DEBUG`, Redis 7.0+). With the defaults, turning a restarted old
        // primary into a replica takes a reconnect (at most one per 15 s),
        // the next INFO (every 10 s) and a wait of four publish periods
        // (8 s): up to ~35 s, which a loaded CI box overran. These make it
        // ~9 s. The publish period stays: shortened to 500 ms, a sentinel
        // sometimes turned the replica just promoted by `SENTINEL FAILOVER`
        // back into a replica of the old primary (history_topologies then
        // found the room's history gone). The failover itself is governed by
        // `down-after-milliseconds` and `failover-timeout`, as configured.
        for x in &sentinels {
            let ok = x.cli(&["SENTINEL", "DEBUG", "info-period", "1000", "min-link-reconnect-period", "1000"]);
            assert_eq!(ok, "OK", "SENTINEL DEBUG on sentinel {}", x.port);
        }
        let s = SentinelSetup { primary, replica, sentinels, dir };
        wait_until("the replica is in sync", Duration::from_secs(10), || {
            s.replica.try_cli(&["INFO", "replication"]).is_some_and(|i| i.contains("master_link_status:up"))
        });
        wait_until("every sentinel knows the replica and the other two sentinels", Duration::from_secs(20), || {
            s.sentinels.iter().all(|x| {
                let m = x.cli(&["SENTINEL", "master", MASTER]);
                field(&m, "num-slaves") == Some("1") && field(&m, "num-other-sentinels") == Some("2")
            })
        });
        s
    }

    pub fn url(&self) -> String {
        let list: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis+sentinel://{}/{MASTER}", list.join(","))
    }

    /// Every sentinel's log, for a failure message: what each saw and did
    /// (`+sdown`, `+switch-master`, `+convert-to-slave`, `+tilt`).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.sentinels.len() {
            let log = std::fs::read_to_string(self.dir.file(&format!("sentinel-{i}.log"))).unwrap_or_default();
            out.push_str(&format!("--- sentinel {i} ---\n{log}"));
        }
        out
    }

    /// The port every sentinel names as the primary, once they agree.
    pub fn agreed_primary(&self) -> Option<u16> {
        let ports: Vec<Option<u16>> = self
            .sentinels
            .iter()
            .map(|s| s.cli(&["SENTINEL", "get-master-addr-by-name", MASTER]).lines().nth(1)?.trim().parse().ok())
            .collect();
        let first = ports[0]?;
        ports.iter().all(|p| *p == Some(first)).then_some(first)
    }
}

/// `name\nvalue` pairs of a redis-cli reply to `SENTINEL master`.
fn field<'a>(reply: &'a str, name: &str) -> Option<&'a str> {
    let lines: Vec<&str> = reply.lines().collect();
    lines.iter().position(|l| l.trim() == name).and_then(|i| lines.get(i + 1)).map(|v| v.trim())
}

pub fn start_sentinel(dir: &TempDir, i: usize, primary: u16) -> Sentinel {
    for _ in 0..5 {
        let port = free_port();
        let conf = dir.file(&format!("sentinel-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\nsentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {MASTER} 2000\nsentinel failover-timeout {MASTER} 3000\n\
                 sentinel parallel-syncs {MASTER} 1\n",
                dir.0.display(),
                dir.file(&format!("sentinel-{i}.log")),
            ),
        )
        .expect("write sentinel.conf");
        let mut cmd = Command::new("redis-server");
        cmd.arg(&conf).arg("--sentinel").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn redis-server --sentinel");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break; // port taken: try another
            }
            if answers(port) {
                return Sentinel { port, child };
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("redis-server --sentinel would not start");
}

// ---- MONITOR ------------------------------------------------------------------------

/// Every command a Redis server runs for its clients, as `MONITOR` prints
/// it, collected by a thread until dropped. A MONITOR connection killed
/// (Sentinel kills every normal client when it turns a server into a
/// replica) is made again at once.
pub struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Monitor {
    pub fn start(port: u16) -> Monitor {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let first = Self::connect(port).expect("MONITOR");
        let (sink, flag) = (lines.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut conn = Some(first);
            while !flag.load(Ordering::Relaxed) {
                let Some(r) = conn.as_mut() else {
                    conn = Self::connect(port);
                    if conn.is_none() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    continue;
                };
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) => conn = None,
                    Ok(_) => sink.lock().unwrap().push(line.trim_end().to_string()),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => conn = None,
                }
            }
        });
        Monitor { lines, stop }
    }

    fn connect(port: u16) -> Option<BufReader<TcpStream>> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
        s.write_all(b"MONITOR\r\n").ok()?;
        let mut r = BufReader::new(s);
        let mut first = String::new();
        r.read_line(&mut first).ok()?;
        first.starts_with("+OK").then_some(r)
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---- traffic ----------------------------------------------------------------------

/// A subscriber client read by a thread of its own: every event it gets,
/// with the time it came, until dropped.
/// The thread's panic (e.g. the node closed the subscriber) fails the test
/// at the next `poll`, with its message, not as a later timeout elsewhere.
pub struct Collector {
    rx: std::sync::mpsc::Receiver<(serde_json::Value, Instant)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Everything taken from the thread so far.
    pub got: Vec<(serde_json::Value, Instant)>,
}

impl Collector {
    pub fn start(mut c: super::Client) -> Collector {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if let Some(v) = c.recv_json(Duration::from_millis(100))
                    && tx.send((v, Instant::now())).is_err()
                {
                    return;
                }
            }
        });
        Collector { rx, stop, thread: Some(thread), got: Vec::new() }
    }

    /// Takes what has arrived; panics if the reading thread did.
    pub fn poll(&mut self) {
        while let Ok(e) = self.rx.try_recv() {
            self.got.push(e);
        }
        if self.thread.as_ref().is_some_and(|t| t.is_finished())
            && let Some(t) = self.thread.take()
            && let Err(e) = t.join()
        {
            let why = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("the collector's reader failed: {}", why.unwrap_or_default());
        }
    }

    /// The `seq`s received in `room` (messages whose data is `{"seq": n}`), in arrival order.
    pub fn seqs(&self, room: &str) -> Vec<u64> {
        self.got
            .iter()
            .filter(|(v, _)| v["ev"] == "message" && v["room"] == room)
            .filter_map(|(v, _)| v["data"]["seq"].as_u64())
            .collect()
    }

    /// When the message `seq` of `room` arrived.
    pub fn arrival(&self, room: &str, seq: u64) -> Option<Instant> {
        self.got
            .iter()
            .find(|(v, _)| v["ev"] == "message" && v["room"] == room && v["data"]["seq"] == seq)
            .map(|(_, t)| *t)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
            && !std::thread::panicking()
        {
            panic!("the collector's reader failed (see its panic above)");
        }
    }
}

/// A publishing client: one message per room per `round`, each with an id,
/// and a record of what was acknowledged and what refused.
pub struct Prober {
    pub c: super::Client,
    next: std::collections::HashMap<String, u64>,
    /// Per room: (seq, when it was sent) of each acknowledged publish.
    pub acked: std::collections::HashMap<String, Vec<(u64, Instant)>>,
    /// Per room: how many publishes were refused with `unavailable`.
    pub refused: std::collections::HashMap<String, u64>,
}

impl Prober {
    pub fn new(c: super::Client) -> Prober {
        Prober { c, next: Default::default(), acked: Default::default(), refused: Default::default() }
    }

    /// Publishes `{"seq": n}` to each room, then reads every answer.
    pub fn round(&mut self, rooms: &[String]) {
        let now = Instant::now();
        let mut sent = std::collections::HashMap::new();
        for r in rooms {
            let seq = self.next.entry(r.clone()).or_insert(0);
            let id = format!("{r}/{seq}");
            self.c.send_json(&serde_json::json!({"op": "publish", "room": r, "data": {"seq": *seq}, "id": id}));
            sent.insert(id, (r.clone(), *seq));
            *seq += 1;
        }
        while !sent.is_empty() {
            let v = self.c.recv_json(Duration::from_secs(10)).expect("an answer to every publish");
            let Some((room, seq)) = v["id"].as_str().and_then(|id| sent.remove(id)) else {
                panic!("unexpected event for the publisher: {v}")
            };
            match v["ev"].as_str() {
                Some("ack") => self.acked.entry(room).or_default().push((seq, now)),
                Some("error") if v["code"] == "unavailable" => *self.refused.entry(room).or_default() += 1,
                _ => panic!("unexpected answer {v}"),
            }
        }
    }

    pub fn acked_seqs(&self, room: &str) -> Vec<u64> {
        self.acked.get(room).map(|v| v.iter().map(|(s, _)| *s).collect()).unwrap_or_default()
    }

    pub fn refused(&self, room: &str) -> u64 {
        self.refused.get(room).copied().unwrap_or(0)
    }
}

/// Subscribes `c` to every room, pipelined, and waits for every `subscribed`.
pub fn subscribe_all(c: &mut super::Client, rooms: &[String]) {
    for r in rooms {
        c.send_json(&serde_json::json!({"op": "subscribe", "room": r, "id": r}));
    }
    let mut left: std::collections::HashSet<&str> = rooms.iter().map(|r| r.as_str()).collect();
    while !left.is_empty() {
        let v = c.recv_json(Duration::from_secs(10)).expect("a `subscribed` reply");
        assert_eq!(v["ev"], "subscribed", "{v}");
        assert!(left.remove(v["room"].as_str().expect("room")), "{v}");
    }
}

/// Strictly increasing: in order, no duplicate.
pub fn assert_in_order(room: &str, seqs: &[u64]) {
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "room {room}: out of order or twice: {seqs:?}");
}
