//! The chaos run (corecast issue 18, docs/chaos.md): 3 nodes on Redis
//! Sentinel or Cluster, hundreds of clients in history rooms through
//! cuttable proxies, a publisher at 500 msg/s, and random faults every few
//! seconds (node SIGKILL and drain, pub/sub links killed, failovers, cut
//! client connections, the Redis primary restarted from a snapshot). A
//! checker reads every client's stream: each offset of each epoch at most
//! once and in order, every hole announced, every client caught up at the
//! end. The test fails on any violation.
//!
//! Off unless `CORECAST_CHAOS_SECS` is set (it takes minutes and the whole
//! machine); `scripts/chaos.sh` runs it. Knobs: `CORECAST_CHAOS_TOPOLOGY`
//! (sentinel|cluster|both), `CORECAST_CHAOS_SEED`, `CORECAST_CHAOS_CLIENTS`,
//! `CORECAST_CHAOS_RATE`, `CORECAST_CHAOS_SHARDS`, `CORECAST_CHAOS_DIR`.

#[path = "common/chaos/mod.rs"]
mod chaos;
mod common;

use std::time::Duration;

use chaos::Config;

fn chaos_on(topology: &'static str) {
    let Some(cfg) = Config::from_env() else {
        println!("SKIPPED: set CORECAST_CHAOS_SECS");
        return;
    };
    if !Config::wants(topology) {
        println!("SKIPPED: CORECAST_CHAOS_TOPOLOGY does not include {topology}");
        return;
    }
    // A hung run must not hang CI: the faults, healing (90 s), settling and
    // the Redis rigs' own waits fit well inside this.
    let _d = common::redis::deadline("chaos", Duration::from_secs(cfg.secs + cfg.settle_secs + 600));
    let report = chaos::run(topology, &cfg);
    println!("{}", report.text);
    assert!(report.problems.is_empty(), "the system did not heal after the faults: {:?}", report.problems);
    assert_eq!(report.violations, 0, "chaos {topology} (seed {}): violations; see the report above", cfg.seed);
}

#[test]
fn chaos_sentinel() {
    chaos_on("sentinel");
}

#[test]
fn chaos_cluster() {
    chaos_on("cluster");
}

// ---- the harness's own checks (always run, no server) ------------------------------

mod harness {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use serde_json::{Value, json};

    use crate::chaos::checker::{Ctx, Kind, Stream};

    fn msg(e: &str, o: u64, s: u64) -> Value {
        json!({"ev": "message", "room": "r", "from": "server", "epoch": e, "offset": o, "data": {"s": s}})
    }

    fn sub(e: &str, o: u64, recovered: Option<bool>) -> Value {
        let mut v = json!({"ev": "subscribed", "room": "r", "id": "r", "epoch": e, "offset": o});
        if let Some(r) = recovered {
            v["recovered"] = json!(r);
        }
        v
    }

    /// A fresh context and one stream subscribed at (E, 10); its own seq of
    /// offset N in epoch E is N (so that "the same data" is easy to write).
    fn fresh() -> (Ctx, Stream) {
        let ctx = Ctx::new(vec!["r".into()]);
        let mut s = Stream::new(0, 0);
        s.new_connection(1, 0);
        s.on_subscribed(&ctx, &sub("E", 10, None), None);
        (ctx, s)
    }

