//! ⑦ What one shard's Redis reader is subscribed to, and what it should be:
//! a plain state machine, no I/O, owned by the `redis-NN` thread.
//!
//! In: `Interest` changes from the shard (first member of a room or user on
//! the shard: `on`; last gone: `off`), and Redis's confirmations
//! (`subscribe`/`unsubscribe` replies, one per channel named in a command).
//! Out: `plan` — the channels to SUBSCRIBE and to UNSUBSCRIBE, each batch in
//! one command; and the rooms whose `subscribed` replies the shard may now
//! send (`Settled`).
//!
//! # Reconciling instead of forwarding
//!
//! Each channel keeps `want` (what the shard asked for last) and `sent` (what
//! Redis will have once it has run every command already written). A plan only
//! writes the difference, so a join/leave/join burst that reaches the reader
//! in one batch costs nothing, and one in several batches costs
//! SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE — which Redis runs in order, ending in
//! the state the shard wants. Redis answers every channel of every command
//! once, so `outstanding` counts the commands not yet answered; a room is
//! *settled* (really subscribed, no UNSUBSCRIBE still on its way) when it is
//! wanted, sent, and nothing is outstanding. Only then is the shard told,
//! with the `seq` of the `on` it is answering, so the shard can ignore a
//! confirmation that belongs to an earlier join of the same room.

use std::sync::Arc;

use rustc_hash::FxHashMap;

/// Redis channels are `<prefix>room:R` and `<prefix>user:U` (PROTOCOL.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Room,
    User,
}

impl Kind {
    fn infix(self) -> &'static str {
        match self {
            Kind::Room => "room:",
            Kind::User => "user:",
        }
    }
}

/// One change of a shard's interest, sent from the shard to its reader.
#[derive(Debug, Clone)]
pub struct Interest {
    pub kind: Kind,
    pub name: Arc<str>,
    pub on: bool,
    /// For a room turning `on`: echoed in the `Subscribed` message so that the
    /// shard can match it to this join. Unused otherwise.
    pub seq: u64,
}

/// A room the shard may now answer `subscribed` for.
#[derive(Debug, PartialEq, Eq)]
pub struct Settled {
    pub room: Arc<str>,
    pub seq: u64,
}

/// What to write next: each list goes out as one command (or a few, when
/// long; see `MAX_CHANNELS_PER_COMMAND`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub subscribe: Vec<Box<[u8]>>,
    pub unsubscribe: Vec<Box<[u8]>>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.unsubscribe.is_empty()
    }
}

struct Chan {
    kind: Kind,
    name: Arc<str>,
    want: bool,
    seq: u64,
    /// Redis's state once every command already written has run.
    sent: bool,
    /// Commands naming this channel written on this connection, not yet answered.
    outstanding: u32,
    /// The shard waits for a `Subscribed` for this room.
    notify: bool,
}

impl Chan {
    fn interest(&self) -> Interest {
        Interest { kind: self.kind, name: self.name.clone(), on: true, seq: self.seq }
    }
    fn settled(&self) -> bool {
        self.want && self.sent && self.outstanding == 0
    }
    fn is_idle(&self) -> bool {
        !self.want && !self.sent && self.outstanding == 0
    }
}

pub struct Subscriptions {
    prefix: Box<str>,
    chans: FxHashMap<Box<[u8]>, Chan>,
    /// Channels whose `want` may differ from `sent` (checked by `plan`).
    changed: Vec<Box<[u8]>>,
    /// Rooms turned `on` since the last `plan` (their `Subscribed` may be due).
    turned_on: Vec<Box<[u8]>>,
}

impl Subscriptions {
    pub fn new(prefix: &str) -> Subscriptions {
        Subscriptions { prefix: prefix.into(), chans: FxHashMap::default(), changed: Vec::new(), turned_on: Vec::new() }
    }

    /// `<prefix>room:R` or `<prefix>user:U`.
    pub fn channel(&self, kind: Kind, name: &str) -> Box<[u8]> {
        channel_name(&self.prefix, kind, name)
    }

