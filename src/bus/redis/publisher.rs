//! ⑦ One shard's Redis publisher: routes each command to the primary that
//! owns its channel, over that primary's `NodeLink` (`publink.rs`), all on
//! the shard's own monoio runtime.
//!
//! In: `publish` calls from the shard (client `publish`/`send` ops and
//! `POST /api/publish`), and any other command that must run where a
//! channel lives (`send_to_owner`: e.g. a history script whose keys share
//! the room channel's slot, with a callback for its reply). Out: the
//! command, queued on the owner's link, or `Unavailable` at once when that
//! primary is not reachable — other channels, served by other primaries,
//! are not affected.
//!
//! Which primary owns what is the topology's `View`; the publisher keeps
//! its own `Arc` of it and compares the topology's version (one relaxed
//! atomic load, no lock) before each command. A new view retires the links
//! of nodes that are no longer primaries and starts links to new ones.
//! `PUBLISH` in the single and Sentinel topologies, `SPUBLISH` in a cluster.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tracing::debug;

use super::cluster::Redirect;
use super::health::Health;
use super::link::Link;
use super::net::ReplyFn;
use super::publink::{LinkOwner, MAX_HOPS, NodeLink};
use super::resp;
use super::topology::{Topology, View};
use crate::metrics::Metrics;
use crate::protocol::{Target, Unavailable};

pub struct Publisher {
    shard: usize,
    topo: Arc<Topology>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    me: Weak<Publisher>,
    view: RefCell<Arc<View>>,
    seen: Cell<u64>,
    /// One per primary, in `view.nodes` order.
    links: RefCell<Vec<Rc<NodeLink>>>,
    /// The channel name of the publish being queued.
    scratch: RefCell<Vec<u8>>,
    /// What `/readyz` was last told.
    healthy: Cell<bool>,
}

impl Publisher {
    /// Makes the publisher and starts a link per primary on the current
    /// (the shard's) runtime.
    pub fn start(shard: usize, topo: Arc<Topology>, health: Arc<Health>, metrics: Arc<Metrics>) -> Rc<Publisher> {
        let view = topo.view();
        let p = Rc::new_cyclic(|me| Publisher {
            shard,
            topo: topo.clone(),
            health,
            metrics,
            me: me.clone(),
            view: RefCell::new(view.clone()),
            seen: Cell::new(topo.version()),
            links: RefCell::default(),
            scratch: RefCell::default(),
            healthy: Cell::new(false),
        });
        let links = view.nodes.iter().map(|n| p.spawn_link(n.clone())).collect();
        *p.links.borrow_mut() = links;
        p
    }

    fn spawn_link(&self, node: Arc<super::topology::Node>) -> Rc<NodeLink> {
        let link = NodeLink::new(
            self.shard,
            node,
            self.topo.clone(),
            self.health.clone(),
            self.metrics.clone(),
            self.me.clone(),
        );
        monoio::spawn(link.clone().run());
        link
    }

    /// Queues `PUBLISH <prefix><room:R|user:U> json` (`SPUBLISH` in a
    /// cluster) at the channel's primary, or refuses at once.
    pub fn publish(
        &self,
        prefix: &str,
        target: Target<'_>,
        json: &[u8],
        on_reply: Option<ReplyFn>,
    ) -> Result<(), Unavailable> {
        let mut channel = self.scratch.borrow_mut();
        resp::channel_of(&mut channel, prefix, target);
        let sharded = self.topo.mode.sharded();
        self.send_to_owner(&channel, |out| resp::put_publish(out, sharded, &channel, json), on_reply)
    }

    /// Queues the command `put` writes (one RESP command) on the link to
    /// the primary that owns `channel`'s slot (in a cluster; the one
    /// primary otherwise), or refuses at once. `on_reply`, if given, gets
    /// the reply — after any `MOVED`/`ASK` was followed — or `Unavailable`
    /// if the command was lost. Keys the command touches must hash to the
    /// channel's slot (tag them `{<channel>}`).
    pub fn send_to_owner(
        &self,
        channel: &[u8],
        put: impl FnOnce(&mut BytesMut),
        on_reply: Option<ReplyFn>,
    ) -> Result<(), Unavailable> {
        self.owner_link(channel)?.queue(put, 0, on_reply).map_err(|(u, _)| u)
    }

