# Shared by the issue-21 benchmark scripts (bench-capacity, bench-redis-ceiling,
# bench-core-ceiling, bench-scaling): the release build, a work directory,
# the processes they start (stopped on exit), free ports, and bounded waits.
# Source it after `set -euo pipefail` and the arguments (ROOT set, BUILD=0
# for --no-build); it sets BIN, WORK and PIDS and the EXIT trap.

BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
[ "${BUILD:-1}" = 1 ] && cargo build -q --release -p corecast -p corecast-bench
ulimit -n 20000 2>/dev/null || true

WORK=$(mktemp -d)
PIDS=()
bench_cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${CG:-}" ] && rmdir "$CG" 2>/dev/null
  rm -rf "$WORK"
}
trap bench_cleanup EXIT

# A free port below the ephemeral range (no outgoing connection takes it
# meanwhile) whose +10000 (a Redis Cluster node's bus port) is free too.
free_port() {
  python3 -c 'import random, socket
while True:
    p = random.randint(20000, 22700)
    try:
        for q in (p, p + 10000):
            socket.socket().bind(("127.0.0.1", q))
        print(p); break
    except OSError:
        pass'
}

# wait_redis PORT LOG: until redis-server on PORT answers PING (10 s at most).
wait_redis() {
  local tries=0
  until redis-cli -p "$1" ping >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ $tries -gt 200 ] && { echo "redis-server on $1 did not start:" >&2; tail -3 "$2" >&2; exit 1; }
    sleep 0.05
  done
}

# wait_ready PORT PID LOG [PATH]: until the server PID answers
# http://127.0.0.1:PORT/PATH (default readyz; "-" = the port accepts),
# 20 s at most; fails at once if PID exits.
wait_ready() {
  local port=$1 pid=$2 log=$3 path=${4:-readyz} tries=0
  while true; do
    if [ "$path" = - ]; then
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    else
      curl -sf "http://127.0.0.1:$port/$path" >/dev/null && return 0
    fi
    tries=$((tries + 1))
    if [ $tries -gt 400 ] || ! kill -0 "$pid" 2>/dev/null; then
      echo "the server on $port did not become ready:" >&2; tail -5 "$log" >&2; exit 1
    fi
    sleep 0.05
  done
}
