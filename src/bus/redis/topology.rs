//! ⑦ Where does channel X go? The node-wide view of the Redis servers this
//! node talks to, for all three topologies of PROTOCOL.md §8:
//!
//! - single: one server, the URL's host (re-resolved on request);
//! - Sentinel: the primary the sentinels name, checked with `ROLE`
//!   (`sentinel.rs`), followed through `+switch-master`;
//! - Cluster: every primary and the slots it serves (`CLUSTER SLOTS`,
//!   `cluster.rs`), refreshed every second and whenever a link asks.
//!
//! In: `Spec` (start-up), refresh requests from the readers and publishers
//! (a failed connection, `MOVED`, a pushed `sunsubscribe`, `READONLY`).
//! Out: an immutable `View` behind a version number. The readers and
//! publishers keep their own `Arc<View>` and compare the version (one
//! relaxed atomic load) before routing; only when it moved do they take the
//! lock to copy the new `Arc`. The `topology` thread is the only writer; it
//! wakes every reader when the view changes.
//!
//! Start-up asks synchronously, so that a bad seed list or an unknown
//! primary fails `corecast` with one line instead of a node that never
//! becomes ready.

use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tracing::{info, warn};

use super::cluster::{self, NodeAddr, SLOTS, SlotRange};
use super::net::{oneshot, resolve};
use super::sentinel;
use super::url::RedisUrl;
use super::url::{HostPort, Spec};
use crate::metrics::Metrics;

/// A cluster's slot map is asked again this often even when nothing failed.
const CLUSTER_REFRESH: Duration = Duration::from_secs(1);
/// The sentinels are asked again this often even without `+switch-master`.
const SENTINEL_REFRESH: Duration = Duration::from_secs(2);
/// A single Redis's name is resolved again at most this often unasked.
const SINGLE_REFRESH: Duration = Duration::from_secs(30);
/// Refresh requests closer together than this are served by one refresh.
const REFRESH_GAP: Duration = Duration::from_millis(100);

/// Which of PROTOCOL.md §8's topologies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Single,
    /// Several independent servers, channels spread by jump consistent hash.
    Several,
    Sentinel,
    Cluster,
}

impl Mode {
    /// Room and user channels use sharded Pub/Sub (`SSUBSCRIBE`/`SPUBLISH`).
    pub fn sharded(self) -> bool {
        self == Mode::Cluster
    }
    /// Every connection checks `ROLE` before it is used. In a Cluster too:
    /// a primary demoted by a failover keeps answering `SSUBSCRIBE` (and
    /// runs `SPUBLISH`) for its new primary's slots as a replica, so a
    /// connection made there from a slot map not yet refreshed would listen
    /// at a replica (`bus::redis::reader`, an unsolicited `sunsubscribe`).
    pub fn check_role(self) -> bool {
        matches!(self, Mode::Sentinel | Mode::Cluster)
    }
}

/// One primary: a Redis server this node keeps a subscriber and a publisher
/// connection to, per shard.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    /// `host:port`, as Redis (or the URL) names it; the key links are kept by.
    pub name: Arc<str>,
    /// The login, at this node.
    pub url: RedisUrl,
    /// Resolved by the topology thread, so that no shard ever resolves.
    pub addrs: Vec<SocketAddr>,
}

/// "CRC-64/XZ", the key jump consistent hash spreads channels by over
/// `redis://a,redis://b,...` (docs/cluster.md, "Several independent Redis servers": a backend publishing directly computes
/// the same: `jump(crc64_xz(channel), number of servers)`, servers in URL order).
static CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

fn spread_key(channel: &[u8]) -> u64 {
    CRC64.checksum(channel)
}

/// Slot map entry for a slot no primary serves.
const NO_OWNER: u16 = u16::MAX;

/// Who serves what, as of one refresh. Immutable; replaced whole.
#[derive(Debug)]
pub struct View {
    pub mode: Mode,
    pub nodes: Vec<Arc<Node>>,
    /// Cluster only: slot → index in `nodes`, or `NO_OWNER`.
    slots: Option<Box<[u16]>>,
    /// Cluster only: the replicas, asked for the slot map when primaries fail.
    replicas: Vec<NodeAddr>,
}

/// Equal when the same primaries serve the same slots (the replicas listed
/// are only whom to ask next, and differ with whoever answered).
impl PartialEq for View {
    fn eq(&self, other: &View) -> bool {
        self.mode == other.mode && self.nodes == other.nodes && self.slots == other.slots
    }
}

impl Eq for View {}

impl View {
    /// The index in `nodes` of the primary for `channel`, if any serves it.
    pub fn owner(&self, channel: &[u8]) -> Option<usize> {
        match &self.slots {
            None if self.mode == Mode::Several && !self.nodes.is_empty() => {
                Some(jumpch::hash(spread_key(channel), self.nodes.len() as u32) as usize)
            }
            None => (!self.nodes.is_empty()).then_some(0),
            Some(slots) => match slots[cluster::key_slot(channel) as usize] {
                NO_OWNER => None,
                i => Some(i as usize),
            },
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| &*n.name == name)
    }

