"""Markdown tables and the default's bar from the JSON files of ``quality.py --json``.

    python benchmarks/quality_report.py out/retention.json out/finetuned.json

Per task: the mean test metric of every method at every FLOPs target, and the paired difference to
ipad (mean over seeds, 95% t interval). Then the bar the default must meet: for every IPAD variant,
task and target, the paired difference to the best of l1, l2, bn_scale, group_l2 and random (the one
with the highest mean, same allocation as the variant when that was run, else uniform); a variant
meets the bar where that difference is >= 0 or its interval contains 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from quality import paired

BASELINES = ("l1", "l2", "bn_scale", "group_l2", "random")


def _mean(runs, method, target):
    values = [r["after"] for r in runs if r["method"] == method and (r["target"] == target or method == "none")]
    return statistics.fmean(values) if values else None


def _targets(runs):
    return sorted({r["target"] for r in runs if r["method"] != "none"}, reverse=True)


def _diff(d) -> str:
    return "" if d is None else f"{d[0]:+.3f} ± {d[1]:.3f}" + (" *" if abs(d[0]) > d[1] else "")


def task_table(result: dict, reference: str = "ipad") -> str:
    runs, targets = result["runs"], _targets(result["runs"])
    methods = list(dict.fromkeys(r["method"] for r in runs))
    header = ["method", *(f"{t:.0%} FLOPs" for t in targets), *(f"vs {reference} at {t:.0%}" for t in targets)]
    best = {t: max((_mean(runs, m, t) or 0) for m in methods if m != "none") for t in targets}
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for m in methods:
        cells = [m + (" (default)" if m == "ipad" else "")]
        for t in targets:
            v = _mean(runs, m, t)
            cells.append("-" if v is None else (f"**{v:.4f}**" if m != "none" and v == best[t] else f"{v:.4f}"))
        cells += ["" if m in (reference, "none") else _diff(paired(runs, m, reference, t)) for t in targets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_baseline(runs, method: str, target: float) -> str | None:
    """The baseline with the highest mean, under the allocation of ``method`` when it was run."""
    _, _, allocation = method.partition("@")
    names = [f"{b}@{allocation}" if allocation else b for b in BASELINES]
    present = [n for n in names if _mean(runs, n, target) is not None] or \
        [b for b in BASELINES if _mean(runs, b, target) is not None]
    return max(present, key=lambda n: _mean(runs, n, target)) if present else None


def bar_table(results: list[tuple[str, dict]]) -> str:
    """Rows: (task, target); columns: IPAD variants; cells: the difference to the best baseline."""
    rows = [(label, r, t) for label, r in results for t in _targets(r["runs"])]
    variants = list(dict.fromkeys(m for _, r in results for m in dict.fromkeys(x["method"] for x in r["runs"])
                                  if m.startswith("ipad")))
    ok = {v: None for v in variants}  # None: never run; else whether no cell is worse
    lines = ["| task, FLOPs | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for label, r, t in rows:
        cells = [f"{label} {t:.0%}"]
        for v in variants:
            base = best_baseline(r["runs"], v, t)
            d = paired(r["runs"], v, base, t) if base and _mean(r["runs"], v, t) is not None else None
            if d is None:
                cells.append("-")
                continue
            worse = d[0] < 0 and abs(d[0]) > d[1]
            ok[v] = (ok[v] is not False) and not worse
            cells.append(f"{d[0]:+.3f}" + (" ✗" if worse else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| meets the bar where run | " + " | ".join("-" if ok[v] is None else ("yes" if ok[v] else "**no**")
                                                         for v in variants) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="files written by quality.py --json")
    args = parser.parse_args(argv)
    results = []
    for path in args.json:
        for result in json.loads(path.read_text())["tasks"]:
            label = result["task"] + (" tuned" if result["tuned"] else "")
            results.append((label, result))
            seeds = sorted(result["before"])
            unpruned = statistics.fmean(result["before"].values())
            print(f"\n{label} (unpruned {unpruned:.4f}, seeds {', '.join(map(str, seeds))}):\n")
            print(task_table(result))
    print("\nDifference to the best of " + ", ".join(BASELINES) + " (✗: worse, the 95% interval excludes 0):\n")
    print(bar_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
