#!/usr/bin/env bash
# RFC 6455 conformance: runs the Autobahn|Testsuite fuzzing client (wstest -m
# fuzzingclient, from PyPI) against a WebSocket echo endpoint, prints one
# verdict line per case and, last, `N passed, M failed`.
#
#   scripts/conformance.sh [--cases LIST] WS_URL OUTDIR
#   scripts/conformance.sh --setup-only
#
# LIST: comma-separated case ids or patterns (default: the core cases
# 1.*-7.*,9.*,10.*). A case passes when Autobahn's verdict is OK, NON-STRICT or
# INFORMATIONAL and its close verdict OK or INFORMATIONAL; anything else
# (UNIMPLEMENTED too: the deflate cases must negotiate) fails, and so does a
# case that did not run. Exit 0 only when every case ran and passed, 1 when
# one did not, 2 on a usage or set-up error. OUTDIR gets spec.json,
# wstest.log and Autobahn's reports (reports/index.html).
#
# Set-up, on first use, into $AUTOBAHN_CACHE (default target/autobahn-env):
# autobahntestsuite is Python 2.7 only. The interpreter is $AUTOBAHN_PYTHON2,
# else a python2.7 that runs (on PATH or under pyenv), else CPython 2.7 from
# Debian 11 (bullseye) packages, fetched with a private apt configuration
# from the mirror this host's apt sources name and unpacked with dpkg -x
# (nothing is installed system-wide). pip, then the pinned autobahntestsuite
# set below, go into the cache as the interpreter's user site. Delete the
# cache (or bump RECIPE) to rebuild it.
set -euo pipefail
SELF=conformance.sh
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${AUTOBAHN_CACHE:-$ROOT/target/autobahn-env}
TIMEOUT=${AUTOBAHN_TIMEOUT:-1800} # seconds for one wstest run
CASES='1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*'
SETUP_ONLY=0
POS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cases) CASES=${2:?--cases needs a list}; shift 2 ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "$SELF: unknown option $1 (try --help)" >&2; exit 2 ;;
    *) POS+=("$1"); shift ;;
  esac
