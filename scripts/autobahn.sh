#!/usr/bin/env bash
# RFC 6455 conformance: runs the Autobahn|Testsuite fuzzing client (shared/
# conformance/run.sh) against corecast's /echo endpoint and fails on any
# failed case. Usage: scripts/autobahn.sh [BINARY] [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/corecast}
OUT=${2:-target/autobahn}
RUN=${CONFORMANCE_RUN:-../shared/conformance/run.sh}
[ -x "$BIN" ] || { echo "autobahn.sh: build $BIN first (cargo build --release)" >&2; exit 2; }
[ -f "$RUN" ] || { echo "autobahn.sh: $RUN not found (shared/ must sit beside the repo)" >&2; exit 2; }
# Two runs, each against its own node: `--compression off` (1.*-10.*, the
# extension declined) and `--compression on` (1.*-10.* again, then the
# permessage-deflate cases 12.*/13.*). Any failed case fails the script.
rm -rf "$OUT"
status=0
for mode in off on; do
  log=$(mktemp)
  # Autobahn's 9.* cases send messages up to 16 MiB: raise the limits for this run.
  "$BIN" --listen 127.0.0.1:0 --shards 2 --echo --max-message-bytes 20000000 \
    --outbound-queue-bytes 67108864 --compression "$mode" >"$log" 2>"$log.err" &
  pid=$!
  trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$log" "$log.err"' EXIT
  for _ in $(seq 100); do grep -q 'listening on' "$log" && break; sleep 0.05; done
  addr=$(sed -n 's/^corecast listening on //p' "$log")
  [ -n "$addr" ] || { cat "$log.err" >&2; echo "autobahn.sh: corecast did not start" >&2; exit 2; }
  echo "== autobahn: corecast --compression $mode"
  bash "$RUN" --compression "$mode" "ws://$addr/echo" "$OUT/$mode" || status=1
  kill $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  rm -f "$log" "$log.err"
  trap - EXIT
done
exit $status
