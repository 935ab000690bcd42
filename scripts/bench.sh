#!/usr/bin/env bash
# Runs the standard corecast load-test suite end to end and writes JSON + HTML
# results under bench/out/:
#
#   idle      N subscribed idle connections over all nodes (fresh nodes, so
#             RSS per connection is measured from a clean start)
#   connect   N connections over all nodes, paced, then unpaced
#   fanout    standalone on one node: as fast as acks allow, then at a fixed rate
#   echo      request/response on /echo
#   redis     fanout across two nodes through a private Redis (skipped, with a
#             message, when the server has no working --redis mode)
#
# Server nodes run on free ports, pinned with taskset to the first half of the
# CPUs and the generator to the other half (on 2 cores: server core 0,
# generator core 1). Everything started here is stopped on exit.
# Binaries come from $CARGO_TARGET_DIR (default target/); --server (or
# $CORECAST_BIN) runs another server binary.
#
# Usage: scripts/bench.sh [--quick] [--connections N] [--subscribers N]
#                         [--duration S] [--idle-secs S] [--server BIN]
#                         [--no-build] [--out DIR] [--check]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

QUICK=0 CHECK=0 BUILD=1
CONNECTIONS=30000 SUBSCRIBERS=10000 ROOMS=100 PUBLISHERS=20 RATE=1000
DURATION=10 IDLE_SECS=60
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
SERVER="${CORECAST_BIN:-$TARGET/release/corecast}"
BENCH="$TARGET/release/corecast-bench"
OUT="$ROOT/bench/out"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --connections) CONNECTIONS="$2"; shift ;;
        --subscribers) SUBSCRIBERS="$2"; shift ;;
        --duration) DURATION="$2"; shift ;;
        --idle-secs) IDLE_SECS="$2"; shift ;;
        --server) SERVER="$2"; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT="$2"; shift ;;
        --check) CHECK=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ $QUICK == 1 ]]; then
    CONNECTIONS=2000 SUBSCRIBERS=1000 ROOMS=10 PUBLISHERS=4 RATE=200 DURATION=3 IDLE_SECS=3
fi

log() { printf '\n== %s\n' "$*" >&2; }

# --- CPU layout -------------------------------------------------------------
NCPU=$(nproc)
if [[ $NCPU -ge 2 ]]; then
    HALF=$((NCPU / 2))
    SERVER_CPUS="0-$((HALF - 1))"
    GEN_CPUS="$HALF-$((NCPU - 1))"
    SHARDS=$HALF
else
    SERVER_CPUS=0 GEN_CPUS=0 SHARDS=1
fi
# A node keeps well under the 20000 open files a process may have here.
PER_NODE=15000
NODES=$(( (CONNECTIONS + PER_NODE - 1) / PER_NODE ))
[[ $NODES -lt 2 ]] && NODES=2

# --- helpers ----------------------------------------------------------------
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# Sets PORT to a free TCP port on 127.0.0.1, below the ephemeral range.
USED_PORTS=" "
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 12000))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+="$p "
            PORT=$p
            return 0
        fi
    done
    echo "bench.sh: no free port found" >&2
    return 1
}

