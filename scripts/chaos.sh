#!/usr/bin/env bash
# The chaos run (docs/chaos.md): builds and runs tests/chaos.rs, 3 corecast
# nodes on Redis Sentinel and/or Cluster under random faults, 300 clients
# whose every stream is checked. Exits non-zero on any violation.
# Usage: scripts/chaos.sh [--secs N] [--topology sentinel|cluster|both] [--seed S]
#   --secs N      seconds of faults per topology (default 120)
#   --topology T  sentinel, cluster or both (default both)
#   --seed S      the RNG seed of faults and clients (default: the time; printed)
# More knobs (environment): CORECAST_CHAOS_CLIENTS (300), CORECAST_CHAOS_RATE
# (500 msg/s), CORECAST_CHAOS_SHARDS (1 per node), CORECAST_CHAOS_DIR (keep
# logs and report there), CORECAST_TEST_DRIVER (uring|legacy).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=120
TOPOLOGY=both
SEED=$(date +%s)
while [ $# -gt 0 ]; do
  case "$1" in
    --secs) SECS="$2"; shift 2 ;;
    --topology) TOPOLOGY="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case "$TOPOLOGY" in sentinel|cluster|both) ;; *) echo "--topology: sentinel, cluster or both" >&2; exit 2 ;; esac
command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install -y redis-server)" >&2; exit 2; }
# 300 clients through proxies: ~1000 descriptors in the test process.
ulimit -n 20000 2>/dev/null || true
echo "== chaos: $SECS s per topology ($TOPOLOGY), seed $SEED"
cargo build -q --tests --test chaos
export CORECAST_CHAOS_SECS="$SECS" CORECAST_CHAOS_TOPOLOGY="$TOPOLOGY" CORECAST_CHAOS_SEED="$SEED"
# One topology at a time: each takes the whole machine.
exec cargo test -q --test chaos -- --test-threads=1 --nocapture
