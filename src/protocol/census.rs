//! The census (PROTOCOL.md §12 `GET /api/rooms`, `GET /api/info`): what a
//! node is asked about its rooms and itself, one shard's part of the
//! answer, the messages that carry them between the shards of a node, and
//! the frames that carry them between nodes on the control channel
//! (`services::census`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Default and largest `limit` of a `GET /api/rooms` page.
pub const DEFAULT_ROOMS: usize = 1000;
pub const MAX_ROOMS: usize = 1000;

/// What a node is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum Query {
    /// Rooms whose name starts with `prefix` and sorts after `after`
    /// (bytewise), the first `limit` of them, with their subscribers.
    Rooms { prefix: Box<str>, after: Option<Box<str>>, limit: usize },
    /// The node's counts.
    Info,
}

/// One shard's part of a node's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Part {
    /// WebSocket client connections.
    pub conns: u64,
    /// Hashes of its users' ids and of its rooms' names (`Query::Info`):
    /// the node counts distinct ones across its shards without copying
    /// the names between threads.
    pub users: Vec<u64>,
    pub rooms: Vec<u64>,
    /// `(room, subscribers)`, ascending, at most the query's `limit`
    /// (`Query::Rooms`).
    pub room_counts: Vec<(Arc<str>, u64)>,
}

/// Between the shards of one node.
#[derive(Debug)]
pub enum Msg {
    /// Answer `query` for this shard; the part goes to shard `reply_to`.
    Ask { query: Arc<Query>, reply_to: usize, token: u64 },
    /// A shard's part of the answer to `token`.
    Part { token: u64, part: Box<Part> },
}

/// The control channel's request: every node answers `q` to the channel
/// `reply` names (a pseudo-user, `services::census`), quoting `qid`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub ev: Box<str>,
    pub qid: u64,
    pub reply: Box<str>,
    pub q: Query,
}

/// One node's answer to a `Request`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub ev: Box<str>,
    pub qid: u64,
    pub node: NodeAnswer,
}

/// What one node says; `rooms` for `Query::Rooms`, `info` for `Query::Info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<(Box<str>, u64)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Info>,
}

/// A node in `GET /api/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The node's id: its process's random epoch base (also the prefix of
    /// its presence writers), new at every start.
    pub id: Box<str>,
    pub version: Box<str>,
    /// The client listener's address (`--listen`, its port resolved).
    #[serde(default)]
    pub listen: Box<str>,
    pub uptime_secs: u64,
    pub shards: usize,
    /// WebSocket client connections, distinct users and rooms with at
    /// least one subscriber, on this node.
    pub connections: u64,
    pub users: u64,
    pub rooms: u64,
    /// Shards that answered within the bound (`shards` when all did).
    pub shards_answered: usize,
    pub draining: bool,
}

/// Merges nodes' `Query::Rooms` answers: subscribers summed per room, the
/// first `limit` rooms in byte order, and whether more follow. Each node
/// sent its own first `limit`, so every room among the first `limit` of the
/// union was listed by every node that has it: the sums are whole.
pub fn merge_rooms(
    answers: impl IntoIterator<Item = Vec<(Box<str>, u64)>>,
    limit: usize,
) -> (Vec<(Box<str>, u64)>, bool) {
    let mut all: std::collections::BTreeMap<Box<str>, u64> = Default::default();
    for rooms in answers {
        for (room, n) in rooms {
            *all.entry(room).or_default() += n;
        }
    }
    let more = all.len() > limit;
    (all.into_iter().take(limit).collect(), more)
}

/// `merge_rooms` for one node's shards' parts (names shared, not copied).
pub fn merge_parts(parts: &[Part], limit: usize) -> (Vec<(Box<str>, u64)>, bool) {
    let mut all: std::collections::BTreeMap<&str, u64> = Default::default();
    for p in parts {
        for (room, n) in &p.room_counts {
            *all.entry(room).or_default() += n;
        }
    }
    let more = all.len() > limit;
    (all.into_iter().take(limit).map(|(r, n)| (Box::from(r), n)).collect(), more)
}

/// Distinct hashes across parts.
pub fn distinct(parts: &[Part], of: impl Fn(&Part) -> &[u64]) -> u64 {
    let mut all: Vec<u64> = parts.iter().flat_map(|p| of(p).iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    all.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_merge_sums_and_cuts_in_byte_order() {
        let a = vec![("a".into(), 2), ("c".into(), 1)];
        let b = vec![("a".into(), 1), ("b".into(), 5)];
        let (rooms, more) = merge_rooms([a, b], 2);
        assert_eq!(rooms, vec![("a".into(), 3), ("b".into(), 5)]);
        assert!(more);
    }

    #[test]
    fn distinct_counts_across_parts() {
        let p = |u: &[u64]| Part { users: u.to_vec(), ..Default::default() };
        assert_eq!(distinct(&[p(&[1, 2]), p(&[2, 3])], |p| &p.users), 3);
    }

    #[test]
    fn a_request_round_trips() {
        let r = Request {
            ev: "census".into(),
            qid: 7,
            reply: "#census.x.0".into(),
            q: Query::Rooms { prefix: "chat:".into(), after: None, limit: 10 },
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""what":"rooms""#), "{s}");
        let back: Request = serde_json::from_str(&s).unwrap();
        assert_eq!(back.q, r.q);
    }
}