# HTTP status of GET $2 on port $1, or 000.
http_status() {
    local line
    line=$( (exec 3<>"/dev/tcp/127.0.0.1/$1" &&
        printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3 &&
        timeout 2 head -n1 <&3) 2>/dev/null || true)
    line=${line#HTTP/1.? }
    echo "${line:0:3}" | grep -E '^[0-9]{3}$' || echo 000
}

# wait_ready PORT PID: until /readyz is 200; fails if PID exits or after 15 s.
wait_ready() {
    for _ in $(seq 1 150); do
        kill -0 "$2" 2>/dev/null || return 1
        [[ $(http_status "$1" /readyz) == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

# start_node NAME PORT [server flags...]: sets NODE_PID once /readyz is 200, or fails.
start_node() {
    local name=$1 port=$2
    shift 2
    # Publishers run flat out: no per-connection op limit unless a flag sets one.
    CORECAST_MAX_OPS_PER_SEC=${CORECAST_MAX_OPS_PER_SEC:-0} \
        taskset -c "$SERVER_CPUS" "$SERVER" --listen "127.0.0.1:$port" --shards "$SHARDS" "$@" \
        >"$OUT/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    if ! wait_ready "$port" "$pid"; then
        echo "bench.sh: $name (port $port) did not become ready; see $OUT/$name.log" >&2
        kill "$pid" 2>/dev/null || true
        return 1
    fi
    NODE_PID=$pid
}

stop_nodes() {
    local pid
    for pid in "$@"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

# bench NAME SCENARIO [flags...]: one generator run, table appended to summary.txt.
bench() {
    local name=$1
    shift
    log "$name: corecast-bench $*"
    {
        echo "## $name"
        echo "corecast-bench $* --json $OUT/$name.json --html $OUT/$name.html"
        taskset -c "$GEN_CPUS" "$BENCH" "$@" --json "$OUT/$name.json" --html "$OUT/$name.html"
        echo
    } | tee -a "$OUT/summary.txt"
}

# --- check / build ------------------------------------------------------------
for tool in taskset cargo; do
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool is required" >&2; exit 1; }
done
REDIS_BIN=$(command -v redis-server || true)
echo "CPU layout: $NCPU cores; server nodes (and Redis) on CPUs $SERVER_CPUS with --shards $SHARDS, generator on CPUs $GEN_CPUS" >&2
[[ $NCPU -lt 2 ]] && echo "warning: one core only, server and generator share it" >&2
echo "Plan: $NODES nodes, idle/connect $CONNECTIONS connections, fanout $SUBSCRIBERS subscribers in $ROOMS rooms, $PUBLISHERS publishers, ${DURATION}s per phase, idle ${IDLE_SECS}s" >&2
if [[ $CHECK == 1 ]]; then
    echo "redis-server: ${REDIS_BIN:-missing (would apt-get install -y redis-server)}" >&2
    echo "server binary: $SERVER $([[ -x $SERVER ]] && echo present || echo 'missing (would build)')" >&2
    echo "check ok" >&2
    exit 0
fi
if [[ $BUILD == 1 ]]; then
    log "building release binaries"
    cargo build --release -p corecast -p corecast-bench
fi
[[ -x $SERVER ]] || { echo "bench.sh: server binary $SERVER not found" >&2; exit 1; }
[[ -x $BENCH ]] || { echo "bench.sh: $BENCH not found (run without --no-build)" >&2; exit 1; }
mkdir -p "$OUT"
: >"$OUT/summary.txt"
echo "# corecast bench $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || true)" >>"$OUT/summary.txt"
echo "# server CPUs $SERVER_CPUS (--shards $SHARDS), generator CPUs $GEN_CPUS" >>"$OUT/summary.txt"

urls() { local IFS=,; echo "$*"; }
pid_flags() { local p; for p in "$@"; do printf -- '--server-pid %s ' "$p"; done; }

# --- standalone nodes ---------------------------------------------------------
log "starting $NODES standalone nodes"
PORTS=() NODE_PIDS=()
for i in $(seq 1 "$NODES"); do
    free_port
    start_node "node$i" "$PORT" --echo
    PORTS+=("$PORT")
    NODE_PIDS+=("$NODE_PID")
done
URLS=()
for p in "${PORTS[@]}"; do URLS+=("ws://127.0.0.1:$p"); done
ALL=$(urls "${URLS[@]}")
# shellcheck disable=SC2046 # pid_flags expands to several words on purpose
bench idle idle --url "$ALL" -n "$CONNECTIONS" --rooms "$ROOMS" --connect-rate 10000 \
    -d "$IDLE_SECS" --max-per-worker 10000 $(pid_flags "${NODE_PIDS[@]}")
# shellcheck disable=SC2046
bench connect connect --url "$ALL" -n "$CONNECTIONS" --connect-rate 5000 \
    --max-per-worker 10000 $(pid_flags "${NODE_PIDS[@]}")
# shellcheck disable=SC2046
bench connect-unpaced connect --url "$ALL" -n "$CONNECTIONS" --connect-rate 0 \
    --max-per-worker 10000 $(pid_flags "${NODE_PIDS[@]}")

ONE="${URLS[0]}"
bench fanout fanout --url "$ONE" -s "$SUBSCRIBERS" --rooms "$ROOMS" -p "$PUBLISHERS" \
    --window 16 -d "$DURATION" --server-pid "${NODE_PIDS[0]}"
bench fanout-paced fanout --url "$ONE" -s "$SUBSCRIBERS" --rooms "$ROOMS" -p "$PUBLISHERS" \
    --rate "$RATE" -d "$DURATION" --server-pid "${NODE_PIDS[0]}"
bench echo echo --url "$ONE" -n 16 --window 1 -d "$DURATION" --server-pid "${NODE_PIDS[0]}"
stop_nodes "${NODE_PIDS[@]}"

# --- through Redis, across two nodes --------------------------------------------
if [[ -z $REDIS_BIN ]]; then
    log "redis-server missing: apt-get install -y redis-server"
    if { apt-get install -y redis-server || { apt-get update && apt-get install -y redis-server; }; } >"$OUT/apt.log" 2>&1; then
        REDIS_BIN=$(command -v redis-server || true)
    fi
fi
if [[ -z $REDIS_BIN ]]; then
    log "SKIPPED redis scenarios: redis-server could not be installed (see $OUT/apt.log)"
    echo "## redis: skipped (no redis-server)" >>"$OUT/summary.txt"
else
    free_port
    RPORT=$PORT
    log "starting a private redis-server on port $RPORT"
    taskset -c "$SERVER_CPUS" "$REDIS_BIN" --port "$RPORT" --bind 127.0.0.1 --save '' \
        --appendonly no >"$OUT/redis.log" 2>&1 &
    PIDS+=("$!")
    REDIS_UP=0
    for _ in $(seq 1 50); do
        if [[ $( (exec 3<>"/dev/tcp/127.0.0.1/$RPORT" && printf 'PING\r\n' >&3 && timeout 1 head -c5 <&3) 2>/dev/null) == "+PONG" ]]; then
            REDIS_UP=1
            break
        fi
        sleep 0.1
    done
    free_port && R1=$PORT
    free_port && R2=$PORT
    if [[ $REDIS_UP == 0 ]]; then
        log "SKIPPED redis scenarios: redis-server did not answer PING (see $OUT/redis.log)"
        echo "## redis: skipped (redis-server did not start)" >>"$OUT/summary.txt"
    elif start_node redis-node1 "$R1" --redis "redis://127.0.0.1:$RPORT" && N1=$NODE_PID &&
        start_node redis-node2 "$R2" --redis "redis://127.0.0.1:$RPORT" && N2=$NODE_PID; then
        bench fanout-redis fanout --url "ws://127.0.0.1:$R1,ws://127.0.0.1:$R2" -s "$SUBSCRIBERS" \
            --rooms "$ROOMS" -p "$PUBLISHERS" --window 16 -d "$DURATION" \
            --server-pid "$N1" --server-pid "$N2"
        bench fanout-redis-paced fanout --url "ws://127.0.0.1:$R1,ws://127.0.0.1:$R2" -s "$SUBSCRIBERS" \
            --rooms "$ROOMS" -p "$PUBLISHERS" --rate "$RATE" -d "$DURATION" \
            --server-pid "$N1" --server-pid "$N2"
    else
        log "SKIPPED redis scenarios: the server refused --redis or never became ready (see $OUT/redis-node*.log)"
        echo "## redis: skipped (server has no working --redis mode)" >>"$OUT/summary.txt"
    fi
fi

log "done: $OUT/summary.txt and $OUT/*.html"
