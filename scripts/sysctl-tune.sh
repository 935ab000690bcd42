#!/usr/bin/env bash
# scripts/sysctl-tune.sh - check, apply or revert the Linux host settings corecast
# needs for 100k-1M WebSocket connections per node.
#
#   scripts/sysctl-tune.sh --check --profile 1m       # report; exit 1 if something is short
#   scripts/sysctl-tune.sh --check --report-only      # report; always exit 0 (CI)
#   sudo scripts/sysctl-tune.sh --apply --profile 1m  # write /etc/sysctl.d/60-corecast.conf + apply
#   sudo scripts/sysctl-tune.sh --revert              # remove what --apply wrote
#
# Why each value is what it is: tuning.md.  Usage: --help.
set -euo pipefail
export LC_ALL=C

PROG=${0##*/}
PROC_SYS=${PROC_SYS:-/proc/sys}          # override for tests: a fake /proc/sys tree
SYSCTL=${SYSCTL:-sysctl}                 # override for tests: SYSCTL=true or a recorder
SYSTEMCTL=${SYSTEMCTL:-systemctl}        # override for tests: SYSTEMCTL=false
PROC_LIMITS=${PROC_LIMITS:-}             # override for tests: a file in /proc/PID/limits format
MEMINFO=${MEMINFO:-/proc/meminfo}

CONF_NAME=60-corecast.conf

usage() {
	cat <<EOF
Usage: $PROG [--check | --apply | --revert] [options]

Checks, applies or reverts the kernel and resource-limit settings corecast needs for
many concurrent WebSocket connections.  Explanations of every value: tuning.md.

Modes (default: --check):
  --check            Print every setting with its current value, the recommended value and
                     a status, then a summary.  Exit 0 if nothing is short, 1 otherwise.
  --apply            Write <sysctl-dir>/$CONF_NAME and apply it with '\$SYSCTL -p FILE';
                     also write the nofile limits hint <limits-dir>/$CONF_NAME.
                     Never lowers a value the host already has above the recommendation,
                     and never changes kernel.io_uring_disabled (only reports it).
                     Idempotent: re-running with the same profile writes the same bytes.
  --revert           Remove the files --apply wrote.  No-op (exit 0) if there are none.
  --dry-run, -n      With --apply/--revert: print what would be written/removed, change
                     nothing.  On its own it means --apply --dry-run.

Options:
  --profile P        100k (default) or 1m: the number of connections to size for.
  --report-only      With --check: always exit 0 (for CI and inventory runs).
  --sysctl-dir DIR   Where --apply/--revert put $CONF_NAME (default /etc/sysctl.d).
  --limits-dir DIR   Where the pam_limits hint goes (default /etc/security/limits.d;
                     --sysctl-dir does not move it).
  --no-limits        Do not write/remove the limits hint.
  --pid PID          Check the resource limits of a running process (/proc/PID/limits)
                     instead of this shell's (ulimit -n / -l).
  --unit NAME        systemd unit whose LimitNOFILE/LimitMEMLOCK to check
                     (default corecast.service; n/a when systemd is not running).
  -h, --help         This text.

Statuses: OK; LOW / HIGH (value below / above the recommended bound); DIFF (must be
exactly the recommended value); WARN (short but harmless here - memlock on kernels
>= 5.12, tcp_max_syn_backlog while syncookies are on - does not fail the check);
n/a (key not present, e.g. nf_conntrack not loaded or not in this network namespace,
or systemd not running - does not fail the check).

Exit codes: 0 ok; 1 a setting is short (--check) or applying failed; 2 usage error.

Environment (mainly for tests): PROC_SYS (default /proc/sys), SYSCTL (default sysctl,
may contain arguments, e.g. SYSCTL=true), SYSTEMCTL (default systemctl; a single
command), PROC_LIMITS (a file in /proc/PID/limits format), MEMINFO (default
/proc/meminfo).
EOF
}

die_usage() {
	printf '%s: %s\n' "$PROG" "$*" >&2
	printf "Try '%s --help'.\n" "$PROG" >&2
	exit 2
}
die() {
	printf '%s: error: %s\n' "$PROG" "$*" >&2
	exit 1
}

# ---------------------------------------------------------------- arguments
mode=
profile=100k
dry_run=0
report_only=0
sysctl_dir=/etc/sysctl.d
limits_dir=/etc/security/limits.d
limits_dir_set=0
no_limits=0
pid=
unit=corecast.service

set_mode() {
	[[ -z $mode || $mode == "$1" ]] || die_usage "use only one of --check, --apply, --revert"
	mode=$1
}
need_arg() {
	[[ $# -ge 2 && -n $2 ]] || die_usage "$1 needs a value"
}

while (($#)); do
	case $1 in
	--check) set_mode check ;;
	--apply) set_mode apply ;;
	--revert) set_mode revert ;;
	--dry-run | -n) dry_run=1 ;;
	--report-only) report_only=1 ;;
	--no-limits) no_limits=1 ;;
	--profile | --sysctl-dir | --limits-dir | --pid | --unit)
		need_arg "$@"
		case $1 in
		--profile) profile=$2 ;;
		--sysctl-dir) sysctl_dir=$2 ;;
		--limits-dir) limits_dir=$2 limits_dir_set=1 ;;
		--pid) pid=$2 ;;
		--unit) unit=$2 ;;
		esac
		shift
		;;
	--profile=*) profile=${1#*=} ;;
	--sysctl-dir=*) sysctl_dir=${1#*=} ;;
	--limits-dir=*) limits_dir=${1#*=} limits_dir_set=1 ;;
	--pid=*) pid=${1#*=} ;;
	--unit=*) unit=${1#*=} ;;
	-h | --help)
		usage
		exit 0
		;;
	*) die_usage "unknown argument: $1" ;;
	esac
	shift
