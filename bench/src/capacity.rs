//! The capacity model behind `corecast-bench plan` (docs/capacity.md).
//!
//! From unit costs measured on one host ([`Costs`], fitted by
//! `scripts/bench-capacity.sh`) it predicts what a deployment of N nodes x
//! C shards x R Redis primaries spends on a workload of rooms, members and
//! publishes: server and Redis CPU, the messages Redis writes, memory; and
//! from those, how far the load can grow before a CPU or memory budget is
//! reached, or (`--nodes 0`) the smallest deployment that carries it.
//!
//! The model is linear in what a node and Redis do per second:
//!
//! - a node: every frame written to a member (`delivery_us`), every
//!   message a shard with members handles (`shard_message_us`: the
//!   hand-off from another shard or the bus, the walk of its members),
//!   every publish it accepts (`publish_us`, plus `redis_publish_us` for
//!   the PUBLISH round trip with Redis), every pub/sub message it reads
//!   from Redis (`redis_message_us`), every held connection
//!   (`idle_conn_us_per_s`);
//! - Redis: every PUBLISH (`redis_cpu_publish_us`) and every subscriber
//!   it writes the message to (`redis_cpu_message_us`), which is one per
//!   node with members with the relay (one subscription per room per
//!   node) and one per shard with members without it.
//!
//! It holds below saturation: a shard that falls behind coalesces writes
//! (`--write-delay-ms auto`) and pays less per delivery, so near the
//! budget the model is on the safe side.

use serde::{Deserialize, Serialize};

/// Unit costs, all measured on one host (`host`); CPU in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Costs {
    /// Where and when they were measured (free text).
    pub host: String,
    /// Server CPU per frame written to a member.
    pub delivery_us: f64,
    /// Server CPU per (message, shard with members): the hand-off between
    /// shards or from the bus, the walk of the shard's members.
    pub shard_message_us: f64,
    /// Server CPU per publish accepted, on the bus it goes to (standalone).
    pub publish_us: f64,
    /// Extra server CPU per publish when it goes to Redis (PUBLISH, reply).
    pub redis_publish_us: f64,
    /// Server CPU per pub/sub message a node reads from Redis.
    pub redis_message_us: f64,
    /// Server CPU per held connection per second (pings, timers).
    pub idle_conn_us_per_s: f64,
    /// Server memory per held connection.
    pub conn_bytes: f64,
    /// Server memory of a node with no connections: a process...
    pub node_base_bytes: f64,
    /// ...plus this per shard.
    pub shard_base_bytes: f64,
    /// Extra server memory per shard with Redis (its links and buffers).
    pub redis_shard_bytes: f64,
    /// Redis CPU of a primary with the nodes connected and no traffic.
    pub redis_idle_cores: f64,
    /// Redis CPU per PUBLISH.
    pub redis_cpu_publish_us: f64,
    /// Redis CPU per subscriber a PUBLISH is written to.
    pub redis_cpu_message_us: f64,
    /// Redis Cluster (2+ primaries): its CPU for the same work, over one
    /// server's (sharded pub/sub, the cluster bus, fewer commands per read).
    pub redis_cluster_factor: f64,
    /// Redis memory per subscribed channel (a room per node or per shard,
    /// a user per shard).
    pub redis_channel_bytes: f64,
}

/// The costs measured on this repository's test box; `--costs FILE`
/// replaces them with a host's own (`scripts/bench-capacity.sh --fit`).
pub const DEFAULT_COSTS: &str = include_str!("../costs.json");

/// What runs: nodes of `shards` each, on `primaries` Redis primaries
/// (0 = one standalone node on the local bus).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Deployment {
    pub nodes: u32,
    pub shards: u32,
    pub primaries: u32,
    /// `--per-shard-subscriptions true`: a Redis subscription per shard
    /// with members instead of one per node.
    pub per_shard_subscriptions: bool,
}

/// What the clients do. Members are spread evenly over the nodes and at
/// random over a node's shards (SO_REUSEPORT); publishes evenly over rooms.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Workload {
    /// Connections that are members of a room.
    pub subscribers: f64,
    /// Rooms they are spread over (each member in one room).
    pub rooms: f64,
    /// Publishes per second over all rooms.
    pub rate: f64,
    /// Other held connections (no room: direct messages only).
    pub idle: f64,
}

