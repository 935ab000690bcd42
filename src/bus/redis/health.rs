//! The health of every Redis link of the node, for `/readyz` and the
//! link gauges.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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
        Health { metrics, links: (0..shards).map(|_| LinkHealth::default()).collect(), topo: Default::default() }
    }

    /// Records whether `link` of `shard` works; keeps the gauges in step.
    pub(crate) fn set(&self, shard: usize, link: Link, up: bool) {
        let (flag, gauge) = match link {
            Link::Subscriber => (&self.links[shard].sub, &self.metrics.shard(shard).redis_connected),
            Link::Publisher => (&self.links[shard].publ, &self.metrics.shard(shard).redis_publisher_connected),
        };
        if flag.swap(up, Ordering::Relaxed) != up {
            // One writer per gauge (see the struct doc), so `add`/`sub` suffice.
            if up { gauge.inc() } else { gauge.sub(1) }
        }
    }

    /// Records the last failure of `link` of `shard`, at Redis server `node`.
    pub(crate) fn failed(&self, shard: usize, link: Link, node: &str, e: &LinkError) {
        if let Some(Ok(mut last)) = self.links[shard].last_error.get(link as usize).map(|m| m.lock()) {
            *last = Some(format!("{node}: {e}"));
        }
    }

    /// `None` when every link of every shard is up; else the first one down
    /// and its last error, for the `/readyz` body.
    pub fn not_ready(&self) -> Option<String> {
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
