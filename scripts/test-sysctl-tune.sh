#!/usr/bin/env bash
# scripts/test-sysctl-tune.sh - tests for scripts/sysctl-tune.sh.
#
# Never touches the running kernel or /etc: every --apply/--revert uses a temporary
# --sysctl-dir/--limits-dir and a fake sysctl that only records its arguments; the
# sysctl values come from fake /proc/sys trees (PROC_SYS).  The only run against the
# real /proc/sys is a read-only --check.  Prints "N passed, M failed"; exit 1 on failure.
# The assertions are passed to eval in single quotes on purpose (expanded when run):
# shellcheck disable=SC2016
set -uo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TUNE=$HERE/sysctl-tune.sh
T=$(mktemp -d "${TMPDIR:-/tmp}/test-sysctl-tune.XXXXXX")
trap 'rm -rf -- "$T"' EXIT

# Safety net: anything that would call sysctl gets the recorder instead.
cat >"$T/fake-sysctl" <<EOF
#!/usr/bin/env bash
printf '%s\n' "\$*" >>"$T/sysctl-calls"
EOF
chmod +x "$T/fake-sysctl"
export SYSCTL=$T/fake-sysctl
export SYSTEMCTL=false          # no systemd unit unless a test says otherwise
export MEMINFO=$T/no-meminfo    # no RAM note unless a test says otherwise