done

if [[ -z $mode ]]; then
	if ((dry_run)); then mode=apply; else mode=check; fi
fi
profile=${profile,,}
[[ -z $pid || $pid =~ ^[0-9]+$ ]] || die_usage "--pid needs a numeric process id"
[[ -n $sysctl_dir && -n $limits_dir ]] || die_usage "empty directory"

# ---------------------------------------------------------------- profiles
# CONNS is the connection count a profile is sized for (a power of two at or above
# the nominal 100k / 1M).  The derivations are in tuning.md ("Profiles").
case $profile in
100k)
	CONNS=131072
	NOFILE=262144       # 2x CONNS: headroom is free
	FILE_MAX=524288     # 2x NOFILE: the rest of the system needs handles too
	QUEUE=16384         # somaxconn / tcp_max_syn_backlog
	NETDEV=16384
	CT_MAX=262144       # 2x CONNS
	;;
1m)
	CONNS=1048576
	NOFILE=1048576      # = kernel default fs.nr_open; 48,576 spare above 1,000,000
	FILE_MAX=2097152
	QUEUE=65535
	NETDEV=65536
	CT_MAX=2097152
	;;
*) die_usage "unknown profile '$profile' (use 100k or 1m)" ;;
esac
# tcp_mem is counted in pages, and a socket with anything queued is charged at least one
# page, so the thresholds are "pages per connection": 1 (low), 2 (pressure), 4 (max).
TCP_MEM="$CONNS $((2 * CONNS)) $((4 * CONNS))"
MEMLOCK=67108864        # 64 MiB, bytes (io_uring rings on kernels < 5.12)