    fn kinds(ctx: &Ctx) -> Vec<Kind> {
        ctx.judge_switches();
        ctx.violations.lock().unwrap().iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_clean_stream_passes() {
        let (ctx, mut s) = fresh();
        for o in 11..=20 {
            s.on_message(&ctx, &msg("E", o, o));
        }
        // Reconnect, recovered:true, the replay, live again.
        let since = s.last;
        s.new_connection(2, 1);
        s.on_subscribed(&ctx, &sub("E", 23, Some(true)), since);
        for o in 21..=25 {
            s.on_message(&ctx, &msg("E", o, o));
        }
        // Reconnect, recovered:false: the position moves to the announced one.
        let since = s.last;
        s.new_connection(3, 2);
        s.on_subscribed(&ctx, &sub("E", 40, Some(false)), since);
        s.on_message(&ctx, &msg("E", 41, 41));
        // A gap announced, then delivery after it.
        s.on_gap(&ctx, &json!({"ev": "gap", "room": "r", "epoch": "E", "offset": 50}));
        s.on_message(&ctx, &msg("E", 51, 51));
        assert_eq!(kinds(&ctx), vec![]);
        assert_eq!(s.last, Some((ctx.epoch_id(0, "E"), 51)));
    }

    #[test]
    fn a_duplicate_a_skip_and_a_step_back_are_caught() {
        let (ctx, mut s) = fresh();
        s.on_message(&ctx, &msg("E", 11, 11));
        s.on_message(&ctx, &msg("E", 11, 11));
        s.on_message(&ctx, &msg("E", 13, 13));
        s.on_message(&ctx, &msg("E", 12, 12));
        assert_eq!(kinds(&ctx), vec![Kind::Duplicate, Kind::SilentLoss, Kind::OutOfOrder]);
    }

    #[test]
    fn a_skip_inside_a_promised_replay_is_a_lie() {
        let (ctx, mut s) = fresh();
        s.on_message(&ctx, &msg("E", 11, 11));
        let since = s.last;
        s.new_connection(2, 1);
        s.on_subscribed(&ctx, &sub("E", 20, Some(true)), since);
        s.on_message(&ctx, &msg("E", 12, 12));
        s.on_message(&ctx, &msg("E", 15, 15));
        assert_eq!(kinds(&ctx), vec![Kind::Lie]);
    }

    #[test]
    fn recovered_true_in_another_epoch_is_a_lie() {
        let (ctx, mut s) = fresh();
        let since = s.last;
        s.new_connection(2, 1);
        s.on_subscribed(&ctx, &sub("F", 3, Some(true)), since);
        assert_eq!(kinds(&ctx), vec![Kind::Lie]);
    }

    #[test]
    fn one_position_with_two_payloads_is_a_lie_and_one_payload_at_two_positions_a_duplicate() {
        let (ctx, mut a) = fresh();
        let mut b = Stream::new(1, 0);
        b.new_connection(1, 0);
        b.on_subscribed(&ctx, &sub("E", 10, None), None);
        a.on_message(&ctx, &msg("E", 11, 11));
        b.on_message(&ctx, &msg("E", 11, 99));
        a.on_message(&ctx, &msg("E", 12, 11));
        assert_eq!(kinds(&ctx), vec![Kind::Lie, Kind::Duplicate]);
    }

    #[test]
    fn an_unannounced_epoch_change_is_a_loss_unless_the_old_epoch_was_complete() {
        let (ctx, mut a) = fresh();
        let mut b = Stream::new(1, 0);
        b.new_connection(1, 0);
        b.on_subscribed(&ctx, &sub("E", 10, None), None);
        for o in 11..=15 {
            a.on_message(&ctx, &msg("E", o, o));
        }
        b.on_message(&ctx, &msg("E", 11, 11));
        // a had all of E (up to 15): fine. b stopped at 11 of 15: a loss.
        a.on_message(&ctx, &msg("F", 1, 101));
        b.on_message(&ctx, &msg("F", 1, 101));
        assert_eq!(kinds(&ctx), vec![Kind::SilentLoss]);
        assert_eq!(ctx.violations.lock().unwrap()[0].client, 1);
    }

    #[test]
    fn a_message_before_its_subscribed_is_reported() {
        let (ctx, mut s) = fresh();
        s.new_connection(2, 1);
        s.on_message(&ctx, &msg("E", 11, 11));
        assert_eq!(kinds(&ctx), vec![Kind::Protocol]);
    }

    #[test]
    fn the_proxy_relays_and_cuts() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                std::thread::spawn(move || {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let p = crate::chaos::proxy::Proxy::start(port);
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        // The pump threads register the pair before relaying: it is there.
        assert_eq!(p.cut(), 1);
        let mut rest = Vec::new();
        let r = c.read_to_end(&mut rest);
        assert!(r.is_err() || rest.is_empty(), "the connection ended: {r:?}");
        assert_eq!(p.cut(), 0);
    }
}
