//! The run plan that the parent hands to every worker, and the messages they
//! exchange afterwards.
//!
//! The parent writes one [`Plan`] as the first JSON line on a worker's stdin,
//! then [`Command`]s, one per line. The worker answers on stdout with
//! [`Report`] lines: a `tick` every second of the shared clock, `ready` once
//! all its connections are up (or failed), and one `result` before it exits.
//!
//! A plan numbers all connections of the run globally, `0..total`: worker `w`
//! of `W` owns the indices `g` with `g % W == w`, and [`Plan::conn`] tells
//! what connection `g` is (its role, room, node and source address), so no
//! per-connection list is shipped and every process agrees on the layout.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use serde::{Deserialize, Serialize};

use crate::proto::Protocol;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Connect,
    Idle,
    Fanout,
    Echo,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::Echo => "echo",
        }
    }
}

/// A server node, from `ws://host:port[/path][?query]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as written, for the `Host` header.
    pub host: String,
    /// The path and query from the URL, if it had one.
    pub path: Option<String>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url.strip_prefix("ws://").ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
        let (host, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        let host = if host.contains(':') { host.to_string() } else { format!("{host}:80") };
        let addr = host
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| format!("{url}: no IPv4 address"))?;
        let path = path.map(|p| if p.starts_with('?') { format!("/{p}") } else { p.to_string() });
        Ok(Target { addr, host, path: path.filter(|p| p != "/") })
    }
}

/// What one connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Upgrade and stay open (the `connect` scenario).
    Plain,
    /// Subscribe to `room`, then count deliveries.
    Subscriber { room: usize },
    /// Publish (`fanout`) or send to `/echo` (`echo`); `index` is its number
    /// among all senders of the run.
    Sender { index: usize },
}

/// Connection `g` of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnPlan {
    pub role: Role,
    pub target: usize,
    pub source_ip: Option<IpAddr>,
    pub path: String,
}

/// Everything a worker needs; identical for all workers but `worker`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub scenario: Scenario,
    /// The client protocol spoken (corecast's own, or a peer's).
    #[serde(default)]
    pub protocol: Protocol,
    pub worker: usize,
    pub workers: usize,
    /// Start of the run on the shared monotonic clock ([`crate::procfs::now_ns`]):
    /// connection `g` is opened at `t0 + g / connect_rate`, ticks fall on whole seconds after it.
    pub t0_ns: u64,
    pub targets: Vec<Target>,
    pub source_ips: Vec<IpAddr>,
    /// Connections per second over the whole run; 0 opens them as fast as `max_pending` allows.
    pub connect_rate: f64,
    /// Per worker: connections in their handshake (or subscribe) at once.
    pub max_pending: usize,
    /// A connection not ready this long after its connect() counts as timed out.
    pub connect_timeout_ms: u64,
    /// Global index layout: `plain`, then `subscribers`, then `senders`.
    pub plain: usize,
    pub subscribers: usize,
    pub senders: usize,
    pub rooms: usize,
    pub room_prefix: String,
    pub user_prefix: String,
    /// Messages per second over all senders; 0 = keep `window` in flight per sender.
    pub rate: f64,
    pub window: usize,
    /// Size of the JSON `data` object sent, in bytes.
    pub payload: usize,
}

impl Plan {
    pub fn total(&self) -> usize {
        self.plain + self.subscribers + self.senders
    }

    /// Global indices owned by this worker, in opening order.
    pub fn owned(&self) -> impl Iterator<Item = usize> + use<> {
        (self.worker..self.total()).step_by(self.workers.max(1))
    }

    pub fn room_name(&self, room: usize) -> String {
        format!("{}{room}", self.room_prefix)
    }

    pub fn conn(&self, g: usize) -> ConnPlan {
        let nodes = self.targets.len().max(1);
        let (role, target) = if g < self.plain {
            (Role::Plain, g % nodes)
        } else if g < self.plain + self.subscribers {
            let s = g - self.plain;
            let rooms = self.rooms.max(1);
            // Subscriber s joins room s % R on node (s / R) % N: each room
            // gets members on every node, even when R and N share factors.
            (Role::Subscriber { room: s % rooms }, (s / rooms) % nodes)
        } else {
            let index = g - self.plain - self.subscribers;
            (Role::Sender { index }, index % nodes)
        };
        let source_ip = (!self.source_ips.is_empty()).then(|| self.source_ips[g % self.source_ips.len()]);
        let base = if self.scenario == Scenario::Echo { "/echo" } else { self.protocol.default_path() };
        let mut path = self.targets[target].path.clone().unwrap_or_else(|| base.to_string());
        if self.scenario != Scenario::Echo && self.protocol == Protocol::Corecast {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str(&format!("user={}{g}", self.user_prefix));
        }
        ConnPlan { role, target, source_ip, path }
    }