# One row per setting: group|name|rule|recommended[|check-only]
#   name  sysctl key, or rlimit:<nofile|memlock>:<soft|hard>, or unit:<LimitXXX>
#   rule  ge (current >= rec), le (current <= rec), eq (current == rec),
#         width (port range: hi-lo+1 >= that of rec),
#         or per element for triples: op:label,op:label,op:label
#   check-only  reported by --check, never written by --apply
ROWS=(
	"file handles|fs.file-max|ge|$FILE_MAX"
	"file handles|fs.nr_open|ge|$NOFILE"
	"file handles|rlimit:nofile:soft|ge|$NOFILE"
	"file handles|rlimit:nofile:hard|ge|$NOFILE"
	"file handles|unit:LimitNOFILE|ge|$NOFILE"
	"file handles|unit:LimitNOFILESoft|ge|$NOFILE"
	"file handles|fs.epoll.max_user_watches|ge|$((2 * CONNS))"
	"file handles|vm.max_map_count|ge|262144"
	"queues|net.core.somaxconn|ge|$QUEUE"
	"queues|net.ipv4.tcp_max_syn_backlog|ge|$QUEUE"
	"queues|net.ipv4.tcp_syncookies|eq|1"
	"queues|net.core.netdev_max_backlog|ge|$NETDEV"
	"ports|net.ipv4.ip_local_port_range|width|10000 65535"
	"ports|net.ipv4.tcp_tw_reuse|eq|1"
	"ports|net.ipv4.tcp_fin_timeout|le|15"
	"ports|net.ipv4.tcp_max_orphans|ge|$CONNS"
	"memory|net.ipv4.tcp_mem|ge:low,ge:pressure,ge:max|$TCP_MEM"
	"memory|net.ipv4.tcp_rmem|le:min,le:default,ge:max|4096 16384 4194304"
	"memory|net.ipv4.tcp_wmem|le:min,le:default,ge:max|4096 16384 4194304"
	"memory|net.core.rmem_max|ge|4194304"
	"memory|net.core.wmem_max|ge|4194304"
	"memory|net.core.rmem_default|le|212992"
	"memory|net.core.wmem_default|le|212992"
	"tcp behaviour|net.ipv4.tcp_slow_start_after_idle|eq|0"
	"tcp behaviour|net.ipv4.tcp_keepalive_time|le|120"
	"tcp behaviour|net.ipv4.tcp_keepalive_intvl|le|30"
	"tcp behaviour|net.ipv4.tcp_keepalive_probes|le|4"
	"conntrack|net.netfilter.nf_conntrack_max|ge|$CT_MAX"
	"conntrack|net.netfilter.nf_conntrack_buckets|ge|$((CT_MAX / 4))"
	"io_uring|kernel.io_uring_disabled|eq|0|check-only"
	"io_uring|rlimit:memlock:soft|ge|$MEMLOCK"
	"io_uring|rlimit:memlock:hard|ge|$MEMLOCK"
	"io_uring|unit:LimitMEMLOCK|ge|$MEMLOCK"
)

