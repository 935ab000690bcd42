#!/usr/bin/env bash
# How corecast scales with shards, and what Redis carries (issue 21): for each
# shard count, N nodes on one private redis-server, --rooms rooms (one by
# default) whose members are spread over every node and shard (SO_REUSEPORT
# places them), one publisher at a fixed rate over the rooms. Per run it
# prints deliveries per second, per server CPU-second and per core, the
# p50/p99 latency, Redis's CPU, how many subscriptions Redis holds for room 0
# (PUBSUB NUMSUB), which is how many times Redis writes each publish ("Redis
# messages per publish"), and the messages the nodes' shards took from
# their inboxes per publish (a reader's hand-off, or a relay's hop to
# another shard: "shard-messages per publish").
#
# Each shard count runs with one Redis subscription per node (the default,
# services/relay.rs) and, for comparison, with one per shard
# (--per-shard-subscriptions true), interleaved, --runs times. Mode `old`
# runs the corecast binary given with --old-bin at its defaults (an A/B of
# two builds in one run).
#
# Cores: nodes are pinned to --server-cores, the generator to --gen-cores
# and redis-server to --redis-cores (on a many-core host give each its own;
# on a 2-core box they share). Shard i of a node runs on the i-th server core.
#
# Usage: scripts/bench-scaling.sh [--shards "1 2 4"] [--nodes 3] [--subs 600]
#          [--rooms 1] [--rate 1000] [--secs 10] [--runs 3] [--server-cores 0-1]
#          [--gen-cores 1] [--redis-cores 0] [--modes "node shard old"]
#          [--old-bin PATH] [--no-build]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SHARDS="1 2" NODES=3 SUBS=600 ROOMS=1 RATE=1000 SECS=10 RUNS=3 BUILD=1 MODES="node shard" OLD_BIN=
SERVER_CORES=0-1 GEN_CORES=1 REDIS_CORES=0
while [ $# -gt 0 ]; do
  case "$1" in
    --shards) SHARDS="$2"; shift 2 ;;
    --nodes) NODES="$2"; shift 2 ;;
    --subs) SUBS="$2"; shift 2 ;;
    --rooms) ROOMS="$2"; shift 2 ;;
    --old-bin) OLD_BIN="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --server-cores) SERVER_CORES="$2"; shift 2 ;;
    --gen-cores) GEN_CORES="$2"; shift 2 ;;
    --redis-cores) REDIS_CORES="$2"; shift 2 ;;
    --modes) MODES="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
# shellcheck source=lib/bench-procs.sh
source "$ROOT/scripts/lib/bench-procs.sh"
ncores() { python3 -c 'import sys; n=0
for p in sys.argv[1].split(","):
    a,_,b=p.partition("-"); n+=int(b or a)-int(a)+1
print(n)' "$1"; }

one_run() { # shards mode
  local sh=$1 mode=$2 per_shard=(--per-shard-subscriptions false) bin="$BIN/corecast"
  [ "$mode" = shard ] && per_shard=(--per-shard-subscriptions true)
  if [ "$mode" = old ]; then
    [ -x "$OLD_BIN" ] || { echo "mode old needs --old-bin PATH (a corecast binary)" >&2; exit 2; }
    bin=$OLD_BIN per_shard=()
  fi
  local rport; rport=$(free_port)
  taskset -c "$REDIS_CORES" redis-server --port "$rport" --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
  local redis=$!
  PIDS+=("$redis")
  wait_redis "$rport" "$WORK/redis.log"
  local urls=() spids=() nodes=()
  for _ in $(seq "$NODES"); do
    local port; port=$(free_port)
    taskset -c "$SERVER_CORES" "$bin" --listen "127.0.0.1:$port" --shards "$sh" --max-ops-per-sec 0 \
      --redis "redis://127.0.0.1:$rport" "${per_shard[@]}" >"$WORK/node-$port.log" 2>&1 &
    nodes+=($!)
    PIDS+=($!)
    spids+=(--server-pid "$!")
    urls+=("ws://127.0.0.1:$port")
    wait_ready "$port" "${nodes[-1]}" "$WORK/node-$port.log"
  done
  local url; url=$(IFS=,; echo "${urls[*]}")
  # NUMSUB while the room is held (sampled half-way through the run).
  ( sleep $((SECS / 2 + 3)); redis-cli -p "$rport" pubsub numsub cc:room:scale-room-0 | tail -1 >"$WORK/numsub" ) &
  local probe=$!
  inbox() { # the nodes' shard-messages so far (corecast_inbox_messages_total)
    local n=0 u
    for u in "${urls[@]}"; do
      n=$((n + $(curl -s "http://${u#ws://}/metrics" | awk '$1 == "corecast_inbox_messages_total" {print int($2)}')))
    done
    echo "$n"
  }
  local inbox0; inbox0=$(inbox)
  taskset -c "$GEN_CORES" "$BIN/corecast-bench" fanout --url "$url" -s "$SUBS" --rooms "$ROOMS" -p 1 --rate "$RATE" \
    --room-prefix scale-room- -d "$SECS" --grace 2 "${spids[@]}" --redis-pid "$redis" -q --json "$WORK/report.json" \
    >/dev/null 2>"$WORK/bench.err" || { cat "$WORK/bench.err" >&2; }
  wait "$probe" 2>/dev/null || true
  local inbox1; inbox1=$(inbox)
  python3 - "$WORK/report.json" "$sh" "$mode" "$(cat "$WORK/numsub" 2>/dev/null || echo '?')" \
    "$(( $(ncores "$SERVER_CORES") < sh * NODES ? $(ncores "$SERVER_CORES") : sh * NODES ))" "$((inbox1 - inbox0))" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); sh, mode, numsub, cores = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
inbox = int(sys.argv[6])
t, l = d["traffic"], d["latency"]
cpu = d.get("server", {}) or {}
per_cpu = t.get("received_per_server_cpu_s") or 0
redis = d.get("redis_cpu_s")
print(f"shards {sh} subs/{mode:5} delivered/s {t['received_per_s']:.0f} per-server-cpu-s {per_cpu:.0f} "
      f"per-core/s {t['received_per_s'] / cores:.0f} loss {t['loss_pct']}% p50 {l['p50_us'] / 1000:.2f} ms "
      f"p99 {l['p99_us'] / 1000:.2f} ms redis-cpu {redis if redis is None else f'{redis:.2f}'} s "
      f"redis-messages-per-publish {numsub} shard-messages-per-publish {inbox / max(t['sent'], 1):.2f}")
PY
  for p in "${nodes[@]}" "$redis"; do kill "$p" 2>/dev/null || true; done
  for p in "${nodes[@]}" "$redis"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

echo "== $NODES nodes, $SUBS members in $ROOMS room(s), $RATE msg/s for $SECS s; server cores $SERVER_CORES, generator $GEN_CORES, redis $REDIS_CORES"
for r in $(seq "$RUNS"); do
  for sh in $SHARDS; do
    for mode in $MODES; do
      echo -n "run $r: "
      one_run "$sh" "$mode"
    done
  done
done