/// Per-node and per-primary budgets the capacity is measured against.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Budget {
    /// Share of each shard's core the server may use (0-1).
    pub server_cpu: f64,
    /// Share of its core one Redis primary may use (0-1).
    pub redis_cpu: f64,
    /// Memory a node may use, bytes.
    pub node_memory: f64,
    /// Connections a node may hold (the host's own limits: descriptors,
    /// the kernel's socket memory, which the process RSS does not show).
    pub node_connections: f64,
}

/// What the model predicts for a deployment and workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    pub deployment: Deployment,
    pub workload: Workload,
    pub deliveries_per_s: f64,
    /// Nodes with members, per room.
    pub nodes_per_room: f64,
    /// Shards with members, per room and node.
    pub shards_per_room_node: f64,
    /// Messages shards handle per second (all nodes).
    pub shard_messages_per_s: f64,
    /// Messages Redis writes to subscribers per second (all primaries).
    pub redis_messages_per_s: f64,
    /// Redis messages per publish.
    pub redis_messages_per_publish: f64,
    /// Server CPU, cores, over all nodes.
    pub server_cores: f64,
    /// Server CPU per node, cores.
    pub node_cores: f64,
    /// Redis CPU over all primaries, cores.
    pub redis_cores: f64,
    /// Redis CPU of the busiest primary, cores.
    pub busiest_primary_cores: f64,
    /// Server memory per node, bytes.
    pub node_bytes: f64,
    /// Redis memory for subscriptions, bytes, all primaries.
    pub redis_bytes: f64,
    /// Idle connections one node could hold: its memory, its CPU budget
    /// spent on nothing but keeping them (pings), or the connections
    /// budget, whichever is least.
    pub max_connections_per_node: f64,
    /// How many times this load fits in the servers' CPU budget.
    pub server_headroom: f64,
    /// How many times it fits in the busiest primary's CPU budget.
    pub redis_headroom: f64,
    /// How many times this load fits in every budget (1.0 = exactly).
    pub headroom: f64,
    /// What runs out first: `server cpu`, `redis cpu` or `node memory`
    /// (memory or the connections budget).
    pub limit: String,
    /// The publish rate and deliveries per second at the budget.
    pub max_rate: f64,
    pub max_deliveries_per_s: f64,
}

/// Expected number of `bins` that get at least one of `balls` placed at random.
fn occupied(bins: f64, balls: f64) -> f64 {
    if bins <= 1.0 {
        return if balls > 0.0 { 1.0 } else { 0.0 };
    }
    bins * (1.0 - (1.0 - 1.0 / bins).powf(balls))
}

