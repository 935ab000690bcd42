//! The census (PROTOCOL.md §12 `GET /api/rooms`, `GET /api/info`): every
//! live node says what it has, gathered within 2 s.
//!
//! A node's answer is its shards' parts (`Shard::census_part`), asked over
//! the inboxes and merged on the shard that was asked; a shard that does
//! not answer within `SHARD_BOUND` is left out (`shards_answered`).
//!
//! Across nodes it goes over the backplane, never a node-to-node network:
//! shard 0 of every node subscribes to the control channel, the pseudo-user
//! `#census` (`<prefix>user:#census`; no client can be a user with `#`), and
//! every shard to its own reply channel, `#census.<node>.<shard>`. The asking
//! shard publishes the question to `#census`; Redis's reply to that PUBLISH
//! says how many nodes got it (one subscriber per node), and the answers
//! come back on the reply channel. The call returns when that many answered
//! or at `BOUND`, whichever is first: a stopped node (SIGSTOP) still counts
//! as a subscriber and is left out at the bound; a node whose link is down
//! is not counted. On a Redis Cluster the control channel is sharded (one
//! primary, one slot) like every corecast channel.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::Services;
use crate::bus::Bus;
use crate::protocol::census::{self, Answer, Info, Msg, NodeAnswer, Part, Query, Request};
use crate::protocol::{Epoch, Target, Unavailable, event};
use crate::rt::Oneshot;
use crate::shard::ShardMsg;

/// How long a census waits for the nodes (§12: "within 2 s").
pub const BOUND: Duration = Duration::from_secs(2);
/// How long a node waits for its own shards, inside `BOUND`.
const SHARD_BOUND: Duration = Duration::from_millis(1500);
/// The control channel's pseudo-user.
const CONTROL: &str = "#census";

/// When this process started, for `uptime_secs`.
fn started() -> Instant {
    static STARTED: OnceLock<Instant> = OnceLock::new();
    *STARTED.get_or_init(Instant::now)
}

/// One per shard: the gathers and censuses in flight.
pub struct Census {
    next: Cell<u64>,
    /// Token → this node's parts so far, and who waits for them.
    gathers: RefCell<FxHashMap<u64, Gather>>,
    /// Question id → the nodes' answers so far (Redis).
    asks: RefCell<FxHashMap<u64, Collect>>,
    /// This shard's reply channel (a pseudo-user).
    reply: Box<str>,
}

struct Gather {
    parts: Vec<Part>,
    want: usize,
    done: Oneshot<()>,
}

struct Collect {
    nodes: Vec<NodeAnswer>,
    /// How many nodes got the question, once Redis said.
    want: Option<u64>,
    done: Oneshot<()>,
}

impl Collect {
    fn check(&self) {
        if self.want.is_some_and(|w| self.nodes.len() as u64 >= w) {
            self.done.fill(());
        }
    }
}

impl Census {
    pub fn new(shard: usize) -> Census {
        started();
        Census {
            next: Cell::new(1),
            gathers: RefCell::default(),
            asks: RefCell::default(),
            reply: format!("{CONTROL}.{}.{shard}", Epoch::node().as_str()).into(),
        }
    }

    /// With Redis: shard 0 listens on the control channel, every shard on
    /// its reply channel.
    pub fn start(svc: &Rc<Services>) {
        if let Bus::Redis(_) = &*svc.bus {
            if svc.shard.id == 0 {
                svc.bus.interest(&svc.shard, Target::User(CONTROL), true);
            }
            svc.bus.interest(&svc.shard, Target::User(&svc.census.reply), true);
        }
    }

    /// Asks every live node; the answers that came within `BOUND` (this
    /// node's included). `Unavailable` if the backplane refused the
    /// question.
    pub async fn ask(svc: &Rc<Services>, query: Query) -> Result<Vec<NodeAnswer>, Unavailable> {
        let Bus::Redis(r) = &*svc.bus else {
            return Ok(vec![Census::node_answer(svc, Arc::new(query)).await]);
        };
        let me = &svc.census;
        let qid = fastrand::u64(..);
        let done = Oneshot::default();
        me.asks.borrow_mut().insert(qid, Collect { nodes: Vec::new(), want: None, done: done.clone() });
        let req = Request { ev: "census".into(), qid, reply: me.reply.clone(), q: query };
        let json = serde_json::to_vec(&req).expect("serialize to memory");
        let count = Oneshot::default();
        if r.publish_counted(Target::User(CONTROL), &json, count.clone()).is_err() {
            me.asks.borrow_mut().remove(&qid);
            return Err(Unavailable);
        }
        let waited = monoio::time::timeout(BOUND, async {
            let Some(n) = count.wait().await else { return Err(Unavailable) };
            if let Some(c) = me.asks.borrow_mut().get_mut(&qid) {
                c.want = Some(n);
                c.check();
            }
            done.wait().await;
            Ok(())
        })
        .await;
        let got = me.asks.borrow_mut().remove(&qid).map(|c| c.nodes).unwrap_or_default();
        match waited {
            // Lost with its link: nobody got it.
            Ok(Err(Unavailable)) => Err(Unavailable),
            // All answered, or the bound: whoever answered.
            _ => Ok(got),
        }
    }

