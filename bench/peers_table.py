#!/usr/bin/env python3
"""Side-by-side table for scripts/bench-peers.sh.

In: the generator reports `OUT/run<k>/<row>__<system>.json` written by
`corecast-bench --json` (one per run, row and system). Out: `OUT/peers.md`
(one markdown table, every cell the median over the runs with the min-max
range) and `OUT/peers.json` (every cell's samples, median, min and max).
Nothing is computed that the reports do not hold; a cell with no report
says `failed` (see the logs), a pair that cannot run says `n/a`.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROW_TITLES = {
    "redis-2x1000-50": "2 nodes on Redis, 1 room of 2 x {half} subscribers, {rate} msg/s",
    "redis-2x50-3000": "2 nodes on Redis, 1 room of 2 x {half}, {rate} msg/s",
    "solo-2000-50": "standalone, 1 room of {subs}, {rate} msg/s",
    "solo-100-1000": "standalone, 1 room of {subs}, {rate} msg/s",
    "solo-100-3000": "standalone, 1 room of {subs}, {rate} msg/s",
    "rooms-100x100": "standalone, {rooms} rooms x {per_room} subscribers, {rate} msg/s",
    "idle-10k": "idle {subs} connections, {hold:.0f} s hold",
}


def metrics(report):
    """The table's numbers from one generator report (None where absent)."""
    m = {}
    server = report.get("server") or {}
    conns = report.get("connections") or {}
    m["ready"] = conns.get("ready")
    m["failed"] = conns.get("failed")
    m["dropped"] = conns.get("dropped")
    if report.get("scenario") == "idle":
        idle = report.get("idle") or {}
        m["rss_per_conn_kib"] = (idle.get("server_rss_per_conn_bytes") or 0) / 1024
        m["idle_cpu_us_per_conn_s"] = idle.get("server_cpu_us_per_conn_s")
        m["server_rss_mib"] = server.get("rss_ready_kb", 0) / 1024
        return m
    t = report.get("traffic") or {}
    lat = report.get("latency") or {}
    gen = report.get("generator") or {}
    received = t.get("received") or 0
    m["sent_per_s"] = t.get("sent_per_s")
    m["received"] = received
    m["expected"] = t.get("expected")
    m["deliveries_per_server_cpu_s"] = t.get("received_per_server_cpu_s")
    m["server_kernel_pct"] = server.get("kernel_pct")
    srv_cpu = server.get("cpu_with_drain_s")
    if received > 0 and srv_cpu is not None:
        m["cpu_us_per_delivery"] = (srv_cpu + gen.get("cpu_s", 0)) * 1e6 / received
    if received > 0 and report.get("redis_cpu_s") is not None:
        m["redis_us_per_delivery"] = report["redis_cpu_s"] * 1e6 / received
    if lat.get("count"):
        m["p50_ms"] = lat["p50_us"] / 1000
        m["p99_ms"] = lat["p99_us"] / 1000
    m["loss_pct"] = t.get("loss_pct")
    m["server_rss_mib"] = server.get("rss_end_kb", 0) / 1024
    return m


def fmt(v, digits, short=True):
    if v is None:
        return "—"
    if not short:
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.{digits}f}"
    if abs(v) >= 10000:
        return f"{v / 1000:.0f}k"
    if abs(v) >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.{digits}f}"


def cell(stats, key, digits, unit="", short=True):
    """Median (min–max over the runs); `short=False` keeps whole numbers (latency in ms)."""
    s = stats.get(key)
    if not s:
        return "—"
    text = fmt(s["median"], digits, short) + unit
    if len(s["samples"]) > 1:
        text += f" ({fmt(s['min'], digits, short)}–{fmt(s['max'], digits, short)})"
    return text


