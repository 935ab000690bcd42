#!/usr/bin/env bash
# The capacity model's unit costs and its check (docs/capacity.md, issue 21).
#
# 1. Fit: seven calibration runs (each --runs times, interleaved; medians)
#    isolate one cost each: an idle hold (CPU and bytes per connection, Redis
#    bytes per channel and idle CPU), one big room on one shard (CPU per
#    delivery), rooms
#    of one on one shard (per publish and per shard-message), rooms of six on
#    two shards (per shard-message), rooms of one and of three on one and
#    three nodes with Redis (per Redis message and per PUBLISH, at the nodes
#    and at Redis), the same rooms of three on a 3-primary Redis Cluster
#    (what sharded pub/sub and the cluster bus add at Redis). The costs go to $OUT/costs.json (--write-costs: also to
#    bench/costs.json, the calculator's default).
# Every load keeps the servers' cores well busy (0.3-0.8 of a core each
# here), where the model is used: sizing for a CPU budget. A quiet node
# pays more per message (each one wakes a shard alone; see docs/capacity.md).
# 2. Check: eight other configurations (shards 1-4, nodes 1-3, Redis
#    primaries 0-3, room sizes 10-600, both subscription modes) run the same
#    way; for each, `corecast-bench plan` predicts server CPU, Redis CPU and
#    node memory from the costs and the rate achieved, and the table shows
#    prediction, measurement and error.
#
# Cores: nodes and Redis on --server-cores, the generator on --gen-cores.
# Output: $OUT/capacity.md (the tables), $OUT/*.json (every run).
#
# Usage: scripts/bench-capacity.sh [--runs 3] [--secs 8] [--only fit|check]
#          [--costs FILE (for --only check)] [--write-costs] [--no-build]
#          [--server-cores 0-1] [--gen-cores 1]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS=3 SECS=8 ONLY="" COSTS="" WRITE=0 BUILD=1 SERVER_CORES=0-1 GEN_CORES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --costs) COSTS="$2"; shift 2 ;;
    --write-costs) WRITE=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --server-cores) SERVER_CORES="$2"; shift 2 ;;
    --gen-cores) GEN_CORES="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
# shellcheck source=lib/bench-procs.sh
source "$ROOT/scripts/lib/bench-procs.sh"
OUT="$ROOT/bench/out/capacity"
mkdir -p "$OUT"

# Redis: REDIS_URL, REDIS_PIDS, REDIS_PORTS for `primaries` (0 = none, 1 =
# one server, 2-3 = a cluster of that many primaries, slots split evenly).
start_redis() {
  local n=$1
  REDIS_URL="" REDIS_PIDS=() REDIS_PORTS=()
  [ "$n" = 0 ] && return
  local cl=()
  [ "$n" -gt 1 ] && cl=(--cluster-enabled yes)
  for i in $(seq "$n"); do
    local p; p=$(free_port)
    [ "$n" -gt 1 ] && cl=(--cluster-enabled yes --cluster-config-file "$WORK/nodes-$p.conf")
    taskset -c "$SERVER_CORES" redis-server --port "$p" --save '' --appendonly no "${cl[@]}" >"$WORK/redis-$p.log" 2>&1 &
    REDIS_PIDS+=($!) REDIS_PORTS+=("$p")
    PIDS+=($!)
    wait_redis "$p" "$WORK/redis-$p.log"
  done
  if [ "$n" = 1 ]; then
    REDIS_URL="redis://127.0.0.1:${REDIS_PORTS[0]}"
    return
  fi
  local per=$((16384 / n)) lo=0
  for i in $(seq 0 $((n - 1))); do
    local hi=$((i == n - 1 ? 16383 : lo + per - 1))
    redis-cli -p "${REDIS_PORTS[$i]}" cluster addslotsrange "$lo" "$hi" >/dev/null
    [ "$i" -gt 0 ] && redis-cli -p "${REDIS_PORTS[$i]}" cluster meet 127.0.0.1 "${REDIS_PORTS[0]}" >/dev/null
    lo=$((hi + 1))
  done
  for _ in $(seq 400); do
    local ok=1
    for p in "${REDIS_PORTS[@]}"; do
      local info; info=$(redis-cli -p "$p" cluster info)
      grep -q cluster_state:ok <<<"$info" && grep -q "cluster_slots_ok:16384" <<<"$info" \
        && grep -q "cluster_known_nodes:$n" <<<"$info" || ok=0
    done
    [ $ok = 1 ] && break
    sleep 0.1
  done
  REDIS_URL="redis+cluster://127.0.0.1:${REDIS_PORTS[0]},127.0.0.1:${REDIS_PORTS[1]}"
}

