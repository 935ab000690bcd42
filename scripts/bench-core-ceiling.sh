#!/usr/bin/env bash
# The most load one core carries (issue 21): corecast with default settings
# and uWebSockets (shared/peers/uws, built into target/peers by
# scripts/bench-peers.sh), each on core --server-core alone, the generator
# on --gen-core. One room of --room (100 or 2000 members); the publish rate
# steps up (--rates, or a ladder per room size) until a step fails: p99 over
# --p99-ms, anything lost, or less than 95% of the rate sent (a failed step
# runs once more and fails only if that fails too: one stray pause on a
# shared box does not end a ladder). Each (run,
# system) starts the server fresh and climbs its own ladder; the systems
# alternate in order run by run. The table gives each run's last passing
# rate, the deliveries per second it means, and corecast / uWS of the medians.
#
# "Default settings": corecast gets only --listen (it runs one shard on the
# one core it may use); publishers are added so that none passes the default
# --max-ops-per-sec 100 (one per 50 msg/s). The generator's busiest worker
# CPU is shown: near 100% the generator, not the server, set the limit.
#
# Usage: scripts/bench-core-ceiling.sh [--room 100|2000] [--runs 3] [--secs 6]
#          [--rates "..."] [--p99-ms 50] [--systems "corecast uws"]
#          [--server-core 0] [--gen-core 1] [--no-build]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROOM=100 RUNS=3 SECS=6 RATES="" P99_MS=50 SYSTEMS="corecast uws" SERVER_CORE=0 GEN_CORE=1 BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --room) ROOM="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --rates) RATES="$2"; shift 2 ;;
    --p99-ms) P99_MS="$2"; shift 2 ;;
    --systems) SYSTEMS="$2"; shift 2 ;;
    --server-core) SERVER_CORE="$2"; shift 2 ;;
    --gen-core) GEN_CORE="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ -z "$RATES" ]; then
  case "$ROOM" in
    100) RATES="1000 2000 3000 4000 5000 6000 7000 8000 10000 12000 14000 16000 20000 24000" ;;
    *) RATES="$(python3 -c "r=[int(x*100000/$ROOM) for x in (0.5,1,1.5,2,2.5,3,3.5,4,5,6,7,8,10,12)]; print(*r)")" ;;
  esac
fi
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if [[ " $SYSTEMS " == *" uws "* ]] && [ ! -x "$TARGET/peers/uws/run.sh" ]; then
  echo "uWS is not built: scripts/bench-peers.sh --systems uws --rows solo-100-1000 --runs 1 builds it (or --systems corecast)" >&2
  exit 2
fi
# shellcheck source=lib/bench-procs.sh
source "$ROOT/scripts/lib/bench-procs.sh"
OUT="$ROOT/bench/out/core-ceiling"
mkdir -p "$OUT"

# ladder RUN SYSTEM: prints "RUN SYSTEM LAST_PASSING_RATE"; each step goes to $OUT/steps-$ROOM.txt.
ladder() {
  local run=$1 sys=$2 port proto
  port=$(free_port)
  case "$sys" in
    corecast) taskset -c "$SERVER_CORE" "$BIN/corecast" --listen "127.0.0.1:$port" >"$WORK/server.log" 2>&1 & proto=corecast ;;
    uws) taskset -c "$SERVER_CORE" "$TARGET/peers/uws/run.sh" "$port" >"$WORK/server.log" 2>&1 & proto=raw ;;
    *) echo "unknown system $sys" >&2; exit 2 ;;
  esac
  local pid=$!
  PIDS+=("$pid")
  wait_ready "$port" "$pid" "$WORK/server.log" -
  local last=0
  for rate in $RATES; do
    local pubs=$(( (rate + 49) / 50 ))
    local verdict attempt
    for attempt in 1 2; do
      local json="$OUT/room$ROOM-run$run-$sys-$rate-$attempt.json"
      taskset -c "$GEN_CORE" "$BIN/corecast-bench" fanout --protocol "$proto" --url "ws://127.0.0.1:$port" \
        -s "$ROOM" --rooms 1 -p "$pubs" --rate "$rate" --window 1000 -d "${SECS}s" --grace 3 \
        --server-pid "$pid" --workers 1 -q --json "$json" >/dev/null 2>"$WORK/bench.err" || { cat "$WORK/bench.err" >&2; break 2; }
      verdict=$(python3 "$ROOT/bench/ladder_table.py" verdict "$json" "$rate" "$P99_MS")
      echo "room $ROOM run $run $sys rate $rate try $attempt: $verdict" | tee -a "$OUT/steps-$ROOM.txt" >&2
      [ "${verdict%% *}" = pass ] && break
    done
    [ "${verdict%% *}" = pass ] || break
    last=$rate
  done
  echo "$run $sys $last"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  PIDS=()
}

: >"$OUT/steps-$ROOM.txt"
echo "== one room of $ROOM, server on core $SERVER_CORE, generator on core $GEN_CORE, p99 <= $P99_MS ms, nothing lost"
RESULTS=()
read -r -a SYS <<<"$SYSTEMS"
for r in $(seq "$RUNS"); do
  order=("${SYS[@]}")
  if [ $((r % 2)) = 0 ]; then order=(); for ((i = ${#SYS[@]} - 1; i >= 0; i--)); do order+=("${SYS[$i]}"); done; fi
  for s in "${order[@]}"; do RESULTS+=("$(ladder "$r" "$s")"); done
done
printf '%s\n' "${RESULTS[@]}" | python3 "$ROOT/bench/ladder_table.py" core "$ROOM" | tee "$OUT/ceiling-$ROOM.md"