    /// Records what the shard wants now. Nothing is written until `plan`.
    pub fn apply(&mut self, i: Interest) {
        let key = self.channel(i.kind, &i.name);
        let chan = self.chans.entry(key.clone()).or_insert_with(|| Chan {
            kind: i.kind,
            name: i.name.clone(),
            want: false,
            seq: 0,
            sent: false,
            outstanding: 0,
            notify: false,
        });
        chan.want = i.on;
        if i.on {
            chan.seq = i.seq;
            if i.kind == Kind::Room {
                chan.notify = true;
                self.turned_on.push(key.clone());
            }
        } else {
            chan.notify = false;
        }
        self.changed.push(key);
    }

    /// The commands that bring Redis to what the shard wants; marks them sent.
    /// Afterwards `settled` lists rooms that needed no command at all.
    pub fn plan(&mut self) -> Plan {
        let mut plan = Plan::default();
        for key in self.changed.drain(..) {
            let Some(chan) = self.chans.get_mut(&key) else {
                continue;
            };
            if chan.want != chan.sent {
                chan.sent = chan.want;
                chan.outstanding += 1;
                if chan.want { plan.subscribe.push(key) } else { plan.unsubscribe.push(key) }
            } else if chan.is_idle() {
                self.chans.remove(&key);
            }
        }
        plan
    }

    /// Rooms turned on since the last call that are already settled (e.g. a
    /// leave and re-join that cancelled out): the shard may answer at once.
    pub fn settled(&mut self) -> Vec<Settled> {
        let mut out = Vec::new();
        for key in self.turned_on.drain(..) {
            if let Some(chan) = self.chans.get_mut(&key)
                && chan.notify
                && chan.settled()
            {
                chan.notify = false;
                out.push(Settled { room: chan.name.clone(), seq: chan.seq });
            }
        }
        out
    }

    /// Redis answered one command for `channel` (a `subscribe` or
    /// `unsubscribe` reply). Returns the room to confirm to the shard, if this
    /// answer settles it.
    pub fn confirm(&mut self, channel: &[u8]) -> Option<Settled> {
        let chan = self.chans.get_mut(channel)?;
        chan.outstanding = chan.outstanding.saturating_sub(1);
        if chan.notify && chan.settled() {
            chan.notify = false;
            return Some(Settled { room: chan.name.clone(), seq: chan.seq });
        }
        if chan.is_idle() {
            self.chans.remove(channel);
        }
        None
    }

    /// The connection is gone: Redis has nothing. Every wanted channel must be
    /// subscribed again on the next connection, and every wanted room
    /// confirmed again (the shard forgot its confirmations on link loss).
    pub fn reset(&mut self) {
        self.chans.retain(|_, c| c.want);
        self.changed.clear();
        self.turned_on.clear();
        for (key, chan) in &mut self.chans {
            chan.sent = false;
            chan.outstanding = 0;
            self.changed.push(key.clone());
            if chan.kind == Kind::Room {
                chan.notify = true;
            }
        }
    }

    /// Who a message on `channel` is for, if the shard still wants it.
    pub fn lookup(&self, channel: &[u8]) -> Option<(Kind, &Arc<str>)> {
        self.chans.get(channel).filter(|c| c.want).map(|c| (c.kind, &c.name))
    }

    /// Channels the shard wants.
    pub fn wanted(&self) -> usize {
        self.chans.values().filter(|c| c.want).count()
    }

    // ---- moving channels between connections (Sentinel, Cluster) -------------

    /// Every wanted channel, as the `Interest` that would want it again; the
    /// set is left empty (the connection is gone for good).
    pub fn drain_wanted(&mut self) -> Vec<Interest> {
        self.changed.clear();
        self.turned_on.clear();
        self.chans.drain().filter(|(_, c)| c.want).map(|(_, c)| c.interest()).collect()
    }

    /// The channels wanted here.
    pub fn wanted_keys(&self) -> Vec<Box<[u8]>> {
        self.chans.iter().filter(|(_, c)| c.want).map(|(k, _)| k.clone()).collect()
    }

