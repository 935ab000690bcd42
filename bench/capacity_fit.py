#!/usr/bin/env python3
"""The capacity model's fit and check (scripts/bench-capacity.sh, docs/capacity.md).

fit OUT RUNS HOST: reads the calibration runs OUT/k*.R.json, prints costs.json.
check OUT RUNS COSTS BENCH ENTRY...: for each check entry (as in the script),
the medians of its runs against `BENCH plan`'s prediction, as a Markdown table.

The features of a run follow bench/src/capacity.rs: members spread evenly
over nodes, at random over a node's shards; per second, P publishes, D
deliveries, X shard-messages (P x nodes with members x shards with members
per node), M Redis messages (P x nodes with members, x shards with members
without the relay or with one shard).
"""
import json
import statistics
import subprocess
import sys


def occupied(bins, balls):
    if bins <= 1:
        return 1.0 if balls > 0 else 0.0
    return bins * (1.0 - (1.0 - 1.0 / bins) ** balls)


def load(out, name, runs):
    rs = []
    for r in range(1, runs + 1):
        try:
            d = json.load(open(f"{out}/{name}.{r}.json"))
            d["extra"] = json.load(open(f"{out}/{name}.{r}.extra.json"))
            rs.append(d)
        except FileNotFoundError:
            pass
    if not rs:
        sys.exit(f"no runs of {name} in {out}")
    return rs


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else 0.0


def bench_arg(args, flag, default=None):
    return float(args[args.index(flag) + 1]) if flag in args else default


def features(d, args):
    """Per-second counts of one fanout run, and its measured CPU."""
    e, t, s = d["extra"], d["traffic"], d["server"]
    nodes, shards, primaries, mode = e["nodes"], e["shards"], e["primaries"], e["mode"]
    subs, rooms = bench_arg(args, "-s"), bench_arg(args, "--rooms")
    pubs = bench_arg(args, "-p")
    dur = t["duration_s"]
    size = subs / rooms
    n = min(size, nodes)
    occ = occupied(shards, size / n)
    p = t["sent"] / dur
    m = 0.0
    if primaries > 0:
        m = p * n * (occ if (mode == "shard" or shards == 1) else 1.0)
    return {
        "P": p,
        "D": t["received"] / dur,
        "X": p * n * occ,
        "M": m,
        "conns": subs + pubs,
        "cpu": s["cpu_with_drain_s"] / dur,
        "redis": (d.get("redis_cpu_s") or 0.0) / dur,
        "rss_before": s["rss_before_kb"] * 1024.0,
        "rss_ready": s["rss_ready_kb"] * 1024.0,
        "nodes": nodes,
        "loss": t["loss_pct"],
    }


def medians(out, name, runs, args):
    fs = [features(d, args) for d in load(out, name, runs)]
    return {k: med([f[k] for f in fs]) for k in fs[0]}


FIT_ARGS = {
    "k2-bigroom": "-s 1000 --rooms 1 -p 4",
    "k3-ones": "-s 500 --rooms 500 -p 40",
    "k4-sixes": "-s 3000 --rooms 500 -p 40",
    "k5-redis-ones": "-s 500 --rooms 500 -p 40",
    "k6-redis-threes": "-s 1500 --rooms 500 -p 40",
    "k7-cluster-threes": "-s 1500 --rooms 500 -p 40",
}


def solve2(a, b, c, d, y1, y2):
    """a x + b y = y1, c x + d y = y2."""
    det = a * d - b * c
    return (y1 * d - b * y2) / det, (a * y2 - c * y1) / det


