#!/usr/bin/env bash
# What presence costs Redis (issue 19, PROTOCOL.md §11), measured from
# Redis's own `INFO commandstats`:
#
#   idle   one node with --idle-conns connections (default 15000) in
#          --rooms presence rooms (1000), silent for --idle-secs (120):
#          Redis commands per second spent on presence (EVALSHA/EVAL of the
#          presence scripts) while nothing changes.
#   storm  --storm-conns connections (5000) join ONE presence room at
#          --storm-rate per second (5000): script calls per join (batching),
#          and the node's answer time to a `ping` op meanwhile (a probe
#          pings every 10 ms; max and p99 printed). --storm-room P: the
#          room's prefix (default who:storm-, a presence room; e.g.
#          plain- for the same storm without presence, the baseline).
#
# A private redis-server and a release corecast (1 shard, taskset core 0,
# generator on core 1) on free ports; everything is stopped on exit.
# Usage: scripts/bench-presence.sh [--idle-conns N] [--rooms R]
#          [--idle-secs S] [--storm-conns N] [--storm-rate R] [--storm-room P] [--no-build]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IDLE_CONNS=15000 ROOMS=1000 IDLE_SECS=120 STORM_CONNS=5000 STORM_RATE=5000 BUILD=1 STORM_ROOM=who:storm-
while [ $# -gt 0 ]; do
  case "$1" in
    --idle-conns) IDLE_CONNS="$2"; shift 2 ;;
    --rooms) ROOMS="$2"; shift 2 ;;
    --idle-secs) IDLE_SECS="$2"; shift 2 ;;
    --storm-conns) STORM_CONNS="$2"; shift 2 ;;
    --storm-rate) STORM_RATE="$2"; shift 2 ;;
    --storm-room) STORM_ROOM="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
[ "$BUILD" = 1 ] && cargo build -q --release -p corecast -p corecast-bench
ulimit -n 20000 2>/dev/null || true
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

RPORT=$(free_port)
redis-server --port "$RPORT" --save '' --appendonly no --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
until redis-cli -p "$RPORT" ping >/dev/null 2>&1; do sleep 0.05; done
cat >"$WORK/ns.toml" <<EOF
[[namespace]]
prefix = "who:"
presence = true
EOF
PORT=$(free_port)
taskset -c 0 "$TARGET/release/corecast" --listen "127.0.0.1:$PORT" --shards 1 --max-ops-per-sec 0 \
  --redis "redis://127.0.0.1:$RPORT" --config "$WORK/ns.toml" >"$WORK/node.log" 2>&1 &
NODE=$!
PIDS+=($NODE)
until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do sleep 0.05; done

# Presence script calls so far (every EVALSHA/EVAL; only presence runs here).
calls() {
  redis-cli -p "$RPORT" info commandstats | tr -d '\r' |
    awk -F'[:=,]' '/^cmdstat_(evalsha|eval):/ { n += $3 } END { print n + 0 }'
}
metric() { curl -s "http://127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

echo "== idle: $IDLE_CONNS connections in $ROOMS presence rooms, $IDLE_SECS s"
taskset -c 1 "$TARGET/release/corecast-bench" idle -q -n "$IDLE_CONNS" --rooms "$ROOMS" --room-prefix who: \
  --url "ws://127.0.0.1:$PORT" -d "$((IDLE_SECS + 60))s" >"$WORK/idle.out" 2>&1 &
BENCH=$!
PIDS+=($BENCH)
until [ "$(metric corecast_connections)" = "$IDLE_CONNS" ]; do sleep 0.2; done
sleep 2 # the last batch written
USERS=$(curl -s "http://127.0.0.1:$PORT/api/presence_stats?room=who:0")
C0=$(calls); T0=$(date +%s.%N)
sleep "$IDLE_SECS"
C1=$(calls); T1=$(date +%s.%N)
echo "room who:0 as presence_stats answers: $USERS"
awk -v c0="$C0" -v c1="$C1" -v t0="$T0" -v t1="$T1" -v n="$IDLE_CONNS" 'BEGIN {
  printf "idle: %d presence script calls in %.1f s = %.3f per second (%d connections held)\n", c1 - c0, t1 - t0, (c1 - c0) / (t1 - t0), n }'
echo "redis used_memory: $(redis-cli -p "$RPORT" info memory | tr -d '\r' | awk -F: '/^used_memory_human:/ {print $2}')"
kill "$BENCH" 2>/dev/null || true
wait "$BENCH" 2>/dev/null || true
until [ "$(metric corecast_connections)" = "0" ]; do sleep 0.2; done
sleep 1

echo "== storm: $STORM_CONNS connections join one room (${STORM_ROOM}0) at $STORM_RATE/s"
python3 - "$PORT" "$WORK/probe.txt" <<'EOF' &
import base64, json, os, socket, sys, time
port, out = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port))
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(f"GET /ws?user=probe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
buf = buf.split(b"\r\n\r\n", 1)[1]
def send(obj):
    p = json.dumps(obj).encode(); m = os.urandom(4)
    s.sendall(bytes([0x81, 0x80 | len(p)]) + m + bytes(b ^ m[i % 4] for i, b in enumerate(p)))
def frame():
    global buf
    while True:
        if len(buf) >= 2:
            n = buf[1] & 0x7f; h = 2
            if n == 126: n = int.from_bytes(buf[2:4], "big"); h = 4
            if len(buf) >= h + n:
                f = buf[h:h + n]; buf = buf[h + n:]; return f
        buf += s.recv(65536)
rtts = []
end = time.time() + float(os.environ.get("PROBE_SECS", "8"))
while time.time() < end:
    t = time.perf_counter(); send({"op": "ping", "id": 1})
    while b"pong" not in frame(): pass
    rtts.append((time.perf_counter() - t) * 1000); time.sleep(0.01)
rtts.sort()
open(out, "w").write(f"{len(rtts)} pings, p50 {rtts[len(rtts)//2]:.2f} ms, p99 {rtts[int(len(rtts)*0.99)]:.2f} ms, max {rtts[-1]:.2f} ms\n")
EOF
PROBE=$!
sleep 1
C0=$(calls); E0=$(metric corecast_presence_commands_total)
taskset -c 1 "$TARGET/release/corecast-bench" idle -q -n "$STORM_CONNS" --rooms 1 --room-prefix "$STORM_ROOM" \
  --connect-rate "$STORM_RATE" --url "ws://127.0.0.1:$PORT" -d 3s >"$WORK/storm.out" 2>&1 || true
wait "$PROBE"
C1=$(calls)
sleep 1
echo "probe during the storm: $(cat "$WORK/probe.txt")"
echo "storm: $((C1 - C0)) presence script calls for $STORM_CONNS joins (and as many leaves at the end)"
grep -iE "ready|ramp" "$WORK/storm.out" | head -3 || true
