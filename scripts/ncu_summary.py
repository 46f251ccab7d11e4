#!/usr/bin/env python3
"""Where a run's GPU time goes, from an ncu CSV log of `--metrics gpu__time_duration.sum --csv
--print-units base` (one row per kernel launch and metric): the total, and the kernels grouped by
name (template arguments and argument lists dropped), largest total first, with their launch
count, share of the total and mean duration.

    python3 scripts/ncu_summary.py ncu.csv [--top 30]

Used by scripts/gpu-check.sh on two training steps of the main job (GPT-2 124M, batch 8 x 512):
issue 21 asks where the rest of the gap to PyTorch goes."""
import argparse
import csv
import re
import sys
from collections import defaultdict


def family(name: str) -> str:
    """A kernel's name without its argument list and template arguments."""
    name = re.sub(r"\(.*$", "", name)
    depth, out = 0, []
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out).strip() or name


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("csv_log")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    with open(args.csv_log, newline="", errors="replace") as f:
        # ncu's own notes (==PROF==, ==WARNING==) precede the CSV header.
        lines = [line for line in f if line.startswith('"')]
    rows = list(csv.DictReader(lines))
    totals, counts = defaultdict(float), defaultdict(int)
    for row in rows:
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit, value = row.get("Metric Unit", ""), float(row.get("Metric Value", "0").replace(",", ""))
        scale = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0}.get(unit)
        if scale is None:
            print(f"unknown unit {unit!r}", file=sys.stderr)
            return 1
        name = family(row.get("Kernel Name", "?"))
        totals[name] += value * scale
        counts[name] += 1
    if not totals:
        print(f"no gpu__time_duration.sum rows in {args.csv_log} ({len(rows)} CSV rows)")
        return 1
    total = sum(totals.values())
    launches = sum(counts.values())
    print(f"kernel time: {total:.1f} ms in {launches} launches ({len(totals)} kernels)")
    print("| kernel | launches | total ms | share | mean us |")
    print("|---|---:|---:|---:|---:|")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {name[:90]} | {counts[name]} | {t:.2f} | {100 * t / total:.1f}% | {1000 * t / counts[name]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
