#!/usr/bin/env python3
"""Pool the round pairs of several ci/gpu/bench_pd.py runs into one interval.

Each run's pairs stay pairs (a pair never mixes runs); the paired bootstrap
then resamples all of them. Runs must use the same workload, trees and
execution mode.

Rows marked "per-request paired" (bench_pd.bootstrap_log_ratio: the
geometric mean of patched/stock over requests matched by prompt, the
bootstrap still over round pairs) use the runs that kept request records;
their pairs column says how many pairs that was. Without such runs the rows
are left out.

    python3 ci/gpu/bench_combine.py results/a.json results/b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bench_pd


def pooled_rounds(runs: list[dict]) -> list[dict]:
    """The rounds of all runs, pair numbers made distinct per run."""
    workloads = {run["workload"] for run in runs}
    if len(workloads) != 1:
        raise SystemExit(f"runs differ in workload: {sorted(workloads)}")
    # Runs from before execution modes ran eager.
    modes = {run.get("mode", "eager") for run in runs}
    if len(modes) != 1:
        raise SystemExit(f"runs differ in execution mode: {sorted(modes)}")
    rounds = []
    for i, run in enumerate(runs):
        offset = 1000 * i
        rounds += [dict(r, pair=r["pair"] + offset) for r in run["rounds"]]
    return rounds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="bench_pd.json files")
    parser.add_argument("--resamples", type=int, default=10000)
    args = parser.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.runs]
    ratios = bench_pd.ratios(pooled_rounds(runs), args.resamples)
    print(f"{len(runs)} runs: {', '.join(str(p) for p in args.runs)}")
    print("| metric | ratio | 95% CI | +-% | pairs |")
    print("|---|---|---|---|---|")
    rows = [(key, label) for key, label, _ in bench_pd.METRICS]
    rows += [(key, label) for _, key, label in bench_pd.REQUEST_METRICS]
    for key, label in rows:
        r = ratios.get(key)
        if r is None:
            continue
        lo, hi = r["ci95"]
        print(
            f"| {label} | {r['ratio']:.4f} | {lo:.4f}-{hi:.4f} | "
            f"{r['half_width_pct']:.2f} | {r['pairs']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
