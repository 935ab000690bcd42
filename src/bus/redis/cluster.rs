//! ⑦ Redis Cluster's arithmetic, no I/O: which hash slot a channel is in,
//! who serves which slots (the `CLUSTER SLOTS` reply), and what a `MOVED` /
//! `ASK` redirection says.
//!
//! In: channel names, RESP frames and error texts read by the topology
//! thread, the readers and the publishers. Out: slot numbers, `SlotRange`s,
//! `Redirect`s. Everything here is pure and unit-tested against the values
//! in the Redis Cluster specification.
//!
//! Sharded Pub/Sub (Redis 7): a shard channel lives in the slot its name
//! hashes to, exactly like a key, so `SSUBSCRIBE`/`SPUBLISH` of a channel go
//! to the primary owning `key_slot(channel)`, and history keys tagged
//! `{<prefix>room:R}` land in the same slot as the room's channel.

use crc::{CRC_16_XMODEM, Crc};
use redis_protocol::resp2::types::BytesFrame;

/// Hash slots in a cluster.
pub const SLOTS: usize = 16384;

/// "The CRC16 algorithm used is ... XMODEM (also known as ZMODEM or
/// CRC-16/ACORN)" — Redis Cluster specification, "Key distribution model".
static CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);

/// "HASH_SLOT = CRC16(key) mod 16384", hashing only the hash tag when the
/// key has one.
pub fn key_slot(key: &[u8]) -> u16 {
    CRC16.checksum(hash_tag(key)) % SLOTS as u16
}

/// The part of `key` that is hashed. From the specification: "if the key
/// contains a `{` character, and if there is a `}` character to the right of
/// `{`, and if there are one or more characters between the first
/// occurrence of `{` and the first occurrence of `}`, then instead of
/// hashing the key, only what is between the first occurrence of `{` and
/// the following first occurrence of `}` is hashed."
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// A `-MOVED` or `-ASK` error: the slot is (permanently / for this one
/// command) served by the node at `addr` (`host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    Moved { slot: u16, addr: String },
    Ask { slot: u16, addr: String },
}

impl Redirect {
    /// `MOVED 3999 127.0.0.1:6381` / `ASK 3999 127.0.0.1:6381`; anything
    /// else is not a redirection.
    pub fn parse(error: &str) -> Option<Redirect> {
        let mut parts = error.split_ascii_whitespace();
        let kind = parts.next()?;
        let slot: u16 = parts.next()?.parse().ok().filter(|&s| (s as usize) < SLOTS)?;
        let addr = parts.next()?;
        if parts.next().is_some() || !addr.contains(':') {
            return None;
        }
        let addr = addr.to_string();
        match kind {
            "MOVED" => Some(Redirect::Moved { slot, addr }),
            "ASK" => Some(Redirect::Ask { slot, addr }),
            _ => None,
        }
    }

    pub fn addr(&self) -> &str {
        match self {
            Redirect::Moved { addr, .. } | Redirect::Ask { addr, .. } => addr,
        }
    }
}

/// One node as `CLUSTER SLOTS` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
}

/// Slots `start..=end`, served by `primary`, replicated to `replicas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub primary: NodeAddr,
    pub replicas: Vec<NodeAddr>,
}

/// Why a `CLUSTER SLOTS` reply could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSlots(pub String);

/// Parses a `CLUSTER SLOTS` reply:
/// `[[start, end, [host, port, id, ...], [replica host, port, id], ...], ...]`.
/// An empty host ("unknown endpoint") means the node that was asked,
/// `asked_host`.
pub fn parse_slots(reply: &BytesFrame, asked_host: &str) -> Result<Vec<SlotRange>, BadSlots> {
    let bad = |why: &str| BadSlots(why.to_string());
    let BytesFrame::Array(ranges) = reply else {
        return Err(match reply {
            BytesFrame::Error(e) => BadSlots(e.to_string()),
            _ => bad("CLUSTER SLOTS did not answer with an array"),
        });
    };
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let BytesFrame::Array(parts) = r else { return Err(bad("a slot range is not an array")) };
        let [BytesFrame::Integer(start), BytesFrame::Integer(end), primary, replicas @ ..] = parts.as_slice() else {
            return Err(bad("a slot range lacks start, end or primary"));
        };
        let slot = |n: i64| u16::try_from(n).ok().filter(|&s| (s as usize) < SLOTS);
        let (Some(start), Some(end)) = (slot(*start), slot(*end)) else {
            return Err(bad("a slot number out of range"));
        };
        if start > end {
            return Err(bad("a slot range ends before it starts"));
        }
        let primary = node(primary, asked_host).ok_or_else(|| bad("a primary without host and port"))?;
        let replicas = replicas.iter().filter_map(|r| node(r, asked_host)).collect();
        out.push(SlotRange { start, end, primary, replicas });
    }
    Ok(out)
}

fn node(frame: &BytesFrame, asked_host: &str) -> Option<NodeAddr> {
    let BytesFrame::Array(parts) = frame else { return None };
    let host = match parts.first()? {
        BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => std::str::from_utf8(b).ok()?,
        BytesFrame::Null => "",
        _ => return None,
    };
    let host = if host.is_empty() || host == "?" { asked_host } else { host };
    let port = match parts.get(1)? {
        BytesFrame::Integer(p) => u16::try_from(*p).ok().filter(|&p| p != 0)?,
        _ => return None,
    };
    Some(NodeAddr { host: host.to_string(), port })
}

