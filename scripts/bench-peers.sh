#!/usr/bin/env bash
# Side-by-side benchmark of corecast and the anchor peers of shared/peers/
# (corecast issue 12): the same loads, one system at a time, one table.
#
# Systems: corecast, seed-go, seed-node, socketio, centrifuge, rust-tokio, uws.
# Loads (rows), every one paced (--rate) with one publisher per node:
#   redis-2x1000-50     2 nodes on Redis, 1 room of 2 x 1000 subscribers, 50 msg/s
#   redis-2x50-3000     2 nodes on Redis, 1 room of 2 x 50, 3000 msg/s
#   solo-2000-50        standalone, 1 room of 2000, 50 msg/s
#   solo-100-1000       standalone, 1 room of 100, 1000 msg/s
#   solo-100-3000       standalone, 1 room of 100, 3000 msg/s
#   rooms-100x100       100 rooms x 100 subscribers, 1000 msg/s (corecast only:
#                       the peers have one channel)
#   idle-10k            10000 idle connections: RSS per connection, idle CPU
# uws is standalone only (no Redis rows). "Standalone" peers other than uws
# still need their Redis: they get it, with one instance.
#
# Every server process is started fresh for each row, pinned to CPU 0 with
# taskset (Redis too); the generator runs on CPU 1. corecast runs its release
# build with --shards 1 --max-ops-per-sec 0. A private redis-server runs on a
# free port. Peers are copied to target/peers and built there (their build.sh).
# Everything started here is stopped on exit.
#
# Output in bench/out/peers/: peers.md (the table), peers.json (every cell:
# median, min, max, samples), run<k>/<row>__<system>.json (raw generator
# reports), logs/. With --runs N the whole set runs N times, interleaved, the
# system order rotated by one each run; cells are medians with the min-max range.
#
# Usage: scripts/bench-peers.sh [--quick] [--runs N] [--duration S]
#                               [--idle-secs S] [--systems a,b,...]
#                               [--rows a,b,...] [--no-build] [--out DIR]
#                               [--check]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

QUICK=0 CHECK=0 BUILD=1 RUNS=1 DURATION=10 IDLE_SECS=30
SYSTEMS="corecast,seed-go,seed-node,socketio,centrifuge,rust-tokio,uws"
ROWS="redis-2x1000-50,redis-2x50-3000,solo-2000-50,solo-100-1000,solo-100-3000,rooms-100x100,idle-10k"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
SERVER="${CORECAST_BIN:-$TARGET/release/corecast}"
BENCH="$TARGET/release/corecast-bench"
# The peers are optional, needed only for these side-by-side benchmarks: six
# servers that are no part of this repository, shipped in the project's
# shared/ folder (shared/peers), which sits beside the repository; a worktree
# is one level deeper. $PEERS_SRC overrides.
if [[ -z ${PEERS_SRC:-} ]]; then
    for d in "$ROOT/../shared/peers" "$ROOT/../../shared/peers" /work/shared/peers; do
        [[ -d $d ]] && { PEERS_SRC=$(cd "$d" && pwd); break; }
    done
fi
PEERS_SRC=${PEERS_SRC:-$ROOT/../shared/peers}
PEERS="$TARGET/peers"
OUT="$ROOT/bench/out/peers"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --runs) RUNS="$2"; shift ;;
        --duration) DURATION="$2"; shift ;;
        --idle-secs) IDLE_SECS="$2"; shift ;;
        --systems) SYSTEMS="$2"; shift ;;
        --rows) ROWS="$2"; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT="$2"; shift ;;
        --check) CHECK=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench-peers.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

