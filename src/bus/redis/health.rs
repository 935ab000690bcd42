//! The health of every Redis link of the node, for `/readyz` and the
//! link gauges.
//!
//! Readiness means "this node can serve" (`Readiness`): a partial Redis
//! failure (one shard's subscriber or publisher link down, one of several
//! servers or one cluster primary unreachable, unserved slots) is
//! *degraded*: it shows in `corecast_redis_degraded` and in the `/readyz`
//! body, but the node stays ready for `--ready-grace-secs` of it (a failover
//! usually heals it sooner), so one dead primary does not take every node
//! out of its load balancer at once. Not ready: before every link has been
//! up once (start-up), while no link to any Redis server is up, or once
//! degraded for longer than the grace.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::link::{Link, LinkError};
use super::topology::Topology;
use crate::metrics::Metrics;

/// Every Redis link of this node, shared by the shards (for `/readyz`), the
/// readers and the publishers. Each flag has one writer: the reader thread
/// for `sub`, the shard thread for `publ`; the matching gauges too.
pub struct Health {
    metrics: Arc<Metrics>,
    links: Box<[LinkHealth]>,
    /// Set once the topology exists: its own problems (unserved slots, no
    /// primary found) come first in `/readyz`.
    pub(super) topo: std::sync::OnceLock<Arc<Topology>>,
    /// Every link has been up at once (start-up is over).
    ever_up: AtomicBool,
    /// Since when some link or slot is down (`None`: all is well).
    degraded_since: Mutex<Option<Instant>>,
}

/// Whether this node can serve (`/readyz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Serving, with part of Redis down for `since` (within the grace).
    Degraded {
        since: Duration,
        detail: String,
    },
    /// Cannot serve: `why` is terse (the client listener's body), `detail`
    /// names links, addresses and errors (the admin listener's).
    NotReady {
        why: &'static str,
        detail: Option<String>,
    },
}

#[derive(Default)]
struct LinkHealth {
    sub: AtomicBool,
    publ: AtomicBool,
    /// The last failure of each link, subscriber then publisher.
    last_error: [Mutex<Option<String>>; 2],
}

impl Health {
    pub(super) fn new(metrics: Arc<Metrics>, shards: usize) -> Health {
        Health {
            metrics,
            links: (0..shards).map(|_| LinkHealth::default()).collect(),
            topo: Default::default(),
            ever_up: AtomicBool::new(false),
            degraded_since: Mutex::new(None),
        }
    }

    /// Looks at every link and the topology, and moves the start of the
    /// degradation with them. Called on every link change, by shard 0's
    /// liveness timer (so a topology problem is timed from when it shows,
    /// give or take a tick) and by `/readyz` and `/metrics`. Returns what is
    /// down, if anything.
    pub fn observe(&self) -> Option<String> {
        let problem = self.problem();
        if let Ok(mut since) = self.degraded_since.lock() {
            match (&problem, *since) {
                (Some(_), None) => *since = Some(Instant::now()),
                (None, Some(_)) => *since = None,
                _ => {}
            }
        }
        if problem.is_none() {
            self.ever_up.store(true, Ordering::Relaxed);
        }
        problem
    }

    /// Can this node serve, with a degradation allowed for `grace`?
    pub fn readiness(&self, grace: Duration) -> Readiness {
        let Some(detail) = self.observe() else { return Readiness::Ready };
        if !self.ever_up.load(Ordering::Relaxed) {
            return Readiness::NotReady { why: "redis not connected yet", detail: Some(detail) };
        }
        if !self.metrics.redis_nodes.any_up() {
            return Readiness::NotReady { why: "redis unreachable", detail: Some(detail) };
        }
        let since = self.degraded_since.lock().ok().and_then(|s| *s).map(|t| t.elapsed()).unwrap_or_default();
        if since > grace {
            return Readiness::NotReady {
                why: "redis degraded for longer than --ready-grace-secs",
                detail: Some(detail),
            };
        }
        Readiness::Degraded { since, detail }
    }

    /// Records whether `link` of `shard` works; keeps the gauges in step.
    pub(crate) fn set(&self, shard: usize, link: Link, up: bool) {
        let (flag, gauge) = match link {
            Link::Subscriber => (&self.links[shard].sub, &self.metrics.shard(shard).redis_connected),
            Link::Publisher => (&self.links[shard].publ, &self.metrics.shard(shard).redis_publisher_connected),
        };
        if flag.swap(up, Ordering::Relaxed) != up {
            // One writer per gauge (see the struct doc), so `add`/`sub` suffice.
            if up {
                gauge.inc()
            } else {
                gauge.sub(1)
            }
            self.observe();
        }
    }

    /// Records the last failure of `link` of `shard`, at Redis server `node`.
    pub(crate) fn failed(&self, shard: usize, link: Link, node: &str, e: &LinkError) {
        if let Some(Ok(mut last)) = self.links[shard].last_error.get(link as usize).map(|m| m.lock()) {
            *last = Some(format!("{node}: {e}"));
        }
    }

    /// `None` when every link of every shard is up; else the first one down
    /// and its last error (for the admin listener's `/readyz` body).
    fn problem(&self) -> Option<String> {
        if let Some(p) = self.topo.get().and_then(|t| t.problem()) {
            return Some(format!("redis: {p}\n"));
        }
        for (i, l) in self.links.iter().enumerate() {
            for (link, up) in [(Link::Subscriber, &l.sub), (Link::Publisher, &l.publ)] {
                if !up.load(Ordering::Relaxed) {
                    let last = l.last_error[link as usize].lock().ok().and_then(|e| e.clone());
                    return Some(match last {
                        Some(e) => format!("redis: shard {i} {} link down (last error: {e})\n", link.name()),
                        None => {
                            format!("redis: shard {i} {} link not connected yet\n", link.name())
                        }
                    });
                }
            }
        }
        None
    }
}