    /// The link to the primary that owns `channel`'s slot, if it has one.
    fn owner_link(&self, channel: &[u8]) -> Result<Rc<NodeLink>, Unavailable> {
        self.sync_view();
        let owner = self.view.borrow().owner(channel).ok_or(Unavailable)?;
        self.links.borrow().get(owner).cloned().ok_or(Unavailable)
    }

    /// Like `send_to_owner`, with the run id of the owner's Redis process
    /// (on the connection that sends it) appended as the command's last
    /// argument (`NodeLink::queue_stamped`); followed through `MOVED`/`ASK`,
    /// it names the server that runs it. `put` writes the array header
    /// counting that argument, and every argument before it.
    pub fn send_stamped_to_owner(
        &self,
        channel: &[u8],
        put: impl FnOnce(&mut BytesMut),
        on_reply: Option<ReplyFn>,
    ) -> Result<(), Unavailable> {
        self.owner_link(channel)?.queue_stamped(put, 0, on_reply).map_err(|(u, _)| u)
    }

    /// A `MOVED`/`ASK` reply: sends `cmd` on to the node it names, if we
    /// have a link there (else it is lost and counted); a stamped command
    /// (`stamp` > 0) gets that link's run id instead of the first one's.
    pub(super) fn redirect(&self, r: &Redirect, cmd: Bytes, hops: u8, stamp: u8, on_reply: Option<ReplyFn>) {
        self.sync_view();
        let link = self.links.borrow().iter().find(|l| &*l.node.name == r.addr()).cloned();
        let lost = |on_reply: Option<ReplyFn>| {
            self.metrics.shard(self.shard).redis_publish_lost_total.add(1);
            if let Some(f) = on_reply {
                f(Err(Unavailable));
            }
        };
        let Some(link) = link.filter(|_| hops <= MAX_HOPS) else {
            debug!(shard = self.shard, to = r.addr(), hops, "redirect to a node not (yet) known as a primary: lost");
            self.topo.request_refresh();
            return lost(on_reply);
        };
        if matches!(r, Redirect::Ask { .. }) {
            // "ASKING" first, on the same connection, for this one command; never redirected itself.
            if let Err((_, f)) = link.queue(|out| resp::put_command(out, &[b"ASKING"]), MAX_HOPS + 1, None) {
                return lost(f.or(on_reply));
            }
        }
        if let Err((_, f)) = link.requeue(&cmd, stamp, hops, on_reply) {
            lost(f);
        }
    }

    /// Adopts the topology's latest view, if it moved: keeps the links of
    /// primaries that stay, retires the others, starts new ones.
    fn sync_view(&self) {
        let version = self.topo.version();
        if version == self.seen.get() {
            return;
        }
        self.seen.set(version);
        let view = self.topo.view();
        let mut old = std::mem::take(&mut *self.links.borrow_mut());
        let mut links = Vec::with_capacity(view.nodes.len());
        for n in &view.nodes {
            match old.iter().position(|l| l.node == *n) {
                Some(i) => links.push(old.swap_remove(i)),
                None => links.push(self.spawn_link(n.clone())),
            }
        }
        *self.links.borrow_mut() = links;
        *self.view.borrow_mut() = view;
        for l in old {
            l.retire();
        }
        self.update_health();
    }

    /// Every link up and answering: `/readyz` and the gauge follow.
    pub(super) fn update_health(&self) {
        let Ok(links) = self.links.try_borrow() else { return };
        let up = !links.is_empty() && links.iter().all(|l| l.healthy());
        if self.healthy.replace(up) != up {
            self.health.set(self.shard, Link::Publisher, up);
        }
    }

    /// Checks for a new view now and then even without publishes, so that a
    /// failover is followed (and `/readyz` heals) on an idle shard too.
    pub async fn follow(self: Rc<Self>) {
        loop {
            monoio::time::sleep(std::time::Duration::from_millis(100)).await;
            self.sync_view();
            self.update_health();
        }
    }
}