# Row parameters: mode subscribers rooms publishers rate (quick: small counts).
# mode: redis2 = two nodes on one Redis; solo = one node; idle = idle scenario.
row_params() {
    if [[ $QUICK == 1 ]]; then
        case "$1" in
            redis-2x1000-50) echo "redis2 200 1 2 50" ;;
            redis-2x50-3000) echo "redis2 40 1 2 300" ;;
            solo-2000-50) echo "solo 200 1 1 50" ;;
            solo-100-1000) echo "solo 50 1 1 200" ;;
            solo-100-3000) echo "solo 50 1 1 500" ;;
            rooms-100x100) echo "solo 200 10 4 200" ;;
            idle-10k) echo "idle 1000 1 0 0" ;;
            *) return 1 ;;
        esac
    else
        case "$1" in
            redis-2x1000-50) echo "redis2 2000 1 2 50" ;;
            redis-2x50-3000) echo "redis2 100 1 2 3000" ;;
            solo-2000-50) echo "solo 2000 1 1 50" ;;
            solo-100-1000) echo "solo 100 1 1 1000" ;;
            solo-100-3000) echo "solo 100 1 1 3000" ;;
            rooms-100x100) echo "solo 10000 100 10 1000" ;;
            idle-10k) echo "idle 10000 1 0 0" ;;
            *) return 1 ;;
        esac
    fi
}
if [[ $QUICK == 1 ]]; then
    DURATION=2 IDLE_SECS=3
fi

protocol_of() {
    case "$1" in
        corecast) echo corecast ;;
        socketio) echo socketio ;;
        centrifuge) echo centrifuge ;;
        seed-go|seed-node|rust-tokio|uws) echo raw ;;
        *) return 1 ;;
    esac
}

# Why a (system, row) pair is not run, or nothing when it is.
not_applicable() {
    local sys=$1 row=$2 mode
    read -r mode _ <<<"$(row_params "$row")"
    if [[ $row == rooms-* && $sys != corecast ]]; then
        echo "one channel only"
    elif [[ $mode == redis2 && $sys == uws ]]; then
        echo "standalone only"
    fi
}

IFS=, read -r -a SYSTEM_LIST <<<"$SYSTEMS"
IFS=, read -r -a ROW_LIST <<<"$ROWS"
for s in "${SYSTEM_LIST[@]}"; do
    protocol_of "$s" >/dev/null || { echo "bench-peers.sh: unknown system $s" >&2; exit 2; }
done
for r in "${ROW_LIST[@]}"; do
    row_params "$r" >/dev/null || { echo "bench-peers.sh: unknown row $r" >&2; exit 2; }
done

log() { printf '\n== %s\n' "$*" >&2; }

# --- CPU layout (as bench.sh: servers on the first half, generator on the rest)
NCPU=$(nproc)
if [[ $NCPU -ge 2 ]]; then
    HALF=$((NCPU / 2))
    SERVER_CPUS="0-$((HALF - 1))" GEN_CPUS="$HALF-$((NCPU - 1))" SHARDS=$HALF
else
    SERVER_CPUS=0 GEN_CPUS=0 SHARDS=1
fi

echo "CPU layout: $NCPU cores; servers and Redis on CPUs $SERVER_CPUS, generator on CPUs $GEN_CPUS" >&2
echo "Plan: $RUNS run(s) of systems [$SYSTEMS] x rows [$ROWS]; ${DURATION}s per fanout row, idle ${IDLE_SECS}s" >&2
if [[ $CHECK == 1 ]]; then
    for t in taskset redis-server redis-cli python3 cargo; do
        printf '%-14s %s\n' "$t" "$(command -v "$t" || echo MISSING)" >&2
    done
    echo "peers source: $PEERS_SRC; build dir: $PEERS" >&2
    exit 0
fi

# Each peer asked for: its sources (to build) or its build (--no-build).
for s in "${SYSTEM_LIST[@]}"; do
    [[ $s == corecast ]] && continue
    if [[ $BUILD == 1 && ! -d $PEERS_SRC/$s ]]; then
        echo "bench-peers.sh: peer $s not found in $PEERS_SRC; the peers (optional, for side-by-side benchmarks only) come in the project's shared/peers folder: put it beside the repository or set PEERS_SRC to it, or run --systems corecast" >&2
        exit 2
    elif [[ $BUILD == 0 && ! -x $PEERS/$s/run.sh ]]; then
        echo "bench-peers.sh: peer $s is not built in $PEERS; run without --no-build (PEERS_SRC names the peers' sources)" >&2
        exit 2
    fi
done

# --- processes ------------------------------------------------------------------
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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
    echo "bench-peers.sh: no free port found" >&2
    return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