PASS=0 FAIL=0
OUT='' RC=0
ok() {
	PASS=$((PASS + 1))
	printf 'ok   %s\n' "$1"
}
bad() {
	FAIL=$((FAIL + 1))
	printf 'FAIL %s\n' "$1"
	printf '%s\n' "$OUT" | sed -n '1,60s/^/     | /p'
}
# t NAME COMMAND...: pass if COMMAND succeeds
t() {
	local name=$1
	shift
	if "$@"; then ok "$name"; else bad "$name"; fi
}
run() {
	OUT=$("$@" 2>&1)
	RC=$?
}
rc_is() { [[ $RC == "$1" ]]; }
has() { grep -Eq -- "$1" <<<"$OUT"; }
hasnt() { ! grep -Eq -- "$1" <<<"$OUT"; }
# status_is STATUS SETTING: the --check line for SETTING has STATUS
status_is() {
	local st=${1//+/\\+} key=${2//./\\.}
	key=${key//(/\\(}
	key=${key//)/\\)}
	grep -Eq "^$st +$key " <<<"$OUT"
}

# put TREE KEY VALUE: write a fake /proc/sys entry
put() {
	local f=$1/${2//.//}
	mkdir -p "$(dirname "$f")"
	printf '%s\n' "$3" >"$f"
}
limits_file() { # FILE NOFILE_SOFT NOFILE_HARD MEMLOCK_SOFT MEMLOCK_HARD
	cat >"$1" <<EOF
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            $2                   $3                   files
Max locked memory         $4                   $5                   bytes
EOF
}

# --- a host nobody tuned (and an old kernel, and io_uring switched off)
LOW=$T/low
while read -r k v; do put "$LOW" "$k" "$v"; done <<'EOF'
kernel.osrelease 5.10.0-old
fs.file-max 100000
fs.nr_open 1048576
fs.epoll.max_user_watches 100000
vm.max_map_count 65530
net.core.somaxconn 128
net.ipv4.tcp_max_syn_backlog 512
net.ipv4.tcp_syncookies 0
net.core.netdev_max_backlog 1000
net.ipv4.tcp_tw_reuse 2
net.ipv4.tcp_fin_timeout 60
net.ipv4.tcp_max_orphans 16384
net.ipv4.tcp_mem 1000 2000 3000
net.ipv4.tcp_rmem 4096 131072 6291456
net.ipv4.tcp_wmem 4096 16384 4194304
net.core.rmem_max 212992
net.core.wmem_max 212992
net.core.rmem_default 212992
net.core.wmem_default 16777216
net.ipv4.tcp_slow_start_after_idle 1
net.ipv4.tcp_keepalive_time 7200
net.ipv4.tcp_keepalive_intvl 75
net.ipv4.tcp_keepalive_probes 9
kernel.io_uring_disabled 2
EOF
printf '32768\t60999\n' >"$LOW/net/ipv4/ip_local_port_range" # the kernel separates with a tab
limits_file "$T/limits-low" 1024 4096 65536 65536
# (no net/netfilter: nf_conntrack not loaded)

# --- a host tuned for 1m (some values better than the profile)
GOOD=$T/good
while read -r k v; do put "$GOOD" "$k" "$v"; done <<'EOF'
kernel.osrelease 6.8.0-test
fs.file-max 9223372036854775807
fs.nr_open 1073741816
fs.epoll.max_user_watches 5491511
vm.max_map_count 1048576
net.core.somaxconn 65535
net.ipv4.tcp_max_syn_backlog 65535
net.ipv4.tcp_syncookies 1
net.core.netdev_max_backlog 65536
net.ipv4.ip_local_port_range 1024 65535
net.ipv4.tcp_tw_reuse 1
net.ipv4.tcp_fin_timeout 10
net.ipv4.tcp_max_orphans 1048576
net.ipv4.tcp_mem 1048576 2097152 4194304
net.ipv4.tcp_rmem 4096 16384 33554432
net.ipv4.tcp_wmem 4096 16384 4194304
net.core.rmem_max 16777216
net.core.wmem_max 4194304
net.core.rmem_default 212992
net.core.wmem_default 212992
net.ipv4.tcp_slow_start_after_idle 0
net.ipv4.tcp_keepalive_time 60
net.ipv4.tcp_keepalive_intvl 30
net.ipv4.tcp_keepalive_probes 4
net.netfilter.nf_conntrack_max 4194304
net.netfilter.nf_conntrack_buckets 1048576
kernel.io_uring_disabled 0
EOF
limits_file "$T/limits-good" 1048576 1048576 unlimited unlimited

lowenv() { PROC_SYS=$LOW PROC_LIMITS=$T/limits-low "$@"; }
goodenv() { PROC_SYS=$GOOD PROC_LIMITS=$T/limits-good "$@"; }

# ------------------------------------------------------------------ usage
run "$TUNE" --help
t "--help exits 0 and documents --report-only" eval 'rc_is 0 && has -- "--report-only" && has "PROC_SYS"'
run "$TUNE" --no-such-flag
t "unknown option exits 2" rc_is 2
run goodenv "$TUNE" --check --profile 10m
t "unknown profile exits 2" rc_is 2
run goodenv "$TUNE" --check --revert
t "two modes exit 2" rc_is 2

# ------------------------------------------------------------------ --check, low values
run lowenv "$TUNE" --check
t "--check on an untuned host exits 1" rc_is 1
t "  somaxconn 128 is LOW" status_is LOW net.core.somaxconn
t "  tcp_max_syn_backlog is LOW (syncookies off)" status_is LOW net.ipv4.tcp_max_syn_backlog
t "  fs.file-max is LOW" status_is LOW fs.file-max
t "  tcp_mem triple below in every element is LOW" status_is LOW net.ipv4.tcp_mem
t "  tcp_rmem default 131072 > 16384 is HIGH" status_is HIGH net.ipv4.tcp_rmem
t "  tcp_wmem at the recommendation is OK" status_is OK net.ipv4.tcp_wmem
t "  wmem_default 16M (upper bound) is HIGH" status_is HIGH net.core.wmem_default
t "  tcp_fin_timeout 60 (upper bound) is HIGH" status_is HIGH net.ipv4.tcp_fin_timeout
t "  port range 32768-60999 (tab-separated) is LOW by width" eval 'status_is LOW net.ipv4.ip_local_port_range && has "width 28232 < 55536"'
t "  tcp_tw_reuse 2 is DIFF" status_is DIFF net.ipv4.tcp_tw_reuse
t "  tcp_slow_start_after_idle 1 is DIFF" status_is DIFF net.ipv4.tcp_slow_start_after_idle
t "  io_uring_disabled 2 is DIFF" status_is DIFF kernel.io_uring_disabled
t "  nofile soft/hard from the limits file are LOW" eval 'status_is LOW "nofile soft ($T/limits-low)" && status_is LOW "nofile hard ($T/limits-low)"'
t "  memlock is LOW (fails) on kernel 5.10" status_is LOW "memlock soft ($T/limits-low)"
t "  missing nf_conntrack keys are n/a" eval 'status_is n/a net.netfilter.nf_conntrack_max && status_is n/a net.netfilter.nf_conntrack_buckets'
t "  LimitNOFILE is n/a without systemd" status_is n/a "LimitNOFILE (corecast.service)"
t "  prints the systemd LimitNOFILE requirement" has "LimitNOFILE=262144"
t "  summary line counts" has "^summary: [0-9]+ OK, [0-9]+ LOW, [0-9]+ HIGH, [0-9]+ DIFF, [0-9]+ WARN, 5 n/a$"
run lowenv "$TUNE" --check --report-only
t "--check --report-only exits 0 but still reports LOW" eval 'rc_is 0 && status_is LOW net.core.somaxconn && has "report-only"'

# ------------------------------------------------------------------ --check, good values
run goodenv "$TUNE" --check
t "--check on a tuned host exits 0 (100k)" eval 'rc_is 0 && has "^result: OK" && hasnt "^(LOW|HIGH|DIFF|WARN)"'
t "  fs.file-max = 2^63-1 compares without overflow" status_is OK fs.file-max
t "  unlimited memlock is OK" status_is OK "memlock hard ($T/limits-good)"
run goodenv "$TUNE" --check --profile 1m
t "--check on a tuned host exits 0 (1m)" eval 'rc_is 0 && hasnt "^(LOW|HIGH|DIFF|WARN)"'
run goodenv "$TUNE" --check --profile=1M
t "--profile=1M (case-insensitive) works" rc_is 0

rm -r "$GOOD/net/netfilter"
run goodenv "$TUNE" --check --profile 1m
t "missing keys (conntrack) stay n/a and do not fail" eval 'rc_is 0 && status_is n/a net.netfilter.nf_conntrack_max'

put "$GOOD" net.ipv4.tcp_rmem "8192 16384 33554432"
put "$GOOD" net.ipv4.tcp_mem "1048576 2097152 4194303"
run goodenv "$TUNE" --check --profile 1m
t "triples compare element-wise (rmem min too big, tcp_mem max 1 short)" eval 'rc_is 1 && status_is HIGH net.ipv4.tcp_rmem && status_is LOW net.ipv4.tcp_mem && has "max 4194303 not >= 4194304"'
put "$GOOD" net.ipv4.tcp_rmem "4096 16384 33554432"
put "$GOOD" net.ipv4.tcp_mem "1048576 2097152 4194304"

put "$GOOD" net.ipv4.tcp_max_syn_backlog 2048
run goodenv "$TUNE" --check --profile 1m
t "low tcp_max_syn_backlog with syncookies on is WARN and does not fail" eval 'rc_is 0 && status_is WARN net.ipv4.tcp_max_syn_backlog'
put "$GOOD" net.ipv4.tcp_max_syn_backlog 65535

limits_file "$T/limits-lowmem" 1048576 1048576 65536 65536
run env PROC_SYS="$GOOD" PROC_LIMITS="$T/limits-lowmem" "$TUNE" --check --profile 1m
t "low memlock on kernel >= 5.12 is WARN and does not fail" eval 'rc_is 0 && status_is WARN "memlock soft ($T/limits-lowmem)"'

cat >"$T/fake-systemctl" <<'EOF'
#!/usr/bin/env bash
printf 'LimitNOFILE=%s\nLimitNOFILESoft=%s\nLimitMEMLOCK=infinity\nLoadState=loaded\n' \
	"${FAKE_NOFILE:-524288}" "${FAKE_NOFILE:-1024}"
EOF
chmod +x "$T/fake-systemctl"
run env SYSTEMCTL="$T/fake-systemctl" PROC_SYS="$GOOD" PROC_LIMITS="$T/limits-good" "$TUNE" --check --unit corecast.service
t "unit with systemd's default nofile (524288 hard, 1024 soft) is LOW" eval 'rc_is 1 && status_is OK "LimitNOFILE (corecast.service)" && status_is LOW "LimitNOFILESoft (corecast.service)" && status_is OK "LimitMEMLOCK (corecast.service)"'
run env FAKE_NOFILE=1048576 SYSTEMCTL="$T/fake-systemctl" PROC_SYS="$GOOD" PROC_LIMITS="$T/limits-good" "$TUNE" --check --profile 1m
t "unit LimitNOFILE=1048576 is OK for 1m" eval 'rc_is 0 && status_is OK "LimitNOFILE (corecast.service)" && status_is OK "LimitNOFILESoft (corecast.service)"'

printf 'MemTotal:        8000000 kB\n' >"$T/meminfo"
run env MEMINFO="$T/meminfo" PROC_SYS="$GOOD" PROC_LIMITS="$T/limits-good" "$TUNE" --check --profile 1m
t "1m profile on an 8 GB host notes the tcp_mem ceiling" eval 'rc_is 0 && has "^note: profile 1m lets TCP buffers grow to 16384 MiB"'

# ------------------------------------------------------------------ --apply / --revert
SD=$T/sysctl.d LD=$T/limits.d
mkdir -p "$SD" "$LD"
CONF=$SD/60-corecast.conf LCONF=$LD/60-corecast.conf
rm -f "$T/sysctl-calls"

run lowenv "$TUNE" --dry-run --sysctl-dir "$SD" --limits-dir "$LD"
t "--dry-run prints the file and writes nothing" eval 'rc_is 0 && has "would write $CONF" && has "net.core.somaxconn = 16384" && [[ ! -e $CONF && ! -e $LCONF && ! -e $T/sysctl-calls ]]'

run lowenv "$TUNE" --apply --sysctl-dir "$SD" --limits-dir "$LD"
t "--apply exits 0 and runs '\$SYSCTL -p FILE'" eval 'rc_is 0 && [[ $(cat "$T/sysctl-calls") == "-p $CONF" ]]'
cat >"$T/expected.conf" <<'EOF'
# 60-corecast.conf - generated by corecast scripts/sysctl-tune.sh --apply --profile 100k
# Sized for 131072 connections.  Do not edit: re-run the script to regenerate, --revert to
# remove.  Values are the profile's recommendation, or this host's own value where that was
# already better (the script never lowers a limit).  Why each one matters: tuning.md.

# file handles
fs.file-max = 524288
fs.nr_open = 1048576
fs.epoll.max_user_watches = 262144
vm.max_map_count = 262144

# queues
net.core.somaxconn = 16384
net.ipv4.tcp_max_syn_backlog = 16384
net.ipv4.tcp_syncookies = 1
net.core.netdev_max_backlog = 16384

# ports
net.ipv4.ip_local_port_range = 10000 65535
net.ipv4.tcp_tw_reuse = 1
net.ipv4.tcp_fin_timeout = 15
net.ipv4.tcp_max_orphans = 131072

# memory
net.ipv4.tcp_mem = 131072 262144 524288
net.ipv4.tcp_rmem = 4096 16384 6291456
net.ipv4.tcp_wmem = 4096 16384 4194304
net.core.rmem_max = 4194304
net.core.wmem_max = 4194304
net.core.rmem_default = 212992
net.core.wmem_default = 212992

# tcp behaviour
net.ipv4.tcp_slow_start_after_idle = 0
net.ipv4.tcp_keepalive_time = 120
net.ipv4.tcp_keepalive_intvl = 30
net.ipv4.tcp_keepalive_probes = 4

# conntrack
# net.netfilter.nf_conntrack_max = 262144  (not set: nf_conntrack not loaded (or not in this netns) when generated)
# net.netfilter.nf_conntrack_buckets = 65536  (not set: nf_conntrack not loaded (or not in this netns) when generated)

# io_uring
# kernel.io_uring_disabled: not managed here (a security policy decision); corecast needs 0
EOF
OUT=$(diff -u "$T/expected.conf" "$CONF" 2>&1)
t "--apply writes the expected sysctl.d file" eval '[[ -z $OUT ]]'
OUT=$(cat "$LCONF" 2>&1)
t "--apply writes the nofile limits hint" eval 'has "^\*     hard  nofile  262144$" && has "^root  soft  nofile  262144$"'
t "  sysctl.d file is mode 0644" eval '[[ $(stat -c %a "$CONF") == 644 ]]'
cp "$CONF" "$T/first.conf"
cp "$LCONF" "$T/first-limits.conf"

run lowenv "$TUNE" --apply --sysctl-dir "$SD" --limits-dir "$LD"
t "second --apply is a no-op: byte-identical files" eval 'rc_is 0 && cmp -s "$CONF" "$T/first.conf" && cmp -s "$LCONF" "$T/first-limits.conf" && has "unchanged: $CONF"'
t "  and it re-applies (sysctl -p ran twice)" eval '[[ $(grep -c -- "-p $CONF" "$T/sysctl-calls") == 2 ]]'
t "  and leaves no temp files behind" eval '[[ $(find "$SD" "$LD" -type f | wc -l) == 2 ]]'

run lowenv "$TUNE" --dry-run --sysctl-dir "$SD" --limits-dir "$LD"
t "--dry-run after --apply says identical" has "identical to the existing file"

run goodenv "$TUNE" --apply --profile 100k --sysctl-dir "$SD" --no-limits
t "--apply never lowers better host values" eval 'rc_is 0 && grep -qx "fs.file-max = 9223372036854775807" "$CONF" && grep -qx "net.ipv4.tcp_fin_timeout = 10" "$CONF" && grep -qx "net.ipv4.tcp_rmem = 4096 16384 33554432" "$CONF" && grep -qx "net.ipv4.ip_local_port_range = 1024 65535" "$CONF"'

run env SYSCTL=false PROC_SYS="$LOW" PROC_LIMITS="$T/limits-low" "$TUNE" --apply --sysctl-dir "$SD" --limits-dir "$LD"
t "a failing 'sysctl -p' makes --apply exit 1 (file stays)" eval 'rc_is 1 && [[ -f $CONF ]]'

run lowenv "$TUNE" --apply --sysctl-dir "$T/does-not-exist" --limits-dir "$LD"
t "--apply into a missing directory exits 1" rc_is 1

run "$TUNE" --revert --dry-run --sysctl-dir "$SD" --limits-dir "$LD"
t "--revert --dry-run removes nothing" eval 'rc_is 0 && has "would remove: $CONF" && [[ -f $CONF && -f $LCONF ]]'
run "$TUNE" --revert --sysctl-dir "$SD" --limits-dir "$LD"
t "--revert removes both files and explains reboot / sysctl --system" eval 'rc_is 0 && [[ ! -e $CONF && ! -e $LCONF ]] && has "reboot" && has "sysctl --system"'
run "$TUNE" --revert --sysctl-dir "$SD" --limits-dir "$LD"
t "--revert again is a no-op with exit 0" eval 'rc_is 0 && has "^nothing to revert"'

# ------------------------------------------------------------------ the real /proc/sys (read-only)
run env -u PROC_SYS -u PROC_LIMITS -u MEMINFO -u SYSTEMCTL "$TUNE" --check --profile 1m --report-only
t "--check --profile 1m --report-only on this machine exits 0" rc_is 0
missing=()
for k in fs.file-max fs.nr_open 'nofile soft' 'nofile hard' LimitNOFILE LimitNOFILESoft \
	fs.epoll.max_user_watches vm.max_map_count \
	net.core.somaxconn net.ipv4.tcp_max_syn_backlog net.ipv4.tcp_syncookies net.core.netdev_max_backlog \
	net.ipv4.ip_local_port_range net.ipv4.tcp_tw_reuse net.ipv4.tcp_fin_timeout net.ipv4.tcp_max_orphans \
	net.ipv4.tcp_mem net.ipv4.tcp_rmem net.ipv4.tcp_wmem net.core.rmem_max net.core.wmem_max \
	net.core.rmem_default net.core.wmem_default net.ipv4.tcp_slow_start_after_idle \
	net.ipv4.tcp_keepalive_time net.ipv4.tcp_keepalive_intvl net.ipv4.tcp_keepalive_probes \
	net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_buckets kernel.io_uring_disabled \
	'memlock soft' 'memlock hard' LimitMEMLOCK; do
	grep -Eq "^(OK|LOW|HIGH|DIFF|WARN|n/a|HIGH\+LOW) +${k//./\\.}( |$)" <<<"$OUT" || missing+=("$k")
done
t "  it prints every setting with a status (missing: ${missing[*]:-none})" eval '((${#missing[@]} == 0))'
REAL=$OUT
run env -u PROC_SYS -u PROC_LIMITS -u MEMINFO -u SYSTEMCTL "$TUNE" --check --profile 1m
t "  plain --check there exits 0 or 1 (never 2)" eval '[[ $RC == 0 || $RC == 1 ]]'

if command -v shellcheck >/dev/null 2>&1; then
	run shellcheck "$TUNE" "$HERE/test-sysctl-tune.sh"
	t "shellcheck is clean" rc_is 0
else
	echo "skip shellcheck (not installed)"
fi

echo
echo "--- --check --profile 1m --report-only on this machine:"
printf '%s\n' "$REAL"
echo
echo "$PASS passed, $FAIL failed"
((FAIL == 0))
