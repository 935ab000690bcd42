#!/usr/bin/env bash
# RFC 6455 conformance: runs the Autobahn|Testsuite fuzzing client
# (scripts/conformance.sh, which sets it up on first use) against corecast's
# /echo endpoint and fails on any failed case.
# Usage: scripts/autobahn.sh [BINARY] [OUTDIR]
# $CONFORMANCE_RUN may name another runner with the same interface
# (`--setup-only`; `--cases LIST WS_URL OUTDIR`, last line `N passed, M failed`).
#
# Two nodes: `--compression off` gets the core cases 1.*-10.* (the extension
# declined); `--compression on` gets 1.*-10.* again and the permessage-deflate
# cases 12.*/13.*. The Python 2 client is the slow side (12.*/13.* alone take
# ~11 minutes one after another), so the case groups run as concurrent
# clients, each with its own report directory; any failed case fails the
# script.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/corecast}
OUT=${2:-target/autobahn}
RUN=${CONFORMANCE_RUN:-scripts/conformance.sh}
[ -x "$BIN" ] || { echo "autobahn.sh: build $BIN first (cargo build --release)" >&2; exit 2; }
[ -f "$RUN" ] || { echo "autobahn.sh: $RUN not found (CONFORMANCE_RUN)" >&2; exit 2; }
rm -rf "$OUT"
mkdir -p "$OUT"
# Set up the cached Autobahn client once, before concurrent clients use it.
bash "$RUN" --setup-only >/dev/null

pids=()
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() { for p in "${pids[@]+"${pids[@]}"}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# start_node MODE: a node on a free port; sets $addr. (Not in a command
# substitution: the node's pid must reach `pids` in this shell for cleanup.)
start_node() {
  local log="$OUT/node-$1.log"
  # Autobahn's 9.* cases send messages up to 16 MiB: raise the limits for this run.
  "$BIN" --listen 127.0.0.1:0 --shards 2 --echo --max-message-bytes 20000000 \
    --outbound-queue-bytes 67108864 --compression "$1" >"$log" 2>"$log.err" &
  pids+=($!)
  addr=""
  for _ in $(seq 100); do grep -q 'listening on' "$log" && break; sleep 0.05; done
  addr=$(sed -n 's/^corecast listening on //p' "$log")
  [ -n "$addr" ] || { cat "$log.err" >&2; echo "autobahn.sh: corecast --compression $1 did not start" >&2; exit 2; }
}
start_node off
off=$addr
start_node on
on=$addr

CORE='1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*'
# The cost of a 12.*/13.* case grows with its last number (message size and
# count), so the groups are cut by that number, balanced by measured time.
# Exact case ids, since a pattern with `*` matches as a prefix (12.*.1 would
# take 12.1.10 too). 12.* has 5 subgroups of 18 cases, 13.* has 7.
ids() { # MAJOR SUBGROUPS LAST...
  local major=$1 subs=$2 out=() s i
  shift 2
  for s in $(seq "$subs"); do for i in "$@"; do out+=("$major.$s.$i"); done; done
  local IFS=,
  echo "${out[*]}"
}
# name|node|runner arguments
groups=(
  "off-core|$off|--cases $CORE"
  "on-core|$on|--cases $CORE"
  "on-12-a|$on|--cases $(ids 12 5 1 2 3 4 5 6 7 8 9 10 15)"
  "on-12-b|$on|--cases $(ids 12 5 11 12 13 14 16 17 18)"
  "on-13-a|$on|--cases $(ids 13 7 1 2 3 4 5 6 9 10 15 16)"
  "on-13-b|$on|--cases $(ids 13 7 7 8 11 12 13 14 17 18)"
)
start=$SECONDS
clients=()
for g in "${groups[@]}"; do
  IFS='|' read -r name addr args <<<"$g"
  # shellcheck disable=SC2086 # $args is a list of options
  bash "$RUN" $args "ws://$addr/echo" "$OUT/$name" >"$OUT/$name.out" 2>&1 &
  clients+=("$!:$name")
done
status=0
for c in "${clients[@]}"; do
  pid=${c%%:*}
  name=${c#*:}
  rc=0
  wait "$pid" || rc=$?
  echo "== autobahn $name: $(tail -n 1 "$OUT/$name.out") [exit $rc]"
  [ "$rc" = 0 ] || { status=1; tail -n 30 "$OUT/$name.out"; }
done
echo "== autobahn: all groups done in $((SECONDS - start))s"
exit $status