redis_used_memory() { # sum of used_memory over the primaries
  local s=0
  for p in "${REDIS_PORTS[@]}"; do
    s=$((s + $(redis-cli -p "$p" info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p')))
  done
  echo "$s"
}

redis_channels() { # channels and shard channels subscribed, over the primaries
  local s=0
  for p in "${REDIS_PORTS[@]}"; do
    s=$((s + $(redis-cli -p "$p" pubsub channels | grep -c . || true) + $(redis-cli -p "$p" pubsub shardchannels | grep -c . || true)))
  done
  echo "$s"
}

# one_run NAME SCENARIO NODES SHARDS PRIMARIES MODE ARGS...: starts Redis and
# the nodes, runs corecast-bench, writes $OUT/NAME.json (+ .extra.json).
one_run() {
  local name=$1 scenario=$2 nodes=$3 shards=$4 primaries=$5 mode=$6
  shift 6
  start_redis "$primaries"
  local urls=() spids=() npids=()
  for _ in $(seq "$nodes"); do
    local port; port=$(free_port)
    local bus=()
    [ -n "$REDIS_URL" ] && bus=(--redis "$REDIS_URL" --per-shard-subscriptions "$([ "$mode" = shard ] && echo true || echo false)")
    taskset -c "$SERVER_CORES" "$BIN/corecast" --listen "127.0.0.1:$port" --shards "$shards" --max-ops-per-sec 0 \
      "${bus[@]}" >"$WORK/node-$port.log" 2>&1 &
    npids+=($!) PIDS+=($!)
    spids+=(--server-pid "$!")
    urls+=("ws://127.0.0.1:$port")
    wait_ready "$port" "${npids[-1]}" "$WORK/node-$port.log"
  done
  local rp=() mem0=0
  for p in "${REDIS_PIDS[@]}"; do rp+=(--redis-pid "$p"); done
  [ "$primaries" -gt 0 ] && mem0=$(redis_used_memory)
  # Redis memory while everything is held (half-way through the hold).
  ( sleep $((SECS / 2 + 3)); [ "$primaries" -gt 0 ] && { redis_used_memory >"$WORK/mem"; redis_channels >"$WORK/channels"; } ) &
  local probe=$!
  local url; url=$(IFS=,; echo "${urls[*]}")
  taskset -c "$GEN_CORES" "$BIN/corecast-bench" "$scenario" --url "$url" -d "${SECS}s" "${spids[@]}" "${rp[@]}" \
    -q --json "$OUT/$name.json" "$@" >/dev/null 2>"$WORK/bench.err" || cat "$WORK/bench.err" >&2
  wait "$probe" 2>/dev/null || true
  printf '{"nodes":%s,"shards":%s,"primaries":%s,"mode":"%s","redis_mem0":%s,"redis_mem":%s,"channels":%s}\n' \
    "$nodes" "$shards" "$primaries" "$mode" "$mem0" "$(cat "$WORK/mem" 2>/dev/null || echo 0)" \
    "$(cat "$WORK/channels" 2>/dev/null || echo 0)" >"$OUT/$name.extra.json"
  rm -f "$WORK/mem" "$WORK/channels"
  for p in "${npids[@]}" "${REDIS_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${npids[@]}" "${REDIS_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

# name scenario nodes shards primaries mode bench-args
FIT=(
  "k1-idle idle 1 1 1 node -n 4000 --rooms 100"
  "k2-bigroom fanout 1 1 0 node -s 1000 --rooms 1 -p 4 --rate 200"
  "k3-ones fanout 1 1 0 node -s 500 --rooms 500 -p 40 --rate 4000"
  "k4-sixes fanout 1 2 0 node -s 3000 --rooms 500 -p 40 --rate 4000"
  "k5-redis-ones fanout 1 1 1 node -s 500 --rooms 500 -p 40 --rate 4000"
  "k6-redis-threes fanout 3 1 1 node -s 1500 --rooms 500 -p 40 --rate 4000"
  "k7-cluster-threes fanout 3 1 3 node -s 1500 --rooms 500 -p 40 --rate 4000"
)
CHECK=(
  "v1-standalone-2sh fanout 1 2 0 node -s 1000 --rooms 20 -p 40 --rate 2500"
  "v2-standalone-4sh fanout 1 4 0 node -s 2000 --rooms 200 -p 40 --rate 5000"
  "v3-redis-1n4sh fanout 1 4 1 node -s 1000 --rooms 10 -p 40 --rate 1500"
  "v4-redis-2n2sh fanout 2 2 1 node -s 1000 --rooms 100 -p 40 --rate 4000"
  "v5-redis-3n1sh fanout 3 1 1 node -s 600 --rooms 1 -p 9 --rate 400"
  "v6-cluster2-2n2sh fanout 2 2 2 node -s 1000 --rooms 50 -p 40 --rate 3000"
  "v7-cluster3-3n2sh fanout 3 2 3 node -s 900 --rooms 30 -p 39 --rate 3000"
  "v8-cluster3-3n4sh-pershard fanout 3 4 3 shard -s 1200 --rooms 30 -p 39 --rate 1500"
)

run_set() { # runs every entry of the named array --runs times, interleaved
  local -n set=$1
  for r in $(seq "$RUNS"); do
    for e in "${set[@]}"; do
      read -r name rest <<<"$e"
      echo "run $r: $name" >&2
      # shellcheck disable=SC2086
      one_run "$name.$r" $rest
    done
  done
}

if [ -z "$ONLY" ] || [ "$ONLY" = fit ]; then
  run_set FIT
  python3 "$ROOT/bench/capacity_fit.py" fit "$OUT" "$RUNS" "$(hostname) $(nproc) cores, $(date -u +%F), $(git rev-parse --short HEAD)" \
    >"$OUT/costs.json"
  cat "$OUT/costs.json"
  COSTS="$OUT/costs.json"
  [ "$WRITE" = 1 ] && cp "$OUT/costs.json" bench/costs.json
fi
if [ -z "$ONLY" ] || [ "$ONLY" = check ]; then
  run_set CHECK
  python3 "$ROOT/bench/capacity_fit.py" check "$OUT" "$RUNS" "${COSTS:-bench/costs.json}" "$BIN/corecast-bench" \
    "${CHECK[@]}" | tee "$OUT/capacity.md"
fi