impl LinkOwner for Publisher {
    fn redirect(&self, r: &Redirect, cmd: Bytes, hops: u8, stamp: u8, on_reply: Option<ReplyFn>) {
        Publisher::redirect(self, r, cmd, hops, stamp, on_reply)
    }

    fn update_health(&self) {
        Publisher::update_health(self)
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use redis_protocol::resp2::types::BytesFrame;

    use super::*;
    use crate::bus::redis::url::Spec;

    /// A private redis-server on a free port, killed on drop.
    struct Redis(std::process::Child, u16);

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn redis() -> Option<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let r = Redis(child, port);
        let end = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(r)
    }

    #[test]
    fn a_command_sent_to_a_channels_owner_gets_its_reply() {
        let Some(r) = redis() else {
            panic!("redis-server is needed (apt-get install -y redis-server)");
        };
        let metrics = Arc::new(Metrics::new(1));
        let spec = Spec::parse(&format!("redis://127.0.0.1:{}", r.1)).unwrap();
        let topo = Topology::start(spec, metrics.clone()).unwrap();
        let health = Arc::new(Health::new(metrics.clone(), 1));
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap();
        let got = rt.block_on(async move {
            let p = Publisher::start(0, topo, health, metrics);
            let end = Instant::now() + Duration::from_secs(5);
            while !p.healthy.get() {
                assert!(Instant::now() < end, "the publisher link did not come up");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            let replies: Rc<RefCell<Vec<Result<BytesFrame, Unavailable>>>> = Rc::default();
            for _ in 0..2 {
                let sink = replies.clone();
                let on_reply: ReplyFn = Box::new(move |r| sink.borrow_mut().push(r));
                let queued = p.send_to_owner(
                    b"cc:room:lobby",
                    |out| resp::put_command(out, &[b"INCR", b"{cc:room:lobby}:n"]),
                    Some(on_reply),
                );
                assert!(queued.is_ok());
            }
            while replies.borrow().len() < 2 {
                assert!(Instant::now() < end, "no reply");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            replies.take()
        });
        assert_eq!(got, [Ok(BytesFrame::Integer(1)), Ok(BytesFrame::Integer(2))]);
    }

    /// `redis-cli -p port args...`, trimmed stdout.
    fn cli(port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn cluster_node(dir: &std::path::Path) -> Option<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let conf = dir.join(format!("nodes-{port}.conf"));
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-config-file", conf.to_str()?])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let r = Redis(child, port);
        let end = Instant::now() + Duration::from_secs(5);
        while cli(port, &["PING"]) != "PONG" {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(r)
    }

    #[test]
    fn ask_and_moved_replies_are_followed_to_the_node_they_name() {
        let dir = std::env::temp_dir().join(format!("corecast-ask-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let nodes: Vec<Redis> = (0..3).map(|_| cluster_node(&dir).expect("redis-server")).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.1)).collect();
        let made = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(made.success());
        let end = Instant::now() + Duration::from_secs(20);
        while !nodes.iter().all(|n| cli(n.1, &["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            assert!(Instant::now() < end, "cluster_state:ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        let channel = "cc:room:lobby";
        let slot = cli(nodes[0].1, &["CLUSTER", "KEYSLOT", channel]);
        let slot_n: u16 = slot.parse().unwrap();
        assert_eq!(slot_n, crate::bus::redis::cluster::key_slot(channel.as_bytes()));
        // Who owns the slot now, from the node's own answer to a key command.
        let key = format!("{{{channel}}}:k");
        let moved = cli(nodes[0].1, &["GET", &key]);
        let from = if moved.starts_with("MOVED") {
            let port: u16 = moved.rsplit(':').next().unwrap().parse().unwrap();
            nodes.iter().position(|n| n.1 == port).unwrap()
        } else {
            0
        };
        let to = (from + 1) % 3;
        let (from_id, to_id) = (cli(nodes[from].1, &["CLUSTER", "MYID"]), cli(nodes[to].1, &["CLUSTER", "MYID"]));
        assert_eq!(cli(nodes[to].1, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]), "OK");
        assert_eq!(cli(nodes[from].1, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]), "OK");
        assert!(cli(nodes[from].1, &["GET", &key]).starts_with("ASK "), "the source answers ASK for a missing key");

        let metrics = Arc::new(Metrics::new(1));
        let spec = Spec::parse(&format!("redis+cluster://{}", addrs[0])).unwrap();
        let topo = Topology::start(spec, metrics.clone()).unwrap();
        let health = Arc::new(Health::new(metrics.clone(), 1));
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap();
        let (to_port, from_port) = (nodes[to].1, nodes[from].1);
        let (slot2, to_id2) = (slot.clone(), to_id.clone());
        let key2 = key.clone();
        let topo2 = topo.clone();
        let got = rt.block_on(async move {
            let v0 = topo2.version();
            let p = Publisher::start(0, topo, health, metrics.clone());
            let end = Instant::now() + Duration::from_secs(10);
            while !p.healthy.get() {
                assert!(Instant::now() < end, "the publisher links did not come up");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            let replies: Rc<RefCell<Vec<Result<BytesFrame, Unavailable>>>> = Rc::default();
            // Stamped: the link appends the run id of its server as the last
            // argument (counted in the header `put` writes).
            let send = |p: &Publisher, cmd: Vec<Vec<u8>>| {
                let sink = replies.clone();
                let on_reply: ReplyFn = Box::new(move |r| sink.borrow_mut().push(r));
                let args: Vec<&[u8]> = cmd.iter().map(|a| a.as_slice()).collect();
                let put = |out: &mut BytesMut| {
                    resp::put_len(out, b'*', args.len() + 1);
                    for a in &args {
                        resp::put_bulk(out, &[a]);
                    }
                };
                assert!(p.send_stamped_to_owner(channel.as_bytes(), put, Some(on_reply)).is_ok());
            };
            let eval = |script: &str, key: &str| vec![b"EVAL".to_vec(), script.into(), b"1".to_vec(), key.into()];
            // Migrating: the source says ASK; the target, after ASKING, runs
            // it, with the target's run id in place of the source's.
            send(&p, eval("redis.call('SET', KEYS[1], 'v') return ARGV[1]", &key2));
            while replies.borrow().is_empty() {
                assert!(Instant::now() < end, "no reply to the SET");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            // The slot moves for good: the source (still the owner in our map) says MOVED.
            for port in [to_port, from_port] {
                assert_eq!(cli(port, &["CLUSTER", "SETSLOT", &slot2, "NODE", &to_id2]), "OK");
            }
            // (Unless the topology thread's periodic refresh saw the move first.)
            let moved_expected = topo2.version() == v0;
            send(&p, eval("return {redis.call('GET', KEYS[1]), ARGV[1]}", &key2));
            while replies.borrow().len() < 2 {
                assert!(Instant::now() < end, "no reply to the GET");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            (replies.take(), metrics.shard(0).redis_redirects_total.get(), moved_expected)
        });
        let _ = std::fs::remove_dir_all(&dir);
        let (replies, redirects, moved_expected) = got;
        let run_id = |port: u16| {
            let info = cli(port, &["INFO", "server"]);
            info.lines().find_map(|l| l.strip_prefix("run_id:")).expect("run_id").trim().to_string()
        };
        let (to_run, from_run) = (run_id(to_port), run_id(from_port));
        assert_ne!(to_run, from_run);
        let bulk = |s: &str| BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()));
        assert_eq!(replies[0], Ok(bulk(&to_run)), "SET ran at the importing node, stamped with its run id");
        assert_eq!(
            replies[1],
            Ok(BytesFrame::Array(vec![bulk("v"), bulk(&to_run)])),
            "GET followed MOVED to the new owner, stamped with its run id"
        );
        assert_eq!(cli(to_port, &["GET", &key]), "v", "the key is at the new owner");
        let want = if moved_expected { 2 } else { 1 };
        assert!(redirects >= want, "an ASK and a MOVED were followed: {redirects}");
    }
}
