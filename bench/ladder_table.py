#!/usr/bin/env python3
"""Tables of the rate ladders (scripts/bench-redis-ceiling.sh, bench-core-ceiling.sh).

verdict JSON RATE P99_MS: "pass" or "fail" and what one step measured: it
passes with p99 <= P99_MS, nothing lost and at least 95% of RATE sent.
redis: stdin lines "RUN MODE NUMSUB LAST_PASSING_RATE"
core ROOM: stdin lines "RUN SYSTEM LAST_PASSING_RATE"
"""
import json
import statistics
import sys

if sys.argv[1] == "verdict":
    d = json.load(open(sys.argv[2]))
    rate, limit = float(sys.argv[3]), float(sys.argv[4])
    t, lat, g, srv = d["traffic"], d["latency"], d["generator"], d["server"]
    ok = lat["p99_us"] / 1000 <= limit and t["lost"] == 0 and t["sent_per_s"] >= 0.95 * rate
    per_cpu = t.get("received_per_server_cpu_s") or 0
    print(("pass" if ok else "fail"), f"sent/s {t['sent_per_s']:.0f} delivered/s {t['received_per_s']:.0f} "
          f"per-server-cpu-s {per_cpu:.0f} server-cpu {srv['cpu_with_drain_s']:.2f} s p50 {lat['p50_us'] / 1000:.2f} ms "
          f"p99 {lat['p99_us'] / 1000:.2f} ms lost {t['lost']} redis-cpu {d.get('redis_cpu_s') or 0:.2f} s "
          f"generator-worker-cpu {g['max_worker_cpu_pct']:.0f}%")
    sys.exit(0)

rows = [line.split() for line in sys.stdin if line.strip()]
if sys.argv[1] == "redis":
    by = {}
    for _run, mode, numsub, last in rows:
        by.setdefault(mode, []).append((int(last), numsub))
    print("| subscriptions | Redis messages per publish (NUMSUB) | last passing rate per run | median |")
    print("|---|---|---|---|")
    for mode in ("shard", "node"):
        if mode in by:
            v = by[mode]
            subs = ",".join(sorted({n for _, n in v}))
            runs = ", ".join(str(x) for x, _ in v)
            print(f"| one per {mode} | {subs} | {runs} | {statistics.median([x for x, _ in v]):.0f} |")
    if "shard" in by and "node" in by:
        a = statistics.median([x for x, _ in by["node"]])
        b = statistics.median([x for x, _ in by["shard"]])
        if b:
            print(f"\nper node / per shard: {a / b:.2f}x")
else:
    room = int(sys.argv[2])
    by = {}
    for _run, name, last in rows:
        by.setdefault(name, []).append(int(last))
    print("| system | last passing rate per run (msg/s) | median | deliveries/s at the median |")
    print("|---|---|---|---|")
    for name, v in by.items():
        m = statistics.median(v)
        print(f"| {name} | {', '.join(map(str, v))} | {m:.0f} | {m * room:.0f} |")
    if "corecast" in by and "uws" in by and statistics.median(by["uws"]):
        print(f"\ncorecast / uWS: {statistics.median(by['corecast']) / statistics.median(by['uws']):.2f}x")