/// What deployment `d` spends on workload `w`, and its headroom against `b`.
pub fn predict(c: &Costs, d: Deployment, w: Workload, b: Budget) -> Prediction {
    let nodes = d.nodes.max(1) as f64;
    let shards = d.shards.max(1) as f64;
    let redis = d.primaries > 0;
    let rooms = w.rooms.max(1.0);
    let size = w.subscribers / rooms;
    // Members are spread evenly over nodes (a load balancer, the bench's round robin).
    let nodes_per_room = size.min(nodes).max(if size > 0.0 { 1.0 } else { 0.0 });
    let per_node = if nodes_per_room > 0.0 { size / nodes_per_room } else { 0.0 };
    let shards_per_room_node = occupied(shards, per_node);
    let deliveries = w.rate * size;
    let shard_messages = w.rate * nodes_per_room * shards_per_room_node;
    let per_publish = if !redis {
        0.0
    } else if d.per_shard_subscriptions || shards <= 1.0 {
        nodes_per_room * shards_per_room_node
    } else {
        nodes_per_room
    };
    let redis_messages = w.rate * per_publish;
    let conns = w.subscribers + w.idle;
    let server_us = deliveries * c.delivery_us
        + shard_messages * c.shard_message_us
        + w.rate * (c.publish_us + if redis { c.redis_publish_us } else { 0.0 })
        + redis_messages * c.redis_message_us
        + conns * c.idle_conn_us_per_s;
    let server_cores = server_us / 1e6;
    let primaries = d.primaries.max(1) as f64;
    let redis_traffic =
        if redis { (w.rate * c.redis_cpu_publish_us + redis_messages * c.redis_cpu_message_us) / 1e6 } else { 0.0 };
    let factor = if d.primaries > 1 { c.redis_cluster_factor } else { 1.0 };
    let redis_traffic = redis_traffic * factor;
    let redis_idle = c.redis_idle_cores * factor;
    let redis_cores = if redis { redis_traffic + primaries * redis_idle } else { 0.0 };
    // Rooms hash to primaries: with fewer rooms than primaries some idle;
    // with many, the load evens out.
    let busiest_share = if rooms >= primaries { (rooms / primaries).ceil() / rooms } else { 1.0 / rooms.ceil() };
    let busiest_primary_cores = redis_traffic * busiest_share.min(1.0) + if redis { redis_idle } else { 0.0 };
    let base_bytes = c.node_base_bytes + shards * (c.shard_base_bytes + if redis { c.redis_shard_bytes } else { 0.0 });
    let node_bytes = base_bytes + conns / nodes * c.conn_bytes;
    // Channels: a room per node (or per shard with members), a user per connection.
    let room_channels = rooms * nodes_per_room * if d.per_shard_subscriptions { shards_per_room_node } else { 1.0 };
    let redis_bytes = if redis { (room_channels + conns) * c.redis_channel_bytes } else { 0.0 };
    let by_memory = ((b.node_memory - base_bytes) / c.conn_bytes.max(1.0)).max(0.0);
    let by_cpu =
        if c.idle_conn_us_per_s > 0.0 { b.server_cpu * shards * 1e6 / c.idle_conn_us_per_s } else { f64::INFINITY };
    // Headroom: CPU grows with the rate, memory with the connections only.
    let node_cores = server_cores / nodes;
    let idle_cores = conns * c.idle_conn_us_per_s / 1e6 / nodes;
    let traffic_cores = (node_cores - idle_cores).max(1e-12);
    let server_room = ((b.server_cpu * shards - idle_cores) / traffic_cores).max(0.0);
    let busiest_traffic = busiest_primary_cores - redis_idle;
    let redis_room = if redis && busiest_traffic > 0.0 {
        ((b.redis_cpu - redis_idle) / busiest_traffic).max(0.0)
    } else {
        f64::INFINITY
    };
    let memory_ok = node_bytes <= b.node_memory && conns / nodes <= b.node_connections;
    let (mut headroom, mut limit) = (server_room, "server cpu");
    if redis_room < headroom {
        (headroom, limit) = (redis_room, "redis cpu");
    }
    if !memory_ok {
        (headroom, limit) = (0.0, "node memory");
    }
    Prediction {
        deployment: d,
        workload: w,
        deliveries_per_s: deliveries,
        nodes_per_room,
        shards_per_room_node,
        shard_messages_per_s: shard_messages,
        redis_messages_per_s: redis_messages,
        redis_messages_per_publish: per_publish,
        server_cores,
        node_cores,
        redis_cores,
        busiest_primary_cores,
        node_bytes,
        redis_bytes,
        max_connections_per_node: by_memory.min(by_cpu).min(b.node_connections),
        server_headroom: server_room,
        redis_headroom: redis_room,
        headroom,
        limit: limit.into(),
        max_rate: w.rate * headroom,
        max_deliveries_per_s: deliveries * headroom,
    }
}

/// The smallest deployment of `shards`-core nodes that carries `w` within
/// `b`: the fewest nodes first (server CPU and memory), then the fewest
/// primaries for them (Redis messages grow with the nodes a room spans).
/// `None` if no deployment up to `max_nodes` nodes and `max_primaries`
/// primaries does (a room too busy for one primary cannot be split).
pub fn size(
    c: &Costs,
    shards: u32,
    standalone: bool,
    w: Workload,
    b: Budget,
    max_nodes: u32,
    max_primaries: u32,
) -> Option<Prediction> {
    let primaries_from = if standalone { 0 } else { 1 };
    for nodes in 1..=max_nodes {
        if standalone && nodes > 1 {
            return None;
        }
        let mut d = Deployment { nodes, shards, primaries: primaries_from, per_shard_subscriptions: false };
        let p = predict(c, d, w, b);
        if p.limit == "node memory" || p.server_headroom < 1.0 {
            continue;
        }
        for primaries in primaries_from.max(1)..=max_primaries.max(1) {
            if standalone {
                return Some(p);
            }
            d.primaries = primaries;
            let p = predict(c, d, w, b);
            if p.headroom >= 1.0 {
                return Some(p);
            }
        }
        // Redis is the limit for this many nodes; more nodes only add Redis messages.
        return None;
    }
    None
}