def fit(out, runs, host):
    idle = load(out, "k1-idle", runs)
    idle_us = med([d["idle"]["server_cpu_us_per_conn_s"] for d in idle])
    conn_bytes = med([d["idle"]["server_rss_per_conn_bytes"] for d in idle])
    redis_idle = med([(d.get("redis_cpu_s") or 0.0) / d["idle"]["hold_s"] for d in idle])
    chan = med([(d["extra"]["redis_mem"] - d["extra"]["redis_mem0"]) / d["extra"]["channels"]
                for d in idle if d["extra"]["channels"] > 0])
    k = {n: medians(out, n, runs, a.split()) for n, a in FIT_ARGS.items()}
    us = lambda f: f["cpu"] * 1e6 - f["conns"] * idle_us  # noqa: E731
    # Standalone, one shard: X = P, so y = D d + P (x + p).
    d, s = solve2(k["k2-bigroom"]["D"], k["k2-bigroom"]["P"], k["k3-ones"]["D"], k["k3-ones"]["P"],
                  us(k["k2-bigroom"]), us(k["k3-ones"]))
    # Two shards, rooms of six: X > P separates x from p.
    k4 = k["k4-sixes"]
    x = (us(k4) - k4["D"] * d - k4["P"] * s) / (k4["X"] - k4["P"])
    p = s - x
    # Redis, rooms of one on one node and of three on three: M/P = 1 and 3.
    k5, k6 = k["k5-redis-ones"], k["k6-redis-threes"]
    r5 = us(k5) - k5["D"] * d - k5["X"] * x - k5["P"] * p
    r6 = us(k6) - k6["D"] * d - k6["X"] * x - k6["P"] * p
    rp, rm = solve2(k5["P"], k5["M"], k6["P"], k6["M"], r5, r6)
    # Redis's own idle CPU (one primary here) is not a publish's.
    cp, cm = solve2(k5["P"], k5["M"], k6["P"], k6["M"], (k5["redis"] - redis_idle) * 1e6, (k6["redis"] - redis_idle) * 1e6)
    # A cluster: the same work as k6 on 3 primaries; what Redis spends over
    # the single-server costs is the cluster's factor.
    k7 = k["k7-cluster-threes"]
    single = (k7["P"] * cp + k7["M"] * cm) / 1e6 + 3 * redis_idle
    cluster_factor = k7["redis"] / single if single > 0 else 1.0
    shard_base = k4["rss_before"] - k["k3-ones"]["rss_before"]
    costs = {
        "host": host,
        "delivery_us": d,
        "shard_message_us": x,
        "publish_us": p,
        "redis_publish_us": rp,
        "redis_message_us": rm,
        "idle_conn_us_per_s": idle_us,
        "conn_bytes": conn_bytes,
        "node_base_bytes": k["k3-ones"]["rss_before"] - shard_base,
        "shard_base_bytes": shard_base,
        "redis_shard_bytes": k5["rss_before"] - k["k3-ones"]["rss_before"],
        "redis_idle_cores": redis_idle,
        "redis_cpu_publish_us": cp,
        "redis_cpu_message_us": cm,
        "redis_channel_bytes": chan,
        "redis_cluster_factor": cluster_factor,
    }
    neg = [k for k, v in costs.items() if isinstance(v, float) and v < 0]
    if neg:
        print(f"warning: negative fitted costs {neg} (noise); clamped to 0", file=sys.stderr)
        for k_ in neg:
            costs[k_] = 0.0
    print(json.dumps({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in costs.items()}, indent=2))


def check(out, runs, costs, bench, entries):
    rows, errs = [], {"cpu": [], "redis": [], "mem": []}
    for e in entries:
        name, _scenario, nodes, shards, primaries, mode, *args = e.split()
        f = medians(out, name, runs, args)
        cmd = [bench, "plan", "--costs", costs, "--json", "--nodes", nodes, "--shards", shards,
               "--primaries", primaries, "-s", str(bench_arg(args, "-s")), "--rooms", str(bench_arg(args, "--rooms")),
               "--rate", str(f["P"]), "--idle", str(bench_arg(args, "-p"))]
        if mode == "shard":
            cmd.append("--per-shard-subscriptions")
        pr = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        err = lambda pred, meas: (pred - meas) / meas * 100 if meas else float("nan")  # noqa: E731
        e_cpu = err(pr["server_cores"], f["cpu"])
        e_red = err(pr["redis_cores"], f["redis"]) if int(primaries) > 0 else None
        mem_meas = f["rss_ready"] / f["nodes"]
        e_mem = err(pr["node_bytes"], mem_meas)
        errs["cpu"].append(e_cpu)
        errs["mem"].append(e_mem)
        if e_red is not None:
            errs["redis"].append(e_red)
        topo = "standalone" if primaries == "0" else (f"{primaries} primar{'y' if primaries == '1' else 'ies'}")
        rows.append(
            f"| {nodes} x {shards} | {topo}{', per shard' if mode == 'shard' else ''} "
            f"| {bench_arg(args, '-s') / bench_arg(args, '--rooms'):.0f} x {bench_arg(args, '--rooms'):.0f} | {f['P']:.0f} "
            f"| {f['D']:.0f} | {pr['server_cores']:.3f} / {f['cpu']:.3f} ({e_cpu:+.0f}%) "
            + (f"| {pr['redis_cores']:.3f} / {f['redis']:.3f} ({e_red:+.0f}%) " if e_red is not None else "| - ")
            + f"| {pr['node_bytes'] / 2**20:.0f} / {mem_meas / 2**20:.0f} ({e_mem:+.0f}%) | {f['loss']:.2f}% |")
    print("| nodes x shards | Redis | room size x rooms | publishes/s | deliveries/s "
          "| server cores, predicted / measured | Redis cores, predicted / measured "
          "| node MiB, predicted / measured | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    for k, label in (("cpu", "server CPU"), ("redis", "Redis CPU"), ("mem", "node memory")):
        v = [abs(x) for x in errs[k]]
        if v:
            print(f"- {label}: mean absolute error {statistics.mean(v):.0f}%, worst {max(v):.0f}% ({len(v)} configurations)")


if __name__ == "__main__":
    if sys.argv[1] == "fit":
        fit(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        check(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6:])