    /// Drops `channel` from this connection without a command (its slot
    /// moved elsewhere); returns the `Interest` to apply at its new home.
    pub fn forget(&mut self, channel: &[u8]) -> Option<Interest> {
        self.chans.remove(channel).filter(|c| c.want).map(|c| c.interest())
    }

    /// Makes the next `plan` look at `channel` again (e.g. after a refusal).
    pub fn touch(&mut self, channel: &[u8]) {
        if let Some(c) = self.chans.get(channel)
            && c.want != c.sent
            && c.outstanding == 0
        {
            self.changed.push(channel.into());
        }
    }

    /// Redis refused one command for `channel` (`MOVED`, `CLUSTERDOWN`):
    /// it is not subscribed there. Not retried until `touch`ed.
    pub fn refused(&mut self, channel: &[u8]) {
        if let Some(c) = self.chans.get_mut(channel) {
            c.outstanding = c.outstanding.saturating_sub(1);
            c.sent = false;
            if c.is_idle() {
                self.chans.remove(channel);
            }
        }
    }

    /// Redis unsubscribed `channel` by itself (its slot left the node).
    /// Returns whether the shard still wants it.
    pub fn lost(&mut self, channel: &[u8]) -> bool {
        match self.chans.get_mut(channel) {
            Some(c) => {
                c.sent = false;
                c.want
            }
            None => false,
        }
    }

    /// Rooms whose `subscribed` replies the shard still holds: handed out
    /// (and no longer awaited) when this connection is lost, so that no
    /// reply waits for a primary that is gone.
    pub fn waiting(&mut self) -> Vec<Settled> {
        let mut out = Vec::new();
        for c in self.chans.values_mut() {
            if c.notify && c.want && c.kind == Kind::Room {
                c.notify = false;
                out.push(Settled { room: c.name.clone(), seq: c.seq });
            }
        }
        out
    }

    /// The shard forgot its confirmations (`RedisLink { up: false }`): every
    /// wanted room is confirmed again, at once if settled, else when Redis answers.
    pub fn renotify(&mut self) {
        for (key, c) in &mut self.chans {
            if c.want && c.kind == Kind::Room {
                c.notify = true;
                self.turned_on.push(key.clone());
            }
        }
    }
}

