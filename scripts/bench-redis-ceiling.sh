#!/usr/bin/env bash
# The most messages per second one Redis carries into a 3-node cluster
# before the end-to-end p99 passes 10 ms (issue 21), with one Redis
# subscription per room per node (the default) and with one per shard
# (`--per-shard-subscriptions true`, the old way).
#
# 3 nodes x --shards 4 on one private redis-server; one room whose members
# sit on every shard of every node (--subs, 16 per node by default: a shard
# is left empty with probability ~4%; PUBSUB NUMSUB is printed to show it);
# one publisher per node. The publish rate steps up (--rates) until a step
# fails: p99 over --p99-ms, anything lost, or less than 95% of the rate sent
# (a failed step runs once more and fails only if that fails too: one
# stray pause on a shared box does not end a ladder).
# Each (run, mode) starts Redis and the nodes fresh and climbs its own
# ladder; modes alternate in order run by run; the table gives each run's
# last passing rate and the medians.
#
# Redis must be the bottleneck, not the nodes: on a many-core host give it a
# core of its own (--redis-quota 0). On a 2-core box the nodes and the
# generator would saturate first, so redis-server runs in a cgroup (v1 cpu
# controller, root) with --redis-quota percent of one core: 1 ms (the
# kernel's least quota) per 100/quota ms, 4 ms at 25%. Below the
# quota Redis is never paused; past it, it waits out the period and the
# p99 breaks, so each ceiling sits where Redis's demand meets the quota:
# the ceilings scale with it, their ratio is the point.
#
# Usage: scripts/bench-redis-ceiling.sh [--runs 3] [--secs 5] [--subs 48]
#          [--rates "500 750 ..."] [--p99-ms 10] [--redis-quota 25]
#          [--server-cores 0-1] [--gen-cores 1] [--redis-cores 0] [--no-build]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS=3 SECS=5 SUBS=48 P99_MS=10 QUOTA=25 BUILD=1 SERVER_CORES=0-1 GEN_CORES=1 REDIS_CORES=0
RATES="2000 4000 6000 8000 10000 12000 14000 16000 18000 20000 24000 28000 32000 40000"
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --subs) SUBS="$2"; shift 2 ;;
    --rates) RATES="$2"; shift 2 ;;
    --p99-ms) P99_MS="$2"; shift 2 ;;
    --redis-quota) QUOTA="$2"; shift 2 ;;
    --server-cores) SERVER_CORES="$2"; shift 2 ;;
    --gen-cores) GEN_CORES="$2"; shift 2 ;;
    --redis-cores) REDIS_CORES="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
# shellcheck source=lib/bench-procs.sh
source "$ROOT/scripts/lib/bench-procs.sh"
OUT="$ROOT/bench/out/redis-ceiling"
mkdir -p "$OUT"
CG=""
if [ "$QUOTA" != 0 ]; then
  CG=/sys/fs/cgroup/cpu/corecast-redis-$$
  mkdir "$CG" 2>/dev/null || { echo "cannot create $CG (root and the cgroup v1 cpu controller are needed; or --redis-quota 0)" >&2; exit 1; }
  # The shortest pauses: a 1 ms quota (the kernel's least) per period.
  echo $((100000 / QUOTA)) >"$CG/cpu.cfs_period_us"
  echo 1000 >"$CG/cpu.cfs_quota_us"
fi

# ladder RUN MODE: prints "RUN MODE NUMSUB LAST_PASSING_RATE" and one line per step to $OUT/steps.txt.
ladder() {
  local run=$1 mode=$2 per_shard=false
  [ "$mode" = shard ] && per_shard=true
  local rport; rport=$(free_port)
  taskset -c "$REDIS_CORES" redis-server --port "$rport" --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
  local redis=$!
  PIDS+=("$redis")
  [ -n "$CG" ] && echo "$redis" >"$CG/cgroup.procs"
  wait_redis "$rport" "$WORK/redis.log"
  local urls=() spids=() nodes=()
  for _ in 1 2 3; do
    local port; port=$(free_port)
    taskset -c "$SERVER_CORES" "$BIN/corecast" --listen "127.0.0.1:$port" --shards 4 --max-ops-per-sec 0 \
      --redis "redis://127.0.0.1:$rport" --per-shard-subscriptions "$per_shard" >"$WORK/node-$port.log" 2>&1 &
    nodes+=($!) PIDS+=($!)
    spids+=(--server-pid "$!")
    urls+=("ws://127.0.0.1:$port")
    wait_ready "$port" "${nodes[-1]}" "$WORK/node-$port.log"
  done
  local url; url=$(IFS=,; echo "${urls[*]}")
  local last=0 numsub="?"
  for rate in $RATES; do
    local verdict attempt
    for attempt in 1 2; do
      ( sleep 3; redis-cli -p "$rport" pubsub numsub cc:room:ceil-room-0 | tail -1 >"$WORK/numsub" ) &
      local probe=$!
      local json="$OUT/run$run-$mode-$rate-$attempt.json"
      taskset -c "$GEN_CORES" "$BIN/corecast-bench" fanout --url "$url" -s "$SUBS" --rooms 1 -p 3 --rate "$rate" \
        --window 1000 --room-prefix ceil-room- -d "${SECS}s" --grace 2 "${spids[@]}" --redis-pid "$redis" -q \
        --json "$json" >/dev/null 2>"$WORK/bench.err" || { cat "$WORK/bench.err" >&2; break 2; }
      wait "$probe" 2>/dev/null || true
      numsub=$(cat "$WORK/numsub" 2>/dev/null || echo "?")
      verdict=$(python3 "$ROOT/bench/ladder_table.py" verdict "$json" "$rate" "$P99_MS")
      echo "run $run $mode rate $rate try $attempt numsub $numsub: $verdict" | tee -a "$OUT/steps.txt" >&2
      [ "${verdict%% *}" = pass ] && break
    done
    [ "${verdict%% *}" = pass ] || break
    last=$rate
  done
  echo "$run $mode $numsub $last"
  for p in "${nodes[@]}" "$redis"; do kill "$p" 2>/dev/null || true; done
  for p in "${nodes[@]}" "$redis"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

: >"$OUT/steps.txt"
echo "== 3 nodes x --shards 4, one room of $SUBS, p99 <= $P99_MS ms; Redis quota ${QUOTA}% of a core (0 = none) on core $REDIS_CORES"
RESULTS=()
for r in $(seq "$RUNS"); do
  modes="node shard"
  [ $((r % 2)) = 0 ] && modes="shard node"
  for m in $modes; do
    RESULTS+=("$(ladder "$r" "$m")")
  done
done
printf '%s\n' "${RESULTS[@]}" | python3 "$ROOT/bench/ladder_table.py" redis | tee "$OUT/ceiling.md"
