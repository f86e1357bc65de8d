#!/usr/bin/env python3
"""Run the benches that carry kvpool's speed goals several times and print each goal's figure:
the median of the invocations, every invocation's own figure, and whether the goal is met.

Each invocation is a separate `kvpool bench … --json` process (a fresh node, fresh engines), so
the spread shown is what a user re-running the command sees. Usage, from the repository root:

    .venv/bin/python scripts/bench-goals.py                      # all, 3 invocations each
    .venv/bin/python scripts/bench-goals.py --only node,lookup --invocations 5
    .venv/bin/python scripts/bench-goals.py --lmcache .venv-lmcache/bin/python   # LMCache beside

Every invocation's whole JSON goes to --out (JSON lines) for the record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# bench -> (extra arguments, [(figure, comparison, goal)])
GOALS: dict[str, tuple[list[str], list[tuple[str, str, float]]]] = {
    "node": (
        ["--runs", "5", "--total", "256"],
        [
            ("ratio_get_vs_tcp_4m", ">=", 1.0),
            ("ratio_get_vs_tcp_32m", ">=", 1.0),
            ("ratio_put_vs_tcp_4m", ">=", 0.9),
            ("ratio_put_vs_tcp_32m", ">=", 0.9),
        ],
    ),
    "pool": (
        ["--nodes", "3"],
        [
            ("ratio_pool_prefix_p99_vs_single_node", "<=", 1.2),
            ("ratio_pool_get_vs_single_node_4m", ">=", 0.95),
            ("ratio_pool_get_vs_single_node_32m", ">=", 0.95),
        ],
    ),
    "lookup": (
        [],
        [
            ("lookup_keys_per_s", ">=", 1_000_000),
            ("lookup_p99_ms", "<=", 0.3),
        ],
    ),
    "ttft": (
        ["--gpu", "off"],
        [
            ("connector_miss_overhead_ms", "<=", 0.2),
            ("connector_miss_skipped_steps", "<=", 0),
            ("engine_lookup_skipped_steps", "<=", 0),
        ],
    ),
}
LMCACHE_FIGURES = [  # issue 21: kvpool ahead of LMCache's server on both get and put
    ("ratio_lmcache_get_vs_tcp_4m", "info", 0.0),
    ("ratio_lmcache_get_vs_tcp_32m", "info", 0.0),
    ("ratio_lmcache_put_vs_tcp_4m", "info", 0.0),
    ("ratio_lmcache_put_vs_tcp_32m", "info", 0.0),
    ("ratio_get_vs_lmcache_4m", ">=", 1.0),
    ("ratio_get_vs_lmcache_32m", ">=", 1.0),
    ("ratio_put_vs_lmcache_4m", ">=", 1.0),
    ("ratio_put_vs_lmcache_32m", ">=", 1.0),
]


def _met(value: float, comparison: str, goal: float) -> str:
    if comparison == "info":
        return ""
    ok = value >= goal if comparison == ">=" else value <= goal
    return "met" if ok else "NOT met"


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(GOALS), help="comma list of benches (default: all)")
    ap.add_argument("--invocations", type=int, default=3)
    ap.add_argument(
        "--lmcache", default=None, help="python of a venv with lmcache (scripts/install-lmcache.sh)"
    )
    ap.add_argument(
        "--kvpool", default=str(Path(sys.executable).with_name("kvpool")), help="the kvpool command"
    )
    ap.add_argument("--out", default="bench-goals.jsonl", help="every invocation's JSON, one per line")
    args = ap.parse_args()
    benches = [b for b in args.only.split(",") if b]
    unknown = set(benches) - set(GOALS)
    if unknown:
        ap.error(f"unknown bench(es) {sorted(unknown)}; choose from {sorted(GOALS)}")
    results: dict[str, list[dict]] = {b: [] for b in benches}
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    with open(args.out, "a") as log:
        for i in range(args.invocations):
            for bench in benches:  # interleaved, so a slow moment of the machine hits every bench
                cmd = [args.kvpool, "bench", bench, *GOALS[bench][0], "--json"]
                if bench == "node" and args.lmcache:
                    cmd += ["--lmcache", args.lmcache]
                load = os.getloadavg()[0]
                t0 = time.monotonic()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    print(f"{' '.join(cmd)} failed (exit {proc.returncode})", file=sys.stderr)
                    return 1
                figures = json.loads(proc.stdout.strip().splitlines()[-1])
                results[bench].append(figures)
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                log.write(json.dumps({"bench": bench, "invocation": i + 1, "utc": stamp, "load1_before": load,
                                      "seconds": round(time.monotonic() - t0, 1), "figures": figures}) + "\n")  # fmt: skip
                print(f"[{stamp}] bench {bench} invocation {i + 1}: {time.monotonic() - t0:.0f} s, "
                      f"load average before {load:.2f}", file=sys.stderr)  # fmt: skip
    print("| bench | figure | goal | median | per invocation | |")
    print("|---|---|---|---|---|---|")
    for bench in benches:
        rows = GOALS[bench][1] + (LMCACHE_FIGURES if bench == "node" and args.lmcache else [])
        for figure, comparison, goal in rows:
            values = [r[figure] for r in results[bench] if isinstance(r.get(figure), int | float)]
            if not values:
                print(f"| {bench} | `{figure}` | | missing | | |")
                continue
            med = statistics.median(values)
            goal_text = "" if comparison == "info" else f"{comparison} {_fmt(goal)}"
            print(f"| {bench} | `{figure}` | {goal_text} | **{_fmt(med)}** | "
                  f"{', '.join(_fmt(v) for v in values)} | {_met(med, comparison, goal)} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
