#!/usr/bin/env bash
# The same fan-out load through two corecast nodes on (a) one Redis and
# (b) a 3-primary Redis Cluster (sharded Pub/Sub), and what each costs Redis:
# deliveries per second, and Redis CPU (all redis-server processes, from
# /proc/PID/stat) per delivered message. Results: a table on stdout and JSON
# per run under bench/out/topologies/.
#
# Server nodes and Redis run on the first half of the CPUs, the generator on
# the other half (on 2 cores: core 0 and core 1), as in scripts/bench.sh.
# Everything started here is stopped on exit.
#
# Usage: scripts/bench-redis-topologies.sh [--no-build] [--duration S]
#            [--subscribers N] [--rooms R] [--publishers P] [--rate R]
#            [--only single|cluster]
#   --rate   publishes per second over all publishers (default 500; each
#            reaches subscribers/rooms subscribers, so 500 x 100 = 50k/s)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BUILD=1 DURATION=10 SUBSCRIBERS=2000 ROOMS=20 PUBLISHERS=10 RATE=500 ONLY=""
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
SERVER="${CORECAST_BIN:-$TARGET/release/corecast}"
BENCH="$TARGET/release/corecast-bench"
OUT="$ROOT/bench/out/topologies"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --duration) DURATION="$2"; shift ;;
        --subscribers) SUBSCRIBERS="$2"; shift ;;
        --rooms) ROOMS="$2"; shift ;;
        --publishers) PUBLISHERS="$2"; shift ;;
        --rate) RATE="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench-redis-topologies.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

NCPU=$(nproc)
if [[ $NCPU -ge 2 ]]; then
    HALF=$((NCPU / 2))
    SERVER_CPUS="0-$((HALF - 1))" GEN_CPUS="$HALF-$((NCPU - 1))" SHARDS=$HALF
else
    SERVER_CPUS=0 GEN_CPUS=0 SHARDS=1
fi
for tool in taskset redis-server redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "bench-redis-topologies.sh: $tool is required" >&2; exit 1; }
done
if [[ $BUILD == 1 ]]; then
    cargo build --release -p corecast -p corecast-bench
fi
[[ -x $SERVER && -x $BENCH ]] || { echo "release binaries missing (run without --no-build)" >&2; exit 1; }
mkdir -p "$OUT"
WORK=$(mktemp -d)

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

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
    echo "no free port" >&2
    return 1
}