    /// Members of each room over the whole run, as planned.
    pub fn planned_subs_per_room(&self) -> Vec<u32> {
        let mut subs = vec![0u32; self.rooms];
        for s in 0..self.subscribers {
            subs[s % self.rooms.max(1)] += 1;
        }
        subs
    }

    /// The room of sender `index`'s `seq`-th publish: senders walk the rooms
    /// round-robin, interleaved so that all rooms get the same share.
    pub fn publish_room(&self, index: usize, seq: u64) -> usize {
        let r = self.rooms.max(1) as u64;
        ((index as u64 + seq.wrapping_mul(self.senders.max(1) as u64)) % r) as usize
    }
}

/// Parent → worker, one JSON object per line after the plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Start the measured phase. `subs_per_room` counts the subscribers that
    /// really got `subscribed`, over all workers: each publish to room r
    /// expects `subs_per_room[r]` deliveries.
    Go { subs_per_room: Vec<u32> },
    /// Send nothing new; keep receiving.
    Stop,
    /// Close every connection, report the result and exit.
    Finish,
}

/// Counts a worker keeps, cumulative since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// connect() calls made.
    pub started: u64,
    /// Upgrades answered with a valid `101`.
    pub connected: u64,
    /// Connections that got their `subscribed` (or upgraded, when they need no subscription).
    pub ready: u64,
    /// Connections that never became ready (see [`Failures`]).
    pub failed: u64,
    /// Ready connections closed by the server or the network before the end.
    pub dropped: u64,
    /// Publishes (or echo requests) sent.
    pub sent: u64,
    /// Publish acks received.
    pub acked: u64,
    /// Deliveries (or echo replies) received.
    pub received: u64,
    /// Deliveries the sends so far should cause.
    pub expected: u64,
    /// `error` events received.
    pub errors: u64,
    /// `maintenance` events received.
    pub maintenance: u64,
    /// This worker's CPU seconds so far.
    pub cpu_s: f64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.started += o.started;
        self.connected += o.connected;
        self.ready += o.ready;
        self.failed += o.failed;
        self.dropped += o.dropped;
        self.sent += o.sent;
        self.acked += o.acked;
        self.received += o.received;
        self.expected += o.expected;
        self.errors += o.errors;
        self.maintenance += o.maintenance;
        self.cpu_s += o.cpu_s;
    }
}

/// Why connections failed to become ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    /// socket/bind/connect errors (e.g. refused, no ports left).
    pub connect: u64,
    /// Upgrade refused (non-101 status) or malformed.
    pub upgrade: u64,
    /// Subscribe answered with `error`.
    pub subscribe: u64,
    /// Not ready within the connect timeout.
    pub timeout: u64,
    /// Closed by the peer, reset, or a protocol violation before ready.
    pub closed: u64,
}

impl Failures {
    pub fn add(&mut self, o: &Failures) {
        self.connect += o.connect;
        self.upgrade += o.upgrade;
        self.subscribe += o.subscribe;
        self.timeout += o.timeout;
        self.closed += o.closed;
    }
}

/// What a worker measured, sent once at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub counters: Counters,
    pub failures: Failures,
    /// Delivery (fanout) or round-trip (echo) latency, ns, as [`crate::stats::to_pairs`].
    pub latency: Vec<[u64; 2]>,
    /// Publish → ack latency, ns.
    pub ack_latency: Vec<[u64; 2]>,
    /// connect() → upgraded, ns.
    pub handshake: Vec<[u64; 2]>,
    /// Shared-clock times: when the last connection became ready, when Go
    /// and Stop arrived, when the last delivery arrived (0 = never).
    pub last_ready_ns: u64,
    pub go_ns: u64,
    pub stop_ns: u64,
    pub last_receive_ns: u64,
    /// This worker's CPU seconds at Go and at Stop.
    pub cpu_at_go_s: f64,
    pub cpu_at_stop_s: f64,
    /// The first `error` event or failure reason seen, for the report.
    pub first_error: Option<String>,
}