/// `<prefix>room:R` or `<prefix>user:U`.
pub fn channel_name(prefix: &str, kind: Kind, name: &str) -> Box<[u8]> {
    [prefix.as_bytes(), kind.infix().as_bytes(), name.as_bytes()].concat().into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(name: &str, seq: u64) -> Interest {
        Interest { kind: Kind::Room, name: name.into(), on: true, seq }
    }
    fn off(name: &str) -> Interest {
        Interest { kind: Kind::Room, name: name.into(), on: false, seq: 0 }
    }
    fn chans(v: &[&str]) -> Vec<Box<[u8]>> {
        v.iter().map(|s| s.as_bytes().into()).collect()
    }

    #[test]
    fn a_burst_of_joins_is_one_plan_and_each_room_settles_on_its_confirmation() {
        let mut s = Subscriptions::new("cc:");
        for (i, r) in ["a", "b", "c"].iter().enumerate() {
            s.apply(on(r, i as u64));
        }
        s.apply(Interest { kind: Kind::User, name: "u1".into(), on: true, seq: 0 });
        let plan = s.plan();
        assert_eq!(plan.subscribe, chans(&["cc:room:a", "cc:room:b", "cc:room:c", "cc:user:u1"]));
        assert!(plan.unsubscribe.is_empty());
        assert!(s.settled().is_empty(), "nothing is confirmed yet");
        assert_eq!(s.confirm(b"cc:room:b"), Some(Settled { room: "b".into(), seq: 1 }));
        assert_eq!(s.confirm(b"cc:user:u1"), None, "users are not confirmed to the shard");
        assert_eq!(s.lookup(b"cc:room:a"), Some((Kind::Room, &Arc::from("a"))));
        assert_eq!(s.lookup(b"cc:room:zz"), None);
    }

    #[test]
    fn leave_and_rejoin_in_one_batch_cancel_out_and_settle_at_once() {
        let mut s = Subscriptions::new("cc:");
        s.apply(on("a", 1));
        s.plan();
        assert!(s.confirm(b"cc:room:a").is_some());
        s.apply(off("a"));
        s.apply(on("a", 2));
        assert!(s.plan().is_empty());
        assert_eq!(s.settled(), vec![Settled { room: "a".into(), seq: 2 }]);
    }

    #[test]
    fn rejoin_before_unsubscribe_is_confirmed_waits_for_the_last_answer() {
        let mut s = Subscriptions::new("cc:");
        s.apply(on("a", 1));
        s.plan();
        s.apply(off("a"));
        assert_eq!(s.plan().unsubscribe, chans(&["cc:room:a"]));
        s.apply(on("a", 2));
        assert_eq!(s.plan().subscribe, chans(&["cc:room:a"]));
        assert!(s.settled().is_empty());
        // SUBSCRIBE(1), UNSUBSCRIBE, SUBSCRIBE(2): only the third answer settles it.
        assert_eq!(s.confirm(b"cc:room:a"), None);
        assert_eq!(s.confirm(b"cc:room:a"), None);
        assert_eq!(s.confirm(b"cc:room:a"), Some(Settled { room: "a".into(), seq: 2 }));
    }

    #[test]
    fn the_last_leave_unsubscribes_and_forgets_the_channel() {
        let mut s = Subscriptions::new("p/");
        s.apply(on("a", 1));
        s.plan();
        s.confirm(b"p/room:a");
        s.apply(off("a"));
        assert_eq!(s.plan().unsubscribe, chans(&["p/room:a"]));
        assert_eq!(s.lookup(b"p/room:a"), None);
        assert_eq!(s.confirm(b"p/room:a"), None);
        assert_eq!(s.wanted(), 0);
        assert!(s.chans.is_empty());
    }

    #[test]
    fn after_a_reset_every_wanted_channel_is_subscribed_and_confirmed_again() {
        let mut s = Subscriptions::new("cc:");
        s.apply(on("a", 1));
        s.apply(on("b", 2));
        s.plan();
        s.confirm(b"cc:room:a");
        s.apply(off("b"));
        s.reset();
        let mut plan = s.plan();
        plan.subscribe.sort();
        assert_eq!(plan.subscribe, chans(&["cc:room:a"]));
        assert_eq!(s.confirm(b"cc:room:a"), Some(Settled { room: "a".into(), seq: 1 }));
    }

    #[test]
    fn a_channel_moved_away_is_forgotten_and_a_refused_one_waits_for_a_touch() {
        let mut s = Subscriptions::new("cc:");
        s.apply(on("a", 1));
        s.apply(on("b", 2));
        s.plan();
        assert!(s.confirm(b"cc:room:a").is_some());
        // "b" was refused (MOVED): not subscribed, not retried by itself.
        s.refused(b"cc:room:b");
        assert!(s.plan().is_empty());
        s.touch(b"cc:room:b");
        assert_eq!(s.plan().subscribe, chans(&["cc:room:b"]));
        // "a" moves to another connection, with its join's seq.
        let moved = s.forget(b"cc:room:a").unwrap();
        assert_eq!((moved.name.as_ref(), moved.seq, moved.on), ("a", 1, true));
        assert_eq!(s.lookup(b"cc:room:a"), None);
        assert_eq!(s.wanted_keys(), chans(&["cc:room:b"]));
        // Redis dropped "b" by itself: still wanted, subscribed again when touched.
        assert!(s.confirm(b"cc:room:b").is_some());
        assert!(s.lost(b"cc:room:b"));
        s.touch(b"cc:room:b");
        assert_eq!(s.plan().subscribe, chans(&["cc:room:b"]));
        let all = s.drain_wanted();
        assert_eq!(all.len(), 1);
        assert_eq!(s.wanted(), 0);
    }

    #[test]
    fn renotify_confirms_settled_rooms_again() {
        let mut s = Subscriptions::new("cc:");
        s.apply(on("a", 7));
        s.plan();
        assert!(s.confirm(b"cc:room:a").is_some());
        assert!(s.settled().is_empty());
        s.renotify();
        assert_eq!(s.settled(), vec![Settled { room: "a".into(), seq: 7 }]);
    }
}
