#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need
# (redis-server; the Autobahn client is set up by scripts/conformance.sh on
# first use), then lints, unit + integration tests (real sockets, real
# redis-server processes the tests start on free ports), the sysctl script
# tests, the JS client tests (node --test), and the RFC 6455 conformance
# run. Usage: scripts/test.sh [--quick]
#   --quick   skip lints and Autobahn
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

# redis-server: the Redis tests start private instances on free ports.
# openssl: the auth tests make RS256/ES256 keys with it.
# Installs the Debian packages named, if any (as root, or with sudo).
apt_install() {
  [ $# -gt 0 ] || return 0
  echo "== installing $*"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v openssl >/dev/null || need+=(openssl)
apt_install "${need[@]}"
# prometheus-client: tests/metrics.rs parses /metrics with its reference parser.
if ! python3 -c "import prometheus_client" 2>/dev/null; then
  echo "== installing prometheus-client (Python)"
  python3 -m pip install --quiet prometheus-client
fi

# The browser test (tests/browser.rs): Debian's chromium, driven by
# playwright-core from tests/browser/node_modules. Without them (--quick) it skips.
if [ $QUICK = 0 ]; then
  need=()
  [ -x /usr/bin/chromium ] || need+=(chromium)
  command -v node >/dev/null || need+=(nodejs)
  command -v npm >/dev/null || need+=(npm)
  apt_install "${need[@]}"
  if [ ! -d tests/browser/node_modules ]; then
    echo "== npm ci --prefix tests/browser"
    npm ci --prefix tests/browser --no-audit --no-fund
  fi
fi

if [ $QUICK = 0 ]; then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy"
  cargo clippy --workspace --all-targets -q -- -D warnings
  # The fuzz crate is outside the workspace (cargo fuzz needs nightly): type-
  # check its targets on stable so an API change cannot break them unseen.
  # Their bodies (fuzz/src/lib.rs) run on every committed seed in
  # tests/fuzz_seeds.rs with the other tests.
  echo "== cargo check fuzz targets"
  cargo check -q --manifest-path fuzz/Cargo.toml --all-targets
fi

echo "== scripts/test-sysctl-tune.sh"
bash scripts/test-sysctl-tune.sh
bash scripts/sysctl-tune.sh --check --report-only >/dev/null

echo "== cargo test"
# One test binary at a time keeps the 2-core machine from oversubscribing.
# The socket-level tests run on both monoio drivers, each named explicitly
# (tests/driver.rs checks from /metrics that the node ran the one asked for),
# so an io_uring regression cannot hide behind the epoll fallback.
# The browser test runs on its own below, where it may not skip.
SKIP=(--skip chromium_chats_across_two_nodes)
# Binaries whose subject is the Redis side (topologies, failovers, history
# across nodes, the backend contract) run in the first pass only: what they
# test does not change with the monoio driver, and they are about a third
# of a pass. Every other integration binary (new ones too) runs in both.
ONE_DRIVER=(redis_cluster redis_cluster_mode redis_sentinel redis_several redis_topology_errors
  redis_contract history_topologies history_nodes history_faults history_epoch chaos
  presence presence_webhooks webhook auth_sso server_api_publish)
both_drivers=()
for f in tests/*.rs; do
  t=$(basename "$f" .rs)
  [[ " ${ONE_DRIVER[*]} " == *" $t "* ]] || both_drivers+=(--test "$t")
done
# The conformance run's release binary is built while the epoll-driver pass
# runs: its tests mostly wait (they use about a third of the CPU), so the
# build takes the idle time at the lowest priority instead of ~3 minutes of
# its own. Its own target dir: a cargo command holds its dir's lock until it
# ends.
REL_DIR=target/conformance
rel_pid=""
trap '[ -z "$rel_pid" ] || kill "$rel_pid" 2>/dev/null || true' EXIT
for driver in uring legacy; do
  if [ $driver = legacy ] && [ $QUICK = 0 ]; then
    echo "== release build for Autobahn, in the background (nice 19, $REL_DIR)"
    mkdir -p "$REL_DIR"
    nice -n 19 cargo build --release -q -p corecast --target-dir "$REL_DIR" >"$REL_DIR/build.log" 2>&1 &
    rel_pid=$!
  fi
  echo "== integration tests, --driver $driver"
  if [ $driver = uring ]; then
    CORECAST_TEST_DRIVER=$driver cargo test --workspace -- --test-threads=2 "${SKIP[@]}"
  else
    # The unit tests do not depend on the driver: the first pass ran them.
    CORECAST_TEST_DRIVER=$driver cargo test -p corecast "${both_drivers[@]}" -- --test-threads=2 "${SKIP[@]}"
  fi
done
if [ $QUICK = 0 ]; then
  echo "== browser test (headless chromium, two nodes)"
  CORECAST_BROWSER_TEST=1 cargo test --test browser -- --test-threads=1
fi

# The JS client (clients/js) against real corecast processes, with node's
# own test runner. Node 20 has its WebSocket behind a flag; 22+ has it on.
# recovery.test.mjs runs them against room history (PROTOCOL.md §7), standalone
# and on private redis-server processes.
if command -v node >/dev/null; then
  echo "== JS client tests (node --test)"
  cargo build -q -p corecast
  node_ws=()
  node -e 'typeof WebSocket === "function" || process.exit(1)' 2>/dev/null || node_ws=(--experimental-websocket)
  (cd clients/js && CORECAST_BIN=../../target/debug/corecast node "${node_ws[@]}" --test \
    test/basic.test.mjs test/reconnect.test.mjs test/safety-net.test.mjs test/recovery.test.mjs \
    test/subscription-token.test.mjs test/presence.test.mjs test/disconnect.test.mjs test/server-subscribe.test.mjs test/backend-example.test.mjs)
else
  [ $QUICK = 1 ] || { echo "node is missing" >&2; exit 1; }
  echo "== JS client tests skipped (no node; scripts/test.sh without --quick installs it)"
fi

if [ $QUICK = 0 ]; then
  # The chaos run (docs/chaos.md): 3 nodes on Redis Sentinel, then Cluster,
  # 300 clients in 30 history rooms, a fault every few seconds; every
  # client's stream is checked (silent losses, duplicates, order, lies).
  # One minute of faults per topology here; long runs: scripts/chaos.sh --secs N.
  # Two shards per node, so that each node's rooms go through the relay
  # (services/relay.rs: one shard holds a room for the node) under the faults.
  echo "== chaos run (60 s per topology, 2 shards per node)"
  CORECAST_CHAOS_SHARDS="${CORECAST_CHAOS_SHARDS:-2}" bash scripts/chaos.sh --secs 60 --topology both
fi

if [ $QUICK = 0 ]; then
  echo "== Autobahn RFC 6455 conformance (/echo)"
  wait "$rel_pid" || { cat "$REL_DIR/build.log" >&2; echo "release build failed" >&2; exit 1; }
  rel_pid=""
  bash scripts/autobahn.sh "$REL_DIR/release/corecast" target/autobahn
fi
echo "== all tests passed"