impl Prediction {
    /// A readable report for the terminal.
    pub fn table(&self) -> String {
        let d = &self.deployment;
        let w = &self.workload;
        let gib = |b: f64| b / (1u64 << 30) as f64;
        let mut s = String::new();
        let topo = if d.primaries == 0 {
            "standalone (local bus)".to_string()
        } else {
            format!("{} Redis primaries", d.primaries)
        };
        s += &format!(
            "deployment      {} nodes x {} shards, {}{}\n",
            d.nodes,
            d.shards,
            topo,
            if d.per_shard_subscriptions { ", per-shard subscriptions" } else { "" }
        );
        s += &format!(
            "workload        {:.0} members in {:.0} rooms ({:.1} each), {:.0} idle, {:.0} publishes/s\n",
            w.subscribers,
            w.rooms,
            w.subscribers / w.rooms.max(1.0),
            w.idle,
            w.rate
        );
        s += &format!("deliveries/s    {:.0}\n", self.deliveries_per_s);
        s += &format!(
            "per room        {:.2} nodes, {:.2} shards per node with members\n",
            self.nodes_per_room, self.shards_per_room_node
        );
        s += &format!(
            "server CPU      {:.3} cores in all, {:.3} per node (of {})\n",
            self.server_cores, self.node_cores, d.shards
        );
        if d.primaries > 0 {
            s += &format!(
                "Redis messages  {:.2} per publish, {:.0}/s\n",
                self.redis_messages_per_publish, self.redis_messages_per_s
            );
            s += &format!(
                "Redis CPU       {:.3} cores in all, {:.3} on the busiest primary\n",
                self.redis_cores, self.busiest_primary_cores
            );
            s += &format!("Redis memory    {:.3} GiB for subscriptions\n", gib(self.redis_bytes));
        }
        s += &format!(
            "node memory     {:.3} GiB; idle connections one node holds: {:.0}\n",
            gib(self.node_bytes),
            self.max_connections_per_node
        );
        s += &format!(
            "headroom        {:.2}x ({} first): {:.0} publishes/s, {:.0} deliveries/s\n",
            self.headroom, self.limit, self.max_rate, self.max_deliveries_per_s
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> Costs {
        serde_json::from_str(DEFAULT_COSTS).unwrap()
    }
    const B: Budget = Budget { server_cpu: 0.8, redis_cpu: 0.8, node_memory: 64e9, node_connections: 1e6 };

    #[test]
    fn the_relay_makes_redis_write_once_per_node() {
        let w = Workload { subscribers: 1200.0, rooms: 1.0, rate: 1000.0, idle: 0.0 };
        let node =
            predict(&costs(), Deployment { nodes: 3, shards: 4, primaries: 1, per_shard_subscriptions: false }, w, B);
        let shard =
            predict(&costs(), Deployment { nodes: 3, shards: 4, primaries: 1, per_shard_subscriptions: true }, w, B);
        assert!((node.redis_messages_per_publish - 3.0).abs() < 1e-9);
        assert!(shard.redis_messages_per_publish > 11.9 && shard.redis_messages_per_publish <= 12.0);
        assert!(shard.redis_cores > node.redis_cores);
    }

    #[test]
    fn headroom_scales_with_the_budget_and_sizing_meets_it() {
        let c = costs();
        let w = Workload { subscribers: 1_000_000.0, rooms: 10_000.0, rate: 2_000.0, idle: 0.0 };
        let p = size(&c, 32, false, w, B, 1000, 64).expect("a deployment carries it");
        assert!(p.headroom >= 1.0);
        let fewer = Deployment { nodes: p.deployment.nodes - 1, ..p.deployment };
        if fewer.nodes > 0 {
            let q = predict(&c, fewer, w, B);
            assert!(q.headroom < 1.0 || q.limit == "redis cpu", "{q:?}");
        }
        let half = predict(&c, p.deployment, w, Budget { server_cpu: 0.4, ..B });
        assert!(half.headroom < p.headroom);
    }

    #[test]
    fn placement_counts_occupied_shards() {
        assert!((occupied(4.0, 1.0) - 1.0).abs() < 1e-9);
        assert!((occupied(2.0, 2.0) - 1.5).abs() < 1e-9);
        assert!(occupied(4.0, 1000.0) > 3.999);
        assert_eq!(occupied(1.0, 5.0), 1.0);
    }
}
