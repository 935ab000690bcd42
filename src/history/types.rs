//! The history values that cross stages and shards: a stored `Entry`, a
//! `Query` and its `ReadResult` (with the §7 rules in `judge`), and the
//! standalone owner-shard messages (`Msg`, `Reply`) the inbox carries. A
//! leaf: the shard's inbox may name these without depending on the history
//! service above it.

use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::Position;
use crate::protocol::event::MessagePrefix;

/// One stored message: its offset and the complete `message` frame (with
/// `epoch` and `offset`), as it was delivered live.
#[derive(Debug, Clone)]
pub struct Entry {
    pub offset: u64,
    pub frame: Bytes,
}

/// What a history read asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// Messages after this position; `None`: the last `limit`.
    pub after: Option<Position>,
    /// At most this many messages (0: only the position).
    pub limit: usize,
    /// For the `history` op: what is left after `after` even if some of it
    /// was trimmed, and with `after` from another epoch the last `limit`
    /// (§7: "the last K messages, or those after N when since is given and
    /// E is current"). A recovery never takes a partial history.
    pub listing: bool,
    /// A shard's catch-up, whose `after` is a position it delivered itself:
    /// if the store's history is behind it in the same epoch, the store
    /// lost messages (a failover to a replica that had not received them)
    /// and the epoch is renewed there, so that no offset is ever reused for
    /// another message (`scripts/read.lua`). Never set from a client's
    /// `since`, which a client could make up.
    pub fence: bool,
}

impl Query {
    /// A recovery (or, with `after: None` and `limit: 0`, just the position).
    pub fn recover(after: Option<Position>, limit: usize) -> Query {
        Query { after, limit, listing: false, fence: false }
    }

    /// A shard's catch-up after `last`, which it delivered (see `fence`).
    pub fn catch_up(last: Position, limit: usize) -> Query {
        Query { after: Some(last), limit, listing: false, fence: true }
    }
}

/// What a history read found.
#[derive(Debug, Clone)]
pub struct ReadResult {
    /// The room's current epoch and latest offset T.
    pub pos: Position,
    /// With `after`: the history still holds every message after it in this
    /// epoch (so `entries` are exactly `after+1 ..`, up to `limit`).
    pub covered: bool,
    /// In offset order.
    pub entries: Vec<Entry>,
}

impl ReadResult {
    /// Applies the §7 rules to the raw `entries` after `q.after` (or the
    /// last ones) that a store returned with its position.
    pub fn judge(pos: Position, q: Query, mut entries: Vec<Entry>) -> ReadResult {
        let covered = match q.after {
            None => true,
            Some(a) if a.epoch != pos.epoch || a.offset > pos.offset => false,
            Some(a) if a.offset == pos.offset => true,
            Some(a) => entries.first().is_some_and(|e| e.offset == a.offset + 1),
        };
        if (!covered && !q.listing) || q.limit == 0 {
            entries.clear();
        }
        ReadResult { pos, covered, entries }
    }
}

/// The offset in a stored message id `<offset>-0` (Redis stream ids).
pub fn offset_of_id(id: &[u8]) -> Option<u64> {
    let head = id.split(|&b| b == b'-').next()?;
    std::str::from_utf8(head).ok()?.parse().ok()
}

/// What crosses between shards for standalone history.
#[derive(Debug)]
pub enum Msg {
    /// To the owner: assign an offset, store and fan out. `token` (non-zero)
    /// asks for the position back (`POST /api/publish`).
    Publish { room: Arc<str>, msg: MessagePrefix, reply_to: usize, token: u64 },
    /// To the owner: read the room's history.
    Read { room: Arc<str>, q: Query, reply_to: usize, token: u64 },
    /// From the owner: the answer to `token`.
    Reply { token: u64, reply: Reply },
}

#[derive(Debug)]
pub enum Reply {
    Published(Position),
    Read(ReadResult),
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::protocol::Epoch;

    fn pos(e: &str, n: u64) -> Position {
        Position { epoch: Epoch::new(e).unwrap(), offset: n }
    }

    fn entries(r: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
        r.map(|offset| Entry { offset, frame: Bytes::new() }).collect()
    }

    #[test]
    fn a_read_is_covered_only_in_the_same_epoch_with_nothing_trimmed() {
        let q = |e: &str, n| Query::recover(Some(pos(e, n)), 100);
        let r = ReadResult::judge(pos("a", 20), q("a", 12), entries(13..=20));
        assert!(r.covered);
        assert_eq!(r.entries.len(), 8);
        let r = ReadResult::judge(pos("a", 20), q("b", 12), entries(13..=20));
        assert!(!r.covered && r.entries.is_empty(), "another epoch");
        let r = ReadResult::judge(pos("a", 20), q("a", 2), entries(11..=20));
        assert!(!r.covered && r.entries.is_empty(), "trimmed");
        let r = ReadResult::judge(pos("a", 20), q("a", 21), vec![]);
        assert!(!r.covered, "above T");
        let r = ReadResult::judge(pos("a", 20), q("a", 20), vec![]);
        assert!(r.covered, "nothing missed");
        let r = ReadResult::judge(pos("a", 0), Query::recover(None, 5), vec![]);
        assert!(r.covered);
        let list = Query { after: Some(pos("a", 2)), limit: 100, listing: true, fence: false };
        let r = ReadResult::judge(pos("a", 20), list, entries(11..=20));
        assert!(!r.covered && r.entries.len() == 10, "a listing keeps what is left");
    }

    #[test]
    fn stream_ids_give_offsets() {
        assert_eq!(offset_of_id(b"13-0"), Some(13));
        assert_eq!(offset_of_id(b"x-0"), None);
    }
}
