//! ⑤ Liveness: each shard's heartbeat sweep (`--heartbeat-secs`).
//!
//! One task per shard, not a timer per connection. The sweep ticks
//! `TICKS_PER_INTERVAL` times per interval; each tick advances the shard's
//! coarse clock (`ShardIo::tick`, in ticks) and walks the next slice of the
//! connection slab (a round-robin cursor), sized so that every connection is
//! visited `VISITS_PER_INTERVAL` times per interval, at O(1) cost per visit.
//! The read path only stores the current tick into `Conn::limits` when bytes
//! arrive.
//!
//! At its visit a WebSocket connection silent (nothing received, not even a
//! pong) for at least one interval gets a ping through its outbox; one silent
//! for at least two intervals is cut off with 1008 (`Conn::kill`: the close
//! frame is sent but not waited for, since the peer is most likely gone).
//! A client that answers is thus pinged once per interval; a dead one is
//! reaped 2 to 2.5 intervals after its last frame (the next visit after two
//! intervals). Sockets still in the HTTP phase are left to the handshake
//! timeout.

use std::cell::Cell;
use std::rc::Rc;

use bytes::Bytes;
use tracing::debug;

use super::Shard;
use crate::ws::CloseCode;

/// Sweep ticks per heartbeat interval (the clock's resolution).
pub const TICKS_PER_INTERVAL: u32 = 4;
/// Visits of each connection per interval: more reap closer to 2 intervals,
/// at the cost of walking the slab more often (pings are not more frequent).
pub const VISITS_PER_INTERVAL: u32 = 2;

/// An unmasked ping frame with an empty payload (RFC 6455 §5.5.2).
static PING: [u8; 2] = [0x89, 0x00];

/// Where the heartbeat sweep is in the slab (its clock is the shard's
/// `ShardIo::tick`, which the read path stamps on connections).
#[derive(Default)]
pub struct Sweep {
    /// Next slab index the sweep visits.
    cursor: Cell<usize>,
}

/// The sweep task; returns at once when heartbeats are off.
pub async fn run(shard: Rc<Shard>) {
    let interval = shard.cfg.heartbeat;
    if interval.is_zero() {
        return;
    }
    let mut timer = monoio::time::interval(interval / TICKS_PER_INTERVAL);
    timer.tick().await; // the first tick is immediate
    loop {
        timer.tick().await;
        let now = shard.advance_tick();
        sweep_slice(&shard, now);
    }
}

/// Visits the next slice of the slab: pings the quiet, cuts off the silent.
fn sweep_slice(shard: &Shard, now: u32) {
    let conns = shard.conns.borrow();
    // The slab's entries never outnumber its capacity; vacant slots are skipped.
    let slots = conns.capacity();
    let step = slots.div_ceil((TICKS_PER_INTERVAL / VISITS_PER_INTERVAL) as usize).max(1);
    let start = shard.sweep.cursor.get().min(slots);
    let end = (start + step).min(slots);
    shard.sweep.cursor.set(if end >= slots { 0 } else { end });
    for i in start..end {
        let Some(c) = conns.get(i) else { continue };
        let seen = c.limits.last_seen();
        if seen == 0 {
            continue;
        }
        let silent = now.wrapping_sub(seen);
        if silent >= 2 * TICKS_PER_INTERVAL {
            shard.m().heartbeat_timeouts_total.inc();
            debug!(shard = shard.id, conn = c.id, "heartbeat timeout");
            c.kill(shard, CloseCode::POLICY);
        } else if silent >= TICKS_PER_INTERVAL {
            shard.m().heartbeat_pings_total.inc();
            c.push(shard, Bytes::from_static(&PING));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::Config;

    #[test]
    fn limit_options_come_from_flags_and_the_file() {
        let dir = std::env::temp_dir().join(format!("cc-hb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "heartbeat_secs = 7\nmax_connections = 3\nmax_ops_per_sec = 0\n").unwrap();
        let cfg = Config::load(["corecast", "--config", file.to_str().unwrap(), "--max-connections", "9"]).unwrap();
        assert_eq!(cfg.heartbeat, Duration::from_secs(7));
        assert_eq!(cfg.max_connections, 9);
        assert_eq!(cfg.max_ops_per_sec, 0);
        assert_eq!(cfg.max_rooms_per_connection, 100);
        assert_eq!(cfg.max_accepts_per_sec, 10_000);
        let cfg = Config::load(["corecast", "--heartbeat-secs", "0", "--max-connections", "0"]).unwrap();
        assert!(cfg.heartbeat.is_zero());
        assert_eq!(cfg.max_connections, usize::MAX, "0 = unlimited");
    }
}
