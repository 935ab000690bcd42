//! The thread layout with Redis: `--shards N` runs N `shard-NN` threads and
//! N `redis-NN` reader threads, one beside each shard.

mod common;

use std::time::Duration;

use common::redis::{RedisServer, deadline, node};

#[test]
fn each_shard_has_its_own_redis_reader_thread() {
    let _d = deadline("each_shard_has_its_own_redis_reader_thread", Duration::from_secs(20));
    let redis = RedisServer::start();
    let n = node(&redis.url(), 3);
    let pid = n.child.id();
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/<pid>/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| s.starts_with("shard-") || s.starts_with("redis-"))
        .collect();
    names.sort();
    assert_eq!(names, ["redis-00", "redis-01", "redis-02", "shard-00", "shard-01", "shard-02"]);
    // And each shard has its two connections at Redis.
    let clients = redis.cli(&["CLIENT", "LIST"]);
    for i in 0..3 {
        assert!(clients.contains(&format!("name=corecast-sub-{i:02}")), "{clients}");
        assert!(clients.contains(&format!("name=corecast-pub-{i:02}")), "{clients}");
    }
}