    /// The slot ranges node `i` serves, e.g. `0-5460`, or `""` outside a cluster.
    pub fn slots_of(&self, i: usize) -> String {
        self.ranges(|o| o == i as u16)
    }

    /// Slots no primary serves, as ranges; `None` if all are served.
    fn unserved(&self) -> Option<String> {
        let r = self.ranges(|o| o == NO_OWNER);
        (!r.is_empty()).then_some(r)
    }

    fn ranges(&self, pick: impl Fn(u16) -> bool) -> String {
        let Some(slots) = &self.slots else { return String::new() };
        let mut out = String::new();
        let mut start = None;
        for s in 0..=SLOTS {
            let hit = s < SLOTS && pick(slots[s]);
            match (hit, start) {
                (true, None) => start = Some(s),
                (false, Some(a)) => {
                    if !out.is_empty() {
                        out.push(',');
                    }
                    let _ = if a == s - 1 { write!(out, "{a}") } else { write!(out, "{a}-{}", s - 1) };
                    start = None;
                }
                _ => {}
            }
        }
        out
    }

    fn summary(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if i > 0 {
                s.push_str("; ");
            }
            s.push_str(&n.name);
            if self.slots.is_some() {
                let _ = write!(s, " slots {}", self.slots_of(i));
            }
        }
        s
    }
}

