//! `--redis` that cannot work fails start-up at once with one clear line
//! and a non-zero exit, never a panic and never the password: malformed
//! URLs, seeds or sentinels nobody answers on, a plain Redis given as a
//! cluster, a primary name the sentinels do not know.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::redis::{RedisServer, deadline, free_port};
use common::redis_topology::{TempDir, start_sentinel};

/// Runs corecast with `--redis url`; returns its stderr once it exited,
/// after checking that it failed with exactly one line.
fn fails_with_one_line(url: &str) -> String {
    fails_with_one_line_and(url, &[])
}

fn fails_with_one_line_and(url: &str, extra: &[&str]) -> String {
    let mut args = vec!["--shards", "1", "--redis", url];
    args.extend_from_slice(extra);
    let mut child = common::spawn_corecast(&args, |c| {
        c.env("RUST_BACKTRACE", "1").stdout(Stdio::null());
    });
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("corecast --redis {url} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "--redis {url}: exit {status:?}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "--redis {url}: one line, got:\n{err}");
    assert!(lines[0].starts_with("corecast: error: --redis"), "{err}");
    err
}

#[test]
fn malformed_topology_urls_fail_start_up_with_one_line() {
    let _d = deadline("malformed_topology_urls_fail_start_up_with_one_line", 60 * Duration::from_secs(1));
    for (url, says) in [
        ("redis+sentinel://127.0.0.1:26379", "needs the primary's name"),
        ("redis+cluster://127.0.0.1:0", "port must be a number"),
        ("redis+cluster://127.0.0.1:7000/3", "a cluster has only database 0"),
        ("redis+cluster://127.0.0.1:7000,", "no host"),
        ("redis://127.0.0.1:1,127.0.0.1:2", "takes one host"),
        ("rediss+cluster://127.0.0.1:7000", "TLS"),
        ("redis+mesh://127.0.0.1", "expected redis://"),
    ] {
        let err = fails_with_one_line(url);
        assert!(err.contains(says), "--redis {url}: {err}");
    }
}

#[test]
fn unreachable_seeds_and_sentinels_fail_start_up_with_one_line() {
    let _d = deadline("unreachable_seeds_and_sentinels_fail_start_up_with_one_line", 60 * Duration::from_secs(1));
    let (a, b) = (free_port(), free_port());
    let err = fails_with_one_line(&format!("redis+cluster://:hunter2@127.0.0.1:{a},127.0.0.1:{b}"));
    assert!(err.contains("no cluster node answered CLUSTER SLOTS"), "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{a}")) && err.contains(&format!("127.0.0.1:{b}")),
        "names every seed: {err}"
    );
    assert!(!err.contains("hunter2"), "the password is never shown: {err}");

    let err = fails_with_one_line(&format!("redis+sentinel://u:hunter2@127.0.0.1:{a},127.0.0.1:{b}/mymaster"));
    assert!(err.contains("no sentinel named a reachable primary \"mymaster\""), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn a_plain_redis_as_a_cluster_and_an_unknown_primary_name_fail_start_up_with_one_line() {
    let _d = deadline(
        "a_plain_redis_as_a_cluster_and_an_unknown_primary_name_fail_start_up_with_one_line",
        60 * Duration::from_secs(1),
    );
    let plain = RedisServer::start();
    let err = fails_with_one_line(&format!("redis+cluster://127.0.0.1:{}", plain.port));
    assert!(err.contains("cluster support disabled"), "{err}");

    let dir = TempDir::new("sentinel-errors");
    let sentinel = start_sentinel(&dir, 0, plain.port);
    let err = fails_with_one_line(&format!("redis+sentinel://127.0.0.1:{}/nosuchmaster", sentinel.port));
    assert!(err.contains("knows no primary named \"nosuchmaster\""), "{err}");
    // A sentinel that names a server which is a replica: refused by ROLE.
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &plain.port.to_string()]);
    let dir2 = TempDir::new("sentinel-errors");
    let wrong = start_sentinel(&dir2, 1, replica.port);
    let err = fails_with_one_line(&format!("redis+sentinel://127.0.0.1:{}/mymaster", wrong.port));
    assert!(err.contains("not a primary (role slave)"), "{err}");
}