http_status() {
    local line
    line=$( (exec 3<>"/dev/tcp/127.0.0.1/$1" &&
        printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3 &&
        timeout 2 head -n1 <&3) 2>/dev/null || true)
    line=${line#HTTP/1.? }
    echo "${line:0:3}" | grep -E '^[0-9]{3}$' || echo 000
}

rcli() { redis-cli -p "$RPORT" "$@" 2>/dev/null; }

# Until the Redis side of $1 instances of system $2 is set up (or 10 s).
wait_backplane() {
    local n=$1 sys=$2 got
    for _ in $(seq 1 100); do
        case "$sys" in
            seed-go|seed-node|rust-tokio) got=$(rcli PUBSUB NUMSUB bench | sed -n 2p) ;;
            # Patterns are counted once however many nodes hold them.
            socketio) got=$(rcli PUBSUB NUMPAT); [[ ${got:-0} -ge 1 ]] && got=$n ;;
            # centrifuge subscribes per channel on a client's subscribe; its
            # own control channel shows that the node reached Redis.
            centrifuge) got=$(rcli PUBSUB NUMSUB centrifuge.control | sed -n 2p) ;;
            *) return 0 ;;
        esac
        [[ ${got:-0} -ge $n ]] && return 0
        sleep 0.1
    done
    return 1
}

# start_system SYS NAME PORT REDIS_URL|"" : sets NODE_PID once it serves, or fails.
start_system() {
    local sys=$1 name=$2 port=$3 redis=$4 pid
    local logf="$OUT/logs/$name.log"
    case "$sys" in
        corecast)
            CORECAST_MAX_OPS_PER_SEC=0 taskset -c "$SERVER_CPUS" "$SERVER" --listen "127.0.0.1:$port" \
                --shards "$SHARDS" --max-ops-per-sec 0 ${redis:+--redis "$redis"} >"$logf" 2>&1 &
            ;;
        uws) taskset -c "$SERVER_CPUS" "$PEERS/uws/run.sh" "$port" >"$logf" 2>&1 & ;;
        *) taskset -c "$SERVER_CPUS" "$PEERS/$sys/run.sh" "$port" "$redis" >"$logf" 2>&1 & ;;
    esac
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || break
        if [[ $sys == corecast ]]; then
            [[ $(http_status "$port" /readyz) == 200 ]] && { NODE_PID=$pid; return 0; }
        elif port_open "$port"; then
            NODE_PID=$pid
            return 0
        fi
        sleep 0.1
    done
    echo "bench-peers.sh: $name did not start; see $logf" >&2
    kill "$pid" 2>/dev/null || true
    return 1
}

stop_pids() {
    local pid
    for pid in "$@"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

# --- build ---------------------------------------------------------------------
for tool in taskset redis-server redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "bench-peers.sh: $tool is required" >&2; exit 1; }
done
mkdir -p "$OUT/logs"
if [[ $BUILD == 1 ]]; then
    log "building corecast and corecast-bench (release)"
    cargo build --release -p corecast -p corecast-bench
    log "building the peers in $PEERS (copied from $PEERS_SRC)"
    mkdir -p "$PEERS"
    for s in "${SYSTEM_LIST[@]}"; do
        [[ $s == corecast ]] && continue
        # Copy the sources only; keep earlier build outputs (bin/, node_modules/, ...).
        mkdir -p "$PEERS/$s"
        cp -r "$PEERS_SRC/$s/." "$PEERS/$s/"
        chmod -R u+w "$PEERS/$s"
        "$PEERS/$s/build.sh" >"$OUT/logs/build-$s.log" 2>&1 ||
            { echo "bench-peers.sh: building $s failed; see $OUT/logs/build-$s.log" >&2; exit 1; }
    done
fi
[[ -x $SERVER && -x $BENCH ]] || { echo "bench-peers.sh: $SERVER or $BENCH missing (run without --no-build)" >&2; exit 1; }

# --- Redis -----------------------------------------------------------------------
free_port
RPORT=$PORT
REDIS_URL="redis://127.0.0.1:$RPORT"
taskset -c "$SERVER_CPUS" redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no \
    >"$OUT/logs/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 50); do
    [[ $(rcli PING) == PONG ]] && break
    sleep 0.1
done
[[ $(rcli PING) == PONG ]] || { echo "bench-peers.sh: redis-server did not start" >&2; exit 1; }

