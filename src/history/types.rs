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
    /// lost messages and the epoch is renewed there. Since epochs are bound
    /// to the Redis process (`history::redis`), that is left for a failover
    /// back to a primary that resynced from a replica missing the writes, so that no offset is ever reused for
    /// another message (`scripts/read.lua`). Never set from a client's
    /// `since`, which a client could make up.
    pub fence: bool,
    /// At most this many bytes of frames (at least one message, whatever
    /// its size): a read is a page, never the whole history at once
    /// (`ReadResult::more` says when it was cut).
    pub max_bytes: usize,
}

impl Query {
    /// A recovery (or, with `after: None` and `limit: 0`, just the position).
    pub fn recover(after: Option<Position>, limit: usize, max_bytes: usize) -> Query {
        Query { after, limit, listing: false, fence: false, max_bytes }
    }

    /// A shard's catch-up after `last`, which it delivered (see `fence`).
    pub fn catch_up(last: Position, limit: usize, max_bytes: usize) -> Query {
        Query { after: Some(last), limit, listing: false, fence: true, max_bytes }
    }

    /// A `history` op: a listing (see `listing`).
    pub fn listing(after: Option<Position>, limit: usize, max_bytes: usize) -> Query {
        Query { after, limit, listing: true, fence: false, max_bytes }
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
    /// `entries` were cut at `Query::max_bytes`: more follow the last one.
    pub more: bool,
}

impl ReadResult {
    /// Applies the §7 rules to the raw `entries` after `q.after` (or the
    /// last ones) that a store returned with its position.
    /// A position with the empty epoch (`Epoch::NONE`: the room had no
    /// history when it was read, and a read creates none) is never covered:
    /// whatever was published and lost since cannot be vouched for.
    pub fn judge(pos: Position, q: Query, mut entries: Vec<Entry>) -> ReadResult {
        let covered = match q.after {
            None => true,
            Some(a) if a.epoch.is_none() || a.epoch != pos.epoch || a.offset > pos.offset => false,
            Some(a) if a.offset == pos.offset => true,
            Some(a) => entries.first().is_some_and(|e| e.offset == a.offset + 1),
        };
        if (!covered && !q.listing) || q.limit == 0 {
            entries.clear();
        }
        // Cut here, or already by the store (Redis pages in the script):
        // fewer than asked and the last one short of T.
        let cut = cut_to(&mut entries, q.max_bytes);
        let short = entries.len() < q.limit && entries.last().is_some_and(|e| e.offset < pos.offset);
        ReadResult { pos, covered, entries, more: cut || short }
    }
}

/// Keeps the first entries whose frames fit in `max_bytes` (at least one);
/// whether any were cut.
pub fn cut_to(entries: &mut Vec<Entry>, max_bytes: usize) -> bool {
    let mut total = 0;
    let keep = entries
        .iter()
        .position(|e| {
            total += e.frame.len();
            total > max_bytes
        })
        .map_or(entries.len(), |i| i.max(1));
    let cut = keep < entries.len();
    entries.truncate(keep);
    cut
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
    Publish {
        room: Arc<str>,
        settings: crate::config::HistorySettings,
        msg: MessagePrefix,
        reply_to: usize,
        token: u64,
    },
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
        let q = |e: &str, n| Query::recover(Some(pos(e, n)), 100, usize::MAX);
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
        let r = ReadResult::judge(pos("a", 0), Query::recover(None, 5, usize::MAX), vec![]);
        assert!(r.covered);
        let list = Query::listing(Some(pos("a", 2)), 100, usize::MAX);
        let r = ReadResult::judge(pos("a", 20), list, entries(11..=20));
        assert!(!r.covered && r.entries.len() == 10, "a listing keeps what is left");
    }

    #[test]
    fn the_empty_epoch_is_never_covered_and_pages_are_cut_by_bytes() {
        let none = Position { epoch: Epoch::NONE, offset: 0 };
        let r = ReadResult::judge(none, Query::recover(Some(none), 10, usize::MAX), vec![]);
        assert!(!r.covered, "a room read before it had history vouches for nothing");
        let sized = |r: std::ops::RangeInclusive<u64>| -> Vec<Entry> {
            r.map(|offset| Entry { offset, frame: Bytes::from(vec![b'x'; 10]) }).collect()
        };
        // A cap below one message still keeps one: a page always advances.
        let r = ReadResult::judge(pos("a", 20), Query::recover(Some(pos("a", 10)), 100, 0), sized(11..=20));
        assert!(r.covered && r.more && r.entries.len() == 1);
        let r = ReadResult::judge(pos("a", 20), Query::recover(Some(pos("a", 10)), 100, 35), sized(11..=20));
        assert_eq!((r.entries.len(), r.more), (3, true));
        let r = ReadResult::judge(pos("a", 20), Query::recover(Some(pos("a", 10)), 100, 100), sized(11..=20));
        assert_eq!((r.entries.len(), r.more), (10, false));
        // Already cut by the store (read.lua pages too): fewer than asked,
        // the last short of T.
        let r = ReadResult::judge(pos("a", 20), Query::recover(Some(pos("a", 10)), 100, 1000), sized(11..=13));
        assert!(r.covered && r.more);
        let r = ReadResult::judge(pos("a", 20), Query::recover(Some(pos("a", 10)), 3, 1000), sized(11..=13));
        assert!(!r.more, "as many as asked: not a cut page");
    }

    #[test]
    fn stream_ids_give_offsets() {
        assert_eq!(offset_of_id(b"13-0"), Some(13));
        assert_eq!(offset_of_id(b"x-0"), None);
    }
}