def loss_cell(stats):
    s = stats.get("loss_pct")
    if not s:
        return "—"
    text = "0" if s["median"] == 0 else f"{s['median']:.3g}%"
    if len(s["samples"]) > 1 and s["max"] > 0:
        text += f" ({s['min']:.3g}–{s['max']:.3g}%)"
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--systems", required=True)
    ap.add_argument("--rows", required=True)
    ap.add_argument("--quick", default="0")
    ap.add_argument("--duration", default="?")
    ap.add_argument("--idle-secs", default="?")
    ap.add_argument("--na", action="append", default=[], help="row:system:reason")
    a = ap.parse_args()
    systems = a.systems.split(",")
    rows = a.rows.split(",")
    na = {}
    for spec in a.na:
        row, system, why = spec.split(":", 2)
        na[(row, system)] = why

    cells = {}
    plan = {}
    for row in rows:
        for system in systems:
            samples = []
            for run in range(1, a.runs + 1):
                path = os.path.join(a.out, f"run{run}", f"{row}__{system}.json")
                try:
                    with open(path) as f:
                        report = json.load(f)
                except (OSError, ValueError):
                    continue
                samples.append(metrics(report))
                t = report.get("traffic") or {}
                idle = report.get("idle") or {}
                plan.setdefault(row, {
                    "subs": t.get("subscribers") or idle.get("connections"),
                    "rooms": t.get("rooms") or 1,
                    "rate": t.get("target_rate_per_s"),
                    "nodes": len(report.get("targets") or []),
                    "hold": idle.get("hold_s", 0),
                })
            stats = {}
            for key in sorted({k for s in samples for k in s}):
                vals = [s[key] for s in samples if s.get(key) is not None]
                if vals:
                    stats[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "samples": vals}
            cells.setdefault(row, {})[system] = {"runs": len(samples), "stats": stats, "na": na.get((row, system))}

    head = ("| load | system | msg/s sent | deliveries / server CPU-s | server CPU in the kernel "
            "| CPU µs / delivery (server + generator) "
            "| Redis CPU µs / delivery | p50 ms | p99 ms | loss | server RSS | idle CPU µs / conn-s |")
    lines = [head, "|" + "---|" * 12]
    for row in rows:
        p = plan.get(row, {})
        subs = p.get("subs") or 0
        title = ROW_TITLES.get(row, row).format(
            half=subs // 2, subs=subs, rate=f"{p.get('rate') or 0:.0f}", rooms=p.get("rooms", 1),
            per_room=subs // max(p.get("rooms", 1), 1), hold=p.get("hold", 0))
        for i, system in enumerate(systems):
            c = cells[row][system]
            label = title if i == 0 else ""
            if c["na"]:
                lines.append(f"| {label} | {system} | n/a ({c['na']}) |  |  |  |  |  |  |  |  |  |")
                continue
            if c["runs"] == 0:
                lines.append(f"| {label} | {system} | failed (see logs/) |  |  |  |  |  |  |  |  |  |")
                continue
            s = c["stats"]
            runs_note = f" [{c['runs']}/{a.runs} runs]" if c["runs"] < a.runs else ""
            fails = s.get("failed", {}).get("max", 0) + s.get("dropped", {}).get("max", 0)
            conn_note = f" ({fails:.0f} conns failed/dropped)" if fails else ""
            if row.startswith("idle"):
                rss = cell(s, "rss_per_conn_kib", 2, " KiB/conn")
                lines.append(f"| {label} | {system}{runs_note}{conn_note} | — | — | — | — | — | — | — | — | {rss} "
                             f"| {cell(s, 'idle_cpu_us_per_conn_s', 3)} |")
            else:
                lines.append(
                    f"| {label} | {system}{runs_note}{conn_note} | {cell(s, 'sent_per_s', 0)} "
                    f"| {cell(s, 'deliveries_per_server_cpu_s', 0)} | {cell(s, 'server_kernel_pct', 0, '%')} "
                    f"| {cell(s, 'cpu_us_per_delivery', 2)} | {cell(s, 'redis_us_per_delivery', 2)} "
                    f"| {cell(s, 'p50_ms', 2, short=False)} | {cell(s, 'p99_ms', 2, short=False)} | {loss_cell(s)} "
                    f"| {cell(s, 'server_rss_mib', 1, ' MiB')} | — |")
    mode = "quick" if a.quick == "1" else "full"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    intro = (f"Side by side, {mode} mode, {a.runs} run(s), {a.duration} s per fanout row, idle hold {a.idle_secs} s, "
             f"{when}. Cells: median over the runs" + (" (min–max)" if a.runs > 1 else "") + ".\n")
    md = intro + "\n" + "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "peers.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out, "peers.json"), "w") as f:
        json.dump({"generated": when, "mode": mode, "runs": a.runs, "duration_s": a.duration,
                   "idle_s": a.idle_secs, "systems": systems, "rows": rows, "plan": plan, "cells": cells}, f, indent=1)
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
