//! corecast behind Redis Sentinel (`--redis redis+sentinel://.../mymaster`,
//! PROTOCOL.md §8): the primary the sentinels name is used; when it dies
//! the sentinels promote the replica and the nodes follow within seconds;
//! the old primary, back as a replica, never gets a publish.

mod common;

use std::time::{Duration, Instant};

use common::redis::{deadline, wait_until};
use common::redis_topology::{Collector, Monitor, Prober, SentinelSetup, assert_in_order, subscribe_all};
use common::{Client, Server, start_server};

const SECOND: Duration = Duration::from_secs(1);

fn sentinel_node(url: &str) -> Server {
    start_server(&["--shards", "2", "--redis", url, "--max-ops-per-sec", "0"])
}

#[test]
fn a_sentinel_failover_is_followed_and_the_old_primary_never_gets_a_publish() {
    let _d = deadline("a_sentinel_failover_is_followed_and_the_old_primary_never_gets_a_publish", 120 * SECOND);
    let mut s = SentinelSetup::start();
    let (old, new) = (s.primary.port, s.replica.port);
    let (n0, n1) = (sentinel_node(&s.url()), sentinel_node(&s.url()));
    // Both links of every shard are at the primary, none at the replica.
    let at_primary = s.primary.cli(&["CLIENT", "LIST"]);
    assert!(at_primary.contains("name=corecast-pub-00") && at_primary.contains("name=corecast-sub-01"), "{at_primary}");
    assert!(!s.replica.cli(&["CLIENT", "LIST"]).contains("name=corecast"), "nothing connects to the replica");

    let rooms: Vec<String> = (0..5).map(|i| format!("s-{i}")).collect();
    let mut sub = Client::connect(&n1.ws_url("/ws?user=sub"));
    subscribe_all(&mut sub, &rooms);
    let mut got = Collector::start(sub);
    let mut p = Prober::new(Client::connect(&n0.ws_url("/ws?user=pub")));
    let round = |p: &mut Prober| {
        p.round(&rooms);
        std::thread::sleep(Duration::from_millis(50));
    };
    let t = Instant::now();
    while t.elapsed() < SECOND {
        round(&mut p);
    }
    got.poll();
    assert_eq!(got.seqs("s-0"), p.acked_seqs("s-0"), "delivery before the failover");

    s.primary.kill();
    let killed = Instant::now();
    let mut saw_not_ready = false;
    let mut promoted: Option<Instant> = None;
    let mut healed: Option<Instant> = None;
    while healed.is_none() {
        assert!(
            killed.elapsed() < 40 * SECOND,
            "not followed within 40 s: promoted {:?} after the kill\n--- n0 ---\n{}",
            promoted.map(|t| t - killed),
            n0.logs()
        );
        round(&mut p);
        got.poll();
        if !saw_not_ready {
            // The only primary lost: no link up (503), or degraded meanwhile.
            let (status, body) = n0.http_get("/readyz");
            saw_not_ready = (status == 503 && body.contains("redis")) || body.contains("degraded");
        }
        if promoted.is_none() && s.agreed_primary() == Some(new) {
            promoted = Some(Instant::now());
        }
        if let Some(t) = promoted
            && rooms.iter().all(|r| {
                p.acked.get(r).is_some_and(|a| a.iter().any(|&(seq, at)| at >= t && got.arrival(r, seq).is_some()))
            })
        {
            healed = Some(Instant::now());
        }
    }
    let after = healed.unwrap() - promoted.unwrap();
    eprintln!("sentinels agreed {:?} after the kill; delivery back {after:?} after that", promoted.unwrap() - killed);
    assert!(after < 5 * SECOND, "delivery resumed {after:?} after the promotion");
    assert!(saw_not_ready, "/readyz named the lost primary during the failover");
    wait_until("/readyz is 200 again", 10 * SECOND, || n0.links_up() && n1.links_up());

    // The old primary comes back; the sentinels make it a replica of the new one.
    s.primary.restart();
    let monitor = Monitor::start(old);
    let restarted = Instant::now();
    let converted = || {
        s.primary.try_cli(&["INFO", "replication"]).is_some_and(|i| {
            i.contains("role:slave") && i.contains(&format!("master_port:{new}")) && i.contains("master_link_status:up")
        })
    };
    while !converted() {
        assert!(
            restarted.elapsed() < 45 * SECOND,
            "the sentinels did not make the old primary a replica of the new one within 45 s\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("the old primary was a replica again {:?} after its restart", restarted.elapsed());
    let back = Instant::now();
    while back.elapsed() < 2 * SECOND {
        round(&mut p);
    }
    std::thread::sleep(SECOND / 2);
    got.poll();
    for r in &rooms {
        let seqs = got.seqs(r);
        assert_in_order(r, &seqs);
        let late: Vec<u64> = p.acked[r].iter().filter(|&&(_, at)| at >= back).map(|&(seq, _)| seq).collect();
        assert!(late.len() >= 10);
        assert!(late.iter().all(|seq| seqs.contains(seq)), "room {r}: messages lost after the old primary came back");
    }
    // Not one PUBLISH into our channels from a client: only what the new
    // primary replicates to it, if anything. (The sentinels PUBLISH their
    // `__sentinel__:hello` to every server.)
    let from_master = format!("127.0.0.1:{new}]");
    let publishes: Vec<String> = monitor
        .lines()
        .into_iter()
        .filter(|l| l.to_ascii_uppercase().contains("\"PUBLISH\" \"CC:") && !l.contains(&from_master))
        .collect();
    assert!(publishes.is_empty(), "PUBLISH sent to the old primary: {publishes:?}");
    // And the MONITOR does see a client's PUBLISH (the check above can fail).
    s.primary.publish("cc:probe", "x");
    wait_until("MONITOR shows a client's PUBLISH", 5 * SECOND, || {
        monitor.lines().iter().any(|l| l.contains("\"PUBLISH\" \"cc:probe\""))
    });
    let clients = s.primary.cli(&["CLIENT", "LIST"]);
    assert!(!clients.contains("name=corecast-pub"), "a publisher connected to the old primary: {clients}");
    assert!(s.replica.cli(&["CLIENT", "LIST"]).contains("name=corecast-pub-01"));
}
