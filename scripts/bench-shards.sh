#!/usr/bin/env bash
# One corecast node at --shards 1 or 2 under one load (corecast issue 12:
# "a 2-shard node never below a 1-shard node"), with each thread's user and
# kernel CPU and its context switches from /proc, so a slower run shows where
# the time went (e.g. a shard sharing its core with the generator).
#
# The node may use CPUs 0-1 (shard i is pinned to the i-th of them); the
# generator runs on CPU 1. One room, one publisher, 10 s, 128-byte data.
#
# Usage: scripts/bench-shards.sh SHARDS SUBSCRIBERS RATE [PREFIX...]
#   PREFIX runs the generator under a command, e.g. `chrt -b 0` (SCHED_BATCH:
#   it then never preempts a shard when woken, as remote clients would not).
# Extra server flags: CORECAST_EXTRA="--write-delay-ms 1".
# Prints one line: deliveries/s, per server CPU-second, loss, p50/p99,
# generator CPU, and per thread: user s, kernel s, voluntary and involuntary
# context switches.
set -euo pipefail
[[ $# -ge 3 ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
SH=$1 SUBS=$2 RATE=$3
shift 3
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
TMP=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# shellcheck disable=SC2086
taskset -c 0-1 "$BIN/corecast" --listen "127.0.0.1:$PORT" --shards "$SH" --max-ops-per-sec 0 ${CORECAST_EXTRA:-} \
    >"$TMP/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$TMP"' EXIT
for _ in $(seq 50); do (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
snap() {
    local t
    for t in /proc/$PID/task/*; do
        local f
        read -r -a f < <(sed 's/^.*) //' "$t/stat")
        echo "$(cat "$t/comm") ${f[11]} ${f[12]} $(awk '/^voluntary/{print $2}' "$t/status") $(awk '/^nonvoluntary/{print $2}' "$t/status")"
    done
}
snap >"$TMP/before"
"$@" taskset -c 1 "$BIN/corecast-bench" fanout --url "ws://127.0.0.1:$PORT" -s "$SUBS" --rooms 1 -p 1 --rate "$RATE" \
    -d 10 --grace 2 --server-pid "$PID" -q --json "$TMP/report.json" >/dev/null
snap >"$TMP/after"
python3 - "$TMP" "$(getconf CLK_TCK)" <<'PY'
import json, sys
tmp, hz = sys.argv[1], float(sys.argv[2])
d = json.load(open(f"{tmp}/report.json"))
t, l = d["traffic"], d["latency"]
read = lambda p: {f"{line.split()[0]}#{i}": list(map(int, line.split()[1:])) for i, line in enumerate(open(p))}
b, a = read(f"{tmp}/before"), read(f"{tmp}/after")
threads = []
for k, v in a.items():
    if k in b:
        du, ds, dv, dn = (v[i] - b[k][i] for i in range(4))
        if du + ds > 0:
            threads.append(f"{k.split('#')[0]} user {du / hz:.2f} s kernel {ds / hz:.2f} s cs {dv}/{dn}")
print(f"delivered/s {t['received_per_s']:.0f} per-server-cpu-s {t['received_per_server_cpu_s']:.0f} "
      f"loss {t['loss_pct']}% p50 {l['p50_us'] / 1000:.2f} ms p99 {l['p99_us'] / 1000:.2f} ms "
      f"generator {d['generator']['cpu_s']:.2f} s | " + "; ".join(threads))
PY