/// The node-wide topology: the current `View` and how to ask for a new one.
pub struct Topology {
    pub mode: Mode,
    spec: Spec,
    version: AtomicU64,
    view: Mutex<Arc<View>>,
    refresh: Sender<()>,
    /// Write ends of the readers' wake-up pipes.
    wakers: Mutex<Vec<UnixStream>>,
    /// What is wrong with the topology itself (unserved slots, no primary).
    problem: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

impl Topology {
    /// Finds the first view (blocking; fails with one line for the
    /// operator) and starts the `topology` thread that keeps it current.
    pub fn start(spec: Spec, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Topology>> {
        let mode = match spec {
            Spec::Single(_) => Mode::Single,
            Spec::Several(_) => Mode::Several,
            Spec::Sentinel { .. } => Mode::Sentinel,
            Spec::Cluster { .. } => Mode::Cluster,
        };
        let view = match discover(&spec, None) {
            Ok(v) => v,
            Err(why) => anyhow::bail!("--redis {spec}: {why}"),
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let topo = Arc::new(Topology {
            mode,
            spec,
            version: AtomicU64::new(1),
            view: Mutex::new(Arc::new(view)),
            refresh: tx,
            wakers: Mutex::default(),
            problem: Mutex::default(),
            metrics,
        });
        topo.check_problem(&topo.view());
        topo.metrics.redis_nodes.primaries(topo.view().nodes.iter().map(|n| &*n.name));
        info!(redis = %topo.spec, nodes = %topo.view().summary(), "redis topology");
        let weak = Arc::downgrade(&topo);
        thread::Builder::new().name("topology".into()).spawn(move || run(weak, rx))?;
        Ok(topo)
    }

    /// Changes with every new view.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn view(&self) -> Arc<View> {
        self.view.lock().map(|v| v.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Asks the topology thread for a fresh view soon (never blocks).
    pub fn request_refresh(&self) {
        let _ = self.refresh.try_send(());
    }

    /// A reader's wake-up pipe, written to whenever the view changes.
    pub fn add_waker(&self, pipe: UnixStream) {
        if let Ok(mut w) = self.wakers.lock() {
            w.push(pipe);
        }
    }

    /// What `/readyz` should say about the topology itself, if anything.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|p| p.clone())
    }

    fn set_problem(&self, p: Option<String>) {
        if let Ok(mut cur) = self.problem.lock()
            && *cur != p
        {
            if let Some(p) = &p {
                warn!(problem = %p, "redis topology");
            }
            *cur = p;
        }
    }

    fn check_problem(&self, v: &View) {
        self.set_problem(v.unserved().map(|r| format!("cluster slots {r} have no primary")));
    }

    fn install(&self, v: View) {
        let changed = {
            let Ok(mut cur) = self.view.lock() else { return };
            if **cur == v {
                false
            } else {
                info!(nodes = %v.summary(), "redis topology changed");
                *cur = Arc::new(v);
                true
            }
        };
        self.check_problem(&self.view());
        if !changed {
            return;
        }
        self.metrics.redis_nodes.primaries(self.view().nodes.iter().map(|n| &*n.name));
        self.version.fetch_add(1, Ordering::AcqRel);
        self.metrics.shard(0).redis_topology_changes_total.add_shared(1);
        if let Ok(wakers) = self.wakers.lock() {
            for mut w in wakers.iter() {
                // Non-blocking; a full pipe already holds a wake-up.
                let _ = w.write(&[1]);
            }
        }
    }
}

/// The `topology` thread: refresh on request or on the period, for as
/// long as the node runs.
fn run(topo: Weak<Topology>, requests: Receiver<()>) {
    let mut watch = sentinel::Watch::default();
    let mut last = Instant::now();
    loop {
        let Some(t) = topo.upgrade() else { return };
        let mode = t.mode;
        let spec = t.spec.clone();
        drop(t);
        let asked = match (&spec, mode) {
            (Spec::Sentinel { sentinels, master, .. }, _) => watch.wait(sentinels, master, &requests, SENTINEL_REFRESH),
            (_, Mode::Cluster) => wait(&requests, CLUSTER_REFRESH),
            _ => wait(&requests, SINGLE_REFRESH),
        };
        if asked.is_none() {
            return; // The Topology is gone.
        }
        let since = last.elapsed();
        if since < REFRESH_GAP {
            thread::sleep(REFRESH_GAP - since);
        }
        last = Instant::now();
        let Some(t) = topo.upgrade() else { return };
        let current = t.view();
        match discover(&spec, Some(&current)) {
            Ok(v) => t.install(v),
            // The old view stays; `/readyz` says why it could not be renewed.
            Err(why) => t.set_problem(Some(why)),
        }
    }
}

/// Waits for a request or the period; `None` once the requests can no longer come.
fn wait(requests: &Receiver<()>, period: Duration) -> Option<()> {
    match requests.recv_timeout(period) {
        Ok(()) | Err(RecvTimeoutError::Timeout) => Some(()),
        Err(RecvTimeoutError::Disconnected) => None,
    }
}

/// Asks Redis (or the sentinels) who serves what now.
fn discover(spec: &Spec, current: Option<&View>) -> Result<View, String> {
    match spec {
        Spec::Single(url) => {
            let addrs = resolve(&url.host, url.port);
            if addrs.is_empty() && current.is_none() {
                warn!(redis = %url, "cannot resolve the Redis host yet; retrying");
            }
            let name = cluster::node_name(&url.host, url.port).into();
            Ok(View {
                mode: Mode::Single,
                nodes: vec![Arc::new(Node { name, url: url.clone(), addrs })],
                slots: None,
                replicas: vec![],
            })
        }
        Spec::Several(urls) => {
            let nodes = urls
                .iter()
                .map(|u| {
                    let name = cluster::node_name(&u.host, u.port).into();
                    Arc::new(Node { name, url: u.clone(), addrs: resolve(&u.host, u.port) })
                })
                .collect();
            Ok(View { mode: Mode::Several, nodes, slots: None, replicas: vec![] })
        }
        Spec::Sentinel { sentinels, master, login } => {
            let p = sentinel::find_primary(sentinels, master, login)?;
            let addrs = resolve(&p.host, p.port);
            let name = cluster::node_name(&p.host, p.port).into();
            Ok(View {
                mode: Mode::Sentinel,
                nodes: vec![Arc::new(Node { name, url: login.at(&p.host, p.port), addrs })],
                slots: None,
                replicas: vec![],
            })
        }
        Spec::Cluster { seeds, login } => {
            // Ask the primaries we know first, then their replicas, then the seeds.
            let mut ask: Vec<(String, u16)> = Vec::new();
            if let Some(v) = current {
                ask.extend(v.nodes.iter().map(|n| (n.url.host.clone(), n.url.port)));
                ask.extend(v.replicas.iter().map(|r| (r.host.clone(), r.port)));
                // Spread the questions: a node that has not heard of a failover yet is not asked first every time.
                if !ask.is_empty() {
                    let k = fastrand::usize(..ask.len());
                    ask.rotate_left(k);
                }
            }
            ask.extend(seeds.iter().map(|HostPort { host, port }| (host.clone(), *port)));
            let mut errors = Vec::new();
            for (host, port) in &ask {
                match slot_map(&login.at(host, *port)) {
                    Ok(ranges) if ranges.is_empty() => {
                        errors.push(format!("{}: no slots assigned yet", cluster::node_name(host, *port)))
                    }
                    Ok(ranges) => return Ok(cluster_view(ranges, login)),
                    Err(e) => errors.push(format!("{}: {e}", cluster::node_name(host, *port))),
                }
            }
            Err(format!("no cluster node answered CLUSTER SLOTS ({})", errors.join("; ")))
        }
    }
}

fn cluster_view(ranges: Vec<SlotRange>, login: &RedisUrl) -> View {
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    let mut slots = vec![NO_OWNER; SLOTS].into_boxed_slice();
    let mut replicas = Vec::new();
    for r in ranges {
        let name: Arc<str> = cluster::node_name(&r.primary.host, r.primary.port).into();
        let i = match nodes.iter().position(|n| n.name == name) {
            Some(i) => i,
            None => {
                let addrs = resolve(&r.primary.host, r.primary.port);
                nodes.push(Arc::new(Node { name, url: login.at(&r.primary.host, r.primary.port), addrs }));
                nodes.len() - 1
            }
        };
        for s in r.start..=r.end {
            slots[s as usize] = i as u16;
        }
        replicas.extend(r.replicas);
    }
    // A stable order, so that an unchanged cluster gives an equal view.
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by(|&a, &b| nodes[a].name.cmp(&nodes[b].name));
    let mut new_index = vec![0u16; nodes.len()];
    for (new, &old) in order.iter().enumerate() {
        new_index[old] = new as u16;
    }
    for s in slots.iter_mut() {
        if *s != NO_OWNER {
            *s = new_index[*s as usize];
        }
    }
    let nodes = order.into_iter().map(|i| nodes[i].clone()).collect();
    replicas.sort_by(|a: &NodeAddr, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    replicas.dedup();
    View { mode: Mode::Cluster, nodes, slots: Some(slots), replicas }
}

/// `CLUSTER SLOTS` at one node.
fn slot_map(url: &RedisUrl) -> Result<Vec<SlotRange>, String> {
    let reply = oneshot(url, true, &[b"CLUSTER", b"SLOTS"]).map_err(|e| e.to_string())?;
    cluster::parse_slots(&reply, &url.host).map_err(|e| e.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u16, end: u16, port: u16) -> SlotRange {
        SlotRange { start, end, primary: NodeAddr { host: "127.0.0.1".into(), port }, replicas: vec![] }
    }

    #[test]
    fn a_cluster_view_routes_each_channel_to_its_slots_primary() {
        let login = RedisUrl::parse("redis://:pw@127.0.0.1:1").unwrap();
        let v = cluster_view(vec![range(5461, 10922, 7002), range(0, 5460, 7001), range(10923, 16383, 7003)], &login);
        assert_eq!(
            v.nodes.iter().map(|n| &*n.name).collect::<Vec<_>>(),
            ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
        );
        assert_eq!(v.nodes[1].url.password.as_deref(), Some("pw"));
        // "foo" is slot 12182, "bar" 5061, "{user1000}.x" is user1000's slot.
        assert_eq!(v.owner(b"foo"), Some(2));
        assert_eq!(v.owner(b"bar"), Some(0));
        assert_eq!(v.slots_of(0), "0-5460");
        assert_eq!(v.unserved(), None);
        // The same ranges in another order give an equal view (no spurious change).
        let again =
            cluster_view(vec![range(0, 5460, 7001), range(10923, 16383, 7003), range(5461, 10922, 7002)], &login);
        assert_eq!(v, again);
    }

    #[test]
    fn several_servers_share_the_channels_by_jump_hash_in_url_order() {
        let node = |p: u16| {
            let url = RedisUrl::parse(&format!("redis://127.0.0.1:{p}")).unwrap();
            Arc::new(Node { name: format!("127.0.0.1:{p}").into(), url, addrs: vec![] })
        };
        let v = |n: u16| View {
            mode: Mode::Several,
            nodes: (0..n).map(|i| node(7000 + i)).collect(),
            slots: None,
            replicas: vec![],
        };
        let (three, four) = (v(3), v(4));
        let mut per = [0; 3];
        let mut moved = 0;
        for i in 0..3000 {
            let ch = format!("cc:room:r{i}");
            let o = three.owner(ch.as_bytes()).unwrap();
            per[o] += 1;
            let o4 = four.owner(ch.as_bytes()).unwrap();
            // Consistent: a fourth server takes channels only for itself.
            assert!(o4 == o || o4 == 3, "{ch}: {o} -> {o4}");
            moved += usize::from(o4 != o);
        }
        assert!(per.iter().all(|&n| n > 800), "spread evenly: {per:?}");
        assert!((500..1000).contains(&moved), "about a quarter move: {moved}");
        assert_eq!(spread_key(b"123456789"), 0x995DC9BBDF1939FA, "the CRC-64/XZ check value");
    }

    #[test]
    fn unserved_slots_have_no_owner_and_are_named() {
        let login = RedisUrl::parse("redis://127.0.0.1:1").unwrap();
        let v = cluster_view(vec![range(0, 5460, 7001), range(16383, 16383, 7001)], &login);
        assert_eq!(v.owner(b"foo"), None);
        assert_eq!(v.owner(b"bar"), Some(0));
        assert_eq!(v.unserved().as_deref(), Some("5461-16382"));
        assert_eq!(v.slots_of(0), "0-5460,16383");
    }
}