    /// This node's answer: every shard's part, merged.
    async fn node_answer(svc: &Rc<Services>, query: Arc<Query>) -> NodeAnswer {
        let shard = &svc.shard;
        let me = &svc.census;
        let shards = shard.peers().len();
        let token = me.next.replace(me.next.get() + 1);
        let done = Oneshot::default();
        let own = shard.census_part(&query);
        me.gathers.borrow_mut().insert(token, Gather { parts: vec![own], want: shards, done: done.clone() });
        if shards > 1 {
            shard.to_other_shards(|| {
                ShardMsg::Census(Box::new(Msg::Ask { query: query.clone(), reply_to: shard.id, token }))
            });
            let _ = monoio::time::timeout(SHARD_BOUND, done.wait()).await;
        }
        let parts = me.gathers.borrow_mut().remove(&token).map(|g| g.parts).unwrap_or_default();
        match &*query {
            Query::Rooms { limit, .. } => NodeAnswer { rooms: Some(census::merge_parts(&parts, *limit).0), info: None },
            Query::Info => NodeAnswer {
                rooms: None,
                info: Some(Info {
                    id: Epoch::node().as_str().into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    listen: shard.cfg.listen.to_string().into(),
                    uptime_secs: started().elapsed().as_secs(),
                    shards,
                    connections: parts.iter().map(|p| p.conns).sum(),
                    users: census::distinct(&parts, |p| &p.users),
                    rooms: census::distinct(&parts, |p| &p.rooms),
                    shards_answered: parts.len(),
                    draining: shard.is_draining(),
                }),
            },
        }
    }

    /// `ShardMsg::Census`: another shard's question, or a part for us.
    pub fn on_msg(svc: &Rc<Services>, msg: Msg) {
        match msg {
            Msg::Ask { query, reply_to, token } => {
                let part = Box::new(svc.shard.census_part(&query));
                let _ = svc.shard.send_to(reply_to, ShardMsg::Census(Box::new(Msg::Part { token, part })));
            }
            Msg::Part { token, part } => {
                if let Some(g) = svc.census.gathers.borrow_mut().get_mut(&token) {
                    g.parts.push(*part);
                    if g.parts.len() >= g.want {
                        g.done.fill(());
                    }
                }
            }
        }
    }

    /// Is `user` one of the census's pseudo-users (its frames come here,
    /// not to connections)?
    pub fn is_control(user: &str) -> bool {
        user.starts_with('#')
    }

    /// A frame on a control channel (Redis): a question to answer (shard
    /// 0), or a node's answer to one of ours.
    pub fn on_frame(svc: &Rc<Services>, user: &str, frame: &[u8]) {
        let json = event::json_in(frame);
        if user == CONTROL {
            let Ok(req) = serde_json::from_slice::<Request>(json) else { return };
            if !valid(&req.q) || !req.reply.starts_with(CONTROL) {
                return;
            }
            let svc = svc.clone();
            monoio::spawn(async move {
                let node = Census::node_answer(&svc, Arc::new(req.q)).await;
                let answer = Answer { ev: "census_reply".into(), qid: req.qid, node };
                let json = serde_json::to_vec(&answer).expect("serialize to memory");
                if let Bus::Redis(r) = &*svc.bus {
                    // Unanswered if refused: the asker's bound covers it.
                    let _ = r.publish_counted(Target::User(&req.reply), &json, Oneshot::default());
                }
            });
        } else if user == &*svc.census.reply {
            let Ok(answer) = serde_json::from_slice::<Answer>(json) else { return };
            if let Some(c) = svc.census.asks.borrow_mut().get_mut(&answer.qid) {
                c.nodes.push(answer.node);
                c.check();
            }
        }
    }
}

/// A question from the control channel is answered only within the limits
/// the HTTP call checks.
fn valid(q: &Query) -> bool {
    match q {
        Query::Rooms { prefix, after, limit } => {
            *limit >= 1
                && *limit <= census::MAX_ROOMS + 1
                && prefix.len() <= 128
                && after.as_deref().is_none_or(crate::protocol::is_valid_name)
        }
        Query::Info => true,
    }
}