/// Worker → parent, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    Tick { k: u64, counters: Counters },
    Ready { subs_per_room: Vec<u32>, counters: Counters },
    Result(Box<WorkerResult>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(scenario: Scenario, nodes: usize, plain: usize, subscribers: usize, senders: usize, rooms: usize) -> Plan {
        let targets = (0..nodes).map(|i| Target::parse(&format!("ws://127.0.0.1:{}", 9000 + i)).unwrap()).collect();
        Plan {
            scenario,
            protocol: Protocol::Corecast,
            worker: 0,
            workers: 3,
            t0_ns: 0,
            targets,
            source_ips: vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
            connect_rate: 0.0,
            max_pending: 10,
            connect_timeout_ms: 1000,
            plain,
            subscribers,
            senders,
            rooms,
            room_prefix: "r".into(),
            user_prefix: "u".into(),
            rate: 0.0,
            window: 1,
            payload: 64,
        }
    }

    #[test]
    fn urls_parse_into_address_host_and_path() {
        let t = Target::parse("ws://127.0.0.1:8080").unwrap();
        assert_eq!((t.addr, t.host.as_str(), t.path), ("127.0.0.1:8080".parse().unwrap(), "127.0.0.1:8080", None));
        let t = Target::parse("ws://localhost:81/ws?token=abc").unwrap();
        assert_eq!((t.addr.ip().is_loopback(), t.path.as_deref()), (true, Some("/ws?token=abc")));
        assert_eq!(Target::parse("ws://127.0.0.1:81?x=1").unwrap().path.as_deref(), Some("/?x=1"));
        assert_eq!(Target::parse("ws://127.0.0.1").unwrap().addr.port(), 80);
        assert!(Target::parse("wss://127.0.0.1:443").is_err());
        assert!(Target::parse("http://127.0.0.1:80").is_err());
    }

    #[test]
    fn workers_partition_every_connection_exactly_once() {
        let mut p = plan(Scenario::Connect, 1, 10, 0, 0, 1);
        let mut seen = Vec::new();
        for w in 0..3 {
            p.worker = w;
            seen.extend(p.owned());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn every_room_has_subscribers_on_every_node() {
        let p = plan(Scenario::Fanout, 2, 0, 8, 2, 2);
        let mut placed = [[0; 2]; 2];
        for g in 0..8 {
            let c = p.conn(g);
            let Role::Subscriber { room } = c.role else { panic!("{c:?}") };
            placed[room][c.target] += 1;
        }
        assert_eq!(placed, [[2, 2], [2, 2]]);
        assert_eq!(p.planned_subs_per_room(), vec![4, 4]);
        assert_eq!(p.conn(8).role, Role::Sender { index: 0 });
        assert_eq!((p.conn(9).role, p.conn(9).target), (Role::Sender { index: 1 }, 1));
    }

    #[test]
    fn paths_carry_a_user_and_source_addresses_rotate() {
        let p = plan(Scenario::Idle, 1, 0, 4, 0, 1);
        assert_eq!(p.conn(3).path, "/ws?user=u3");
        assert_eq!(p.conn(0).source_ip, Some("127.0.0.2".parse().unwrap()));
        assert_eq!(p.conn(1).source_ip, Some("127.0.0.3".parse().unwrap()));
        let mut e = plan(Scenario::Echo, 1, 0, 0, 2, 1);
        assert_eq!(e.conn(1).path, "/echo");
        e.targets[0].path = Some("/ws?token=t".into());
        e.scenario = Scenario::Idle;
        assert_eq!(e.conn(1).path, "/ws?token=t&user=u1");
    }

    #[test]
    fn peer_protocols_use_their_endpoint_and_no_user() {
        let mut p = plan(Scenario::Fanout, 1, 0, 2, 1, 1);
        p.protocol = Protocol::Socketio;
        assert_eq!(p.conn(2).path, "/socket.io/?EIO=4&transport=websocket");
        p.protocol = Protocol::Raw;
        assert_eq!(p.conn(0).path, "/ws");
        p.protocol = Protocol::Centrifuge;
        assert_eq!(p.conn(1).path, "/connection/websocket");
    }

    #[test]
    fn publishes_spread_evenly_over_rooms() {
        let p = plan(Scenario::Fanout, 1, 0, 0, 4, 6);
        let mut hits = vec![0; 6];
        for index in 0..4 {
            for seq in 0..30 {
                hits[p.publish_room(index, seq)] += 1;
            }
        }
        assert_eq!(hits, vec![20; 6]);
    }

    #[test]
    fn messages_round_trip_as_tagged_json_lines() {
        let line = serde_json::to_string(&Command::Go { subs_per_room: vec![3, 4] }).unwrap();
        assert_eq!(line, r#"{"cmd":"go","subs_per_room":[3,4]}"#);
        let tick = Report::Tick { k: 2, counters: Counters { sent: 5, ..Default::default() } };
        let back: Report = serde_json::from_str(&serde_json::to_string(&tick).unwrap()).unwrap();
        assert!(matches!(back, Report::Tick { k: 2, counters } if counters.sent == 5));
    }
}