# ---------------------------------------------------------------- helpers
# norm_num X: NUM = X without leading zeros, or "inf" for unlimited/infinity; 1 if not a number.
norm_num() {
	NUM=$1
	case $NUM in
	unlimited | infinity | inf) NUM=inf ;;
	*)
		[[ $NUM =~ ^[0-9]+$ ]] || return 1
		while [[ ${#NUM} -gt 1 && $NUM == 0* ]]; do NUM=${NUM#0}; done
		# RLIM_INFINITY as an unsigned 64-bit number
		[[ $NUM != 18446744073709551615 ]] || NUM=inf
		;;
	esac
}

# cmp_num A B (normalised): CMP = -1, 0 or 1.  String-based, so 64-bit values never overflow.
cmp_num() {
	local a=$1 b=$2
	if [[ $a == "$b" ]]; then
		CMP=0
	elif [[ $a == inf ]]; then
		CMP=1
	elif [[ $b == inf ]]; then
		CMP=-1
	elif ((${#a} != ${#b})); then
		if ((${#a} > ${#b})); then CMP=1; else CMP=-1; fi
	elif [[ $a > $b ]]; then
		CMP=1
	else
		CMP=-1
	fi
}

# judge OP CUR REC (normalised numbers): ST = OK|LOW|HIGH|DIFF, BEST = value --apply writes
judge() {
	cmp_num "$2" "$3"
	ST=OK BEST=$2
	case $1 in
	ge) if ((CMP < 0)); then ST=LOW BEST=$3; fi ;;
	le) if ((CMP > 0)); then ST=HIGH BEST=$3; fi ;;
	eq)
		if ((CMP < 0)); then ST=LOW; elif ((CMP > 0)); then ST=HIGH; fi
		BEST=$3
		;;
	esac
}

op_text() {
	case $1 in
	ge) OPT='>=' ;;
	le) OPT='<=' ;;
	eq) OPT='=' ;;
	*) OPT=$1 ;;
	esac
}

# read_sysctl KEY: VAL = the value with whitespace collapsed; 1 if the key does not exist.
read_sysctl() {
	local path=$PROC_SYS/${1//.//}
	local -a parts=()
	VAL=
	[[ -f $path && -r $path ]] || return 1
	read -r -a parts <"$path" || ((${#parts[@]})) || return 1
	((${#parts[@]})) || return 1
	VAL="${parts[*]}"
}

# Resource limits: from /proc/PID/limits (--pid), PROC_LIMITS, /proc/self/limits, or ulimit.
LIM_NOFILE_SOFT='' LIM_NOFILE_HARD='' LIM_MEMLOCK_SOFT='' LIM_MEMLOCK_HARD='' LIM_SRC=''
load_limits() {
	local file line rest
	local -a f
	if [[ -n $pid ]]; then
		file=/proc/$pid/limits
		[[ -r $file ]] || die "cannot read $file (no such process, or not permitted)"
		LIM_SRC="pid $pid"
	elif [[ -n $PROC_LIMITS ]]; then
		file=$PROC_LIMITS
		[[ -r $file ]] || die "cannot read PROC_LIMITS=$file"
		LIM_SRC="$file"
	else
		file=/proc/self/limits
		LIM_SRC="this shell"
	fi
	if [[ -r $file ]]; then
		while IFS='' read -r line; do
			case $line in
			"Max open files"*)
				rest=${line#Max open files}
				read -r -a f <<<"$rest"
				LIM_NOFILE_SOFT=${f[0]-} LIM_NOFILE_HARD=${f[1]-}
				;;
			"Max locked memory"*)
				rest=${line#Max locked memory}
				read -r -a f <<<"$rest"
				LIM_MEMLOCK_SOFT=${f[0]-} LIM_MEMLOCK_HARD=${f[1]-}
				;;
			esac
		done <"$file"
	else
		LIM_NOFILE_SOFT=$(ulimit -Sn) LIM_NOFILE_HARD=$(ulimit -Hn)
		LIM_MEMLOCK_SOFT=$(ulimit -Sl) LIM_MEMLOCK_HARD=$(ulimit -Hl)
		# ulimit -l is in KiB
		[[ $LIM_MEMLOCK_SOFT == unlimited ]] || LIM_MEMLOCK_SOFT=$((LIM_MEMLOCK_SOFT * 1024))
		[[ $LIM_MEMLOCK_HARD == unlimited ]] || LIM_MEMLOCK_HARD=$((LIM_MEMLOCK_HARD * 1024))
	fi
}

# systemd unit limits; UNIT_STATE explains n/a.
UNIT_NOFILE='' UNIT_NOFILE_SOFT='' UNIT_MEMLOCK='' UNIT_STATE=''
load_unit() {
	local out line load='' tmo=()
	UNIT_STATE="systemd not running"
	command -v "$SYSTEMCTL" >/dev/null 2>&1 || return 0
	if command -v timeout >/dev/null 2>&1; then tmo=(timeout 5); fi
	out=$("${tmo[@]}" "$SYSTEMCTL" show "$unit" --property=LoadState,LimitNOFILE,LimitNOFILESoft,LimitMEMLOCK 2>/dev/null) || return 0
	while IFS='' read -r line; do
		case $line in
		LoadState=*) load=${line#*=} ;;
		LimitNOFILE=*) UNIT_NOFILE=${line#*=} ;;
		LimitNOFILESoft=*) UNIT_NOFILE_SOFT=${line#*=} ;;
		LimitMEMLOCK=*) UNIT_MEMLOCK=${line#*=} ;;
		esac
	done <<<"$out"
	if [[ $load != loaded ]]; then
		UNIT_STATE="$unit not installed (${load:-unknown})"
		UNIT_NOFILE='' UNIT_NOFILE_SOFT='' UNIT_MEMLOCK=''
	else
		UNIT_STATE=''
	fi
}

# Kernel >= 5.12 charges io_uring rings to the memory cgroup, not RLIMIT_MEMLOCK.
MEMLOCK_MATTERS=1 KREL=
load_kernel() {
	read_sysctl kernel.osrelease || VAL=$(uname -r 2>/dev/null || true)
	KREL=$VAL
	if [[ $KREL =~ ^([0-9]+)\.([0-9]+) ]]; then
		local maj=${BASH_REMATCH[1]} min=${BASH_REMATCH[2]}
		if ((maj > 5 || (maj == 5 && min >= 12))); then MEMLOCK_MATTERS=0; fi
	fi
}

na_reason() {
	case $1 in
	net.netfilter.*) NA="nf_conntrack not loaded (or not in this netns)" ;;
	kernel.io_uring_disabled) NA="knob absent (kernel < 6.6): io_uring is on unless compiled out" ;;
	fs.*) NA="not present" ;;
	*) NA="not present (not in this network namespace?)" ;;
	esac
}

human_bytes() {
	local b=$1
	if [[ $b == inf ]]; then HB=unlimited; return; fi
	if ((${#b} > 18)); then HB="$b B"; return; fi
	if ((b >= 1073741824 && b % 1073741824 == 0)); then
		HB="$((b / 1073741824)) GiB"
	elif ((b >= 1048576 && b % 1048576 == 0)); then
		HB="$((b / 1048576)) MiB"
	elif ((b >= 1024 && b % 1024 == 0)); then
		HB="$((b / 1024)) KiB"
	else HB="$b B"; fi
}

# ---------------------------------------------------------------- evaluate
# Fills R_* arrays, one entry per ROWS line.
R_GROUP=() R_KEY=() R_FLAG=() R_LABEL=() R_CUR=() R_REC=() R_RECTXT=() R_ST=() R_NOTE=() R_BEST=()
N_OK=0 N_LOW=0 N_HIGH=0 N_DIFF=0 N_WARN=0 N_NA=0

evaluate() {
	local row group key rule rec flag cur label st note best recd i e
	local -a rules cparts rparts bests sts
	load_limits
	load_unit
	load_kernel
	for row in "${ROWS[@]}"; do
		IFS='|' read -r group key rule rec flag <<<"$row"
		label=$key cur='' st='' note='' best=''
		# ---- current value
		case $key in
		rlimit:*)
			local what=${key#rlimit:}
			case $what in
			nofile:soft) cur=$LIM_NOFILE_SOFT label="nofile soft ($LIM_SRC)" ;;
			nofile:hard) cur=$LIM_NOFILE_HARD label="nofile hard ($LIM_SRC)" ;;
			memlock:soft) cur=$LIM_MEMLOCK_SOFT label="memlock soft ($LIM_SRC)" ;;
			memlock:hard) cur=$LIM_MEMLOCK_HARD label="memlock hard ($LIM_SRC)" ;;
			esac
			[[ -n $cur ]] || st=n/a note="limit not readable"
			;;
		unit:*)
			label="${key#unit:} ($unit)"
			case $key in
			unit:LimitNOFILE) cur=$UNIT_NOFILE ;;
			unit:LimitNOFILESoft) cur=$UNIT_NOFILE_SOFT ;;
			unit:LimitMEMLOCK) cur=$UNIT_MEMLOCK ;;
			esac
			[[ -n $cur ]] || st=n/a note=${UNIT_STATE:-"not reported by $SYSTEMCTL"}
			;;
		*)
			if read_sysctl "$key"; then
				cur=$VAL
			else
				na_reason "$key"
				st=n/a note=$NA
			fi
			;;
		esac

		# ---- recommended, as text
		case $rule in
		ge | le | eq)
			op_text "$rule"
			recd="$OPT $rec"
			if [[ $key == rlimit:memlock:* || $key == unit:LimitMEMLOCK ]]; then
				human_bytes "$rec"
				recd+=" ($HB)"
			fi
			;;
		width)
			read -r -a rparts <<<"$rec"
			recd="$rec (width >= $((rparts[1] - rparts[0] + 1)))"
			;;
		*)
			IFS=',' read -r -a rules <<<"$rule"
			read -r -a rparts <<<"$rec"
			recd=
			for i in "${!rules[@]}"; do
				op_text "${rules[i]%%:*}"
				recd+="${recd:+ }$OPT${rparts[i]}"
			done
			;;
		esac

		# ---- compare
		if [[ -z $st ]]; then
			case $rule in
			ge | le | eq)
				if norm_num "$cur" && cur=$NUM && norm_num "$rec"; then
					judge "$rule" "$cur" "$NUM"
					st=$ST best=$BEST
					if [[ $rule == eq && $st != OK ]]; then st=DIFF; fi
				else
					st=n/a note="unparsable value"
				fi
				;;
			width)
				read -r -a cparts <<<"$cur"
				read -r -a rparts <<<"$rec"
				if ((${#cparts[@]} == 2)) && [[ ${cparts[0]}${cparts[1]} =~ ^[0-9]+$ ]]; then
					local cw=$((cparts[1] - cparts[0] + 1)) rw=$((rparts[1] - rparts[0] + 1))
					if ((cw >= rw)); then
						st=OK best=$cur
					else
						st=LOW best=$rec note="width $cw < $rw"
					fi
				else
					st=n/a note="unparsable value"
				fi
				;;
			*)
				IFS=',' read -r -a rules <<<"$rule"
				read -r -a cparts <<<"$cur"
				read -r -a rparts <<<"$rec"
				if ((${#cparts[@]} != ${#rules[@]})); then
					st=n/a note="expected ${#rules[@]} values"
				else
					bests=() sts=()
					for i in "${!rules[@]}"; do
						if ! norm_num "${cparts[i]}"; then
							sts=(n/a)
							break
						fi
						e=$NUM
						norm_num "${rparts[i]}"
						judge "${rules[i]%%:*}" "$e" "$NUM"
						bests+=("$BEST")
						if [[ $ST != OK ]]; then
							sts+=("$ST")
							op_text "${rules[i]%%:*}"
							note+="${note:+; }${rules[i]#*:} ${cparts[i]} not $OPT ${rparts[i]}"
						fi
					done
					if [[ ${sts[0]-} == n/a ]]; then
						st=n/a note="unparsable value"
					elif ((${#sts[@]} == 0)); then
						st=OK
					else
						# LOW and HIGH together read as HIGH+LOW
						st=$(printf '%s\n' "${sts[@]}" | sort -u | paste -sd+ -)
					fi
					best="${bests[*]}"
				fi
				;;
			esac
		fi

		# memlock only matters for io_uring on old kernels (or registered buffers)
		if [[ ($key == rlimit:memlock:* || $key == unit:LimitMEMLOCK) && $st == LOW ]] && ((!MEMLOCK_MATTERS)); then
			st=WARN note="kernel $KREL >= 5.12 does not charge io_uring rings to memlock"
		fi
		# the SYN queue is bounded by the listen backlog; tcp_max_syn_backlog only
		# applies while syncookies are off
		if [[ $key == net.ipv4.tcp_max_syn_backlog && $st == LOW ]] &&
			read_sysctl net.ipv4.tcp_syncookies && [[ $VAL == 1 || $VAL == 2 ]]; then
			st=WARN note="only used while net.ipv4.tcp_syncookies = 0"
		fi
		if [[ $key == rlimit:nofile:soft && $st == LOW && -z $pid ]]; then
			note="matters if corecast is started from this shell"
		fi

		case $st in
		OK) ((++N_OK)) ;;
		LOW) ((++N_LOW)) ;;
		HIGH) ((++N_HIGH)) ;;
		DIFF) ((++N_DIFF)) ;;
		WARN) ((++N_WARN)) ;;
		n/a) ((++N_NA)) ;;
		*) ((++N_LOW)) ;; # HIGH+LOW (a triple short at both ends) counts as LOW
		esac
		R_GROUP+=("$group") R_KEY+=("$key") R_FLAG+=("$flag") R_LABEL+=("$label") R_CUR+=("${cur:--}")
		R_REC+=("$rec") R_RECTXT+=("$recd") R_ST+=("$st") R_NOTE+=("$note") R_BEST+=("$best")
	done
}

