//! ⑦ Room history where a room's channel lives (PROTOCOL.md §7, §8): the
//! history scripts of a shard, sent to the primary that owns the room
//! channel's slot, on every topology (one server, Sentinel, Redis Cluster,
//! several servers), over the shard's publisher links.
//!
//! The keys of room R are tagged `{<prefix>room:R}`, the channel's own name,
//! so in a cluster they hash to the channel's slot; publish.lua declares all
//! three (meta, log, channel) in KEYS, so Redis Cluster checks that they are
//! one slot and served here, and the script `SPUBLISH`es (ARGV[5]) on the
//! shard channel the readers `SSUBSCRIBE` to. With several plain servers the
//! channel's server (jump hash) holds the keys; with Sentinel, the primary.
//!
//! # Why through the publisher's links
//!
//! A command is queued with `Publisher::send_to_owner`, on the one link per
//! primary the shard already has for plain publishes: it follows the view
//! (failover, new primaries), `MOVED`/`ASK` (with `ASKING`), checks `ROLE` on
//! connect under Sentinel and drops the link on a `READONLY` reply (a
//! demoted primary), so history never writes to a replica. The per-room
//! order holds because all of a shard's commands for one room go to the one
//! link of the room's owner and are pipelined on its one connection, whose
//! replies come back in order: Redis runs them in the order the shard queued
//! them. The only reordering possible is at a slot move, between a command
//! redirected by `MOVED`/`ASK` and a newer one sent straight to the new owner
//! once the view moved; both still get distinct, increasing offsets there,
//! and every subscriber sees them in offset order.
//!
//! Those links never load scripts, so the first `EVALSHA` at a node may get
//! `NOSCRIPT`: the command is then sent again, once, as `EVAL` with the
//! script's body (which also caches it there), on the same route. Replies
//! come in order, so the fallback keeps the order of the room's commands on
//! that link.
//!
//! In: `publish`/`read` from `HistLink`. Out: commands on the owner's link;
//! replies to the caller's callback.

use std::rc::Rc;

use bytes::{BufMut, Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;

use crate::bus::redis::net::ReplyFn;
use crate::bus::redis::publisher::Publisher;
use crate::bus::redis::resp;
use crate::protocol::Unavailable;

/// A Lua script called by hash (`EVALSHA`; `EVAL` with the body once where
/// a node answers `NOSCRIPT`): the history's two here, the presence
/// service's in `services::presence`.
pub struct Script {
    body: &'static str,
    /// SHA1 (hex) of the body, computed once: what `EVALSHA` names.
    sha: std::sync::OnceLock<String>,
}

impl Script {
    pub const fn new(body: &'static str) -> Script {
        Script { body, sha: std::sync::OnceLock::new() }
    }

    fn sha(&self) -> &str {
        self.sha.get_or_init(|| sha1_smol::Sha1::from(self.body).digest().to_string())
    }
}

/// The history scripts.
pub static PUBLISH: Script = Script::new(include_str!("scripts/publish.lua"));
pub static READ: Script = Script::new(include_str!("scripts/read.lua"));

/// The shard's route to the owners, shared by the commands in flight.
pub struct OwnerRoute {
    publisher: Rc<Publisher>,
}

impl OwnerRoute {
    pub fn new(publisher: Rc<Publisher>) -> Rc<OwnerRoute> {
        Rc::new(OwnerRoute { publisher })
    }

    /// Sends `script` with `args` (numkeys, keys, argv) to the owner of
    /// `channel`; `done` gets the script's reply (an error reply too), or
    /// `Unavailable` if it was refused or lost.
    pub fn run(
        self: &Rc<Self>,
        channel: Bytes,
        script: &'static Script,
        args: &[&[u8]],
        done: ReplyFn,
    ) -> Result<(), Unavailable> {
        let mut tail = BytesMut::with_capacity(args.iter().map(|a| a.len() + 16).sum());
        for a in args {
            put_bulk(&mut tail, a);
        }
        // + EVALSHA, the script, and the run id the link appends.
        let call = Call { route: self.clone(), channel, script, tail: tail.freeze(), n: args.len() + 3 };
        call.send(false, done).map_err(|_| Unavailable)
    }
}

/// One script call, kept until answered for the `NOSCRIPT` fallback.
struct Call {
    route: Rc<OwnerRoute>,
    channel: Bytes,
    script: &'static Script,
    /// The arguments after the script (numkeys, keys, argv but the last),
    /// as RESP bulks; the link appends the last ARGV, the run id.
    tail: Bytes,
    /// Elements of the whole command.
    n: usize,
}

impl Call {
    /// `EVALSHA` (or, `with_body`, `EVAL`); on refusal gives `done` back.
    fn send(self, with_body: bool, done: ReplyFn) -> Result<(), ReplyFn> {
        let (verb, script): (&[u8], &[u8]) = match with_body {
            false => (b"EVALSHA", self.script.sha().as_bytes()),
            true => (b"EVAL", self.script.body.as_bytes()),
        };
        let mut cmd = BytesMut::with_capacity(32 + script.len() + self.tail.len());
        put_header(&mut cmd, self.n);
        put_bulk(&mut cmd, verb);
        put_bulk(&mut cmd, script);
        cmd.put_slice(&self.tail);
        let put = move |out: &mut BytesMut| out.put_slice(&cmd);
        // The reply decides: NOSCRIPT the first time sends the body (same owner).
        let publisher = self.route.publisher.clone();
        let channel = self.channel.clone();
        let slot: Rc<std::cell::Cell<Option<ReplyFn>>> = Rc::new(std::cell::Cell::new(Some(done)));
        let kept = slot.clone();
        let on_reply: ReplyFn = Box::new(move |r| {
            let Some(done) = kept.take() else { return };
            match r {
                Ok(BytesFrame::Error(e)) if !with_body && e.starts_with("NOSCRIPT") => {
                    if let Err(done) = self.send(true, done) {
                        done(Err(Unavailable));
                    }
                }
                // Other refusals are counted and logged by the link (`publink.rs`).
                r => done(r),
            }
        });
        match publisher.send_stamped_to_owner(&channel, put, Some(on_reply)) {
            Ok(()) => Ok(()),
            // Refused at once: the callback was dropped unrun; `done` is still here.
            Err(Unavailable) => Err(slot.take().unwrap_or_else(|| Box::new(|_| {}))),
        }
    }
}

fn put_header(out: &mut BytesMut, n: usize) {
    resp::put_len(out, b'*', n);
}

fn put_bulk(out: &mut BytesMut, a: &[u8]) {
    resp::put_bulk(out, &[a]);
}

#[cfg(test)]
mod tests {
    #[test]
    fn script_hashes_are_the_sha1_redis_names_them_by() {
        // SHA1 of "return 1", as `SCRIPT LOAD "return 1"` answers.
        assert_eq!(sha1_smol::Sha1::from("return 1").digest().to_string(), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
    }
}