done
[ "$SETUP_ONLY" = 1 ] || [ ${#POS[@]} = 2 ] || { echo "usage: $SELF [--cases LIST] WS_URL OUTDIR | --setup-only" >&2; exit 2; }

die() { echo "$SELF: $*" >&2; exit 2; }
log() { echo "[conformance] $*" >&2; }

RECIPE=1 # bump to rebuild every cache
DEBS="python2.7 python2.7-minimal libpython2.7-minimal libpython2.7-stdlib libpython2.7-dev python2.7-dev libssl1.1 libffi7"
BOOTSTRAP="pip==20.3.4 setuptools==44.1.1 wheel==0.37.1"
PINNED="autobahntestsuite==25.10.1 autobahn==0.10.9 txaio==2.1.0 Twisted==19.10.0
zope.interface==4.6.0 incremental==16.10.1 constantly==15.1.0 Automat==22.10.0
attrs==21.4.0 hyperlink==21.0.0 idna==2.10 PyHamcrest==1.10.1 typing==3.10.0.0
six==1.16.0 pyOpenSSL==19.1.0 cryptography==3.3.2 cffi==1.15.1 pycparser==2.21
enum34==1.1.10 ipaddress==1.0.23 service-identity==18.1.0 pyasn1==0.5.1
pyasn1-modules==0.3.0 Jinja2==2.11.3 MarkupSafe==1.1.1 Werkzeug==1.0.1
klein==17.10.0 unittest2==1.1.0 linecache2==1.0.0 traceback2==1.4.0 ujson==2.0.3"
ACCEL="wsaccel==0.6.6" # C speed-up for UTF-8 checks and masking; optional

DEB_ROOT=$CACHE/py27 # the Debian 11 interpreter, when one is unpacked
STAMP=$CACHE/ready-$RECIPE # holds the interpreter's path
PY=""
# Runs Python 2.7 with the cache as its user site (pip --user installs there).
PYENV=(env -u PYTHONNOUSERSITE -u PYTHONPATH -u PYTHONHOME PYTHONUSERBASE="$CACHE/user"
  LD_LIBRARY_PATH="$DEB_ROOT/usr/lib/$(uname -m)-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  PIP_CACHE_DIR="$CACHE/pip-cache" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1)
py2() { "${PYENV[@]}" "$PY" "$@"; }
works() { [ -x "$PY" ] && py2 -c 'import sys, zlib; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; }

find_python2() {
  if [ -n "${AUTOBAHN_PYTHON2:-}" ]; then
    PY=$AUTOBAHN_PYTHON2
    works || die "AUTOBAHN_PYTHON2=$PY is not a working Python 2.7"
    return
  fi
  for PY in "$(command -v python2.7 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7; do
    works && return
  done
  PY=""
  return 1
}

# CPython 2.7 from Debian 11 packages, unpacked into $DEB_ROOT. The mirror is
# the one this host's apt sources name, so no host name is written here.
fetch_debian_python2() {
  { command -v apt-get && command -v dpkg; } >/dev/null ||
    die "no Python 2.7 here and no apt-get/dpkg to fetch one: set AUTOBAHN_PYTHON2"
  local apt=$CACHE/apt mirror
  mirror=$(grep -h -o -E 'https?://[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list 2>/dev/null | head -n 1) || true
  [ -n "$mirror" ] || die "no Debian mirror in this host's apt sources: set AUTOBAHN_PYTHON2"
  mkdir -p "$apt/parts" "$apt/lists/partial" "$apt/cache/archives/partial" "$CACHE/debs"
  : >"$apt/status"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} bullseye main" >"$apt/sources.list"
  cat >"$apt/apt.conf" <<EOF
Dir::Etc::SourceList "$apt/sources.list";
Dir::Etc::SourceParts "$apt/parts";
Dir::State::Lists "$apt/lists";
Dir::State::status "$apt/status";
Dir::Cache "$apt/cache";
Acquire::Languages "none";
APT::Sandbox::User "root";
EOF
  log "fetching Python 2.7 from Debian 11 packages (${mirror%/} bullseye)"
  APT_CONFIG=$apt/apt.conf apt-get -q -o Debug::NoLocking=1 update >>"$CACHE/setup.log" 2>&1 ||
    die "apt-get update for bullseye failed; see $CACHE/setup.log"
  # shellcheck disable=SC2086 # $DEBS is a list
  (cd "$CACHE/debs" && APT_CONFIG=$apt/apt.conf apt-get -q -o Debug::NoLocking=1 download $DEBS) \
    >>"$CACHE/setup.log" 2>&1 || die "apt-get download failed; see $CACHE/setup.log"
  for d in "$CACHE"/debs/*.deb; do dpkg -x "$d" "$DEB_ROOT"; done
  PY=$DEB_ROOT/usr/bin/python2.7
  works || die "the unpacked Debian python2.7 does not run"
}

build_env() {
  command -v python3 >/dev/null || die "python3 with pip is needed to fetch pip for Python 2.7"
  rm -rf "$CACHE/user" "$CACHE/wheels" "$CACHE/debs" "$CACHE/apt" "$DEB_ROOT" "$CACHE"/ready-*
  : >"$CACHE/setup.log"
  find_python2 || fetch_debian_python2
  log "Python 2.7: $PY; installing autobahntestsuite (pinned, from PyPI) into $CACHE"
  # shellcheck disable=SC2086 # $BOOTSTRAP and $PINNED are lists
  {
    PIP_CACHE_DIR="$CACHE/pip-cache" python3 -m pip download -q --no-deps --only-binary :all: \
      --python-version 2.7 --implementation py --abi none --platform any -d "$CACHE/wheels" $BOOTSTRAP &&
      py2 "$(ls "$CACHE"/wheels/pip-*.whl)/pip" install -q --user --no-warn-script-location \
        --no-index --find-links "$CACHE/wheels" $BOOTSTRAP &&
      py2 -m pip install -q --user --no-warn-script-location --no-deps $PINNED
  } >>"$CACHE/setup.log" 2>&1 || die "pip install failed; see $CACHE/setup.log"
  local inc=$DEB_ROOT/usr/include
  CFLAGS="-I$inc -I$inc/python2.7" py2 -m pip install -q --user --no-deps $ACCEL \
    >>"$CACHE/setup.log" 2>&1 || log "warning: $ACCEL did not build; wstest runs slower without it"
  py2 -c 'import autobahntestsuite.fuzzing' >>"$CACHE/setup.log" 2>&1 ||
    die "autobahntestsuite does not import; see $CACHE/setup.log"
  echo "$PY" >"$STAMP"
}

# Set up once, under a lock: concurrent runs wait for the first one.
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if ! { [ -f "$STAMP" ] && PY=$(cat "$STAMP") && works; }; then
  t0=$SECONDS
  build_env
  log "set up in $((SECONDS - t0)) s"
fi
flock -u 9
if [ "$SETUP_ONLY" = 1 ]; then log "ready: $PY, $CACHE"; exit 0; fi

URL=${POS[0]}
OUT=${POS[1]}
case "$URL" in ws://*|wss://*) ;; *) die "WS_URL must start with ws:// or wss://" ;; esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/reports"
python3 - "$OUT" "$URL" "$CASES" <<'EOF'
import json, sys
out, url, cases = sys.argv[1:]
spec = {"outdir": out + "/reports", "servers": [{"agent": "corecast", "url": url}],
        "cases": [c for c in cases.replace(",", " ").split() if c], "exclude-cases": [], "exclude-agent-cases": {}}
json.dump(spec, open(out + "/spec.json", "w"), indent=2)
EOF
# The case ids the spec selects, by wstest's own matching: a case that never
# reports counts as failed.
py2 - "$OUT/spec.json" >"$OUT/expected.json" <<'EOF'
import json, sys
from autobahntestsuite.caseset import CaseSet
from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories, CaseSetname, CaseBasename
cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
print(json.dumps([c for c in cs.parseSpecCases(json.load(open(sys.argv[1]))) if c in cs.CasesIndices]))
EOF
log "wstest against $URL: $CASES (log: $OUT/wstest.log)"
t0=$SECONDS
rc=0
(cd "$OUT" && timeout --kill-after=15 "$TIMEOUT" "${PYENV[@]}" "$PY" "$CACHE/user/bin/wstest" \
  -m fuzzingclient -s spec.json >wstest.log 2>&1) || rc=$?
log "wstest finished in $((SECONDS - t0)) s (exit $rc)"

python3 - "$OUT" "$rc" <<'EOF'
import json, os, sys
out, rc = sys.argv[1], int(sys.argv[2])
expected = json.load(open(out + "/expected.json"))
results = {}
if os.path.exists(out + "/reports/index.json"):
    for agent in json.load(open(out + "/reports/index.json")).values():
        results.update(agent)
key = lambda c: tuple(int(x) for x in c.split("."))
bad = []
for c in sorted(set(expected) | set(results), key=key):
    r = results.get(c)
    if r is None:
        ok, why = False, "did not run"
    else:
        b, bc = r.get("behavior"), r.get("behaviorClose")
        ok = b in ("OK", "NON-STRICT", "INFORMATIONAL") and bc in ("OK", "INFORMATIONAL")
        why = "behavior=%s close=%s" % (b, bc)
    print("%-9s %s  %s" % (c, "pass" if ok else "FAIL", why))
    if not ok:
        bad.append("%s (%s)" % (c, why))
if rc:
    print("wstest exited %d%s" % (rc, " (timed out)" if rc in (124, 137) else ""))
for b in bad[:20]:
    print("failed: " + b)
if len(bad) > 20:
    print("failed: ... and %d more" % (len(bad) - 20))
print("%d passed, %d failed" % (len(set(expected) | set(results)) - len(bad), len(bad)))
sys.exit(1 if bad else 0)
EOF