# ---------------------------------------------------------------- --check
do_check() {
	local i last='' fails
	evaluate
	printf 'corecast host check: profile %s (sized for %s connections), sysctls from %s, kernel %s\n' \
		"$profile" "$CONNS" "$PROC_SYS" "${KREL:-unknown}"
	printf '%-9s %-40s %-24s %s\n' STATUS SETTING CURRENT RECOMMENDED
	for i in "${!R_KEY[@]}"; do
		if [[ ${R_GROUP[i]} != "$last" ]]; then
			printf -- '-- %s\n' "${R_GROUP[i]}"
			last=${R_GROUP[i]}
		fi
		printf '%-9s %-40s %-24s %s%s\n' "${R_ST[i]}" "${R_LABEL[i]}" "${R_CUR[i]}" \
			"${R_RECTXT[i]}" "${R_NOTE[i]:+  (${R_NOTE[i]})}"
	done
	fails=$((N_LOW + N_HIGH + N_DIFF))
	echo
	printf 'note: a systemd service ignores ulimit and limits.conf; corecast.service needs LimitNOFILE=%s (and LimitMEMLOCK=64M for io_uring on kernels < 5.12), see scripts/corecast.service\n' "$NOFILE"
	tcp_mem_note
	printf 'summary: %d OK, %d LOW, %d HIGH, %d DIFF, %d WARN, %d n/a\n' \
		"$N_OK" "$N_LOW" "$N_HIGH" "$N_DIFF" "$N_WARN" "$N_NA"
	if ((fails == 0)); then
		echo "result: OK for profile $profile"
		return 0
	fi
	echo "result: $fails setting(s) short for profile $profile - fix with: sudo $0 --apply --profile $profile (limits: see tuning.md)"
	if ((report_only)); then
		echo "(--report-only: exit 0)"
		return 0
	fi
	return 1
}

