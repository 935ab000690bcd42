//! This shard's part of a census answer (`protocol::census`,
//! `services::census`): read from its tables, nothing kept.

use std::hash::BuildHasher;
use std::sync::Arc;

use rustc_hash::FxBuildHasher;

use super::Shard;
use crate::protocol::census::{Part, Query};

impl Shard {
    pub fn census_part(&self, query: &Query) -> Part {
        let users = self.users.borrow();
        let rooms = self.rooms.borrow();
        let conns = users.names().map(|u| users.conns(u).len() as u64).sum();
        match query {
            Query::Info => Part {
                conns,
                users: users.names().map(|u| FxBuildHasher.hash_one(&**u)).collect(),
                rooms: rooms.names().map(|r| FxBuildHasher.hash_one(&**r)).collect(),
                room_counts: Vec::new(),
            },
            Query::Rooms { prefix, after, limit } => {
                let mut picked: Vec<(&str, u64)> = rooms
                    .names()
                    .filter(|r| r.starts_with(&**prefix) && after.as_deref().is_none_or(|a| &***r > a))
                    .map(|r| (&**r, rooms.members(r).map_or(0, |m| m.len() as u64)))
                    .filter(|(_, n)| *n > 0)
                    .collect();
                // The first `limit` in byte order, without sorting them all.
                if picked.len() > *limit {
                    picked.select_nth_unstable_by(*limit, |a, b| a.0.cmp(b.0));
                    picked.truncate(*limit);
                }
                picked.sort_unstable_by(|a, b| a.0.cmp(b.0));
                let picked = picked.into_iter().map(|(r, n)| (Arc::from(r), n)).collect();
                Part { conns, room_counts: picked, ..Default::default() }
            }
        }
    }
}
