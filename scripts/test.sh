#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need
# (redis-server; the Autobahn environment is built by shared/conformance on
# first use), then lints, unit + integration tests (real sockets, real
# redis-server processes the tests start on free ports), the sysctl script
# tests, and the RFC 6455 conformance run. Usage: scripts/test.sh [--quick]
#   --quick   skip lints and Autobahn
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

if ! command -v redis-server >/dev/null; then
  echo "== installing redis-server (the Redis tests start private instances)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
fi

if [ $QUICK = 0 ]; then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy"
  cargo clippy --workspace --all-targets -q -- -D warnings
fi

echo "== scripts/test-sysctl-tune.sh"
bash scripts/test-sysctl-tune.sh
bash scripts/sysctl-tune.sh --check --report-only >/dev/null

echo "== cargo test"
# One test binary at a time keeps the 2-core machine from oversubscribing.
cargo test --workspace -- --test-threads=2

if [ $QUICK = 0 ]; then
  echo "== Autobahn RFC 6455 conformance (/echo)"
  cargo build --release -q -p corecast
  bash scripts/autobahn.sh target/release/corecast target/autobahn
fi
echo "== all tests passed"