tcp_mem_note() {
	local line kb='' page max_b
	local -a f
	[[ -r $MEMINFO ]] || return 0
	while IFS='' read -r line; do
		case $line in MemTotal:*)
			read -r -a f <<<"${line#MemTotal:}"
			kb=${f[0]}
			;;
		esac
	done <"$MEMINFO"
	[[ $kb =~ ^[0-9]+$ ]] || return 0
	page=$(getconf PAGESIZE 2>/dev/null || echo 4096)
	max_b=$((4 * CONNS * page))
	if ((max_b > kb * 1024 / 4)); then
		printf 'note: profile %s lets TCP buffers grow to %d MiB (tcp_mem max) on a host with %d MiB RAM; plan RAM for it (tuning.md, "Memory arithmetic")\n' \
			"$profile" "$((max_b / 1048576))" "$((kb / 1024))"
	fi
}

# ---------------------------------------------------------------- --apply
TMPFILES=()
cleanup() {
	if ((${#TMPFILES[@]})); then rm -f -- "${TMPFILES[@]}"; fi
}
trap cleanup EXIT

sysctl_conf() { # print the sysctl.d file for the evaluated rows
	local i last='' key
	cat <<EOF
# $CONF_NAME - generated by corecast scripts/sysctl-tune.sh --apply --profile $profile
# Sized for $CONNS connections.  Do not edit: re-run the script to regenerate, --revert to
# remove.  Values are the profile's recommendation, or this host's own value where that was
# already better (the script never lowers a limit).  Why each one matters: tuning.md.
EOF
	for i in "${!R_KEY[@]}"; do
		key=${R_KEY[i]}
		case $key in rlimit:* | unit:*) continue ;; esac
		if [[ ${R_GROUP[i]} != "$last" ]]; then
			printf '\n# %s\n' "${R_GROUP[i]}"
			last=${R_GROUP[i]}
		fi
		if [[ ${R_FLAG[i]} == check-only ]]; then
			printf '# %s: not managed here (a security policy decision); corecast needs %s\n' "$key" "${R_REC[i]}"
		elif [[ ${R_ST[i]} == n/a ]]; then
			if [[ ${R_NOTE[i]} == "unparsable value" ]]; then
				printf '# %s: current value %s not understood; recommended %s\n' "$key" "${R_CUR[i]}" "${R_REC[i]}"
			else
				printf '# %s = %s  (not set: %s when generated)\n' "$key" "${R_REC[i]}" "${R_NOTE[i]}"
			fi
		else
			printf '%s = %s\n' "$key" "${R_BEST[i]}"
		fi
	done
}

limits_conf() {
	cat <<EOF
# $CONF_NAME - generated by corecast scripts/sysctl-tune.sh --apply --profile $profile
# pam_limits applies this to login sessions (ssh, su -, sudo -i): use it when corecast or
# corecast-bench is started from a shell.  It does NOT apply to systemd services: those need
# LimitNOFILE=$NOFILE in the unit (scripts/corecast.service).  '*' does not match root.
# A hard limit above fs.nr_open (kernel default 1048576) makes logins fail; $NOFILE is within it.
*     soft  nofile  $NOFILE
*     hard  nofile  $NOFILE
root  soft  nofile  $NOFILE
root  hard  nofile  $NOFILE
# io_uring on kernels < 5.12 charges ring memory to memlock (KiB here); uncomment if needed:
# *     -     memlock 65536
# root  -     memlock 65536
EOF
}

# install_file GENERATOR DIR: atomically write DIR/$CONF_NAME; leaves an identical file alone.
install_file() {
	local gen=$1 dir=$2 dest=$2/$CONF_NAME tmp
	tmp=$(mktemp "$dir/.$CONF_NAME.XXXXXX") || die "cannot create a file in $dir (run as root?)"
	TMPFILES+=("$tmp")
	"$gen" >"$tmp"
	if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
		rm -f -- "$tmp"
		echo "unchanged: $dest"
	else
		chmod 0644 "$tmp"
		mv -f -- "$tmp" "$dest"
		echo "wrote: $dest"
	fi
}

do_apply() {
	local -a sysctl_cmd
	local rc=0 want_limits=1 dest i
	evaluate
	read -r -a sysctl_cmd <<<"$SYSCTL"
	((${#sysctl_cmd[@]})) || die "SYSCTL is empty"
	[[ -d $sysctl_dir ]] || die "no such directory: $sysctl_dir"
	if ((no_limits)); then
		want_limits=0
	elif [[ ! -d $limits_dir ]]; then
		((limits_dir_set)) && die "no such directory: $limits_dir"
		echo "skipping the limits hint: $limits_dir does not exist (pam_limits not installed?)"
		want_limits=0
	fi

	if ((dry_run)); then
		dest=$sysctl_dir/$CONF_NAME
		echo "would write $dest:"
		sysctl_conf | sed 's/^/    /'
		if [[ -f $dest ]]; then
			if cmp -s <(sysctl_conf) "$dest"; then echo "(identical to the existing file)"; else echo "(replaces the existing file)"; fi
		fi
		echo "would run: ${sysctl_cmd[*]} -p $dest"
		if ((want_limits)); then
			echo "would write $limits_dir/$CONF_NAME:"
			limits_conf | sed 's/^/    /'
		fi
		return 0
	fi

	[[ -w $sysctl_dir ]] || die "cannot write $sysctl_dir (run as root, or use --sysctl-dir)"
	install_file sysctl_conf "$sysctl_dir"
	if ((want_limits)); then
		[[ -w $limits_dir ]] || die "cannot write $limits_dir (run as root, or use --limits-dir / --no-limits)"
		install_file limits_conf "$limits_dir"
	fi
	echo "running: ${sysctl_cmd[*]} -p $sysctl_dir/$CONF_NAME"
	"${sysctl_cmd[@]}" -p "$sysctl_dir/$CONF_NAME" || rc=$?
	if ((rc != 0)); then
		printf '%s: error: %s -p failed (exit %d). The file stays in place and systemd-sysctl applies it at boot;\n' \
			"$PROG" "${sysctl_cmd[0]}" "$rc" >&2
		printf '%s: keys rejected above must be set where they live (fs.* and nf_conntrack_buckets: on the host, not in a container).\n' "$PROG" >&2
		return 1
	fi
	for i in "${!R_KEY[@]}"; do
		if [[ ${R_FLAG[i]} == check-only && ${R_ST[i]} != OK && ${R_ST[i]} != n/a ]]; then
			echo "warning: ${R_KEY[i]} is ${R_CUR[i]}, corecast needs ${R_REC[i]}; --apply leaves it to you (see tuning.md)"
		fi
	done
	echo "applied.  Limits: new login sessions get nofile $NOFILE; a systemd service needs LimitNOFILE=$NOFILE (scripts/corecast.service)."
	echo "verify with: $0 --check --profile $profile"
}

# ---------------------------------------------------------------- --revert
do_revert() {
	local -a files=()
	local f removed=0
	files+=("$sysctl_dir/$CONF_NAME")
	((no_limits)) || files+=("$limits_dir/$CONF_NAME")
	for f in "${files[@]}"; do
		[[ -e $f ]] || continue
		if ((dry_run)); then
			echo "would remove: $f"
		else
			rm -f -- "$f" || die "cannot remove $f (run as root?)"
			echo "removed: $f"
		fi
		removed=$((removed + 1))
	done
	if ((removed == 0)); then
		if ((no_limits)); then
			echo "nothing to revert: no $CONF_NAME in $sysctl_dir"
		else
			echo "nothing to revert: no $CONF_NAME in $sysctl_dir or $limits_dir"
		fi
		return 0
	fi
	cat <<EOF
The running kernel keeps its current values until reboot; a reboot restores the defaults.
'sysctl --system' re-applies the other files in /etc/sysctl.d, /run/sysctl.d and
/usr/lib/sysctl.d (and /etc/sysctl.conf), which resets only keys those files set: keys
that only $CONF_NAME set keep their value until the next boot.
The nofile limits of new login sessions go back to the defaults at the next login.
EOF
}

if [[ $mode != revert && ! -d $PROC_SYS ]]; then
	die "PROC_SYS=$PROC_SYS is not a directory"
fi
case $mode in
check) do_check ;;
apply) do_apply ;;
revert) do_revert ;;
esac