# --- one cell ----------------------------------------------------------------------
# run_cell RUN SYS ROW: starts the system's node(s), runs the generator, stops them.
run_cell() {
    local run=$1 sys=$2 row=$3 mode subs rooms pubs rate proto redis nodes i name
    read -r mode subs rooms pubs rate <<<"$(row_params "$row")"
    proto=$(protocol_of "$sys")
    local json="$OUT/run$run/${row}__$sys.json"
    rm -f "$json"
    # Peers need their Redis even standalone; corecast and uws do not.
    redis=""
    if [[ $mode == redis2 ]] || [[ $sys != corecast && $sys != uws ]]; then redis=$REDIS_URL; fi
    nodes=1
    [[ $mode == redis2 ]] && nodes=2
    local urls=() pid_flags=() node_pids=()
    for i in $(seq 1 "$nodes"); do
        free_port
        name="run$run-$row-$sys-$i"
        if ! start_system "$sys" "$name" "$PORT" "$redis"; then
            stop_pids "${node_pids[@]}"
            return 0
        fi
        urls+=("ws://127.0.0.1:$PORT")
        pid_flags+=(--server-pid "$NODE_PID")
        node_pids+=("$NODE_PID")
    done
    if [[ -n $redis ]] && ! wait_backplane "$nodes" "$sys"; then
        echo "bench-peers.sh: $sys did not reach Redis; measuring anyway" >&2
    fi
    local url_list
    url_list=$(IFS=,; echo "${urls[*]}")
    local args=(--protocol "$proto" --url "$url_list" "${pid_flags[@]}" --connect-rate 5000 -q --json "$json")
    [[ -n $redis ]] && args+=(--redis-pid "$REDIS_PID")
    if [[ $mode == idle ]]; then
        args=(idle -n "$subs" --rooms "$rooms" -d "$IDLE_SECS" "${args[@]}")
    else
        # The window only caps a sender's unanswered publishes; at these rates
        # it never binds unless messages (or their echoes) are lost.
        args=(fanout -s "$subs" --rooms "$rooms" -p "$pubs" --rate "$rate" --window 1000 \
            -d "$DURATION" --grace 3 "${args[@]}")
    fi
    log "run $run: $row on $sys: corecast-bench ${args[*]}"
    echo "corecast-bench ${args[*]}" >>"$OUT/commands.txt"
    local budget=$((DURATION + IDLE_SECS + 90))
    if ! timeout "$budget" taskset -c "$GEN_CPUS" "$BENCH" "${args[@]}" >"$OUT/logs/run$run-$row-$sys.txt" 2>&1; then
        echo "bench-peers.sh: generator failed for $row on $sys; see $OUT/logs/run$run-$row-$sys.txt" >&2
        rm -f "$json"
    fi
    stop_pids "${node_pids[@]}"
}

: >"$OUT/commands.txt"
for run in $(seq 1 "$RUNS"); do
    rm -rf "$OUT/run$run"
    mkdir -p "$OUT/run$run"
    # Rotate the system order by one per run.
    n=${#SYSTEM_LIST[@]}
    order=()
    for i in $(seq 0 $((n - 1))); do order+=("${SYSTEM_LIST[$(((i + run - 1) % n))]}"); done
    log "run $run of $RUNS: ${order[*]}"
    for sys in "${order[@]}"; do
        for row in "${ROW_LIST[@]}"; do
            [[ -n $(not_applicable "$sys" "$row") ]] && continue
            run_cell "$run" "$sys" "$row"
        done
    done
done

# --- the table -----------------------------------------------------------------------
NA_ARGS=()
for sys in "${SYSTEM_LIST[@]}"; do
    for row in "${ROW_LIST[@]}"; do
        why=$(not_applicable "$sys" "$row")
        [[ -n $why ]] && NA_ARGS+=(--na "$row:$sys:$why")
    done
done
python3 "$ROOT/bench/peers_table.py" --out "$OUT" --runs "$RUNS" --systems "$SYSTEMS" --rows "$ROWS" \
    --quick "$QUICK" --duration "$DURATION" --idle-secs "$IDLE_SECS" "${NA_ARGS[@]}"
log "done: $OUT/peers.md, $OUT/peers.json"