http_status() {
    local line
    line=$( (exec 3<>"/dev/tcp/127.0.0.1/$1" &&
        printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3 &&
        timeout 2 head -n1 <&3) 2>/dev/null || true)
    line=${line#HTTP/1.? }
    echo "${line:0:3}" | grep -E '^[0-9]{3}$' || echo 000
}

# start_redis PORT [args...]: sets REDIS_PID once it answers PING.
start_redis() {
    local port=$1
    shift
    taskset -c "$SERVER_CPUS" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$WORK" "$@" >"$WORK/redis-$port.log" 2>&1 &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    for _ in $(seq 1 100); do
        [[ $(redis-cli -p "$port" PING 2>/dev/null) == PONG ]] && return 0
        kill -0 "$REDIS_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "redis-server on $port did not start (see $WORK/redis-$port.log)" >&2
    return 1
}

# start_redis_free [args...]: on a free port (sets PORT, REDIS_PID); a port
# taken meanwhile is retried with another.
start_redis_free() {
    for _ in 1 2 3; do
        free_port
        start_redis "$PORT" "$@" && return 0
    done
    return 1
}

# start_node PORT REDIS_URL: sets NODE_PID once /readyz is 200.
start_node() {
    CORECAST_MAX_OPS_PER_SEC=0 taskset -c "$SERVER_CPUS" "$SERVER" --listen "127.0.0.1:$1" \
        --shards "$SHARDS" --redis "$2" >"$WORK/node-$1.log" 2>&1 &
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    for _ in $(seq 1 150); do
        [[ $(http_status "$1" /readyz) == 200 ]] && return 0
        sleep 0.1
    done
    echo "corecast on $1 did not become ready:" >&2
    cat "$WORK/node-$1.log" >&2
    return 1
}

# CPU ticks (user + system) of the given processes, summed.
ticks() {
    local sum=0 pid f
    for pid in "$@"; do
        read -ra f <"/proc/$pid/stat"
        sum=$((sum + f[13] + f[14]))
    done
    echo "$sum"
}

ROWS=()
# run NAME REDIS_URL REDIS_PIDS...: two nodes, one fan-out run, one table row.
run() {
    local name=$1 url=$2
    shift 2
    local redis_pids=("$@")
    free_port; local p1=$PORT
    free_port; local p2=$PORT
    start_node "$p1" "$url"; local n1=$NODE_PID
    start_node "$p2" "$url"; local n2=$NODE_PID
    local before after
    before=$(ticks "${redis_pids[@]}")
    taskset -c "$GEN_CPUS" "$BENCH" fanout --url "ws://127.0.0.1:$p1" --url "ws://127.0.0.1:$p2" \
        --server-pid "$n1" --server-pid "$n2" --quiet -s "$SUBSCRIBERS" --rooms "$ROOMS" \
        -p "$PUBLISHERS" --rate "$RATE" -d "${DURATION}s" --json "$OUT/$name.json" >"$OUT/$name.txt"
    after=$(ticks "${redis_pids[@]}")
    local row lat lost
    lat=$(sed -n 's/^end-to-end *p50 \([^ ]* [^ ]*\) .* p99 \([^ ]* [^ ]*\) .*/\1 \/ \2/p' "$OUT/$name.txt")
    lost=$(sed -n 's/^deliveries .*lost \([0-9]*\) .*/\1/p' "$OUT/$name.txt")
    row=$(python3 - "$OUT/$name.json" "$((after - before))" "$(getconf CLK_TCK)" "$name" "$lat" "$lost" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
ticks, hz, name, lat, lost = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
def find(d, key):
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            x = find(v, key)
            if x is not None:
                return x
    return None
received, per_s = find(r, "received"), find(r, "received_per_s")
cpu = ticks / hz
per = cpu * 1e6 / received if received else float("nan")
print(f"| {name} | {per_s/1000:.1f}k | {received} | {lost} | {lat} | {cpu:.2f} s | {per:.2f} µs |")
EOF
)
    ROWS+=("$row")
    kill "$n1" "$n2" 2>/dev/null || true
    wait "$n1" "$n2" 2>/dev/null || true
}

if [[ -z $ONLY || $ONLY == single ]]; then
    start_redis_free
    R=$REDIS_PID
    run single "redis://127.0.0.1:$PORT" "$R"
    kill "$R"; wait "$R" 2>/dev/null || true
fi

if [[ -z $ONLY || $ONLY == cluster ]]; then
    CPORTS=() CPIDS=() ADDRS=()
    for i in 1 2 3; do
        start_redis_free --cluster-enabled yes --cluster-config-file "$WORK/nodes-$RANDOM$i.conf"
        CPORTS+=("$PORT") CPIDS+=("$REDIS_PID") ADDRS+=("127.0.0.1:$PORT")
    done
    redis-cli --cluster create "${ADDRS[@]}" --cluster-replicas 0 --cluster-yes >"$WORK/create.log"
    for _ in $(seq 1 200); do
        ok=1
        for p in "${CPORTS[@]}"; do
            redis-cli -p "$p" CLUSTER INFO | grep -q cluster_state:ok || ok=0
        done
        [[ $ok == 1 ]] && break
        sleep 0.1
    done
    run cluster "redis+cluster://${ADDRS[0]},${ADDRS[1]}" "${CPIDS[@]}"
fi

echo
echo "fanout: 2 nodes x --shards $SHARDS on CPUs $SERVER_CPUS (Redis too), generator on $GEN_CPUS;"
echo "$SUBSCRIBERS subscribers in $ROOMS rooms, $PUBLISHERS publishers, --rate $RATE, ${DURATION}s"
echo
echo "| topology | deliveries/s | delivered | lost | end-to-end p50 / p99 | Redis CPU | Redis CPU per delivery |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