/// `host:port` as a node's name (`[v6]:port` for IPv6).
pub fn node_name(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// A bulk or simple string's text, for the small replies the topology code reads.
pub fn text(frame: &BytesFrame) -> Option<&str> {
    match frame {
        BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

/// Channels grouped by slot, in first-seen order: one `SSUBSCRIBE` may only
/// name channels of one slot (else Redis answers `CROSSSLOT`).
pub fn group_by_slot(channels: Vec<Box<[u8]>>) -> Vec<(u16, Vec<Box<[u8]>>)> {
    let mut groups: Vec<(u16, Vec<Box<[u8]>>)> = Vec::new();
    let mut index = rustc_hash::FxHashMap::default();
    for c in channels {
        let slot = key_slot(&c);
        let i = *index.entry(slot).or_insert_with(|| {
            groups.push((slot, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(c);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_xmodem_and_slots_match_the_redis_docs() {
        // The check value of CRC-16/XMODEM, and the one the spec quotes.
        assert_eq!(CRC16.checksum(b"123456789"), 0x31C3);
        // `CLUSTER KEYSLOT` examples from the Redis documentation.
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo{hash_tag}"), 2515);
        assert_eq!(key_slot(b"{hash_tag}bar"), 2515);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn hash_tags_follow_the_first_brace_pair() {
        assert_eq!(hash_tag(b"{user1000}.following"), b"user1000");
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}", "empty first tag: the whole key");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no}tag{here"), b"no}tag{here");
        // A room's history key shares its channel's slot.
        assert_eq!(key_slot(b"hist:{cc:room:lobby}"), key_slot(b"cc:room:lobby"));
    }

    #[test]
    fn moved_and_ask_are_parsed_and_other_errors_are_not() {
        assert_eq!(
            Redirect::parse("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved { slot: 3999, addr: "127.0.0.1:6381".into() })
        );
        assert_eq!(Redirect::parse("ASK 1 [::1]:7000"), Some(Redirect::Ask { slot: 1, addr: "[::1]:7000".into() }));
        assert_eq!(Redirect::parse("MOVED 16384 h:1"), None);
        assert_eq!(Redirect::parse("MOVED x h:1"), None);
        assert_eq!(Redirect::parse("MOVED 1"), None);
        assert_eq!(Redirect::parse("READONLY You can't write against a read only replica."), None);
        assert_eq!(Redirect::parse("CROSSSLOT Keys in request don't hash to the same slot"), None);
    }

    fn bulk(s: &str) -> BytesFrame {
        BytesFrame::BulkString(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }
    fn int(n: i64) -> BytesFrame {
        BytesFrame::Integer(n)
    }
    fn arr(v: Vec<BytesFrame>) -> BytesFrame {
        BytesFrame::Array(v)
    }

    #[test]
    fn a_cluster_slots_reply_becomes_slot_ranges() {
        let reply = arr(vec![
            arr(vec![
                int(0),
                int(5460),
                arr(vec![bulk("127.0.0.1"), int(30001), bulk("09dbe9720cda62f7865eabc5fd8857c5d2678366")]),
                arr(vec![bulk("127.0.0.1"), int(30004), bulk("821d8ca00d7ccf931ed3ffc7e3db0599d2271abf")]),
            ]),
            arr(vec![int(5461), int(16383), arr(vec![bulk(""), int(30002), bulk("id"), arr(vec![])])]),
        ]);
        let ranges = parse_slots(&reply, "10.1.1.1").unwrap();
        assert_eq!(
            ranges,
            [
                SlotRange {
                    start: 0,
                    end: 5460,
                    primary: NodeAddr { host: "127.0.0.1".into(), port: 30001 },
                    replicas: vec![NodeAddr { host: "127.0.0.1".into(), port: 30004 }],
                },
                SlotRange {
                    start: 5461,
                    end: 16383,
                    primary: NodeAddr { host: "10.1.1.1".into(), port: 30002 },
                    replicas: vec![],
                },
            ]
        );
        assert!(
            parse_slots(&BytesFrame::Error("ERR This instance has cluster support disabled".into()), "h")
                .unwrap_err()
                .0
                .contains("cluster support disabled")
        );
        assert!(parse_slots(&arr(vec![arr(vec![int(5), int(1), arr(vec![bulk("h"), int(1)])])]), "h").is_err());
        assert!(parse_slots(&arr(vec![arr(vec![int(0), int(16384), arr(vec![bulk("h"), int(1)])])]), "h").is_err());
        assert_eq!(parse_slots(&arr(vec![]), "h").unwrap(), []);
    }

    #[test]
    fn channels_are_grouped_one_slot_per_command() {
        let chans: Vec<Box<[u8]>> = ["{a}1", "b", "{a}2", "c", "b"].iter().map(|s| s.as_bytes().into()).collect();
        let groups = group_by_slot(chans);
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].1.len(), 2, "{{a}}1 and {{a}}2 share a slot");
        assert!(groups.iter().all(|(slot, g)| g.iter().all(|c| key_slot(c) == *slot)));
    }
}
